//! Confinement of a secret-holding service child: no new privileges, not dumpable (no
//! ptrace, no core files with secrets), and a Landlock file-system lane where the kernel has
//! it. Best effort on old kernels, logged either way.

use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, path_beneath_rules,
};

/// What a confined child may still touch.
#[derive(Debug, Clone, Default)]
pub struct Lane {
    /// Read (and execute) only.
    pub read: Vec<PathBuf>,
    /// Read and write.
    pub write: Vec<PathBuf>,
}

/// The system paths every service needs to read: libraries, resolver and TLS configuration.
pub fn system_read_paths() -> Vec<PathBuf> {
    [
        "/usr",
        "/lib",
        "/lib64",
        "/etc",
        "/proc/self",
        "/sys/devices/system/cpu",
        "/dev/urandom",
    ]
    .iter()
    .map(PathBuf::from)
    .filter(|p| p.exists())
    .collect()
}

/// Drop what a service child must not have. Returns a one-line summary for the log.
pub fn confine(lane: &Lane) -> String {
    // SAFETY: prctl with constant, valid arguments.
    let nnp = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } == 0;
    let nodump = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } == 0;
    let abi = ABI::V5;
    let landlock = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(&lane.read, AccessFs::from_read(abi))))
        .and_then(|r| r.add_rules(path_beneath_rules(&lane.write, AccessFs::from_all(abi))))
        .and_then(|r| r.add_rules(path_beneath_rules(["/dev/null"], AccessFs::from_all(abi))))
        .and_then(|r| r.restrict_self());
    let landlock = match landlock {
        Ok(status) => match status.ruleset {
            RulesetStatus::FullyEnforced => "landlock enforced",
            RulesetStatus::PartiallyEnforced => "landlock partially enforced",
            RulesetStatus::NotEnforced => "landlock unavailable",
        }
        .to_owned(),
        Err(e) => format!("landlock failed ({e})"),
    };
    format!("no_new_privs={nnp} not_dumpable={nodump} {landlock}")
}

/// A Landlock ruleset for `lane`, built but not applied, for a process to apply to itself
/// between fork and exec with [`restrict_self_raw`] (both calls there are plain syscalls,
/// safe after fork). `None` where the kernel has no Landlock.
pub fn ruleset_fd(lane: &Lane) -> Option<std::os::fd::OwnedFd> {
    let abi = ABI::V5;
    let created = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(&lane.read, AccessFs::from_read(abi))))
        .and_then(|r| r.add_rules(path_beneath_rules(&lane.write, AccessFs::from_all(abi))))
        .and_then(|r| r.add_rules(path_beneath_rules(["/dev/null"], AccessFs::from_all(abi))))
        .ok()?;
    Option::<std::os::fd::OwnedFd>::from(created)
}

/// `no_new_privs` and `landlock_restrict_self(fd)`: async-signal-safe, for `pre_exec`.
pub fn restrict_self_raw(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: prctl and landlock_restrict_self take plain integers.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::syscall(libc::SYS_landlock_restrict_self, fd, 0) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
