//! Running `nft` inside a container's network namespace, and checking what the kernel holds.
//!
//! The child process enters the netns between fork and exec (`setns` only affects the calling
//! thread, and after fork the child is single-threaded), so neither the hook nor the admin CLI
//! ever leaves the host namespace itself, and no `nsenter` binary is needed.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::IpNet;
use serde_json::Value;

use super::ShieldError;
use super::ruleset::{self, Mode, RulesetSpec, TABLE};

/// How to reach a network namespace.
pub enum Netns {
    /// An open handle on the namespace (`/run/netns/…`, `/proc/PID/ns/net`); we may `setns`.
    Handle(File),
    /// A rootless container seen from the host: only podman's user namespace may enter it.
    PodmanUnshare { podman: PathBuf, pid: u32 },
}

impl Netns {
    pub fn open(path: &Path) -> Result<Self, ShieldError> {
        File::open(path)
            .map(Netns::Handle)
            .map_err(|source| ShieldError::Io {
                what: format!("open network namespace {}", path.display()),
                source,
            })
    }
}

/// The nft binary, by absolute path (hooks run with an empty environment).
pub struct Nft {
    pub program: PathBuf,
}

impl Nft {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Nft {
            program: program.into(),
        }
    }

    fn command(&self, netns: &Netns) -> Command {
        match netns {
            Netns::Handle(file) => {
                let mut cmd = Command::new(&self.program);
                cmd.env_clear();
                let fd = file.as_raw_fd();
                // SAFETY: setns is async-signal-safe; the closure touches no allocator or lock.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                cmd
            }
            Netns::PodmanUnshare { podman, pid } => {
                // podman needs the user's environment (HOME, XDG_RUNTIME_DIR) to find its
                // user namespace; nsenter is named by path because PATH may be minimal.
                let nsenter = crate::podman::which("nsenter")
                    .unwrap_or_else(|| PathBuf::from("/usr/bin/nsenter"));
                let mut cmd = Command::new(podman);
                cmd.arg("unshare")
                    .arg(nsenter)
                    .arg(format!("--net=/proc/{pid}/ns/net"))
                    .arg("--")
                    .arg(&self.program);
                cmd
            }
        }
    }

    /// Run nft with `args` (and `script` on stdin) inside `netns`; return its stdout.
    pub fn run(
        &self,
        netns: &Netns,
        args: &[&str],
        script: Option<&str>,
    ) -> Result<String, ShieldError> {
        let mut cmd = self.command(netns);
        cmd.args(args)
            .stdin(if script.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ShieldError::NftMissing {
                    path: self.program.clone(),
                }
            } else {
                ShieldError::Io {
                    what: format!("run {}", self.program.display()),
                    source,
                }
            }
        })?;
        if let Some(script) = script {
            // Take stdin so it is closed (EOF for nft) when this block ends.
            let mut stdin = child.stdin.take().expect("stdin is piped");
            stdin
                .write_all(script.as_bytes())
                .map_err(|source| ShieldError::Io {
                    what: "write the ruleset to nft".into(),
                    source,
                })?;
        }
        let out = child.wait_with_output().map_err(|source| ShieldError::Io {
            what: format!("wait for {}", self.program.display()),
            source,
        })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(ShieldError::NftFailed {
                status: out.status.to_string(),
                stderr: stderr.lines().next().unwrap_or("").trim().to_owned(),
            });
        }
        String::from_utf8(out.stdout).map_err(|_| ShieldError::NftFailed {
            status: "ok".into(),
            stderr: "nft printed non-UTF-8 output".into(),
        })
    }

    /// Apply the whole ruleset in a netns that should have no terok table yet (a new
    /// container netns), and verify what the kernel now holds. Should a table be there after
    /// all (the hook fired twice), the mismatch is caught and the table replaced.
    pub fn apply_fresh(&self, netns: &Netns, spec: &RulesetSpec) -> Result<(), ShieldError> {
        self.run(netns, &["-f", "-"], Some(&ruleset::render(spec, false)))?;
        match self.verify(netns, spec) {
            Ok(()) => Ok(()),
            Err(ShieldError::Verify(first)) => {
                tracing::warn!("fresh apply did not verify ({first}); replacing the table");
                self.apply(netns, spec)
            }
            Err(e) => Err(e),
        }
    }

    /// Replace the whole ruleset (whatever terok table exists) and verify.
    pub fn apply(&self, netns: &Netns, spec: &RulesetSpec) -> Result<(), ShieldError> {
        self.run(netns, &["-f", "-"], Some(&ruleset::render(spec, true)))?;
        self.verify(netns, spec)
    }

    /// Replace the content of the four sets in one transaction, then verify.
    pub fn update_sets(&self, netns: &Netns, spec: &RulesetSpec) -> Result<(), ShieldError> {
        self.run(netns, &["-f", "-"], Some(&ruleset::set_contents(spec)))?;
        self.verify(netns, spec)
    }

    /// The live table as JSON, or `None` when it does not exist.
    pub fn list_table(&self, netns: &Netns) -> Result<Option<Value>, ShieldError> {
        let out = self.run(netns, &["-j", "list", "ruleset"], None)?;
        let json: Value = serde_json::from_str(&out)
            .map_err(|e| ShieldError::Verify(format!("nft -j printed invalid JSON: {e}")))?;
        let has_table = LiveTable::new(&json).table_exists();
        Ok(has_table.then_some(json))
    }

    /// Read the ruleset back and check it against `spec`.
    pub fn verify(&self, netns: &Netns, spec: &RulesetSpec) -> Result<(), ShieldError> {
        let json = self
            .list_table(netns)?
            .ok_or_else(|| ShieldError::Verify(format!("table inet {TABLE} is missing")))?;
        LiveTable::new(&json).check(spec)
    }
}

