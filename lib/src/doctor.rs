//! `terok-admin doctor`: host health checks, one line each, and the janitor that reaps
//! supervisors whose container is gone. Exit 0 when all is well, 1 for a warning, 2 for an
//! error.

use std::time::Duration;

use serde::Serialize;

use crate::supervisor::janitor;
use crate::{Context, podman, setup};

#[derive(Debug, Clone, clap::Args)]
pub struct DoctorArgs {
    /// Print the verdicts as JSON
    #[arg(long)]
    pub json: bool,
    /// Spare supervisors younger than this many seconds (their container may be starting)
    #[arg(long, default_value_t = 30, value_name = "SECS", hide = true)]
    pub orphan_grace: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warn,
    Error,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub label: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

fn check(label: &'static str, verdict: Verdict, detail: impl Into<String>) -> Check {
    Check {
        label,
        verdict,
        detail: detail.into(),
    }
}

pub fn checks(ctx: &Context, orphan_grace: Duration) -> Vec<Check> {
    let mut out = Vec::new();
    let nft = &ctx.config.shield.nft;
    out.push(if podman::is_executable(nft) {
        check("nft", Verdict::Ok, nft.display().to_string())
    } else {
        check(
            "nft",
            Verdict::Error,
            format!(
                "{} missing: shielded containers cannot start (apt-get install nftables)",
                nft.display()
            ),
        )
    });
    let podman_bin = podman::binary();
    out.push(match &podman_bin {
        Ok(p) => check("podman", Verdict::Ok, p.display().to_string()),
        Err(e) => check("podman", Verdict::Error, e.to_string()),
    });
    let hooks = ctx.paths.hooks_dir();
    let installed = setup::DESCRIPTORS
        .iter()
        .all(|(name, _)| hooks.join(name).is_file());
    out.push(if installed {
        check("hooks", Verdict::Ok, hooks.display().to_string())
    } else {
        check(
            "hooks",
            Verdict::Warn,
            format!(
                "not installed in {}; run `terok-admin setup`",
                hooks.display()
            ),
        )
    });
    out.push(match crate::vault::tiers::Chain::from_ctx(ctx).resolve(false) {
        Ok(Some((_, tier))) => check("vault", Verdict::Ok, format!("passphrase available ({tier})")),
        Ok(None) if !crate::vault::db_path(ctx).exists() => {
            check("vault", Verdict::Ok, "no vault yet (only needed with --scope)")
        }
        Ok(None) => check(
            "vault",
            Verdict::Warn,
            "locked: scoped containers cannot start their broker; run `terok-admin vault unlock`",
        ),
        Err(e) => check("vault", Verdict::Error, e.to_string()),
    });
    out.push(
        match podman_bin.ok().and_then(|p| janitor::live_containers(&p)) {
            None => check(
                "orphaned supervisors",
                Verdict::Warn,
                "podman unreachable: cannot tell orphans from live supervisors",
            ),
            Some(live) => {
                let found = janitor::supervisors(&ctx.paths.sidecar_dir());
                let sweep = janitor::sweep(&found, &live, orphan_grace);
                match (sweep.reaped.is_empty(), sweep.stubborn.is_empty()) {
                    (true, true) => check(
                        "orphaned supervisors",
                        Verdict::Ok,
                        format!("none ({} supervisor(s) running)", found.len()),
                    ),
                    (_, true) => check(
                        "orphaned supervisors",
                        Verdict::Ok,
                        format!("reaped {}: {}", sweep.reaped.len(), sweep.reaped.join(", ")),
                    ),
                    _ => check(
                        "orphaned supervisors",
                        Verdict::Warn,
                        format!("would not die: {}", sweep.stubborn.join(", ")),
                    ),
                }
            }
        },
    );
    out
}

/// Run the checks and print them; returns the exit code.
pub fn run(ctx: &Context, args: &DoctorArgs) -> i32 {
    let results = checks(ctx, Duration::from_secs(args.orphan_grace));
    let worst = results
        .iter()
        .map(|c| c.verdict)
        .max()
        .unwrap_or(Verdict::Ok);
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&results).expect("checks serialise")
        );
    } else {
        for c in &results {
            let tag = match c.verdict {
                Verdict::Ok => "ok",
                Verdict::Warn => "WARN",
                Verdict::Error => "ERROR",
            };
            println!("  {:<22} {tag} ({})", c.label, c.detail);
        }
    }
    match worst {
        Verdict::Ok => 0,
        Verdict::Warn => 1,
        Verdict::Error => 2,
    }
}
