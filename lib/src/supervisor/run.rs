//! The supervisor process: bind, report ready, keep the service children alive, and end
//! with the container.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use super::{
    Endpoint, Placement, Service, SupervisorError, container_pid_file, netns, process, services,
};
use crate::sidecar::Sidecar;

/// The fd on which a service child finds its listening socket.
pub const LISTENER_FD: i32 = 3;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SupervisorError {
    let what = what.into();
    move |source| SupervisorError::Io { what, source }
}

/// `terok-supervisor run`: everything from binding to teardown.
pub fn run(sidecar_path: &Path, netns_path: &Path) -> Result<(), SupervisorError> {
    let sidecar = Sidecar::load(sidecar_path)?;
    let wanted = services(&sidecar);
    let listeners = bind_all(&sidecar, netns_path, &wanted)?;
    process::signal_ready(&sidecar.runtime_dir).map_err(io("report readiness"))?;
    tracing::info!(
        container = %sidecar.container_name,
        services = ?wanted.iter().map(|s| s.name()).collect::<Vec<_>>(),
        "listening"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("start the runtime"))?;
    runtime.block_on(supervise(sidecar_path, sidecar, netns_path, listeners))
}

/// Bind every service's listener: TCP ones inside the container's network namespace, Unix
/// ones in the runtime directory (stale sockets replaced).
fn bind_all(
    sidecar: &Sidecar,
    netns_path: &Path,
    wanted: &[Service],
) -> Result<Vec<(Service, OwnedFd)>, SupervisorError> {
    let tcp: Vec<(Service, std::net::SocketAddr)> = wanted
        .iter()
        .filter_map(|s| match s.endpoint() {
            Endpoint::Tcp(addr) => Some((*s, addr)),
            Endpoint::Unix(_) => None,
        })
        .collect();
    let addrs: Vec<_> = tcp.iter().map(|(_, a)| *a).collect();
    let mut bound: Vec<(Service, OwnedFd)> = tcp
        .iter()
        .map(|(s, _)| *s)
        .zip(
            netns::bind_tcp(netns_path, &addrs)?
                .into_iter()
                .map(OwnedFd::from),
        )
        .collect();
    for service in wanted {
        if let Endpoint::Unix(name) = service.endpoint() {
            let path = sidecar.runtime_dir.join(name);
            let _ = crate::fsutil::remove_file_if_exists(&path);
            let listener =
                UnixListener::bind(&path).map_err(io(format!("listen on {}", path.display())))?;
            // Only the container's root (rootful root, rootless user-mapped root) connects.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(io(format!("chmod {}", path.display())))?;
            bound.push((*service, OwnedFd::from(listener)));
        }
    }
    Ok(bound)
}

async fn supervise(
    sidecar_path: &Path,
    sidecar: Sidecar,
    netns_path: &Path,
    services: Vec<(Service, OwnedFd)>,
) -> Result<(), SupervisorError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    // Children start once the container's init exists: their start-up (exec, passphrase,
    // TLS roots, key derivation) then does not compete with podman and runc for the CPU on
    // the start path. Their sockets listen already; early clients wait in the backlog.
    let (started_tx, started_rx) = watch::channel(false);
    // Service children are a binary of their own, next to ours (see bins/terok-service).
    let exe = std::env::current_exe()
        .map_err(io("find our own executable"))?
        .with_file_name("terok-service");
    let mut keepers = Vec::new();
    for (service, listener) in services {
        keepers.push(match service.placement() {
            Placement::Child => tokio::spawn(keep_alive(
                exe.clone(),
                sidecar_path.to_owned(),
                service,
                listener,
                started_rx.clone(),
                stop_rx.clone(),
            )),
            Placement::InProcess => tokio::spawn(serve_in_process(
                service,
                listener,
                sidecar.clone(),
                stop_rx.clone(),
            )),
        });
    }
    let mut term = signal(SignalKind::terminate()).map_err(io("handle SIGTERM"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io("handle SIGINT"))?;
    let mut hup = signal(SignalKind::hangup()).map_err(io("handle SIGHUP"))?;
    tokio::select! {
        why = container_gone(&sidecar.runtime_dir, netns_path, &started_tx) => {
            tracing::info!(container = %sidecar.container_name, "container gone ({why}); tearing down");
        }
        _ = term.recv() => tracing::info!("SIGTERM; tearing down"),
        _ = int.recv() => tracing::info!("SIGINT; tearing down"),
        _ = hup.recv() => tracing::info!("SIGHUP; tearing down"),
    }
    let _ = stop_tx.send(true);
    for keeper in keepers {
        let _ = keeper.await;
    }
    let _ = crate::fsutil::remove_file_if_exists(&container_pid_file(&sidecar.runtime_dir));
    Ok(())
}

