//! The seam between the broker and where tokens and credentials live: the real vault
//! ([`VaultStore`]) or an in-memory table ([`MemoryStore`], for tests and for tokens a
//! supervisor already holds).

use std::sync::Mutex;

use serde_json::{Map, Value};
use subtle::ConstantTimeEq;
use thiserror::Error;

pub use crate::vault::store::TokenInfo;
use crate::vault::{Db, VaultError};

/// A store could not answer (the vault is damaged, busy, …). Never carries a secret.
#[derive(Debug, Error)]
#[error("credential store: {0}")]
pub struct StoreError(pub String);

impl From<VaultError> for StoreError {
    fn from(e: VaultError) -> Self {
        StoreError(e.to_string())
    }
}

/// Where the broker looks up phantom tokens and the credentials they stand for. Calls are
/// short and synchronous; the broker runs them off its event loop.
pub trait TokenStore: Send + Sync + 'static {
    /// What `token` authorises, or `None` for an unknown (or revoked) token. Implementations
    /// compare tokens in constant time.
    fn lookup(&self, token: &str) -> Result<Option<TokenInfo>, StoreError>;
    /// The JSON payload of the credential `(set, provider)`, or `None`.
    fn credential(&self, set: &str, provider: &str) -> Result<Option<Value>, StoreError>;
}

/// The real vault. The connection is not shareable across threads, so it sits behind a
/// mutex; each call is one indexed query (~0.05 ms once the DB is open).
pub struct VaultStore {
    db: Mutex<Db>,
}

impl VaultStore {
    pub fn new(db: Db) -> VaultStore {
        VaultStore { db: Mutex::new(db) }
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Db> {
        // A panic while holding the lock cannot leave the connection half-written (every
        // call is one statement), so a poisoned lock is still usable.
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl From<Db> for VaultStore {
    fn from(db: Db) -> Self {
        VaultStore::new(db)
    }
}

impl std::fmt::Debug for VaultStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultStore").finish_non_exhaustive()
    }
}

impl TokenStore for VaultStore {
    fn lookup(&self, token: &str) -> Result<Option<TokenInfo>, StoreError> {
        Ok(self.db().lookup_token(token)?)
    }

    fn credential(&self, set: &str, provider: &str) -> Result<Option<Value>, StoreError> {
        Ok(self.db().load_credential(set, provider)?.map(Value::Object))
    }
}

/// An in-memory store: tokens compared in constant time (every entry is compared, no early
/// exit), credentials by (set, provider).
#[derive(Default)]
pub struct MemoryStore {
    tokens: Mutex<Vec<(String, TokenInfo)>>,
    credentials: Mutex<Vec<((String, String), Value)>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    pub fn add_token(&self, token: &str, info: TokenInfo) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens.retain(|(t, _)| t != token);
        tokens.push((token.to_owned(), info));
    }

    /// Remove every token of `subject`; returns how many went.
    pub fn revoke_subject(&self, subject: &str) -> usize {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let before = tokens.len();
        tokens.retain(|(_, info)| info.subject != subject);
        before - tokens.len()
    }

    pub fn set_credential(&self, set: &str, provider: &str, data: Map<String, Value>) {
        let mut creds = self.credentials.lock().unwrap_or_else(|p| p.into_inner());
        let key = (set.to_owned(), provider.to_owned());
        creds.retain(|(k, _)| k != &key);
        creds.push((key, Value::Object(data)));
    }
}

impl TokenStore for MemoryStore {
    fn lookup(&self, token: &str) -> Result<Option<TokenInfo>, StoreError> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let mut found = None;
        for (stored, info) in tokens.iter() {
            if bool::from(stored.as_bytes().ct_eq(token.as_bytes())) {
                found = Some(info.clone());
            }
        }
        Ok(found)
    }

    fn credential(&self, set: &str, provider: &str) -> Result<Option<Value>, StoreError> {
        let creds = self.credentials.lock().unwrap_or_else(|p| p.into_inner());
        Ok(creds
            .iter()
            .find(|((s, p), _)| s == set && p == provider)
            .map(|(_, v)| v.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(subject: &str) -> TokenInfo {
        TokenInfo {
            scope: "s".into(),
            subject: subject.into(),
            credential_set: "default".into(),
            provider: "p".into(),
        }
    }

    #[test]
    fn memory_store_lookup_and_revoke() {
        let store = MemoryStore::new();
        store.add_token("terok-p-aa", info("c1"));
        store.add_token("terok-p-bb", info("c2"));
        assert_eq!(store.lookup("terok-p-aa").unwrap().unwrap().subject, "c1");
        assert!(store.lookup("terok-p-a").unwrap().is_none());
        assert!(store.lookup("").unwrap().is_none());
        assert_eq!(store.revoke_subject("c1"), 1);
        assert!(store.lookup("terok-p-aa").unwrap().is_none());
        let mut data = Map::new();
        data.insert("key".into(), "k".into());
        store.set_credential("default", "p", data);
        assert!(store.credential("default", "p").unwrap().is_some());
        assert!(store.credential("other", "p").unwrap().is_none());
    }

    #[test]
    fn vault_store_reads_the_real_db() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(
            &dir.path().join("credentials.db"),
            "pw",
            crate::vault::OpenMode::Create,
        )
        .unwrap();
        let mut data = Map::new();
        data.insert("token".into(), "real".into());
        db.store_credential("default", "p", &data).unwrap();
        let token = db.create_token("s", "c", "default", "p").unwrap();
        let store = VaultStore::new(db);
        assert_eq!(store.lookup(&token).unwrap().unwrap().subject, "c");
        assert!(store.lookup("terok-p-nope").unwrap().is_none());
        assert_eq!(
            store.credential("default", "p").unwrap().unwrap()["token"],
            "real"
        );
    }
}
