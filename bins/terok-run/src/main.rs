//! terok-run: prepare / run / cleanup, the `podman run` replacement.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use terok::clidoc;
use terok::launch::{self, LaunchCommand};
use terok::logging::{self, Fallback};

#[derive(Parser)]
#[command(
    name = "terok-run",
    version,
    about = "Run podman containers inside terok's sandbox"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Launch(LaunchCommand),
    /// Print shell completions or the man page of terok-run
    Docs(clidoc::DocArgs),
}

/// `run` mirrors `podman run`'s exit codes: 125 for our own errors.
fn own_error_code(is_run: bool) -> u8 {
    if is_run { 125 } else { 1 }
}

fn main() -> ExitCode {
    let is_run = std::env::args().nth(1).as_deref() == Some("run");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return match (usage, is_run) {
                (false, _) => ExitCode::SUCCESS, // --help, --version
                (true, true) => ExitCode::from(125),
                (true, false) => ExitCode::from(2),
            };
        }
    };
    logging::init("terok-run", "warn", false, Fallback::Stderr);
    let result = match &cli.command {
        Command::Docs(args) => {
            clidoc::emit(Cli::command(), args.what, &mut std::io::stdout().lock())
                .map(|()| 0)
                .map_err(anyhow::Error::from)
        }
        Command::Launch(launch_cmd) => terok::Context::load()
            .map_err(anyhow::Error::from)
            .and_then(|ctx| launch::dispatch(&ctx, launch_cmd).map_err(anyhow::Error::from)),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(125)),
        Err(e) => {
            eprintln!("terok-run: error: {e}");
            ExitCode::from(own_error_code(is_run))
        }
    }
}
