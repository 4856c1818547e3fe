//! Shared helpers of the end-to-end tests: an isolated terok environment, real podman with
//! the test's own hooks dir, the offline test image, and test hosts in network namespaces
//! the test creates (the only non-loopback addresses any test talks to).

use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub const IMAGE: &str = "localhost/terok-test:latest";
pub const BUSYBOX_IMAGE: &str = "localhost/terok-busybox:latest";

/// Fail loudly when the machine cannot run end-to-end tests: never pass by skipping.
pub fn require_e2e() {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_owned());
    }
    for tool in [
        "/usr/bin/podman",
        "/usr/sbin/nft",
        "/usr/bin/nsenter",
        "/usr/sbin/ip",
    ] {
        if !Path::new(tool).exists() && !Path::new(&tool.replace("/usr/sbin", "/sbin")).exists() {
            missing.push(tool.to_owned());
        }
    }
    assert!(
        missing.is_empty(),
        "END-TO-END TEST CANNOT RUN: missing {}. Install the packages of .ci/run and run as root.",
        missing.join(", ")
    );
}

/// One e2e test at a time per test binary: they share podman, the host ruleset and the
/// test image.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A short unique token for names of containers, namespaces and files.
pub fn unique() -> String {
    let mut b = [0u8; 3];
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    format!(
        "{:x}{:02x}{:02x}{:02x}",
        std::process::id() % 4096,
        b[0],
        b[1],
        b[2]
    )
}

/// Path of one of our binaries, built by `cargo build --workspace` beside the test binary.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` before the tests (scripts/test does)",
        path.display()
    );
    path
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Run `cmd` with `input` on its stdin (then closed); stdout and stderr captured.
pub fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Build and import the offline test images once (cached across runs).
pub fn ensure_images() {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return;
    }
    let lock = fs::File::create("/var/tmp/terok-test-image.lock").unwrap();
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map(|l| {
            if !image_exists(IMAGE) {
                build_debian_image();
            }
            if !image_exists(BUSYBOX_IMAGE) {
                build_busybox_image();
            }
            drop(l);
        })
        .unwrap_or_else(|(_, e)| panic!("cannot lock the image build: {e}"));
    *done = true;
}

fn image_exists(image: &str) -> bool {
    Command::new("podman")
        .args(["image", "exists", image])
        .status()
        .is_ok_and(|s| s.success())
}

fn build_debian_image() {
    let tar = Path::new("/var/tmp/terok-test-image.tar");
    if !tar.exists() {
        let tmp = tar.with_extension("partial");
        run_ok(
            Command::new("mmdebstrap")
                .args([
                    "--quiet",
                    "--variant=apt",
                    "--include=curl,git,openssh-client,iproute2,netcat-openbsd,dnsutils",
                    "bookworm",
                ])
                .arg(&tmp),
        );
        fs::rename(&tmp, tar).unwrap();
    }
    run_ok(Command::new("podman").arg("import").arg(tar).arg(IMAGE));
}

fn build_busybox_image() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(root.join("bin")).unwrap();
    for d in ["etc", "tmp", "proc", "sys", "dev", "run"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "nc", "sleep", "cat", "echo", "ls", "touch", "wget", "true",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    let tar = dir.path().join("bb.tar");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    );
    run_ok(
        Command::new("podman")
            .arg("import")
            .arg(&tar)
            .arg(BUSYBOX_IMAGE),
    );
}

