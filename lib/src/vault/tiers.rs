//! The passphrase chain, in resolution order: a systemd-creds sealed file, the OS keyring
//! (Secret Service), the kernel-keyring session cache (tmpfs fallback), the operator's
//! `passphrase_command`, and a prompt on a TTY.
//!
//! Durable tiers that are configured but broken (a sealed file that does not unseal, a
//! helper that prints nothing) fail closed with an error naming the tier; the volatile and
//! optional tiers (keyring, session cache) fail open. Empty values count as absent.

use std::io::{IsTerminal, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{Secret, VaultError};
use crate::{Context, fsutil};

/// Name embedded in the systemd-creds blob (systemd refuses cross-name decrypts).
pub const CRED_NAME: &str = "terok-sandbox.vault-passphrase";
/// Kernel-keyring description prefix (stable: writers and readers must agree).
pub const KEY_PREFIX: &str = "terok-sandbox:vault-passphrase:";
/// Secret Service attributes of the keyring entry (those of the original's Python keyring).
pub const KEYRING_SERVICE: &str = "terok-sandbox";
pub const KEYRING_USER: &str = "credentials-db";
const KEYRING_TIMEOUT: Duration = Duration::from_secs(3);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
const SYSTEMD_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_KERNEL_PAYLOAD: usize = 4096;

/// The tiers; declaration order is the chain order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    SystemdCreds,
    Keyring,
    KernelKeyring,
    PassphraseCommand,
    Prompt,
}

impl Tier {
    pub const ALL: [Tier; 5] = [
        Tier::SystemdCreds,
        Tier::Keyring,
        Tier::KernelKeyring,
        Tier::PassphraseCommand,
        Tier::Prompt,
    ];
    /// What `setup --passphrase-tier` accepts.
    pub const PROVISIONABLE: [Tier; 3] = [Tier::SystemdCreds, Tier::Keyring, Tier::KernelKeyring];

    pub fn id(self) -> &'static str {
        match self {
            Tier::SystemdCreds => "systemd-creds",
            Tier::Keyring => "keyring",
            Tier::KernelKeyring => "kernel-keyring",
            Tier::PassphraseCommand => "passphrase-command",
            Tier::Prompt => "prompt",
        }
    }

    pub fn from_id(id: &str) -> Option<Tier> {
        Tier::ALL.into_iter().find(|t| t.id() == id)
    }

    /// Survives a reboot.
    pub fn durable(self) -> bool {
        matches!(
            self,
            Tier::SystemdCreds | Tier::Keyring | Tier::PassphraseCommand
        )
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id())
    }
}

/// The non-secret policy of the chain.
#[derive(Debug, Clone)]
pub struct Chain {
    pub db_path: PathBuf,
    pub sealed_file: PathBuf,
    pub use_keyring: bool,
    pub passphrase_command: Option<String>,
    /// Where the tmpfs fallback lives (`$XDG_RUNTIME_DIR`), if anywhere.
    pub session_runtime_dir: Option<PathBuf>,
}

/// One row of `vault status`'s chain table: presence only, nothing unsealed or executed.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeRow {
    pub source: &'static str,
    pub present: bool,
    pub active: bool,
    pub detail: String,
    #[serde(skip)]
    pub tier: Tier,
}

impl Chain {
    pub fn from_ctx(ctx: &Context) -> Chain {
        let vault = &ctx.paths.vault_dir;
        Chain {
            db_path: vault.join("credentials.db"),
            sealed_file: vault.join("vault.passphrase.cred"),
            use_keyring: ctx.config.credentials.use_keyring,
            passphrase_command: ctx.config.credentials.passphrase_command.clone(),
            session_runtime_dir: std::env::var_os("XDG_RUNTIME_DIR")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        }
    }

    fn command(&self) -> Option<&str> {
        self.passphrase_command.as_deref().filter(|c| !c.is_empty())
    }

