//! `prepare`, `run` and `cleanup`: the `podman run` replacement. Everything is validated
//! before anything is written; `prepare` writes the container's sidecar and prints the podman
//! flags that tie the container to it, `run` does the same and starts podman.

pub mod podman_args;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::SystemTime;

use thiserror::Error;

use crate::names::{self, NameError};
use crate::podman::{self, PodmanError};
use crate::shield::{ShieldError, profiles, resolve};
use crate::sidecar::{self, ShieldPlan, Sidecar, SidecarError};
use crate::{Context, SIDECAR_ANNOTATION, fsutil, hook};
use podman_args::ArgsError;

#[derive(Debug, Error)]
pub enum LaunchError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Shield(#[from] ShieldError),
    #[error(transparent)]
    Args(#[from] ArgsError),
    #[error(transparent)]
    Sidecar(#[from] SidecarError),
    #[error(transparent)]
    Podman(#[from] PodmanError),
    #[error(transparent)]
    Routes(#[from] crate::broker::RoutesError),
    #[error(transparent)]
    Gate(#[from] crate::gate::GateError),
    #[error("cannot mint the phantom tokens of scope {scope}: {source}")]
    Tokens {
        scope: String,
        source: crate::vault::VaultError,
    },
    #[error(
        "image {0} is not present locally; build or pull it first (podman pull {0}), or pass --pull=missing to let podman fetch it"
    )]
    ImageMissing(String),
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// Flags shared by `prepare` and `run`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LaunchFlags {
    /// Credential scope of the container (gate project, broker credentials, SSH keys)
    #[arg(long, value_name = "SCOPE")]
    pub scope: Option<String>,
    /// Run without the egress firewall
    #[arg(long)]
    pub no_shield: bool,
    /// Do not wire the git gate (it also needs --scope)
    #[arg(long)]
    pub no_gate: bool,
    /// Do not wire the credential broker (it also needs --scope)
    #[arg(long)]
    pub no_broker: bool,
    /// Comma-separated shield profiles; replaces the configured list entirely
    #[arg(long, value_name = "A,B", value_delimiter = ',')]
    pub profiles: Option<Vec<String>>,
}

#[derive(Debug, clap::Args)]
pub struct PrepareArgs {
    /// Container name (becomes podman's --name)
    pub name: String,
    #[command(flatten)]
    pub flags: LaunchFlags,
    /// Print the podman flags as a JSON array instead of a shell-quoted line
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Example: terok-run run web -- --rm -it localhost/img:latest bash")]
pub struct RunArgs {
    /// Container name (becomes podman's --name)
    pub name: String,
    #[command(flatten)]
    pub flags: LaunchFlags,
    /// `podman run` options, the image and its command, after `--`
    #[arg(last = true, value_name = "PODMAN RUN ARGS")]
    pub podman_args: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct CleanupArgs {
    /// Container name
    pub name: String,
}

/// The launch verbs, as `terok-run …`.
#[derive(Debug, clap::Subcommand)]
pub enum LaunchCommand {
    /// Write the container's terok state and print the podman run flags that use it
    Prepare(PrepareArgs),
    /// Prepare, then run podman with those flags and yours
    Run(RunArgs),
    /// Remove everything prepare created for a container (idempotent)
    Cleanup(CleanupArgs),
}

/// A validated launch, not yet written.
struct Plan {
    sidecar: Sidecar,
    sidecar_path: PathBuf,
    unresolved: Vec<String>,
}

fn plan(ctx: &Context, name: &str, flags: &LaunchFlags) -> Result<Plan, LaunchError> {
    names::container(name)?;
    if let Some(scope) = &flags.scope {
        names::scope(scope)?;
    }
    let mut unresolved = Vec::new();
    let shield = if flags.no_shield {
        None
    } else {
        let chosen: Vec<String> = match &flags.profiles {
            Some(list) => list
                .iter()
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect(),
            None => ctx.config.shield.profiles.clone(),
        };
        let entries = profiles::load(&chosen, &ctx.paths.user_profiles_dir())?;
        let (allow, missing) = resolve::entries(&entries);
        unresolved = missing;
        Some(ShieldPlan {
            profiles: chosen,
            allow,
        })
    };
    let scoped = flags.scope.is_some();
    let gate = scoped && !flags.no_gate;
    // The gate's project is the scope, as in the original.
    let gate_token = if gate {
        Some(crate::gate::mint_token()?)
    } else {
        None
    };
    Ok(Plan {
        sidecar: Sidecar {
            version: sidecar::VERSION,
            container_name: name.to_owned(),
            scope: flags.scope.clone(),
            run_state_dir: ctx.paths.run_state(name),
            runtime_dir: ctx.paths.container_runtime(name),
            shield,
            gate,
            broker: scoped && !flags.no_broker,
            vault: scoped.then(|| sidecar::VaultPlan::from_ctx(ctx)),
            project: flags.scope.clone().filter(|_| gate),
            gate_dir: gate.then(|| ctx.paths.gate_dir()),
            gate_token,
        },
        sidecar_path: ctx.paths.sidecar(name),
        unresolved,
    })
}

/// Write a validated plan and return the podman flags for it.
fn write(plan: &Plan) -> Result<Vec<String>, LaunchError> {
    for domain in &plan.unresolved {
        eprintln!("warning: allowlisted domain {domain} does not resolve; it stays blocked");
    }
    fsutil::ensure_private_dir(&plan.sidecar.run_state_dir, true).map_err(|source| {
        LaunchError::Io {
            what: format!("create {}", plan.sidecar.run_state_dir.display()),
            source,
        }
    })?;
    plan.sidecar.save(&plan.sidecar_path)?;
    let mut flags = vec![
        "--cap-drop".into(),
        "NET_ADMIN,NET_RAW".into(),
        "--name".into(),
        plan.sidecar.container_name.clone(),
        "--annotation".into(),
        format!("{SIDECAR_ANNOTATION}={}", plan.sidecar_path.display()),
    ];
    if crate::supervisor::services(&plan.sidecar).contains(&crate::supervisor::Service::Agent) {
        // podman checks mount sources: the runtime dir must exist before `podman run`.
        let dir = &plan.sidecar.runtime_dir;
        fsutil::ensure_private_dir(dir, true).map_err(|source| LaunchError::Io {
            what: format!("create {}", dir.display()),
            source,
        })?;
        flags.push("-v".into());
        flags.push(format!(
            "{}:{}:ro",
            dir.display(),
            podman_args::RUNTIME_MOUNT
        ));
        flags.push("-e".into());
        flags.push(format!(
            "SSH_AUTH_SOCK={}/{}",
            podman_args::RUNTIME_MOUNT,
            crate::supervisor::AGENT_SOCKET
        ));
    }
    Ok(flags)
}

pub fn prepare(ctx: &Context, args: &PrepareArgs) -> Result<(), LaunchError> {
    let plan = plan(ctx, &args.name, &args.flags)?;
    let flags = mint_and_write(ctx, &plan)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&flags).expect("strings serialise")
        );
    } else {
        let quoted = flags
            .iter()
            .map(|f| shell_quote(f))
            .collect::<Vec<_>>()
            .join(" ");
        println!("{quoted}");
    }
    Ok(())
}

/// Quote for a POSIX shell only when needed (Python's `shlex.quote` rules), so the usual
/// `podman run $(terok-run prepare NAME) IMAGE` — which splits words but removes no quotes —
/// gets the flags intact whenever they contain no unsafe characters.
pub fn shell_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r#"'"'"'"#))
    }
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let child = CHILD.load(Ordering::SeqCst);
    // SAFETY: the kernel hands a valid siginfo to an SA_SIGINFO handler.
    let from_process = unsafe { !info.is_null() && (*info).si_pid() != 0 };
    // A terminal's Ctrl-C reaches podman directly (same process group); pass on only what
    // was sent to us alone.
    if child > 0 && (sig != libc::SIGINT || from_process) {
        // SAFETY: kill is async-signal-safe.
        unsafe {
            libc::kill(child, sig);
        }
    }
}

