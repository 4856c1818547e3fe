//! The credentials vault: a SQLCipher DB holding provider credentials, SSH keys and the
//! phantom tokens, the passphrase chain that unlocks it, and the operator verbs
//! (`terok-admin vault …`, `terok-admin credentials …`, setup's vault phase).

pub mod cli;
pub mod provision;
pub mod sshkey;
pub mod store;
pub mod tiers;

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::Context;
use crate::names::NameError;
pub use cli::{CredentialsCommand, VaultCommand};
pub use store::{Db, OpenMode};
pub use tiers::{Chain, Tier};

/// A secret string that is wiped from memory when dropped.
pub type Secret = zeroize::Zeroizing<String>;

#[derive(Debug, Error)]
pub enum VaultError {
    #[error(
        "the vault is locked: no passphrase in any tier for {db}; run `terok-admin vault unlock` (or set credentials.passphrase_command)"
    )]
    NoPassphrase { db: PathBuf },
    #[error(
        "the passphrase{} does not open {db} (wrong passphrase, or a DB from another install); nothing was changed — `terok-admin vault status` shows the chain",
        if tier.is_empty() { String::new() } else { format!(" from the {tier} tier") }
    )]
    WrongPassphrase { db: PathBuf, tier: String },
    #[error(
        "passphrase tier {tier} is configured but unreadable ({detail}); fix or remove it — `terok-admin vault status` shows the chain"
    )]
    BrokenTier { tier: Tier, detail: String },
    #[error(
        "no credentials DB at {db}; create it with `terok-admin setup` or `terok-admin credentials set …`"
    )]
    MissingDb { db: PathBuf },
    #[error(
        "the credentials DB {db} is in use by another process (database is locked); find it with `fuser -v {db}`, stop it and retry"
    )]
    Busy { db: PathBuf },
    #[error("the credentials DB {db} is damaged ({detail}); restore it from a backup")]
    Corrupt { db: PathBuf, detail: String },
    #[error(
        "{db} is a legacy plaintext SQLite DB; encrypt it with `terok-admin credentials encrypt-db`"
    )]
    Plaintext { db: PathBuf },
    #[error("{db} is already SQLCipher-encrypted; refusing to encrypt it again (nothing changed)")]
    NotPlaintext { db: PathBuf },
    #[error(
        "{db} has schema version {version}, newer than this terok understands ({}); upgrade terok",
        store::USER_VERSION
    )]
    TooNew { db: PathBuf, version: i64 },
    #[error("cannot migrate {db}: {detail}; the DB was left unchanged")]
    Migration { db: PathBuf, detail: String },
    #[error("empty passphrase refused (SQLCipher would store the DB unencrypted)")]
    EmptyPassphrase,
    #[error("passphrases do not match; nothing was changed")]
    Mismatch,
    #[error("passphrase entry cancelled; nothing was changed")]
    Cancelled,
    #[error("cannot store the passphrase in the {tier} tier: {detail}")]
    TierWrite { tier: Tier, detail: String },
    #[error("{path} already exists; refusing to overwrite it (move it away and retry)")]
    Exists { path: PathBuf },
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot {what}: {source}")]
    Sql {
        what: String,
        source: rusqlite::Error,
    },
}

impl VaultError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        VaultError::Io {
            what: what.into(),
            source,
        }
    }
}

/// `<vault_dir>/credentials.db`.
pub fn db_path(ctx: &Context) -> PathBuf {
    ctx.paths.vault_dir.join("credentials.db")
}

/// `<vault_dir>/vault.recovery_acknowledged` (zero bytes; presence = acknowledged).
pub fn marker_path(ctx: &Context) -> PathBuf {
    ctx.paths.vault_dir.join("vault.recovery_acknowledged")
}

pub fn recovery_acknowledged(ctx: &Context) -> bool {
    std::fs::symlink_metadata(marker_path(ctx)).is_ok()
}

/// Resolve the passphrase and open the vault. `prompt` allows a TTY prompt as the last tier.
pub fn open(ctx: &Context, prompt: bool, mode: OpenMode) -> Result<(Db, Tier), VaultError> {
    let chain = Chain::from_ctx(ctx);
    open_with(&chain, prompt, mode)
}

pub fn open_with(chain: &Chain, prompt: bool, mode: OpenMode) -> Result<(Db, Tier), VaultError> {
    let db = &chain.db_path;
    if mode == OpenMode::Existing {
        match store::file_kind(db)? {
            store::FileKind::Missing => return Err(VaultError::MissingDb { db: db.clone() }),
            store::FileKind::Plaintext => return Err(VaultError::Plaintext { db: db.clone() }),
            _ => {}
        }
    }
    let Some((pw, tier)) = chain.resolve(prompt)? else {
        return Err(VaultError::NoPassphrase { db: db.clone() });
    };
    let opened = Db::open(db, &pw, mode).map_err(|e| name_tier(e, tier))?;
    tracing::debug!("vault opened with the passphrase from {tier}");
    Ok((opened, tier))
}

fn name_tier(e: VaultError, tier: Tier) -> VaultError {
    match e {
        VaultError::WrongPassphrase { db, .. } => VaultError::WrongPassphrase {
            db,
            tier: tier.id().to_owned(),
        },
        other => other,
    }
}