    pub fn session(&self) -> SessionCache<'_> {
        SessionCache { chain: self }
    }

    /// Resolve the passphrase. `prompt` allows the last tier (only when stdin is a TTY).
    pub fn resolve(&self, prompt: bool) -> Result<Option<(Secret, Tier)>, VaultError> {
        if self.sealed_file.is_file() {
            return match systemd::unseal_reason(&self.sealed_file) {
                Ok(pw) => Ok(Some((pw, Tier::SystemdCreds))),
                Err(why) => Err(VaultError::BrokenTier {
                    tier: Tier::SystemdCreds,
                    detail: format!(
                        "sealed credential present at {} but could not be unsealed: {}",
                        self.sealed_file.display(),
                        why.replace('\n', " ")
                    ),
                }),
            };
        }
        if self.use_keyring
            && let Some(pw) = keyring::load()
        {
            return Ok(Some((pw, Tier::Keyring)));
        }
        if let Some(pw) = self.session().load() {
            return Ok(Some((pw, Tier::KernelKeyring)));
        }
        if let Some(cmd) = self.command() {
            return match command::run_reason(cmd) {
                Ok(pw) => Ok(Some((pw, Tier::PassphraseCommand))),
                Err(why) => Err(VaultError::BrokenTier {
                    tier: Tier::PassphraseCommand,
                    detail: format!(
                        "passphrase_command produced no passphrase ({}); run it manually to diagnose",
                        why.replace('\n', " ")
                    ),
                }),
            };
        }
        if prompt && std::io::stdin().is_terminal() {
            let pw = prompt::read("credentials.db passphrase: ")?;
            return Ok(Some((pw, Tier::Prompt)));
        }
        Ok(None)
    }

    /// Presence of each stored tier, without unsealing, reading payloads or running helpers.
    pub fn probe(&self) -> Vec<ProbeRow> {
        let systemd_reason = systemd::unavailable_reason();
        let sealed = self.sealed_file.is_file();
        let mut systemd_detail = if sealed {
            self.sealed_file.display().to_string()
        } else {
            format!("not sealed ({})", self.sealed_file.display())
        };
        if let Some(r) = &systemd_reason {
            systemd_detail.push_str(&format!(" — unusable here: {r}"));
        }
        let keyring_present = self.use_keyring && keyring::is_present();
        let keyring_detail = if !self.use_keyring {
            "use_keyring off".to_owned()
        } else if let Some(r) = keyring::unavailable_reason() {
            format!("OS keyring — unusable here: {r}")
        } else {
            "OS keyring".to_owned()
        };
        let session = self.session();
        let cached = session.is_cached();
        let mut rows = vec![
            ProbeRow {
                source: Tier::SystemdCreds.id(),
                present: sealed,
                active: false,
                detail: systemd_detail,
                tier: Tier::SystemdCreds,
            },
            ProbeRow {
                source: Tier::Keyring.id(),
                present: keyring_present,
                active: false,
                detail: keyring_detail,
                tier: Tier::Keyring,
            },
            ProbeRow {
                source: Tier::KernelKeyring.id(),
                present: cached,
                active: false,
                detail: session.detail(cached),
                tier: Tier::KernelKeyring,
            },
            ProbeRow {
                source: Tier::PassphraseCommand.id(),
                present: self.command().is_some(),
                active: false,
                detail: if self.command().is_some() {
                    "configured (not executed)".into()
                } else {
                    "not configured".into()
                },
                tier: Tier::PassphraseCommand,
            },
        ];
        if let Some(first) = rows.iter_mut().find(|r| r.present) {
            first.active = true;
        }
        rows
    }

    /// The first present durable tier (the unlock no-shadow guard).
    pub fn active_durable(&self) -> Option<Tier> {
        self.probe()
            .into_iter()
            .find(|r| r.present && r.tier.durable())
            .map(|r| r.tier)
    }
}

/// Run `program` with `stdin` fed, collecting stdout/stderr, killed after `timeout`.
pub(crate) fn run_with_timeout(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<(std::process::ExitStatus, Secret, String), String> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("failed to spawn: {e}"))?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Small payloads fit the pipe buffer; write then close so the child sees EOF.
        let _ = pipe.write_all(data);
    }
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        zeroize::Zeroizing::new(buf)
    });
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("timed out after {}s", timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("wait failed: {e}")),
        }
    };
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    let stdout = Secret::new(String::from_utf8_lossy(&stdout).into_owned());
    Ok((
        status,
        stdout,
        String::from_utf8_lossy(&stderr).trim().to_owned(),
    ))
}

