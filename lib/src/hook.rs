//! The OCI hook podman runs for containers carrying our annotation.
//!
//! `precreate` gets the proposed OCI config on stdin and must print it back on stdout (and
//! nothing else). By then podman has created the container's network namespace; we install
//! and verify the shield inside it. Any failure is returned as an error, the hook exits
//! non-zero and podman refuses to create the container: the shield fails closed.
//!
//! `poststop` gets the OCI state, removes the per-container runtime directory and never fails.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

use crate::shield::decisions::Decisions;
use crate::shield::nft::{Netns, Nft};
use crate::shield::ruleset::Mode;
use crate::shield::{self, ShieldError};
use crate::sidecar::{Sidecar, SidecarError};
use crate::{SIDECAR_ANNOTATION, fsutil, paths, supervisor};

#[derive(Debug, Error)]
pub enum HookError {
    #[error("the OCI document on stdin is not valid JSON: {0}")]
    BadInput(serde_json::Error),
    #[error(transparent)]
    Sidecar(#[from] SidecarError),
    #[error(
        "a shielded container needs its own network namespace; --network host (or a config without one) is refused: use the default network, a named network, slirp4netns or pasta, or --no-shield"
    )]
    NoNetns,
    #[error(
        "the container joins another network namespace ({0}); the shield only guards a namespace of the container's own"
    )]
    SharedNetns(PathBuf),
    #[error("shield: {0}")]
    Shield(#[from] ShieldError),
}

/// Settings the hook gets from its hooks.d descriptor (hooks run with an empty environment).
#[derive(Debug, Clone)]
pub struct HookSettings {
    pub nft: PathBuf,
    /// The terok-supervisor binary (default: next to the hook).
    pub supervisor: PathBuf,
}

impl HookSettings {
    pub fn from_env() -> Self {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        HookSettings {
            nft: var("TEROK_NFT").unwrap_or_else(|| PathBuf::from(shield::DEFAULT_NFT)),
            supervisor: var("TEROK_SUPERVISOR").unwrap_or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|e| e.parent().map(|d| d.join("terok-supervisor")))
                    .unwrap_or_else(|| PathBuf::from("terok-supervisor"))
            }),
        }
    }
}

/// How long createRuntime waits for the supervisor's services to listen.
const READY_TIMEOUT: Duration = Duration::from_secs(3);

/// The sidecar path from an OCI config's or state's annotations.
pub fn sidecar_path(doc: &Value) -> Option<PathBuf> {
    doc.get("annotations")?
        .get(SIDECAR_ANNOTATION)?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
}

/// The state root a sidecar path belongs to (`<state>/sidecar/<name>.json` → `<state>`).
pub fn state_root(sidecar: &Path) -> Option<&Path> {
    sidecar.parent()?.parent()
}

/// The container's network namespace path from `linux.namespaces`.
fn netns_path(config: &Value) -> Result<PathBuf, HookError> {
    let namespaces = config
        .pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .ok_or(HookError::NoNetns)?;
    let net = namespaces
        .iter()
        .find(|ns| ns.get("type").and_then(Value::as_str) == Some("network"))
        .ok_or(HookError::NoNetns)?;
    let path = net
        .get("path")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .ok_or(HookError::NoNetns)?;
    // Podman names the namespaces it creates for a container `netns-<uuid>`; anything else
    // (`--network container:…`, `ns:…`, a pod's infra namespace) is shared with others.
    let own = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("netns-"));
    if !own {
        return Err(HookError::SharedNetns(path));
    }
    Ok(path)
}

