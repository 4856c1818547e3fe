//! The SSH tables of the vault (`ssh_keys`, `ssh_key_assignments`): store with dedup by
//! fingerprint, assign, unassign with orphan deletion, and the reads of the verbs and the
//! agent.

use rusqlite::{OptionalExtension, params};
use zeroize::Zeroizing;

use super::SshError;
use super::keys::{KeyType, Material};
use crate::vault::{Db, VaultError};

fn sql(what: &'static str) -> impl FnOnce(rusqlite::Error) -> SshError {
    move |source| {
        SshError::Vault(VaultError::Sql {
            what: what.to_owned(),
            source,
        })
    }
}

/// One (scope, key) edge.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyRow {
    pub scope: String,
    pub id: i64,
    pub key_type: String,
    pub comment: String,
    pub fingerprint: String,
    #[serde(skip)]
    pub public_blob: Vec<u8>,
    pub is_default: bool,
    pub assigned_at: String,
}

impl KeyRow {
    /// The listing's KEY column: the comment, or `id=<n>`.
    pub fn label(&self) -> String {
        if self.comment.is_empty() {
            format!("id={}", self.id)
        } else {
            self.comment.clone()
        }
    }
}

/// A private key as the agent holds it for one connection.
pub struct StoredKey {
    pub key_type: String,
    pub private_der: Zeroizing<Vec<u8>>,
    pub public_blob: Vec<u8>,
    pub comment: String,
}

const ROW_SELECT: &str = "SELECT a.scope, k.id, k.key_type, k.comment, k.fingerprint, k.public_blob, a.is_default, a.assigned_at
     FROM ssh_key_assignments a JOIN ssh_keys k ON k.id = a.key_id";
/// Assignment order: the default first, then oldest assignment first.
const ORDER: &str = "ORDER BY a.is_default DESC, a.assigned_at, a.rowid";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRow> {
    Ok(KeyRow {
        scope: r.get(0)?,
        id: r.get(1)?,
        key_type: r.get(2)?,
        comment: r.get(3)?,
        fingerprint: r.get(4)?,
        public_blob: r.get(5)?,
        is_default: r.get::<_, i64>(6)? != 0,
        assigned_at: r.get(7)?,
    })
}

/// Every edge, default-first assignment order within each scope.
pub fn all_rows(db: &Db) -> Result<Vec<KeyRow>, SshError> {
    let mut stmt = db
        .connection()
        .prepare(&format!("{ROW_SELECT} {ORDER}"))
        .map_err(sql("list ssh keys"))?;
    stmt.query_map([], row)
        .map_err(sql("list ssh keys"))?
        .collect::<Result<_, _>>()
        .map_err(sql("list ssh keys"))
}

/// A scope's edges in assignment order (default first).
pub fn scope_rows(db: &Db, scope: &str) -> Result<Vec<KeyRow>, SshError> {
    let mut stmt = db
        .connection()
        .prepare(&format!("{ROW_SELECT} WHERE a.scope = ?1 {ORDER}"))
        .map_err(sql("list ssh keys"))?;
    stmt.query_map([scope], row)
        .map_err(sql("list ssh keys"))?
        .collect::<Result<_, _>>()
        .map_err(sql("list ssh keys"))
}

/// The scope's most recently assigned key.
pub fn newest(db: &Db, scope: &str) -> Result<Option<KeyRow>, SshError> {
    let mut stmt = db
        .connection()
        .prepare(&format!(
            "{ROW_SELECT} WHERE a.scope = ?1 ORDER BY a.assigned_at DESC, a.rowid DESC LIMIT 1"
        ))
        .map_err(sql("read ssh keys"))?;
    stmt.query_row([scope], row)
        .optional()
        .map_err(sql("read ssh keys"))
}

pub fn key_exists(db: &Db, id: i64) -> Result<bool, SshError> {
    db.connection()
        .query_row("SELECT 1 FROM ssh_keys WHERE id = ?1", [id], |_| Ok(()))
        .optional()
        .map(|o| o.is_some())
        .map_err(sql("read ssh keys"))
}

pub fn is_assigned(db: &Db, scope: &str, id: i64) -> Result<bool, SshError> {
    db.connection()
        .query_row(
            "SELECT 1 FROM ssh_key_assignments WHERE scope = ?1 AND key_id = ?2",
            params![scope, id],
            |_| Ok(()),
        )
        .optional()
        .map(|o| o.is_some())
        .map_err(sql("read ssh key assignments"))
}

/// Store a key unless its fingerprint is already there: `(id, already_present)`. A key
/// already present keeps its stored comment.
pub fn store(db: &Db, m: &Material, comment: &str) -> Result<(i64, bool), SshError> {
    let conn = db.connection();
    if let Some(id) = conn
        .query_row(
            "SELECT id FROM ssh_keys WHERE fingerprint = ?1",
            [&m.fingerprint],
            |r| r.get::<_, i64>(0),
        )
        .optional()
        .map_err(sql("read ssh keys"))?
    {
        return Ok((id, true));
    }
    conn.execute(
        "INSERT INTO ssh_keys (key_type, private_der, public_blob, comment, fingerprint) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            m.key_type.as_str(),
            &m.private_der[..],
            m.public_blob,
            comment,
            m.fingerprint
        ],
    )
    .map_err(sql("store an ssh key"))?;
    Ok((conn.last_insert_rowid(), false))
}

