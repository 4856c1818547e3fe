//! The credentials DB: SQLCipher 4 (through rusqlite's bundled SQLCipher) with the original's
//! schema (`user_version` 4), its forward migrations, credential rows and phantom tokens.
//!
//! Every open keys the connection with the passphrase (`PRAGMA key`, KDF applied) and
//! `cipher_compatibility = 4` before any other statement, then forces a page read, so a wrong
//! key, a plaintext file, a damaged file and a busy DB are told apart before anything is
//! written.

use std::fs::{self, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Secret, VaultError};
use crate::fsutil;

/// The schema version this build writes and reads.
pub const USER_VERSION: i64 = 4;
/// SQLite's plaintext file header.
const PLAINTEXT_HEADER: &[u8; 16] = b"SQLite format 3\0";
/// How long an open waits for another process's lock before reporting it.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);
pub const TOKEN_PREFIX: &str = "terok-p-";

// The exact statement text of the original (SQLite keeps it in sqlite_master), so a vault we
// create is indistinguishable from one it created.
const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS credentials (
            credential_set TEXT NOT NULL,
            provider       TEXT NOT NULL,
            data           TEXT NOT NULL,
            PRIMARY KEY (credential_set, provider)
        )",
    "CREATE TABLE IF NOT EXISTS ssh_keys (
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            key_type     TEXT    NOT NULL CHECK (key_type IN ('ed25519','rsa')),
            private_der  BLOB    NOT NULL,
            public_blob  BLOB    NOT NULL,
            comment      TEXT    NOT NULL DEFAULT '',
            fingerprint  TEXT    NOT NULL UNIQUE,
            created_at   TEXT    NOT NULL DEFAULT (datetime('now'))
        )",
    "CREATE TABLE IF NOT EXISTS ssh_key_assignments (
            scope        TEXT    NOT NULL,
            key_id       INTEGER NOT NULL REFERENCES ssh_keys(id) ON DELETE CASCADE,
            assigned_at  TEXT    NOT NULL DEFAULT (datetime('now')),
            is_default   INTEGER NOT NULL DEFAULT 0 CHECK (is_default IN (0, 1)),
            PRIMARY KEY (scope, key_id)
        )",
    "CREATE TABLE IF NOT EXISTS proxy_tokens (
            token          TEXT PRIMARY KEY,
            scope          TEXT NOT NULL,
            subject        TEXT NOT NULL,
            credential_set TEXT NOT NULL,
            provider       TEXT NOT NULL
        )",
];
const DEFAULT_INDEX: &str = "CREATE UNIQUE INDEX IF NOT EXISTS ssh_one_default_per_scope ON ssh_key_assignments (scope) WHERE is_default = 1";

/// v2 → v3: agent names became upstream provider names.
const PROVIDER_RENAMES: &[(&str, &str)] = &[
    ("claude", "anthropic"),
    ("codex", "openai"),
    ("vibe", "mistral"),
    ("gh", "github"),
    ("glab", "gitlab"),
    ("sonar", "sonarcloud"),
];

/// Whether `open` may create a missing DB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// The DB must exist; a missing file is an error and nothing is created.
    Existing,
    /// Create the DB (0600 in a 0700 directory) when it is missing.
    Create,
}

/// One phantom-token row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenRow {
    pub token: String,
    pub scope: String,
    pub subject: String,
    pub credential_set: String,
    pub provider: String,
}

/// What a token authorises (the row without the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenInfo {
    pub scope: String,
    pub subject: String,
    pub credential_set: String,
    pub provider: String,
}

/// Metadata of a stored SSH key (never the private bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SshKeyInfo {
    pub id: i64,
    pub key_type: String,
    pub comment: String,
    pub fingerprint: String,
    pub created_at: String,
}

/// An open, keyed credentials DB.
pub struct Db {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("path", &self.path).finish()
    }
}

/// What the first bytes of a DB file say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Missing,
    Empty,
    Plaintext,
    /// Not plaintext SQLite: SQLCipher (or something damaged).
    Opaque,
}

pub fn file_kind(path: &Path) -> Result<FileKind, VaultError> {
    let mut file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileKind::Missing),
        Err(source) => return Err(VaultError::io(format!("read {}", path.display()), source)),
    };
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(source) => return Err(VaultError::io(format!("read {}", path.display()), source)),
        }
    }
    Ok(match got {
        0 => FileKind::Empty,
        16 if &head == PLAINTEXT_HEADER => FileKind::Plaintext,
        _ => FileKind::Opaque,
    })
}

