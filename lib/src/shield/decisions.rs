//! Live allow/deny decisions of one container, persisted in its run state so they survive
//! `podman stop` + `podman start` (the hook re-applies them on every start).

use std::path::Path;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::ShieldError;
use crate::fsutil;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decisions {
    #[serde(default)]
    pub allow: Vec<IpNet>,
    #[serde(default)]
    pub deny: Vec<IpNet>,
}

impl Decisions {
    /// Load; a missing file means no decisions yet. A corrupt one is an error (fail closed).
    pub fn load(path: &Path) -> Result<Self, ShieldError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ShieldError::Corrupt {
                path: path.to_owned(),
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ShieldError::Io {
                what: format!("read {}", path.display()),
                source,
            }),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), ShieldError> {
        let mut text = serde_json::to_vec_pretty(self).expect("decisions serialise");
        text.push(b'\n');
        fsutil::write_atomic(path, &text, 0o600).map_err(|source| ShieldError::Io {
            what: format!("write {}", path.display()),
            source,
        })
    }

    /// Allow `nets`: they leave the deny list and join the allow list.
    pub fn allow(&mut self, nets: &[IpNet]) {
        self.deny.retain(|d| !nets.contains(d));
        for n in nets {
            if !self.allow.contains(n) {
                self.allow.push(*n);
            }
        }
    }

    /// Deny `nets`: they leave the allow list and join the deny list.
    pub fn deny(&mut self, nets: &[IpNet]) {
        self.allow.retain(|a| !nets.contains(a));
        for n in nets {
            if !self.deny.contains(n) {
                self.deny.push(*n);
            }
        }
    }

    /// Deny entries that still cover `net` after an allow (a wider denied network wins).
    pub fn denied_by(&self, net: &IpNet) -> Vec<IpNet> {
        self.deny
            .iter()
            .filter(|d| d.contains(net))
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_and_deny_move_entries_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.json");
        let mut d = Decisions::load(&path).unwrap();
        let a: IpNet = "10.9.0.1/32".parse().unwrap();
        d.allow(&[a]);
        d.deny(&[a]);
        assert!(d.allow.is_empty() && d.deny == vec![a]);
        d.allow(&[a]);
        assert!(d.deny.is_empty() && d.allow == vec![a]);
        d.save(&path).unwrap();
        assert_eq!(Decisions::load(&path).unwrap(), d);
        std::fs::write(&path, "{not json").unwrap();
        assert!(Decisions::load(&path).is_err());
    }
}
