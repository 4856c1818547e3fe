//! Validation of the names users hand us. Each becomes a path component or an argv element
//! somewhere, so every check happens before any state is written.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error(
        "unsafe container name {0:?}: use letters, digits, '_', '.' or '-', starting with a letter or digit (max 128 chars)"
    )]
    Container(String),
    #[error(
        "invalid scope {0:?}: use letters, digits, '_', '.' or '-', starting with a letter or digit (max 64 chars)"
    )]
    Scope(String),
    #[error(
        "invalid profile name {0:?}: use letters, digits, '_', '.' or '-', starting with a letter or digit"
    )]
    Profile(String),
    #[error("invalid project name {0:?}: give a bare name without path separators, '.' or '..'")]
    Project(String),
}

/// `[A-Za-z0-9][A-Za-z0-9_.-]*`, bounded: podman's own container-name grammar, which also
/// rules out path separators, `.`/`..` and leading dashes (option injection).
fn is_safe_token(s: &str, max: usize) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    s.len() <= max && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

pub fn container(name: &str) -> Result<&str, NameError> {
    if is_safe_token(name, 128) {
        Ok(name)
    } else {
        Err(NameError::Container(name.to_owned()))
    }
}

pub fn scope(scope: &str) -> Result<&str, NameError> {
    if is_safe_token(scope, 64) {
        Ok(scope)
    } else {
        Err(NameError::Scope(scope.to_owned()))
    }
}

pub fn profile(name: &str) -> Result<&str, NameError> {
    if is_safe_token(name, 128) {
        Ok(name)
    } else {
        Err(NameError::Profile(name.to_owned()))
    }
}

pub fn project(name: &str) -> Result<&str, NameError> {
    if is_safe_token(name, 128) && name != "." && name != ".." {
        Ok(name)
    } else {
        Err(NameError::Project(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names() {
        for ok in ["a", "web-1", "A.b_c", "0x"] {
            assert!(container(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a\\b",
            "-x",
            "--config=/x",
            "a b",
            "a;b",
            "../x",
            "_x",
        ] {
            assert!(container(bad).is_err(), "{bad}");
        }
        assert!(container(&"a".repeat(129)).is_err());
    }

    #[test]
    fn scopes_and_profiles() {
        assert!(scope("proj-1").is_ok());
        assert!(scope(&"s".repeat(65)).is_err());
        assert!(scope("%ssh").is_err());
        assert!(profile("dev-standard").is_ok());
        assert!(profile("../etc/passwd").is_err());
        assert!(project("..").is_err());
        assert!(project("").is_err());
    }
}
