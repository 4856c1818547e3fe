//! The command-line contract of terok-run and terok-admin: output formats, bad input (one
//! clear line, non-zero exit, nothing written) and cleanup.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use terok_e2e::{bin, run, run_ok, run_with_stdin, stderr, stdout};

/// An isolated terok environment without podman: temp roots for state, runtime and config.
struct Iso {
    dir: tempfile::TempDir,
}

impl Iso {
    fn new() -> Iso {
        let iso = Iso {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(iso.profiles()).unwrap();
        std::fs::write(
            iso.dir.path().join("config.yml"),
            "shield:\n  profiles: []\n",
        )
        .unwrap();
        iso
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn profiles(&self) -> PathBuf {
        self.dir.path().join("config/shield/profiles")
    }

    fn cmd(&self, name: &str) -> Command {
        let mut cmd = Command::new(bin(name));
        cmd.env("TEROK_ROOT", self.root())
            .env("TEROK_SANDBOX_RUNTIME_DIR", self.dir.path().join("run"))
            .env("TEROK_CONFIG_DIR", self.dir.path().join("config"))
            .env("TEROK_CONFIG_FILE", self.dir.path().join("config.yml"));
        cmd
    }

    fn terok_run(&self, args: &[&str]) -> Output {
        run(self.cmd("terok-run").args(args))
    }

    /// Every regular file under the state and runtime roots.
    fn files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = entry.path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root(), &mut out);
        walk(&self.dir.path().join("run"), &mut out);
        out
    }
}

/// One clear line on stderr, a non-zero exit, and no state written.
fn assert_rejected(iso: &Iso, out: &Output, code: i32, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "exit code; stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert!(iso.files().is_empty(), "state written: {:?}", iso.files());
    assert!(!iso.root().exists(), "state root created");
}

