//! End-to-end tests of the shield with real podman containers, real nft rulesets read back
//! from the kernel and test hosts in network namespaces of our own.

use std::net::IpAddr;

use serde_json::Value;
use terok_e2e::*;

const PORT: u16 = 8080;

/// Acceptance 1 (IPv4): allowlisted test host reachable, the other refused with ICMP
/// admin-prohibited (not a timeout).
#[test]
fn allowlisted_host_reachable_other_refused_ipv4() {
    let _serial = serial();
    let env = Env::new();
    let host = TestHost::new(&env.id);
    let _a = host.serve(host.v4[0], PORT);
    let _b = host.serve(host.v4[1], PORT);
    env.write_profile("t", &[&host.v4[0].to_string()]);
    let name = env.name("v4");
    let script = format!(
        "nc -vz -w 5 {a} {PORT} 2>&1; echo rc=$?; nc -vz -w 5 {b} {PORT} 2>&1; echo rc=$?",
        a = host.v4[0],
        b = host.v4[1]
    );
    let out = run(env.terok_run().args([
        "run",
        &name,
        "--profiles",
        "t",
        "--",
        "--rm",
        IMAGE,
        "sh",
        "-c",
        &script,
    ]));
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.contains(&"rc=0"),
        "allowed host not reachable: {text}"
    );
    assert!(
        text.contains(&format!(
            "connect to {} port {PORT} (tcp) failed: No route to host",
            host.v4[1]
        )),
        "{text}"
    );
    assert_eq!(text.matches("rc=1").count(), 1, "{text}");
}

/// Acceptance 1 (IPv6), on a dual-stack podman network of the test's own.
#[test]
fn allowlisted_host_reachable_other_refused_ipv6() {
    let _serial = serial();
    let env = Env::new();
    let host = TestHost::new(&env.id);
    let _a = host.serve(host.v6[0], PORT);
    let _b = host.serve(host.v6[1], PORT);
    let n = u32::from_str_radix(&env.id[env.id.len() - 4..], 16).unwrap();
    let net = env.dual_stack_network(
        &format!("10.{}.{}.0/24", 150 + (n >> 8) % 40, n & 0xff),
        &format!("fd7f:{:x}::/64", n),
    );
    env.write_profile("t6", &[&format!("{}/128", host.v6[0])]);
    let name = env.start_sleeper("v6", "t6", &["--network", &net]);
    assert_eq!(
        connect_from(&env, &name, host.v6[0], PORT),
        Connect::Connected
    );
    assert_eq!(
        connect_from(&env, &name, host.v6[1], PORT),
        Connect::Prohibited
    );
    // IPv4 to the same test host stays closed: the allowlist is per address.
    assert_eq!(
        connect_from(&env, &name, host.v4[0], PORT),
        Connect::Prohibited
    );
}

fn rules_of<'a>(ruleset: &'a Value, chain: &str) -> Vec<&'a Value> {
    ruleset["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("rule"))
        .filter(|r| r["chain"] == chain && r["table"] == "terok_shield")
        .collect()
}

fn position(rules: &[&Value], needle: &str) -> usize {
    rules
        .iter()
        .position(|r| r["expr"].to_string().contains(needle))
        .unwrap_or_else(|| panic!("no rule contains {needle}"))
}

