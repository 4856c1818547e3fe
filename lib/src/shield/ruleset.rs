//! The nftables ruleset of one container, as nft script text (what `shield rules` shows and
//! what `nft -f -` applies atomically inside the container's network namespace).
//!
//! Output chain, policy drop, in this order: loopback; deny sets (before everything else, so
//! a denied address stays denied, even on an established flow); established/related; IPv6
//! neighbour discovery; DNS to the container's own resolvers; allow sets; private and
//! link-local ranges (rejected, logged as PRIVATE); everything else rejected with
//! `icmpx admin-prohibited` and logged (NFLOG group 100). Input chain: loopback, established,
//! neighbour discovery, drop.

use std::fmt::Write;
use std::net::IpAddr;

use ipnet::IpNet;

pub const TABLE: &str = "terok_shield";
pub const NFLOG_GROUP: u16 = 100;
pub const REJECT: &str = "reject with icmpx admin-prohibited";

/// Private and link-local ranges, rejected unless allowlisted.
pub const PRIVATE_V4: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
];
pub const PRIVATE_V6: &[&str] = &["fc00::/7", "fe80::/10"];

/// Whether the output chain enforces the allowlist or only logs (bypass, `shield down`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Up,
    Down,
}

/// Everything the ruleset depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulesetSpec {
    pub mode: Mode,
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    /// The container's resolvers, reachable on port 53 only.
    pub dns: Vec<IpAddr>,
}

/// Split and aggregate a list of networks into non-overlapping v4 and v6 element lists
/// (nft interval sets refuse overlapping elements).
pub fn split_families(nets: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    let merged = IpNet::aggregate(&nets.to_vec());
    merged.into_iter().partition(|n| matches!(n, IpNet::V4(_)))
}

