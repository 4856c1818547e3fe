//! terok-supervisor: the per-container supervisor (`run`, spawned by terok-hook), which
//! starts and keeps alive its service children (terok-service). Not meant to be run by hand
//! except for debugging.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use terok::logging::{self, Fallback};
use terok::supervisor;

#[derive(Parser)]
#[command(
    name = "terok-supervisor",
    version,
    about = "terok's per-container supervisor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Bind the container's services in its network namespace and supervise them
    Run {
        #[arg(long)]
        sidecar: PathBuf,
        #[arg(long)]
        netns: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // stderr is the per-container log file the hook opened for us.
    logging::init("terok-supervisor", "info", true, Fallback::Stderr);
    let result = match cli.command {
        Command::Run { sidecar, netns } => supervisor::run::run(&sidecar, &netns),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(2)
        }
    }
}
