//! SSH agent benchmark: median time of an ed25519 sign request through our agent's socket
//! versus OpenSSH's own `ssh-agent` holding the same key, side by side.
//!
//! Our agent is the same server the supervisor's agent child runs (`terok::ssh::agent::serve`
//! over a vault DB), in a thread of this process; `ssh-agent -D` runs as its own process with
//! the key added by `ssh-add`. The client speaks the agent protocol itself, so both sides
//! are measured the same way: on one kept connection, and with a fresh connection per
//! request (ours re-reads the scope's keys from the vault on every connection).
//!
//! `cargo bench -p terok --bench ssh_agent` prints a table; nothing here asserts a timing.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use terok::ssh::keys::{self, KeyType};
use terok::ssh::{agent, db};
use terok::vault::{Db, OpenMode};

const KEPT: usize = 5_000;
const FRESH: usize = 1_000;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() - 1) * 99 / 100]
}

fn sign_request(blob: &[u8], data: &[u8]) -> Vec<u8> {
    let mut body = vec![13u8];
    body.extend((blob.len() as u32).to_be_bytes());
    body.extend(blob);
    body.extend((data.len() as u32).to_be_bytes());
    body.extend(data);
    body.extend(0u32.to_be_bytes());
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend(body);
    frame
}

fn round_trip(s: &mut UnixStream, req: &[u8]) {
    s.write_all(req).expect("send");
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("reply length");
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).expect("reply");
    assert_eq!(body[0], 14, "not a sign response");
}

/// (median, p99) on one kept connection, and with a connection per request.
fn measure(sock: &Path, req: &[u8]) -> [(Duration, Duration); 2] {
    let mut s = UnixStream::connect(sock).expect("connect");
    for _ in 0..200 {
        round_trip(&mut s, req);
    }
    let mut kept = Vec::with_capacity(KEPT);
    for _ in 0..KEPT {
        let t = Instant::now();
        round_trip(&mut s, req);
        kept.push(t.elapsed());
    }
    let mut fresh = Vec::with_capacity(FRESH);
    for _ in 0..FRESH {
        let t = Instant::now();
        let mut s = UnixStream::connect(sock).expect("connect");
        round_trip(&mut s, req);
        fresh.push(t.elapsed());
    }
    [
        (median(kept.clone()), p99(kept)),
        (median(fresh.clone()), p99(fresh)),
    ]
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let material = keys::generate(KeyType::Ed25519).expect("generate");
    let vault = Db::open(
        &dir.path().join("vault/credentials.db"),
        "bench-passphrase",
        OpenMode::Create,
    )
    .expect("create the vault");
    let (id, _) = db::store(&vault, &material, "tk-main:bench").expect("store");
    db::assign(&vault, "bench", id, true).expect("assign");

    // Ours.
    let ours = dir.path().join("ours.sock");
    let listener = agent::bind_private(&ours).expect("bind");
    let source = Arc::new(agent::KeySource {
        db: Some(Mutex::new(vault)),
        scope: "bench".into(),
    });
    std::thread::spawn(move || agent::serve(listener, source));

    // OpenSSH's, holding the same key.
    let key_file = dir.path().join("id_ed25519");
    let pem = keys::openssh_pem(KeyType::Ed25519, &material.private_der, "bench").expect("pem");
    std::fs::write(&key_file, pem.as_bytes()).expect("write key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let theirs = dir.path().join("openssh.sock");
    let mut openssh = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&theirs)
        .stdout(Stdio::null())
        .spawn()
        .expect("ssh-agent (openssh-client) is installed");
    for _ in 0..200 {
        if theirs.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let added = Command::new("ssh-add")
        .arg("-q")
        .arg(&key_file)
        .env("SSH_AUTH_SOCK", &theirs)
        .status()
        .expect("ssh-add");
    assert!(added.success(), "ssh-add failed");

    // A sign request like ssh's user-auth: ~ 150 bytes of session data.
    let req = sign_request(&material.public_blob, &[0x5a; 150]);
    let [ours_kept, ours_fresh] = measure(&ours, &req);
    let [theirs_kept, theirs_fresh] = measure(&theirs, &req);
    let _ = openssh.kill();
    let _ = openssh.wait();

    println!("ed25519 sign request, {KEPT} on a kept connection, {FRESH} with a connection each");
    println!();
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>12} {:>8}",
        "", "terok med", "terok p99", "openssh med", "openssh p99", "ratio"
    );
    for (label, (om, op), (tm, tp)) in [
        ("sign, kept connection", ours_kept, theirs_kept),
        ("connect + sign (keys re-read)", ours_fresh, theirs_fresh),
    ] {
        println!(
            "{:<34} {:>12} {:>12} {:>12} {:>12} {:>7.2}×",
            label,
            us(om),
            us(op),
            us(tm),
            us(tp),
            om.as_secs_f64() / tm.as_secs_f64()
        );
    }
    println!();
    println!("target: terok median within 1.5× of OpenSSH's ssh-agent");
}
