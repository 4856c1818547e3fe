//! Gate overhead: `git clone` of a ~100 MB repository through the gate's HTTP front end (on
//! 127.0.0.1, its own thread with a current_thread runtime, as in the supervisor) vs `git
//! clone file://` of the same bare repo (git's own transport over a pipe). Bare clones, so
//! both columns measure transfer and index-pack, not a checkout. Median of the runs, the
//! methods alternating. Run with `cargo bench -p terok --bench gate` (release build);
//! `TEROK_BENCH_MB` and `TEROK_BENCH_RUNS` change the size and the number of runs.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use terok::gate::{self, Gate};

fn git(dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.invalid")
        .env("GIT_COMMITTER_NAME", "bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.invalid")
        .stdin(Stdio::null());
    cmd
}

fn ok(cmd: &mut Command) {
    let out = cmd.output().expect("run git");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mb = env_num("TEROK_BENCH_MB", 100);
    let runs = env_num("TEROK_BENCH_RUNS", 5);
    let dir = tempfile::tempdir().unwrap();
    let gate_dir = dir.path().join("gate");
    gate::mirror::init(&gate_dir, "bench", None).unwrap();
    let repo = gate_dir.join("bench.git");

    // ~mb MB of incompressible content over 10 commits, plus many small text files.
    let work = dir.path().join("work");
    ok(git(dir.path())
        .args(["init", "-q", "-b", "main"])
        .arg(&work));
    let mut rng = std::fs::File::open("/dev/urandom").unwrap();
    for c in 0..10 {
        let mut blob = vec![0u8; mb * 1_000_000 / 10];
        std::io::Read::read_exact(&mut rng, &mut blob).unwrap();
        std::fs::write(work.join(format!("blob{c}.bin")), &blob).unwrap();
        for f in 0..200 {
            std::fs::write(
                work.join(format!("src{c}_{f}.txt")),
                format!("commit {c} file {f}\n").repeat(50),
            )
            .unwrap();
        }
        ok(git(&work).args(["add", "-A"]));
        ok(git(&work).args(["commit", "-qm", &format!("commit {c}")]));
    }
    ok(git(&work).args(["push", "-q"]).arg(&repo).arg("main"));
    ok(git(&repo).args(["symbolic-ref", "HEAD", "refs/heads/main"]));
    ok(git(&repo).args(["gc", "-q"]));
    let pack_bytes: u64 = std::fs::read_dir(repo.join("objects/pack"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();

    let token = gate::mint_token().unwrap();
    let gate = Arc::new(Gate::new(gate_dir.clone(), "bench", token.clone()).unwrap());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let g = gate.clone();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let l = tokio::net::TcpListener::from_std(listener).unwrap();
                gate::serve(l, g, std::future::pending()).await
            })
    });
    let via_gate = format!("http://{token}@127.0.0.1:{port}/bench.git");
    let via_file = format!("file://{}", repo.display());

    let clone = |url: &str, n: usize| -> Duration {
        let target = dir.path().join(format!("clone-{n}"));
        let start = Instant::now();
        ok(git(dir.path())
            .args(["clone", "-q", "--bare", url])
            .arg(&target));
        let took = start.elapsed();
        std::fs::remove_dir_all(&target).unwrap();
        took
    };
    // One warm-up of each (page cache, git's own start-up).
    clone(&via_file, 0);
    clone(&via_gate, 0);
    let (mut file_t, mut gate_t) = (Vec::new(), Vec::new());
    for n in 0..runs {
        file_t.push(clone(&via_file, n));
        gate_t.push(clone(&via_gate, n));
    }
    let (f, g) = (median(file_t.clone()), median(gate_t.clone()));
    println!(
        "git clone --bare of a {:.1} MB pack, median of {runs} runs (git runs through the gate: {})",
        pack_bytes as f64 / 1e6,
        gate.git_runs()
    );
    println!("| method                       | median     | min        | max        |");
    println!("|------------------------------|------------|------------|------------|");
    for (name, t, m) in [
        ("file:// (git transport)", &file_t, f),
        ("gate (smart HTTP, 127.0.0.1)", &gate_t, g),
    ] {
        println!(
            "| {name:<28} | {:>7.0} ms | {:>7.0} ms | {:>7.0} ms |",
            m.as_secs_f64() * 1e3,
            t.iter().min().unwrap().as_secs_f64() * 1e3,
            t.iter().max().unwrap().as_secs_f64() * 1e3
        );
    }
    println!(
        "gate / file:// = {:.2}x (target <= 1.30x)",
        g.as_secs_f64() / f.as_secs_f64()
    );
}
