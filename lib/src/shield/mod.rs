//! The egress firewall: one `inet terok_shield` table inside each container's network
//! namespace, default deny, fed by allowlist profiles and live operator decisions.

pub mod decisions;
pub mod nft;
pub mod profiles;
pub mod resolve;
pub mod ruleset;

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde_json::{Value, json};
use thiserror::Error;

use crate::names::{self, NameError};
use crate::podman::{self, PodmanError};
use crate::sidecar::{Sidecar, SidecarError};
use crate::{Context, paths};
use decisions::Decisions;
use nft::{LiveTable, Netns, Nft};
use profiles::Entry;
use ruleset::{Mode, RulesetSpec};

/// Where Debian and most distributions install nft.
pub const DEFAULT_NFT: &str = "/usr/sbin/nft";

#[derive(Debug, Error)]
pub enum ShieldError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(
        "profile {name:?} not found (bundled: base, dev-standard, dev-python, dev-node, nvidia-hpc; yours go in {user_dir}/<name>.txt)"
    )]
    ProfileNotFound { name: String, user_dir: PathBuf },
    #[error("profile {profile}: {location}: {entry:?} is not a domain, IP address or CIDR")]
    BadProfileEntry {
        profile: String,
        location: String,
        entry: String,
    },
    #[error("{0:?} is not an IP address, CIDR or domain name")]
    BadDestination(String),
    #[error("domain {0} does not resolve; give an IP address or CIDR instead")]
    Unresolvable(String),
    #[error(
        "nft not found at {path}: install nftables (apt-get install nftables) or set shield.nft in config.yml"
    )]
    NftMissing { path: PathBuf },
    #[error("nft failed ({status}): {stderr}")]
    NftFailed { status: String, stderr: String },
    #[error("the shield ruleset read back from the kernel is wrong: {0}")]
    Verify(String),
    #[error("{path} is corrupt ({detail}); fix or remove it")]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "no terok state for container {0}; prepare it with `terok-run prepare {0}` or `terok-run run {0} …`"
    )]
    Unknown(String),
    #[error("container {0} runs without the shield (--no-shield); nothing to change")]
    NoShield(String),
    #[error(
        "container {0} is running without the terok shield table; restart it to re-apply the shield"
    )]
    TableMissing(String),
    #[error(
        "podman's container {0} was not started from this terok state (its sidecar annotation differs)"
    )]
    Foreign(String),
    #[error(transparent)]
    Sidecar(#[from] SidecarError),
    #[error(transparent)]
    Podman(#[from] PodmanError),
}

/// Operator verbs of the shield, as `terok-admin shield …`.
#[derive(Debug, clap::Subcommand)]
pub enum ShieldCommand {
    /// Allow a destination (IP, CIDR or domain) for a container, live and across restarts
    Allow { name: String, dest: String },
    /// Deny a destination (IP, CIDR or domain) for a container, live and across restarts
    Deny { name: String, dest: String },
    /// Show a container's shield state and decisions
    Status {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Print the live ruleset of a running container
    Rules { name: String },
    /// Enforce the allowlist again after `down`
    Up { name: String },
    /// Bypass mode: allow all egress except denied and private addresses, still logging (reset at the next start)
    Down { name: String },
    /// List the available allowlist profiles
    Profiles {
        #[arg(long)]
        json: bool,
    },
}

/// The ruleset a container gets: its profile networks plus live decisions.
pub fn effective_spec(
    plan_allow: &[IpNet],
    decisions: &Decisions,
    mode: Mode,
    dns: Vec<IpAddr>,
) -> RulesetSpec {
    let mut allow = plan_allow.to_vec();
    allow.extend(decisions.allow.iter().copied());
    RulesetSpec {
        mode,
        allow,
        deny: decisions.deny.clone(),
        dns,
    }
}

/// Resolvers the live output chain lets through on port 53.
fn live_dns(table: &LiveTable<'_>) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for rule in table.rules("output") {
        let exprs = rule
            .get("expr")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let is_dns = exprs.iter().any(|e| {
            e.pointer("/match/left/payload/field") == Some(&json!("dport"))
                && e.pointer("/match/right") == Some(&json!(53))
        });
        if !is_dns {
            continue;
        }
        for e in &exprs {
            if e.pointer("/match/left/payload/field") == Some(&json!("daddr"))
                && let Some(ip) = e
                    .pointer("/match/right")
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse().ok())
                && !out.contains(&ip)
            {
                out.push(ip);
            }
        }
    }
    out
}

