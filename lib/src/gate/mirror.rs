//! Mirror management on the host: `init`, the non-destructive `sync`, pending ops, backups
//! and the push log (reference gate-clearance §1.6, with config normalisation on every gate,
//! remoteless ones included).
//!
//! Ref namespaces: `refs/heads/*` is what agents see; `refs/terok/upstream/*` is a snapshot
//! of upstream's heads (force-updated freely); `refs/terok/attic/<b>` keeps the last upstream
//! tip seen before a branch became pending; `refs/terok/backup/<b>/<stamp>-<sha12>` keeps old
//! tips before any destructive change. Sync on its own only creates or fast-forwards heads,
//! each as a compare-and-swap, so an agent push in between is never overwritten.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde::Serialize;

use super::{BACKUP_NS, GateError, HIDDEN_NS, PUSH_LOG, hooks, hooks_dir, io, repo_path};

const SNAPSHOT_NS: &str = "refs/terok/upstream/";
const ATTIC_NS: &str = "refs/terok/attic/";
const SNAPSHOT_REFSPEC: &str = "+refs/heads/*:refs/terok/upstream/*";

fn git_cmd(repo: Option<&Path>) -> Command {
    let mut cmd = Command::new("git");
    if let Some(repo) = repo {
        cmd.arg("--git-dir").arg(repo);
    }
    cmd.env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_DIR")
        .env_remove("GIT_INDEX_FILE")
        .stdin(Stdio::null());
    cmd
}

fn output(mut cmd: Command) -> Result<Output, GateError> {
    cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            GateError::GitMissing
        } else {
            GateError::Io {
                what: "run git".into(),
                source: e,
            }
        }
    })
}

/// Run git in `repo`; stdout on success, the error with git's stderr otherwise.
fn git(repo: &Path, args: &[&str]) -> Result<String, GateError> {
    let mut cmd = git_cmd(Some(repo));
    cmd.args(args);
    let out = output(cmd)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(GateError::Git {
            what: args.first().copied().unwrap_or("").to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Exit status only (for predicates such as `merge-base --is-ancestor`).
fn git_ok(repo: &Path, args: &[&str]) -> Result<bool, GateError> {
    let mut cmd = git_cmd(Some(repo));
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::null());
    Ok(output(cmd)?.status.success())
}

fn is_ancestor(repo: &Path, a: &str, b: &str) -> bool {
    git_ok(repo, &["merge-base", "--is-ancestor", a, b]).unwrap_or(false)
}

/// `{short name: sha}` of every ref under `prefix` (which ends in `/`).
fn refs(repo: &Path, prefix: &str) -> Result<BTreeMap<String, String>, GateError> {
    let out = git(
        repo,
        &["for-each-ref", "--format=%(objectname) %(refname)", prefix],
    )?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(sha, name)| Some((name.strip_prefix(prefix)?.to_owned(), sha.to_owned())))
        .collect())
}