/// Strip only trailing CR/LF: leading and inner whitespace may be secret material.
fn strip_newlines(s: &str) -> &str {
    s.trim_end_matches(['\r', '\n'])
}

fn which(name: &str) -> Option<PathBuf> {
    crate::podman::which(name)
}

/// The systemd-creds tier: a credential sealed with the host key (and the TPM when there is
/// one). Real root uses system mode, which systemd ≥ 250 supports without PID 1; other
/// users need `--user` mode (systemd ≥ 257 with PID 1's Varlink service).
pub mod systemd {
    use super::*;

    fn binary() -> Option<PathBuf> {
        which("systemd-creds")
    }

    fn version(bin: &Path) -> Option<u32> {
        let (_, out, _) = run_with_timeout(
            Command::new(bin).arg("--version"),
            None,
            Duration::from_secs(5),
        )
        .ok()?;
        let first = out.lines().next()?.to_owned();
        first.split_whitespace().find_map(|w| w.parse::<u32>().ok())
    }

    fn user_mode() -> bool {
        !crate::paths::is_real_root()
    }

    /// `None` when the tier works here, else why not.
    pub fn unavailable_reason() -> Option<String> {
        let Some(bin) = binary() else {
            return Some("systemd-creds not found on PATH".into());
        };
        let Some(v) = version(&bin) else {
            return Some("cannot read the systemd version (systemd-creds --version)".into());
        };
        if user_mode() {
            if v < 257 {
                return Some(format!(
                    "needs systemd ≥ 257 for non-root --user mode (host has {v})"
                ));
            }
            let socket = Path::new("/run/systemd/io.systemd.Credentials");
            use std::os::unix::fs::FileTypeExt;
            if !std::fs::metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
                return Some(format!("{} not served by PID 1", socket.display()));
            }
        } else if v < 250 {
            return Some(format!("needs systemd ≥ 250 (host has {v})"));
        }
        None
    }

    fn mode_args(cmd: &mut Command) {
        if user_mode() {
            cmd.arg("--user");
        }
    }

    /// Seal `pw` into `path` (0600, atomically). `key` is systemd's `--with-key` value.
    pub fn seal(pw: &str, path: &Path, key: &str) -> Result<(), VaultError> {
        let fail = |detail: String| VaultError::TierWrite {
            tier: Tier::SystemdCreds,
            detail,
        };
        if pw.is_empty() {
            return Err(VaultError::EmptyPassphrase);
        }
        if let Some(r) = unavailable_reason() {
            return Err(fail(r));
        }
        let bin = binary().ok_or_else(|| fail("systemd-creds not found on PATH".into()))?;
        let dir = path.parent().unwrap_or(Path::new("/"));
        fsutil::ensure_private_dir(dir, false)
            .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("encrypt");
        mode_args(&mut cmd);
        cmd.arg(format!("--name={CRED_NAME}"))
            .arg(format!("--with-key={key}"))
            .arg("-")
            .arg("-");
        let (status, out, err) =
            run_with_timeout(&mut cmd, Some(pw.as_bytes()), SYSTEMD_TIMEOUT).map_err(fail)?;
        if !status.success() || out.is_empty() {
            return Err(fail(format!(
                "encrypt failed ({status}): {}",
                if err.is_empty() { "(no stderr)" } else { &err }
            )));
        }
        fsutil::write_atomic(path, out.as_bytes(), 0o600)
            .map_err(|e| fail(format!("cannot write {}: {e}", path.display())))
    }

    /// Unseal `path`; `None` on any failure (the caller fails closed).
    pub fn unseal(path: &Path) -> Option<Secret> {
        unseal_reason(path).ok()
    }

    /// Unseal `path`, or say why not.
    pub fn unseal_reason(path: &Path) -> Result<Secret, String> {
        if !path.is_file() {
            return Err(format!("{} is not a file", path.display()));
        }
        let bin = binary().ok_or("systemd-creds not found on PATH")?;
        let mut cmd = Command::new(&bin);
        cmd.arg("decrypt");
        mode_args(&mut cmd);
        cmd.arg(format!("--name={CRED_NAME}")).arg(path).arg("-");
        match run_with_timeout(&mut cmd, None, SYSTEMD_TIMEOUT) {
            Ok((status, out, _)) if status.success() => {
                let pw = strip_newlines(&out);
                if pw.is_empty() {
                    Err("systemd-creds decrypt printed nothing".into())
                } else {
                    Ok(Secret::new(pw.to_owned()))
                }
            }
            Ok((status, _, err)) => Err(format!("systemd-creds decrypt failed ({status}): {err}")),
            Err(e) => Err(format!("systemd-creds decrypt {e}")),
        }
    }
}