/// Serve a service that runs inside the supervisor (no secrets) until told to stop.
async fn serve_in_process(
    service: Service,
    listener: OwnedFd,
    sidecar: Sidecar,
    mut stop: watch::Receiver<bool>,
) {
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    match service {
        Service::Gate => serve_gate(listener, &sidecar, stopped).await,
        Service::Broker | Service::Agent => {
            tracing::error!(service = service.name(), "does not run in-process");
            stopped.await;
        }
    }
}

/// The git gate on its listener until teardown; a gate that cannot start closes its socket,
/// so the container's git fails at once instead of hanging.
async fn serve_gate(listener: OwnedFd, sidecar: &Sidecar, stopped: impl Future<Output = ()>) {
    let gate = match crate::gate::Gate::from_sidecar(sidecar) {
        Ok(Some(gate)) => std::sync::Arc::new(gate),
        Ok(None) => return tracing::error!("gate: the sidecar does not wire a gate"),
        Err(e) => return tracing::error!("gate: {e}"),
    };
    let std_listener = std::net::TcpListener::from(listener);
    let listener = match std_listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(std_listener))
    {
        Ok(l) => l,
        Err(e) => return tracing::error!("gate: cannot use its socket: {e}"),
    };
    if let Err(e) = crate::gate::serve(listener, gate, stopped).await {
        tracing::error!("gate: {e}");
    }
}

/// Run one service child, restarting it with back-off until told to stop. The listening
/// socket stays open here, so clients wait in its backlog while a child restarts.
async fn keep_alive(
    exe: PathBuf,
    sidecar: PathBuf,
    service: Service,
    listener: OwnedFd,
    mut started: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    // Bounded, should no createRuntime hook ever report the container's pid.
    tokio::select! {
        _ = started.wait_for(|s| *s) => {}
        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        _ = stop.wait_for(|s| *s) => return,
    }
    let fd = listener.as_raw_fd();
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg(service.name())
            .arg("--sidecar")
            .arg(&sidecar)
            .env_clear()
            .env(
                "TEROK_LOG",
                std::env::var("TEROK_LOG").unwrap_or_else(|_| "info".into()),
            )
            .kill_on_drop(true);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if fd == LISTENER_FD {
                    // dup2 onto itself keeps FD_CLOEXEC: clear it, or exec closes the socket.
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, LISTENER_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Die with the supervisor, whatever kills it.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                Ok(())
            });
        }
        let started = std::time::Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(service = service.name(), "cannot start: {e}");
                if sleep_or_stop(&mut stop, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let exited = tokio::select! {
            status = child.wait() => Some(status),
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(status) = exited else {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
            return;
        };
        if *stop.borrow() {
            return;
        }
        tracing::warn!(
            service = service.name(),
            ?status,
            "service child exited; restarting"
        );
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(100);
        }
        if sleep_or_stop(&mut stop, backoff).await {
            return;
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Sleep, unless told to stop first (then `true`).
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    }
}

/// Resolves when the container is gone: its init process (pid from the createRuntime hook)
/// exited, or its network namespace was removed by podman.
async fn container_gone(
    runtime_dir: &Path,
    netns: &Path,
    started: &watch::Sender<bool>,
) -> &'static str {
    let pid_file = container_pid_file(runtime_dir);
    let since = std::time::Instant::now();
    let pid = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|p| *p > 1)
        {
            let _ = started.send(true);
            break pid;
        }
        if !netns.exists() {
            return "network namespace removed";
        }
        // The pid comes within milliseconds of a normal start; past that, poll gently.
        let pause = if since.elapsed() < Duration::from_secs(10) {
            50
        } else {
            1000
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if raw < 0 {
        return if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            "init process already gone"
        } else {
            // No pidfd: poll for the process.
            while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            "init process exited"
        };
    }
    // SAFETY: `raw` is a fresh fd we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: we own the pidfd and keep it registered only inside this AsyncFd.
    match unsafe { AsyncFd::register(pidfd) } {
        Ok(fd) => {
            let _ = fd.readable().await;
            "init process exited"
        }
        Err(_) => "init process unwatchable",
    }
}