/// Acceptance 2: the ruleset read back from the container's netns is DESIGN's; the host
/// netns ruleset is unchanged by starting and stopping the container.
#[test]
fn ruleset_matches_design_and_host_is_untouched() {
    let _serial = serial();
    let env = Env::new();
    env.write_profile("t", &["192.0.2.10", "198.51.100.0/24", "2001:db8::/48"]);
    let before = host_ruleset();
    let name = env.start_sleeper("rules", "t", &[]);
    run_ok(env.admin().args(["shield", "deny", &name, "203.0.113.9"]));
    let during = host_ruleset();
    assert!(
        !during.contains("terok_shield"),
        "terok table in the host netns:\n{during}"
    );
    let rs = env.container_ruleset(&name);
    let objects = rs["nftables"].as_array().unwrap();
    let tables: Vec<&Value> = objects.iter().filter_map(|o| o.get("table")).collect();
    assert_eq!(
        tables.len(),
        1,
        "only our table lives in the container netns"
    );
    assert_eq!(tables[0]["family"], "inet");
    assert_eq!(tables[0]["name"], "terok_shield");
    for (chain, hook) in [("output", "output"), ("input", "input")] {
        let c = objects
            .iter()
            .filter_map(|o| o.get("chain"))
            .find(|c| c["name"] == chain)
            .unwrap();
        assert_eq!(
            (c["hook"].as_str(), c["policy"].as_str(), c["type"].as_str()),
            (Some(hook), Some("drop"), Some("filter"))
        );
    }
    let set = |name: &str| {
        objects
            .iter()
            .filter_map(|o| o.get("set"))
            .find(|s| s["name"] == name)
            .unwrap()
            .clone()
    };
    for (name, ty) in [
        ("allow_v4", "ipv4_addr"),
        ("allow_v6", "ipv6_addr"),
        ("deny_v4", "ipv4_addr"),
        ("deny_v6", "ipv6_addr"),
    ] {
        let s = set(name);
        assert_eq!(s["type"], ty);
        assert!(
            s["flags"].to_string().contains("interval"),
            "{name} not an interval set"
        );
    }
    let allow4 = set("allow_v4")["elem"].to_string();
    assert!(
        allow4.contains("192.0.2.10") && allow4.contains("198.51.100.0"),
        "{allow4}"
    );
    assert!(set("allow_v6")["elem"].to_string().contains("2001:db8::"));
    assert!(set("deny_v4")["elem"].to_string().contains("203.0.113.9"));

    let out = rules_of(&rs, "output");
    assert!(
        out[0]["expr"].to_string().contains("\"lo\""),
        "loopback first"
    );
    let deny = position(&out, "@deny_v4");
    let est = position(&out, "established");
    let allow = position(&out, "@allow_v4");
    let private = position(&out, "10.0.0.0");
    assert!(
        deny < est && est < allow && allow < private,
        "order deny < established < allow < private"
    );
    assert!(position(&out, "@deny_v6") < allow && position(&out, "@allow_v6") < private);
    for range in [
        "172.16.0.0",
        "192.168.0.0",
        "169.254.0.0",
        "fc00::",
        "fe80::",
    ] {
        assert!(
            position(&out, range) > allow,
            "{range} after the allow sets"
        );
    }
    assert!(
        position(&out, "nd-neighbor-solicit") < private,
        "IPv6 neighbour discovery allowed"
    );
    let last = out.last().unwrap()["expr"].to_string();
    assert!(
        last.contains("admin-prohibited") && last.contains("icmpx"),
        "terminal reject: {last}"
    );
    assert!(
        last.contains("TEROK_SHIELD_BLOCKED") && last.contains("\"group\":100"),
        "terminal NFLOG: {last}"
    );
    let input = rules_of(&rs, "input");
    assert!(input[0]["expr"].to_string().contains("\"lo\""));
    assert!(input[1]["expr"].to_string().contains("established"));
    assert!(input.last().unwrap()["expr"].to_string().contains("drop"));

    // `shield rules` shows the same live table.
    let text = run_ok(env.admin().args(["shield", "rules", &name]));
    assert!(
        text.contains("table inet terok_shield")
            && text.contains("reject with icmpx admin-prohibited"),
        "{text}"
    );

    run_ok(env.podman().args(["rm", "-f", "-t", "0", &name]));
    assert_eq!(
        before,
        host_ruleset(),
        "host ruleset changed by starting and stopping the container"
    );
}