/// Mint a container's phantom tokens: its SSH-signer token and, with the broker, one per
/// provider of the credential set named like the scope. Earlier tokens of the same
/// (scope, container) are replaced. Never prompts. Returns the broker's (provider, token)
/// pairs, which go into the container's environment.
pub fn mint_container_tokens(
    ctx: &Context,
    scope: &str,
    container: &str,
    broker: bool,
) -> Result<Vec<(String, String)>, VaultError> {
    crate::names::scope(scope)?;
    crate::names::container(container)?;
    let (db, _) = open(ctx, false, OpenMode::Create)?;
    db.transaction(|db| {
        db.revoke_tokens(scope, container)?;
        db.create_token(scope, container, scope, "ssh")?;
        let mut minted = Vec::new();
        if broker {
            for provider in db.list_credentials(scope)? {
                let token = db.create_token(scope, container, scope, &provider)?;
                minted.push((provider, token));
            }
        }
        Ok(minted)
    })
}

/// Revoke every token of (scope, container); never prompts.
pub fn revoke_container_tokens(
    ctx: &Context,
    scope: &str,
    container: &str,
) -> Result<usize, VaultError> {
    let (db, _) = open(ctx, false, OpenMode::Existing)?;
    db.revoke_tokens(scope, container)
}

/// Replace control and format characters of an operator-influenced string for display.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\n' | '\r' | '\t' => " ".to_owned(),
            c if c.is_control() || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') => {
                format!("\\x{:02x}", c as u32)
            }
            c => c.to_string(),
        })
        .collect()
}

/// The user's own config file (the last layer), where vault verbs record their changes.
pub fn user_config_file(ctx: &Context) -> PathBuf {
    ctx.paths
        .config_files()
        .pop()
        .unwrap_or_else(|| ctx.paths.config_dir.join("config.yml"))
}

/// Set `credentials.<key>` in the user's config file (created if missing, written 0600
/// atomically). Comments in that file are not preserved.
pub fn patch_user_config(
    ctx: &Context,
    changes: &[(&str, serde_yaml_ng::Value)],
    create: bool,
) -> Result<Option<PathBuf>, VaultError> {
    use serde_yaml_ng::{Mapping, Value};
    let file = user_config_file(ctx);
    let mut doc = match std::fs::read_to_string(&file) {
        Ok(text) => serde_yaml_ng::from_str::<Value>(&text).map_err(|e| {
            VaultError::Refused(format!(
                "{} is not valid YAML ({e}); fix it and retry",
                file.display()
            ))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !create {
                return Ok(None);
            }
            Value::Mapping(Mapping::new())
        }
        Err(e) => return Err(VaultError::io(format!("read {}", file.display()), e)),
    };
    if doc.is_null() {
        doc = Value::Mapping(Mapping::new());
    }
    let Value::Mapping(root) = &mut doc else {
        return Err(VaultError::Refused(format!(
            "{} is not a YAML mapping; fix it and retry",
            file.display()
        )));
    };
    let section = root
        .entry(Value::from("credentials"))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if section.is_null() {
        *section = Value::Mapping(Mapping::new());
    }
    let Value::Mapping(section) = section else {
        return Err(VaultError::Refused(format!(
            "credentials in {} is not a mapping; fix it and retry",
            file.display()
        )));
    };
    for (key, value) in changes {
        section.insert(Value::from(*key), value.clone());
    }
    let text = serde_yaml_ng::to_string(&doc).expect("YAML serialises");
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| VaultError::io(format!("create {}", dir.display()), e))?;
    }
    crate::fsutil::write_atomic(&file, text.as_bytes(), 0o600)
        .map_err(|e| VaultError::io(format!("write {}", file.display()), e))?;
    Ok(Some(file))
}

/// Write the zero-byte recovery marker (0600); true if it was not there yet.
pub fn acknowledge(ctx: &Context) -> Result<bool, VaultError> {
    if recovery_acknowledged(ctx) {
        return Ok(false);
    }
    let file = marker_path(ctx);
    let dir = file.parent().unwrap_or(Path::new("."));
    crate::fsutil::ensure_private_dir(dir, false)
        .map_err(|e| VaultError::io(format!("create {}", dir.display()), e))?;
    crate::fsutil::write_atomic(&file, b"", 0o600)
        .map_err(|e| VaultError::io(format!("write {}", file.display()), e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_neutralises_terminal_control() {
        assert_eq!(sanitize("a\x1b[31mb\nc"), "a\\x1b[31mb c");
        assert_eq!(sanitize("plain-name"), "plain-name");
    }

    #[test]
    fn errors_are_one_line() {
        let errs = [
            VaultError::NoPassphrase {
                db: "/v/c.db".into(),
            },
            VaultError::WrongPassphrase {
                db: "/v/c.db".into(),
                tier: "passphrase-command".into(),
            },
            VaultError::Busy {
                db: "/v/c.db".into(),
            },
            VaultError::MissingDb {
                db: "/v/c.db".into(),
            },
            VaultError::Corrupt {
                db: "/v/c.db".into(),
                detail: "x".into(),
            },
        ];
        let texts: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        for t in &texts {
            assert!(!t.contains('\n'), "{t}");
        }
        assert!(texts[1].contains("from the passphrase-command tier"));
        let mut unique = texts.clone();
        unique.dedup();
        assert_eq!(unique.len(), texts.len());
    }
}