fn install_forwarding() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::SigAction(forward_signal),
        SaFlags::SA_RESTART | SaFlags::SA_SIGINFO,
        SigSet::empty(),
    );
    for sig in [
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        // SAFETY: the handler only reads an atomic and calls kill.
        let _ = unsafe { sigaction(sig, &action) };
    }
}

/// Exit code of `run`, like `podman run`'s: 125 for our own errors, else podman's.
pub fn run(ctx: &Context, args: &RunArgs) -> Result<i32, LaunchError> {
    let plan = plan(ctx, &args.name, &args.flags)?;
    let user = podman_args::parse(&args.podman_args)?;
    podman_args::check(&user, plan.sidecar.shield.is_some())?;
    let podman = podman::binary()?;
    let pulls = user.value_of("pull").is_some_and(|p| p != "never");
    if !pulls && !podman::image_exists(&podman, &user.image)? {
        return Err(LaunchError::ImageMissing(user.image));
    }
    let flags = mint_and_write(ctx, &plan)?;
    let started = SystemTime::now();
    install_forwarding();
    let mut child = Command::new(&podman)
        .arg("run")
        .args(&flags)
        .args(&args.podman_args)
        .spawn()
        .map_err(|source| LaunchError::Io {
            what: format!("start {}", podman.display()),
            source,
        })?;
    CHILD.store(child.id() as i32, Ordering::SeqCst);
    let status = child.wait().map_err(|source| LaunchError::Io {
        what: "wait for podman".into(),
        source,
    })?;
    CHILD.store(0, Ordering::SeqCst);
    let code = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 125,
    };
    if code != 0 {
        explain_hook_failure(&plan, started);
    }
    Ok(code)
}