/// True for a legacy plaintext SQLite DB (false for a missing or empty file).
pub fn is_plaintext(path: &Path) -> Result<bool, VaultError> {
    Ok(file_kind(path)? == FileKind::Plaintext)
}

/// A SQLCipher file is whole 4096-byte pages; anything else cannot be a vault.
fn looks_truncated(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.len() == 0 || m.len() % 4096 != 0)
}

/// Quote a value as an SQL string literal (pragmas take no bound parameters).
fn sql_literal(value: &str) -> Secret {
    Secret::new(format!("'{}'", value.replace('\'', "''")))
}

/// Map an error of the open sequence to what it means.
fn classify(path: &Path, err: rusqlite::Error) -> VaultError {
    let db = path.to_owned();
    match err.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => {
            if is_plaintext(path).unwrap_or(false) {
                VaultError::Plaintext { db }
            } else if looks_truncated(path) {
                VaultError::Corrupt {
                    db,
                    detail: "not a whole number of 4096-byte pages".into(),
                }
            } else {
                VaultError::WrongPassphrase {
                    db,
                    tier: String::new(),
                }
            }
        }
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => VaultError::Busy { db },
        Some(ErrorCode::DatabaseCorrupt) => VaultError::Corrupt {
            db,
            detail: err.to_string(),
        },
        Some(ErrorCode::CannotOpen | ErrorCode::PermissionDenied | ErrorCode::ReadOnly) => {
            VaultError::Sql {
                what: format!("open {}", path.display()),
                source: err,
            }
        }
        _ => VaultError::Sql {
            what: format!("read {}", path.display()),
            source: err,
        },
    }
}

fn sql(what: &str) -> impl FnOnce(rusqlite::Error) -> VaultError + '_ {
    move |source| VaultError::Sql {
        what: what.to_owned(),
        source,
    }
}

/// Key a fresh connection: `PRAGMA key` then SQLCipher 4 defaults, before anything else.
fn key_connection(conn: &Connection, passphrase: &str) -> rusqlite::Result<()> {
    let key = sql_literal(passphrase);
    conn.execute_batch(&format!("PRAGMA key = {}", key.as_str()))?;
    // SQLCipher logs decryption failures to stderr by itself (its default is set when the
    // codec activates, at the key); we report them ourselves, in one line.
    let _ = conn.execute_batch("PRAGMA cipher_log_level = NONE");
    conn.execute_batch("PRAGMA cipher_compatibility = 4")?;
    Ok(())
}

/// Pre-create `path` empty, 0600, without following a symlink (SQLite then initialises it
/// and copies its mode to the -wal and -shm files).
fn create_private_file(path: &Path) -> Result<(), VaultError> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(VaultError::io(format!("create {}", path.display()), source)),
    }
}

/// A fresh passphrase: 32 CSPRNG bytes, URL-safe base64 without padding (43 chars).
pub fn generate_passphrase() -> Secret {
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(bytes.as_mut()).expect("the OS CSPRNG is available");
    Secret::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes.as_ref()))
}

/// `terok-p-` + 16 CSPRNG bytes as 32 lowercase hex digits.
pub fn new_token() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS CSPRNG is available");
    let mut out = String::with_capacity(40);
    out.push_str(TOKEN_PREFIX);
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Display form of a token: the prefix and 8 characters, never the whole value.
pub fn mask_token(token: &str) -> String {
    let (keep, rest) = match token.strip_prefix(TOKEN_PREFIX) {
        Some(rest) => (TOKEN_PREFIX, rest),
        None => ("", token),
    };
    let shown: String = rest.chars().take(8).collect();
    format!("{keep}{shown}…")
}

impl Db {
    /// Map a statement error: busy and corrupt keep their meaning, the rest say what failed.
    fn sql<'a>(&'a self, what: &'a str) -> impl FnOnce(rusqlite::Error) -> VaultError + 'a {
        move |source| match source.sqlite_error_code() {
            Some(
                ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::DatabaseCorrupt,
            ) => classify(&self.path, source),
            _ => VaultError::Sql {
                what: what.to_owned(),
                source,
            },
        }
    }

