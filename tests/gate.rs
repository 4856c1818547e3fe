//! Issue 6: the git gate. Real git over smart HTTP, from real containers through the
//! supervisor's in-process gate on the container's own loopback, plus the same front end
//! on the host's loopback where a test needs its git-run counter; `gate sync` against an
//! upstream bare repo the test creates (file://).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use terok::gate::{self, Gate};
use terok_e2e::*;

const AGENT: &str = "export GIT_AUTHOR_NAME=agent GIT_AUTHOR_EMAIL=agent@example.invalid \
    GIT_COMMITTER_NAME=agent GIT_COMMITTER_EMAIL=agent@example.invalid; set -e; ";

/// Host-side git with no user or system config.
fn git(dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "op")
        .env("GIT_AUTHOR_EMAIL", "op@example.invalid")
        .env("GIT_COMMITTER_NAME", "op")
        .env("GIT_COMMITTER_EMAIL", "op@example.invalid");
    cmd
}

fn git_ok(dir: &Path, args: &[&str]) -> String {
    run_ok(git(dir).args(args)).trim().to_owned()
}

fn scoped_container(env: &Env, base: &str, project: &str) -> String {
    env.write_profile("t", &["192.0.2.10"]);
    env.start_sleeper_with(base, &["--scope", project, "--profiles", "t"], &[])
}

fn gate_repo(env: &Env, project: &str) -> PathBuf {
    env.state_dir().join("gate").join(format!("{project}.git"))
}

