//! Where terok keeps its files. The same resolution as the original (XDG directories for
//! users; `/var/lib/terok`, `/etc/terok`, `/run/terok` for real root), with every root
//! overridable through a `TEROK_*` environment variable so tests and packagers can relocate it.

use std::env;
use std::path::{Path, PathBuf};

/// The resolved set of roots. Everything else is derived from these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// Namespace state root (`TEROK_ROOT`): setup stamp, hooks descriptors.
    pub root: PathBuf,
    /// Sandbox state: sidecars, per-container run state, logs, gate mirrors.
    pub state_dir: PathBuf,
    /// Volatile per-container runtime directories.
    pub runtime_dir: PathBuf,
    /// Namespace config root (`~/.config/terok`): config.yml, shield profiles.
    pub config_dir: PathBuf,
    /// The credentials vault directory.
    pub vault_dir: PathBuf,
}

/// True for uid 0 in the initial user namespace. Rootless podman's hooks run as uid 0 inside
/// a user namespace: they are *not* root and must use the user's layout.
pub fn is_real_root() -> bool {
    nix::unistd::geteuid().is_root()
        && std::fs::read_to_string("/proc/self/uid_map")
            .map(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
            .unwrap_or(false)
}

fn env_path(var: &str) -> Option<PathBuf> {
    let value = env::var_os(var)?;
    if value.is_empty() {
        return None;
    }
    let s = value.to_string_lossy();
    Some(match s.strip_prefix("~/") {
        Some(rest) => home().join(rest),
        None => PathBuf::from(value),
    })
}

fn home() -> PathBuf {
    env_path("HOME")
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten()
                .map(|u| u.dir)
        })
        .unwrap_or_else(|| PathBuf::from("/"))
}

fn xdg(var: &str, fallback: &str) -> PathBuf {
    env_path(var).unwrap_or_else(|| home().join(fallback))
}

impl Paths {
    /// Resolve from the environment of this process.
    pub fn resolve() -> Self {
        Self::resolve_for(is_real_root())
    }

    pub fn resolve_for(root_user: bool) -> Self {
        let root = env_path("TEROK_ROOT").unwrap_or_else(|| {
            if root_user {
                PathBuf::from("/var/lib/terok")
            } else {
                xdg("XDG_DATA_HOME", ".local/share").join("terok")
            }
        });
        let state_dir = env_path("TEROK_SANDBOX_STATE_DIR").unwrap_or_else(|| root.join("sandbox"));
        let runtime_dir = env_path("TEROK_SANDBOX_RUNTIME_DIR").unwrap_or_else(|| {
            if root_user {
                PathBuf::from("/run/terok/sandbox")
            } else if let Some(run) = env_path("XDG_RUNTIME_DIR") {
                run.join("terok/sandbox")
            } else {
                xdg("XDG_STATE_HOME", ".local/state").join("terok/sandbox")
            }
        });
        let config_dir = env_path("TEROK_CONFIG_DIR").unwrap_or_else(|| {
            if root_user {
                PathBuf::from("/etc/terok")
            } else {
                xdg("XDG_CONFIG_HOME", ".config").join("terok")
            }
        });
        let vault_dir = env_path("TEROK_VAULT_DIR").unwrap_or_else(|| root.join("vault"));
        Paths {
            root,
            state_dir,
            runtime_dir,
            config_dir,
            vault_dir,
        }
    }

    /// Config files in layering order (later wins). `TEROK_CONFIG_FILE` replaces the layers.
    pub fn config_files(&self) -> Vec<PathBuf> {
        if let Some(file) = env_path("TEROK_CONFIG_FILE") {
            return vec![file];
        }
        let system = PathBuf::from("/etc/terok/config.yml");
        let user = self.config_dir.join("config.yml");
        if user == system {
            vec![system]
        } else {
            vec![system, user]
        }
    }

    pub fn sidecar_dir(&self) -> PathBuf {
        self.state_dir.join("sidecar")
    }

    pub fn sidecar(&self, container: &str) -> PathBuf {
        self.sidecar_dir().join(format!("{container}.json"))
    }

    /// Per-container persistent state (cleanup record, shield decisions).
    pub fn run_state(&self, container: &str) -> PathBuf {
        self.state_dir.join("runs").join(container)
    }

    /// Per-container volatile runtime directory (sockets); removed at poststop.
    pub fn container_runtime(&self, container: &str) -> PathBuf {
        self.runtime_dir.join("run").join(container)
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.state_dir.join("logs")
    }

    pub fn user_profiles_dir(&self) -> PathBuf {
        self.config_dir.join("shield/profiles")
    }

    /// Where `setup` installs our hooks.d descriptors by default.
    pub fn hooks_dir(&self) -> PathBuf {
        self.root.join("hooks.d")
    }

    pub fn gate_dir(&self) -> PathBuf {
        self.state_dir.join("gate")
    }
}

/// Derived paths of one container's run state.
pub fn decisions_file(run_state: &Path) -> PathBuf {
    run_state.join("shield-decisions.json")
}

pub fn meta_file(run_state: &Path) -> PathBuf {
    run_state.join("meta.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    // Environment mutation is process-global; keep every env-touching assertion in one test.
    #[test]
    fn overrides_and_defaults() {
        // SAFETY: single test touching these variables; no other thread reads them.
        unsafe {
            env::set_var("HOME", "/home/u");
            env::remove_var("XDG_DATA_HOME");
            env::remove_var("XDG_CONFIG_HOME");
            env::set_var("XDG_RUNTIME_DIR", "/run/user/1000");
            for v in [
                "TEROK_ROOT",
                "TEROK_SANDBOX_STATE_DIR",
                "TEROK_SANDBOX_RUNTIME_DIR",
                "TEROK_CONFIG_DIR",
                "TEROK_VAULT_DIR",
                "TEROK_CONFIG_FILE",
            ] {
                env::remove_var(v);
            }
        }
        let user = Paths::resolve_for(false);
        assert_eq!(
            user.state_dir,
            Path::new("/home/u/.local/share/terok/sandbox")
        );
        assert_eq!(user.runtime_dir, Path::new("/run/user/1000/terok/sandbox"));
        assert_eq!(user.config_dir, Path::new("/home/u/.config/terok"));
        assert_eq!(
            user.vault_dir,
            Path::new("/home/u/.local/share/terok/vault")
        );
        let root = Paths::resolve_for(true);
        assert_eq!(root.state_dir, Path::new("/var/lib/terok/sandbox"));
        assert_eq!(root.runtime_dir, Path::new("/run/terok/sandbox"));
        assert_eq!(root.config_dir, Path::new("/etc/terok"));
        assert_eq!(
            root.config_files(),
            vec![PathBuf::from("/etc/terok/config.yml")]
        );
        unsafe {
            env::set_var("TEROK_ROOT", "~/t");
            env::set_var("TEROK_SANDBOX_RUNTIME_DIR", "/tmp/rt");
            env::set_var("TEROK_CONFIG_FILE", "/tmp/c.yml");
        }
        let p = Paths::resolve_for(true);
        assert_eq!(p.state_dir, Path::new("/home/u/t/sandbox"));
        assert_eq!(p.vault_dir, Path::new("/home/u/t/vault"));
        assert_eq!(p.runtime_dir, Path::new("/tmp/rt"));
        assert_eq!(p.config_files(), vec![PathBuf::from("/tmp/c.yml")]);
        assert_eq!(
            p.sidecar("c1"),
            Path::new("/home/u/t/sandbox/sidecar/c1.json")
        );
        assert_eq!(p.container_runtime("c1"), Path::new("/tmp/rt/run/c1"));
    }
}
