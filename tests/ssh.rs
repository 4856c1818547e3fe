//! Issue 5: SSH keys in the vault and the per-container SSH agent, with the real binaries,
//! OpenSSH's own tools, real podman containers and an sshd this test runs in a test netns.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use terok_e2e::*;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/fixtures/upstream-vault-0.6.0"
);
const FIXTURE_ED25519: &str = "SHA256:0/Gu9oqrv+y0QrfoGVQ6RyYW+MCX43ZaGne/xl4t124";
const FIXTURE_RSA: &str = "SHA256:dOtP3kkZxrkwckoukTABiSBQmGcMXkMlXm4VFm42QgY";

fn admin(env: &Env, args: &[&str]) -> std::process::Output {
    run(env.admin().arg("ssh").args(args))
}

fn admin_ok(env: &Env, args: &[&str]) -> String {
    run_ok(env.admin().arg("ssh").args(args))
}

fn admin_err(env: &Env, args: &[&str]) -> String {
    let out = admin(env, args);
    assert!(
        !out.status.success(),
        "ssh {args:?} should fail: {}",
        stdout(&out)
    );
    stderr(&out)
}

fn admin_stdin(env: &Env, args: &[&str], input: &str) -> std::process::Output {
    run_with_stdin(env.admin().arg("ssh").args(args), input.as_bytes())
}

fn keys_json(env: &Env) -> Vec<Value> {
    let out = admin_ok(env, &["list", "--json"]);
    let doc: Value = serde_json::from_str(&out).unwrap();
    doc["keys"].as_array().unwrap().clone()
}

fn scope_fps(env: &Env, scope: &str) -> Vec<String> {
    keys_json(env)
        .iter()
        .filter(|k| k["scope"] == scope)
        .map(|k| k["fingerprint"].as_str().unwrap().to_owned())
        .collect()
}

/// `ssh-keygen -lf FILE`'s fingerprint.
fn keygen_fp(file: &Path) -> String {
    let out = run_ok(Command::new("ssh-keygen").arg("-lf").arg(file));
    out.split_whitespace().nth(1).unwrap().to_owned()
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// The files `ssh export` wrote: (private, public).
fn exported(out: &str) -> (PathBuf, PathBuf) {
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(|p| PathBuf::from(p.trim()))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
    };
    (field("private:"), field("public:"))
}

fn use_fixture(env: &Env) {
    fs::create_dir_all(env.vault_dir()).unwrap();
    let db = env.vault_dir().join("credentials.db");
    fs::copy(Path::new(FIXTURE).join("credentials.db"), &db).unwrap();
    fs::set_permissions(&db, fs::Permissions::from_mode(0o600)).unwrap();
    fs::copy(
        Path::new(FIXTURE).join("passphrase.txt"),
        env.path("passphrase"),
    )
    .unwrap();
}

/// The private DERs of a scope, read straight from the vault.
fn private_ders(env: &Env, scope: &str) -> Vec<Vec<u8>> {
    let pw = fs::read_to_string(env.path("passphrase")).unwrap();
    let db = terok::vault::Db::open(
        &env.vault_dir().join("credentials.db"),
        pw.trim_end_matches('\n'),
        terok::vault::OpenMode::Existing,
    )
    .unwrap();
    terok::ssh::db::agent_keys(&db, scope)
        .unwrap()
        .into_iter()
        .map(|k| k.private_der.to_vec())
        .collect()
}

/// Byte strings that only the private keys hold: the ed25519 seed, and a slice of the RSA
/// DER from the private exponent onwards.
fn secrets_of(ders: &[Vec<u8>]) -> Vec<Vec<u8>> {
    ders.iter()
        .map(|d| {
            if d.len() == 48 {
                d[16..48].to_vec()
            } else {
                d[d.len() / 2..d.len() / 2 + 48].to_vec()
            }
        })
        .collect()
}

/// A host-side `terok-admin ssh agent` process, killed on drop.
struct HostAgent {
    child: Child,
    socket: PathBuf,
}

