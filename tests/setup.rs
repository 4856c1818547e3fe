//! Acceptance 10 (rootful): `terok-admin setup` registers the hooks where a plain rootful
//! `podman run` reads them, keeps the hooks podman already read, and `uninstall` undoes it.
//! This test touches the real `/etc/containers/containers.conf.d` and
//! `/usr/share/containers/oci/hooks.d`; it restores them even when it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use terok_e2e::*;

const DROP_IN: &str = "/etc/containers/containers.conf.d/99-terok.conf";

/// Puts back what the test touched, whatever happens.
struct Restore {
    saved: Vec<(PathBuf, Option<Vec<u8>>)>,
    admin: Command,
}

impl Restore {
    fn new(paths: &[&Path], admin: Command) -> Restore {
        Restore {
            saved: paths
                .iter()
                .map(|p| (p.to_path_buf(), std::fs::read(p).ok()))
                .collect(),
            admin,
        }
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = self.admin.arg("uninstall").output();
        for (path, content) in &self.saved {
            match content {
                Some(bytes) => {
                    let _ = std::fs::write(path, bytes);
                }
                None => {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

#[test]
fn setup_makes_plain_rootful_podman_run_shielded() {
    require_e2e();
    ensure_images();
    let id = unique();
    let dir = tempfile::tempdir().unwrap();
    let terok = |bin_name: &str| {
        let mut cmd = Command::new(bin(bin_name));
        cmd.env("TEROK_ROOT", dir.path().join("root"))
            .env("TEROK_SANDBOX_RUNTIME_DIR", dir.path().join("run"))
            .env("TEROK_CONFIG_DIR", dir.path().join("config"))
            .env("TEROK_CONFIG_FILE", dir.path().join("config.yml"))
            .env_remove("CONTAINERS_CONF");
        cmd
    };
    // A hook podman already reads (a test probe in the default dir) must keep firing.
    let probe_hook = PathBuf::from(format!(
        "/usr/share/containers/oci/hooks.d/zz-terok-e2e-probe-{id}.json"
    ));
    let probe_script = dir.path().join("probe.sh");
    let probe_mark = dir.path().join("probe-fired");
    let _restore = Restore::new(&[Path::new(DROP_IN), &probe_hook], terok("terok-admin"));
    std::fs::write(
        &probe_script,
        format!(
            "#!/bin/sh\ncat >/dev/null\ntouch {}\n",
            probe_mark.display()
        ),
    )
    .unwrap();
    run_ok(Command::new("chmod").arg("755").arg(&probe_script));
    std::fs::create_dir_all("/usr/share/containers/oci/hooks.d").unwrap();
    std::fs::write(
        &probe_hook,
        format!(
            r#"{{"version":"1.0.0","hook":{{"path":"{}"}},"when":{{"annotations":{{"^terok-e2e-probe$":"^{id}$"}}}},"stages":["poststop"]}}"#,
            probe_script.display()
        ),
    )
    .unwrap();

    std::fs::create_dir_all(dir.path().join("config/shield/profiles")).unwrap();
    std::fs::write(dir.path().join("config.yml"), "shield:\n  profiles: []\n").unwrap();
    let host = TestHost::new(&id);
    let _a = host.serve(host.v4[0], 8080);
    let _b = host.serve(host.v4[1], 8080);
    std::fs::write(
        dir.path().join("config/shield/profiles/t.txt"),
        format!("{}\n", host.v4[0]),
    )
    .unwrap();

    let out = run_ok(terok("terok-admin").args(["setup", "--no-vault"]));
    assert!(out.contains(DROP_IN), "{out}");
    let drop_in = std::fs::read_to_string(DROP_IN).unwrap();
    assert!(
        drop_in.contains("/usr/share/containers/oci/hooks.d"),
        "{drop_in}"
    );
    assert!(
        drop_in.contains(&dir.path().join("root/hooks.d").display().to_string()),
        "{drop_in}"
    );
    let again = run_ok(terok("terok-admin").args(["setup", "--no-vault"]));
    assert!(
        again.contains("unchanged") && !again.contains("written"),
        "setup is not idempotent: {again}"
    );

    // Plain podman: only this VM's needs as flags (runc, ulimits), nothing terok-specific.
    let name = format!("tk-setup-{id}");
    let flags: Vec<String> = serde_json::from_str(&run_ok(terok("terok-run").args([
        "prepare",
        &name,
        "--profiles",
        "t",
        "--json",
    ])))
    .unwrap();
    let script = format!(
        "nc -vz -w 5 {} 8080 2>&1; echo rc=$?; nc -vz -w 5 {} 8080 2>&1; echo rc=$?",
        host.v4[0], host.v4[1]
    );
    let out = run(Command::new("podman")
        .env_remove("CONTAINERS_CONF")
        .args(["--runtime", "runc", "run", "--rm"])
        .args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ])
        .args(&flags)
        .args(["--annotation", &format!("terok-e2e-probe={id}")])
        .args([IMAGE, "sh", "-c", &script]));
    let text = stdout(&out);
    assert!(
        text.contains("succeeded") && text.contains("rc=0"),
        "allowed host unreachable: {text}{}",
        stderr(&out)
    );
    assert!(
        text.contains("No route to host"),
        "not shielded after setup: {text}"
    );
    assert!(
        probe_mark.exists(),
        "a hook podman read before setup no longer fires"
    );

    let out = run_ok(terok("terok-admin").arg("uninstall"));
    assert!(out.contains("removed"), "{out}");
    assert!(!Path::new(DROP_IN).exists());
    assert!(
        !dir.path()
            .join("root/hooks.d/terok-precreate.json")
            .exists()
    );
    run_ok(terok("terok-run").args(["cleanup", &name]));
}
