//! `setup` and `uninstall`: install our hooks.d descriptors and register their directory
//! where this user's podman reads hooks, without losing the hooks podman already reads.
//!
//! Podman (4.x) reads the `hooks_dir` list of containers.conf; setting it replaces the default
//! list. So we write a drop-in (`containers.conf.d/99-terok.conf`, system-wide for root, the
//! user's own for rootless) whose list is the one podman used before plus ours. The
//! descriptors never go into the shared `/usr/share/containers/oci/hooks.d`: CRI-O reads that
//! directory and rejects the podman-only `precreate` stage.

use std::path::{Path, PathBuf};

use serde_json::Value;
use thiserror::Error;

use crate::{Context, fsutil, paths, podman};

pub const DESCRIPTORS: &[(&str, &str)] = &[
    (
        "terok-precreate.json",
        include_str!("../../hooks.d/terok-precreate.json"),
    ),
    (
        "terok-createruntime.json",
        include_str!("../../hooks.d/terok-createruntime.json"),
    ),
    (
        "terok-poststop.json",
        include_str!("../../hooks.d/terok-poststop.json"),
    ),
];
pub const DROP_IN_NAME: &str = "99-terok.conf";
const DEFAULT_HOOKS_DIRS: &[&str] = &["/usr/share/containers/oci/hooks.d"];

#[derive(Debug, Error)]
pub enum SetupError {
    #[error("terok-hook not found at {0}; build it (cargo build --release) or set TEROK_HOOK_BIN")]
    HookMissing(PathBuf),
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{path} is not valid TOML ({detail}); fix it before running setup")]
    BadContainersConf { path: PathBuf, detail: String },
    #[error("vault: {0}")]
    Vault(#[from] crate::vault::VaultError),
    #[error("broker routes: {0}")]
    Routes(#[from] crate::broker::RoutesError),
}

#[derive(Debug, Clone, clap::Args)]
pub struct SetupArgs {
    /// Install the hook descriptors into DIR instead of terok's own hooks directory
    #[arg(long, value_name = "DIR")]
    pub hooks_dir: Option<PathBuf>,
    /// Only write the descriptors; do not register their directory with podman
    #[arg(long)]
    pub no_register: bool,
    /// Where the vault passphrase lives: systemd-creds, keyring or kernel-keyring
    /// (required when setup runs without a terminal and no tier holds one yet)
    #[arg(long, value_name = "TIER")]
    pub passphrase_tier: Option<String>,
    /// Also print a generated vault passphrase on stdout (it is a secret: mind your logs)
    #[arg(long)]
    pub echo_passphrase: bool,
    /// Skip the vault phase
    #[arg(long)]
    pub no_vault: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct UninstallArgs {
    /// Remove the hook descriptors from DIR instead of terok's own hooks directory
    #[arg(long, value_name = "DIR")]
    pub hooks_dir: Option<PathBuf>,
    /// Leave the containers.conf drop-in alone
    #[arg(long)]
    pub no_register: bool,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SetupError {
    let what = what.into();
    move |source| SetupError::Io { what, source }
}

/// The terok-hook binary: `TEROK_HOOK_BIN`, else the one next to this executable.
pub fn hook_binary() -> Result<PathBuf, SetupError> {
    let candidate = std::env::var_os("TEROK_HOOK_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join("terok-hook")))
        })
        .unwrap_or_else(|| PathBuf::from("terok-hook"));
    let resolved = std::fs::canonicalize(&candidate).unwrap_or(candidate);
    if podman::is_executable(&resolved) {
        Ok(resolved)
    } else {
        Err(SetupError::HookMissing(resolved))
    }
}

/// Render a descriptor template with absolute paths. podman shows a failed hook only as
/// `executing [ARGS…]: exit status 1`, so the last argument tells the reader where the reason
/// is (`terok-run run` prints it itself).
pub fn render_descriptor(template: &str, hook: &Path, nft: &Path, log: &Path) -> String {
    let mut doc: Value = serde_json::from_str(template).expect("bundled descriptor is JSON");
    doc["hook"]["path"] = Value::String(hook.display().to_string());
    if let Some(args) = doc["hook"]["args"].as_array_mut() {
        args.push(Value::String(format!("(reason: {})", log.display())));
    }
    let supervisor = hook.with_file_name("terok-supervisor");
    doc["hook"]["env"] = serde_json::json!([
        format!("TEROK_NFT={}", nft.display()),
        format!("TEROK_SUPERVISOR={}", supervisor.display()),
    ]);
    let mut text = serde_json::to_string_pretty(&doc).expect("descriptor serialises");
    text.push('\n');
    text
}

/// The `*.conf` files of a drop-in directory, in the order podman reads them.
fn drop_ins(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "conf"))
        .collect();
    entries.sort();
    entries
}

/// containers.conf files podman reads, in order, for this kind of user (without our
/// drop-in), and the path of our drop-in.
fn containers_conf_files(root_user: bool) -> (Vec<PathBuf>, PathBuf) {
    let mut files = vec![
        PathBuf::from("/usr/share/containers/containers.conf"),
        PathBuf::from("/etc/containers/containers.conf"),
    ];
    files.extend(drop_ins(Path::new(
        "/usr/share/containers/containers.conf.d",
    )));
    files.extend(drop_ins(Path::new("/etc/containers/containers.conf.d")));
    let ours = if root_user {
        PathBuf::from("/etc/containers/containers.conf.d").join(DROP_IN_NAME)
    } else {
        let user_dir = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .unwrap_or_else(|| PathBuf::from(".config"))
            .join("containers");
        files.push(user_dir.join("containers.conf"));
        files.extend(drop_ins(&user_dir.join("containers.conf.d")));
        user_dir.join("containers.conf.d").join(DROP_IN_NAME)
    };
    files.retain(|f| f != &ours);
    (files, ours)
}

/// The hooks_dir list podman uses without our drop-in.
fn current_hooks_dirs(files: &[PathBuf]) -> Result<Vec<String>, SetupError> {
    let mut dirs: Option<Vec<String>> = None;
    for file in files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let doc: toml::Table =
            toml::from_str(&text).map_err(|e| SetupError::BadContainersConf {
                path: file.clone(),
                detail: e.message().to_owned(),
            })?;
        if let Some(list) = doc
            .get("engine")
            .and_then(|e| e.get("hooks_dir"))
            .and_then(|h| h.as_array())
        {
            dirs = Some(
                list.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
            );
        }
    }
    Ok(dirs.unwrap_or_else(|| DEFAULT_HOOKS_DIRS.iter().map(|s| (*s).to_owned()).collect()))
}

