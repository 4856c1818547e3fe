//! The per-container sidecar: everything the hook and the supervisor need to know about a
//! container, written by `prepare` (0600, atomically, never through a symlink) and kept
//! across stop/start until `cleanup`.

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{fsutil, names};

pub const VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum SidecarError {
    #[error("sidecar path {0} is not acceptable: {1}")]
    Path(PathBuf, &'static str),
    #[error("cannot read sidecar {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "sidecar {path} is corrupt ({detail}); run `terok-run cleanup` and prepare the container again"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot write sidecar {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the shield of this container starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShieldPlan {
    /// Profiles chosen at prepare time (for display).
    pub profiles: Vec<String>,
    /// Their entries resolved to networks at prepare time.
    pub allow: Vec<IpNet>,
}

/// Where the supervisor finds the vault and how it gets the passphrase: it runs with an
/// empty environment, so everything is spelled out here at prepare time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultPlan {
    pub dir: PathBuf,
    pub db_path: PathBuf,
    pub sealed_file: PathBuf,
    pub use_keyring: bool,
    pub passphrase_command: Option<String>,
    pub session_runtime_dir: Option<PathBuf>,
    pub routes: PathBuf,
    pub audit_log: PathBuf,
}

impl VaultPlan {
    /// The vault as this user's context resolves it.
    pub fn from_ctx(ctx: &crate::Context) -> Self {
        let chain = crate::vault::tiers::Chain::from_ctx(ctx);
        VaultPlan {
            dir: ctx.paths.vault_dir.clone(),
            db_path: chain.db_path,
            sealed_file: chain.sealed_file,
            use_keyring: chain.use_keyring,
            passphrase_command: chain.passphrase_command,
            session_runtime_dir: chain.session_runtime_dir,
            routes: ctx.paths.vault_dir.join("routes.json"),
            audit_log: ctx.paths.vault_dir.join("credential_audit.jsonl"),
        }
    }

    /// The passphrase chain the supervisor walks.
    pub fn chain(&self) -> crate::vault::tiers::Chain {
        crate::vault::tiers::Chain {
            db_path: self.db_path.clone(),
            sealed_file: self.sealed_file.clone(),
            use_keyring: self.use_keyring,
            passphrase_command: self.passphrase_command.clone(),
            session_runtime_dir: self.session_runtime_dir.clone(),
        }
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    pub version: u32,
    pub container_name: String,
    pub scope: Option<String>,
    /// Persistent per-container state (shield decisions).
    pub run_state_dir: PathBuf,
    /// Volatile per-container runtime directory (sockets), removed at poststop.
    pub runtime_dir: PathBuf,
    /// `None` when the container runs with `--no-shield`.
    pub shield: Option<ShieldPlan>,
    pub gate: bool,
    pub broker: bool,
    /// Present when the container has a scope (its services use the vault).
    #[serde(default)]
    pub vault: Option<VaultPlan>,
    /// The project whose gate mirror the container clones from and pushes to (its scope).
    #[serde(default)]
    pub project: Option<String>,
    /// Where the gate mirrors live (`<state>/gate`).
    #[serde(default)]
    pub gate_dir: Option<PathBuf>,
    /// The one token the container's gate accepts (`terok-g-<32 hex>`, basic-auth user).
    #[serde(default)]
    pub gate_token: Option<String>,
}

/// Everything but the gate token, which must never reach a log.
impl std::fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sidecar")
            .field("version", &self.version)
            .field("container_name", &self.container_name)
            .field("scope", &self.scope)
            .field("run_state_dir", &self.run_state_dir)
            .field("runtime_dir", &self.runtime_dir)
            .field("shield", &self.shield)
            .field("gate", &self.gate)
            .field("broker", &self.broker)
            .field("vault", &self.vault)
            .field("project", &self.project)
            .field("gate_dir", &self.gate_dir)
            .field(
                "gate_token",
                &self.gate_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Sidecar {
    fn validate(&self, path: &Path) -> Result<(), SidecarError> {
        let corrupt = |detail: String| SidecarError::Corrupt {
            path: path.to_owned(),
            detail,
        };
        if self.version != VERSION {
            return Err(corrupt(format!("unknown version {}", self.version)));
        }
        names::container(&self.container_name).map_err(|e| corrupt(e.to_string()))?;
        if path.file_stem().and_then(|s| s.to_str()) != Some(self.container_name.as_str()) {
            return Err(corrupt(
                "container_name does not match the file name".into(),
            ));
        }
        if let Some(scope) = &self.scope {
            names::scope(scope).map_err(|e| corrupt(e.to_string()))?;
        }
        if let Some(project) = &self.project {
            names::project(project).map_err(|e| corrupt(e.to_string()))?;
        }
        if let Some(token) = &self.gate_token
            && !crate::gate::is_token_shaped(token)
        {
            return Err(corrupt("gate_token is not a gate token".into()));
        }
        for p in [&self.run_state_dir, &self.runtime_dir]
            .into_iter()
            .chain(self.gate_dir.as_ref())
        {
            if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
                return Err(corrupt(format!(
                    "{} is not a clean absolute path",
                    p.display()
                )));
            }
        }
        Ok(())
    }

    /// Read and validate a sidecar we wrote.
    pub fn load(path: &Path) -> Result<Self, SidecarError> {
        let bytes = std::fs::read(path).map_err(|source| SidecarError::Read {
            path: path.to_owned(),
            source,
        })?;
        let sidecar: Sidecar =
            serde_json::from_slice(&bytes).map_err(|e| SidecarError::Corrupt {
                path: path.to_owned(),
                detail: e.to_string(),
            })?;
        sidecar.validate(path)?;
        Ok(sidecar)
    }

    /// Load the sidecar an annotation points at, with the checks a hook owes to a path that
    /// came through podman: absolute, no `..`, in a directory named `sidecar`, a regular file
    /// (not a symlink) owned by us and writable by nobody else.
    pub fn load_from_annotation(path: &Path) -> Result<Self, SidecarError> {
        let bad = |why| Err(SidecarError::Path(path.to_owned(), why));
        if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
            return bad("not a clean absolute path");
        }
        if path.parent().and_then(Path::file_name) != Some("sidecar".as_ref()) {
            return bad("not inside a `sidecar` directory");
        }
        let meta = std::fs::symlink_metadata(path).map_err(|source| SidecarError::Read {
            path: path.to_owned(),
            source,
        })?;
        if !meta.file_type().is_file() {
            return bad("not a regular file");
        }
        if meta.uid() != nix::unistd::geteuid().as_raw() {
            return bad("not owned by the user running the hook");
        }
        if meta.mode() & 0o022 != 0 {
            return bad("writable by group or others");
        }
        Self::load(path)
    }