/// Acceptance 3: with nft unavailable to the hook the container does not start, and the
/// reason is named.
#[test]
fn fails_closed_without_nft() {
    let _serial = serial();
    let env = Env::with_nft("/nonexistent/nft");
    env.write_profile("t", &["192.0.2.10"]);
    let marker = env.path("marker");
    std::fs::create_dir_all(&marker).unwrap();
    let name = env.name("nonft");
    let mount = format!("{}:/m", marker.display());
    let out = run(env.terok_run().args([
        "run",
        &name,
        "--profiles",
        "t",
        "--",
        "--rm",
        "-v",
        &mount,
        IMAGE,
        "touch",
        "/m/ran",
    ]));
    assert_ne!(out.status.code(), Some(0));
    let err = stderr(&out);
    assert!(
        err.contains("nft not found at /nonexistent/nft"),
        "reason not named: {err}"
    );
    assert!(!marker.join("ran").exists(), "the container's command ran");

    // Plain `podman run $(terok-run prepare …)`: podman's own error points at the reason.
    let flags = env.prepare_flags(&name, &["--profiles", "t"]);
    let out = run(env
        .podman()
        .arg("run")
        .arg("--rm")
        .args(&flags)
        .args(["-v", &mount, IMAGE, "touch", "/m/ran"]));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("terok-hook precreate") && err.contains("hook.log"),
        "{err}"
    );
    assert!(!marker.join("ran").exists());
    let log = std::fs::read_to_string(env.state_dir().join("logs/hook.log")).unwrap();
    assert!(log.contains("nft not found at /nonexistent/nft"), "{log}");
}

/// Acceptance 3: a corrupt sidecar keeps the container from starting.
#[test]
fn fails_closed_with_corrupt_sidecar() {
    let _serial = serial();
    let env = Env::new();
    env.write_profile("t", &["192.0.2.10"]);
    let name = env.name("corrupt");
    let flags = env.prepare_flags(&name, &["--profiles", "t"]);
    let sidecar = env.sidecar(&name);
    std::fs::write(&sidecar, b"{\"version\": 1, \"container_name\": ").unwrap();
    let out = run(env
        .podman()
        .arg("run")
        .arg("--rm")
        .args(&flags)
        .args([IMAGE, "true"]));
    assert!(
        !out.status.success(),
        "container started with a corrupt sidecar"
    );
    let reason = env.hook_error(&name);
    assert!(reason.contains("corrupt"), "{reason}");
}

/// Acceptance 4: live allow and deny, without a restart, and both survive stop + start.
#[test]
fn live_allow_and_deny_survive_restart() {
    let _serial = serial();
    let env = Env::new();
    let host = TestHost::new(&env.id);
    let _a = host.serve(host.v4[0], PORT);
    let _b = host.serve(host.v4[1], PORT);
    env.write_profile("t", &[&host.v4[0].to_string()]);
    let name = env.start_sleeper("live", "t", &[]);
    let blocked = host.v4[1];
    assert_eq!(
        connect_from(&env, &name, blocked, PORT),
        Connect::Prohibited
    );

    let out = run_ok(
        env.admin()
            .args(["shield", "allow", &name, &blocked.to_string()]),
    );
    assert!(out.contains("Allowed"), "{out}");
    assert_eq!(connect_from(&env, &name, blocked, PORT), Connect::Connected);
    restart(&env, &name);
    assert_eq!(
        connect_from(&env, &name, blocked, PORT),
        Connect::Connected,
        "allow lost on restart"
    );

    run_ok(
        env.admin()
            .args(["shield", "deny", &name, &blocked.to_string()]),
    );
    assert_eq!(
        connect_from(&env, &name, blocked, PORT),
        Connect::Prohibited
    );
    // A deny also beats the profile's allowlist.
    run_ok(
        env.admin()
            .args(["shield", "deny", &name, &host.v4[0].to_string()]),
    );
    assert_eq!(
        connect_from(&env, &name, host.v4[0], PORT),
        Connect::Prohibited
    );
    restart(&env, &name);
    assert_eq!(
        connect_from(&env, &name, blocked, PORT),
        Connect::Prohibited,
        "deny lost on restart"
    );
    assert_eq!(
        connect_from(&env, &name, host.v4[0], PORT),
        Connect::Prohibited
    );

    let status: Value = serde_json::from_str(&run_ok(
        env.admin().args(["shield", "status", &name, "--json"]),
    ))
    .unwrap();
    assert_eq!(status["state"], "up");
    assert!(status["deny"].to_string().contains(&blocked.to_string()));
}

fn restart(env: &Env, name: &str) {
    run_ok(env.podman().args(["stop", "-t", "0", name]));
    run_ok(env.podman().args(["start", name]));
}