/// podman does not show a precreate hook's stderr; show the reason the hook recorded.
fn explain_hook_failure(plan: &Plan, since: SystemTime) {
    let Some(root) = hook::state_root(&plan.sidecar_path) else {
        return;
    };
    let file = hook::error_file(root, &plan.sidecar.container_name);
    let fresh = std::fs::metadata(&file)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t >= since);
    if fresh && let Ok(reason) = std::fs::read_to_string(&file) {
        eprintln!(
            "terok-run: the terok hook refused to start {}: {}",
            plan.sidecar.container_name,
            reason.trim()
        );
    }
}

pub fn cleanup(ctx: &Context, args: &CleanupArgs) -> Result<(), LaunchError> {
    let name = names::container(&args.name)?;
    let sidecar_path = ctx.paths.sidecar(name);
    let run_state = ctx.paths.run_state(name);
    if !sidecar_path.exists() && !run_state.exists() {
        println!("No terok state found for {name}; nothing to clean up.");
        return Ok(());
    }
    // A corrupt sidecar must not keep the rest from going: fall back to the derived paths.
    let sidecar = Sidecar::load(&sidecar_path).ok();
    // Tokens go first, so a container that is still running gets 401s from here on.
    if let Some(scope) = sidecar.as_ref().and_then(|s| s.scope.as_deref()) {
        revoke_tokens(ctx, scope, name);
    }
    if let Ok(podman) = podman::binary()
        && let Ok(Some(info)) = podman::inspect(&podman, name)
        && info.pid.is_some()
    {
        eprintln!(
            "note: {name} is still running; its shield stays in place, and it will not start again until prepared anew"
        );
    }
    let mut errors = Vec::new();
    let mut dirs = vec![run_state, ctx.paths.container_runtime(name)];
    if let Some(s) = &sidecar {
        dirs.push(s.run_state_dir.clone());
        dirs.push(s.runtime_dir.clone());
    }
    for dir in dirs {
        if let Err(e) = fsutil::remove_dir_if_exists(&dir) {
            errors.push(format!("{}: {e}", dir.display()));
        }
    }
    if let Some(root) = hook::state_root(&sidecar_path)
        && let Err(e) = fsutil::remove_file_if_exists(&hook::error_file(root, name))
    {
        errors.push(e.to_string());
    }
    // The sidecar goes last: while it exists, a retry of cleanup finds the rest.
    if let Err(e) = fsutil::remove_file_if_exists(&sidecar_path) {
        errors.push(format!("{}: {e}", sidecar_path.display()));
    }
    if !errors.is_empty() {
        return Err(LaunchError::Io {
            what: format!("remove all terok state of {name}"),
            source: std::io::Error::other(errors.join("; ")),
        });
    }
    println!("Cleaned up terok state for {name}.");
    Ok(())
}