fn upstream_url(repo: &Path) -> Option<String> {
    git(repo, &["config", "--get", "remote.origin.url"])
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Idempotent config every gate gets: hidden `refs/terok`, every ref update logged, and
/// (with an upstream) only the snapshot refspec. Returns whether anything changed.
fn normalise(repo: &Path) -> Result<bool, GateError> {
    let mut changed = false;
    let hidden = git(repo, &["config", "--get-all", "transfer.hideRefs"]).unwrap_or_default();
    if !hidden.lines().any(|l| l.trim() == HIDDEN_NS) {
        git(repo, &["config", "--add", "transfer.hideRefs", HIDDEN_NS])?;
        changed = true;
    }
    let log = git(repo, &["config", "--get", "core.logAllRefUpdates"]).unwrap_or_default();
    if log.trim() != "always" {
        git(repo, &["config", "core.logAllRefUpdates", "always"])?;
        changed = true;
    }
    if upstream_url(repo).is_some() {
        let mirror = git(repo, &["config", "--get", "remote.origin.mirror"]).unwrap_or_default();
        let fetch = git(repo, &["config", "--get-all", "remote.origin.fetch"]).unwrap_or_default();
        if mirror.trim() == "true" || fetch.trim() != SNAPSHOT_REFSPEC {
            let _ = git(repo, &["config", "--unset-all", "remote.origin.mirror"]);
            let _ = git(repo, &["config", "--unset-all", "remote.origin.fetch"]);
            git(repo, &["config", "remote.origin.fetch", SNAPSHOT_REFSPEC])?;
            changed = true;
        }
    }
    Ok(changed)
}

#[derive(Debug, Clone, Serialize)]
pub struct InitResult {
    pub path: PathBuf,
    pub upstream: Option<String>,
    pub created: bool,
}

/// `gate init PROJECT [--upstream URL]`: a bare repo (a mirror clone of the upstream, cut
/// down to heads and tags, with the snapshot seeded) with normalised config and the
/// gate-owned hooks. On an existing gate it only normalises; another upstream is an error.
pub fn init(
    gate_dir: &Path,
    project: &str,
    upstream: Option<&str>,
) -> Result<InitResult, GateError> {
    let path = repo_path(gate_dir, project)?;
    std::fs::create_dir_all(gate_dir).map_err(io(format!("create {}", gate_dir.display())))?;
    hooks::install(&hooks_dir(gate_dir))?;
    if path.exists() {
        let existing = upstream_url(&path);
        if let (Some(want), Some(have)) = (upstream, existing.as_deref())
            && want != have
        {
            return Err(GateError::UpstreamMismatch {
                project: project.to_owned(),
                existing: have.to_owned(),
                path,
            });
        }
        if let (Some(want), None) = (upstream, existing.as_deref()) {
            git(&path, &["remote", "add", "origin", want])?;
        }
        normalise(&path)?;
        return Ok(InitResult {
            upstream: upstream_url(&path),
            path,
            created: false,
        });
    }
    // Build next to the target and rename: a half-made gate is never served.
    let tmp = gate_dir.join(format!(".{project}.git.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let made = (|| -> Result<(), GateError> {
        match upstream {
            Some(url) => {
                let mut cmd = git_cmd(None);
                cmd.args(["clone", "--quiet", "--mirror", "--", url])
                    .arg(&tmp);
                let out = output(cmd)?;
                if !out.status.success() {
                    return Err(GateError::Git {
                        what: "clone --mirror".into(),
                        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                    });
                }
                normalise(&tmp)?;
                // Seed the snapshot; drop refs outside heads, tags and terok (refs/pull/…).
                let mut tx = String::new();
                for (name, sha) in refs(&tmp, "refs/")? {
                    let full = format!("refs/{name}");
                    if let Some(b) = full.strip_prefix("refs/heads/") {
                        tx.push_str(&format!("create {SNAPSHOT_NS}{b} {sha}\n"));
                    } else if !full.starts_with("refs/tags/") && !full.starts_with("refs/terok/") {
                        tx.push_str(&format!("delete {full} {sha}\n"));
                    }
                }
                update_ref_stdin(&tmp, &tx)
            }
            None => {
                let mut cmd = git_cmd(None);
                cmd.args(["init", "--quiet", "--bare"]).arg(&tmp);
                let out = output(cmd)?;
                if !out.status.success() {
                    return Err(GateError::Git {
                        what: "init --bare".into(),
                        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                    });
                }
                normalise(&tmp).map(|_| ())
            }
        }
    })();
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &path).map_err(io(format!("move the new gate to {}", path.display())))?;
    Ok(InitResult {
        path,
        upstream: upstream.map(str::to_owned),
        created: true,
    })
}

/// Make a remoteless gate for `project` unless one exists (what prepare does for a scope
/// whose gate the operator has not created).
pub fn ensure(gate_dir: &Path, project: &str) -> Result<bool, GateError> {
    if repo_path(gate_dir, project)?.exists() {
        return Ok(false);
    }
    init(gate_dir, project, None).map(|r| r.created)
}