    /// Open (or create) the vault at `path` with `passphrase`; bootstrap and migrate the schema.
    pub fn open(path: &Path, passphrase: &str, mode: OpenMode) -> Result<Db, VaultError> {
        if passphrase.is_empty() {
            return Err(VaultError::EmptyPassphrase);
        }
        match file_kind(path)? {
            FileKind::Plaintext => {
                return Err(VaultError::Plaintext {
                    db: path.to_owned(),
                });
            }
            FileKind::Missing if mode == OpenMode::Existing => {
                return Err(VaultError::MissingDb {
                    db: path.to_owned(),
                });
            }
            FileKind::Missing => {
                let dir = path.parent().unwrap_or(Path::new("."));
                fsutil::ensure_private_dir(dir, true)
                    .map_err(|e| VaultError::io(format!("create {}", dir.display()), e))?;
                create_private_file(path)?;
            }
            FileKind::Opaque if looks_truncated(path) => {
                // Checked before SQLite touches it: a damaged file gets no -wal/-shm.
                return Err(VaultError::Corrupt {
                    db: path.to_owned(),
                    detail: "not a whole number of 4096-byte pages".into(),
                });
            }
            FileKind::Empty | FileKind::Opaque => {}
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| classify(path, e))?;
        key_connection(&conn, passphrase).map_err(|e| classify(path, e))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| classify(path, e))?;
        // A wrong key only shows on the first page read: force one now.
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(|e| classify(path, e))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(|e| classify(path, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(VaultError::Busy {
                db: path.to_owned(),
            });
        }
        conn.execute_batch("PRAGMA foreign_keys=ON")
            .map_err(|e| classify(path, e))?;
        let db = Db {
            conn,
            path: path.to_owned(),
        };
        db.bootstrap().map_err(|e| match e {
            VaultError::Sql { source, .. } => classify(path, source),
            other => other,
        })?;
        Ok(db)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw connection, for inspection in tests and tools.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn user_version(&self) -> Result<i64, VaultError> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(self.sql("read user_version"))
    }

    fn has_column(&self, table: &str, column: &str) -> Result<bool, VaultError> {
        let mut stmt = self
            .conn
            .prepare(&format!("PRAGMA table_info({table})"))
            .map_err(self.sql("inspect the schema"))?;
        let names = stmt
            .query_map([], |r| r.get::<_, String>(1))
            .map_err(self.sql("inspect the schema"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql("inspect the schema"))?;
        Ok(names.iter().any(|n| n == column))
    }

    fn table_exists(&self, table: &str) -> Result<bool, VaultError> {
        self.conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)
            .map_err(self.sql("inspect the schema"))
    }

    /// Create missing tables, then migrate forward to `USER_VERSION`. A DB that is already
    /// current is not written to.
    fn bootstrap(&self) -> Result<(), VaultError> {
        let current = self.user_version()?;
        if current > USER_VERSION {
            return Err(VaultError::TooNew {
                db: self.path.clone(),
                version: current,
            });
        }
        if current == USER_VERSION {
            return Ok(());
        }
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(self.sql("start the schema migration"))?;
        // A pre-v1 ssh_keys table (private_pem) must not be shadowed by the new definition;
        // a pre-v4 assignments table gets its column by migration below.
        let legacy_keys =
            self.table_exists("ssh_keys")? && self.has_column("ssh_keys", "private_pem")?;
        for stmt in SCHEMA {
            if legacy_keys && stmt.contains("TABLE IF NOT EXISTS ssh_keys ") {
                continue;
            }
            tx.execute_batch(stmt)
                .map_err(self.sql("create the schema"))?;
        }
        if current < 1 && legacy_keys {
            self.migrate_v0_keys()?;
        }
        if current < 2
            && self.has_column("proxy_tokens", "task")?
            && !self.has_column("proxy_tokens", "subject")?
        {
            tx.execute_batch("ALTER TABLE proxy_tokens RENAME COLUMN task TO subject")
                .map_err(self.sql("migrate proxy_tokens to v2"))?;
        }
        if current < 3 {
            for (old, new) in PROVIDER_RENAMES {
                for table in ["credentials", "proxy_tokens"] {
                    tx.execute(
                        &format!("UPDATE OR IGNORE {table} SET provider = ?2 WHERE provider = ?1"),
                        params![old, new],
                    )
                    .map_err(self.sql("migrate provider names to v3"))?;
                }
            }
        }
        if !self.has_column("ssh_key_assignments", "is_default")? {
            tx.execute_batch(
                "ALTER TABLE ssh_key_assignments ADD COLUMN is_default INTEGER NOT NULL DEFAULT 0 CHECK (is_default IN (0, 1))",
            )
            .map_err(self.sql("migrate ssh_key_assignments to v4"))?;
        }
        tx.execute_batch(DEFAULT_INDEX)
            .map_err(self.sql("create the schema"))?;
        tx.execute_batch(&format!("PRAGMA user_version = {USER_VERSION}"))
            .map_err(self.sql("set user_version"))?;
        tx.commit().map_err(self.sql("commit the schema migration"))
    }