/// An isolated terok installation: its own state, runtime and config roots, its own hooks
/// dir with our descriptors, and a containers.conf pointing podman at them.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub id: String,
    containers: Mutex<Vec<String>>,
    networks: Mutex<Vec<String>>,
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Env {
    pub fn new() -> Env {
        Self::with_nft("/usr/sbin/nft")
    }

    /// An environment whose hook is told to use `nft` (to break it on purpose).
    pub fn with_nft(nft: &str) -> Env {
        require_e2e();
        ensure_images();
        let dir = tempfile::Builder::new()
            .prefix("terok-e2e-")
            .tempdir()
            .unwrap();
        let env = Env {
            dir,
            id: unique(),
            containers: Mutex::new(Vec::new()),
            networks: Mutex::new(Vec::new()),
        };
        // Profiles of our own only: no test may resolve a public name.
        fs::create_dir_all(env.profiles_dir()).unwrap();
        // The vault opens non-interactively through the passphrase_command tier.
        fs::write(env.path("passphrase"), "terok-e2e-passphrase").unwrap();
        fs::write(
            env.path("config.yml"),
            format!(
                "shield:\n  profiles: []\n  nft: {nft}\ncredentials:\n  use_keyring: false\n  passphrase_command: /bin/cat {}\n",
                env.path("passphrase").display()
            ),
        )
        .unwrap();
        fs::write(
            env.path("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = []\n[engine]\nruntime = \"runc\"\nhooks_dir = [\"{}\"]\n",
                env.hooks_dir().display()
            ),
        )
        .unwrap();
        let out = run_ok(
            env.admin()
                .args(["setup", "--no-vault", "--no-register", "--hooks-dir"])
                .arg(env.hooks_dir()),
        );
        assert!(out.contains("terok-precreate.json"), "{out}");
        env
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn hooks_dir(&self) -> PathBuf {
        self.path("hooks")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("root/sandbox")
    }

    pub fn profiles_dir(&self) -> PathBuf {
        self.path("config/shield/profiles")
    }

    pub fn write_profile(&self, name: &str, lines: &[&str]) {
        fs::write(
            self.profiles_dir().join(format!("{name}.txt")),
            format!("# test profile\n{}\n", lines.join("\n")),
        )
        .unwrap();
    }

    /// A container name unique to this run; removed when the Env is dropped.
    pub fn name(&self, base: &str) -> String {
        let name = format!("tk-{base}-{}", self.id);
        self.containers.lock().unwrap().push(name.clone());
        name
    }

    pub fn vault_dir(&self) -> PathBuf {
        self.path("root/vault")
    }

    pub fn runtime_dir(&self, name: &str) -> PathBuf {
        self.path("run/run").join(name)
    }

    pub fn sidecar(&self, name: &str) -> PathBuf {
        self.state_dir().join(format!("sidecar/{name}.json"))
    }

    fn apply_env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("TEROK_ROOT", self.path("root"))
            .env("TEROK_SANDBOX_RUNTIME_DIR", self.path("run"))
            .env("TEROK_CONFIG_DIR", self.path("config"))
            .env("TEROK_CONFIG_FILE", self.path("config.yml"))
            .env("CONTAINERS_CONF", self.path("containers.conf"))
    }

    pub fn terok_run(&self) -> Command {
        let mut cmd = Command::new(bin("terok-run"));
        self.apply_env(&mut cmd);
        cmd
    }

    pub fn admin(&self) -> Command {
        let mut cmd = Command::new(bin("terok-admin"));
        self.apply_env(&mut cmd);
        cmd
    }

    pub fn podman(&self) -> Command {
        let mut cmd = Command::new("podman");
        self.apply_env(&mut cmd);
        cmd
    }

    /// `podman network create` a dual-stack network for IPv6 tests.
    pub fn dual_stack_network(&self, v4: &str, v6: &str) -> String {
        let name = format!("tk-net-{}", self.id);
        run_ok(
            self.podman()
                .args([
                    "network", "create", "--ipv6", "--subnet", v4, "--subnet", v6,
                ])
                .arg(&name),
        );
        self.networks.lock().unwrap().push(name.clone());
        name
    }

    /// Start a detached, shielded container running `sleep` and return its name.
    pub fn start_sleeper(&self, base: &str, profiles: &str, extra: &[&str]) -> String {
        self.start_sleeper_with(base, &["--profiles", profiles], extra)
    }

    /// Same, with any `terok-run run` flags (`--scope`, …).
    pub fn start_sleeper_with(&self, base: &str, flags: &[&str], extra: &[&str]) -> String {
        let name = self.name(base);
        let mut cmd = self.terok_run();
        cmd.args(["run", &name])
            .args(flags)
            .args(["--", "-d"])
            .args(extra)
            .args([IMAGE, "sleep", "infinity"]);
        run_ok(&mut cmd);
        name
    }

    /// `terok-run prepare NAME FLAGS --json`: the podman flags it prints.
    pub fn prepare_flags(&self, name: &str, flags: &[&str]) -> Vec<String> {
        let out = run_ok(
            self.terok_run()
                .args(["prepare", name])
                .args(flags)
                .arg("--json"),
        );
        serde_json::from_str(&out).unwrap()
    }

    /// Why the hook last refused to start container `name`.
    pub fn hook_error(&self, name: &str) -> String {
        fs::read_to_string(self.state_dir().join(format!("logs/{name}.hook-error")))
            .unwrap_or_default()
    }

    /// Search every process of the container (environ, cmdline) and its whole root file system
    /// for each needle, from the host (so the search puts nothing into the container); where one
    /// was found, if anywhere.
    pub fn container_holds_any(&self, name: &str, needles: &[Vec<u8>]) -> Option<String> {
        let contains = |hay: &[u8]| {
            needles
                .iter()
                .any(|n| hay.windows(n.len()).any(|w| w == n.as_slice()))
        };
        let init = self.pid(name);
        let pidns = fs::read_link(format!("/proc/{init}/ns/pid")).unwrap();
        let mut procs = 0;
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if fs::read_link(format!("/proc/{pid}/ns/pid")).ok().as_ref() != Some(&pidns) {
                continue;
            }
            procs += 1;
            for file in ["environ", "cmdline"] {
                if contains(&fs::read(format!("/proc/{pid}/{file}")).unwrap_or_default()) {
                    return Some(format!("/proc/{pid}/{file}"));
                }
            }
        }
        assert!(procs > 0, "no process of the container found");
        let root = run_ok(self.podman().args(["mount", name]))
            .trim()
            .to_owned();
        let mut stack = vec![PathBuf::from(&root)];
        let mut files = 0;
        let mut found = None;
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                let Ok(meta) = fs::symlink_metadata(&path) else {
                    continue;
                };
                if meta.is_dir() {
                    if !["proc", "sys", "dev"]
                        .iter()
                        .any(|d| path == Path::new(&root).join(d))
                    {
                        stack.push(path);
                    }
                } else if meta.is_file() {
                    files += 1;
                    if contains(&fs::read(&path).unwrap_or_default()) {
                        found = Some(path.display().to_string());
                    }
                }
            }
        }
        let _ = run(self.podman().args(["unmount", name]));
        assert!(
            files > 1000,
            "the file system was not searched ({files} files)"
        );
        found
    }

    pub fn exec(&self, name: &str, script: &str) -> Output {
        run(self.podman().args(["exec", name, "sh", "-c", script]))
    }

    pub fn pid(&self, name: &str) -> u32 {
        run_ok(
            self.podman()
                .args(["inspect", "--format", "{{.State.Pid}}", name]),
        )
        .trim()
        .parse()
        .unwrap()
    }

    /// `nft -j list ruleset` inside a running container's network namespace.
    pub fn container_ruleset(&self, name: &str) -> serde_json::Value {
        let pid = self.pid(name);
        let out = run_ok(
            Command::new("nsenter")
                .arg(format!("--net=/proc/{pid}/ns/net"))
                .args(["--", "/usr/sbin/nft", "-j", "list", "ruleset"]),
        );
        serde_json::from_str(&out).unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for name in self.containers.lock().unwrap().iter() {
            let _ = Command::new("podman")
                .env("CONTAINERS_CONF", self.path("containers.conf"))
                .args(["rm", "-f", "-t", "0", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for net in self.networks.lock().unwrap().iter() {
            let _ = Command::new("podman")
                .args(["network", "rm", "-f", net])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Outcome of a TCP connection attempt made inside a container.
#[derive(Debug, PartialEq, Eq)]
pub enum Connect {
    Connected,
    /// Refused by the shield with ICMP admin-prohibited: the kernel reports it as
    /// EHOSTUNREACH ("No route to host") for IPv4 and EACCES ("Permission denied") for IPv6,
    /// at once, not after a timeout.
    Prohibited,
    Other(String),
}

/// Try `addr:port` from inside a container with netcat (Debian image).
pub fn connect_from(env: &Env, container: &str, addr: IpAddr, port: u16) -> Connect {
    let out = env.exec(container, &format!("nc -vz -w 5 {addr} {port} 2>&1"));
    let text = stdout(&out) + &stderr(&out);
    if out.status.success() {
        Connect::Connected
    } else if text.contains("No route to host") || text.contains("Permission denied") {
        Connect::Prohibited
    } else {
        Connect::Other(text)
    }
}

/// A test host: a network namespace with a veth pair to the host, carrying two IPv4 and
/// two IPv6 addresses, so one can be allowlisted and the other not.
pub struct TestHost {
    pub netns: String,
    pub v4: [IpAddr; 2],
    pub v6: [IpAddr; 2],
    host_if: String,
}

impl TestHost {
    pub fn new(id: &str) -> TestHost {
        require_e2e();
        let netns = format!("tk-{id}");
        let host_if = format!("tkh{id}");
        let peer_if = format!("tkp{id}");
        assert!(host_if.len() <= 15, "interface name too long: {host_if}");
        // A /24 and a /64 derived from the id; the ULA prefix is ours (fd7e:…).
        let n = u32::from_str_radix(&id[id.len() - 4..], 16).unwrap_or(0);
        let (a, b) = (200 + (n >> 8) % 50, n & 0xff);
        let v4 = [format!("10.{a}.{b}.2"), format!("10.{a}.{b}.3")];
        let v6 = [
            format!("fd7e:{a:x}:{b:x}::2"),
            format!("fd7e:{a:x}:{b:x}::3"),
        ];
        let ip = |args: &[&str]| run_ok(Command::new("ip").args(args));
        ip(&["netns", "add", &netns]);
        let host = TestHost {
            netns: netns.clone(),
            v4: [v4[0].parse().unwrap(), v4[1].parse().unwrap()],
            v6: [v6[0].parse().unwrap(), v6[1].parse().unwrap()],
            host_if: host_if.clone(),
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
        ]);
        ip(&["link", "set", &peer_if, "netns", &netns]);
        ip(&["addr", "add", &format!("10.{a}.{b}.1/24"), "dev", &host_if]);
        ip(&[
            "addr",
            "add",
            &format!("fd7e:{a:x}:{b:x}::1/64"),
            "dev",
            &host_if,
            "nodad",
        ]);
        ip(&["link", "set", &host_if, "up"]);
        let nsip = |args: &[&str]| {
            run_ok(Command::new("ip").args(["-n", &netns]).args(args));
        };
        for addr in &v4 {
            nsip(&["addr", "add", &format!("{addr}/24"), "dev", &peer_if]);
        }
        for addr in &v6 {
            nsip(&[
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                &peer_if,
                "nodad",
            ]);
        }
        nsip(&["link", "set", &peer_if, "up"]);
        nsip(&["link", "set", "lo", "up"]);
        nsip(&["route", "add", "default", "via", &format!("10.{a}.{b}.1")]);
        nsip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd7e:{a:x}:{b:x}::1"),
        ]);
        // Containers reach the test host through the host's routing.
        fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
        fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").unwrap();
        host
    }

    /// Serve TCP on `addr:port` inside the test host: every connection gets "hello\n".
    pub fn serve(&self, addr: IpAddr, port: u16) -> Server {
        let ns = fs::File::open(format!("/run/netns/{}", self.netns)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // setns affects this thread only; the listener lives in the test host's netns.
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let listener = TcpListener::bind(SocketAddr::new(addr, port)).unwrap();
            listener.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.write_all(b"hello\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("server did not start");
        Server { stop }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// A bare network namespace of the test's own, deleted when dropped (even on a failure).
pub struct TestNetns(pub String);

impl TestNetns {
    pub fn new(name: &str) -> TestNetns {
        run_ok(Command::new("ip").args(["netns", "add", name]));
        TestNetns(name.to_owned())
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

pub struct Server {
    stop: Arc<AtomicBool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Pids of processes whose command line contains `needle` (exact argv element match).
pub fn pids_with_arg(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline"))
            && cmdline.split(|b| *b == 0).any(|a| a == needle.as_bytes())
        {
            out.push(pid);
        }
    }
    out
}

/// Poll `check` every 50 ms until it holds or `limit` passes; whether it held.
pub fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The host's ruleset without counters, to compare before and after.
pub fn host_ruleset() -> String {
    run_ok(Command::new("/usr/sbin/nft").args(["-s", "list", "ruleset"]))
}