/// Acceptance 5: a container without our annotation is untouched by our hooks.
#[test]
fn unannotated_container_is_untouched() {
    let _serial = serial();
    let env = Env::new();
    let host = TestHost::new(&env.id);
    let _b = host.serve(host.v4[1], PORT);
    let name = env.name("plain");
    run_ok(
        env.podman()
            .args(["run", "-d", "--name", &name, IMAGE, "sleep", "infinity"]),
    );
    let rs = env.container_ruleset(&name);
    assert_eq!(
        rs["nftables"].as_array().unwrap().len(),
        1,
        "only metainfo expected: {rs}"
    );
    assert_eq!(
        connect_from(&env, &name, host.v4[1], PORT),
        Connect::Connected
    );
    run_ok(env.podman().args(["rm", "-f", "-t", "0", &name]));
    assert!(
        !env.state_dir().join("logs/hook.log").exists(),
        "the hook ran for a foreign container"
    );
}

/// `--network host` with the shield on is refused before anything is written; a config
/// that sneaks a host-network container past terok-run is refused by the hook.
#[test]
fn host_network_is_refused() {
    let _serial = serial();
    let env = Env::new();
    env.write_profile("t", &["192.0.2.10"]);
    let name = env.name("hostnet");
    let out = run(env.terok_run().args([
        "run",
        &name,
        "--profiles",
        "t",
        "--",
        "--network=host",
        IMAGE,
        "true",
    ]));
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("--network host is refused"),
        "{}",
        stderr(&out)
    );
    assert!(!env.sidecar(&name).exists());

    let flags = env.prepare_flags(&name, &["--profiles", "t"]);
    let out = run(env.podman().arg("run").arg("--rm").args(&flags).args([
        "--network",
        "host",
        IMAGE,
        "true",
    ]));
    assert!(
        !out.status.success(),
        "host-network container started shielded-in-name-only"
    );
    let reason = env.hook_error(&name);
    assert!(reason.contains("network namespace"), "{reason}");
}

/// A resolver address the container may use is taken from its own resolv.conf; here: the
/// DNS rule only opens port 53 of the resolvers podman gave the container.
#[test]
fn dns_is_open_only_to_the_containers_resolvers() {
    let _serial = serial();
    let env = Env::new();
    let host = TestHost::new(&env.id);
    let _dns = host.serve(host.v4[0], 53);
    env.write_profile("t", &[]);
    let name = env.name("dns");
    let dns: IpAddr = host.v4[0];
    let out = run(env.terok_run().args([
        "run", &name, "--profiles", "t", "--", "--rm", "--dns", &dns.to_string(), IMAGE, "sh", "-c",
        &format!("nc -vz -w 5 {dns} 53 2>&1; echo rc=$?; nc -vz -w 5 {dns} 54 2>&1; echo rc=$?; nc -vz -w 5 {} 53 2>&1; echo rc=$?", host.v4[1]),
    ]));
    let text = stdout(&out);
    assert!(text.contains("rc=0"), "resolver unreachable on 53: {text}");
    assert_eq!(text.matches("No route to host").count(), 2, "{text}");
}

