//! Confinement of a secret-holding service child: no new privileges, not dumpable (no
//! ptrace, no core files with secrets), and a Landlock file-system lane where the kernel has
//! it. Best effort on old kernels, logged either way.

use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreated,
    RulesetCreatedAttr, RulesetError, RulesetStatus, path_beneath_rules,
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

/// The Landlock ruleset of `lane` (best effort on older ABIs), not yet applied.
fn ruleset(lane: &Lane) -> Result<RulesetCreated, RulesetError> {
    let abi = ABI::V5;
    Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))?
        .create()?
        .add_rules(path_beneath_rules(&lane.read, AccessFs::from_read(abi)))?
        .add_rules(path_beneath_rules(&lane.write, AccessFs::from_all(abi)))?
        .add_rules(path_beneath_rules(["/dev/null"], AccessFs::from_all(abi)))
}

/// Drop what a service child must not have. Returns a one-line summary for the log.
pub fn confine(lane: &Lane) -> String {
    // SAFETY: prctl with constant, valid arguments.
    let nnp = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } == 0;
    let nodump = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } == 0;
    let landlock = ruleset(lane).and_then(|r| r.restrict_self());
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
    let created = ruleset(lane).ok()?;
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
