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

/// A detached scoped container (shield + supervisor + broker) running `sleep`.
fn scoped_sleeper(env: &Env, base: &str) -> String {
    let flags = scoped(env);
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    env.start_sleeper_with(base, &flag_refs, &[])
}

/// Processes of a scoped container's supervisor tree: the supervisor, its broker and its SSH
/// agent.
const TREE: usize = 3;

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
    let name = scoped_sleeper(&env, "restart");
    assert!(eventually(Duration::from_secs(5), || supervisor_pids(
        &env, &name
    )
    .len()
        == TREE));
    let child = *supervisor_pids(&env, &name)
        .iter()
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .windows(6)
                .any(|w| w == b"broker")
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
            pids.len() == TREE && !pids.contains(&child)
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
    let name = scoped_sleeper(&env, "nopost");
    assert!(eventually(Duration::from_secs(5), || supervisor_pids(
        &env, &name
    )
    .len()
        == TREE));
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
    let name = scoped_sleeper(&env, "podrestart");
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
    assert_eq!(after.len(), TREE, "{after:?}");
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

// ---- the broker, end to end --------------------------------------------------------------

mod upstream {
    //! A fake provider API on host loopback (std only): records each request's head and
    //! checks upload bodies against the `seq` stream the container sends.

    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    #[derive(Debug, Clone, Default)]
    pub struct Seen {
        pub target: String,
        pub headers: HashMap<String, String>,
        pub body_len: usize,
        pub body_intact: bool,
    }

    pub struct Upstream {
        pub port: u16,
        pub seen: Arc<Mutex<Vec<Seen>>>,
    }

    pub fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let log = log.clone();
                std::thread::spawn(move || {
                    let _ = handle(stream, &log);
                });
            }
        });
        Upstream { port, seen }
    }

    /// The bytes of `seq 1 N`, endlessly (what the container uploads).
    struct SeqBytes {
        n: u64,
        buf: Vec<u8>,
        pos: usize,
    }

    impl SeqBytes {
        fn next(&mut self) -> u8 {
            if self.pos == self.buf.len() {
                self.n += 1;
                self.buf = format!("{}\n", self.n).into_bytes();
                self.pos = 0;
            }
            self.pos += 1;
            self.buf[self.pos - 1]
        }
    }

    fn handle(stream: TcpStream, log: &Mutex<Vec<Seen>>) -> std::io::Result<()> {
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let mut seen = Seen {
            target: line.split_whitespace().nth(1).unwrap_or("").to_owned(),
            ..Seen::default()
        };
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                seen.headers
                    .insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let mut expected = SeqBytes {
            n: 0,
            buf: Vec::new(),
            pos: 0,
        };
        let mut intact = true;
        let mut len = 0usize;
        let mut consume = |chunk: &[u8]| {
            for b in chunk {
                intact &= *b == expected.next();
            }
            len += chunk.len();
        };
        if seen
            .headers
            .get("transfer-encoding")
            .is_some_and(|t| t.contains("chunked"))
        {
            loop {
                line.clear();
                reader.read_line(&mut line)?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                    .unwrap_or(0);
                if size == 0 {
                    line.clear();
                    reader.read_line(&mut line)?;
                    break;
                }
                let mut chunk = vec![0u8; size];
                reader.read_exact(&mut chunk)?;
                consume(&chunk);
                let mut crlf = [0u8; 2];
                reader.read_exact(&mut crlf)?;
            }
        } else if let Some(n) = seen
            .headers
            .get("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            let mut left = n;
            let mut chunk = vec![0u8; 64 * 1024];
            while left > 0 {
                let got = reader.read(&mut chunk[..left.min(64 * 1024)])?;
                if got == 0 {
                    break;
                }
                consume(&chunk[..got]);
                left -= got;
            }
        }
        seen.body_len = len;
        seen.body_intact = intact && len > 0;
        log.lock().unwrap().push(seen);
        let mut out = stream;
        out.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")?;
        Ok(())
    }
}