/// A read-only view of `nft -j list ruleset` output, restricted to our table.
pub struct LiveTable<'a> {
    objects: Vec<&'a Value>,
}

fn ours(obj: &Value) -> bool {
    obj.get("family").and_then(Value::as_str) == Some("inet")
        && obj.get("table").and_then(Value::as_str) == Some(TABLE)
}

impl<'a> LiveTable<'a> {
    pub fn new(json: &'a Value) -> Self {
        let objects = json
            .get("nftables")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        LiveTable { objects }
    }

    fn of_kind(&self, kind: &str) -> impl Iterator<Item = &'a Value> + '_ {
        let kind = kind.to_owned();
        self.objects.iter().filter_map(move |o| o.get(&kind))
    }

    pub fn table_exists(&self) -> bool {
        self.of_kind("table").any(|t| {
            t.get("family").and_then(Value::as_str) == Some("inet")
                && t.get("name").and_then(Value::as_str) == Some(TABLE)
        })
    }

    pub fn chain(&self, name: &str) -> Option<&'a Value> {
        self.of_kind("chain")
            .find(|c| ours(c) && c.get("name").and_then(Value::as_str) == Some(name))
    }

    pub fn rules(&self, chain: &str) -> Vec<&'a Value> {
        self.of_kind("rule")
            .filter(|r| ours(r) && r.get("chain").and_then(Value::as_str) == Some(chain))
            .collect()
    }

    pub fn set(&self, name: &str) -> Option<&'a Value> {
        self.of_kind("set")
            .find(|s| ours(s) && s.get("name").and_then(Value::as_str) == Some(name))
    }

    /// The elements of a set as canonical networks.
    pub fn set_elements(&self, name: &str) -> Option<BTreeSet<IpNet>> {
        let set = self.set(name)?;
        let elems = set.get("elem").and_then(Value::as_array);
        let mut out = BTreeSet::new();
        for e in elems.into_iter().flatten() {
            // Elements carrying options come wrapped as {"elem": {"val": …}}.
            let e = e.get("elem").and_then(|x| x.get("val")).unwrap_or(e);
            let net = if let Some(s) = e.as_str() {
                super::profiles::parse_net(s)
            } else if let Some(p) = e.get("prefix") {
                let addr = p.get("addr").and_then(Value::as_str).unwrap_or("");
                let len = p.get("len").and_then(Value::as_u64).unwrap_or(0);
                super::profiles::parse_net(&format!("{addr}/{len}"))
            } else {
                None
            };
            out.insert(net?);
        }
        Some(out)
    }

    /// The shield mode the live output chain implements, if it is ours at all.
    pub fn mode(&self) -> Option<Mode> {
        let policy = self.chain("output")?.get("policy")?.as_str()?;
        let rules = self.rules("output");
        let last = rules.last()?.to_string();
        match policy {
            "drop" if last.contains("TEROK_SHIELD_BLOCKED") => Some(Mode::Up),
            "drop" if last.contains("TEROK_SHIELD_BYPASS") => Some(Mode::Down),
            _ => None,
        }
    }

    /// Structural check of the live table against what we applied.
    pub fn check(&self, spec: &RulesetSpec) -> Result<(), ShieldError> {
        let fail = |msg: String| Err(ShieldError::Verify(msg));
        for (name, hook) in [("output", "output"), ("input", "input")] {
            let Some(chain) = self.chain(name) else {
                return fail(format!("chain {name} is missing"));
            };
            if chain.get("hook").and_then(Value::as_str) != Some(hook)
                || chain.get("type").and_then(Value::as_str) != Some("filter")
                || chain.get("policy").and_then(Value::as_str) != Some("drop")
            {
                return fail(format!(
                    "chain {name} is not a drop-policy filter on the {hook} hook"
                ));
            }
        }
        let (allow4, allow6) = ruleset::split_families(&spec.allow);
        let (deny4, deny6) = ruleset::split_families(&spec.deny);
        for (name, ty, want) in [
            ("allow_v4", "ipv4_addr", allow4),
            ("allow_v6", "ipv6_addr", allow6),
            ("deny_v4", "ipv4_addr", deny4),
            ("deny_v6", "ipv6_addr", deny6),
        ] {
            let Some(set) = self.set(name) else {
                return fail(format!("set {name} is missing"));
            };
            let interval = set
                .get("flags")
                .and_then(Value::as_array)
                .is_some_and(|f| f.iter().any(|x| x == "interval"));
            if set.get("type").and_then(Value::as_str) != Some(ty) || !interval {
                return fail(format!("set {name} is not an interval set of {ty}"));
            }
            let have = self.set_elements(name).unwrap_or_default();
            let want: BTreeSet<IpNet> = want.into_iter().collect();
            if have != want {
                return fail(format!(
                    "set {name} holds {} element(s), expected {}",
                    have.len(),
                    want.len()
                ));
            }
        }
        let want_out = ruleset::output_rules(spec).len();
        let out = self.rules("output");
        if out.len() != want_out {
            return fail(format!(
                "output chain has {} rules, expected {want_out}",
                out.len()
            ));
        }
        if self.mode() != Some(spec.mode) {
            return fail(format!(
                "output chain does not end in the {:?}-mode rule",
                spec.mode
            ));
        }
        let input = self.rules("input");
        if input.len() != ruleset::input_rules().len()
            || !input
                .last()
                .is_some_and(|r| r.to_string().contains("\"drop\""))
        {
            return fail("input chain does not end in drop".into());
        }
        Ok(())
    }
}
