//! Layered configuration: `/etc/terok/config.yml`, then the user's `config.yml`, merged at
//! leaf level (the user wins). Sections terok owns reject unknown keys so a typo is reported
//! instead of silently ignored; unknown top-level sections belong to other tools and are kept.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};
use thiserror::Error;

use crate::paths::Paths;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid YAML: {source}; fix or remove it")]
    Parse {
        path: PathBuf,
        source: serde_yaml_ng::Error,
    },
    #[error("invalid configuration ({files}): {source}; fix the file")]
    Schema {
        files: String,
        source: serde_yaml_ng::Error,
    },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Config {
    pub shield: ShieldConfig,
    pub credentials: CredentialsConfig,
}

/// `credentials:` — where the vault's passphrase comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CredentialsConfig {
    /// Shared credentials directory (schema only; consumed by orchestrators).
    pub dir: Option<PathBuf>,
    /// Removed plaintext tier: any value other than null is rejected with a migration hint.
    #[serde(deserialize_with = "removed_passphrase")]
    pub passphrase: Option<()>,
    /// Consult the OS keyring (Secret Service) tier.
    pub use_keyring: bool,
    /// A helper that prints the passphrase on stdout (run without a shell, 30 s limit).
    pub passphrase_command: Option<String>,
}

impl Default for CredentialsConfig {
    fn default() -> Self {
        CredentialsConfig {
            dir: None,
            passphrase: None,
            use_keyring: true,
            passphrase_command: None,
        }
    }
}

fn removed_passphrase<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<()>, D::Error> {
    let value = Option::<Value>::deserialize(d)?;
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(_) => Err(serde::de::Error::custom(
            "credentials.passphrase (a plaintext passphrase in config) was removed: move the value into its own file (mode 600) and set `passphrase_command: cat /path/to/that/file` instead",
        )),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShieldConfig {
    /// Profiles used when `prepare` gets no `--profiles`.
    pub profiles: Vec<String>,
    /// Absolute path of the nft binary the hook and the admin verbs run.
    pub nft: PathBuf,
}

impl Default for ShieldConfig {
    fn default() -> Self {
        ShieldConfig {
            profiles: vec!["dev-standard".to_owned()],
            nft: PathBuf::from(crate::shield::DEFAULT_NFT),
        }
    }
}

fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

fn read_layer(path: &Path) -> Result<Option<Value>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let value: Value = serde_yaml_ng::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })?;
    Ok(match value {
        Value::Null => None,
        v => Some(v),
    })
}

impl Config {
    pub fn load(paths: &Paths) -> Result<Self, ConfigError> {
        Self::load_files(&paths.config_files())
    }

    pub fn load_files(files: &[PathBuf]) -> Result<Self, ConfigError> {
        let mut merged = Value::Mapping(Mapping::new());
        for file in files {
            if let Some(layer) = read_layer(file)? {
                merge(&mut merged, layer);
            }
        }
        serde_yaml_ng::from_value(merged).map_err(|source| ConfigError::Schema {
            files: files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_merge_at_leaf_level_and_typos_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys.yml");
        let user = dir.path().join("user.yml");
        std::fs::write(
            &sys,
            "shield:\n  profiles: [base]\n  nft: /opt/nft\nother_tool: {x: 1}\n",
        )
        .unwrap();
        std::fs::write(&user, "shield:\n  profiles: [dev-node]\n").unwrap();
        let cfg = Config::load_files(&[sys.clone(), user.clone()]).unwrap();
        assert_eq!(cfg.shield.profiles, ["dev-node"]);
        assert_eq!(cfg.shield.nft, Path::new("/opt/nft"));

        std::fs::write(&user, "shield:\n  profile: [dev-node]\n").unwrap();
        let err = Config::load_files(&[sys, user]).unwrap_err().to_string();
        assert!(err.contains("profile"), "{err}");

        let missing = Config::load_files(&[dir.path().join("none.yml")]).unwrap();
        assert_eq!(missing.shield.profiles, ["dev-standard"]);
        assert!(missing.credentials.use_keyring);
    }

    #[test]
    fn credentials_section_rejects_the_plaintext_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yml");
        std::fs::write(
            &file,
            "credentials:\n  use_keyring: false\n  passphrase_command: pass show terok\n  passphrase: null\n",
        )
        .unwrap();
        let cfg = Config::load_files(std::slice::from_ref(&file)).unwrap();
        assert!(!cfg.credentials.use_keyring);
        assert_eq!(
            cfg.credentials.passphrase_command.as_deref(),
            Some("pass show terok")
        );
        std::fs::write(&file, "credentials:\n  passphrase: hunter2\n").unwrap();
        let err = Config::load_files(std::slice::from_ref(&file))
            .unwrap_err()
            .to_string();
        assert!(err.contains("passphrase_command: cat"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        std::fs::write(&file, "credentials:\n  passphrase_cmd: x\n").unwrap();
        assert!(Config::load_files(&[file]).is_err());
    }
}