fn drop_in_text(dirs: &[String]) -> String {
    let list = dirs
        .iter()
        .map(|d| toml::Value::String(d.clone()).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "# Written by `terok-admin setup`, removed by `terok-admin uninstall`.\n\
         # The hooks podman read before, plus terok's own (annotation-gated).\n\
         [engine]\nhooks_dir = [{list}]\n"
    )
}

fn write_if_changed(path: &Path, text: &str, mode: u32) -> Result<&'static str, SetupError> {
    if std::fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok("unchanged");
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    }
    fsutil::write_atomic(path, text.as_bytes(), mode)
        .map_err(io(format!("write {}", path.display())))?;
    Ok("written")
}

pub fn setup(ctx: &Context, args: &SetupArgs) -> Result<(), SetupError> {
    // The tier is checked before any phase changes the host.
    let tier = if args.no_vault {
        None
    } else {
        crate::vault::provision::parse_tier(args.passphrase_tier.as_deref())?
    };
    hooks_phase(ctx, args)?;
    routes_phase(ctx)?;
    if args.no_vault {
        println!("Vault:\n  skipped (--no-vault)");
        return Ok(());
    }
    vault_phase(ctx, tier, args.echo_passphrase)
}

/// Setup's routes phase: the broker's default route table, written only when absent (the
/// user may edit it; setup never overwrites it).
fn routes_phase(ctx: &Context) -> Result<(), SetupError> {
    let path = crate::broker::routes_path(&ctx.paths.vault_dir);
    let state = if crate::broker::write_default_routes(&path)? {
        "written"
    } else {
        "kept"
    };
    println!("Routes:\n  routes.json   {state} ({})", path.display());
    Ok(())
}

/// Setup's vault phase: store the passphrase in a tier and create the encrypted DB.
fn vault_phase(
    ctx: &Context,
    tier: Option<crate::vault::Tier>,
    echo: bool,
) -> Result<(), SetupError> {
    crate::vault::provision::setup_phase(ctx, tier, echo)?;
    Ok(())
}

