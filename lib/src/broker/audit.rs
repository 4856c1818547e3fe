//! The audit log: one compact JSON line per proxied request in
//! `<vault_dir>/credential_audit.jsonl` (0600, created lazily with a 0700 parent).
//!
//! Fields (reference §3.5): `ts` (UTC, seconds, `+00:00`), `scope`, `subject`,
//! `credential_set`, `provider` (all `""` without token info), `method`, `path`, `status`,
//! `outcome`, `duration_ms`. What is deliberately *not* there: bodies, any header value,
//! the token (not even masked: the subject names the container), the credential, and the
//! query string — `path` is the raw path only, because query values can carry secrets
//! (signed URLs, `?key=`). WebSocket upgrades are audited once, with status 101.
//!
//! Soft-fail: an unwritable file logs one warning and disables the writer; the request is
//! never affected.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::store::TokenInfo;
use crate::fsutil;

/// File name of the audit log inside the vault directory.
pub const AUDIT_FILE: &str = "credential_audit.jsonl";

/// `<vault_dir>/credential_audit.jsonl`.
pub fn audit_path(vault_dir: &Path) -> PathBuf {
    vault_dir.join(AUDIT_FILE)
}

/// How a request ended, as recorded in the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    MissingToken,
    InvalidToken,
    NoRoute,
    CredentialMissing,
    CredentialMisconfigured,
    StoreUnavailable,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamTimeout,
    TooManyRedirects,
}

/// One audit line.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    pub ts: String,
    pub scope: &'a str,
    pub subject: &'a str,
    pub credential_set: &'a str,
    pub provider: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub outcome: Outcome,
    pub duration_ms: u64,
}

impl<'a> Entry<'a> {
    pub fn new(
        info: Option<&'a TokenInfo>,
        method: &'a str,
        path: &'a str,
        status: u16,
        outcome: Outcome,
        duration_ms: u64,
    ) -> Entry<'a> {
        let field = |f: fn(&'a TokenInfo) -> &'a str| info.map(f).unwrap_or("");
        Entry {
            ts: utc_now(),
            scope: field(|i| &i.scope),
            subject: field(|i| &i.subject),
            credential_set: field(|i| &i.credential_set),
            provider: field(|i| &i.provider),
            method,
            path,
            status,
            outcome,
            duration_ms,
        }
    }
}

enum State {
    Closed,
    Open(File),
    Disabled,
}

/// The append-only audit writer (no-op when built without a path).
pub struct AuditLog {
    path: Option<PathBuf>,
    state: Mutex<State>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish()
    }
}

impl AuditLog {
    pub fn new(path: Option<PathBuf>) -> AuditLog {
        AuditLog {
            path,
            state: Mutex::new(State::Closed),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Append one line. Each line is one `write` on an `O_APPEND` file, so concurrent
    /// writers (other brokers included) never interleave within a line.
    pub fn record(&self, entry: &Entry<'_>) {
        let Some(path) = &self.path else { return };
        let mut line = match serde_json::to_vec(entry) {
            Ok(line) => line,
            Err(e) => {
                tracing::warn!("audit entry not serialisable, skipped: {e}");
                return;
            }
        };
        line.push(b'\n');
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let State::Closed = *state {
            *state = match open(path) {
                Ok(file) => State::Open(file),
                Err(e) => {
                    tracing::warn!(
                        "audit log {} cannot be opened ({e}); auditing is off for this broker",
                        path.display()
                    );
                    State::Disabled
                }
            };
        }
        if let State::Open(file) = &mut *state
            && let Err(e) = file.write_all(&line)
        {
            tracing::warn!(
                "audit log {} write failed ({e}); auditing is off for this broker",
                path.display()
            );
            *state = State::Disabled;
        }
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        fsutil::ensure_private_dir(dir, false)?;
    }
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// Now as `YYYY-MM-DDTHH:MM:SS+00:00`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_utc(secs)
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SS+00:00` (proleptic Gregorian, UTC).
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00+00:00");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00+00:00");
        assert_eq!(format_utc(1_735_689_599), "2024-12-31T23:59:59+00:00");
        assert_eq!(format_utc(4_107_542_400), "2100-03-01T00:00:00+00:00");
    }

    #[test]
    fn lines_are_compact_private_and_soft_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault/credential_audit.jsonl");
        let log = AuditLog::new(Some(path.clone()));
        let info = TokenInfo {
            scope: "s".into(),
            subject: "c".into(),
            credential_set: "default".into(),
            provider: "p".into(),
        };
        log.record(&Entry::new(
            Some(&info),
            "GET",
            "/v1/x",
            200,
            Outcome::Ok,
            3,
        ));
        log.record(&Entry::new(
            None,
            "POST",
            "/",
            401,
            Outcome::MissingToken,
            0,
        ));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["provider"], "p");
        assert_eq!(lines[0]["outcome"], "ok");
        assert_eq!(lines[0]["duration_ms"], 3);
        assert_eq!(lines[1]["scope"], "");
        assert_eq!(lines[1]["outcome"], "missing_token");
        assert!(!text.contains(": "));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // A directory where the file should be: one warning, no panic, requests go on.
        let bad = AuditLog::new(Some(dir.path().to_owned()));
        bad.record(&Entry::new(None, "GET", "/", 200, Outcome::Ok, 0));
        bad.record(&Entry::new(None, "GET", "/", 200, Outcome::Ok, 0));
        AuditLog::new(None).record(&Entry::new(None, "GET", "/", 200, Outcome::Ok, 0));
    }
}