/// The OS keyring over Secret Service, through libsecret's `secret-tool` (so no D-Bus client
/// lives in our process). Never blocks: no session bus means "unavailable", and every call is
/// bounded by a timeout.
pub mod keyring {
    use super::*;

    fn tool() -> Option<PathBuf> {
        which("secret-tool")
    }

    pub fn unavailable_reason() -> Option<String> {
        if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_none_or(|v| v.is_empty()) {
            return Some("no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS unset)".into());
        }
        if tool().is_none() {
            return Some("secret-tool not found (apt-get install libsecret-tools)".into());
        }
        None
    }

    fn attrs(cmd: &mut Command) {
        cmd.args(["service", KEYRING_SERVICE, "username", KEYRING_USER]);
    }

    pub fn load() -> Option<Secret> {
        if let Some(r) = unavailable_reason() {
            tracing::debug!("keyring tier skipped: {r}");
            return None;
        }
        let mut cmd = Command::new(tool()?);
        cmd.arg("lookup");
        attrs(&mut cmd);
        match run_with_timeout(&mut cmd, None, KEYRING_TIMEOUT) {
            Ok((status, out, _)) if status.success() => {
                let pw = strip_newlines(&out);
                (!pw.is_empty()).then(|| Secret::new(pw.to_owned()))
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!("OS keyring access failed ({e}); skipping the tier");
                None
            }
        }
    }

    pub fn is_present() -> bool {
        load().is_some()
    }

    pub fn store(pw: &str) -> Result<(), VaultError> {
        let fail = |detail: String| VaultError::TierWrite {
            tier: Tier::Keyring,
            detail,
        };
        if pw.is_empty() {
            return Err(VaultError::EmptyPassphrase);
        }
        if let Some(r) = unavailable_reason() {
            return Err(fail(r));
        }
        let mut cmd = Command::new(tool().ok_or_else(|| fail("secret-tool not found".into()))?);
        cmd.arg("store").arg(format!(
            "--label=Password for '{KEYRING_USER}' on '{KEYRING_SERVICE}'"
        ));
        attrs(&mut cmd);
        let (status, _, err) =
            run_with_timeout(&mut cmd, Some(pw.as_bytes()), KEYRING_TIMEOUT).map_err(fail)?;
        if !status.success() {
            return Err(fail(format!("secret-tool store failed: {err}")));
        }
        Ok(())
    }

    /// Remove the entry; true when nothing is left.
    pub fn forget() -> bool {
        if unavailable_reason().is_some() {
            return true;
        }
        let Some(tool) = tool() else { return true };
        let mut cmd = Command::new(tool);
        cmd.arg("clear");
        attrs(&mut cmd);
        let _ = run_with_timeout(&mut cmd, None, KEYRING_TIMEOUT);
        load().is_none()
    }
}

