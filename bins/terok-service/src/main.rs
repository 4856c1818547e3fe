//! terok-service: one secret-holding service of a container (broker, SSH agent), started
//! and kept alive by its terok-supervisor with the listening socket as fd 3. A binary of its
//! own so that the supervisor, which holds no secret, maps none of the vault's code
//! (SQLCipher, libcrypto): less memory per container.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use terok::logging::{self, Fallback};
use terok::supervisor::{self, Service};

#[derive(Parser)]
#[command(
    name = "terok-service",
    version,
    about = "One service of a terok container (started by terok-supervisor)"
)]
struct Cli {
    #[arg(value_enum)]
    name: Service,
    #[arg(long)]
    sidecar: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // stderr is the per-container log file the supervisor inherited from the hook.
    logging::init("terok-service", "info", true, Fallback::Stderr);
    match supervisor::service::run(cli.name, &cli.sidecar) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(2)
        }
    }
}
