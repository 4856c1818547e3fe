//! End-to-end tests of the vault: the real `terok-admin` / `terok-run` binaries against
//! real SQLCipher files, the kernel keyring, systemd-creds and the upstream fixture vault.
//! Every test runs in its own directories (TEROK_ROOT, TEROK_VAULT_DIR, config, runtime)
//! and in its own session (setsid: no controlling terminal), so /dev/tty is never there.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use terok::vault::{Chain, Db, OpenMode, store, tiers};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/fixtures/upstream-vault-0.6.0"
);
const FIXTURE_PW: &str = "pw-fixture-1";

fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// An isolated terok environment for the vault.
struct VEnv {
    dir: tempfile::TempDir,
}

impl VEnv {
    fn new() -> VEnv {
        let dir = tempfile::tempdir().unwrap();
        for d in ["root", "vault", "cfg", "run", "xdg", "home", "hooks"] {
            fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        fs::set_permissions(dir.path().join("xdg"), fs::Permissions::from_mode(0o700)).unwrap();
        VEnv { dir }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn db(&self) -> PathBuf {
        self.p("vault/credentials.db")
    }

    fn config_file(&self) -> PathBuf {
        self.p("cfg/config.yml")
    }

    /// Point `passphrase_command` at a 0600 file holding `pw`.
    fn use_command(&self, pw: &str) {
        let file = self.p("pw.txt");
        fs::write(&file, pw).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        self.config(&format!(
            "credentials:\n  use_keyring: false\n  passphrase_command: cat {}\n",
            file.display()
        ));
    }

    fn config(&self, text: &str) {
        fs::write(self.config_file(), text).unwrap();
    }

    fn copy_fixture(&self) {
        fs::copy(Path::new(FIXTURE).join("credentials.db"), self.db()).unwrap();
        fs::set_permissions(self.db(), fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn cmd(&self, bin: &str, args: &[&str]) -> Command {
        self.cmd_program(&terok_e2e::bin(bin), args)
    }

    fn cmd_program(&self, program: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.p("home"))
            .env("TEROK_ROOT", self.p("root"))
            .env("TEROK_VAULT_DIR", self.p("vault"))
            .env("TEROK_CONFIG_DIR", self.p("cfg"))
            .env("TEROK_CONFIG_FILE", self.config_file())
            .env("TEROK_SANDBOX_RUNTIME_DIR", self.p("run"))
            .env("XDG_RUNTIME_DIR", self.p("xdg"));
        // SAFETY: setsid is async-signal-safe; it detaches the child from any terminal.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        cmd
    }

    fn run(&self, bin: &str, args: &[&str], stdin: &str) -> Output {
        terok_e2e::run_with_stdin(&mut self.cmd(bin, args), stdin.as_bytes())
    }

    fn admin(&self, args: &[&str]) -> Output {
        self.run("terok-admin", args, "")
    }

    fn admin_ok(&self, args: &[&str]) -> String {
        ok(self.admin(args), args)
    }

    /// The chain as the binaries see it, for direct checks through the library.
    fn chain(&self) -> Chain {
        Chain {
            db_path: self.db(),
            sealed_file: self.p("vault/vault.passphrase.cred"),
            use_keyring: false,
            passphrase_command: None,
            session_runtime_dir: Some(self.p("xdg")),
        }
    }
}

impl Drop for VEnv {
    fn drop(&mut self) {
        // The kernel keyring outlives the test's files: never leave a cached passphrase.
        self.chain().session().forget();
    }
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(out: Output, what: &[&str]) -> String {
    let (o, e) = text(&out);
    assert!(
        out.status.success(),
        "{what:?} failed ({}):\nstdout: {o}\nstderr: {e}",
        out.status
    );
    o
}

/// A failure: exit 1, exactly one line on stderr, returned.
fn fails(out: Output, what: &str) -> String {
    let (o, e) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: expected exit 1\nstdout: {o}\nstderr: {e}"
    );
    assert_eq!(e.trim_end().lines().count(), 1, "{what}: not one line: {e}");
    assert!(!e.contains("panicked"), "{what}: {e}");
    e
}

/// Every file of a directory, by name, with its bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// An independent SQLCipher connection: key, SQLCipher 4 defaults, nothing of terok's code.
fn raw_open(path: &Path, pw: &str) -> rusqlite::Connection {
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.pragma_update(None, "key", pw).unwrap();
    c.execute_batch("PRAGMA cipher_compatibility = 4").unwrap();
    c
}

fn schema_of(c: &rusqlite::Connection) -> Vec<(String, String, Option<String>)> {
    let mut s = c
        .prepare("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
        .unwrap();
    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn settings_of(c: &rusqlite::Connection) -> Vec<String> {
    [
        "PRAGMA user_version",
        "PRAGMA journal_mode",
        "PRAGMA cipher_page_size",
        "PRAGMA kdf_iter",
        "PRAGMA cipher_hmac_algorithm",
        "PRAGMA cipher_kdf_algorithm",
        "PRAGMA cipher_plaintext_header_size",
    ]
    .iter()
    .map(|q| {
        let v: rusqlite::types::Value = c.query_row(q, [], |r| r.get(0)).unwrap();
        format!("{q} = {v:?}")
    })
    .collect()
}

// ---- acceptance 1: the upstream fixture, and schema parity ---------------------------------

#[test]
fn upstream_fixture_opens_through_passphrase_command_and_reads_back_exactly() {
    let env = VEnv::new();
    env.copy_fixture();
    env.use_command(FIXTURE_PW);
    let before = fs::read(env.db()).unwrap();

    let out = env.admin_ok(&["vault", "list", "--json", "--include-tokens"]);
    let doc: Value = serde_json::from_str(&out).unwrap();
    let creds: Vec<(String, String, String, Vec<String>)> = doc["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["credential_set"].as_str().unwrap().to_owned(),
                c["provider"].as_str().unwrap().to_owned(),
                c["type"].as_str().unwrap().to_owned(),
                c["fields"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect();
    let s = |v: &str| v.to_owned();
    assert_eq!(
        creds,
        vec![
            (s("demo"), s("anthropic"), s("api_key"), vec![s("key")]),
            (s("demo"), s("github"), s("api_key"), vec![s("token")]),
            (
                s("demo"),
                s("openai"),
                s("oauth"),
                vec![s("access_token"), s("expires_at"), s("refresh_token")]
            ),
        ]
    );
    let tokens = doc["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2);
    assert_eq!(tokens[0]["token_prefix"], "terok-p-907aba74…");
    assert!(!out.contains("sk-ant-fixture-secret"));
    assert!(!out.contains("terok-p-907aba7474cee07883d059dfd12ddcd6"));

    let status: Value =
        serde_json::from_str(&env.admin_ok(&["vault", "status", "--json"])).unwrap();
    assert_eq!(status["state"], "unlocked");
    assert_eq!(status["passphrase_source"], "passphrase-command");
    assert_eq!(status["ssh_keys"], 2);
    assert_eq!(status["chain"].as_array().unwrap().len(), 4);

    // Values, exactly as made.json / the README say, through terok's own store.
    // made.json is one JSON object followed by a `user_version` note line.
    let made_text = fs::read_to_string(Path::new(FIXTURE).join("made.json")).unwrap();
    let made: Value = serde_json::Deserializer::from_str(&made_text)
        .into_iter::<Value>()
        .next()
        .unwrap()
        .unwrap();
    let db = Db::open(&env.db(), FIXTURE_PW, OpenMode::Existing).unwrap();
    assert_eq!(db.user_version().unwrap(), 4);
    let json = |t: &str| serde_json::from_str::<Value>(t).unwrap();
    assert_eq!(
        Value::Object(db.load_credential("demo", "anthropic").unwrap().unwrap()),
        json(r#"{"type":"api_key","key":"sk-ant-fixture-secret"}"#)
    );
    assert_eq!(
        Value::Object(db.load_credential("demo", "github").unwrap().unwrap()),
        json(r#"{"type":"api_key","token":"sk-ant-fixture-secret-gh"}"#)
    );
    assert_eq!(
        Value::Object(db.load_credential("demo", "openai").unwrap().unwrap()),
        json(
            r#"{"type":"oauth","access_token":"sk-ant-fixture-secret-oa","refresh_token":"r-sk-ant-fixture-secret","expires_at":4102444800}"#
        )
    );
    for (key, provider) in [("phantom_anthropic", "anthropic"), ("phantom_ssh", "ssh")] {
        let info = db
            .lookup_token(made[key].as_str().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                info.scope.as_str(),
                info.subject.as_str(),
                info.credential_set.as_str(),
                info.provider.as_str()
            ),
            ("demo", "fixture-container", "demo", provider)
        );
    }
    let keys = db.list_ssh_keys_for_scope("demo").unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(
        (
            keys[0].id,
            keys[0].key_type.as_str(),
            keys[0].comment.as_str()
        ),
        (1, "ed25519", "")
    );
    assert_eq!(
        keys[0].fingerprint,
        "SHA256:0/Gu9oqrv+y0QrfoGVQ6RyYW+MCX43ZaGne/xl4t124"
    );
    assert_eq!(
        (
            keys[1].id,
            keys[1].key_type.as_str(),
            keys[1].comment.as_str()
        ),
        (2, "rsa", "tk-side:demo")
    );
    assert_eq!(
        keys[1].fingerprint,
        "SHA256:dOtP3kkZxrkwckoukTABiSBQmGcMXkMlXm4VFm42QgY"
    );
    // Key 1 is the imported keys/id_ed25519: our PEM → PKCS#8 conversion (the v0 migration)
    // yields the bytes the original stored, and the fingerprint is that of its public blob.
    let (der, blob): (Vec<u8>, Vec<u8>) = db
        .connection()
        .query_row(
            "SELECT private_der, public_blob FROM ssh_keys WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let pem = fs::read(Path::new(FIXTURE).join("keys/id_ed25519")).unwrap();
    assert_eq!(
        terok::vault::sshkey::openssh_pem_to_pkcs8(&pem).unwrap(),
        der
    );
    assert_eq!(store::fingerprint(&blob), keys[0].fingerprint);
    drop(db);
    // Reading changed nothing the original would notice.
    let raw = raw_open(&env.db(), FIXTURE_PW);
    let n: i64 = raw
        .query_row("SELECT count(*) FROM proxy_tokens", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(before.len(), fs::read(env.db()).unwrap().len());
}

#[test]
fn a_vault_terok_writes_matches_the_original_schema_and_cipher_settings() {
    let env = VEnv::new();
    env.use_command("terok-new-pw");
    ok(
        env.run(
            "terok-admin",
            &["credentials", "set", "default", "anthropic"],
            "sk-new-secret\n",
        ),
        &["credentials set"],
    );
    let fixture_copy = env.p("fixture.db");
    fs::copy(Path::new(FIXTURE).join("credentials.db"), &fixture_copy).unwrap();
    let ours = raw_open(&env.db(), "terok-new-pw");
    let theirs = raw_open(&fixture_copy, FIXTURE_PW);
    assert_eq!(schema_of(&ours), schema_of(&theirs));
    assert_eq!(settings_of(&ours), settings_of(&theirs));
    let data: String = ours
        .query_row(
            "SELECT data FROM credentials WHERE credential_set = 'default' AND provider = 'anthropic'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&data).unwrap(),
        serde_json::json!({"type": "api_key", "key": "sk-new-secret"})
    );
    // 0600 file in a 0700 directory.
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&env.db()), 0o600);
    assert_eq!(mode(&env.p("vault")), 0o700);
}

// ---- acceptance 2: nothing in clear on disk -------------------------------------------------

#[test]
fn the_file_on_disk_is_not_plain_sqlite_and_holds_no_secret_in_clear() {
    let env = VEnv::new();
    let pw = "disk-test-passphrase";
    env.use_command(pw);
    let secret = "sk-ant-DISKCHECK-0123456789";
    ok(
        env.run(
            "terok-admin",
            &["credentials", "set", "diskset", "anthropic"],
            &format!("{secret}\n"),
        ),
        &["credentials set"],
    );
    ok(
        env.run(
            "terok-admin",
            &[
                "credentials",
                "set",
                "diskset",
                "github",
                "--type",
                "pat",
                "--field",
                "token",
            ],
            "ghp_DISKCHECK_TOKEN\n",
        ),
        &["credentials set"],
    );
    let db = Db::open(&env.db(), pw, OpenMode::Existing).unwrap();
    let token = db
        .create_token("diskscope", "c1", "diskset", "anthropic")
        .unwrap();
    drop(db);
    for (name, bytes) in snapshot(&env.p("vault")) {
        for needle in [
            secret,
            "ghp_DISKCHECK_TOKEN",
            token.as_str(),
            "diskset",
            "anthropic",
            "SQLite format 3",
            "CREATE TABLE",
            pw,
        ] {
            assert!(
                !contains(&bytes, needle),
                "{name} holds {needle:?} in clear"
            );
        }
    }
    // Plain SQLite cannot read it.
    let plain = rusqlite::Connection::open(env.db()).unwrap();
    let err = plain
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap_err();
    assert_eq!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase)
    );
}

// ---- acceptance 3: tiers --------------------------------------------------------------------

#[test]
fn kernel_keyring_tier_round_trips_through_unlock_and_lock() {
    let env = VEnv::new();
    if let Some(reason) = tiers::kernel::unavailable_reason() {
        panic!("the kernel keyring must work on this machine (keyutils): {reason}");
    }
    env.config("credentials:\n  use_keyring: false\n");
    let pw = "kernel tier passphrase ü";
    // Unlock with no DB yet: the value becomes the key on first use.
    let out = ok(
        env.run("terok-admin", &["vault", "unlock"], &format!("{pw}\n")),
        &["vault unlock"],
    );
    assert!(out.contains("kernel keyring"), "{out}");
    assert!(!out.contains(pw));
    assert_eq!(
        tiers::kernel::load(&env.db()).unwrap().as_str(),
        pw,
        "the kernel keyring holds the value under the documented description"
    );
    ok(
        env.run(
            "terok-admin",
            &["credentials", "set", "default", "openai"],
            "sk-openai-kernel\n",
        ),
        &["credentials set"],
    );
    let status: Value =
        serde_json::from_str(&env.admin_ok(&["vault", "status", "--json"])).unwrap();
    assert_eq!(status["passphrase_source"], "kernel-keyring");
    assert_eq!(status["credentials"][0], "openai");
    Db::open(&env.db(), pw, OpenMode::Existing).unwrap();
    // A wrong value is refused and nothing is cached.
    env.chain().session().forget();
    let e = fails(
        env.run("terok-admin", &["vault", "unlock"], "not it\n"),
        "unlock with a wrong passphrase",
    );
    assert!(e.contains("nothing was written"), "{e}");
    assert!(tiers::kernel::load(&env.db()).is_none());
    ok(
        env.run("terok-admin", &["vault", "unlock"], &format!("{pw}\n")),
        &["vault unlock"],
    );
    // lock without an acknowledged recovery key and no terminal is refused …
    let e = fails(env.admin(&["vault", "lock"]), "lock unacknowledged");
    assert!(e.contains("lock aborted"), "{e}");
    assert!(tiers::kernel::load(&env.db()).is_some());
    // … and with it, it destroys the cached copy.
    env.admin_ok(&["vault", "passphrase", "acknowledge"]);
    env.admin_ok(&["vault", "lock"]);
    assert!(tiers::kernel::load(&env.db()).is_none());
    let e = fails(env.admin(&["vault", "list"]), "list after lock");
    assert!(e.contains("vault is locked"), "{e}");
}

#[test]
fn tmpfs_fallback_round_trips_when_the_kernel_keyring_is_unusable() {
    // The facade picks the file only when the kernel keyring is unusable, which this machine
    // cannot be made to be from a test; the file backing itself is exercised for real here,
    // and the facade's choice in the unit tests.
    let env = VEnv::new();
    let runtime = env.p("xdg");
    tiers::session_file::store("tmpfs pw", &runtime, &env.db()).unwrap();
    let file = tiers::session_file::path(&runtime, &env.db());
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        fs::metadata(file.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    assert_eq!(
        tiers::session_file::load(&runtime, &env.db())
            .unwrap()
            .as_str(),
        "tmpfs pw"
    );
    assert!(tiers::session_file::forget(&runtime, &env.db()));
    assert!(tiers::session_file::load(&runtime, &env.db()).is_none());
}

#[test]
fn systemd_creds_tier_seals_and_unseals_through_setup() {
    if let Some(reason) = tiers::systemd::unavailable_reason() {
        assert!(
            !in_ci(),
            "systemd-creds tier unusable in CI ({reason}): install systemd and run as root"
        );
        eprintln!("SKIP: systemd-creds tier unusable here: {reason}");
        return;
    }
    let env = VEnv::new();
    env.config("credentials:\n  use_keyring: false\n");
    let hooks = env.p("hooks");
    let out = ok(
        env.run(
            "terok-admin",
            &[
                "setup",
                "--no-register",
                "--hooks-dir",
                hooks.to_str().unwrap(),
                "--passphrase-tier",
                "systemd-creds",
                "--echo-passphrase",
            ],
            "",
        ),
        &["setup"],
    );
    let minted = out
        .lines()
        .find_map(|l| l.strip_prefix("Vault passphrase: "))
        .expect("--echo-passphrase prints the minted passphrase")
        .to_owned();
    assert_eq!(minted.len(), 43);
    let sealed = env.p("vault/vault.passphrase.cred");
    assert_eq!(
        fs::metadata(&sealed).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!contains(&fs::read(&sealed).unwrap(), &minted));
    assert_eq!(
        tiers::systemd::unseal(&sealed).unwrap().as_str(),
        minted,
        "systemd-creds decrypt returns the sealed passphrase"
    );
    let status: Value =
        serde_json::from_str(&env.admin_ok(&["vault", "status", "--json"])).unwrap();
    assert_eq!(status["passphrase_source"], "systemd-creds");
    assert_eq!(status["state"], "unlocked");
    Db::open(&env.db(), &minted, OpenMode::Existing).unwrap();
    // Setup again reuses the tier silently.
    let again = ok(
        env.run(
            "terok-admin",
            &[
                "setup",
                "--no-register",
                "--hooks-dir",
                hooks.to_str().unwrap(),
            ],
            "",
        ),
        &["setup again"],
    );
    assert!(again.contains("reusing the systemd-creds tier"), "{again}");
    assert!(!again.contains(&minted));
    // A sealed file that no longer unseals fails closed, naming the tier.
    fs::write(&sealed, "garbage").unwrap();
    let e = fails(env.admin(&["vault", "list"]), "broken sealed file");
    assert!(e.contains("systemd-creds"), "{e}");
    assert!(!e.contains("prompt"), "{e}");
}

#[test]
fn keyring_tier_round_trips_through_a_real_secret_service() {
    let missing: Vec<&str> = ["dbus-run-session", "gnome-keyring-daemon", "secret-tool"]
        .into_iter()
        .filter(|t| terok::podman::which(t).is_none())
        .collect();
    if !missing.is_empty() {
        assert!(
            !in_ci(),
            "keyring tier test cannot run in CI: missing {missing:?} (apt-get install dbus gnome-keyring libsecret-tools)"
        );
        eprintln!("SKIP: keyring tier test needs {missing:?}");
        return;
    }
    let env = VEnv::new();
    env.config("credentials:\n  use_keyring: false\n");
    let script = env.p("keyring.sh");
    let admin = terok_e2e::bin("terok-admin");
    let d = env.p("");
    fs::write(
        &script,
        format!(
            "set -e\n\
             printf 'unlock' | gnome-keyring-daemon --unlock --components=secrets >/dev/null 2>&1\n\
             A={admin}\nD={d}\n\
             $A setup --no-register --hooks-dir $D/hooks --passphrase-tier keyring --echo-passphrase > $D/setup.out\n\
             $A vault status --json > $D/status.json\n\
             $A vault list --json > $D/list.json\n\
             secret-tool lookup service terok-sandbox username credentials-db > $D/stored.txt\n\
             $A vault passphrase acknowledge > /dev/null\n\
             $A vault lock > $D/lock.out\n\
             $A vault status --json > $D/status2.json\n",
            admin = admin.display(),
            d = d.display()
        ),
    )
    .unwrap();
    let out = env
        .cmd_program(
            Path::new("dbus-run-session"),
            &["--", "sh", script.to_str().unwrap()],
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |f: &str| fs::read_to_string(env.p(f)).unwrap();
    let minted = read("setup.out")
        .lines()
        .find_map(|l| l.strip_prefix("Vault passphrase: "))
        .unwrap()
        .to_owned();
    assert_eq!(read("stored.txt").trim_end(), minted);
    // setup recorded the choice, even over the explicit `false` it found.
    assert!(read("cfg/config.yml").contains("use_keyring: true"));
    let status: Value = serde_json::from_str(&read("status.json")).unwrap();
    assert_eq!(status["passphrase_source"], "keyring");
    assert_eq!(status["state"], "unlocked");
    serde_json::from_str::<Value>(&read("list.json")).unwrap();
    assert!(read("lock.out").contains("cleared keyring entry"));
    let after: Value = serde_json::from_str(&read("status2.json")).unwrap();
    assert_eq!(after["state"], "locked");
    Db::open(&env.db(), &minted, OpenMode::Existing).unwrap();
}

#[test]
fn keyring_tier_degrades_cleanly_without_a_session_bus() {
    // Without a session bus (the usual headless case) the tier stays out of the way.
    let env = VEnv::new();
    env.config("credentials:\n  use_keyring: true\n");
    let status: Value =
        serde_json::from_str(&env.admin_ok(&["vault", "status", "--json"])).unwrap();
    assert_eq!(status["chain"][1]["source"], "keyring");
    assert_eq!(status["chain"][1]["present"], false);
    assert!(
        status["chain"][1]["detail"]
            .as_str()
            .unwrap()
            .contains("D-Bus"),
        "{status}"
    );
    let hooks = env.p("hooks");
    let e = fails(
        env.run(
            "terok-admin",
            &[
                "setup",
                "--no-register",
                "--hooks-dir",
                hooks.to_str().unwrap(),
                "--passphrase-tier",
                "keyring",
                "--echo-passphrase",
            ],
            "",
        ),
        "setup --passphrase-tier keyring",
    );
    assert!(e.contains("keyring") && e.contains("D-Bus"), "{e}");
    assert!(!env.db().exists());
}

// ---- acceptance 4: distinct failures, nothing modified -------------------------------------

#[test]
fn failures_are_distinct_one_line_and_modify_nothing() {
    let env = VEnv::new();
    env.copy_fixture();
    let vault = env.p("vault");
    let list = |env: &VEnv| env.admin(&["vault", "list"]);

    // Wrong passphrase (through a tier): names the tier.
    env.use_command("not-the-passphrase");
    let before = snapshot(&vault);
    let wrong = fails(list(&env), "wrong passphrase");
    assert!(wrong.contains("does not open"), "{wrong}");
    assert!(wrong.contains("passphrase-command"), "{wrong}");
    assert_eq!(snapshot(&vault), before);

    // Locked: no tier holds anything.
    env.config("credentials:\n  use_keyring: false\n");
    let locked = fails(list(&env), "locked");
    assert!(locked.contains("locked: no passphrase"), "{locked}");
    assert_eq!(snapshot(&vault), before);

    // "database is locked": another process holds the DB exclusively.
    env.use_command(FIXTURE_PW);
    // Read before the holder exists: closing any descriptor of the file in this process
    // would drop the holder's POSIX locks.
    let busy_before = fs::read(env.db()).unwrap();
    let holder = rusqlite::Connection::open(env.db()).unwrap();
    holder.pragma_update(None, "key", FIXTURE_PW).unwrap();
    holder
        .execute_batch(
            "PRAGMA cipher_compatibility = 4; PRAGMA locking_mode = EXCLUSIVE; BEGIN IMMEDIATE; \
             INSERT INTO credentials VALUES ('held', 'x', '{}');",
        )
        .unwrap();
    let busy = fails(list(&env), "database is locked");
    assert!(
        busy.contains("database is locked") && busy.contains("fuser"),
        "{busy}"
    );
    let busy_write = fails(
        env.run(
            "terok-admin",
            &["credentials", "set", "demo", "mistral"],
            "sk-while-locked\n",
        ),
        "write while locked",
    );
    assert_eq!(busy_write, busy);
    holder.execute_batch("ROLLBACK").unwrap();
    drop(holder);
    assert_eq!(fs::read(env.db()).unwrap(), busy_before);
    env.admin_ok(&["vault", "list"]);

    // Corrupt file: cut short mid-page.
    let good = fs::read(env.db()).unwrap();
    fs::write(env.db(), &good[..good.len() - 1000]).unwrap();
    let corrupt_before = snapshot(&vault);
    let corrupt = fails(list(&env), "corrupt");
    assert!(corrupt.contains("damaged"), "{corrupt}");
    assert_eq!(snapshot(&vault), corrupt_before);

    // Missing DB: never created by a read.
    for (name, _) in snapshot(&vault) {
        fs::remove_file(vault.join(name)).unwrap();
    }
    let missing = fails(list(&env), "missing");
    assert!(missing.contains("no credentials DB"), "{missing}");
    assert!(snapshot(&vault).is_empty());

    // Plaintext: points at encrypt-db.
    let plain = rusqlite::Connection::open(env.db()).unwrap();
    plain.execute_batch("CREATE TABLE t (x)").unwrap();
    drop(plain);
    let plaintext = fails(list(&env), "plaintext");
    assert!(plaintext.contains("encrypt-db"), "{plaintext}");

    let all = [&wrong, &locked, &busy, &corrupt, &missing, &plaintext];
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            assert_ne!(a, b);
        }
    }
}

// ---- acceptance 5: encrypt-db ----------------------------------------------------------------

fn plaintext_vault(path: &Path) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch(
        "CREATE TABLE credentials (credential_set TEXT NOT NULL, provider TEXT NOT NULL, data TEXT NOT NULL, PRIMARY KEY (credential_set, provider));
         CREATE TABLE proxy_tokens (token TEXT PRIMARY KEY, scope TEXT NOT NULL, subject TEXT NOT NULL, credential_set TEXT NOT NULL, provider TEXT NOT NULL);
         INSERT INTO credentials VALUES ('default', 'anthropic', '{\"type\":\"api_key\",\"key\":\"sk-plain-1\"}');
         INSERT INTO credentials VALUES ('default', 'github', '{\"type\":\"pat\",\"token\":\"ghp-plain-2\"}');
         INSERT INTO credentials VALUES ('other', 'openai', '{\"type\":\"oauth\",\"access_token\":\"at-plain-3\"}');
         INSERT INTO proxy_tokens VALUES ('terok-p-0123456789abcdef0123456789abcdef', 's', 'c', 'default', 'anthropic');
         PRAGMA user_version = 3;",
    )
    .unwrap();
}

#[test]
fn encrypt_db_keeps_every_row_leaves_a_private_backup_and_refuses_to_redo() {
    let env = VEnv::new();
    env.use_command("encrypt-pw");
    plaintext_vault(&env.db());
    let out = env.run("terok-admin", &["credentials", "encrypt-db"], "");
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}{e}");
    assert!(!o.contains("sk-plain-1") && !e.contains("sk-plain-1"));
    assert!(!store::is_plaintext(&env.db()).unwrap());
    let db = Db::open(&env.db(), "encrypt-pw", OpenMode::Existing).unwrap();
    assert_eq!(db.list_credential_sets().unwrap(), ["default", "other"]);
    assert_eq!(
        db.load_credential("default", "anthropic").unwrap().unwrap()["key"],
        "sk-plain-1"
    );
    assert_eq!(
        db.load_credential("default", "github").unwrap().unwrap()["token"],
        "ghp-plain-2"
    );
    assert_eq!(
        db.load_credential("other", "openai").unwrap().unwrap()["access_token"],
        "at-plain-3"
    );
    assert!(
        db.lookup_token("terok-p-0123456789abcdef0123456789abcdef")
            .unwrap()
            .is_some()
    );
    assert_eq!(db.user_version().unwrap(), 4);
    drop(db);
    let backups: Vec<PathBuf> = fs::read_dir(env.p("vault"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".plaintext-backup-"))
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert!(backups[0].to_string_lossy().ends_with(".tar.gz"));
    assert_eq!(
        fs::metadata(&backups[0]).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let listing = Command::new("tar")
        .arg("-tzf")
        .arg(&backups[0])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&listing.stdout).contains("credentials.db"));
    assert!(e.contains(&backups[0].display().to_string()), "{e}");

    // Already encrypted: refused, nothing changes.
    let before = snapshot(&env.p("vault"));
    let refused = fails(
        env.admin(&["credentials", "encrypt-db"]),
        "encrypt-db twice",
    );
    assert!(refused.contains("already SQLCipher-encrypted"), "{refused}");
    assert_eq!(snapshot(&env.p("vault")), before);
}

#[test]
fn encrypt_db_refuses_when_its_target_exists() {
    let env = VEnv::new();
    env.use_command("encrypt-pw");
    plaintext_vault(&env.db());
    let target = env.p("vault/credentials.db.encrypting");
    fs::write(&target, "someone else's file").unwrap();
    let before = snapshot(&env.p("vault"));
    let e = fails(
        env.admin(&["credentials", "encrypt-db"]),
        "encrypt-db over a target",
    );
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(snapshot(&env.p("vault")), before);
    assert!(store::is_plaintext(&env.db()).unwrap());
}

// ---- acceptance 6: no secret printed unless asked -------------------------------------------

#[test]
fn no_command_prints_a_secret_unless_asked() {
    let env = VEnv::new();
    let pw = "quiet-passphrase-XYZ";
    env.use_command(pw);
    let secret = "sk-quiet-SECRET-value";
    let mut outputs = Vec::new();
    outputs.push(env.run(
        "terok-admin",
        &["credentials", "set", "default", "anthropic"],
        &format!("{secret}\n"),
    ));
    let db = Db::open(&env.db(), pw, OpenMode::Existing).unwrap();
    let token = db.create_token("sc", "ct", "default", "anthropic").unwrap();
    drop(db);
    for args in [
        &["vault", "status"][..],
        &["vault", "status", "--json"],
        &["vault", "list"],
        &["vault", "list", "--include-tokens"],
        &["vault", "list", "--include-tokens", "--json"],
        &["credentials", "list"],
        &["credentials", "list", "--json"],
        &["vault", "passphrase", "reveal"],
        &["vault", "passphrase", "change"],
        &["vault", "unlock"],
    ] {
        outputs.push(env.admin(args));
    }
    // With TEROK_LOG=trace too: logs never carry secrets either.
    outputs.push(
        env.cmd("terok-admin", &["vault", "list", "--include-tokens"])
            .env("TEROK_LOG", "trace")
            .stdin(Stdio::null())
            .output()
            .unwrap(),
    );
    for out in &outputs {
        let (o, e) = text(out);
        for needle in [pw, secret, token.as_str()] {
            assert!(!o.contains(needle), "stdout holds {needle:?}: {o}");
            assert!(!e.contains(needle), "stderr holds {needle:?}: {e}");
        }
    }
    // reveal without a terminal refuses rather than print to a pipe.
    let e = fails(
        env.admin(&["vault", "passphrase", "reveal"]),
        "reveal without tty",
    );
    assert!(e.contains("--allow-redirect"), "{e}");
    // Asked explicitly: stdout is exactly the passphrase, stderr never holds it.
    let out = env.admin(&["vault", "passphrase", "reveal", "--allow-redirect"]);
    let (o, e) = text(&out);
    assert!(out.status.success(), "{e}");
    assert_eq!(o, format!("{pw}\n"));
    assert!(!e.contains(pw));
}

#[test]
fn non_interactive_setup_fails_closed_without_a_tier() {
    let env = VEnv::new();
    env.config("credentials:\n  use_keyring: false\n");
    let hooks = env.p("hooks");
    let h = hooks.to_str().unwrap();
    if tiers::systemd::unavailable_reason().is_some() {
        let e = fails(
            env.admin(&["setup", "--no-register", "--hooks-dir", h]),
            "setup without tier",
        );
        assert!(e.contains("--passphrase-tier"), "{e}");
        assert!(!env.db().exists());
    }
    let e = fails(
        env.admin(&[
            "setup",
            "--no-register",
            "--hooks-dir",
            h,
            "--passphrase-tier",
            "config",
        ]),
        "unknown tier",
    );
    assert!(
        e.contains("expected one of: systemd-creds, keyring, kernel-keyring"),
        "{e}"
    );
    // Validated before the hooks phase touched anything.
    assert_eq!(fs::read_dir(&hooks).unwrap().count(), 0);
    // A minted passphrase with no terminal and no --echo-passphrase is refused.
    let e = fails(
        env.admin(&[
            "setup",
            "--no-register",
            "--hooks-dir",
            h,
            "--passphrase-tier",
            "kernel-keyring",
        ]),
        "mint without a terminal",
    );
    assert!(e.contains("--echo-passphrase"), "{e}");
    assert!(tiers::kernel::load(&env.db()).is_none());
    // With it, the kernel-keyring tier is provisioned and the DB created.
    let out = env.admin_ok(&[
        "setup",
        "--no-register",
        "--hooks-dir",
        h,
        "--passphrase-tier",
        "kernel-keyring",
        "--echo-passphrase",
    ]);
    let minted = out
        .lines()
        .find_map(|l| l.strip_prefix("Vault passphrase: "))
        .unwrap()
        .to_owned();
    assert_eq!(tiers::kernel::load(&env.db()).unwrap().as_str(), minted);
    Db::open(&env.db(), &minted, OpenMode::Existing).unwrap();
}

// ---- passphrase change -----------------------------------------------------------------------

#[test]
fn passphrase_change_rekeys_and_rewrites_the_cache() {
    let env = VEnv::new();
    env.config("credentials:\n  use_keyring: false\n");
    ok(
        env.run("terok-admin", &["vault", "unlock"], "old-pass\n"),
        &["unlock"],
    );
    ok(
        env.run(
            "terok-admin",
            &["credentials", "set", "default", "anthropic"],
            "sk-change\n",
        ),
        &["set"],
    );
    let out = ok(
        env.run(
            "terok-admin",
            &["vault", "passphrase", "change"],
            "new-pass\n",
        ),
        &["change"],
    );
    assert!(out.contains("re-encrypted"), "{out}");
    assert!(!out.contains("new-pass"));
    assert_eq!(tiers::kernel::load(&env.db()).unwrap().as_str(), "new-pass");
    assert!(Db::open(&env.db(), "old-pass", OpenMode::Existing).is_err());
    let db = Db::open(&env.db(), "new-pass", OpenMode::Existing).unwrap();
    assert_eq!(
        db.load_credential("default", "anthropic").unwrap().unwrap()["key"],
        "sk-change"
    );
    assert!(
        store::existing_sidecars(&env.db())
            .iter()
            .all(|p| !p.ends_with("-journal"))
    );
    // A piped empty line cannot mint (it could never be shown): refused, nothing changed.
    let e = fails(
        env.run("terok-admin", &["vault", "passphrase", "change"], "\n"),
        "change to a generated passphrase without a terminal",
    );
    assert!(e.contains("nothing was changed"), "{e}");
    Db::open(&env.db(), "new-pass", OpenMode::Existing).unwrap();
}

// ---- launch integration ------------------------------------------------------------------------

#[test]
fn prepare_mints_and_cleanup_revokes_the_containers_tokens() {
    let env = VEnv::new();
    let pw = "launch-pw";
    env.use_command(pw);
    ok(
        env.run(
            "terok-admin",
            &["credentials", "set", "proj", "anthropic"],
            "sk-launch\n",
        ),
        &["set"],
    );
    let name = format!("vault-e2e-{}", terok_e2e::unique());
    let prep = env.run(
        "terok-run",
        &["prepare", &name, "--scope", "proj", "--no-shield"],
        "",
    );
    ok(prep, &["prepare"]);
    let db = Db::open(&env.db(), pw, OpenMode::Existing).unwrap();
    let mut providers: Vec<String> = db
        .list_tokens()
        .unwrap()
        .into_iter()
        .filter(|t| t.scope == "proj" && t.subject == name)
        .map(|t| t.provider)
        .collect();
    providers.sort();
    assert_eq!(providers, ["anthropic", "ssh"]);
    drop(db);

    // A locked vault at cleanup: a warning naming scope, container and the command to run;
    // the rest of cleanup still happens.
    env.config("credentials:\n  use_keyring: false\n");
    let out = env.run("terok-run", &["cleanup", &name], "");
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}{e}");
    assert!(
        e.contains("scope proj")
            && e.contains(&format!("container {name}"))
            && e.contains(&format!("terok-admin vault revoke proj {name}")),
        "{e}"
    );
    assert!(!env.p(&format!("root/sandbox/sidecar/{name}.json")).exists());
    // The named command then revokes them.
    env.use_command(pw);
    let out = env.admin_ok(&["vault", "revoke", "proj", &name]);
    assert!(out.contains("revoked 2"), "{out}");

    // Prepared again and cleaned up with the vault unlocked: revoked by cleanup itself.
    ok(
        env.run(
            "terok-run",
            &["prepare", &name, "--scope", "proj", "--no-shield"],
            "",
        ),
        &["prepare again"],
    );
    ok(env.run("terok-run", &["cleanup", &name], ""), &["cleanup"]);
    let db = Db::open(&env.db(), pw, OpenMode::Existing).unwrap();
    assert!(db.list_tokens().unwrap().iter().all(|t| t.subject != name));
}

#[test]
fn a_container_without_scope_never_opens_the_vault_and_a_locked_vault_blocks_scoped_prepare() {
    let env = VEnv::new();
    // A helper that would fail closed if anything consulted the vault.
    env.config("credentials:\n  use_keyring: false\n  passphrase_command: 'false'\n");
    let name = format!("vault-e2e-{}", terok_e2e::unique());
    ok(
        env.run("terok-run", &["prepare", &name, "--no-shield"], ""),
        &["prepare without scope"],
    );
    ok(env.run("terok-run", &["cleanup", &name], ""), &["cleanup"]);
    assert!(!env.db().exists());
    // With a scope, the broken tier stops prepare before the sidecar is written.
    env.config("credentials:\n  use_keyring: false\n");
    let out = env.run(
        "terok-run",
        &["prepare", &name, "--scope", "proj", "--no-shield"],
        "",
    );
    let e = fails(out, "scoped prepare on a locked vault");
    assert!(e.contains("phantom tokens of scope proj"), "{e}");
    assert!(!env.p(&format!("root/sandbox/sidecar/{name}.json")).exists());
}

// ---- migrations from the oldest schema ---------------------------------------------------------

/// `ssh-keygen -p` rewrites a PKCS#8 key in OpenSSH's own format: the format v0 stored.
fn to_openssh_pem(dir: &Path, name: &str, pkcs8_der: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs8_der);
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    let file = dir.join(name);
    fs::write(&file, pem).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new("ssh-keygen")
        .args(["-q", "-p", "-P", "", "-N", "", "-f"])
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .expect("ssh-keygen (openssh-client) is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let converted = fs::read(&file).unwrap();
    assert!(contains(&converted, "BEGIN OPENSSH PRIVATE KEY"));
    converted
}

/// id, key_type, private_der, public_blob, comment, fingerprint
type KeyRow = (i64, String, Vec<u8>, Vec<u8>, String, String);

#[test]
fn a_v0_vault_migrates_to_v4_with_the_originals_key_bytes() {
    let env = VEnv::new();
    env.copy_fixture();
    // The original's own v4 rows are the expected result of migrating their v0 form.
    let db = Db::open(&env.db(), FIXTURE_PW, OpenMode::Existing).unwrap();
    let keys: Vec<KeyRow> = {
        let mut s = db
            .connection()
            .prepare("SELECT id, key_type, private_der, public_blob, comment, fingerprint FROM ssh_keys ORDER BY id")
            .unwrap();
        s.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    };
    drop(db);
    assert_eq!(keys.len(), 2);
    let old = env.p("vault/old.db");
    {
        let c = rusqlite::Connection::open(&old).unwrap();
        c.pragma_update(None, "key", "v0-pass").unwrap();
        c.execute_batch(
            "PRAGMA cipher_compatibility = 4;
             CREATE TABLE credentials (credential_set TEXT NOT NULL, provider TEXT NOT NULL, data TEXT NOT NULL, PRIMARY KEY (credential_set, provider));
             CREATE TABLE ssh_keys (id INTEGER PRIMARY KEY AUTOINCREMENT, key_type TEXT NOT NULL, private_pem BLOB NOT NULL, public_blob BLOB NOT NULL, comment TEXT NOT NULL DEFAULT '', fingerprint TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL DEFAULT (datetime('now')));
             CREATE TABLE ssh_key_assignments (scope TEXT NOT NULL, key_id INTEGER NOT NULL REFERENCES ssh_keys(id) ON DELETE CASCADE, assigned_at TEXT NOT NULL DEFAULT (datetime('now')), PRIMARY KEY (scope, key_id));
             CREATE TABLE proxy_tokens (token TEXT PRIMARY KEY, scope TEXT NOT NULL, task TEXT NOT NULL, credential_set TEXT NOT NULL, provider TEXT NOT NULL);
             CREATE TABLE ssh_keys_version (v INTEGER);
             INSERT INTO credentials VALUES ('default', 'claude', '{\"type\":\"oauth\",\"access_token\":\"at-v0\"}');
             INSERT INTO credentials VALUES ('default', 'gh', '{\"token\":\"ghp-v0\"}');
             INSERT INTO proxy_tokens VALUES ('terok-p-00112233445566778899aabbccddeeff', 'demo', 'task-1', 'default', 'claude');",
        )
        .unwrap();
        for (id, kind, der, blob, comment, _) in &keys {
            // The ed25519 key is the fixture's own OpenSSH file (ssh-keygen 9.2 cannot read an
            // ed25519 PKCS#8 key); the RSA key is converted by ssh-keygen.
            let pem = if kind == "ed25519" {
                fs::read(Path::new(FIXTURE).join("keys/id_ed25519")).unwrap()
            } else {
                to_openssh_pem(env.p("").as_path(), &format!("key{id}"), der)
            };
            let hex: String = {
                use sha2::Digest;
                sha2::Sha256::digest(blob)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            };
            c.execute(
                "INSERT INTO ssh_keys (id, key_type, private_pem, public_blob, comment, fingerprint) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                rusqlite::params![id, kind, pem, blob, comment, hex],
            )
            .unwrap();
            c.execute(
                "INSERT INTO ssh_key_assignments (scope, key_id) VALUES ('demo', ?1)",
                [id],
            )
            .unwrap();
        }
    }
    let db = Db::open(&old, "v0-pass", OpenMode::Existing).unwrap();
    assert_eq!(db.user_version().unwrap(), 4);
    for (id, kind, der, _, comment, fingerprint) in &keys {
        let (got_der, got_fp, got_comment): (Vec<u8>, String, String) = db
            .connection()
            .query_row(
                "SELECT private_der, fingerprint, comment FROM ssh_keys WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(&got_der, der, "{kind} key {id}: PKCS#8 bytes differ");
        assert_eq!(&got_fp, fingerprint);
        assert_eq!(&got_comment, comment);
    }
    let listed = db.list_ssh_keys_for_scope("demo").unwrap();
    assert_eq!(listed.len(), 2);
    let tokens = db.list_tokens().unwrap();
    assert_eq!(
        (tokens[0].subject.as_str(), tokens[0].provider.as_str()),
        ("task-1", "anthropic")
    );
    assert_eq!(
        db.list_credentials("default").unwrap(),
        ["anthropic", "github"]
    );
    drop(db);
    // Re-opening the migrated vault is a no-op.
    let again = Db::open(&old, "v0-pass", OpenMode::Existing).unwrap();
    assert_eq!(again.user_version().unwrap(), 4);
}