/// Key description / file name of the session cache for one DB: host and absolute DB path.
pub fn session_digest(db_path: &Path) -> String {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let abs = std::path::absolute(db_path).unwrap_or_else(|_| db_path.to_owned());
    let mut clean = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                clean.pop();
            }
            Component::CurDir => {}
            other => clean.push(other),
        }
    }
    let mut hasher = Sha256::new();
    hasher.update(host.as_bytes());
    hasher.update([0u8]);
    hasher.update(clean.to_string_lossy().as_bytes());
    hasher
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The kernel keyring backing of the session cache: a `user` key in `@u`, possessor and
/// owner may read, nobody else; no expiry.
pub mod kernel {
    use super::*;
    use linux_keyutils::{KeyError, KeyPermissions, KeyRing, KeyRingIdentifier};

    pub fn description(db_path: &Path) -> String {
        format!("{KEY_PREFIX}{}", session_digest(db_path))
    }

    fn user_ring() -> Result<KeyRing, KeyError> {
        KeyRing::from_special_id(KeyRingIdentifier::User, false)
    }

    pub fn unavailable_reason() -> Option<String> {
        match user_ring() {
            Ok(_) => None,
            Err(KeyError::OperationNotSupported) => {
                Some("kernel built without keyring support (CONFIG_KEYS)".into())
            }
            Err(e) => Some(format!("user keyring unreachable ({e:?})")),
        }
    }

    pub fn store(pw: &str, db_path: &Path) -> Result<(), String> {
        if pw.is_empty() {
            return Err("empty passphrase".into());
        }
        if pw.len() > MAX_KERNEL_PAYLOAD {
            return Err("passphrase longer than 4096 bytes".into());
        }
        let ring = user_ring().map_err(|e| format!("user keyring unreachable ({e:?})"))?;
        // Possession (via @s) lets us set the permissions even from cron or ssh sessions.
        if let Ok(session) = KeyRing::from_special_id(KeyRingIdentifier::Session, false) {
            let _ = session.link_keyring(ring);
        }
        let key = ring
            .add_key(&description(db_path), pw.as_bytes())
            .map_err(|e| format!("add_key failed ({e:?})"))?;
        if let Err(e) = key.set_perms(KeyPermissions::from_u32(0x3F2F_0000)) {
            let _ = ring.unlink_key(key);
            return Err(format!("setperm failed ({e:?})"));
        }
        Ok(())
    }

    pub fn load(db_path: &Path) -> Option<Secret> {
        let ring = user_ring().ok()?;
        let key = match ring.search(&description(db_path)) {
            Ok(k) => k,
            Err(KeyError::KeyDoesNotExist) => return None,
            Err(e) => {
                tracing::warn!("kernel keyring search failed ({e:?})");
                return None;
            }
        };
        let mut buf = zeroize::Zeroizing::new(vec![0u8; MAX_KERNEL_PAYLOAD + 1]);
        let n = key.read(&mut *buf).ok()?;
        let text = std::str::from_utf8(&buf[..n.min(buf.len())]).ok()?;
        (!text.is_empty()).then(|| Secret::new(text.to_owned()))
    }

    pub fn is_cached(db_path: &Path) -> bool {
        user_ring().is_ok_and(|r| r.search(&description(db_path)).is_ok())
    }

    /// True when no key is left.
    pub fn forget(db_path: &Path) -> bool {
        let Ok(ring) = user_ring() else { return true };
        match ring.search(&description(db_path)) {
            Ok(key) => ring.unlink_key(key).is_ok() || key.invalidate().is_ok(),
            Err(KeyError::KeyDoesNotExist) => true,
            Err(e) => {
                tracing::warn!("kernel keyring search failed ({e:?})");
                false
            }
        }
    }
}

/// The tmpfs fallback of the session cache: `$XDG_RUNTIME_DIR/terok/vault-session/<digest>`.
pub mod session_file {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    pub fn path(runtime: &Path, db_path: &Path) -> PathBuf {
        runtime
            .join("terok/vault-session")
            .join(session_digest(db_path))
    }

    pub fn unavailable_reason(runtime: Option<&Path>) -> Option<String> {
        match runtime {
            None => Some("no session runtime directory (XDG_RUNTIME_DIR unset)".into()),
            Some(r) if !r.is_dir() => Some(format!(
                "session runtime directory missing ({})",
                r.display()
            )),
            Some(_) => None,
        }
    }

