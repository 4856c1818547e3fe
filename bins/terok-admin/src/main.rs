//! terok-admin: setup, uninstall, doctor and the operator's verbs (shield, vault, credentials).

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use terok::logging::{self, Fallback};
use terok::{Context, clidoc, doctor, gate, setup, shield, vault};

#[derive(Parser)]
#[command(
    name = "terok-admin",
    version,
    about = "Administer terok: hooks, shield, vault, keys"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install terok's OCI hooks where this user's podman reads them (idempotent)
    Setup(setup::SetupArgs),
    /// Remove terok's OCI hooks and their registration
    Uninstall(setup::UninstallArgs),
    /// Inspect and change containers' egress firewalls
    #[command(subcommand)]
    Shield(shield::ShieldCommand),
    /// Unlock, lock and inspect the credentials vault and its passphrase
    #[command(subcommand)]
    Vault(vault::VaultCommand),
    /// Store provider credentials in the vault; encrypt a legacy plaintext DB
    #[command(subcommand)]
    Credentials(vault::CredentialsCommand),
    /// SSH keys in the vault: list, add, import, export, link, rename, remove; a host-side agent
    #[command(subcommand)]
    Ssh(terok::ssh::SshCommand),
    /// The git gate: per-project mirrors agents clone from and push to
    #[command(subcommand)]
    Gate(gate::cli::GateCommand),
    /// Check the host and reap supervisors whose container is gone (exit 0/1/2 by worst verdict)
    Doctor(doctor::DoctorArgs),
    /// Print shell completions or the man page of terok-admin
    Docs(clidoc::DocArgs),
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    if let Command::Docs(args) = &cli.command {
        clidoc::emit(Cli::command(), args.what, &mut std::io::stdout().lock())?;
        return Ok(0);
    }
    let ctx = Context::load()?;
    match cli.command {
        Command::Doctor(args) => return Ok(doctor::run(&ctx, &args) as u8),
        Command::Setup(args) => setup::setup(&ctx, &args)?,
        Command::Uninstall(args) => setup::uninstall(&ctx, &args)?,
        Command::Shield(cmd) => shield::run(&ctx, cmd)?,
        Command::Vault(cmd) => vault::cli::run(&ctx, cmd)?,
        Command::Credentials(cmd) => vault::cli::run_credentials(&ctx, cmd)?,
        Command::Ssh(cmd) => terok::ssh::cli::run(&ctx, cmd)?,
        Command::Gate(cmd) => gate::cli::run(&ctx, cmd)?,
        Command::Docs(_) => unreachable!("handled before the context is loaded"),
    }
    Ok(0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init("terok-admin", "warn", false, Fallback::Stderr);
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("terok-admin: error: {e}");
            ExitCode::FAILURE
        }
    }
}