const REAL_KEY: &str = "sk-REAL-e2e-7d1f0c9a55b2";

/// A vault with a real credential for scope `proj`, and routes to the fake upstream.
fn broker_env(env: &Env, port: u16) {
    let out = run_with_stdin(
        env.admin()
            .args(["credentials", "set", "proj", "anthropic"]),
        format!("{REAL_KEY}\n").as_bytes(),
    );
    assert!(out.status.success(), "credentials set: {}", stderr(&out));
    // A provider with a credential but no route: its token must get 404.
    let out = run_with_stdin(
        env.admin().args(["credentials", "set", "proj", "noroute"]),
        b"sk-other\n",
    );
    assert!(out.status.success(), "credentials set: {}", stderr(&out));
    std::fs::write(
        env.vault_dir().join("routes.json"),
        serde_json::json!({
            "anthropic": {
                "upstream": format!("http://127.0.0.1:{port}"),
                "auth_header": "x-api-key",
                "auth_prefix": "",
                "env": {"base_url": "ANTHROPIC_BASE_URL", "api_key": "ANTHROPIC_API_KEY"}
            }
        })
        .to_string(),
    )
    .unwrap();
}

/// Acceptance 1, 2 and 3 (upload) with a real container: the phantom key in the container's
/// env reaches the fake upstream as the real credential; the container holds no real
/// credential anywhere; wrong, missing, revoked tokens get 401, an unrouted provider 404.
#[test]
fn phantom_key_reaches_the_upstream_as_the_real_credential() {
    let _serial = serial();
    let env = Env::new();
    let up = upstream::start();
    broker_env(&env, up.port);
    let name = scoped_sleeper(&env, "broker");

    let curl = |auth: &str| {
        let out = env.exec(
            &name,
            &format!("curl -sS -o /dev/null -w '%{{http_code}}' {auth} \"$ANTHROPIC_BASE_URL/v1/messages?beta=true&q=a%2Fb\""),
        );
        stdout(&out)
    };
    assert_eq!(curl("-H \"x-api-key: $ANTHROPIC_API_KEY\""), "200");
    {
        let seen = up.seen.lock().unwrap();
        let req = seen.last().expect("the upstream saw the request");
        assert_eq!(req.target, "/v1/messages?beta=true&q=a%2Fb");
        assert_eq!(
            req.headers.get("x-api-key").map(String::as_str),
            Some(REAL_KEY)
        );
        assert!(
            !req.headers.values().any(|v| v.contains("terok-p-")),
            "phantom leaked upstream"
        );
    }
    assert_eq!(
        curl("-H \"Authorization: Bearer $ANTHROPIC_API_KEY\""),
        "200"
    );
    assert_eq!(curl(""), "401", "missing token");
    assert_eq!(
        curl("-H 'x-api-key: terok-p-00000000000000000000000000000000'"),
        "401",
        "wrong token"
    );

    // 50 MiB, chunked, through the broker, intact.
    let out = env.exec(
        &name,
        "seq 1 10000000 | head -c 52428800 | curl -sS -o /dev/null -w '%{http_code}' -H \"x-api-key: $ANTHROPIC_API_KEY\" -H 'Transfer-Encoding: chunked' --data-binary @- \"$ANTHROPIC_BASE_URL/upload\"",
    );
    assert_eq!(stdout(&out), "200", "{}", stderr(&out));
    {
        let seen = up.seen.lock().unwrap();
        let up_req = seen
            .iter()
            .rev()
            .find(|s| s.target == "/upload")
            .expect("upload seen");
        assert_eq!(up_req.body_len, 52_428_800);
        assert!(up_req.body_intact, "upload corrupted on the way");
    }

    // Unknown provider: the token minted for `noroute` (read from the vault by the test).
    let db = terok::vault::Db::open(
        &env.vault_dir().join("credentials.db"),
        "terok-e2e-passphrase",
        terok::vault::OpenMode::Existing,
    )
    .unwrap();
    let noroute = db
        .list_tokens()
        .unwrap()
        .into_iter()
        .find(|t| t.subject == name && t.provider == "noroute")
        .expect("a token for the unrouted provider")
        .token;
    drop(db);
    assert_eq!(curl(&format!("-H 'x-api-key: {noroute}'")), "404");

    // No real credential in the container: its processes' env and argv, its file system
    // (both read from the host, so the search itself puts no key in the container).
    assert_eq!(
        env.container_holds_any(&name, &[REAL_KEY.as_bytes().to_vec()]),
        None,
        "a real credential in the container"
    );
    let inspect = run_ok(env.podman().args(["inspect", &name]));
    assert!(!inspect.contains(REAL_KEY));
    assert!(
        inspect.contains("ANTHROPIC_API_KEY=terok-p-"),
        "phantom not in the env"
    );

    // Revoked by cleanup: the running container's token stops working.
    run_ok(env.terok_run().args(["cleanup", &name]));
    assert_eq!(
        curl("-H \"x-api-key: $ANTHROPIC_API_KEY\""),
        "401",
        "revoked token still works"
    );
}

