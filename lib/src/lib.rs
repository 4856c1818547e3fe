//! terok: run untrusted workloads (AI coding agents and the like) in podman containers that
//! cannot hurt their owner.
//!
//! Every capability lives in this crate, one module per subsystem; the binaries under `bins/`
//! only parse arguments, set up logging and map errors to exit codes. Each command module
//! exports its clap definitions and handlers so any front end can compose them.

pub mod broker;
pub mod clidoc;
pub mod config;
pub mod doctor;
pub mod fsutil;
pub mod gate;
pub mod hook;
pub mod launch;
pub mod logging;
pub mod names;
pub mod netutil;
pub mod paths;
pub mod podman;
pub mod setup;
pub mod shield;
pub mod sidecar;
pub mod ssh;
pub mod supervisor;
pub mod vault;

/// The OCI annotation that marks a container as ours and points at its sidecar.
pub const SIDECAR_ANNOTATION: &str = "terok.sandbox.sidecar";

/// What every command handler starts from: resolved paths and the layered config.
#[derive(Debug, Clone)]
pub struct Context {
    pub paths: paths::Paths,
    pub config: config::Config,
}

impl Context {
    pub fn load() -> Result<Self, config::ConfigError> {
        let paths = paths::Paths::resolve();
        let config = config::Config::load(&paths)?;
        Ok(Context { paths, config })
    }
}