fn exec_ok(env: &Env, name: &str, script: &str) -> (String, String) {
    let out = env.exec(name, &format!("{AGENT}{script}"));
    assert!(
        out.status.success(),
        "in {name}: {script}\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    (stdout(&out), stderr(&out))
}

/// Lines of the container's supervisor log that record a git run.
fn git_runs_logged(env: &Env, name: &str) -> usize {
    let log = env.state_dir().join("logs").join(format!("{name}.log"));
    std::fs::read_to_string(&log)
        .unwrap_or_else(|e| panic!("supervisor log {}: {e}", log.display()))
        .lines()
        .filter(|l| l.contains("gate: git http-backend"))
        .count()
}

/// Acceptance 1: clone, commit, a 20 MB push (chunked request body) and a fetch, from
/// inside a real container over its own loopback; the gate repo has the commits.
#[test]
fn container_clones_pushes_20mb_chunked_and_fetches() {
    let _serial = serial();
    let env = Env::new();
    run_ok(env.admin().args(["gate", "init", "proj"]));
    let name = scoped_container(&env, "gate1", "proj");
    let (env_out, _) = exec_ok(
        &env,
        &name,
        "echo \"$TEROK_GATE_URL\"; echo \"$TEROK_GATE_TOKEN\"",
    );
    let mut lines = env_out.lines();
    let (url, token) = (lines.next().unwrap(), lines.next().unwrap());
    assert!(gate::is_token_shaped(token), "{token}");
    assert_eq!(url, format!("http://{token}@127.0.0.1:9418/proj.git"));

    let (out, err) = exec_ok(
        &env,
        &name,
        "git clone -q \"$TEROK_GATE_URL\" /w 2>/dev/null; cd /w; \
         head -c 20000000 /dev/urandom > big.bin; git add big.bin; git commit -qm big; \
         GIT_TRACE_CURL=1 GIT_TRACE_CURL_NO_DATA=1 git push -q origin HEAD:refs/heads/main 2>/tmp/trace; \
         grep -c 'Transfer-Encoding: chunked' /tmp/trace; git rev-parse HEAD",
    );
    let mut lines = out.lines();
    let chunked: u32 = lines.next().unwrap().trim().parse().unwrap();
    assert!(chunked >= 1, "the 20 MB push was not chunked: {out}{err}");
    let pushed = lines.next().unwrap().trim().to_owned();
    assert_eq!(
        git_ok(&gate_repo(&env, "proj"), &["rev-parse", "refs/heads/main"]),
        pushed
    );
    let size = git_ok(
        &gate_repo(&env, "proj"),
        &["cat-file", "-s", &format!("{pushed}:big.bin")],
    );
    assert_eq!(size, "20000000");

    // A second clone pushes on top; the first one fetches it.
    let (out, _) = exec_ok(
        &env,
        &name,
        "git clone -q \"$TEROK_GATE_URL\" /w2; cd /w2; test \"$(git branch --show-current)\" = main; echo more > small; git add small; \
         git commit -qm small; git push -q origin HEAD:main; git rev-parse HEAD; \
         cd /w; git fetch -q origin; git rev-parse origin/main",
    );
    let shas: Vec<&str> = out.lines().collect();
    assert_eq!(shas.len(), 2, "{out}");
    assert_eq!(shas[0], shas[1], "fetch did not bring the new commit");
    assert_eq!(
        git_ok(&gate_repo(&env, "proj"), &["rev-parse", "main"]),
        shas[0]
    );
    // The gate token is the only credential the container has for it; the container env
    // holds nothing else of the gate.
    let (envs, _) = exec_ok(&env, &name, "env | grep -c TEROK_GATE || true");
    assert_eq!(envs.trim(), "2");
}

const REFUSED: &[(&str, &str)] = &[
    // (what, curl arguments after the method)
    (
        "no token",
        "http://127.0.0.1:9418/proj.git/info/refs?service=git-upload-pack",
    ),
    (
        "wrong token",
        "http://terok-g-00000000000000000000000000000000@127.0.0.1:9418/proj.git/info/refs?service=git-upload-pack",
    ),
    (
        "another project",
        "http://$TEROK_GATE_TOKEN@127.0.0.1:9418/other.git/info/refs?service=git-upload-pack",
    ),
    (
        "traversal",
        "http://$TEROK_GATE_TOKEN@127.0.0.1:9418/../proj.git/info/refs?service=git-upload-pack",
    ),
    (
        "encoded traversal",
        "http://$TEROK_GATE_TOKEN@127.0.0.1:9418/x/..%2fproj.git/info/refs?service=git-upload-pack",
    ),
    (
        "nested traversal",
        "http://$TEROK_GATE_TOKEN@127.0.0.1:9418/proj.git/../other.git/info/refs?service=git-upload-pack",
    ),
    (
        "dumb HTTP",
        "http://$TEROK_GATE_TOKEN@127.0.0.1:9418/proj.git/info/refs",
    ),
    (
        "HEAD file",
        "http://$TEROK_GATE_TOKEN@127.0.0.1:9418/proj.git/HEAD",
    ),
    (
        "objects",
        "http://$TEROK_GATE_TOKEN@127.0.0.1:9418/proj.git/objects/info/packs",
    ),
    (
        "config",
        "http://$TEROK_GATE_TOKEN@127.0.0.1:9418/proj.git/config",
    ),
    ("root", "http://$TEROK_GATE_TOKEN@127.0.0.1:9418/"),
];

/// Acceptance 2 in a real container: wrong token, no token, another project's path,
/// traversal and non-git routes get 401/404, and git never ran for them (the supervisor
/// logs every git run).
#[test]
fn container_refusals_never_run_git() {
    let _serial = serial();
    let env = Env::new();
    run_ok(env.admin().args(["gate", "init", "proj"]));
    run_ok(env.admin().args(["gate", "init", "other"]));
    let name = scoped_container(&env, "gate2", "proj");
    // One good request first: the log records git runs at all.
    let (code, _) = exec_ok(
        &env,
        &name,
        "curl -s -o /dev/null -w '%{http_code}' \"http://$TEROK_GATE_TOKEN@127.0.0.1:9418/proj.git/info/refs?service=git-upload-pack\"",
    );
    assert_eq!(code, "200");
    assert!(eventually(Duration::from_secs(2), || git_runs_logged(
        &env, &name
    ) == 1));
    for (what, url) in REFUSED {
        let (code, _) = exec_ok(
            &env,
            &name,
            &format!("curl -s --path-as-is -o /dev/null -w '%{{http_code}}' \"{url}\""),
        );
        let expected = if what.contains("token") { "401" } else { "404" };
        assert_eq!(code, expected, "{what}: {url}");
    }
    // A push with a wrong token fails at the first request.
    let out = env.exec(
        &name,
        "git ls-remote http://terok-g-00000000000000000000000000000000:x@127.0.0.1:9418/proj.git 2>&1",
    );
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("Authentication failed"),
        "{}",
        stdout(&out)
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        git_runs_logged(&env, &name),
        1,
        "git ran for a refused request"
    );
}