    /// v0 → v1: OpenSSH-PEM private keys become unencrypted PKCS#8 DER, hex fingerprints
    /// become `SHA256:<base64>`, and the column is renamed.
    fn migrate_v0_keys(&self) -> Result<(), VaultError> {
        let rows: Vec<(i64, Vec<u8>, Vec<u8>)> = {
            let mut stmt = self
                .conn
                .prepare("SELECT id, private_pem, public_blob FROM ssh_keys")
                .map_err(self.sql("read v0 ssh keys"))?;
            stmt.query_map([], |r| {
                let pem: rusqlite::types::Value = r.get(1)?;
                let pem = match pem {
                    rusqlite::types::Value::Text(t) => t.into_bytes(),
                    rusqlite::types::Value::Blob(b) => b,
                    _ => Vec::new(),
                };
                Ok((r.get(0)?, pem, r.get(2)?))
            })
            .map_err(self.sql("read v0 ssh keys"))?
            .collect::<Result<_, _>>()
            .map_err(self.sql("read v0 ssh keys"))?
        };
        for (id, pem, blob) in rows {
            let der = super::sshkey::openssh_pem_to_pkcs8(&pem).map_err(|detail| {
                VaultError::Migration {
                    db: self.path.clone(),
                    detail: format!("ssh key {id}: {detail}"),
                }
            })?;
            self.conn
                .execute(
                    "UPDATE ssh_keys SET private_pem = ?1, fingerprint = ?2 WHERE id = ?3",
                    params![der.as_slice(), fingerprint(&blob), id],
                )
                .map_err(self.sql("migrate ssh keys to v1"))?;
        }
        self.conn
            .execute_batch("ALTER TABLE ssh_keys RENAME COLUMN private_pem TO private_der")
            .map_err(self.sql("migrate ssh keys to v1"))
    }

    // ---- credentials -------------------------------------------------------------------

    /// Store (insert or replace) a provider credential of a credential set.
    pub fn store_credential(
        &self,
        set: &str,
        provider: &str,
        data: &Map<String, Value>,
    ) -> Result<(), VaultError> {
        let text = zeroize::Zeroizing::new(serde_json::to_string(data).expect("JSON map"));
        self.conn
            .execute(
                "INSERT OR REPLACE INTO credentials (credential_set, provider, data) VALUES (?1, ?2, ?3)",
                params![set, provider, text.as_str()],
            )
            .map_err(self.sql("store the credential"))?;
        Ok(())
    }

