//! Reaping supervisors whose container is gone (podman killed before poststop, a container
//! removed behind our back). `terok-admin doctor` runs it.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// A supervisor process found on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub pid: i32,
    pub container: String,
    pub age: Duration,
}

/// Supervisors (`terok-supervisor run --sidecar <sidecar_dir>/NAME.json …`) of this terok
/// installation, with their process age.
pub fn supervisors(sidecar_dir: &Path) -> Vec<Found> {
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    // SAFETY: sysconf with a valid name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args
            .first()
            .is_some_and(|a| a.ends_with("terok-supervisor"))
            || args.get(1).map(String::as_str) != Some("run")
        {
            continue;
        }
        let Some(sidecar) = args
            .iter()
            .position(|a| a == "--sidecar")
            .and_then(|i| args.get(i + 1))
            .map(Path::new)
        else {
            continue;
        };
        if sidecar.parent() != Some(sidecar_dir) {
            continue;
        }
        let Some(container) = sidecar.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        // Field 22 of /proc/PID/stat (after the command in parentheses) is the start time.
        let started = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(')')?.1.to_owned();
                rest.split_whitespace().nth(19)?.parse::<f64>().ok()
            })
            .unwrap_or(0.0);
        out.push(Found {
            pid,
            container: container.to_owned(),
            age: Duration::from_secs_f64((uptime - started / ticks).max(0.0)),
        });
    }
    out
}

/// Names of containers podman knows and that are not stopped, or `None` when podman cannot
/// be asked (then nothing may be reaped).
pub fn live_containers(podman: &Path) -> Option<HashSet<String>> {
    let out = Command::new(podman)
        .args(["ps", "--all", "--format", "{{.Names}} {{.State}}"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(_, state)| !matches!(*state, "exited" | "stopped" | "dead" | "removing"))
            .map(|(name, _)| name.to_owned())
            .collect(),
    )
}

/// What a sweep did.
#[derive(Debug, Default)]
pub struct Sweep {
    pub reaped: Vec<String>,
    pub stubborn: Vec<String>,
}

/// Reap the supervisor trees whose container is not live, sparing ones younger than
/// `grace` (their container may still be starting).
pub fn sweep(found: &[Found], live: &HashSet<String>, grace: Duration) -> Sweep {
    let mut sweep = Sweep::default();
    for f in found {
        if live.contains(&f.container) || f.age < grace {
            continue;
        }
        let group = Pid::from_raw(f.pid);
        let _ = killpg(group, Signal::SIGTERM);
        let mut gone = false;
        for _ in 0..40 {
            if !super::process::group_alive(f.pid) {
                gone = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        if !gone {
            let _ = killpg(group, Signal::SIGKILL);
            std::thread::sleep(Duration::from_millis(50));
            gone = !super::process::group_alive(f.pid);
        }
        if gone {
            sweep.reaped.push(f.container.clone());
        } else {
            sweep.stubborn.push(f.container.clone());
        }
    }
    sweep
}