/// The gate front end on the host's loopback, for the counter of git runs.
struct LoopGate {
    _dir: tempfile::TempDir,
    gate_dir: PathBuf,
    port: u16,
    gate: Arc<Gate>,
    token: String,
}

fn loopback_gate(project: &str) -> LoopGate {
    let dir = tempfile::tempdir().unwrap();
    let gate_dir = dir.path().join("gate");
    gate::mirror::init(&gate_dir, project, None).unwrap();
    gate::mirror::init(&gate_dir, "other", None).unwrap();
    let token = gate::mint_token().unwrap();
    let gate = Arc::new(Gate::new(gate_dir.clone(), project, token.clone()).unwrap());
    let port = spawn_gate(gate.clone());
    LoopGate {
        _dir: dir,
        gate_dir,
        port,
        gate,
        token,
    }
}

/// Send one raw HTTP/1.1 request; the response's status code.
fn status(port: u16, request_line: &str, user: Option<&str>) -> u16 {
    response(port, request_line, user)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// Send one raw HTTP/1.1 request; the whole response.
fn response(port: u16, request_line: &str, user: Option<&str>) -> String {
    use base64::Engine;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut req = format!("{request_line} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if let Some(u) = user {
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{u}:"));
        req.push_str(&format!("Authorization: Basic {b}\r\n"));
    }
    if request_line.starts_with("POST") {
        req.push_str(
            "Content-Type: application/x-git-upload-pack-request\r\nContent-Length: 4\r\n\r\n0000",
        );
    } else {
        req.push_str("\r\n");
    }
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp
}

/// Every git process of a gate runs in a Landlock lane: its own repo, the gate's hooks and
/// home, the system; another project's mirror is not even readable. (A probe stands in for
/// git http-backend, placed where the lane lets it be executed.)
#[test]
fn git_runs_confined_to_its_own_repo() {
    let dir = tempfile::tempdir().unwrap();
    let gate_dir = dir.path().join("gate");
    gate::mirror::init(&gate_dir, "proj", None).unwrap();
    gate::mirror::init(&gate_dir, "other", None).unwrap();
    let probe = gate::hooks_dir(&gate_dir).join("probe");
    std::fs::write(
        &probe,
        "#!/bin/sh\nprintf 'Status: 200 OK\\r\\nContent-Type: text/plain\\r\\n\\r\\n'\n\
         cat \"$GIT_PROJECT_ROOT/proj.git/HEAD\" >/dev/null 2>&1 && echo own=read || echo own=denied\n\
         touch \"$GIT_PROJECT_ROOT/proj.git/probe\" 2>/dev/null && echo own-write=ok || echo own-write=denied\n\
         cat \"$GIT_PROJECT_ROOT/other.git/HEAD\" >/dev/null 2>&1 && echo other=read || echo other=denied\n\
         ls \"$GIT_PROJECT_ROOT\" >/dev/null 2>&1 && echo root=listed || echo root=denied\n\
         touch /tmp/terok-gate-probe-$$ 2>/dev/null && echo tmp=written || echo tmp=denied\n",
    )
    .unwrap();
    run_ok(Command::new("chmod").arg("755").arg(&probe));
    let token = gate::mint_token().unwrap();
    let gate = Arc::new(
        Gate::new(gate_dir.clone(), "proj", token.clone())
            .unwrap()
            .with_backend(probe),
    );
    let port = spawn_gate(gate);
    let resp = response(
        port,
        "GET /proj.git/info/refs?service=git-upload-pack",
        Some(&token),
    );
    for want in [
        "own=read",
        "own-write=ok",
        "other=denied",
        "root=denied",
        "tmp=denied",
    ] {
        assert!(resp.contains(want), "{want} missing in:\n{resp}");
    }
}

/// A container cannot make the host run more than `MAX_GIT` git processes at once: more
/// requests wait for a slot and are then served.
#[test]
fn concurrent_git_processes_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let gate_dir = dir.path().join("gate");
    gate::mirror::init(&gate_dir, "proj", None).unwrap();
    let probe = gate::hooks_dir(&gate_dir).join("probe");
    std::fs::write(
        &probe,
        "#!/bin/sh\nd=\"$GIT_PROJECT_ROOT/proj.git/probe\"; mkdir -p \"$d\"; touch \"$d/$$\"\n\
         ls \"$d\" | wc -l >> \"$GIT_PROJECT_ROOT/proj.git/probe.count\"\nsleep 0.3\nrm \"$d/$$\"\n\
         printf 'Status: 200 OK\\r\\n\\r\\ndone\\n'\n",
    )
    .unwrap();
    run_ok(Command::new("chmod").arg("755").arg(&probe));
    let token = gate::mint_token().unwrap();
    let gate = Arc::new(
        Gate::new(gate_dir.clone(), "proj", token.clone())
            .unwrap()
            .with_backend(probe),
    );
    let port = spawn_gate(gate.clone());
    let requests = 3 * gate::http::MAX_GIT;
    let handles: Vec<_> = (0..requests)
        .map(|_| {
            let token = token.clone();
            std::thread::spawn(move || {
                response(
                    port,
                    "GET /proj.git/info/refs?service=git-upload-pack",
                    Some(&token),
                )
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap().contains("done"));
    }
    let counts = std::fs::read_to_string(gate_dir.join("proj.git/probe.count")).unwrap();
    let max = counts
        .lines()
        .map(|l| l.trim().parse::<usize>().unwrap())
        .max()
        .unwrap();
    assert_eq!(counts.lines().count(), requests);
    assert!(max <= gate::http::MAX_GIT, "{max} git processes at once");
    assert!(max > 1, "requests were not served concurrently at all");
}

/// Serve a gate on 127.0.0.1 from a thread of its own; its port.
fn spawn_gate(gate: Arc<Gate>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            gate::serve(l, gate, std::future::pending()).await
        })
    });
    port
}