/// The janitor (`terok-admin doctor`) reaps a supervisor whose container does not exist, and
/// leaves the supervisors of live containers alone.
#[test]
fn doctor_reaps_supervisors_whose_container_is_gone() {
    let _serial = serial();
    let env = Env::new();
    let flags = scoped(&env);
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let live = env.start_sleeper_with("live", &flag_refs, &[]);
    let ghost = env.name("ghost");
    run_ok(env.terok_run().args(["prepare", &ghost]).args(&flags));
    // Deleted even if the test fails: an orphan supervisor then sees its netns go and exits.
    let netns = TestNetns::new(&format!("tk-jan-{}", env.id));
    // Detached like the hook does it (re-parented, in a session of its own).
    let mut cmd = std::process::Command::new("setsid");
    cmd.arg("--fork")
        .arg(bin("terok-supervisor"))
        .arg("run")
        .arg("--sidecar")
        .arg(env.sidecar(&ghost))
        .arg("--netns")
        .arg(netns.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    run_ok(&mut cmd);
    assert!(eventually(Duration::from_secs(5), || supervisor_pids(
        &env, &ghost
    )
    .len()
        == TREE));

    let out = run(env.admin().args(["doctor", "--orphan-grace", "0"]));
    let text = stdout(&out);
    assert!(text.contains(&format!("reaped 1: {ghost}")), "{text}");
    assert!(
        supervisor_pids(&env, &ghost).is_empty(),
        "the orphan survived"
    );
    assert_eq!(
        supervisor_pids(&env, &live).len(),
        TREE,
        "a live container's supervisor was reaped"
    );
}

/// The runtime directory is the source of the container's /run/terok mount, which podman
/// checks before any hook runs: poststop empties it but keeps it, so the same prepared flags
/// start a container again, and a stopped container starts again, with its services.
#[test]
fn prepared_flags_and_stopped_containers_start_again() {
    let _serial = serial();
    let env = Env::new();
    let flags = scoped(&env);
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let name = env.name("again");
    let podman_flags = env.prepare_flags(&name, &flag_refs);
    for round in 0..2 {
        let out = run(env
            .podman()
            .args(["run", "--rm"])
            .args(&podman_flags)
            .args([IMAGE, "sh", "-c", HEALTH]));
        assert!(
            stdout(&out).contains("\"ok\""),
            "round {round}: {}{}",
            stdout(&out),
            stderr(&out)
        );
    }
    let name = scoped_sleeper(&env, "stopstart");
    run_ok(env.podman().args(["stop", "-t", "0", &name]));
    run_ok(env.podman().args(["start", &name]));
    let out = env.exec(
        &name,
        &format!("{HEALTH}; test -S \"$SSH_AUTH_SOCK\" && echo agent-socket"),
    );
    let text = stdout(&out);
    assert!(
        text.contains("\"ok\"") && text.contains("agent-socket"),
        "{text}{}",
        stderr(&out)
    );
}
