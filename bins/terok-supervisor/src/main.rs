//! terok-supervisor: the per-container supervisor. Its services arrive with later work;
//! until then it only explains itself.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("terok-supervisor: no services are implemented yet; the hook does not start it");
    ExitCode::from(2)
}
