//! The per-container supervisor.
//!
//! `terok-hook precreate` spawns it fully detached (new session, nothing inherited but
//! stdio) and `createRuntime` waits, bounded, for its ready file: by then every service
//! listens inside the container's network namespace, so the container's first process can
//! use them, and the supervisor started while podman was still creating the container. Services
//! that hold secrets run in confined child processes that inherit their listening socket; a
//! crashed child is restarted with back-off while connections wait in the socket's backlog.
//! The supervisor learns the container's init pid from the `createRuntime` hook and ends,
//! with its children, when that process dies, whether or not `poststop` runs.

mod broker_child;
pub mod harden;
pub mod janitor;
pub mod netns;
pub mod process;
pub mod run;
pub mod service;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::sidecar::Sidecar;

/// Where the broker listens on the container's own loopback.
pub const BROKER_PORT: u16 = 9419;
/// Where the git gate listens on the container's own loopback.
pub const GATE_PORT: u16 = 9418;
/// The SSH agent's socket, in the per-container runtime dir (mounted at `/run/terok`).
pub const AGENT_SOCKET: &str = "ssh-agent.sock";

#[derive(Debug, Error)]
pub enum SupervisorError {
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("supervisor: {0}")]
    Protocol(String),
    #[error(transparent)]
    Sidecar(#[from] crate::sidecar::SidecarError),
}

/// A service the supervisor runs for a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Service {
    /// Credential broker: phantom token in, real credential out.
    Broker,
    /// SSH agent for the container's scope.
    Agent,
    /// Git gate: the per-task mirror over smart HTTP.
    Gate,
}

/// Where a service listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP inside the container's network namespace (its own loopback).
    Tcp(SocketAddr),
    /// A Unix socket of this name in the per-container runtime directory.
    Unix(&'static str),
}

/// Where a service runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// A confined child process of its own: the service holds secrets.
    Child,
    /// A task of the supervisor itself.
    InProcess,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Service::Broker => "broker",
            Service::Agent => "agent",
            Service::Gate => "gate",
        }
    }

    pub fn endpoint(self) -> Endpoint {
        match self {
            Service::Broker => Endpoint::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, BROKER_PORT))),
            Service::Gate => Endpoint::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, GATE_PORT))),
            Service::Agent => Endpoint::Unix(AGENT_SOCKET),
        }
    }

    pub fn placement(self) -> Placement {
        match self {
            Service::Broker | Service::Agent => Placement::Child,
            Service::Gate => Placement::InProcess,
        }
    }
}

/// The services a container's sidecar asks for; empty means no supervisor at all.
pub fn services(sidecar: &Sidecar) -> Vec<Service> {
    let mut out = Vec::new();
    if sidecar.broker && sidecar.vault.is_some() {
        out.push(Service::Broker);
    }
    if sidecar.scope.is_some() && sidecar.vault.is_some() {
        out.push(Service::Agent);
    }
    if sidecar.gate
        && sidecar.gate_token.is_some()
        && sidecar.project.is_some()
        && sidecar.gate_dir.is_some()
    {
        out.push(Service::Gate);
    }
    out
}

/// Run `work` on a short-lived thread of its own at a lower CPU priority (nice +10; on Linux
/// nice is per thread), and wait for it. Opening the vault costs a key derivation (~150 ms of
/// CPU) in each service child just as the container starts: it must not take the CPU from
/// podman and runc on the start path. A thread of its own, because a rootless process cannot
/// raise a thread's priority back.
pub fn at_low_priority<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: setpriority on the calling thread (tid) with a valid nice value.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, 10);
        }
        work()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// The supervisor's pid (= its process group) for a container.
pub fn pid_file(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("supervisor.pid")
}

/// Created by the supervisor once every service listens.
pub fn ready_file(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("ready")
}

/// The container's init pid, written by the `createRuntime` hook.
pub fn container_pid_file(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("container.pid")
}

/// The supervisor's log: its stderr and its children's.
pub fn log_file(sidecar_path: &Path, container: &str) -> Option<PathBuf> {
    crate::hook::state_root(sidecar_path)
        .map(|root| root.join("logs").join(format!("{container}.log")))
}
