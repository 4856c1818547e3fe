//! Resolution of allowlisted domains to addresses, through the host's own resolver
//! (getaddrinfo). Only names from the chosen profiles or an explicit `shield allow|deny` are
//! ever looked up.

use std::net::{IpAddr, ToSocketAddrs};

use ipnet::IpNet;

use super::profiles::Entry;

/// Resolve one domain; an empty list when it does not resolve.
pub fn domain(name: &str) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    if let Ok(addrs) = (name, 0).to_socket_addrs() {
        for a in addrs {
            if !out.contains(&a.ip()) {
                out.push(a.ip());
            }
        }
    }
    out
}

/// Turn entries into networks, resolving the domains concurrently. Domains that do not
/// resolve are returned separately so the caller can warn about them.
pub fn entries(entries: &[Entry]) -> (Vec<IpNet>, Vec<String>) {
    let domains: Vec<&str> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Domain(d) => Some(d.as_str()),
            Entry::Net(_) => None,
        })
        .collect();
    let resolved: Vec<(&str, Vec<IpAddr>)> = std::thread::scope(|s| {
        let handles: Vec<_> = domains
            .iter()
            .map(|d| s.spawn(move || (*d, domain(d))))
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let mut nets = Vec::new();
    let mut unresolved = Vec::new();
    for entry in entries {
        match entry {
            Entry::Net(n) => nets.push(*n),
            Entry::Domain(d) => {
                let addrs = resolved
                    .iter()
                    .find(|(name, _)| name == d)
                    .map(|(_, a)| a.as_slice())
                    .unwrap_or_default();
                if addrs.is_empty() {
                    unresolved.push(d.clone());
                }
                nets.extend(addrs.iter().map(|a| IpNet::from(*a)));
            }
        }
    }
    nets.dedup();
    (nets, unresolved)
}