    /// The JSON payload of a credential, or `None`.
    pub fn load_credential(
        &self,
        set: &str,
        provider: &str,
    ) -> Result<Option<Map<String, Value>>, VaultError> {
        let text: Option<String> = self
            .conn
            .query_row(
                "SELECT data FROM credentials WHERE credential_set = ?1 AND provider = ?2",
                params![set, provider],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql("read a credential"))?;
        let Some(text) = text.map(zeroize::Zeroizing::new) else {
            return Ok(None);
        };
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(map)) => Ok(Some(map)),
            _ => Err(VaultError::Corrupt {
                db: self.path.clone(),
                detail: format!("credential {set}/{provider} is not a JSON object"),
            }),
        }
    }

    /// Providers of one set, sorted.
    pub fn list_credentials(&self, set: &str) -> Result<Vec<String>, VaultError> {
        self.strings(
            "SELECT provider FROM credentials WHERE credential_set = ?1 ORDER BY provider",
            &[set],
        )
    }

    /// Distinct credential sets, sorted.
    pub fn list_credential_sets(&self) -> Result<Vec<String>, VaultError> {
        self.strings(
            "SELECT DISTINCT credential_set FROM credentials ORDER BY credential_set",
            &[],
        )
    }

    /// Delete a credential; true if one was there.
    pub fn delete_credential(&self, set: &str, provider: &str) -> Result<bool, VaultError> {
        self.conn
            .execute(
                "DELETE FROM credentials WHERE credential_set = ?1 AND provider = ?2",
                params![set, provider],
            )
            .map(|n| n > 0)
            .map_err(self.sql("delete the credential"))
    }

    fn strings(&self, query: &str, args: &[&str]) -> Result<Vec<String>, VaultError> {
        let mut stmt = self
            .conn
            .prepare(query)
            .map_err(self.sql("query the vault"))?;
        stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| r.get(0))
            .map_err(self.sql("query the vault"))?
            .collect::<Result<_, _>>()
            .map_err(self.sql("query the vault"))
    }

    // ---- phantom tokens ----------------------------------------------------------------

    /// Mint a phantom token for (scope, subject, credential set, provider).
    pub fn create_token(
        &self,
        scope: &str,
        subject: &str,
        credential_set: &str,
        provider: &str,
    ) -> Result<String, VaultError> {
        let token = new_token();
        self.conn
            .execute(
                "INSERT INTO proxy_tokens (token, scope, subject, credential_set, provider) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![token, scope, subject, credential_set, provider],
            )
            .map_err(self.sql("store a phantom token"))?;
        Ok(token)
    }

    /// What a phantom token authorises, or `None` for an unknown token.
    pub fn lookup_token(&self, token: &str) -> Result<Option<TokenInfo>, VaultError> {
        if !token.starts_with(TOKEN_PREFIX) || token.len() != TOKEN_PREFIX.len() + 32 {
            return Ok(None);
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT token, scope, subject, credential_set, provider FROM proxy_tokens WHERE token = ?1",
            )
            .map_err(self.sql("look up a phantom token"))?;
        let row = stmt
            .query_row([token], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    TokenInfo {
                        scope: r.get(1)?,
                        subject: r.get(2)?,
                        credential_set: r.get(3)?,
                        provider: r.get(4)?,
                    },
                ))
            })
            .optional()
            .map_err(self.sql("look up a phantom token"))?;
        // The index found the row; the final equality is still checked in constant time.
        Ok(row.and_then(|(stored, info)| {
            bool::from(stored.as_bytes().ct_eq(token.as_bytes())).then_some(info)
        }))
    }

    /// Every token row, ordered by (scope, subject, provider, token). Callers mask them.
    pub fn list_tokens(&self) -> Result<Vec<TokenRow>, VaultError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT token, scope, subject, credential_set, provider FROM proxy_tokens ORDER BY scope, subject, provider, token",
            )
            .map_err(self.sql("list phantom tokens"))?;
        stmt.query_map([], |r| {
            Ok(TokenRow {
                token: r.get(0)?,
                scope: r.get(1)?,
                subject: r.get(2)?,
                credential_set: r.get(3)?,
                provider: r.get(4)?,
            })
        })
        .map_err(self.sql("list phantom tokens"))?
        .collect::<Result<_, _>>()
        .map_err(self.sql("list phantom tokens"))
    }

    /// Delete every token of (scope, subject); returns how many went. Idempotent.
    pub fn revoke_tokens(&self, scope: &str, subject: &str) -> Result<usize, VaultError> {
        self.conn
            .execute(
                "DELETE FROM proxy_tokens WHERE scope = ?1 AND subject = ?2",
                params![scope, subject],
            )
            .map_err(self.sql("revoke phantom tokens"))
    }

    /// Run `f` inside `BEGIN IMMEDIATE … COMMIT`, rolling back on error.
    pub fn transaction<T>(
        &self,
        f: impl FnOnce(&Db) -> Result<T, VaultError>,
    ) -> Result<T, VaultError> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| classify(&self.path, e))?;
        match f(self) {
            Ok(v) => {
                self.conn
                    .execute_batch("COMMIT")
                    .map_err(|e| classify(&self.path, e))?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    // ---- ssh keys (read side; the ssh verbs are another module) ------------------------

    pub fn count_ssh_keys(&self) -> Result<i64, VaultError> {
        self.conn
            .query_row("SELECT count(*) FROM ssh_keys", [], |r| r.get(0))
            .map_err(self.sql("count ssh keys"))
    }

    /// Keys assigned to a scope: the default first, then by assignment time, then id.
    pub fn list_ssh_keys_for_scope(&self, scope: &str) -> Result<Vec<SshKeyInfo>, VaultError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT k.id, k.key_type, k.comment, k.fingerprint, k.created_at
                 FROM ssh_key_assignments a JOIN ssh_keys k ON k.id = a.key_id
                 WHERE a.scope = ?1 ORDER BY a.is_default DESC, a.assigned_at, k.id",
            )
            .map_err(self.sql("list ssh keys"))?;
        stmt.query_map([scope], |r| {
            Ok(SshKeyInfo {
                id: r.get(0)?,
                key_type: r.get(1)?,
                comment: r.get(2)?,
                fingerprint: r.get(3)?,
                created_at: r.get(4)?,
            })
        })
        .map_err(self.sql("list ssh keys"))?
        .collect::<Result<_, _>>()
        .map_err(self.sql("list ssh keys"))
    }

    /// Close, reporting a failure to release the DB.
    pub fn close(self) -> Result<(), VaultError> {
        let path = self.path.clone();
        self.conn.close().map_err(|(_, e)| classify(&path, e))
    }
}