/// The resolvers in the resolv.conf podman generated for the container.
fn resolvers(config: &Value) -> Vec<IpAddr> {
    let source = config
        .get("mounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|m| m.get("destination").and_then(Value::as_str) == Some("/etc/resolv.conf"))
        .and_then(|m| m.get("source").and_then(Value::as_str));
    let Some(text) = source.and_then(|s| std::fs::read_to_string(s).ok()) else {
        tracing::warn!("no resolv.conf for the container; DNS stays closed");
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("nameserver")
            && let Some(ip) = words
                .next()
                .and_then(|w| w.split('%').next())
                .and_then(|w| w.parse().ok())
            && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out
}

/// Install and verify the shield for the container `config` describes.
pub fn precreate(config: &Value, settings: &HookSettings) -> Result<(), HookError> {
    let Some(path) = sidecar_path(config) else {
        return Ok(());
    };
    let sidecar = Sidecar::load_from_annotation(&path)?;
    if let Some(plan) = &sidecar.shield {
        let netns = Netns::open(&netns_path(config)?)?;
        let decisions = Decisions::load(&paths::decisions_file(&sidecar.run_state_dir))?;
        let spec = shield::effective_spec(&plan.allow, &decisions, Mode::Up, resolvers(config));
        Nft::new(&settings.nft).apply_fresh(&netns, &spec)?;
        tracing::info!(
            container = %sidecar.container_name,
            allow = spec.allow.len(),
            deny = spec.deny.len(),
            "shield applied and verified"
        );
    }
    start_supervisor(config, &path, &sidecar, settings);
    Ok(())
}

/// Spawn the supervisor when the container has services. Never fails the container: its
/// services would be missing, but the shield already stands on its own.
fn start_supervisor(config: &Value, path: &Path, sidecar: &Sidecar, settings: &HookSettings) {
    let services = supervisor::services(sidecar);
    if services.is_empty() {
        return;
    }
    let netns = match netns_path(config) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(container = %sidecar.container_name, "no supervisor: {e}");
            return;
        }
    };
    let log = supervisor::log_file(path, &sidecar.container_name);
    match supervisor::process::spawn(
        &settings.supervisor,
        path,
        &netns,
        &sidecar.runtime_dir,
        log,
    ) {
        Ok(pid) => tracing::info!(container = %sidecar.container_name, pid, "spawned supervisor"),
        Err(e) => tracing::error!(
            container = %sidecar.container_name,
            "SUPERVISOR FAILED, the container runs without its services: {e}"
        ),
    }
}

/// `createRuntime`: hand the container's init pid to its supervisor, which ends with it, and
/// wait until its services listen: the container's first process runs after this hook.
/// Never fails the container.
pub fn create_runtime(state: &Value) {
    let Some(path) = sidecar_path(state) else {
        return;
    };
    let Some(pid) = state.get("pid").and_then(Value::as_u64).filter(|p| *p > 1) else {
        return;
    };
    match Sidecar::load_from_annotation(&path) {
        Ok(sidecar) if !supervisor::services(&sidecar).is_empty() => {
            let file = supervisor::container_pid_file(&sidecar.runtime_dir);
            if let Err(e) = fsutil::write_atomic(&file, format!("{pid}\n").as_bytes(), 0o600) {
                tracing::error!(container = %sidecar.container_name, "cannot record the container pid: {e}");
            }
            if let Err(e) = supervisor::process::wait_ready(&sidecar.runtime_dir, READY_TIMEOUT) {
                tracing::error!(
                    container = %sidecar.container_name,
                    "SUPERVISOR NOT READY, the container starts without its services: {e}"
                );
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("createRuntime: {e}"),
    }
}

/// Where a failed precreate leaves its reason for `terok-run` to show.
pub fn error_file(state_root: &Path, container: &str) -> PathBuf {
    state_root
        .join("logs")
        .join(format!("{container}.hook-error"))
}

/// Record (or clear, with `None`) the reason the last precreate of a container failed.
pub fn record_outcome(sidecar: &Path, error: Option<&str>) {
    let (Some(root), Some(name)) = (
        state_root(sidecar),
        sidecar.file_stem().and_then(|s| s.to_str()),
    ) else {
        return;
    };
    let file = error_file(root, name);
    match error {
        None => {
            let _ = fsutil::remove_file_if_exists(&file);
        }
        Some(reason) => {
            if let Some(dir) = file.parent() {
                let _ = fsutil::ensure_private_dir(dir, false);
            }
            let _ = fsutil::write_atomic(&file, format!("{reason}\n").as_bytes(), 0o600);
        }
    }
}

/// Tear down what a stopped container leaves behind. Never fails: podman only logs
/// poststop errors, and the next start must not depend on this having run.
pub fn poststop(state: &Value) {
    let Some(path) = sidecar_path(state) else {
        return;
    };
    match Sidecar::load_from_annotation(&path) {
        Ok(sidecar) => {
            // `podman stop` waits for this hook: no grace period on its path.
            supervisor::process::stop(&sidecar.runtime_dir, &path, Duration::ZERO);
            // The directory itself stays: it is the source of the container's /run/terok
            // mount, which podman checks before any hook of the next start runs.
            match fsutil::empty_dir(&sidecar.runtime_dir) {
                Ok(()) => {
                    tracing::info!(container = %sidecar.container_name, "poststop: runtime state removed")
                }
                Err(e) => tracing::warn!(container = %sidecar.container_name, "poststop: {e}"),
            }
        }
        // `cleanup` may already have removed everything.
        Err(e) => tracing::info!("poststop: nothing to tear down ({e})"),
    }
}

/// Write the config back for podman, exactly as received.
pub fn echo(out: &mut impl Write, input: &[u8]) -> std::io::Result<()> {
    out.write_all(input)?;
    out.flush()
}
