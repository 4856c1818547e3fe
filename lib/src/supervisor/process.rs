//! Starting and stopping the supervisor from the hooks, with the pid file as the handle and
//! a recycle guard: a pid is only signalled while `/proc/PID/cmdline` still names the
//! supervisor of this very sidecar.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::{SupervisorError, pid_file, ready_file};
use crate::fsutil;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SupervisorError {
    let what = what.into();
    move |source| SupervisorError::Io { what, source }
}

/// Is `pid` the supervisor of `sidecar`?
fn is_ours(pid: i32, sidecar: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let sidecar = sidecar.as_os_str().as_encoded_bytes();
    args.first()
        .is_some_and(|a0| a0.ends_with(b"terok-supervisor"))
        && args.contains(&sidecar)
}

fn read_pid(file: &Path) -> Option<i32> {
    std::fs::read_to_string(file)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 1)
}

/// Whether process group `pgid` still has a member that is not a zombie (a zombie waits for
/// its parent, which may not be us, and holds nothing).
pub fn group_alive(pgid: i32) -> bool {
    if killpg(Pid::from_raw(pgid), None).is_err() {
        return false;
    }
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                return false;
            };
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // After "pid (comm) ": state ppid pgrp …
                    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
                    let state = fields.next()?;
                    let pgrp: i32 = fields.nth(1)?.parse().ok()?;
                    Some(pgrp == pgid && state != "Z" && state != "X")
                })
                .unwrap_or(false)
        })
}

/// Stop the supervisor recorded in `runtime_dir` (its whole process group): SIGTERM and at
/// most `grace` before SIGKILL, or SIGKILL at once when `grace` is zero; then wait (briefly)
/// until the group is gone. Returns whether one was running.
pub fn stop(runtime_dir: &Path, sidecar: &Path, grace: Duration) -> bool {
    let file = pid_file(runtime_dir);
    let Some(pid) = read_pid(&file) else {
        let _ = fsutil::remove_file_if_exists(&file);
        return false;
    };
    let running = is_ours(pid, sidecar);
    if running {
        let group = Pid::from_raw(pid);
        // No grace: the supervisor keeps nothing that needs a graceful end (its sockets close,
        // its children die with it), so SIGKILL at once.
        let first = if grace.is_zero() {
            Signal::SIGKILL
        } else {
            Signal::SIGTERM
        };
        let _ = killpg(group, first);
        let deadline = Instant::now() + grace;
        while group_alive(pid) {
            if Instant::now() >= deadline {
                let _ = killpg(group, Signal::SIGKILL);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let _ = fsutil::remove_file_if_exists(&file);
    running
}

/// Spawn the supervisor for a container, fully detached (new session, no fd of ours but
/// stdio), without waiting: it binds while podman goes on creating the container, and the
/// `createRuntime` hook waits for [`ready_file`] before the container's first process runs.
/// Returns its pid.
pub fn spawn(
    program: &Path,
    sidecar: &Path,
    netns: &Path,
    runtime_dir: &Path,
    log: Option<PathBuf>,
) -> Result<u32, SupervisorError> {
    // A supervisor left from an earlier start of this container (poststop skipped) goes first.
    stop(runtime_dir, sidecar, Duration::from_millis(500));
    fsutil::ensure_private_dir(runtime_dir, true)
        .map_err(io(format!("create {}", runtime_dir.display())))?;
    // Markers of an earlier start would claim readiness or a dead container.
    let _ = fsutil::remove_file_if_exists(&ready_file(runtime_dir));
    let _ = fsutil::remove_file_if_exists(&super::container_pid_file(runtime_dir));
    let log_file = log.as_ref().and_then(|path| {
        if let Some(dir) = path.parent() {
            let _ = fsutil::ensure_private_dir(dir, false);
        }
        OpenOptions::new().create(true).append(true).open(path).ok()
    });
    let (output, err_output) = match log_file {
        Some(f) => {
            let err = f
                .try_clone()
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null());
            (Stdio::from(f), err)
        }
        None => (Stdio::null(), Stdio::null()),
    };
    let mut cmd = Command::new(program);
    cmd.arg("run")
        .arg("--sidecar")
        .arg(sidecar)
        .arg("--netns")
        .arg(netns)
        .env_clear()
        .env(
            "TEROK_LOG",
            std::env::var("TEROK_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(err_output);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // Nothing of podman's leaks, above all not its config pipe, which would stall it.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(io(format!("start {}", program.display())))?;
    let pid = child.id();
    fsutil::write_atomic(&pid_file(runtime_dir), format!("{pid}\n").as_bytes(), 0o600)
        .map_err(io("record the supervisor's pid"))?;
    // Not waited for: it outlives us and is re-parented when we exit.
    std::mem::forget(child);
    Ok(pid)
}

/// Wait, bounded, until the supervisor of `runtime_dir` reports that every service listens.
pub fn wait_ready(runtime_dir: &Path, timeout: Duration) -> Result<(), SupervisorError> {
    let ready = ready_file(runtime_dir);
    let pid = read_pid(&pid_file(runtime_dir))
        .ok_or_else(|| SupervisorError::Protocol("no supervisor was started".into()))?;
    let deadline = Instant::now() + timeout;
    loop {
        if ready.exists() {
            return Ok(());
        }
        if !group_alive(pid) {
            return Err(SupervisorError::Protocol(
                "it exited before its services were listening (see its log)".into(),
            ));
        }
        if Instant::now() >= deadline {
            return Err(SupervisorError::Protocol(format!(
                "not ready within {timeout:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Tell the hooks that every service listens (the supervisor's side of [`wait_ready`]).
pub fn signal_ready(runtime_dir: &Path) -> std::io::Result<()> {
    // Normally the hook made it; a supervisor started by hand makes it itself.
    fsutil::ensure_private_dir(runtime_dir, false)?;
    std::fs::write(ready_file(runtime_dir), b"")
}