/// Acceptance 2 against the front end's own counter: no refused request starts git.
#[test]
fn refusals_never_start_git() {
    let g = loopback_gate("proj");
    let t = g.token.as_str();
    let wrong = "terok-g-00000000000000000000000000000000";
    let adv = "/proj.git/info/refs?service=git-upload-pack";
    let cases: &[(&str, Option<&str>, u16)] = &[
        (&format!("GET {adv}"), None, 401),
        (&format!("GET {adv}"), Some(wrong), 401),
        (&format!("GET {adv}"), Some(&t[..t.len() - 1]), 401),
        ("POST /proj.git/git-receive-pack", None, 401),
        (
            "GET /other.git/info/refs?service=git-upload-pack",
            Some(t),
            404,
        ),
        ("POST /other.git/git-upload-pack", Some(t), 404),
        (
            "GET /../proj.git/info/refs?service=git-upload-pack",
            Some(t),
            404,
        ),
        (
            "GET /proj.git/../other.git/info/refs?service=git-upload-pack",
            Some(t),
            404,
        ),
        (
            "GET /%2e%2e/proj.git/info/refs?service=git-upload-pack",
            Some(t),
            404,
        ),
        ("GET /proj.git/info/refs", Some(t), 404),
        ("GET /proj.git/HEAD", Some(t), 404),
        ("GET /proj.git/objects/info/packs", Some(t), 404),
        ("GET /proj.git/config", Some(t), 404),
        (
            "GET /proj.git/info/refs?service=git-upload-archive",
            Some(t),
            404,
        ),
        ("PUT /proj.git/git-receive-pack", Some(t), 404),
        ("GET /", Some(t), 404),
    ];
    for (line, user, want) in cases {
        assert_eq!(status(g.port, line, *user), *want, "{line} as {user:?}");
    }
    assert_eq!(g.gate.git_runs(), 0, "git ran for a refused request");
    assert_eq!(status(g.port, &format!("GET {adv}"), Some(t)), 200);
    assert_eq!(g.gate.git_runs(), 1);
    // Host git over the loopback gate: clone of the empty repo, a chunked push, a fetch.
    let work = g.gate_dir.parent().unwrap().join("w");
    let url = format!("http://{t}@127.0.0.1:{}/proj.git", g.port);
    run_ok(git(g.gate_dir.parent().unwrap()).args(["clone", "-q", &url, "w"]));
    std::fs::write(work.join("big"), random_bytes(3_000_000)).unwrap();
    git_ok(&work, &["add", "big"]);
    git_ok(&work, &["commit", "-qm", "big"]);
    git_ok(&work, &["push", "-q", "origin", "HEAD:main"]);
    git_ok(&work, &["fetch", "-q", "origin"]);
    assert_eq!(
        git_ok(&work, &["rev-parse", "origin/main"]),
        git_ok(&g.gate_dir.join("proj.git"), &["rev-parse", "main"])
    );
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut v)
        .unwrap();
    v
}

