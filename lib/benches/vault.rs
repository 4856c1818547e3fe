//! Vault benchmark: the cost of opening the vault (one SQLCipher key derivation, paid once
//! per process) and of looking up a phantom token on an open connection.
//!
//! `cargo bench -p terok --bench vault` prints a table; nothing here asserts a timing.

use std::time::{Duration, Instant};

use terok::vault::{Db, OpenMode};

const TOKENS: usize = 1_000;
const LOOKUPS: usize = 20_000;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn percentile(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("vault/credentials.db");
    let pw = "bench-passphrase";

    let t = Instant::now();
    let db = Db::open(&path, pw, OpenMode::Create).expect("create the vault");
    let create = t.elapsed();
    let mut tokens = Vec::with_capacity(TOKENS);
    db.transaction(|db| {
        for i in 0..TOKENS {
            tokens.push(db.create_token("bench", &format!("c{}", i % 50), "bench", "anthropic")?);
        }
        Ok(())
    })
    .expect("mint tokens");
    drop(db);

    // Open = key derivation (PBKDF2-HMAC-SHA512, 256 000 rounds) + first page read.
    let mut opens = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let db = Db::open(&path, pw, OpenMode::Existing).expect("open");
        opens.push(t.elapsed());
        drop(db);
    }

    let db = Db::open(&path, pw, OpenMode::Existing).expect("open");
    let mut lookups = Vec::with_capacity(LOOKUPS);
    let mut misses = Vec::with_capacity(LOOKUPS / 10);
    for i in 0..LOOKUPS {
        let token = &tokens[(i * 7919) % TOKENS];
        let t = Instant::now();
        let hit = db.lookup_token(token).expect("lookup");
        lookups.push(t.elapsed());
        assert!(hit.is_some());
    }
    for i in 0..LOOKUPS / 10 {
        let token = format!("terok-p-{:032x}", i);
        let t = Instant::now();
        let hit = db.lookup_token(&token).expect("lookup");
        misses.push(t.elapsed());
        assert!(hit.is_none());
    }

    println!("terok vault benchmark ({TOKENS} tokens in the DB)");
    println!("{:<46} {:>12}", "measure", "time");
    println!("{:<46} {:>12}", "-".repeat(46), "-".repeat(12));
    println!(
        "{:<46} {:>12.2?}",
        "create vault (key derivation + schema)", create
    );
    println!(
        "{:<46} {:>12.2?}",
        "open vault, median of 5 (key derivation)",
        median(opens.clone())
    );
    println!(
        "{:<46} {:>12.2?}",
        "open vault, slowest of 5",
        opens.iter().max().unwrap()
    );
    println!(
        "{:<46} {:>12.2?}",
        format!("token lookup (hit), median of {LOOKUPS}"),
        median(lookups.clone())
    );
    println!(
        "{:<46} {:>12.2?}",
        "token lookup (hit), p99",
        percentile(&lookups, 0.99)
    );
    println!(
        "{:<46} {:>12.2?}",
        format!("token lookup (miss), median of {}", LOOKUPS / 10),
        median(misses)
    );
    println!("(key derivation is paid once per process: lookups reuse the open connection)");
}
