//! `terok-admin gate …`: the operator's verbs on gate mirrors.

use std::path::Path;

use super::{GateError, mirror, repo_path};
use crate::Context;

/// Operator verbs of the git gate, as `terok-admin gate …`.
#[derive(Debug, clap::Subcommand)]
pub enum GateCommand {
    /// Create a project's gate mirror (a bare repo; a mirror of --upstream when given)
    Init {
        project: String,
        /// Upstream repository URL the gate follows (`gate sync`)
        #[arg(long, value_name = "URL")]
        upstream: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Follow upstream without losing gate work: fast-forwards only; rewrites and deletions become pending ops
    Sync {
        project: String,
        #[arg(long)]
        json: bool,
    },
    /// List the pending ops of a gate, or apply the ones you confirm (the old tip is backed up)
    Pending {
        project: String,
        /// Apply the pending op of this branch (repeatable)
        #[arg(long, value_name = "BRANCH")]
        apply: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Print a project's gate mirror as a file:// URL
    Path { project: String },
    /// Show the pushes the gate received and its backup refs
    Log {
        project: String,
        #[arg(long)]
        json: bool,
    },
}

fn json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
}

/// `file://` URL of a path, percent-encoding what is not URL-safe.
pub fn file_url(path: &Path) -> String {
    let mut out = String::from("file://");
    for b in path.as_os_str().as_encoded_bytes() {
        match *b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => {
                out.push(*b as char)
            }
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

fn print_pending(ops: &[mirror::PendingOp]) {
    if ops.is_empty() {
        println!("No pending ops.");
        return;
    }
    for op in ops {
        let commits = match (op.lossless, op.gate_only_commits) {
            (true, _) => "lossless".to_owned(),
            (false, Some(n)) => format!("{n} gate-only commit(s) would be backed up"),
            (false, None) => "gate-only work unknown".to_owned(),
        };
        println!(
            "pending {:?} {} ({}): gate {} upstream {} — {commits}",
            op.kind,
            op.branch,
            op.reason,
            short(&op.gate_sha),
            op.upstream_sha.as_deref().map(short).unwrap_or("(deleted)"),
        );
    }
}

pub fn run(ctx: &Context, cmd: GateCommand) -> Result<(), GateError> {
    let dir = ctx.paths.gate_dir();
    match cmd {
        GateCommand::Init {
            project,
            upstream,
            json: j,
        } => {
            let r = mirror::init(&dir, &project, upstream.as_deref())?;
            if j {
                json(&r);
            } else if r.created {
                println!(
                    "Created gate {} ({})",
                    r.path.display(),
                    r.upstream.as_deref().unwrap_or("no upstream")
                );
            } else {
                println!("Gate {} exists; config checked", r.path.display());
            }
        }
        GateCommand::Sync { project, json: j } => {
            let r = mirror::sync(&dir, &project)?;
            if j {
                json(&r);
            } else {
                for a in &r.applied {
                    println!(
                        "{:?} {} {}..{}",
                        a.kind,
                        a.branch,
                        a.old_sha.as_deref().map(short).unwrap_or("(new)"),
                        a.new_sha.as_deref().map(short).unwrap_or("")
                    );
                }
                print_pending(&r.pending);
                for b in &r.gate_only_branches {
                    println!("gate-only branch {b} (kept)");
                }
                for n in &r.notes {
                    println!("note: {n}");
                }
                for e in &r.errors {
                    eprintln!("error: {e}");
                }
            }
            if !r.success {
                return Err(GateError::Git {
                    what: format!("sync of {project}"),
                    stderr: r.errors.join("; "),
                });
            }
        }
        GateCommand::Pending {
            project,
            apply,
            json: j,
        } => {
            if apply.is_empty() {
                let ops = mirror::pending(&dir, &project)?;
                if j { json(&ops) } else { print_pending(&ops) }
            } else {
                let done = mirror::apply(&dir, &project, &apply)?;
                if j {
                    json(&done);
                } else {
                    for a in done {
                        println!(
                            "applied {:?} {} (old tip saved as {})",
                            a.kind,
                            a.branch,
                            a.backup.unwrap_or_default()
                        );
                    }
                }
            }
        }
        GateCommand::Path { project } => println!("{}", file_url(&repo_path(&dir, &project)?)),
        GateCommand::Log { project, json: j } => {
            let log = mirror::log(&dir, &project)?;
            if j {
                json(&log);
            } else {
                if log.pushes.is_empty() {
                    println!("No pushes received.");
                }
                for e in &log.pushes {
                    match (e.event.as_str(), e.fields.as_slice()) {
                        ("push", [old, new, r]) => {
                            println!("{} push {r} {}..{}", e.time, short(old), short(new))
                        }
                        ("backup", [r, sha]) => {
                            println!("{}   backup {r} ({})", e.time, short(sha))
                        }
                        (ev, f) => println!("{} {ev} {}", e.time, f.join(" ")),
                    }
                }
                if !log.backups.is_empty() {
                    println!("Backup refs:");
                    for b in &log.backups {
                        println!("  {} {}", b.refname, short(&b.sha));
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(file_url(Path::new("/a/b c/p.git")), "file:///a/b%20c/p.git");
    }
}
