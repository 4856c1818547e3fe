//! The git gate: a per-project bare mirror under `<state>/gate/<project>.git` that agents
//! clone from and push to over smart HTTP on their own loopback, while the operator decides
//! what goes upstream.
//!
//! * [`mirror`]: `init`, the non-destructive `sync` (fast-forwards only; upstream rewrites and
//!   deletions become pending ops), pending ops, backups and the push log.
//! * [`hooks`]: the gate-owned `post-receive` hook (backup refs under `refs/terok/backup/…`).
//! * [`http`]: the front end the supervisor runs on `127.0.0.1:9418` in the container's
//!   network namespace: routes, HTTP Basic (username = gate token, compared in constant time).
//! * [`cgi`]: runs `git http-backend` per request, request body (chunked or not) streamed to
//!   its stdin, stdout streamed back, stderr drained concurrently.
//! * [`pktline`]: just enough pkt-line to log the ref updates of a push.
//! * [`cli`]: `terok-admin gate init|sync|pending|path|log`.

pub mod cgi;
pub mod cli;
pub mod hooks;
pub mod http;
pub mod mirror;
pub mod pktline;

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::names::{self, NameError};

pub use http::{Gate, serve};

/// The namespace agents never see: upstream snapshot, attic and backups.
pub const HIDDEN_NS: &str = "refs/terok";
/// Where destructive changes leave the old tip.
pub const BACKUP_NS: &str = "refs/terok/backup/";
/// git's CGI program, by absolute path (no PATH lookup in the supervisor).
pub const HTTP_BACKEND: &str = "/usr/lib/git-core/git-http-backend";
/// The push log the hook appends to, inside the bare repo.
pub const PUSH_LOG: &str = "terok-push.log";

#[derive(Debug, Error)]
pub enum GateError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("git not found on this host; install git (apt-get install git)")]
    GitMissing,
    #[error("git {what} failed: {stderr}")]
    Git { what: String, stderr: String },
    #[error(
        "no gate for project {project} at {path}; create it with `terok-admin gate init {project}`"
    )]
    NoGate { project: String, path: PathBuf },
    #[error(
        "the gate of {project} already has upstream {existing}; remove {path} to start over with another"
    )]
    UpstreamMismatch {
        project: String,
        existing: String,
        path: PathBuf,
    },
    #[error(
        "no pending op for branch {branch} of {project}; see `terok-admin gate pending {project}`"
    )]
    NoSuchPending { project: String, branch: String },
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> GateError {
    let what = what.into();
    move |source| GateError::Io { what, source }
}

/// `<gate_dir>/<project>.git`, after validating the project name.
pub fn repo_path(gate_dir: &Path, project: &str) -> Result<PathBuf, GateError> {
    let project = names::project(project)?;
    Ok(gate_dir.join(format!("{project}.git")))
}

/// The gate-owned hooks directory (`core.hooksPath` of every gate request). Its name cannot
/// be a repo: served repos end in `.git` and start with a letter or digit.
pub fn hooks_dir(gate_dir: &Path) -> PathBuf {
    gate_dir.join(".terok-hooks")
}

/// The private `HOME` and working directory of `git http-backend`.
pub fn home_dir(gate_dir: &Path) -> PathBuf {
    gate_dir.join(".terok-home")
}

/// A fresh gate token: `terok-g-` and 32 hex digits (128 bits from the OS CSPRNG).
pub fn mint_token() -> Result<String, GateError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| GateError::Io {
        what: "read the OS random generator".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("terok-g-{hex}"))
}

/// Is `s` a token of our format (no secret comparison: shape only)?
pub fn is_token_shaped(s: &str) -> bool {
    s.strip_prefix("terok-g-")
        .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// The URL an agent clones from: the token as basic-auth user, on its own loopback.
pub fn url(token: &str, project: &str) -> String {
    format!(
        "http://{token}@127.0.0.1:{}/{project}.git",
        crate::supervisor::GATE_PORT
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fresh_and_shaped() {
        let a = mint_token().unwrap();
        let b = mint_token().unwrap();
        assert!(is_token_shaped(&a), "{a}");
        assert_eq!(a.len(), 40);
        assert_ne!(a, b);
        assert!(!is_token_shaped("terok-g-XYZ"));
    }

    #[test]
    fn repo_paths_reject_traversal() {
        let base = Path::new("/g");
        assert_eq!(repo_path(base, "p1").unwrap(), Path::new("/g/p1.git"));
        for bad in ["", ".", "..", "a/b", "a\\b", "../x"] {
            assert!(repo_path(base, bad).is_err(), "{bad:?}");
        }
    }
}