struct Target {
    sidecar: Sidecar,
    allow: Vec<IpNet>,
    profiles: Vec<String>,
}

fn load_target(ctx: &Context, name: &str) -> Result<Target, ShieldError> {
    names::container(name)?;
    let path = ctx.paths.sidecar(name);
    if !path.exists() {
        return Err(ShieldError::Unknown(name.to_owned()));
    }
    let sidecar = Sidecar::load(&path)?;
    let plan = sidecar
        .shield
        .clone()
        .ok_or_else(|| ShieldError::NoShield(name.to_owned()))?;
    Ok(Target {
        sidecar,
        allow: plan.allow,
        profiles: plan.profiles,
    })
}

/// The network namespace of a running container of ours, or `None` when it is not running.
fn live_netns(ctx: &Context, name: &str) -> Result<Option<Netns>, ShieldError> {
    let podman = podman::binary()?;
    let Some(info) = podman::inspect(&podman, name)? else {
        return Ok(None);
    };
    let expected = ctx.paths.sidecar(name);
    if info.sidecar_annotation.as_deref().map(std::path::Path::new) != Some(expected.as_path()) {
        return Err(ShieldError::Foreign(name.to_owned()));
    }
    let Some(pid) = info.pid else { return Ok(None) };
    if paths::is_real_root() {
        Netns::open(std::path::Path::new(&format!("/proc/{pid}/ns/net"))).map(Some)
    } else {
        Ok(Some(Netns::PodmanUnshare { podman, pid }))
    }
}

/// Parse a command-line destination (no lookup yet).
pub fn parse_destination(dest: &str) -> Result<Entry, ShieldError> {
    profiles::parse_entry(dest).ok_or_else(|| ShieldError::BadDestination(dest.to_owned()))
}

/// Turn a parsed destination into networks, resolving a domain now.
pub fn destination_nets(entry: Entry) -> Result<Vec<IpNet>, ShieldError> {
    match entry {
        Entry::Net(n) => Ok(vec![n]),
        Entry::Domain(d) => {
            let addrs = resolve::domain(&d);
            if addrs.is_empty() {
                return Err(ShieldError::Unresolvable(d));
            }
            Ok(addrs.into_iter().map(IpNet::from).collect())
        }
    }
}

fn nft(ctx: &Context) -> Nft {
    Nft::new(&ctx.config.shield.nft)
}

fn decide(ctx: &Context, name: &str, dest: &str, allow: bool) -> Result<(), ShieldError> {
    names::container(name)?;
    let entry = parse_destination(dest)?;
    let target = load_target(ctx, name)?;
    let nets = destination_nets(entry)?;
    let path = paths::decisions_file(&target.sidecar.run_state_dir);
    let mut decisions = Decisions::load(&path)?;
    if allow {
        decisions.allow(&nets);
    } else {
        decisions.deny(&nets);
    }
    let live = live_netns(ctx, name)?;
    if let Some(netns) = &live {
        let nft = nft(ctx);
        let json = nft
            .list_table(netns)?
            .ok_or_else(|| ShieldError::TableMissing(name.to_owned()))?;
        let table = LiveTable::new(&json);
        let mode = table
            .mode()
            .ok_or_else(|| ShieldError::TableMissing(name.to_owned()))?;
        let spec = effective_spec(&target.allow, &decisions, mode, live_dns(&table));
        nft.update_sets(netns, &spec)?;
    }
    if let Some(parent) = path.parent() {
        crate::fsutil::ensure_private_dir(parent, false).map_err(|source| ShieldError::Io {
            what: format!("create {}", parent.display()),
            source,
        })?;
    }
    decisions.save(&path)?;
    let list = nets
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let when = if live.is_some() {
        "now and after restarts"
    } else {
        "from its next start"
    };
    if allow {
        println!("Allowed {dest} -> {list} for {name} ({when})");
        for net in &nets {
            for d in decisions.denied_by(net) {
                eprintln!(
                    "note: {net} stays blocked by the wider denied network {d}; `terok-admin shield allow {name} {d}` lifts it"
                );
            }
        }
    } else {
        println!("Denied {dest} -> {list} for {name} ({when})");
    }
    Ok(())
}