    pub fn store(pw: &str, runtime: &Path, db_path: &Path) -> Result<(), String> {
        if pw.is_empty() {
            return Err("empty passphrase".into());
        }
        let file = path(runtime, db_path);
        let dir = file.parent().expect("has a parent");
        fsutil::ensure_private_dir(dir, true).map_err(|e| e.to_string())?;
        fsutil::remove_file_if_exists(&file).map_err(|e| e.to_string())?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&file)
            .map_err(|e| e.to_string())?;
        f.write_all(pw.as_bytes()).map_err(|e| {
            let _ = std::fs::remove_file(&file);
            e.to_string()
        })
    }

    pub fn load(runtime: &Path, db_path: &Path) -> Option<Secret> {
        let text = std::fs::read_to_string(path(runtime, db_path)).ok()?;
        let text = Secret::new(text);
        (!text.is_empty()).then_some(text)
    }

    pub fn is_cached(runtime: &Path, db_path: &Path) -> bool {
        std::fs::metadata(path(runtime, db_path)).is_ok_and(|m| m.len() > 0)
    }

    pub fn forget(runtime: &Path, db_path: &Path) -> bool {
        fsutil::remove_file_if_exists(&path(runtime, db_path)).is_ok()
    }
}

/// The volatile session cache: the kernel keyring when usable, else the tmpfs file.
pub struct SessionCache<'a> {
    chain: &'a Chain,
}

/// Which backing the session cache uses here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    Kernel,
    File { kernel_reason: String },
    None { reason: String },
}

impl SessionCache<'_> {
    fn runtime(&self) -> Option<&Path> {
        self.chain.session_runtime_dir.as_deref()
    }

    pub fn backing(&self) -> Backing {
        Self::choose(kernel::unavailable_reason(), self.runtime())
    }

    fn choose(kernel_reason: Option<String>, runtime: Option<&Path>) -> Backing {
        match kernel_reason {
            None => Backing::Kernel,
            Some(k) => match session_file::unavailable_reason(runtime) {
                None => Backing::File { kernel_reason: k },
                Some(f) => Backing::None {
                    reason: format!("{k}; {f}"),
                },
            },
        }
    }

    pub fn store(&self, pw: &str) -> Result<&'static str, VaultError> {
        let db = &self.chain.db_path;
        let fail = |detail: String| VaultError::TierWrite {
            tier: Tier::KernelKeyring,
            detail,
        };
        match self.backing() {
            Backing::Kernel => kernel::store(pw, db)
                .map(|()| "the kernel keyring")
                .map_err(fail),
            Backing::File { .. } => session_file::store(pw, self.runtime().expect("usable"), db)
                .map(|()| "a session file (tmpfs)")
                .map_err(fail),
            Backing::None { reason } => Err(fail(format!(
                "the session cache is unavailable here ({reason})"
            ))),
        }
    }

    pub fn load(&self) -> Option<Secret> {
        let db = &self.chain.db_path;
        match self.backing() {
            Backing::Kernel => kernel::load(db),
            Backing::File { .. } => session_file::load(self.runtime()?, db),
            Backing::None { .. } => None,
        }
    }

    pub fn is_cached(&self) -> bool {
        let db = &self.chain.db_path;
        match self.backing() {
            Backing::Kernel => kernel::is_cached(db),
            Backing::File { .. } => self
                .runtime()
                .is_some_and(|r| session_file::is_cached(r, db)),
            Backing::None { .. } => false,
        }
    }

    /// Clear both backings; true when nothing is left in either.
    pub fn forget(&self) -> bool {
        let db = &self.chain.db_path;
        let kernel_ok = kernel::forget(db);
        let file_ok = self.runtime().is_none_or(|r| session_file::forget(r, db));
        kernel_ok && file_ok
    }

    pub fn detail(&self, cached: bool) -> String {
        match (self.backing(), cached) {
            (Backing::Kernel, true) => "cached in the user keyring".into(),
            (Backing::Kernel, false) => "no passphrase cached".into(),
            (Backing::File { kernel_reason }, true) => {
                format!("cached in a session file (kernel keyring unusable here: {kernel_reason})")
            }
            (Backing::File { kernel_reason }, false) => format!(
                "no passphrase cached — session file (kernel keyring unusable here: {kernel_reason})"
            ),
            (Backing::None { reason }, _) => format!("unusable here: {reason}"),
        }
    }
}

