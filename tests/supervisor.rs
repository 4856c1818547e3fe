//! Issue 4: the per-container supervisor with real podman containers: services listen on
//! the container's own loopback before its first process runs, a killed service child comes
//! back, and the supervisor ends with the container, with or without poststop.

use std::time::Duration;

use terok_e2e::*;

const HEALTH: &str = "curl -sS --max-time 5 http://127.0.0.1:9419/-/health";

fn scoped(env: &Env) -> Vec<String> {
    env.write_profile("t", &["192.0.2.10"]);
    ["--scope", "proj", "--profiles", "t"]
        .map(String::from)
        .to_vec()
}

fn supervisor_pids(env: &Env, name: &str) -> Vec<u32> {
    pids_with_arg(&env.sidecar(name).display().to_string())
}

/// Acceptance 7 and 5: the very first command of the container reaches the broker on its
/// loopback, with no retry, and the image holds nothing of ours (no socat, no terok files).
#[test]
fn services_listen_before_the_first_process_runs() {
    let _serial = serial();
    let env = Env::new();
    let flags = scoped(&env);
    let name = env.name("first");
    let script = format!(
        "{HEALTH}; echo; command -v socat || echo no-socat; ls /run/terok /usr/local/share/terok* 2>&1 | head -2"
    );
    let out = run(env
        .terok_run()
        .args(["run", &name])
        .args(&flags)
        .args(["--", "--rm", IMAGE, "sh", "-c", &script]));
    let text = stdout(&out);
    assert!(
        text.starts_with("{\"status\":\"ok\"}"),
        "broker not ready for the first command: {text}{}",
        stderr(&out)
    );
    assert!(text.contains("no-socat"), "{text}");
    assert!(
        text.contains("No such file or directory"),
        "terok files in the container: {text}"
    );
}

/// Acceptance 4: a killed broker child is back and serving; `podman kill` ends the
/// supervisor and its children, and so does a container whose poststop never runs.
#[test]
fn broker_child_restarts_and_supervisor_ends_with_the_container() {
    let _serial = serial();
    let env = Env::new();
    let flags = scoped(&env);
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let name = env.start_sleeper_with("restart", &flag_refs, &[]);
    assert!(eventually(Duration::from_secs(5), || supervisor_pids(
        &env, &name
    )
    .len()
        == 2));
    let child = *supervisor_pids(&env, &name)
        .iter()
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .windows(7)
                .any(|w| w == b"service")
        })
        .expect("a broker child");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(2), || {
            let pids = supervisor_pids(&env, &name);
            pids.len() == 2 && !pids.contains(&child)
        }),
        "the broker child did not come back within 2 s"
    );
    let out = env.exec(&name, HEALTH);
    assert!(
        stdout(&out).contains("\"ok\""),
        "restarted broker does not serve: {}",
        stderr(&out)
    );

    run_ok(env.podman().args(["kill", &name]));
    assert!(
        eventually(Duration::from_secs(5), || supervisor_pids(&env, &name)
            .is_empty()),
        "supervisor still running 5 s after podman kill: {:?}",
        supervisor_pids(&env, &name)
    );
}

#[test]
fn supervisor_ends_with_the_container_without_poststop() {
    let _serial = serial();
    let env = Env::new();
    // podman never runs our poststop for these containers.
    std::fs::remove_file(env.hooks_dir().join("terok-poststop.json")).unwrap();
    let flags = scoped(&env);
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let name = env.start_sleeper_with("nopost", &flag_refs, &[]);
    assert!(eventually(Duration::from_secs(5), || supervisor_pids(
        &env, &name
    )
    .len()
        == 2));
    run_ok(env.podman().args(["kill", &name]));
    assert!(
        eventually(Duration::from_secs(5), || supervisor_pids(&env, &name)
            .is_empty()),
        "supervisor outlived its container without poststop"
    );
}

/// Acceptance 6: `podman restart` comes back with a working broker (a new supervisor).
#[test]
fn restart_comes_back_supervised() {
    let _serial = serial();
    let env = Env::new();
    let flags = scoped(&env);
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let name = env.start_sleeper_with("podrestart", &flag_refs, &[]);
    assert!(stdout(&env.exec(&name, HEALTH)).contains("\"ok\""));
    let before = supervisor_pids(&env, &name);
    run_ok(env.podman().args(["restart", "-t", "0", &name]));
    let out = env.exec(&name, HEALTH);
    assert!(
        stdout(&out).contains("\"ok\""),
        "no broker after restart: {}",
        stderr(&out)
    );
    let after = supervisor_pids(&env, &name);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "old supervisor survived the restart"
    );
}

/// A container without a scope gets no supervisor at all (the shield-only fast path).
#[test]
fn no_scope_no_supervisor() {
    let _serial = serial();
    let env = Env::new();
    env.write_profile("t", &["192.0.2.10"]);
    let name = env.start_sleeper("plain", "t", &[]);
    assert!(supervisor_pids(&env, &name).is_empty());
    let out = env.exec(&name, HEALTH);
    assert!(
        !out.status.success(),
        "something listens on 9419 without a scope"
    );
}