impl HostAgent {
    fn start(env: &Env, scope: &str) -> HostAgent {
        let socket = env.path(&format!("agent-{scope}/agent.sock"));
        let child = env
            .admin()
            .args(["ssh", "agent", scope, "--socket"])
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if UnixStream::connect(&socket).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        assert_eq!(mode(&socket), 0o600, "agent socket mode");
        HostAgent { child, socket }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ssh_add_fps(sock: &Path) -> Vec<String> {
    let out = run_ok(Command::new("ssh-add").arg("-l").env("SSH_AUTH_SOCK", sock));
    out.lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().to_owned())
        .collect()
}

// ---- acceptance 4: the verbs ---------------------------------------------------------------

#[test]
fn verbs_round_trip_and_agree_with_ssh_keygen() {
    let env = Env::new();
    let out_dir = env.path("export");

    // add: a primary ed25519 key, idempotent; a second key with its own comment.
    let out = admin_ok(&env, &["add", "demo"]);
    assert!(out.contains("SSH key ready for scope 'demo':"), "{out}");
    assert!(out.contains("tk-main:demo"), "{out}");
    let fps = scope_fps(&env, "demo");
    assert_eq!(fps.len(), 1);
    admin_ok(&env, &["add", "demo"]);
    assert_eq!(scope_fps(&env, "demo"), fps, "add is idempotent");
    let out = admin_ok(
        &env,
        &[
            "add",
            "demo",
            "--key-type",
            "rsa",
            "--comment",
            "deploy-rsa",
        ],
    );
    assert!(out.contains("type:        rsa"), "{out}");
    let keys = keys_json(&env);
    assert_eq!(keys.len(), 2);
    let main = keys
        .iter()
        .find(|k| k["comment"] == "tk-main:demo")
        .unwrap();
    assert_eq!(main["is_default"], true);
    let main_id = main["id"].as_i64().unwrap().to_string();
    assert!(
        admin_err(&env, &["add", "demo", "--key-type", "dsa"])
            .contains("Unsupported --key-type. Use 'ed25519' or 'rsa'.")
    );
    assert!(admin_err(&env, &["add", "%host"]).contains("reserved"));
    assert!(admin_err(&env, &["list", "--scope", "%host"]).contains("reserved"));

    // export: modes, names, never clobber; ssh-keygen agrees with our fingerprints.
    for k in keys_json(&env) {
        let id = k["id"].as_i64().unwrap().to_string();
        let out = admin_ok(
            &env,
            &[
                "export",
                "demo",
                "--out-dir",
                out_dir.to_str().unwrap(),
                "--key-id",
                &id,
            ],
        );
        let (private, public) = exported(&out);
        let stem = private.file_name().unwrap().to_string_lossy().into_owned();
        let ty = k["type"].as_str().unwrap();
        assert!(stem.starts_with(&format!("id_{ty}_")) && stem.len() == 4 + ty.len() + 8);
        assert_eq!(mode(&private), 0o600);
        assert_eq!(mode(&public), 0o644);
        let fp = k["fingerprint"].as_str().unwrap();
        assert_eq!(keygen_fp(&public), fp);
        assert_eq!(keygen_fp(&private), fp);
        let derived = run_ok(Command::new("ssh-keygen").arg("-y").arg("-f").arg(&private));
        let public_text = fs::read_to_string(&public).unwrap();
        assert_eq!(
            derived.split_whitespace().take(2).collect::<Vec<_>>(),
            public_text.split_whitespace().take(2).collect::<Vec<_>>()
        );
        let again = admin_err(
            &env,
            &[
                "export",
                "demo",
                "--out-dir",
                out_dir.to_str().unwrap(),
                "--key-id",
                &id,
            ],
        );
        assert!(
            again.contains("Refusing to overwrite existing file"),
            "{again}"
        );
    }
    assert!(
        admin_err(
            &env,
            &["export", "demo", "--out-dir", "/tmp", "--out-name", "../x"]
        )
        .contains("bare file name")
    );

    // pub
    let lines = admin_ok(&env, &["pub", "demo", "--all"]);
    assert_eq!(lines.lines().count(), 2);
    assert!(lines.lines().next().unwrap().ends_with(" tk-main:demo"));
    assert!(
        admin_err(&env, &["pub", "demo", "--all", "--key-id", "1"]).contains("mutually exclusive")
    );
    assert!(admin_err(&env, &["pub", "nokeys"]).contains("has no SSH keys assigned"));

    // rename (by prefix, any scope), and the comment rules.
    let fp = main["fingerprint"].as_str().unwrap();
    let prefix = &fp["SHA256:".len().."SHA256:".len() + 10];
    let out = admin_ok(&env, &["rename", prefix, "renamed-main"]);
    assert!(out.contains("renamed-main") && out.contains(fp), "{out}");
    assert!(admin_err(&env, &["rename", prefix, "bad\u{1b}[31m"]).contains("\\x1B"));
    assert!(admin_err(&env, &["rename", "zzzz-none", "x"]).contains("No SSH key matches"));

    // remove of the last edge deletes the key; re-import of the export gives it back with
    // the same fingerprint.
    let ed_pub = fs::read_dir(&out_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains("id_ed25519_") && p.extension().is_none())
        .unwrap();
    assert!(admin_err(&env, &["remove", "--yes"]).contains("without at least one filter"));
    let out = admin_ok(&env, &["remove", "--fingerprint", fp, "--yes"]);
    assert!(out.contains("Unassigned 1 key(s)"), "{out}");
    assert!(!scope_fps(&env, "demo").contains(&fp.to_owned()));
    let out = admin_ok(
        &env,
        &["import", "other", "--private-key", ed_pub.to_str().unwrap()],
    );
    assert!(out.contains("Imported new key to scope 'other':"), "{out}");
    assert!(out.contains(fp), "{out}");
    let out = admin_ok(
        &env,
        &["import", "other", "--private-key", ed_pub.to_str().unwrap()],
    );
    assert!(out.contains("nothing to do"), "{out}");
    let new_id = keys_json(&env)
        .iter()
        .find(|k| k["fingerprint"] == fp)
        .unwrap()["id"]
        .as_i64()
        .unwrap()
        .to_string();
    assert_ne!(
        new_id, main_id,
        "the orphaned key was deleted, the import is a new row"
    );

    // link
    let out = admin_ok(&env, &["link", "demo", "--key-id", &new_id]);
    assert!(
        out.contains(&format!("Linked key id={new_id} to scope 'demo'")),
        "{out}"
    );
    let out = admin_ok(&env, &["link", "demo", "--key-id", &new_id]);
    assert!(out.contains("already linked"), "{out}");
    assert!(
        admin_err(&env, &["link", "demo", "--key-id", "999"])
            .contains("No ssh_keys row with id=999")
    );
    assert_eq!(scope_fps(&env, "demo").len(), 2);
    // a key linked to two scopes survives losing one of them
    admin_ok(&env, &["remove", "--scope", "other", "--yes"]);
    assert!(scope_fps(&env, "demo").contains(&fp.to_owned()));

    // remove asks unless --yes; anything but y/yes aborts.
    let out = admin_stdin(
        &env,
        &["remove", "--scope", "demo", "--comment", "deploy-*"],
        "n\n",
    );
    assert!(!out.status.success() && stderr(&out).contains("Aborted."));
    let out = admin_stdin(
        &env,
        &["remove", "--scope", "demo", "--comment", "deploy-*"],
        "y\n",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(scope_fps(&env, "demo"), vec![fp.to_owned()]);

    // import of a passphrase-protected key asks for its passphrase; a pub file must match.
    let protected = env.path("protected");
    run_ok(
        Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "key-pass-1",
                "-C",
                "from-file",
                "-f",
            ])
            .arg(&protected),
    );
    let out = admin_stdin(
        &env,
        &[
            "import",
            "demo",
            "--private-key",
            protected.to_str().unwrap(),
        ],
        "",
    );
    assert!(
        !out.status.success() && stderr(&out).contains("ssh-keygen -p -f"),
        "{}",
        stderr(&out)
    );
    let out = admin_stdin(
        &env,
        &[
            "import",
            "demo",
            "--private-key",
            protected.to_str().unwrap(),
        ],
        "key-pass-1\n",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let want = keygen_fp(&protected.with_extension("pub"));
    assert!(stdout(&out).contains(&want));
    assert!(stdout(&out).contains("from-file"));
    let other = env.path("other-key");
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&other),
    );
    let err = admin_err(
        &env,
        &[
            "import",
            "demo",
            "--private-key",
            other.to_str().unwrap(),
            "--public-key",
            protected.with_extension("pub").to_str().unwrap(),
        ],
    );
    assert!(err.contains("Import failed"), "{err}");
    assert!(
        admin_err(&env, &["import", "demo", "--private-key", "/nonexistent/k"])
            .contains("Private key not found")
    );

    // A `%` infrastructure scope's key: invisible and untouchable from the verbs.
    let pw = fs::read_to_string(env.path("passphrase")).unwrap();
    let db = terok::vault::Db::open(
        &env.vault_dir().join("credentials.db"),
        &pw,
        terok::vault::OpenMode::Existing,
    )
    .unwrap();
    let infra = terok::ssh::keys::generate(terok::ssh::keys::KeyType::Ed25519).unwrap();
    let (infra_id, _) = terok::ssh::db::store(&db, &infra, "terok-infra:%host").unwrap();
    terok::ssh::db::assign(&db, "%host", infra_id, true).unwrap();
    drop(db);
    let listed = admin_ok(&env, &["list", "--json"]);
    assert!(!listed.contains("%host") && !listed.contains(&infra.fingerprint));
    let id = infra_id.to_string();
    assert!(admin_err(&env, &["link", "demo", "--key-id", &id]).contains("No ssh_keys row"));
    assert!(admin_err(&env, &["rename", &infra.fingerprint, "x"]).contains("No SSH key matches"));
    assert!(
        admin_err(
            &env,
            &["remove", "--fingerprint", &infra.fingerprint, "--yes"]
        )
        .contains("No keys match")
    );
    assert!(admin_err(&env, &["pub", "%host"]).contains("reserved"));
}

