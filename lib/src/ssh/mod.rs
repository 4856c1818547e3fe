//! SSH keys in the vault and the SSH agent that signs with them.
//!
//! - [`keys`]: key material (generate, PKCS#8 storage form, import, export, public lines);
//! - [`db`]: the vault's `ssh_keys` / `ssh_key_assignments` tables;
//! - [`cli`]: `terok-admin ssh …`;
//! - [`agent`]: the agent protocol server, used by the supervisor's per-container agent
//!   child and by `terok-admin ssh agent` on the host.

pub mod agent;
pub mod cli;
pub mod db;
pub mod keys;

use thiserror::Error;

pub use cli::SshCommand;

#[derive(Debug, Error)]
pub enum SshError {
    #[error(transparent)]
    Vault(#[from] crate::vault::VaultError),
    #[error(transparent)]
    Name(#[from] crate::names::NameError),
    /// A key that cannot be parsed, converted or used.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Comment(String),
    /// A passphrase-protected key that could not be decrypted.
    #[error("{0}")]
    Protected(String),
    /// A refusal with its own one-line message.
    #[error("{0}")]
    Refused(String),
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}