#[test]
fn prepare_prints_flags_and_writes_a_private_sidecar() {
    let iso = Iso::new();
    std::fs::write(iso.profiles().join("t.txt"), "10.9.8.7\n2001:db8::/32\n").unwrap();
    let line = stdout(&iso.terok_run(&["prepare", "web", "--profiles", "t"]));
    let sidecar = iso.root().join("sandbox/sidecar/web.json");
    let expected = format!(
        "--cap-drop NET_ADMIN,NET_RAW --name web --annotation terok.sandbox.sidecar={}\n",
        sidecar.display()
    );
    assert_eq!(line, expected);
    let meta = std::fs::symlink_metadata(&sidecar).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&sidecar).unwrap()).unwrap();
    assert_eq!(
        doc["shield"]["allow"],
        serde_json::json!(["10.9.8.7/32", "2001:db8::/32"])
    );

    let json = stdout(&iso.terok_run(&["prepare", "web", "--profiles", "t", "--json"]));
    let flags: Vec<String> = serde_json::from_str(&json).unwrap();
    assert_eq!(
        flags[flags.len() - 1],
        format!("terok.sandbox.sidecar={}", sidecar.display())
    );

    // `--profiles` replaces the list entirely; an empty list is an empty allowlist.
    run_ok(
        iso.cmd("terok-run")
            .args(["prepare", "web", "--profiles", ""]),
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&sidecar).unwrap()).unwrap();
    assert_eq!(doc["shield"]["allow"], serde_json::json!([]));
    // The greedy `--profiles a b` form is a usage error.
    let out = iso.terok_run(&["prepare", "web", "--profiles", "t", "x"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_symlink_at_the_sidecar_path_is_replaced_not_followed() {
    let iso = Iso::new();
    let dir = iso.root().join("sandbox/sidecar");
    std::fs::create_dir_all(&dir).unwrap();
    let victim = iso.dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("web.json")).unwrap();
    run_ok(
        iso.cmd("terok-run")
            .args(["prepare", "web", "--profiles", ""]),
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(
        std::fs::symlink_metadata(dir.join("web.json"))
            .unwrap()
            .is_file()
    );
}

#[test]
fn bad_input_is_one_line_nonzero_and_writes_nothing() {
    let iso = Iso::new();
    std::fs::write(iso.profiles().join("bad.txt"), "10.0.0.1\n300.1.1.1\n").unwrap();
    std::fs::write(iso.profiles().join("ok.txt"), "10.0.0.1\n").unwrap();
    for (args, code, needle) in [
        (&["prepare", "../x"][..], 1, "unsafe container name"),
        (&["prepare", "a/b"], 1, "unsafe container name"),
        (&["prepare", "a b"], 1, "unsafe container name"),
        (&["prepare", "c", "--scope", "a/b"], 1, "invalid scope"),
        (&["prepare", "c", "--scope", "%ssh"], 1, "invalid scope"),
        (
            &["prepare", "c", "--profiles", "../etc/passwd"],
            1,
            "invalid profile name",
        ),
        (
            &["prepare", "c", "--profiles", "nope"],
            1,
            "profile \"nope\" not found",
        ),
        (&["prepare", "c", "--profiles", "bad"], 1, "bad.txt:2"),
        (&["run", "../x", "--", "img"], 125, "unsafe container name"),
        (
            &["run", "c", "--profiles", "ok", "--"],
            125,
            "no image given",
        ),
        (
            &["run", "c", "--profiles", "ok", "--", "--name", "x", "img"],
            125,
            "--name",
        ),
        (
            &[
                "run",
                "c",
                "--profiles",
                "ok",
                "--",
                "--cap-add=SYS_ADMIN",
                "img",
            ],
            125,
            "--cap-add",
        ),
        (
            &["run", "c", "--profiles", "ok", "--", "--privileged", "img"],
            125,
            "--privileged",
        ),
        (
            &[
                "run",
                "c",
                "--profiles",
                "ok",
                "--",
                "-v",
                "/x:/run/terok",
                "img",
            ],
            125,
            "/run/terok",
        ),
        (
            &[
                "run",
                "c",
                "--profiles",
                "ok",
                "--",
                "--mount",
                "type=bind,src=/x,dst=/run/terok/a",
                "img",
            ],
            125,
            "/run/terok/a",
        ),
        (
            &[
                "run",
                "c",
                "--profiles",
                "ok",
                "--",
                "--network",
                "host",
                "img",
            ],
            125,
            "--network host is refused",
        ),
        (
            &[
                "run",
                "c",
                "--profiles",
                "ok",
                "--",
                "--net=container:x",
                "img",
            ],
            125,
            "refused",
        ),
        (
            &[
                "run",
                "c",
                "--profiles",
                "ok",
                "--",
                "--pull=never",
                "localhost/terok-missing-image:none",
                "true",
            ],
            125,
            "not present locally",
        ),
    ] {
        let out = iso.terok_run(args);
        assert_rejected(&iso, &out, code, needle);
    }
    for (args, needle) in [
        (
            &["shield", "allow", "c", "1.2.3.4; drop"][..],
            "is not an IP address, CIDR or domain",
        ),
        (
            &["shield", "deny", "c", "300.1.1.1"],
            "is not an IP address, CIDR or domain",
        ),
        (
            &["shield", "allow", "../c", "10.0.0.1"],
            "unsafe container name",
        ),
        (
            &["shield", "allow", "c", "10.0.0.1"],
            "no terok state for container c",
        ),
    ] {
        let out = run(iso.cmd("terok-admin").args(args));
        assert_rejected(&iso, &out, 1, needle);
    }
    std::fs::write(
        iso.dir.path().join("config.yml"),
        "shield:\n  profile: [x]\n",
    )
    .unwrap();
    let out = iso.terok_run(&["prepare", "c"]);
    assert_rejected(&iso, &out, 1, "unknown field `profile`");
}

#[test]
fn cleanup_removes_everything_and_is_idempotent() {
    let iso = Iso::new();
    std::fs::write(iso.profiles().join("t.txt"), "10.0.0.1\n").unwrap();
    let out = iso.terok_run(&["cleanup", "never-prepared"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("No terok state found for never-prepared"));

    run_ok(
        iso.cmd("terok-run")
            .args(["prepare", "c1", "--profiles", "t"]),
    );
    run_ok(
        iso.cmd("terok-run")
            .args(["prepare", "c2", "--profiles", "t"]),
    );
    // A live decision adds per-container state of its own.
    run_ok(
        iso.cmd("terok-admin")
            .args(["shield", "deny", "c1", "10.0.0.2"]),
    );
    let runtime = iso.dir.path().join("run/run/c1");
    std::fs::create_dir_all(&runtime).unwrap();
    std::fs::write(runtime.join("sock"), "").unwrap();
    assert!(iso.files().len() >= 4, "{:?}", iso.files());

    let out = run_ok(iso.cmd("terok-run").args(["cleanup", "c1"]));
    assert!(out.contains("Cleaned up terok state for c1"), "{out}");
    let left: Vec<PathBuf> = iso.files();
    assert!(
        left.iter().all(|f| f.to_string_lossy().contains("c2")),
        "c1 leftovers: {left:?}"
    );
    assert!(!runtime.exists());
    let out = run_ok(iso.cmd("terok-run").args(["cleanup", "c1"]));
    assert!(out.contains("No terok state found for c1"), "{out}");
    run_ok(iso.cmd("terok-run").args(["cleanup", "c2"]));
    assert!(iso.files().is_empty(), "{:?}", iso.files());
}

#[test]
fn hook_passes_foreign_and_bad_documents_safely() {
    // Not ours: the config goes back byte for byte.
    let doc = br#"{"ociVersion":"1.0.2-dev","x-unknown":{"keep":[1,2]},"annotations":{"a":"b"}}"#;
    let out = run_hook("precreate", doc);
    assert!(out.status.success());
    assert_eq!(out.stdout, doc);
    // Garbage on stdin fails (podman refuses the container) and prints nothing on stdout.
    let out = run_hook("precreate", b"not json");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    // A sidecar annotation pointing anywhere but a sidecar dir is refused.
    let doc = br#"{"annotations":{"terok.sandbox.sidecar":"/etc/passwd"}}"#;
    let out = run_hook("precreate", doc);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    // poststop never fails.
    assert!(run_hook("poststop", b"garbage").status.success());
    assert!(run_hook("poststop", doc).status.success());
}

fn run_hook(stage: &str, input: &[u8]) -> Output {
    run_with_stdin(
        Command::new(bin("terok-hook")).arg(stage).env_clear(),
        input,
    )
}

#[test]
fn completions_and_man_pages_come_from_the_clap_definitions() {
    for (bin_name, verb) in [("terok-admin", "shield"), ("terok-run", "prepare")] {
        for (what, marker) in [
            ("bash", "complete -F"),
            ("zsh", "#compdef"),
            ("fish", "complete -c"),
            ("man", ".TH"),
        ] {
            let out = run(Command::new(bin(bin_name)).args(["docs", what]));
            let text = stdout(&out);
            assert!(
                out.status.success(),
                "{bin_name} docs {what}: {}",
                stderr(&out)
            );
            assert!(
                text.contains(marker) && text.contains(verb),
                "{bin_name} docs {what}"
            );
        }
    }
}