/// Acceptance 4: both keys of the original's vault list, export and sign correctly.
#[test]
fn fixture_keys_list_export_and_sign() {
    let env = Env::new();
    use_fixture(&env);
    let fps = scope_fps(&env, "demo");
    assert_eq!(
        fps,
        vec![FIXTURE_ED25519.to_owned(), FIXTURE_RSA.to_owned()]
    );
    let out_dir = env.path("export");
    let pubs = env.path("pubs");
    fs::create_dir_all(&pubs).unwrap();
    let mut pub_files = Vec::new();
    for (id, fp) in [("1", FIXTURE_ED25519), ("2", FIXTURE_RSA)] {
        let out = admin_ok(
            &env,
            &[
                "export",
                "demo",
                "--out-dir",
                out_dir.to_str().unwrap(),
                "--key-id",
                id,
            ],
        );
        let (private, public) = exported(&out);
        assert_eq!(keygen_fp(&private), fp);
        assert_eq!(keygen_fp(&public), fp);
        // Only the public half where ssh-keygen looks: signing must go through the agent.
        let p = pubs.join(public.file_name().unwrap());
        fs::copy(&public, &p).unwrap();
        pub_files.push(p);
    }
    let agent = HostAgent::start(&env, "demo");
    assert_eq!(ssh_add_fps(&agent.socket), fps, "default key first");
    // Keys are re-read for every connection: a change applies without a restart.
    admin_ok(&env, &["add", "demo", "--comment", "added-later"]);
    assert_eq!(ssh_add_fps(&agent.socket).len(), 3);
    admin_ok(
        &env,
        &[
            "remove",
            "--scope",
            "demo",
            "--comment",
            "added-later",
            "--yes",
        ],
    );
    assert_eq!(ssh_add_fps(&agent.socket), fps);
    let msg = env.path("msg");
    fs::write(&msg, "signed through the agent\n").unwrap();
    for (p, algo) in pub_files.iter().zip(["ED25519", "RSA"]) {
        let sig = PathBuf::from(format!("{}.sig", msg.display()));
        let _ = fs::remove_file(&sig);
        run_ok(
            Command::new("ssh-keygen")
                .args(["-Y", "sign", "-n", "file", "-f"])
                .arg(p)
                .arg(&msg)
                .env("SSH_AUTH_SOCK", &agent.socket),
        );
        let allowed = env.path("allowed");
        let line = fs::read_to_string(p).unwrap();
        let mut parts = line.split_whitespace();
        fs::write(
            &allowed,
            format!("me {} {}\n", parts.next().unwrap(), parts.next().unwrap()),
        )
        .unwrap();
        let out = run(Command::new("sh").arg("-c").arg(format!(
            "ssh-keygen -Y verify -f {} -I me -n file -s {} < {}",
            allowed.display(),
            sig.display(),
            msg.display()
        )));
        assert!(
            out.status.success() && format!("{}{}", stdout(&out), stderr(&out)).contains(algo),
            "{}{}",
            stdout(&out),
            stderr(&out)
        );
    }
}