/// Mint the container's phantom tokens (after every other check, before the sidecar is
/// written), then write; a failed write takes the tokens back. A container without a scope
/// never opens the vault: that is the fast path.
fn mint_and_write(ctx: &Context, plan: &Plan) -> Result<Vec<String>, LaunchError> {
    let Some(scope) = plan.sidecar.scope.as_deref() else {
        return write(plan);
    };
    let name = &plan.sidecar.container_name;
    // The route table names the variables each provider's own clients read.
    let routes = match &plan.sidecar.vault {
        Some(vault) if plan.sidecar.broker => Some(crate::broker::Routes::load(&vault.routes)?),
        _ => None,
    };
    let minted = crate::vault::mint_container_tokens(ctx, scope, name, plan.sidecar.broker)
        .map_err(|source| LaunchError::Tokens {
            scope: scope.to_owned(),
            source,
        })?;
    let mut flags = write(plan).inspect_err(|_| {
        let _ = crate::vault::revoke_container_tokens(ctx, scope, name);
    })?;
    if let Some(routes) = routes {
        flags.extend(broker_env(&routes, &minted));
    }
    flags.extend(gate_env(ctx, &plan.sidecar));
    Ok(flags)
}

/// `-e` flags of the gate: the clone URL with the token as user, and the token. A scope
/// whose gate the operator has not created gets an empty one, so the agent can push.
fn gate_env(ctx: &Context, sidecar: &Sidecar) -> Vec<String> {
    let (Some(project), Some(token)) = (&sidecar.project, &sidecar.gate_token) else {
        return Vec::new();
    };
    if let Err(e) = crate::gate::mirror::ensure(&ctx.paths.gate_dir(), project) {
        eprintln!(
            "warning: no gate mirror for {project} ({e}); create it with `terok-admin gate init {project}`"
        );
    }
    vec![
        "-e".to_owned(),
        format!("TEROK_GATE_URL={}", crate::gate::url(token, project)),
        "-e".to_owned(),
        format!("TEROK_GATE_TOKEN={token}"),
    ]
}

/// `-e` flags pointing each provider's client at the broker with its phantom token; never
/// a real credential.
fn broker_env(routes: &crate::broker::Routes, minted: &[(String, String)]) -> Vec<String> {
    let base = format!("http://127.0.0.1:{}", crate::broker::BROKER_PORT);
    let mut out = Vec::new();
    for (provider, token) in minted {
        let Some(route) = routes.get(provider) else {
            continue;
        };
        if let Some(var) = &route.env.base_url {
            out.extend(["-e".to_owned(), format!("{var}={base}")]);
        }
        if let Some(var) = &route.env.api_key {
            out.extend(["-e".to_owned(), format!("{var}={token}")]);
        }
    }
    out
}

/// Revoke (scope, container)'s tokens; a vault that cannot be opened gets a warning, never a
/// failure of the rest of cleanup.
fn revoke_tokens(ctx: &Context, scope: &str, name: &str) {
    match crate::vault::revoke_container_tokens(ctx, scope, name) {
        Ok(_) | Err(crate::vault::VaultError::MissingDb { .. }) => {}
        Err(e) => eprintln!(
            "warning: the phantom tokens of scope {scope}, container {name} stay in the vault ({e}); once it is unlocked run `terok-admin vault revoke {scope} {name}`"
        ),
    }
}

/// Dispatch one launch verb; returns the process exit code.
pub fn dispatch(ctx: &Context, cmd: &LaunchCommand) -> Result<i32, LaunchError> {
    match cmd {
        LaunchCommand::Prepare(a) => prepare(ctx, a).map(|()| 0),
        LaunchCommand::Run(a) => run(ctx, a),
        LaunchCommand::Cleanup(a) => cleanup(ctx, a).map(|()| 0),
    }
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn quotes_only_when_needed() {
        assert_eq!(shell_quote("NET_ADMIN,NET_RAW"), "NET_ADMIN,NET_RAW");
        assert_eq!(shell_quote("a=/b/c.json"), "a=/b/c.json");
        assert_eq!(shell_quote("my container"), "'my container'");
        assert_eq!(shell_quote("it's"), r#"'it'"'"'s'"#);
        assert_eq!(shell_quote(""), "''");
    }
}