/// The operator's helper command: tokenised like a shell (no shell), 30 s, stdout is the
/// passphrase with trailing newlines removed.
pub mod command {
    use super::*;

    pub fn run(command: &str) -> Option<Secret> {
        run_reason(command)
            .inspect_err(|why| tracing::debug!("passphrase_command: {why}"))
            .ok()
    }

    /// Run the helper; the error says why it gave nothing (never the whole command text,
    /// which may hold paths or ARNs — only its program name).
    pub fn run_reason(command: &str) -> Result<Secret, String> {
        let argv = shlex::split(command).ok_or("shlex parse failed (unbalanced quotes?)")?;
        let (program, args) = argv.split_first().ok_or("empty command")?;
        let mut cmd = Command::new(program);
        cmd.args(args);
        match run_with_timeout(&mut cmd, None, COMMAND_TIMEOUT) {
            Ok((status, out, _)) if status.success() => {
                let pw = strip_newlines(&out);
                if pw.is_empty() {
                    Err(format!("'{program}' printed nothing"))
                } else {
                    Ok(Secret::new(pw.to_owned()))
                }
            }
            Ok((status, _, err)) => Err(format!(
                "'{program}' exited {}: {}",
                status.code().unwrap_or(-1),
                if err.is_empty() { "(no stderr)" } else { &err }
            )),
            Err(e) => Err(format!("'{program}' {e}")),
        }
    }
}

/// Interactive entry: hidden on a TTY, one line from a pipe.
pub mod prompt {
    use super::*;

    /// One hidden entry on the terminal (whitespace stripped), or one stdin line (only the
    /// trailing newline stripped) when stdin is not a terminal.
    pub fn read(label: &str) -> Result<Secret, VaultError> {
        let value = if std::io::stdin().is_terminal() {
            let v = rpassword::prompt_password(label).map_err(|_| VaultError::Cancelled)?;
            Secret::new(v.trim().to_owned())
        } else {
            read_line()?.ok_or(VaultError::Cancelled)?
        };
        if value.is_empty() {
            return Err(VaultError::EmptyPassphrase);
        }
        Ok(value)
    }