// ---- acceptance 5: malformed messages -----------------------------------------------------

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn read_frame(s: &mut UnixStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    Some(body)
}

#[test]
fn fuzzed_frames_never_crash_the_agent_or_leak_a_key() {
    let env = Env::new();
    use_fixture(&env);
    let secrets = secrets_of(&private_ders(&env, "demo"));
    assert_eq!(secrets.len(), 2);
    let mut agent = HostAgent::start(&env, "demo");
    let mut rng = std::fs::File::open("/dev/urandom").unwrap();
    let mut conn = UnixStream::connect(&agent.socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let leaks = |r: &[u8]| secrets.iter().any(|s| r.windows(s.len()).any(|w| w == s));
    let types = [11u8, 13, 17, 18, 19, 20, 21, 22, 23, 25, 26, 27, 0, 255];
    for i in 0..3000usize {
        let mut head = [0u8; 3];
        rng.read_exact(&mut head).unwrap();
        let len = 1 + (u16::from_be_bytes([head[0], head[1]]) as usize % 1500);
        let mut body = vec![0u8; len];
        rng.read_exact(&mut body).unwrap();
        body[0] = types[head[2] as usize % types.len()];
        // Plausible string lengths now and then, so decoding goes deeper.
        if len > 8 && i % 3 == 0 {
            let l = ((len - 5) as u32 / 2).to_be_bytes();
            body[1..5].copy_from_slice(&l);
        }
        conn.write_all(&frame(&body)).unwrap();
        let reply = read_frame(&mut conn).expect("the agent answers every well-framed message");
        assert!(
            matches!(reply[0], 5 | 12 | 14),
            "unexpected reply type {}",
            reply[0]
        );
        assert!(!leaks(&reply), "private key material in a reply");
    }
    // Oversize and empty frames close the connection without an answer.
    for bad in [(256 * 1024 + 1) as u32, 0, u32::MAX] {
        let mut c = UnixStream::connect(&agent.socket).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(&bad.to_be_bytes()).unwrap();
        let _ = c.write_all(&[11u8; 64]);
        let mut buf = [0u8; 16];
        assert_eq!(c.read(&mut buf).unwrap_or(0), 0, "length {bad} not refused");
    }
    // A frame of exactly the limit is still read and answered.
    let mut c = UnixStream::connect(&agent.socket).unwrap();
    let mut big = vec![0u8; 256 * 1024];
    big[0] = 11;
    c.write_all(&frame(&big)).unwrap();
    assert_eq!(read_frame(&mut c).unwrap()[0], 12);
    assert!(agent.alive(), "the agent died");
    assert_eq!(ssh_add_fps(&agent.socket).len(), 2);
}

// ---- acceptance 1, 2, 3: containers ---------------------------------------------------------

/// An sshd inside a test host's netns, with its own host key and authorized_keys.
struct Sshd {
    child: Child,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sshd(env: &Env, host: &TestHost, authorized: &str) -> Sshd {
    let dir = env.path("sshd");
    fs::create_dir_all(&dir).unwrap();
    fs::create_dir_all("/run/sshd").unwrap();
    let host_key = dir.join("host_ed25519");
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&host_key),
    );
    let auth = dir.join("authorized_keys");
    fs::write(&auth, authorized).unwrap();
    let config = dir.join("sshd_config");
    fs::write(
        &config,
        format!(
            "ListenAddress {}:2222\nHostKey {}\nAuthorizedKeysFile {}\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPidFile none\nLogLevel VERBOSE\n",
            host.v4[0],
            host_key.display(),
            auth.display()
        ),
    )
    .unwrap();
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &host.netns,
            "/usr/sbin/sshd",
            "-D",
            "-e",
            "-f",
        ])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("sshd.log")).unwrap())
        .spawn()
        .unwrap();
    let sshd = Sshd { child };
    // Wait until it listens.
    for _ in 0..100 {
        let out = run(Command::new("ip").args(["netns", "exec", &host.netns, "ss", "-ltn"]));
        if stdout(&out).contains(&format!("{}:2222", host.v4[0])) {
            return sshd;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "sshd did not start: {}",
        fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
    );
}

