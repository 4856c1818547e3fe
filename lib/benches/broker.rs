//! Broker overhead: a small request straight to a fake upstream vs through the broker, all on
//! 127.0.0.1. Upstream and broker each run on their own thread with a current_thread runtime
//! (as the broker child does); the client sends sequential requests on one keep-alive
//! connection. Run with `cargo bench -p terok --bench broker` (release build).
//!
//! Rows: direct; through the broker with an in-memory token store; through the broker with a
//! real SQLCipher vault (lookup + credential query per request, as in production); through
//! a broker in a process of its own (this binary re-executed), whose RSS and PSS are printed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;
use terok::broker::{self, Broker, BrokerOptions, MemoryStore, Routes, TokenInfo, VaultStore};
use tokio::net::{TcpListener, TcpStream};

const WARMUP: usize = 300;
const REQUESTS: usize = 3000;
const PHANTOM: &str = "terok-p-0123456789abcdef0123456789abcdef";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A fake upstream answering every request with a small JSON body, on its own thread.
fn start_upstream() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            br#"{"id":"msg_1","ok":true}"#,
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    });
    rx.recv().unwrap()
}

/// A broker in front of `upstream`, on its own thread; the store is made on that thread.
fn start_broker(
    upstream: SocketAddr,
    store: impl FnOnce() -> Arc<dyn broker::TokenStore> + Send + 'static,
) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let routes = Routes::from_value(&json!({
                "anthropic": {"upstream": format!("http://{upstream}"), "auth_header": "x-api-key", "auth_prefix": ""}
            }))
            .unwrap();
            let (b, sender) = Broker::with_options(
                routes,
                BrokerOptions {
                    extra_ca_file: None,
                    ..BrokerOptions::default()
                },
            )
            .unwrap();
            sender.provide_arc(store());
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            broker::serve(listener, Arc::new(b), std::future::pending::<()>())
                .await
                .unwrap();
        });
    });
    rx.recv().unwrap()
}

fn token_info() -> TokenInfo {
    TokenInfo {
        scope: "bench".into(),
        subject: "bench".into(),
        credential_set: "default".into(),
        provider: "anthropic".into(),
    }
}

struct Stats {
    median: Duration,
    p90: Duration,
    per_sec: f64,
}

/// Sequential small requests on one keep-alive connection.
fn measure(addr: SocketAddr) -> Stats {
    runtime().block_on(async move {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut lat = Vec::with_capacity(REQUESTS);
        let mut total = Duration::ZERO;
        for i in 0..WARMUP + REQUESTS {
            let req = Request::post("/v1/messages")
                .header("host", "127.0.0.1")
                .header("x-api-key", PHANTOM)
                .header("content-type", "application/json")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let t = Instant::now();
            let resp = sender.send_request(req).await.unwrap();
            assert!(resp.status().is_success(), "{}", resp.status());
            resp.into_body().collect().await.unwrap();
            let d = t.elapsed();
            if i >= WARMUP {
                lat.push(d);
                total += d;
            }
        }
        lat.sort();
        Stats {
            median: lat[lat.len() / 2],
            p90: lat[lat.len() * 9 / 10],
            per_sec: REQUESTS as f64 / total.as_secs_f64(),
        }
    })
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// The broker alone in a child process (this binary re-executed), so its memory can be
/// read: prints its port, then serves until killed.
fn child_main(upstream: &str) {
    let upstream: SocketAddr = upstream.parse().unwrap();
    runtime().block_on(async move {
        let routes = Routes::from_value(&json!({
            "anthropic": {"upstream": format!("http://{upstream}"), "auth_header": "x-api-key", "auth_prefix": ""}
        }))
        .unwrap();
        let (b, sender) = Broker::with_options(
            routes,
            BrokerOptions {
                extra_ca_file: None,
                ..BrokerOptions::default()
            },
        )
        .unwrap();
        let store = MemoryStore::new();
        store.add_token(PHANTOM, token_info());
        store.set_credential(
            "default",
            "anthropic",
            json!({"type": "api_key", "key": "sk-real"})
                .as_object()
                .unwrap()
                .clone(),
        );
        sender.provide(store);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap());
        broker::serve(listener, Arc::new(b), std::future::pending::<()>())
            .await
            .unwrap();
    });
}

/// `(VmRSS, Pss)` of a process in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let field = |file: &str, key: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("status", "VmRSS:"), field("smaps_rollup", "Pss:"))
}

fn main() {
    if let Ok(upstream) = std::env::var("TEROK_BENCH_BROKER_CHILD") {
        return child_main(&upstream);
    }
    let upstream = start_upstream();
    let memory = start_broker(upstream, || {
        let store = MemoryStore::new();
        store.add_token(PHANTOM, token_info());
        store.set_credential(
            "default",
            "anthropic",
            json!({"type": "api_key", "key": "sk-real"})
                .as_object()
                .unwrap()
                .clone(),
        );
        Arc::new(store)
    });
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("credentials.db");
    let vault = start_broker(upstream, move || {
        let db =
            terok::vault::Db::open(&db_path, "bench-pass", terok::vault::OpenMode::Create).unwrap();
        db.store_credential(
            "default",
            "anthropic",
            json!({"type": "api_key", "key": "sk-real"})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        db.connection()
            .execute(
                "INSERT INTO proxy_tokens (token, scope, subject, credential_set, provider) VALUES (?1, 'bench', 'bench', 'default', 'anthropic')",
                [PHANTOM],
            )
            .unwrap();
        Arc::new(VaultStore::new(db))
    });

    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .env("TEROK_BENCH_BROKER_CHILD", upstream.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let separate: SocketAddr = line.trim().parse().unwrap();

    let direct = measure(upstream);
    let through_memory = measure(memory);
    let through_vault = measure(vault);
    let through_child = measure(separate);
    let (rss, pss) = memory_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();

    println!("broker overhead: {REQUESTS} sequential small requests (POST, keep-alive), 127.0.0.1");
    println!(
        "{:<34} {:>11} {:>9} {:>12} {:>13}",
        "path", "median ms", "p90 ms", "req/s", "+median ms"
    );
    for (name, s) in [
        ("direct to upstream", &direct),
        ("through broker (memory store)", &through_memory),
        ("through broker (SQLCipher vault)", &through_vault),
        ("through broker (own process)", &through_child),
    ] {
        let over = s.median.saturating_sub(direct.median);
        println!(
            "{:<34} {:>11} {:>9} {:>12.0} {:>13}",
            name,
            ms(s.median),
            ms(s.p90),
            s.per_sec,
            ms(over)
        );
    }
    println!(
        "broker process after {} requests: RSS {:.1} MiB, PSS {:.1} MiB",
        WARMUP + REQUESTS,
        rss as f64 / 1024.0,
        pss as f64 / 1024.0
    );
    let over = through_vault.median.saturating_sub(direct.median);
    println!(
        "target: overhead < 0.500 ms — {} ({} ms with the real vault)",
        if over < Duration::from_micros(500) {
            "met"
        } else {
            "NOT met"
        },
        ms(over)
    );
}
