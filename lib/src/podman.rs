//! The few questions we ask podman, and where its binary is.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PodmanError {
    #[error("podman binary not found on PATH; install podman (apt-get install podman)")]
    NotFound,
    #[error("podman {what} failed: {detail}")]
    Failed { what: String, detail: String },
}

/// Find an executable on PATH (or the standard system directories when PATH is unset).
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

pub fn binary() -> Result<PathBuf, PodmanError> {
    let found = which("podman").ok_or(PodmanError::NotFound)?;
    Ok(std::fs::canonicalize(&found).unwrap_or(found))
}

/// What we need to know about a container from the host side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    /// Init process pid; `None` when the container is not running.
    pub pid: Option<u32>,
    pub sidecar_annotation: Option<String>,
}

/// `podman inspect` one container; `Ok(None)` when podman does not know it.
pub fn inspect(podman: &Path, name: &str) -> Result<Option<ContainerInfo>, PodmanError> {
    let out = Command::new(podman)
        .args(["container", "inspect", "--format", "json", "--", name])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| PodmanError::Failed {
            what: "inspect".into(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("no such container") || stderr.contains("no such object") {
            return Ok(None);
        }
        return Err(PodmanError::Failed {
            what: "inspect".into(),
            detail: stderr.trim().to_owned(),
        });
    }
    let json: Value = serde_json::from_slice(&out.stdout).map_err(|e| PodmanError::Failed {
        what: "inspect".into(),
        detail: e.to_string(),
    })?;
    let Some(c) = json.as_array().and_then(|a| a.first()) else {
        return Ok(None);
    };
    let pid = c
        .pointer("/State/Pid")
        .and_then(Value::as_u64)
        .filter(|p| *p > 0)
        .and_then(|p| u32::try_from(p).ok());
    Ok(Some(ContainerInfo {
        id: c.get("Id").and_then(Value::as_str).unwrap_or("").to_owned(),
        pid,
        sidecar_annotation: c
            .pointer("/Config/Annotations")
            .and_then(|a| a.get(crate::SIDECAR_ANNOTATION))
            .and_then(Value::as_str)
            .map(str::to_owned),
    }))
}

/// Is the image present in local storage? A read of containers-storage's image index
/// answers the common cases without starting podman (~20 ms); anything it cannot decide
/// goes to `podman image exists`.
pub fn image_exists(podman: &Path, image: &str) -> Result<bool, PodmanError> {
    if let Some(answer) = image_in_store_index(image) {
        return Ok(answer);
    }
    let status = Command::new(podman)
        .args(["image", "exists", "--", image])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| PodmanError::Failed {
            what: "image exists".into(),
            detail: e.to_string(),
        })?;
    Ok(status.success())
}

/// `Some(true)` only when the default store's index names the image exactly; `None` means
/// "ask podman" (custom storage, short names, digests …). Never answers `Some(false)`: a
/// missing entry may still be found by podman's short-name resolution.
fn image_in_store_index(image: &str) -> Option<bool> {
    if std::env::var_os("CONTAINERS_STORAGE_CONF").is_some() {
        return None;
    }
    let root = if crate::paths::is_real_root() {
        PathBuf::from("/var/lib/containers/storage")
    } else {
        let data = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
        data.join("containers/storage")
    };
    let index = std::fs::read(root.join("overlay-images/images.json")).ok()?;
    let images: Value = serde_json::from_slice(&index).ok()?;
    let last = image.rsplit('/').next().unwrap_or(image);
    let mut wanted = vec![image.to_owned()];
    if !last.contains(':') && !last.contains('@') {
        wanted.push(format!("{image}:latest"));
    }
    let found = images.as_array()?.iter().any(|img| {
        img.get("names")
            .and_then(Value::as_array)
            .is_some_and(|names| names.iter().any(|n| wanted.iter().any(|w| n == w.as_str())))
    });
    found.then_some(true)
}