const SSH_OPTS: &str = "-o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=10 -p 2222";

#[test]
fn containers_sign_with_their_scope_keys_only() {
    let _serial = serial();
    let env = Env::new();
    // Scope proj: an ed25519 primary and an rsa key; scope other: one ed25519 key.
    admin_ok(&env, &["add", "proj"]);
    admin_ok(
        &env,
        &["add", "proj", "--key-type", "rsa", "--comment", "proj-rsa"],
    );
    admin_ok(&env, &["add", "other"]);
    let proj_fps = scope_fps(&env, "proj");
    let other_fps = scope_fps(&env, "other");
    assert_eq!(proj_fps.len(), 2);
    let proj_pub = admin_ok(&env, &["pub", "proj", "--all"]);
    let mut needles = secrets_of(&private_ders(&env, "proj"));
    needles.extend(secrets_of(&private_ders(&env, "other")));
    // The exported PEM's base64 too, in case a key travelled as text.
    let out = admin_ok(
        &env,
        &[
            "export",
            "proj",
            "--out-dir",
            env.path("exp").to_str().unwrap(),
        ],
    );
    let (private, _) = exported(&out);
    let pem = fs::read_to_string(&private).unwrap();
    needles.push(pem.lines().nth(3).unwrap().as_bytes().to_vec());

    // A git server: sshd in a test netns serving a bare repo, authorizing proj's keys only.
    let host = TestHost::new(&env.id);
    let sshd = start_sshd(&env, &host, &proj_pub);
    let repo = env.path("srv/repo.git");
    run_ok(
        Command::new("git")
            .args(["init", "-q", "--bare", "-b", "main"])
            .arg(&repo),
    );
    let seed = env.path("seed");
    run_ok(
        Command::new("git")
            .args(["init", "-q", "-b", "main"])
            .arg(&seed),
    );
    fs::write(seed.join("README"), "seed\n").unwrap();
    run_ok(
        Command::new("git")
            .current_dir(&seed)
            .args(["add", "README"]),
    );
    run_ok(Command::new("git").current_dir(&seed).args([
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.invalid",
        "commit",
        "-q",
        "-m",
        "seed",
    ]));
    run_ok(
        Command::new("git")
            .current_dir(&seed)
            .arg("push")
            .arg("-q")
            .arg(&repo)
            .arg("main"),
    );
    let ip = host.v4[0].to_string();
    env.write_profile("sshd", &[&ip]);

    let name = env.start_sleeper_with("ssh", &["--scope", "proj", "--profiles", "sshd"], &[]);
    let sh = |script: &str| {
        let out = env.exec(&name, script);
        (
            out.status.success(),
            format!("{}{}", stdout(&out), stderr(&out)),
        )
    };
    let (ok, text) = sh("echo $SSH_AUTH_SOCK; ls -l /run/terok/ssh-agent.sock; ssh-add -l");
    assert!(ok, "{text}");
    assert!(text.contains("/run/terok/ssh-agent.sock"), "{text}");
    let listed: Vec<String> = text
        .lines()
        .filter(|l| l.contains("SHA256:"))
        .map(|l| l.split_whitespace().nth(1).unwrap().to_owned())
        .collect();
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v
    };
    assert_eq!(
        sorted(&listed),
        sorted(&proj_fps),
        "ssh-add -l lists exactly the scope's keys"
    );
    let main_fp = keys_json(&env)
        .into_iter()
        .find(|k| k["comment"] == "tk-main:proj")
        .unwrap()["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(listed[0], main_fp, "the scope's default key comes first");
    let out = env.exec(&name, "ssh-add -D; ssh-add -l | wc -l");
    assert_eq!(
        stdout(&out).trim(),
        "2",
        "the container removed keys: {}",
        stderr(&out)
    );

    // ssh -T authenticates with the vault key.
    let (ok, text) = sh(&format!(
        "ssh -T {SSH_OPTS} root@{ip} echo authenticated-as-\\$USER"
    ));
    assert!(ok && text.contains("authenticated-as-root"), "{text}");

    // git clone and push over ssh.
    let url = format!("ssh://root@{ip}:2222{}", repo.display());
    let script = format!(
        "set -e; export GIT_SSH_COMMAND='ssh {SSH_OPTS}'; cd /tmp; git clone -q {url} w; cd w; \
         echo from-container > f; git add f; \
         git -c user.name=agent -c user.email=agent@example.invalid commit -q -m from-container; \
         git push -q origin main; echo pushed"
    );
    let (ok, text) = sh(&script);
    assert!(ok && text.contains("pushed"), "{text}");
    let log = run_ok(
        Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(["log", "--format=%s", "main"]),
    );
    assert!(log.starts_with("from-container\n"), "{log}");

    // Acceptance 2: no private key material anywhere in the container.
    let _ = sh("rm -rf /tmp/w");
    assert_eq!(env.container_holds_any(&name, &needles), None);

    // Acceptance 3: another scope's container sees only its own keys, and they do not
    // open the sshd that authorizes proj's.
    let second = env.start_sleeper_with("ssh2", &["--scope", "other", "--profiles", "sshd"], &[]);
    let out = env.exec(&second, "ssh-add -l");
    let listed: Vec<String> = stdout(&out)
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().to_owned())
        .collect();
    assert_eq!(listed, other_fps, "{}", stderr(&out));
    let out = env.exec(&second, &format!("ssh -T {SSH_OPTS} root@{ip} echo in"));
    assert!(!out.status.success(), "other's key opened proj's server");
    drop(sshd);
}