fn elements(nets: &[IpNet]) -> String {
    nets.iter()
        .map(|n| {
            if n.prefix_len() == n.max_prefix_len() {
                n.addr().to_string()
            } else {
                n.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn log(prefix: &str) -> String {
    format!("log prefix \"TEROK_SHIELD_{prefix}: \" group {NFLOG_GROUP}")
}

/// Element statements that replace the content of all four sets in one transaction.
pub fn set_contents(spec: &RulesetSpec) -> String {
    let (allow4, allow6) = split_families(&spec.allow);
    let (deny4, deny6) = split_families(&spec.deny);
    let mut out = String::new();
    for (set, nets) in [
        ("allow_v4", &allow4),
        ("allow_v6", &allow6),
        ("deny_v4", &deny4),
        ("deny_v6", &deny6),
    ] {
        let _ = writeln!(out, "flush set inet {TABLE} {set}");
        if !nets.is_empty() {
            let _ = writeln!(
                out,
                "add element inet {TABLE} {set} {{ {} }}",
                elements(nets)
            );
        }
    }
    out
}

/// The output chain's rules, one per line, in evaluation order.
pub fn output_rules(spec: &RulesetSpec) -> Vec<String> {
    let mut rules = vec![
        "oifname \"lo\" accept".to_owned(),
        format!("ip daddr @deny_v4 {} counter {REJECT}", log("DENIED")),
        format!("ip6 daddr @deny_v6 {} counter {REJECT}", log("DENIED")),
        "ct state established,related accept".to_owned(),
        "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld2-listener-report } accept".to_owned(),
    ];
    for dns in &spec.dns {
        let fam = if dns.is_ipv4() { "ip" } else { "ip6" };
        for proto in ["udp", "tcp"] {
            rules.push(format!("{fam} daddr {dns} {proto} dport 53 accept"));
        }
    }
    match spec.mode {
        Mode::Up => {
            rules.push(format!(
                "ip daddr @allow_v4 {} counter accept",
                log("ALLOWED")
            ));
            rules.push(format!(
                "ip6 daddr @allow_v6 {} counter accept",
                log("ALLOWED")
            ));
            push_private(&mut rules);
            rules.push(format!("{} counter {REJECT}", log("BLOCKED")));
        }
        Mode::Down => {
            push_private(&mut rules);
            rules.push(format!("ct state new {} counter accept", log("BYPASS")));
        }
    }
    rules
}

fn push_private(rules: &mut Vec<String>) {
    rules.push(format!(
        "ip daddr {{ {} }} {} counter {REJECT}",
        PRIVATE_V4.join(", "),
        log("PRIVATE")
    ));
    rules.push(format!(
        "ip6 daddr {{ {} }} {} counter {REJECT}",
        PRIVATE_V6.join(", "),
        log("PRIVATE")
    ));
}

pub fn input_rules() -> Vec<String> {
    vec![
        "iifname \"lo\" accept".to_owned(),
        "ct state established,related accept".to_owned(),
        "icmpv6 type { nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert } accept"
            .to_owned(),
        "drop".to_owned(),
    ]
}

/// The whole ruleset as one nft script, applied by nft as a single transaction. Set
/// elements are declared inline: a separate `add element` on an interval set costs nft a
/// kernel round trip and a grace period (~13 ms here) that matter on the start path.
///
/// With `replace`, any previous terok table in the netns goes first (`add` + `delete` is the
/// idiom that works whether or not it exists); a fresh container netns has none, and the
/// deletion costs another grace period, so the hook only replaces when it must.
pub fn render(spec: &RulesetSpec, replace: bool) -> String {
    let (allow4, allow6) = split_families(&spec.allow);
    let (deny4, deny6) = split_families(&spec.deny);
    let mut s = String::with_capacity(2048);
    if replace {
        let _ = writeln!(s, "add table inet {TABLE}\ndelete table inet {TABLE}");
    }
    let _ = writeln!(s, "table inet {TABLE} {{");
    for (set, ty, nets) in [
        ("allow_v4", "ipv4_addr", &allow4),
        ("allow_v6", "ipv6_addr", &allow6),
        ("deny_v4", "ipv4_addr", &deny4),
        ("deny_v6", "ipv6_addr", &deny6),
    ] {
        let _ = write!(s, "  set {set} {{ type {ty}; flags interval;");
        if !nets.is_empty() {
            let _ = write!(s, " elements = {{ {} }};", elements(nets));
        }
        let _ = writeln!(s, " }}");
    }
    let _ = writeln!(s, "  chain output {{");
    let _ = writeln!(
        s,
        "    type filter hook output priority filter; policy drop;"
    );
    for rule in output_rules(spec) {
        let _ = writeln!(s, "    {rule}");
    }
    let _ = writeln!(s, "  }}\n  chain input {{");
    let _ = writeln!(
        s,
        "    type filter hook input priority filter; policy drop;"
    );
    for rule in input_rules() {
        let _ = writeln!(s, "    {rule}");
    }
    let _ = writeln!(s, "  }}\n}}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mode: Mode) -> RulesetSpec {
        RulesetSpec {
            mode,
            allow: vec![
                "10.1.0.0/16".parse().unwrap(),
                "10.1.2.3/32".parse().unwrap(),
                "2001:db8::1/128".parse().unwrap(),
            ],
            deny: vec!["192.0.2.7/32".parse().unwrap()],
            dns: vec!["10.255.255.53".parse().unwrap()],
        }
    }

    #[test]
    fn enforce_order_is_deny_then_established_then_allow_then_private_then_reject() {
        let rules = output_rules(&spec(Mode::Up));
        let pos = |needle: &str| rules.iter().position(|r| r.contains(needle)).unwrap();
        assert_eq!(pos("oifname \"lo\""), 0);
        assert!(pos("@deny_v4") < pos("established"));
        assert!(pos("established") < pos("@allow_v4"));
        assert!(pos("dport 53") < pos("@allow_v4"));
        assert!(pos("@allow_v6") < pos("10.0.0.0/8"));
        assert!(pos("fc00::/7") < rules.len() - 1);
        assert!(
            rules.last().unwrap().contains("BLOCKED") && rules.last().unwrap().ends_with(REJECT)
        );
    }

    #[test]
    fn bypass_still_denies_and_logs() {
        let rules = output_rules(&spec(Mode::Down));
        assert!(rules.iter().any(|r| r.contains("@deny_v4")));
        assert!(!rules.iter().any(|r| r.contains("@allow_v4")));
        assert!(rules.last().unwrap().contains("BYPASS"));
    }

    #[test]
    fn overlapping_allow_entries_are_merged() {
        let text = render(&spec(Mode::Up), false);
        assert!(text.contains(
            "set allow_v4 { type ipv4_addr; flags interval; elements = { 10.1.0.0/16 }; }"
        ));
        assert!(text.contains("elements = { 2001:db8::1 }"));
        assert!(
            text.contains(
                "set deny_v4 { type ipv4_addr; flags interval; elements = { 192.0.2.7 }; }"
            )
        );
        assert!(text.contains("set deny_v6 { type ipv6_addr; flags interval; }"));
        assert!(text.starts_with("table inet terok_shield {"));
        let sets = set_contents(&spec(Mode::Up));
        assert!(sets.contains("flush set inet terok_shield allow_v4\nadd element inet terok_shield allow_v4 { 10.1.0.0/16 }"));
        let replacing = render(&spec(Mode::Up), true);
        assert!(
            replacing.starts_with("add table inet terok_shield\ndelete table inet terok_shield\n")
        );
    }
}