fn update_ref_stdin(repo: &Path, tx: &str) -> Result<(), GateError> {
    if tx.is_empty() {
        return Ok(());
    }
    use std::io::Write;
    let mut cmd = git_cmd(Some(repo));
    cmd.args(["update-ref", "--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(io("run git update-ref"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(tx.as_bytes())
        .map_err(io("feed git update-ref"))?;
    let out = child
        .wait_with_output()
        .map_err(io("wait for git update-ref"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(GateError::Git {
            what: "update-ref".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Create,
    FastForward,
    ForceUpdate,
    Delete,
}

#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub branch: String,
    pub kind: OpKind,
    pub old_sha: Option<String>,
    pub new_sha: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PendingOp {
    pub branch: String,
    pub kind: OpKind,
    /// `upstream_rewrite` or `upstream_delete`.
    pub reason: &'static str,
    pub gate_sha: String,
    pub upstream_sha: Option<String>,
    pub old_snapshot_sha: Option<String>,
    /// Applying it loses nothing (the gate is still at the last upstream tip seen).
    pub lossless: bool,
    /// Commits on the gate branch that upstream never had (`None`: unknown).
    pub gate_only_commits: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SyncResult {
    pub path: PathBuf,
    pub upstream: Option<String>,
    pub success: bool,
    pub errors: Vec<String>,
    pub notes: Vec<String>,
    pub applied: Vec<Applied>,
    pub pending: Vec<PendingOp>,
    pub gate_only_branches: Vec<String>,
}

fn existing(gate_dir: &Path, project: &str) -> Result<PathBuf, GateError> {
    let path = repo_path(gate_dir, project)?;
    if path.is_dir() {
        Ok(path)
    } else {
        Err(GateError::NoGate {
            project: project.to_owned(),
            path,
        })
    }
}

fn zero() -> &'static str {
    "0000000000000000000000000000000000000000"
}

fn pending_for(
    repo: &Path,
    branch: &str,
    gate: &str,
    up: Option<&str>,
    old: Option<&str>,
) -> Option<PendingOp> {
    let (kind, reason) = match up {
        Some(up) if up == gate || is_ancestor(repo, gate, up) || is_ancestor(repo, up, gate) => {
            return None;
        }
        Some(_) => (OpKind::ForceUpdate, "upstream_rewrite"),
        None if old.is_some() => (OpKind::Delete, "upstream_delete"),
        None => return None,
    };
    let lossless = old == Some(gate);
    let gate_only_commits = if lossless {
        Some(0)
    } else {
        old.or(up).and_then(|base| {
            git(repo, &["rev-list", "--count", &format!("{base}..{gate}")])
                .ok()
                .and_then(|s| s.trim().parse().ok())
        })
    };
    Some(PendingOp {
        branch: branch.to_owned(),
        kind,
        reason,
        gate_sha: gate.to_owned(),
        upstream_sha: up.map(str::to_owned),
        old_snapshot_sha: old.map(str::to_owned),
        lossless,
        gate_only_commits,
    })
}

/// `gate sync PROJECT`: fetch upstream into the snapshot, create and fast-forward heads
/// (compare-and-swap), turn rewrites and deletions into pending ops, never touch
/// agent-only branches. Failures are collected in the result, not raised, once the gate
/// exists.
pub fn sync(gate_dir: &Path, project: &str) -> Result<SyncResult, GateError> {
    let path = existing(gate_dir, project)?;
    hooks::install(&hooks_dir(gate_dir))?;
    let mut result = SyncResult {
        path: path.clone(),
        upstream: upstream_url(&path),
        success: true,
        errors: Vec::new(),
        notes: Vec::new(),
        applied: Vec::new(),
        pending: Vec::new(),
        gate_only_branches: Vec::new(),
    };
    if normalise(&path)? {
        result.notes.push("gate config normalised".into());
    }
    if result.upstream.is_none() {
        result
            .notes
            .push("no upstream; nothing to fetch (add one with gate init --upstream)".into());
        return Ok(result);
    }
    if let Err(e) = sync_core(&path, &mut result) {
        result.errors.push(e.to_string());
    }
    if result.errors.is_empty()
        && let Err(e) = align_head(&path)
    {
        result.errors.push(e);
    }
    result.success = result.errors.is_empty();
    Ok(result)
}

fn sync_core(path: &Path, result: &mut SyncResult) -> Result<(), GateError> {
    let old_snapshot = refs(path, SNAPSHOT_NS)?;
    git(path, &["fetch", "--quiet", "--prune", "origin"])?;
    // Tags: fetched, never pruned, never clobbered.
    let mut cmd = git_cmd(Some(path));
    cmd.args([
        "fetch",
        "--quiet",
        "--no-prune",
        "origin",
        "refs/tags/*:refs/tags/*",
    ]);
    let out = output(cmd)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let rejected: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("[rejected]"))
            .collect();
        if !rejected.is_empty()
            && rejected
                .iter()
                .all(|l| l.contains("would clobber existing tag"))
        {
            result.notes.push(format!(
                "upstream moved {} existing tag(s); not updated",
                rejected.len()
            ));
        } else {
            return Err(GateError::Git {
                what: "fetch --tags".into(),
                stderr: stderr.trim().to_owned(),
            });
        }
    }
    let heads = refs(path, "refs/heads/")?;
    let snapshot = refs(path, SNAPSHOT_NS)?;
    let attic = refs(path, ATTIC_NS)?;
    let branches: BTreeSet<&String> = heads
        .keys()
        .chain(snapshot.keys())
        .chain(attic.keys())
        .collect();
    let mut tx = String::new();
    for b in branches {
        let gate = heads.get(b).map(String::as_str);
        let up = snapshot.get(b).map(String::as_str);
        let old = attic
            .get(b)
            .or_else(|| old_snapshot.get(b))
            .map(String::as_str);
        match (gate, up) {
            (None, None) => {}
            (None, Some(up)) => cas(path, result, b, OpKind::Create, None, up),
            (Some(g), Some(up)) if g == up => {}
            (Some(g), Some(up)) if is_ancestor(path, g, up) => {
                cas(path, result, b, OpKind::FastForward, Some(g), up)
            }
            (Some(g), up) => match pending_for(path, b, g, up, old) {
                Some(op) => result.pending.push(op),
                None if up.is_none() => result.gate_only_branches.push(b.clone()),
                None => {} // the gate is ahead of upstream: agent work on top
            },
        }
        // Attic: remember the last upstream tip before a branch went pending.
        let resolved = match (gate, up) {
            (Some(g), Some(up)) => g == up || is_ancestor(path, g, up) || is_ancestor(path, up, g),
            _ => false,
        };
        let in_attic = attic.get(b);
        if gate.is_none() || resolved {
            if let Some(sha) = in_attic {
                tx.push_str(&format!("delete {ATTIC_NS}{b} {sha}\n"));
            }
        } else if in_attic.is_none()
            && let Some(sha) = old_snapshot.get(b)
        {
            tx.push_str(&format!("create {ATTIC_NS}{b} {sha}\n"));
        }
    }
    // Fill in what the attic now holds for pending ops computed from the old snapshot.
    update_ref_stdin(path, &tx)
}

/// Compare-and-swap a head; a head that moved meanwhile (an agent push) is left alone.
fn cas(path: &Path, result: &mut SyncResult, b: &str, kind: OpKind, old: Option<&str>, new: &str) {
    let refname = format!("refs/heads/{b}");
    match git(path, &["update-ref", &refname, new, old.unwrap_or(zero())]) {
        Ok(_) => result.applied.push(Applied {
            branch: b.to_owned(),
            kind,
            old_sha: old.map(str::to_owned),
            new_sha: Some(new.to_owned()),
            backup: None,
        }),
        Err(_) => result
            .notes
            .push(format!("skipped {kind:?} of {b}: ref moved during sync")),
    }
}

/// Keep HEAD on upstream's default branch when the gate has it.
fn align_head(path: &Path) -> Result<(), String> {
    let Ok(out) = git(path, &["ls-remote", "--symref", "origin", "HEAD"]) else {
        return Ok(()); // unreachable upstream: keep HEAD
    };
    let Some(branch) = out.lines().find_map(|l| {
        l.strip_prefix("ref: refs/heads/")
            .and_then(|r| r.strip_suffix("\tHEAD"))
            .map(str::to_owned)
    }) else {
        return Ok(());
    };
    let full = format!("refs/heads/{branch}");
    if git_ok(path, &["rev-parse", "--verify", "--quiet", &full]).unwrap_or(false) {
        git(path, &["symbolic-ref", "HEAD", &full]).map_err(|e| format!("align HEAD: {e}"))?;
    }
    Ok(())
}

/// `gate pending PROJECT`: the pending ops, recomputed offline from heads, snapshot and
/// attic.
pub fn pending(gate_dir: &Path, project: &str) -> Result<Vec<PendingOp>, GateError> {
    let path = existing(gate_dir, project)?;
    let heads = refs(&path, "refs/heads/")?;
    let snapshot = refs(&path, SNAPSHOT_NS)?;
    let attic = refs(&path, ATTIC_NS)?;
    Ok(heads
        .iter()
        .filter_map(|(b, g)| {
            let up = snapshot.get(b).map(String::as_str);
            let old = attic.get(b).map(String::as_str);
            if up.is_none() && old.is_none() {
                return None;
            }
            pending_for(&path, b, g, up, old)
        })
        .collect())
}

fn stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

/// UTC calendar fields of a Unix time (Howard Hinnant's days-from-civil, inverted).
fn civil(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

/// `gate pending PROJECT --apply BRANCH…`: apply the operator-confirmed ops, each after
/// saving the gate's tip as a backup, each a compare-and-swap on the tip the op was
/// computed from.
pub fn apply(
    gate_dir: &Path,
    project: &str,
    branches: &[String],
) -> Result<Vec<Applied>, GateError> {
    let path = existing(gate_dir, project)?;
    let ops = pending(gate_dir, project)?;
    let mut out = Vec::new();
    for b in branches {
        let op = ops
            .iter()
            .find(|o| &o.branch == b)
            .ok_or_else(|| GateError::NoSuchPending {
                project: project.to_owned(),
                branch: b.clone(),
            })?;
        let backup = format!(
            "{BACKUP_NS}{b}/{}-{}",
            stamp(),
            &op.gate_sha[..op.gate_sha.len().min(12)]
        );
        let head = format!("refs/heads/{b}");
        let mut tx = format!("create {backup} {}\n", op.gate_sha);
        match (&op.kind, &op.upstream_sha) {
            (OpKind::ForceUpdate, Some(up)) => {
                tx.push_str(&format!("update {head} {up} {}\n", op.gate_sha))
            }
            _ => tx.push_str(&format!("delete {head} {}\n", op.gate_sha)),
        }
        if let Some(sha) = refs(&path, ATTIC_NS)?.get(b) {
            tx.push_str(&format!("delete {ATTIC_NS}{b} {sha}\n"));
        }
        // One transaction: backup, change and attic cleanup happen together or not at all.
        update_ref_stdin(&path, &tx).map_err(|e| GateError::Git {
            what: format!("apply the pending op of {b}"),
            stderr: format!("branch moved since the op was proposed, not applied ({e})"),
        })?;
        out.push(Applied {
            branch: b.clone(),
            kind: op.kind.clone(),
            old_sha: Some(op.gate_sha.clone()),
            new_sha: op.upstream_sha.clone(),
            backup: Some(backup),
        });
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct Backup {
    pub refname: String,
    pub branch: String,
    pub sha: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    pub time: String,
    /// `push`, `backup` or `backup-failed`.
    pub event: String,
    pub fields: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GateLog {
    pub path: PathBuf,
    pub pushes: Vec<LogEntry>,
    pub backups: Vec<Backup>,
}

/// `gate log PROJECT`: the pushes received through the gate (from the hook's log) and the
/// backup refs that exist now.
pub fn log(gate_dir: &Path, project: &str) -> Result<GateLog, GateError> {
    let path = existing(gate_dir, project)?;
    let text = match std::fs::read_to_string(path.join(PUSH_LOG)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(format!("read {}", path.join(PUSH_LOG).display()))(e)),
    };
    let pushes = text
        .lines()
        .filter_map(|l| {
            let mut parts = l.split('\t');
            let time = parts.next()?.to_owned();
            let event = parts.next()?.to_owned();
            Some(LogEntry {
                time,
                event,
                fields: parts.map(str::to_owned).collect(),
            })
        })
        .collect();
    let backups = refs(&path, BACKUP_NS)?
        .into_iter()
        .map(|(rest, sha)| Backup {
            branch: rest
                .rsplit_once('/')
                .map(|(b, _)| b.to_owned())
                .unwrap_or_default(),
            refname: format!("{BACKUP_NS}{rest}"),
            sha,
        })
        .collect();
    Ok(GateLog {
        path,
        pushes,
        backups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(civil(1_798_761_599), (2026, 12, 31, 23, 59, 59));
    }
}
