//! Acceptance 6 and the rootless half of acceptance 10: a rootless user (created by the test,
//! slirp4netns) runs `terok-admin setup`, and a plain `podman run $(terok-run prepare …)`
//! is shielded; live `shield allow` works through podman's user namespace.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use terok_e2e::*;

const USER: &str = "terok-e2e";

struct Rootless {
    uid: u32,
    home: PathBuf,
    root: PathBuf,
    bin: tempfile::TempDir,
}

impl Rootless {
    fn new(id: &str) -> Rootless {
        require_e2e();
        if run(Command::new("id").arg(USER)).status.code() != Some(0) {
            run_ok(Command::new("useradd").args(["-m", "-s", "/bin/sh", USER]));
        }
        for file in ["/etc/subuid", "/etc/subgid"] {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            if !text.lines().any(|l| l.starts_with(&format!("{USER}:"))) {
                std::fs::write(file, format!("{text}{USER}:300000:65536\n")).unwrap();
            }
        }
        // As on a normal distribution: slirp4netns needs /dev/net/tun.
        run_ok(Command::new("chmod").args(["666", "/dev/net/tun"]));
        let uid: u32 = run_ok(Command::new("id").args(["-u", USER]))
            .trim()
            .parse()
            .unwrap();
        let home = PathBuf::from(format!("/home/{USER}"));
        // Our binaries, where the test user can execute them.
        let bin = tempfile::Builder::new()
            .prefix("terok-e2e-bin-")
            .tempdir()
            .unwrap();
        for name in [
            "terok-hook",
            "terok-run",
            "terok-admin",
            "terok-supervisor",
            "terok-service",
        ] {
            std::fs::copy(terok_e2e::bin(name), bin.path().join(name)).unwrap();
        }
        run_ok(Command::new("chmod").arg("-R").arg("a+rX").arg(bin.path()));
        let rl = Rootless {
            uid,
            root: home.join(format!("tk-{id}")),
            home,
            bin,
        };
        let runtime = rl.runtime_dir();
        std::fs::create_dir_all(&runtime).unwrap();
        run_ok(Command::new("chown").arg(USER).arg(&runtime));
        run_ok(Command::new("chmod").arg("700").arg(&runtime));
        // This VM's needs (TESTING.md), as the user's own drop-in: runc, no ulimit raise,
        // cgroupfs without systemd.
        rl.sh(
            "mkdir -p ~/.config/containers/containers.conf.d && printf '[containers]\\ndefault_ulimits = []\\n[engine]\\nruntime = \"runc\"\\ncgroup_manager = \"cgroupfs\"\\nevents_logger = \"file\"\\n' > ~/.config/containers/containers.conf.d/50-terok-e2e-vm.conf",
        );
        rl
    }

    fn runtime_dir(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/terok-e2e-run-{}", self.uid))
    }

    fn bin(&self, name: &str) -> String {
        self.bin.path().join(name).display().to_string()
    }