    /// One line of stdin, without its newline; `None` at EOF.
    pub fn read_line() -> Result<Option<Secret>, VaultError> {
        let mut line = Secret::new(String::new());
        let n = std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| VaultError::io("read stdin", e))?;
        if n == 0 {
            return Ok(None);
        }
        let trimmed = Secret::new(strip_newlines(&line).to_owned());
        Ok(Some(trimmed))
    }

    /// A new passphrase typed twice on the terminal; `None` means "generate one".
    pub fn read_new() -> Result<Option<Secret>, VaultError> {
        let first = Secret::new(
            rpassword::prompt_password("new passphrase (empty: generate one): ")
                .map_err(|_| VaultError::Cancelled)?
                .trim()
                .to_owned(),
        );
        if first.is_empty() {
            return Ok(None);
        }
        let second = Secret::new(
            rpassword::prompt_password("confirm passphrase: ")
                .map_err(|_| VaultError::Cancelled)?
                .trim()
                .to_owned(),
        );
        if *first != *second {
            return Err(VaultError::Mismatch);
        }
        Ok(Some(first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(dir: &Path) -> Chain {
        Chain {
            db_path: dir.join("credentials.db"),
            sealed_file: dir.join("vault.passphrase.cred"),
            use_keyring: false,
            passphrase_command: None,
            session_runtime_dir: Some(dir.to_owned()),
        }
    }

    #[test]
    fn tier_ids_round_trip_in_chain_order() {
        for t in Tier::ALL {
            assert_eq!(Tier::from_id(t.id()), Some(t));
        }
        assert!(Tier::SystemdCreds < Tier::Keyring && Tier::KernelKeyring < Tier::Prompt);
        assert_eq!(Tier::from_id("config"), None);
    }

    #[test]
    fn session_digest_depends_on_path() {
        let a = session_digest(Path::new("/a/credentials.db"));
        let b = session_digest(Path::new("/b/credentials.db"));
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert_eq!(a, session_digest(Path::new("/a/x/../credentials.db")));
    }

    #[test]
    fn session_file_round_trips_privately() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("credentials.db");
        session_file::store("pw with spaces é", dir.path(), &db).unwrap();
        assert_eq!(
            session_file::load(dir.path(), &db).unwrap().as_str(),
            "pw with spaces é"
        );
        let file = session_file::path(dir.path(), &db);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(file.parent().unwrap()), 0o700);
        let other = dir.path().join("other.db");
        assert!(session_file::load(dir.path(), &other).is_none());
        assert!(session_file::forget(dir.path(), &db));
        assert!(session_file::load(dir.path(), &db).is_none());
        assert!(session_file::unavailable_reason(None).is_some());
    }

    #[test]
    fn cache_falls_back_to_the_file_when_the_kernel_is_unusable() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            SessionCache::choose(Some("k".into()), Some(dir.path())),
            Backing::File {
                kernel_reason: "k".into()
            }
        );
        assert!(matches!(
            SessionCache::choose(Some("k".into()), None),
            Backing::None { .. }
        ));
        assert_eq!(SessionCache::choose(None, None), Backing::Kernel);
    }

    #[test]
    fn kernel_keyring_round_trips_with_tight_permissions() {
        if let Some(r) = kernel::unavailable_reason() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "kernel keyring unusable in CI: {r}"
            );
            eprintln!("SKIP kernel keyring test: {r}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("credentials.db");
        kernel::store("kernel pw ü", &db).unwrap();
        assert!(kernel::is_cached(&db));
        assert_eq!(kernel::load(&db).unwrap().as_str(), "kernel pw ü");
        kernel::store("updated", &db).unwrap();
        assert_eq!(kernel::load(&db).unwrap().as_str(), "updated");
        assert!(kernel::store("", &db).is_err());
        assert!(kernel::store(&"x".repeat(4097), &db).is_err());
        assert!(kernel::forget(&db));
        assert!(kernel::forget(&db));
        assert!(kernel::load(&db).is_none());
    }

    #[test]
    fn passphrase_command_strips_newlines_and_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(command::run("printf ' a b\\n'").unwrap().as_str(), " a b");
        assert!(command::run("false").is_none());
        assert!(command::run("printf ''").is_none());
        assert!(command::run("'unbalanced").is_none());
        assert!(command::run("/nonexistent/helper").is_none());
        let mut c = chain(dir.path());
        c.passphrase_command = Some("printf ''".into());
        assert!(matches!(
            c.resolve(false),
            Err(VaultError::BrokenTier {
                tier: Tier::PassphraseCommand,
                ..
            })
        ));
        c.passphrase_command = Some("echo helper-pw".into());
        let (pw, tier) = c.resolve(false).unwrap().unwrap();
        assert_eq!((pw.as_str(), tier), ("helper-pw", Tier::PassphraseCommand));
        c.passphrase_command = Some(String::new());
        assert!(c.resolve(false).unwrap().is_none());
    }

    #[test]
    fn a_sealed_file_that_does_not_unseal_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = chain(dir.path());
        c.passphrase_command = Some("echo lower-tier".into());
        std::fs::write(&c.sealed_file, "garbage").unwrap();
        assert!(matches!(
            c.resolve(false),
            Err(VaultError::BrokenTier {
                tier: Tier::SystemdCreds,
                ..
            })
        ));
    }

    #[test]
    fn keyring_degrades_without_a_session_bus() {
        // SAFETY: the only test touching this variable.
        unsafe { std::env::remove_var("DBUS_SESSION_BUS_ADDRESS") };
        assert!(keyring::unavailable_reason().unwrap().contains("D-Bus"));
        assert!(keyring::load().is_none());
        assert!(keyring::store("x").is_err());
        assert!(keyring::forget());
    }
}