/// Acceptance 7: profile domains are resolved when the container is prepared — here by a
/// DNS server the test runs on loopback (dnsmasq), seen through a private mount namespace's
/// resolv.conf — and only the chosen profiles' names are looked up.
#[test]
fn profile_domains_resolve_through_the_tests_own_dns_server() {
    let _serial = serial();
    let env = Env::new();
    let host = TestHost::new(&env.id);
    let _a = host.serve(host.v4[0], PORT);
    let listen = "127.77.0.1";
    let log = env.path("dnsmasq.log");
    let mut dns = std::process::Command::new("/usr/sbin/dnsmasq")
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--port=53",
            "--log-queries",
        ])
        .arg(format!("--listen-address={listen}"))
        .arg(format!("--log-facility={}", log.display()))
        .arg(format!("--address=/allowed.terok.test/{}", host.v4[0]))
        .arg("--address=/unused.terok.test/192.0.2.99")
        .spawn()
        .unwrap();
    std::fs::write(env.path("resolv.conf"), format!("nameserver {listen}\n")).unwrap();
    env.write_profile("named", &["allowed.terok.test", "missing.terok.test"]);
    env.write_profile("other", &["unused.terok.test"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let name = env.name("named");
    // terok-run in a mount namespace whose /etc/resolv.conf names only our server.
    let mut cmd = env.terok_run();
    cmd.arg("prepare").arg(&name).args(["--profiles", "named"]);
    let script = format!(
        "mount --bind {} /etc/resolv.conf && exec \"$@\"",
        env.path("resolv.conf").display()
    );
    let mut wrapped = std::process::Command::new("unshare");
    wrapped.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ]);
    wrapped.arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            wrapped.env(k, v);
        }
    }
    let out = run(&mut wrapped);
    let _ = dns.kill();
    let _ = dns.wait();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("missing.terok.test does not resolve"),
        "{}",
        stderr(&out)
    );
    let sidecar: Value =
        serde_json::from_slice(&std::fs::read(env.sidecar(&name)).unwrap()).unwrap();
    assert_eq!(
        sidecar["shield"]["allow"],
        serde_json::json!([format!("{}/32", host.v4[0])])
    );
    let queries = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(queries.contains("allowed.terok.test"), "{queries}");
    assert!(
        !queries.contains("unused.terok.test"),
        "a name of an unchosen profile was looked up"
    );

    // The container started from that state reaches the resolved test host.
    let out = run(env
        .podman()
        .arg("run")
        .arg("--rm")
        .args(sidecar_flags(&env, &name))
        .args([
            IMAGE,
            "nc",
            "-vz",
            "-w",
            "5",
            &host.v4[0].to_string(),
            &PORT.to_string(),
        ]));
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

/// The podman flags of an already prepared container (what prepare printed).
fn sidecar_flags(env: &Env, name: &str) -> Vec<String> {
    vec![
        "--cap-drop".into(),
        "NET_ADMIN,NET_RAW".into(),
        "--name".into(),
        name.to_owned(),
        "--annotation".into(),
        format!("terok.sandbox.sidecar={}", env.sidecar(name).display()),
    ]
}

/// The hook's apply path against a real kernel netns (no podman): applying twice replaces
/// the table instead of duplicating rules, a live set update verifies, and a missing nft is
/// named.
#[test]
fn nft_apply_is_idempotent_and_verified_in_a_real_netns() {
    use terok::shield::nft::{Netns, Nft};
    use terok::shield::ruleset::{Mode, RulesetSpec};
    require_e2e();
    let ns = format!("tk-nft-{}", unique());
    run_ok(std::process::Command::new("ip").args(["netns", "add", &ns]));
    let path = std::path::PathBuf::from(format!("/run/netns/{ns}"));
    let result = std::panic::catch_unwind(|| {
        let netns = Netns::open(&path).unwrap();
        let nft = Nft::new("/usr/sbin/nft");
        let mut spec = RulesetSpec {
            mode: Mode::Up,
            allow: vec![
                "10.1.0.0/16".parse().unwrap(),
                "10.1.2.3/32".parse().unwrap(),
            ],
            deny: vec![],
            dns: vec!["10.0.2.3".parse().unwrap()],
        };
        nft.apply_fresh(&netns, &spec).unwrap();
        nft.apply_fresh(&netns, &spec).unwrap();
        let json = nft.list_table(&netns).unwrap().unwrap();
        let rules = json["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o.get("rule").is_some())
            .count();
        assert_eq!(
            rules,
            terok::shield::ruleset::output_rules(&spec).len()
                + terok::shield::ruleset::input_rules().len()
        );
        spec.deny.push("10.1.2.3/32".parse().unwrap());
        nft.update_sets(&netns, &spec).unwrap();
        spec.mode = Mode::Down;
        nft.apply(&netns, &spec).unwrap();
        let err = Nft::new("/nonexistent/nft")
            .apply_fresh(&netns, &spec)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nft not found at /nonexistent/nft"), "{err}");
    });
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &ns])
        .status();
    result.unwrap();
}