    pub fn save(&self, path: &Path) -> Result<(), SidecarError> {
        let write_err = |source| SidecarError::Write {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            fsutil::ensure_private_dir(dir, true).map_err(write_err)?;
        }
        let mut text = serde_json::to_vec_pretty(self).expect("sidecar serialises");
        text.push(b'\n');
        fsutil::write_atomic(path, &text, 0o600).map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> Sidecar {
        Sidecar {
            version: VERSION,
            container_name: "c1".into(),
            scope: Some("proj".into()),
            run_state_dir: dir.join("runs/c1"),
            runtime_dir: dir.join("run/c1"),
            shield: Some(ShieldPlan {
                profiles: vec!["p".into()],
                allow: vec!["10.0.0.1/32".parse().unwrap()],
            }),
            gate: true,
            broker: false,
            vault: None,
            project: Some("proj".into()),
            gate_dir: Some(dir.join("gate")),
            gate_token: Some(crate::gate::mint_token().unwrap()),
        }
    }

    #[test]
    fn debug_output_never_shows_the_gate_token() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = sample(dir.path());
        s.gate_token = Some("terok-g-0123456789abcdef0123456789abcdef".into());
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("0123456789abcdef") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    #[test]
    fn round_trip_and_annotation_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sidecar/c1.json");
        let s = sample(dir.path());
        s.save(&path).unwrap();
        assert_eq!(Sidecar::load_from_annotation(&path).unwrap(), s);

        let elsewhere = dir.path().join("c1.json");
        std::fs::copy(&path, &elsewhere).unwrap();
        assert!(Sidecar::load_from_annotation(&elsewhere).is_err());

        let renamed = dir.path().join("sidecar/c2.json");
        std::fs::copy(&path, &renamed).unwrap();
        assert!(
            Sidecar::load(&renamed)
                .unwrap_err()
                .to_string()
                .contains("file name")
        );

        std::fs::write(&path, b"{\"version\":1}").unwrap();
        assert!(matches!(
            Sidecar::load(&path),
            Err(SidecarError::Corrupt { .. })
        ));
    }
}
