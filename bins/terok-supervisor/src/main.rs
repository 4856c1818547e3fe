//! terok-supervisor: the per-container supervisor (`run`, spawned by terok-hook) and its
//! service children (`service NAME`, spawned by the supervisor). Not meant to be run by
//! hand except for debugging.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use terok::logging::{self, Fallback};
use terok::supervisor::{self, Service};

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
    /// Serve one service on the listening socket inherited as fd 3
    Service {
        #[arg(value_enum)]
        name: Service,
        #[arg(long)]
        sidecar: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // stderr is the per-container log file the hook opened for us.
    logging::init("terok-supervisor", "info", true, Fallback::Stderr);
    let result = match cli.command {
        Command::Run { sidecar, netns } => supervisor::run::run(&sidecar, &netns),
        Command::Service { name, sidecar } => supervisor::service::run(name, &sidecar),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(2)
        }
    }
}