/// Add the (scope, key) edge; `false` when it existed. `default` makes it the scope's
/// default key.
pub fn assign(db: &Db, scope: &str, id: i64, default: bool) -> Result<bool, SshError> {
    let conn = db.connection();
    if default {
        conn.execute(
            "UPDATE ssh_key_assignments SET is_default = 0 WHERE scope = ?1",
            [scope],
        )
        .map_err(sql("assign an ssh key"))?;
    }
    let n = conn
        .execute(
            "INSERT OR IGNORE INTO ssh_key_assignments (scope, key_id, is_default) VALUES (?1, ?2, ?3)",
            params![scope, id, default as i64],
        )
        .map_err(sql("assign an ssh key"))?;
    if default && n == 0 {
        conn.execute(
            "UPDATE ssh_key_assignments SET is_default = 1 WHERE scope = ?1 AND key_id = ?2",
            params![scope, id],
        )
        .map_err(sql("assign an ssh key"))?;
    }
    Ok(n == 1)
}

/// Remove the (scope, key) edge; a key left without any edge is deleted.
pub fn unassign(db: &Db, scope: &str, id: i64) -> Result<(), SshError> {
    let conn = db.connection();
    conn.execute(
        "DELETE FROM ssh_key_assignments WHERE scope = ?1 AND key_id = ?2",
        params![scope, id],
    )
    .map_err(sql("unassign an ssh key"))?;
    delete_orphans(db)
}

pub fn delete_orphans(db: &Db) -> Result<(), SshError> {
    db.connection()
        .execute(
            "DELETE FROM ssh_keys WHERE id NOT IN (SELECT key_id FROM ssh_key_assignments)",
            [],
        )
        .map_err(sql("delete orphaned ssh keys"))?;
    Ok(())
}

/// Make `id` the scope's only key (and its default); orphans are deleted.
pub fn replace_scope(db: &Db, scope: &str, id: i64) -> Result<(), SshError> {
    db.connection()
        .execute(
            "DELETE FROM ssh_key_assignments WHERE scope = ?1 AND key_id != ?2",
            params![scope, id],
        )
        .map_err(sql("replace the scope's ssh keys"))?;
    assign(db, scope, id, true)?;
    delete_orphans(db)
}

pub fn rename(db: &Db, id: i64, comment: &str) -> Result<(), SshError> {
    db.connection()
        .execute(
            "UPDATE ssh_keys SET comment = ?1 WHERE id = ?2",
            params![comment, id],
        )
        .map_err(sql("rename an ssh key"))?;
    Ok(())
}

/// (id, fingerprint) of every key, for prefix matching.
pub fn fingerprints(db: &Db) -> Result<Vec<(i64, String)>, SshError> {
    let mut stmt = db
        .connection()
        .prepare("SELECT id, fingerprint FROM ssh_keys ORDER BY id")
        .map_err(sql("read ssh keys"))?;
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(sql("read ssh keys"))?
        .collect::<Result<_, _>>()
        .map_err(sql("read ssh keys"))
}

/// A key's private form.
pub fn private(db: &Db, id: i64) -> Result<Option<StoredKey>, SshError> {
    db.connection()
        .query_row(
            "SELECT key_type, private_der, public_blob, comment FROM ssh_keys WHERE id = ?1",
            [id],
            |r| {
                Ok(StoredKey {
                    key_type: r.get(0)?,
                    private_der: Zeroizing::new(r.get(1)?),
                    public_blob: r.get(2)?,
                    comment: r.get(3)?,
                })
            },
        )
        .optional()
        .map_err(sql("read an ssh key"))
}

/// The scope's private keys in the agent's order: the default first, then `tk-main:`
/// comments, then assignment order.
pub fn agent_keys(db: &Db, scope: &str) -> Result<Vec<StoredKey>, SshError> {
    let mut stmt = db
        .connection()
        .prepare(
            "SELECT k.key_type, k.private_der, k.public_blob, k.comment
             FROM ssh_key_assignments a JOIN ssh_keys k ON k.id = a.key_id
             WHERE a.scope = ?1
             ORDER BY a.is_default DESC, (k.comment LIKE 'tk-main:%') DESC, a.assigned_at, a.rowid",
        )
        .map_err(sql("read ssh keys"))?;
    stmt.query_map([scope], |r| {
        Ok(StoredKey {
            key_type: r.get(0)?,
            private_der: Zeroizing::new(r.get(1)?),
            public_blob: r.get(2)?,
            comment: r.get(3)?,
        })
    })
    .map_err(sql("read ssh keys"))?
    .collect::<Result<_, _>>()
    .map_err(sql("read ssh keys"))
}

/// Parse a stored type, for rows read back.
pub fn key_type(s: &str) -> Result<KeyType, SshError> {
    KeyType::parse(s)
}