/// Acceptance 3: a force-push and a deletion leave backup refs that `gate log` shows and
/// that the container can neither list, fetch (by name or by id) nor overwrite.
#[test]
fn force_push_backups_are_logged_and_hidden() {
    let _serial = serial();
    let env = Env::new();
    run_ok(env.admin().args(["gate", "init", "proj"]));
    let name = scoped_container(&env, "gate3", "proj");
    let (out, err) = exec_ok(
        &env,
        &name,
        "git clone -q \"$TEROK_GATE_URL\" /w 2>/dev/null; cd /w; \
         echo a > f; git add f; git commit -qm a; git push -q origin HEAD:main HEAD:feature; \
         echo b > f; git commit -qam b; git push -q origin HEAD:main; git rev-parse HEAD; \
         git reset -q --hard HEAD~1; echo c > f; git commit -qam c; \
         git push -f origin HEAD:main 2>&1; git push origin :feature 2>&1",
    );
    let lost = out.lines().next().unwrap().trim().to_owned();
    assert!(
        out.contains("gate: saved refs/terok/backup/main/"),
        "{out}{err}"
    );
    assert!(
        out.contains("gate: saved refs/terok/backup/feature/"),
        "{out}{err}"
    );

    let log = run_ok(env.admin().args(["gate", "log", "proj", "--json"]));
    let log: serde_json::Value = serde_json::from_str(&log).unwrap();
    let backups = log["backups"].as_array().unwrap();
    let main = backups
        .iter()
        .find(|b| b["branch"] == "main")
        .unwrap_or_else(|| panic!("no backup of main: {log}"));
    assert_eq!(main["sha"], lost.as_str());
    assert!(backups.iter().any(|b| b["branch"] == "feature"), "{log}");
    assert!(log["pushes"].as_array().unwrap().len() >= 5, "{log}");
    let text = run_ok(env.admin().args(["gate", "log", "proj"]));
    assert!(text.contains("refs/terok/backup/main/"), "{text}");

    let backup_ref = main["refname"].as_str().unwrap();
    // A fresh clone, which never had the lost commit (git would not ask for what it has).
    exec_ok(
        &env,
        &name,
        "git clone -q -b main \"$TEROK_GATE_URL\" /fresh",
    );
    let (listed, _) = exec_ok(&env, &name, "cd /fresh; git ls-remote origin");
    assert!(!listed.contains("refs/terok"), "{listed}");
    for attempt in [
        format!("git fetch origin {backup_ref}"),
        format!("git fetch origin {lost}"),
        "git fetch origin 'refs/terok/*:refs/remotes/t/*' && git rev-parse --verify -q refs/remotes/t/backup/main >/dev/null && exit 1 || exit 3".to_owned(),
        format!("git push origin HEAD:{backup_ref}"),
        "git push origin HEAD:refs/terok/upstream/main".to_owned(),
    ] {
        let out = env.exec(&name, &format!("cd /fresh; {attempt} 2>&1"));
        assert!(!out.status.success(), "the container reached a hidden ref with `{attempt}`: {}", stdout(&out));
    }
    for proto in ["0", "2"] {
        let out = env.exec(
            &name,
            &format!("cd /fresh; git -c protocol.version={proto} fetch origin {lost} 2>&1; git cat-file -e {lost}"),
        );
        assert!(
            !out.status.success(),
            "protocol v{proto} fetched the backed-up commit by id"
        );
    }
    // The backup ref is untouched.
    assert_eq!(
        git_ok(&gate_repo(&env, "proj"), &["rev-parse", backup_ref]),
        lost
    );
}