/// `SHA256:<unpadded standard base64 of sha256(public blob)>`, as `ssh-keygen -l` prints.
pub fn fingerprint(public_blob: &[u8]) -> String {
    let digest = Sha256::digest(public_blob);
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

/// Re-encrypt an open SQLCipher DB under a new passphrase (`vault passphrase change`).
/// Refuses, before modifying anything, when another connection holds the DB.
pub fn rekey_in_place(path: &Path, old: &str, new: &str) -> Result<(), VaultError> {
    if new.is_empty() || old.is_empty() {
        return Err(VaultError::EmptyPassphrase);
    }
    if is_plaintext(path)? {
        return Err(VaultError::Plaintext {
            db: path.to_owned(),
        });
    }
    if !path.exists() {
        return Err(VaultError::MissingDb {
            db: path.to_owned(),
        });
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .map_err(|e| classify(path, e))?;
    key_connection(&conn, old).map_err(|e| classify(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| classify(path, e))?;
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    })
    .map_err(|e| classify(path, e))?;
    let busy: i64 = conn
        .query_row("PRAGMA wal_checkpoint(FULL)", [], |r| r.get(0))
        .map_err(|e| classify(path, e))?;
    if busy != 0 {
        return Err(VaultError::Busy {
            db: path.to_owned(),
        });
    }
    let mode: String = conn
        .query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))
        .map_err(|e| classify(path, e))?;
    if !mode.eq_ignore_ascii_case("delete") {
        return Err(VaultError::Busy {
            db: path.to_owned(),
        });
    }
    let key = sql_literal(new);
    conn.execute_batch(&format!("PRAGMA rekey = {}", key.as_str()))
        .map_err(|e| classify(path, e))?;
    conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0))
        .map_err(|e| classify(path, e))?;
    conn.close().map_err(|(_, e)| classify(path, e))
}

/// Remove the `-wal`, `-shm` and `-journal` files next to `path`.
fn remove_sidecars(path: &Path) {
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = fsutil::remove_file_if_exists(Path::new(&p));
    }
}

/// Existing `-wal`/`-shm`/`-journal` files of a DB.
pub fn existing_sidecars(path: &Path) -> Vec<PathBuf> {
    ["-wal", "-shm", "-journal"]
        .iter()
        .map(|s| {
            let mut p = path.as_os_str().to_owned();
            p.push(s);
            PathBuf::from(p)
        })
        .filter(|p| p.exists())
        .collect()
}

