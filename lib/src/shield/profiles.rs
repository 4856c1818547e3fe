//! Allowlist profiles: the five bundled ones and the user's `shield/profiles/*.txt`.
//! One entry a line (a domain, an IP address or a CIDR), `#` starts a comment line. A user
//! file with a bundled profile's name replaces it entirely.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use super::ShieldError;
use crate::names;

const BUNDLED: &[(&str, &str)] = &[
    ("base", include_str!("../../profiles/base.txt")),
    (
        "dev-standard",
        include_str!("../../profiles/dev-standard.txt"),
    ),
    ("dev-python", include_str!("../../profiles/dev-python.txt")),
    ("dev-node", include_str!("../../profiles/dev-node.txt")),
    ("nvidia-hpc", include_str!("../../profiles/nvidia-hpc.txt")),
];

/// One allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Entry {
    /// An address or network, canonical (host bits cleared).
    Net(IpNet),
    /// A lower-case domain name, resolved when the container is prepared.
    Domain(String),
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::Net(n) => write!(f, "{n}"),
            Entry::Domain(d) => f.write_str(d),
        }
    }
}

/// Parse an IP address or CIDR into a canonical network (`192.168.1.5/24` → `192.168.1.0/24`).
pub fn parse_net(s: &str) -> Option<IpNet> {
    let s = s.trim();
    if s.contains('/') {
        s.parse::<IpNet>().ok().map(|n| n.trunc())
    } else {
        s.parse::<IpAddr>().ok().map(IpNet::from)
    }
}

/// A DNS name: labels of `[a-z0-9-]` not starting or ending with `-`, at least two labels,
/// and a top-level label that is not all digits (so a mistyped address is not a "domain").
pub fn is_domain(s: &str) -> bool {
    let labels: Vec<&str> = s.split('.').collect();
    labels.len() >= 2
        && s.len() <= 253
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
        && !labels
            .last()
            .is_some_and(|tld| tld.chars().all(|c| c.is_ascii_digit()))
}

/// Parse one destination as given on a command line or a profile line.
pub fn parse_entry(raw: &str) -> Option<Entry> {
    let s = raw.trim();
    if let Some(net) = parse_net(s) {
        return Some(Entry::Net(net));
    }
    let lower = s.to_ascii_lowercase();
    is_domain(&lower).then_some(Entry::Domain(lower))
}

/// Where a profile comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Bundled,
    User(PathBuf),
}

fn read_profile(name: &str, user_dir: &Path) -> Result<(String, Origin), ShieldError> {
    names::profile(name)?;
    let user_file = user_dir.join(format!("{name}.txt"));
    match std::fs::read_to_string(&user_file) {
        Ok(text) => return Ok((text, Origin::User(user_file))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ShieldError::Io {
                what: format!("read profile {}", user_file.display()),
                source,
            });
        }
    }
    BUNDLED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| ((*text).to_owned(), Origin::Bundled))
        .ok_or_else(|| ShieldError::ProfileNotFound {
            name: name.to_owned(),
            user_dir: user_dir.to_owned(),
        })
}

fn parse_profile(name: &str, text: &str, origin: &Origin) -> Result<Vec<Entry>, ShieldError> {
    let mut entries = Vec::new();
    for (idx, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let entry = parse_entry(line).ok_or_else(|| ShieldError::BadProfileEntry {
            profile: name.to_owned(),
            location: match origin {
                Origin::Bundled => format!("bundled profile, line {}", idx + 1),
                Origin::User(p) => format!("{}:{}", p.display(), idx + 1),
            },
            entry: line.to_owned(),
        })?;
        entries.push(entry);
    }
    Ok(entries)
}

/// Load and concatenate the named profiles in order, dropping duplicates (first wins).
/// Nothing implicit is added: the list given is the whole allowlist.
pub fn load(profile_names: &[String], user_dir: &Path) -> Result<Vec<Entry>, ShieldError> {
    let mut out: Vec<Entry> = Vec::new();
    for name in profile_names {
        let (text, origin) = read_profile(name, user_dir)?;
        for entry in parse_profile(name, &text, &origin)? {
            if !out.contains(&entry) {
                out.push(entry);
            }
        }
    }
    Ok(out)
}

/// Every profile name available, with where it comes from (a user file shadows a bundled one).
pub fn list(user_dir: &Path) -> BTreeMap<String, Origin> {
    let mut all: BTreeMap<String, Origin> = BUNDLED
        .iter()
        .map(|(n, _)| ((*n).to_owned(), Origin::Bundled))
        .collect();
    if let Ok(dir) = std::fs::read_dir(user_dir) {
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "txt")
                && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
                && names::profile(stem).is_ok()
            {
                all.insert(stem.to_owned(), Origin::User(path));
            }
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_canonically() {
        assert_eq!(
            parse_entry("192.168.1.5/24"),
            Some(Entry::Net("192.168.1.0/24".parse().unwrap()))
        );
        assert_eq!(
            parse_entry(" 2001:DB8:0:0::1 "),
            Some(Entry::Net("2001:db8::1/128".parse().unwrap()))
        );
        assert_eq!(
            parse_entry("GitHub.com"),
            Some(Entry::Domain("github.com".into()))
        );
        for bad in [
            "1.2.3.999",
            "1.2.3.4; drop",
            "",
            "localhost",
            "-x.com",
            "a..b",
            "*.x.com",
        ] {
            assert_eq!(parse_entry(bad), None, "{bad}");
        }
    }

    #[test]
    fn bundled_profiles_parse_and_user_files_override() {
        let dir = tempfile::tempdir().unwrap();
        for (name, _) in BUNDLED {
            assert!(!load(&[(*name).to_owned()], dir.path()).unwrap().is_empty());
        }
        std::fs::write(
            dir.path().join("base.txt"),
            "# mine\n10.1.2.3\n\n10.1.2.3\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("extra.txt"), "fd00::/8\nexample.org\n").unwrap();
        let entries = load(&["base".into(), "extra".into()], dir.path()).unwrap();
        assert_eq!(entries.len(), 3);
        assert!(matches!(
            list(dir.path()).get("base"),
            Some(Origin::User(_))
        ));
        assert!(list(dir.path()).contains_key("extra"));
    }

    #[test]
    fn bad_profiles_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.txt"), "10.0.0.1\n300.1.1.1\n").unwrap();
        let err = load(&["p".into()], dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("p.txt:2") && err.contains("300.1.1.1"),
            "{err}"
        );
        let err = load(&["nope".into()], dir.path()).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
        assert!(load(&["../x".into()], dir.path()).is_err());
    }
}