/// Acceptance 4: `gate sync` against a test upstream (file://): new upstream commits
/// fast-forward; an upstream force-push becomes a pending op; the agent's pushed commit
/// stays, and survives the operator applying the op (as a backup).
#[test]
fn sync_fast_forwards_and_keeps_agent_work_on_upstream_rewrites() {
    let _serial = serial();
    let env = Env::new();
    let up = env.path("upstream.git");
    let work = env.path("upwork");
    run_ok(
        git(env.dir.path())
            .args(["init", "-q", "--bare", "-b", "main"])
            .arg(&up),
    );
    run_ok(
        git(env.dir.path())
            .args(["init", "-q", "-b", "main"])
            .arg(&work),
    );
    let upstream = format!("file://{}", up.display());
    git_ok(&work, &["remote", "add", "origin", &upstream]);
    std::fs::write(work.join("f"), "1").unwrap();
    git_ok(&work, &["add", "f"]);
    git_ok(&work, &["commit", "-qm", "one"]);
    git_ok(&work, &["push", "-q", "origin", "main", "main:dev"]);
    let one = git_ok(&work, &["rev-parse", "HEAD"]);

    run_ok(
        env.admin()
            .args(["gate", "init", "proj", "--upstream", &upstream]),
    );
    let repo = gate_repo(&env, "proj");
    assert_eq!(git_ok(&repo, &["rev-parse", "main"]), one);
    assert_eq!(
        git_ok(&repo, &["config", "transfer.hideRefs"]),
        "refs/terok"
    );

    // The agent pushes on top of main through its gate.
    let name = scoped_container(&env, "gate4", "proj");
    let (agent, _) = exec_ok(
        &env,
        &name,
        "git clone -q \"$TEROK_GATE_URL\" /w; cd /w; echo agent > a; git add a; \
         git commit -qm agent; git push -q origin HEAD:main; git rev-parse HEAD",
    );
    let agent = agent.trim().to_owned();

    // Upstream: dev moves on (fast-forward); main is rewritten (force-push).
    git_ok(&work, &["checkout", "-q", "-b", "dev", "origin/dev"]);
    std::fs::write(work.join("d"), "2").unwrap();
    git_ok(&work, &["add", "d"]);
    git_ok(&work, &["commit", "-qm", "dev two"]);
    let dev2 = git_ok(&work, &["rev-parse", "HEAD"]);
    git_ok(&work, &["push", "-q", "origin", "dev"]);
    git_ok(&work, &["checkout", "-q", "main"]);
    git_ok(&work, &["commit", "-q", "--amend", "-m", "one, rewritten"]);
    let rewritten = git_ok(&work, &["rev-parse", "HEAD"]);
    git_ok(&work, &["push", "-q", "-f", "origin", "main"]);

    let out = run_ok(env.admin().args(["gate", "sync", "proj", "--json"]));
    let sync: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(sync["success"], true, "{sync}");
    let applied = sync["applied"].as_array().unwrap();
    assert!(
        applied.iter().any(|a| a["branch"] == "dev"
            && a["kind"] == "fast_forward"
            && a["new_sha"] == dev2.as_str()),
        "{sync}"
    );
    let pending = sync["pending"].as_array().unwrap();
    assert_eq!(pending.len(), 1, "{sync}");
    assert_eq!(pending[0]["branch"], "main");
    assert_eq!(pending[0]["kind"], "force_update");
    assert_eq!(pending[0]["upstream_sha"], rewritten.as_str());
    assert_eq!(pending[0]["gate_only_commits"], 1, "{sync}");
    assert_eq!(git_ok(&repo, &["rev-parse", "dev"]), dev2);
    assert_eq!(
        git_ok(&repo, &["rev-parse", "main"]),
        agent,
        "sync overwrote the agent's push"
    );

    // A second sync changes nothing; `gate pending` shows the same op offline.
    let again: serde_json::Value = serde_json::from_str(&run_ok(
        env.admin().args(["gate", "sync", "proj", "--json"]),
    ))
    .unwrap();
    assert_eq!(again["pending"], sync["pending"]);
    let offline: serde_json::Value = serde_json::from_str(&run_ok(
        env.admin().args(["gate", "pending", "proj", "--json"]),
    ))
    .unwrap();
    assert_eq!(offline, sync["pending"]);

    // The container fetches the fast-forward and still has its own main.
    let (seen, _) = exec_ok(
        &env,
        &name,
        "cd /w; git fetch -q origin; git rev-parse origin/dev origin/main",
    );
    assert_eq!(
        seen.lines().collect::<Vec<_>>(),
        vec![dev2.as_str(), agent.as_str()]
    );

    // The operator confirms: main follows upstream, the agent's commit is kept as a backup.
    let applied = run_ok(
        env.admin()
            .args(["gate", "pending", "proj", "--apply", "main"]),
    );
    assert!(applied.contains("refs/terok/backup/main/"), "{applied}");
    assert_eq!(git_ok(&repo, &["rev-parse", "main"]), rewritten);
    let backups = git_ok(
        &repo,
        &[
            "for-each-ref",
            "--format=%(objectname)",
            "refs/terok/backup/main/",
        ],
    );
    assert_eq!(backups, agent);
    assert_eq!(
        run_ok(env.admin().args(["gate", "pending", "proj"])).trim(),
        "No pending ops."
    );

    // An upstream deletion becomes a lossless pending delete; the branch stays until applied.
    git_ok(&work, &["push", "-q", "origin", ":dev"]);
    let sync: serde_json::Value = serde_json::from_str(&run_ok(
        env.admin().args(["gate", "sync", "proj", "--json"]),
    ))
    .unwrap();
    let pending = sync["pending"].as_array().unwrap();
    assert_eq!(pending.len(), 1, "{sync}");
    assert_eq!(pending[0]["branch"], "dev");
    assert_eq!(pending[0]["kind"], "delete");
    assert_eq!(pending[0]["lossless"], true, "{sync}");
    assert_eq!(git_ok(&repo, &["rev-parse", "dev"]), dev2);
    let offline: serde_json::Value = serde_json::from_str(&run_ok(
        env.admin().args(["gate", "pending", "proj", "--json"]),
    ))
    .unwrap();
    assert_eq!(offline, sync["pending"]);
    run_ok(
        env.admin()
            .args(["gate", "pending", "proj", "--apply", "dev"]),
    );
    assert!(
        !run(git(&repo).args(["rev-parse", "-q", "--verify", "refs/heads/dev"]))
            .status
            .success()
    );
    let backups = git_ok(
        &repo,
        &[
            "for-each-ref",
            "--format=%(objectname)",
            "refs/terok/backup/dev/",
        ],
    );
    assert_eq!(backups, dev2);
}

/// `gate path` prints a file:// URL and refuses names that are not bare project names.
#[test]
fn gate_path_validates_the_project() {
    let env = Env::new();
    let out = run_ok(env.admin().args(["gate", "path", "proj"]));
    assert_eq!(
        out.trim(),
        format!("file://{}", gate_repo(&env, "proj").display())
    );
    for bad in ["", ".", "..", "a/b", "a\\b", "../x"] {
        let out = run(env.admin().args(["gate", "path", bad]));
        assert_eq!(out.status.code(), Some(1), "{bad:?}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("invalid project name"), "{err}");
    }
    // Sync of a gate that does not exist says how to make it.
    let out = run(env.admin().args(["gate", "sync", "nope"]));
    assert!(
        stderr(&out).contains("terok-admin gate init nope"),
        "{}",
        stderr(&out)
    );
}