/// Encrypt a legacy plaintext DB in place (via `<db>.encrypting` and an atomic rename).
/// Refuses when the temporary target already exists; on failure nothing is left behind.
pub fn encrypt_in_place(path: &Path, passphrase: &str) -> Result<(), VaultError> {
    if passphrase.is_empty() {
        return Err(VaultError::EmptyPassphrase);
    }
    if !is_plaintext(path)? {
        return Err(VaultError::NotPlaintext {
            db: path.to_owned(),
        });
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".encrypting");
    let tmp = PathBuf::from(tmp);
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(VaultError::Exists { path: tmp });
        }
        Err(source) => return Err(VaultError::io(format!("create {}", tmp.display()), source)),
    }
    let result = (|| -> Result<(), VaultError> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(|e| classify(path, e))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| classify(path, e))?;
        conn.query_row("PRAGMA wal_checkpoint(FULL)", [], |r| r.get::<_, i64>(0))
            .map_err(|e| classify(path, e))?;
        conn.query_row("PRAGMA journal_mode=DELETE", [], |r| r.get::<_, String>(0))
            .map_err(|e| classify(path, e))?;
        let key = sql_literal(passphrase);
        let target = sql_literal(&tmp.to_string_lossy());
        conn.execute_batch(&format!(
            "ATTACH DATABASE {} AS encrypted KEY {}",
            target.as_str(),
            key.as_str()
        ))
        .map_err(sql("attach the encrypted copy"))?;
        conn.execute_batch("PRAGMA encrypted.cipher_compatibility = 4")
            .map_err(sql("configure the encrypted copy"))?;
        conn.query_row("SELECT sqlcipher_export('encrypted')", [], |r| {
            r.get::<_, rusqlite::types::Value>(0)
        })
        .map_err(sql("export into the encrypted copy"))?;
        let version: i64 = conn
            .query_row("PRAGMA main.user_version", [], |r| r.get(0))
            .map_err(sql("read user_version"))?;
        conn.execute_batch(&format!("PRAGMA encrypted.user_version = {version}"))
            .map_err(sql("copy user_version"))?;
        conn.execute_batch("DETACH DATABASE encrypted")
            .map_err(sql("detach the encrypted copy"))?;
        conn.close().map_err(|(_, e)| classify(path, e))?;
        fs::rename(&tmp, path)
            .map_err(|e| VaultError::io(format!("replace {}", path.display()), e))?;
        Ok(())
    })();
    match result {
        Ok(()) => {
            remove_sidecars(path);
            remove_sidecars(&tmp);
            Ok(())
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            remove_sidecars(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault/credentials.db");
        (dir, path)
    }

    #[test]
    fn credentials_round_trip_and_are_isolated_by_set() {
        let (_d, path) = fresh();
        let db = Db::open(&path, "pw", OpenMode::Create).unwrap();
        let mut data = Map::new();
        data.insert("type".into(), "api_key".into());
        data.insert("key".into(), "k1".into());
        db.store_credential("a", "openai", &data).unwrap();
        data.insert("key".into(), "k2".into());
        db.store_credential("a", "openai", &data).unwrap();
        db.store_credential("b", "anthropic", &data).unwrap();
        assert_eq!(
            db.load_credential("a", "openai").unwrap().unwrap()["key"],
            "k2"
        );
        assert_eq!(db.load_credential("a", "anthropic").unwrap(), None);
        assert_eq!(db.list_credentials("a").unwrap(), ["openai"]);
        assert_eq!(db.list_credential_sets().unwrap(), ["a", "b"]);
        assert!(db.delete_credential("a", "openai").unwrap());
        assert!(!db.delete_credential("a", "openai").unwrap());
        assert_eq!(db.user_version().unwrap(), USER_VERSION);
        let mode: String = db
            .connection()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(path.parent().unwrap())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
    }

    #[test]
    fn tokens_mint_lookup_revoke() {
        let (_d, path) = fresh();
        let db = Db::open(&path, "pw", OpenMode::Create).unwrap();
        let t1 = db.create_token("s", "c1", "s", "anthropic").unwrap();
        let t2 = db.create_token("s", "c1", "s", "ssh").unwrap();
        let t3 = db.create_token("s", "c2", "s", "ssh").unwrap();
        assert_ne!(t1, t2);
        assert!(t1.starts_with("terok-p-") && t1.len() == 40);
        assert!(t1[8..].chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')));
        let info = db.lookup_token(&t1).unwrap().unwrap();
        assert_eq!((info.scope.as_str(), info.subject.as_str()), ("s", "c1"));
        assert_eq!(db.lookup_token("terok-p-nothere").unwrap(), None);
        assert_eq!(db.list_tokens().unwrap().len(), 3);
        assert_eq!(db.list_tokens().unwrap()[0].subject, "c1");
        assert_eq!(db.revoke_tokens("s", "c1").unwrap(), 2);
        assert_eq!(db.revoke_tokens("s", "c1").unwrap(), 0);
        assert_eq!(db.lookup_token(&t2).unwrap(), None);
        assert!(db.lookup_token(&t3).unwrap().is_some());
        assert_eq!(mask_token(&t3).chars().count(), 8 + 8 + 1);
    }

    #[test]
    fn transaction_rolls_back() {
        let (_d, path) = fresh();
        let db = Db::open(&path, "pw", OpenMode::Create).unwrap();
        let r: Result<(), VaultError> = db.transaction(|db| {
            db.create_token("s", "c", "s", "ssh")?;
            Err(VaultError::EmptyPassphrase)
        });
        assert!(r.is_err());
        assert!(db.list_tokens().unwrap().is_empty());
    }

    #[test]
    fn open_errors_are_told_apart_and_change_nothing() {
        let (_d, path) = fresh();
        assert!(matches!(
            Db::open(&path, "pw", OpenMode::Existing),
            Err(VaultError::MissingDb { .. })
        ));
        assert!(!path.exists());
        assert!(matches!(
            Db::open(&path, "", OpenMode::Create),
            Err(VaultError::EmptyPassphrase)
        ));
        Db::open(&path, "pw", OpenMode::Create)
            .unwrap()
            .close()
            .unwrap();
        let before = fs::read(&path).unwrap();
        assert!(matches!(
            Db::open(&path, "nope", OpenMode::Existing),
            Err(VaultError::WrongPassphrase { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), before);
        let junk = path.with_file_name("junk.db");
        fs::write(&junk, vec![7u8; 5000]).unwrap();
        assert!(matches!(
            Db::open(&junk, "pw", OpenMode::Existing),
            Err(VaultError::Corrupt { .. })
        ));
    }

    #[test]
    fn rekey_and_encrypt_in_place() {
        let (_d, path) = fresh();
        let db = Db::open(&path, "old", OpenMode::Create).unwrap();
        db.create_token("s", "c", "s", "ssh").unwrap();
        db.close().unwrap();
        rekey_in_place(&path, "old", "new").unwrap();
        assert!(existing_sidecars(&path).is_empty());
        assert!(matches!(
            Db::open(&path, "old", OpenMode::Existing),
            Err(VaultError::WrongPassphrase { .. })
        ));
        assert_eq!(
            Db::open(&path, "new", OpenMode::Existing)
                .unwrap()
                .list_tokens()
                .unwrap()
                .len(),
            1
        );
        assert!(matches!(
            rekey_in_place(&path, "old", "x"),
            Err(VaultError::WrongPassphrase { .. })
        ));

        let plain = path.with_file_name("plain.db");
        let c = Connection::open(&plain).unwrap();
        c.execute_batch("CREATE TABLE credentials (credential_set TEXT NOT NULL, provider TEXT NOT NULL, data TEXT NOT NULL, PRIMARY KEY (credential_set, provider)); INSERT INTO credentials VALUES ('d','claude','{\"key\":\"x\"}'); PRAGMA user_version = 2;").unwrap();
        drop(c);
        assert!(is_plaintext(&plain).unwrap());
        assert!(matches!(
            Db::open(&plain, "pw", OpenMode::Existing),
            Err(VaultError::Plaintext { .. })
        ));
        encrypt_in_place(&plain, "pw").unwrap();
        assert!(!is_plaintext(&plain).unwrap());
        let db = Db::open(&plain, "pw", OpenMode::Existing).unwrap();
        // The v2 → v3 rename ran on the first keyed open.
        assert_eq!(db.list_credentials("d").unwrap(), ["anthropic"]);
        assert_eq!(db.user_version().unwrap(), USER_VERSION);
    }

    #[test]
    fn migrations_from_v1_rename_the_token_column() {
        let (_d, path) = fresh();
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let c = Connection::open(&path).unwrap();
        key_connection(&c, "pw").unwrap();
        c.execute_batch(
            "CREATE TABLE proxy_tokens (token TEXT PRIMARY KEY, scope TEXT NOT NULL, task TEXT NOT NULL, credential_set TEXT NOT NULL, provider TEXT NOT NULL);
             INSERT INTO proxy_tokens VALUES ('terok-p-00000000000000000000000000000000','s','c','s','gh');
             CREATE TABLE ssh_key_assignments (scope TEXT NOT NULL, key_id INTEGER NOT NULL, assigned_at TEXT NOT NULL DEFAULT (datetime('now')), PRIMARY KEY (scope, key_id));
             PRAGMA user_version = 1;",
        )
        .unwrap();
        drop(c);
        let db = Db::open(&path, "pw", OpenMode::Existing).unwrap();
        let rows = db.list_tokens().unwrap();
        assert_eq!(rows[0].subject, "c");
        assert_eq!(rows[0].provider, "github");
        assert_eq!(db.user_version().unwrap(), 4);
        drop(db);
        // Re-opening a current DB is a no-op.
        let db = Db::open(&path, "pw", OpenMode::Existing).unwrap();
        assert_eq!(db.user_version().unwrap(), 4);
    }

    #[test]
    fn generated_passphrases_are_long_and_distinct() {
        let a = generate_passphrase();
        let b = generate_passphrase();
        assert_eq!(a.len(), 43);
        assert_ne!(*a, *b);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }
}