    /// Run a shell script as the test user, with a clean environment.
    fn sh_out(&self, script: &str) -> Output {
        run(Command::new("runuser")
            .args(["-u", USER, "--", "env", "-i"])
            .arg(format!("HOME={}", self.home.display()))
            .arg(format!("XDG_RUNTIME_DIR={}", self.runtime_dir().display()))
            .arg("PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .arg(format!("TEROK_ROOT={}", self.root.display()))
            .arg(format!("TEROK_CONFIG_DIR={}/config", self.root.display()))
            .arg(format!(
                "TEROK_CONFIG_FILE={}/config.yml",
                self.root.display()
            ))
            .args(["sh", "-c", script])
            .current_dir("/tmp"))
    }

    fn sh(&self, script: &str) -> String {
        let out = self.sh_out(script);
        assert!(
            out.status.success(),
            "as {USER}: {script}\nstdout: {}\nstderr: {}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }
}

impl Drop for Rootless {
    fn drop(&mut self) {
        let _ = self.sh_out(&format!(
            "podman ps -aq --filter name=tk-rl- | xargs -r podman rm -f -t 0; {} uninstall; rm -rf {}",
            self.bin("terok-admin"),
            self.root.display()
        ));
    }
}

#[test]
fn rootless_setup_and_shielded_run() {
    let id = unique();
    let rl = Rootless::new(&id);
    let host = TestHost::new(&id);
    let _a = host.serve(host.v4[0], 8080);
    let _b = host.serve(host.v4[1], 8080);
    let (allowed, blocked) = (host.v4[0], host.v4[1]);
    // The busybox image in the user's own storage.
    let tar = Path::new("/var/tmp/terok-busybox.tar");
    if !tar.exists() {
        run_ok(
            Command::new("podman")
                .args(["save", "-o"])
                .arg(tar)
                .arg(BUSYBOX_IMAGE),
        );
        run_ok(Command::new("chmod").arg("644").arg(tar));
    }
    rl.sh(&format!(
        "podman image exists {BUSYBOX_IMAGE} || podman load -q -i {}",
        tar.display()
    ));
    rl.sh(&format!(
        "mkdir -p $TEROK_ROOT/config/shield/profiles && echo {allowed} > $TEROK_ROOT/config/shield/profiles/t.txt && printf 'rootless-pw' > $TEROK_ROOT/passphrase && chmod 600 $TEROK_ROOT/passphrase && printf 'shield:\\n  profiles: []\\ncredentials:\\n  use_keyring: false\\n  passphrase_command: /bin/cat %s/passphrase\\n' $TEROK_ROOT > $TEROK_CONFIG_FILE"
    ));

    let out = rl.sh(&format!("{} setup --no-vault", rl.bin("terok-admin")));
    assert!(
        out.contains(".config/containers/containers.conf.d/99-terok.conf"),
        "{out}"
    );

    // A plain rootless `podman run $(terok-run prepare …)`: no extra podman flag.
    let name = format!("tk-rl-{id}");
    let probe = format!(
        "echo | nc -w 5 {allowed} 8080; echo rc=$?; echo | nc -w 5 {blocked} 8080; echo rc=$?"
    );
    let out = rl.sh_out(&format!(
        "podman run --rm $({} prepare {name} --profiles t) {BUSYBOX_IMAGE} sh -c '{probe}' 2>&1",
        rl.bin("terok-run")
    ));
    let text = stdout(&out);
    assert!(
        text.contains("hello") && text.contains("rc=0"),
        "allowed host unreachable: {text}"
    );
    assert!(
        text.contains(&format!("({blocked}): No route to host")),
        "blocked host not refused: {text}"
    );

    // Live allow from the host side of a rootless container.
    rl.sh(&format!(
        "{} run {name} --profiles t -- -d {BUSYBOX_IMAGE} sleep 300",
        rl.bin("terok-run")
    ));
    let check =
        format!("podman exec {name} sh -c 'echo | nc -w 5 {blocked} 8080; echo rc=$?' 2>&1");
    assert!(rl.sh(&check).contains("No route to host"));
    let out = rl.sh(&format!(
        "{} shield allow {name} {blocked}",
        rl.bin("terok-admin")
    ));
    assert!(out.contains("Allowed"), "{out}");
    let after = rl.sh(&check);
    assert!(
        after.contains("hello") && after.contains("rc=0"),
        "live allow did not open: {after}"
    );
    let status = rl.sh(&format!(
        "{} shield status {name} --json",
        rl.bin("terok-admin")
    ));
    assert!(status.contains("\"state\":\"up\""), "{status}");

    // Issue 4, rootless: a scoped container's first command reaches its broker on its own
    // loopback, with a phantom key in its environment.
    rl.sh(&format!(
        "echo sk-rootless-real | {} credentials set rl anthropic",
        rl.bin("terok-admin")
    ));
    rl.sh(
        "printf '{\"anthropic\": {\"upstream\": \"http://127.0.0.1:9\", \"env\": {\"base_url\": \"ANTHROPIC_BASE_URL\", \"api_key\": \"ANTHROPIC_API_KEY\"}}}' > $TEROK_ROOT/vault/routes.json",
    );
    let scoped = format!("tk-rl-scoped-{id}");
    let out = rl.sh(&format!(
        "podman run --rm $({} prepare {scoped} --scope rl --profiles t) {BUSYBOX_IMAGE} sh -c 'wget -q -O- http://127.0.0.1:9419/-/health; echo; echo $ANTHROPIC_API_KEY | cut -c1-8; wget -q -O- \"http://$TEROK_GATE_TOKEN:x@127.0.0.1:9418/rl.git/info/refs?service=git-upload-pack\" | head -c 40; echo' 2>&1",
        rl.bin("terok-run")
    ));
    assert!(
        out.starts_with("{\"status\":\"ok\"}"),
        "rootless broker not ready: {out}"
    );
    assert!(
        out.contains("terok-p-") && !out.contains("sk-rootless-real"),
        "{out}"
    );
    // Issue 6, rootless: the gate answers the container's git with git's own advertisement.
    assert!(
        out.contains("# service=git-upload-pack"),
        "rootless gate: {out}"
    );
}
