//! Logging set-up shared by the binaries: journald when it is there, otherwise stderr or an
//! append-only file (hooks: podman throws their stderr away).

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

/// Where log lines go when journald is not available.
pub enum Fallback<'a> {
    Stderr,
    File(&'a Path),
}

fn filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_env("TEROK_LOG").unwrap_or_else(|_| EnvFilter::new(default))
}

/// Install the global subscriber. `identifier` becomes the journald SYSLOG_IDENTIFIER.
/// Interactive commands pass `prefer_journald = false`: their users read stderr.
pub fn init(identifier: &str, default_level: &str, prefer_journald: bool, fallback: Fallback<'_>) {
    if prefer_journald && let Ok(layer) = tracing_journald::layer() {
        let layer = layer
            .with_syslog_identifier(identifier.to_owned())
            .with_field_prefix(None);
        let _ = tracing_subscriber::registry()
            .with(filter(default_level))
            .with(layer)
            .try_init();
        return;
    }
    match fallback {
        Fallback::Stderr => {
            // A person reads a terminal; a log file (the supervisor's stderr) wants times.
            if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                let _ = tracing_subscriber::fmt()
                    .with_env_filter(filter(default_level))
                    .with_writer(std::io::stderr)
                    .with_target(false)
                    .without_time()
                    .try_init();
            } else {
                let _ = tracing_subscriber::fmt()
                    .with_env_filter(filter(default_level))
                    .with_writer(std::io::stderr)
                    .with_ansi(false)
                    .try_init();
            }
        }
        Fallback::File(path) => {
            if let Some(dir) = path.parent() {
                let _ = crate::fsutil::ensure_private_dir(dir, false);
            }
            match OpenOptions::new().create(true).append(true).open(path) {
                Ok(file) => {
                    let _ = tracing_subscriber::fmt()
                        .with_env_filter(filter(default_level))
                        .with_writer(Mutex::new(file))
                        .with_ansi(false)
                        .try_init();
                }
                Err(_) => {
                    // Nowhere to write: stay silent rather than fail the caller.
                }
            }
        }
    }
}