fn hooks_phase(ctx: &Context, args: &SetupArgs) -> Result<(), SetupError> {
    let root_user = paths::is_real_root();
    let hook = hook_binary()?;
    let nft = &ctx.config.shield.nft;
    println!("Prerequisites:");
    match podman::which("podman") {
        Some(p) => println!("  podman        ok ({})", p.display()),
        None => println!("  podman        MISSING (apt-get install podman)"),
    }
    if podman::is_executable(nft) {
        println!("  nft           ok ({})", nft.display());
    } else {
        println!(
            "  nft           MISSING at {} (apt-get install nftables); shielded containers will not start",
            nft.display()
        );
    }
    println!("  terok-hook    ok ({})", hook.display());
    println!("Hooks:");
    let hooks_dir = args
        .hooks_dir
        .clone()
        .unwrap_or_else(|| ctx.paths.hooks_dir());
    std::fs::create_dir_all(&hooks_dir).map_err(io(format!("create {}", hooks_dir.display())))?;
    for (name, template) in DESCRIPTORS {
        let path = hooks_dir.join(name);
        let state = write_if_changed(
            &path,
            &render_descriptor(template, &hook, nft, &ctx.paths.logs_dir().join("hook.log")),
            0o644,
        )?;
        println!("  {name:<22} {state} ({})", path.display());
    }
    if args.no_register {
        println!(
            "  registration  skipped (--no-register): pass --hooks-dir {} to podman",
            hooks_dir.display()
        );
        return Ok(());
    }
    if std::env::var_os("CONTAINERS_CONF").is_some() {
        println!("  note: CONTAINERS_CONF is set; podman run with it ignores the drop-in below");
    }
    let (files, drop_in) = containers_conf_files(root_user);
    let mut dirs = current_hooks_dirs(&files)?;
    let ours = hooks_dir.display().to_string();
    if !dirs.contains(&ours) {
        dirs.push(ours);
    }
    let state = write_if_changed(&drop_in, &drop_in_text(&dirs), 0o644)?;
    println!(
        "  registered    {state} ({}: hooks_dir = {})",
        drop_in.display(),
        dirs.join(", ")
    );
    Ok(())
}

pub fn uninstall(ctx: &Context, args: &UninstallArgs) -> Result<(), SetupError> {
    let hooks_dir = args
        .hooks_dir
        .clone()
        .unwrap_or_else(|| ctx.paths.hooks_dir());
    let mut errors = Vec::new();
    if !args.no_register {
        let (_, drop_in) = containers_conf_files(paths::is_real_root());
        match fsutil::remove_file_if_exists(&drop_in) {
            Ok(true) => println!("  removed {}", drop_in.display()),
            Ok(false) => {}
            Err(e) => errors.push(format!("{}: {e}", drop_in.display())),
        }
    }
    for (name, _) in DESCRIPTORS {
        let path = hooks_dir.join(name);
        match fsutil::remove_file_if_exists(&path) {
            Ok(true) => println!("  removed {}", path.display()),
            Ok(false) => {}
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    // Only an empty directory goes; anything else in it is not ours.
    let _ = std::fs::remove_dir(&hooks_dir);
    if errors.is_empty() {
        println!(
            "terok hooks uninstalled; per-container state is untouched (terok-run cleanup NAME)"
        );
        Ok(())
    } else {
        Err(SetupError::Io {
            what: "remove every terok hook file".into(),
            source: std::io::Error::other(errors.join("; ")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_render_with_absolute_paths() {
        for (_, template) in DESCRIPTORS {
            let text = render_descriptor(
                template,
                Path::new("/opt/t/terok-hook"),
                Path::new("/usr/sbin/nft"),
                Path::new("/l/hook.log"),
            );
            let doc: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(doc["hook"]["path"], "/opt/t/terok-hook");
            assert_eq!(doc["hook"]["env"][0], "TEROK_NFT=/usr/sbin/nft");
            assert_eq!(doc["hook"]["args"][2], "(reason: /l/hook.log)");
            assert_eq!(
                doc["when"]["annotations"]["^terok\\.sandbox\\.sidecar$"],
                "^/.+"
            );
        }
    }

    #[test]
    fn last_hooks_dir_wins_and_default_applies() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.conf");
        let b = dir.path().join("b.conf");
        std::fs::write(&a, "[engine]\nhooks_dir = [\"/x\"]\n").unwrap();
        std::fs::write(&b, "[containers]\nfoo = 1\n").unwrap();
        assert_eq!(current_hooks_dirs(&[a.clone(), b.clone()]).unwrap(), ["/x"]);
        assert_eq!(current_hooks_dirs(&[b]).unwrap(), DEFAULT_HOOKS_DIRS);
        let text = drop_in_text(&["/x".into(), "/y z".into()]);
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(parsed["engine"]["hooks_dir"][1].as_str(), Some("/y z"));
    }
}