fn switch_mode(ctx: &Context, name: &str, mode: Mode) -> Result<(), ShieldError> {
    let target = load_target(ctx, name)?;
    let decisions = Decisions::load(&paths::decisions_file(&target.sidecar.run_state_dir))?;
    let Some(netns) = live_netns(ctx, name)? else {
        println!("{name} is not running; it starts with the shield up");
        return Ok(());
    };
    let nft = nft(ctx);
    let json = nft
        .list_table(&netns)?
        .ok_or_else(|| ShieldError::TableMissing(name.to_owned()))?;
    let dns = live_dns(&LiveTable::new(&json));
    nft.apply(
        &netns,
        &effective_spec(&target.allow, &decisions, mode, dns),
    )?;
    match mode {
        Mode::Up => println!("Shield up for {name}: only allowlisted destinations are reachable"),
        Mode::Down => println!(
            "Shield DOWN for {name}: all egress except denied and private addresses is allowed and logged, until `terok-admin shield up {name}` or the next start"
        ),
    }
    Ok(())
}

fn status(ctx: &Context, name: &str, as_json: bool) -> Result<(), ShieldError> {
    let target = load_target(ctx, name)?;
    let decisions = Decisions::load(&paths::decisions_file(&target.sidecar.run_state_dir))?;
    let state = match live_netns(ctx, name)? {
        None => "stopped".to_owned(),
        Some(netns) => match nft(ctx).list_table(&netns)? {
            None => "inactive".to_owned(),
            Some(json) => match LiveTable::new(&json).mode() {
                Some(Mode::Up) => "up".to_owned(),
                Some(Mode::Down) => "down".to_owned(),
                None => "error".to_owned(),
            },
        },
    };
    let strs = |v: &[IpNet]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    if as_json {
        let out = json!({
            "container": name,
            "state": state,
            "profiles": target.profiles,
            "profile_allow": strs(&target.allow),
            "allow": strs(&decisions.allow),
            "deny": strs(&decisions.deny),
        });
        println!("{out}");
    } else {
        println!("container: {name}");
        println!("shield:    {state}");
        println!(
            "profiles:  {} ({} networks)",
            target.profiles.join(", "),
            target.allow.len()
        );
        println!("allowed:   {}", strs(&decisions.allow).join(", "));
        println!("denied:    {}", strs(&decisions.deny).join(", "));
    }
    Ok(())
}

fn rules(ctx: &Context, name: &str) -> Result<(), ShieldError> {
    load_target(ctx, name)?;
    let Some(netns) = live_netns(ctx, name)? else {
        println!("{name} is not running");
        return Ok(());
    };
    let text = nft(ctx).run(&netns, &["list", "table", "inet", ruleset::TABLE], None)?;
    print!("{text}");
    Ok(())
}

fn list_profiles(ctx: &Context, as_json: bool) -> Result<(), ShieldError> {
    let all = profiles::list(&ctx.paths.user_profiles_dir());
    if as_json {
        let out: Vec<Value> = all
            .iter()
            .map(|(n, o)| match o {
                profiles::Origin::Bundled => json!({"name": n, "origin": "bundled"}),
                profiles::Origin::User(p) => json!({"name": n, "origin": p}),
            })
            .collect();
        println!("{}", Value::Array(out));
    } else {
        for (name, origin) in all {
            match origin {
                profiles::Origin::Bundled => println!("{name}\tbundled"),
                profiles::Origin::User(p) => println!("{name}\t{}", p.display()),
            }
        }
    }
    Ok(())
}

/// Dispatch one `shield` verb.
pub fn run(ctx: &Context, cmd: ShieldCommand) -> Result<(), ShieldError> {
    match cmd {
        ShieldCommand::Allow { name, dest } => decide(ctx, &name, &dest, true),
        ShieldCommand::Deny { name, dest } => decide(ctx, &name, &dest, false),
        ShieldCommand::Status { name, json } => status(ctx, &name, json),
        ShieldCommand::Rules { name } => rules(ctx, &name),
        ShieldCommand::Up { name } => switch_mode(ctx, &name, Mode::Up),
        ShieldCommand::Down { name } => switch_mode(ctx, &name, Mode::Down),
        ShieldCommand::Profiles { json } => list_profiles(ctx, json),
    }
}
