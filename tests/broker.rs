//! The credential broker over real loopback sockets: a broker on 127.0.0.1:0 in front of fake
//! upstreams (plain HTTP, TLS with a CA of the test's own, WebSocket) on 127.0.0.1, with an
//! in-memory token store and with a real SQLCipher vault. Nothing here resolves a name or
//! leaves loopback.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use terok::broker::{self, Broker, BrokerOptions, MemoryStore, Routes, TokenInfo, VaultStore};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestBody = BoxBody<Bytes, BoxError>;

const REAL_KEY: &str = "sk-REAL-0123456789abcdef";
const SUBJECT: &str = "tk-broker-test";

// ---- fake upstream --------------------------------------------------------------------

/// What an upstream saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path_and_query: String,
    headers: HeaderMap,
}

#[derive(Default)]
struct UpstreamState {
    seen: Mutex<Vec<Seen>>,
    /// Lets the SSE handler send its second event.
    release: Notify,
    /// Where `/redirect` points.
    redirect_to: Mutex<String>,
}

impl UpstreamState {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn body(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

/// A body fed from a channel, one frame per message.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

async fn upstream_handler(
    state: Arc<UpstreamState>,
    mut req: Request<Incoming>,
) -> Result<Response<TestBody>, Infallible> {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    state.seen.lock().unwrap().push(Seen {
        method: req.method().to_string(),
        path_and_query: pq.clone(),
        headers: req.headers().clone(),
    });
    let path = req.uri().path().to_owned();
    let resp = if path.contains("/upload") {
        let mut hash = Sha256::new();
        let mut len = 0usize;
        let mut frames = 0usize;
        while let Some(frame) = req.body_mut().frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                hash.update(&data);
                len += data.len();
                frames += 1;
            }
        }
        let digest: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Response::new(body(
            json!({"sha256": digest, "len": len, "frames": frames}).to_string(),
        ))
    } else if path.contains("/sse") {
        let (tx, rx) = mpsc::channel(4);
        let state = state.clone();
        tokio::spawn(async move {
            tx.send(Bytes::from_static(b"data: one\n\n")).await.unwrap();
            state.release.notified().await;
            tx.send(Bytes::from_static(b"data: two\n\n")).await.unwrap();
        });
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(ChannelBody(rx).boxed())
            .unwrap()
    } else if path.contains("/redirect") {
        Response::builder()
            .status(302)
            .header("location", state.redirect_to.lock().unwrap().clone())
            .body(body(""))
            .unwrap()
    } else {
        let headers: Map<String, Value> = req
            .headers()
            .keys()
            .map(|k| {
                let values: Vec<Value> = req
                    .headers()
                    .get_all(k)
                    .iter()
                    .map(|v| Value::String(v.to_str().unwrap_or("?").to_owned()))
                    .collect();
                (k.as_str().to_owned(), Value::Array(values))
            })
            .collect();
        Response::builder()
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .header("x-ratelimit-remaining", "41")
            .header("content-type", "application/json")
            .body(body(
                json!({"path_and_query": pq, "headers": headers}).to_string(),
            ))
            .unwrap()
    };
    Ok(resp)
}

async fn serve_http(listener: TcpListener, state: Arc<UpstreamState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| upstream_handler(state.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A plain-HTTP fake upstream on 127.0.0.1.
async fn fake_upstream() -> (SocketAddr, Arc<UpstreamState>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(UpstreamState::default());
    tokio::spawn(serve_http(listener, state.clone()));
    (addr, state)
}

// ---- broker and client ----------------------------------------------------------------

fn info(provider: &str, subject: &str) -> TokenInfo {
    TokenInfo {
        scope: "proj".into(),
        subject: subject.into(),
        credential_set: "default".into(),
        provider: provider.into(),
    }
}

fn api_key(key: &str) -> Map<String, Value> {
    json!({"type": "api_key", "key": key})
        .as_object()
        .unwrap()
        .clone()
}

fn options(audit: Option<&Path>) -> BrokerOptions {
    BrokerOptions {
        audit_path: audit.map(Path::to_owned),
        subject: Some(SUBJECT.into()),
        extra_ca_file: None,
        ..BrokerOptions::default()
    }
}

struct Running {
    addr: SocketAddr,
    store: broker::StoreSender,
}

async fn start_broker(routes: Value, options: BrokerOptions) -> Running {
    let routes = Routes::from_value(&routes).unwrap();
    let (broker, store) = Broker::with_options(routes, options).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(broker::serve(
        listener,
        Arc::new(broker),
        std::future::pending::<()>(),
    ));
    Running { addr, store }
}

fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body_data: Option<TestBody>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(body_data.unwrap_or_else(|| Empty::new().map_err(|e| match e {}).boxed()))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let (parts, incoming) = resp.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: incoming.collect().await.unwrap().to_bytes(),
    }
}

async fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    request("GET", url, headers, None).await
}

/// Routes for the fake upstream: `plain` (x-api-key, empty prefix), `bearer` (default
/// Authorization: Bearer), `gitlab` (PRIVATE-TOKEN).
fn routes_for(addr: SocketAddr) -> Value {
    json!({
        "plain": {"upstream": format!("http://{addr}"), "auth_header": "x-api-key", "auth_prefix": ""},
        "bearer": {"upstream": format!("http://{addr}/base/")},
        "gitlab": {"upstream": format!("http://{addr}"), "auth_header": "PRIVATE-TOKEN", "auth_prefix": ""},
        "nocred": {"upstream": format!("http://{addr}")},
    })
}

/// A memory store with one token per provider of `routes_for`, plus some that must fail.
fn memory_store() -> MemoryStore {
    let store = MemoryStore::new();
    store.add_token(&tok("plain"), info("plain", SUBJECT));
    store.add_token(&tok("bearer"), info("bearer", SUBJECT));
    store.add_token(&tok("gitlab"), info("gitlab", SUBJECT));
    store.add_token(&tok("nocred"), info("nocred", SUBJECT));
    store.add_token(&tok("unrouted"), info("unrouted", SUBJECT));
    store.add_token(&tok("foreign"), info("plain", "another-container"));
    store.set_credential("default", "plain", api_key(REAL_KEY));
    store.set_credential("default", "bearer", api_key(REAL_KEY));
    store.set_credential("default", "unrouted", api_key(REAL_KEY));
    store.set_credential(
        "default",
        "gitlab",
        json!({"type": "pat", "token": REAL_KEY})
            .as_object()
            .unwrap()
            .clone(),
    );
    store
}

/// A deterministic, well-formed phantom token per name.
fn tok(name: &str) -> String {
    let hex: String = Sha256::digest(name.as_bytes())
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("terok-p-{hex}")
}

fn assert_no_phantom(seen: &Seen, phantom: &str) {
    for (name, value) in &seen.headers {
        let v = value.to_str().unwrap_or_default();
        assert!(
            !v.contains(phantom),
            "upstream saw the phantom in {name}: {v}"
        );
    }
}

// ---- tests ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_the_phantom_for_the_real_credential_and_keeps_the_raw_path() {
    let (up, state) = fake_upstream().await;
    let b = start_broker(routes_for(up), options(None)).await;
    b.store.provide(memory_store());
    let base = format!("http://{}", b.addr);

    // Bearer phantom, route injects x-api-key with no prefix; %2F and the query survive.
    let phantom = tok("plain");
    let auth = format!("Bearer {phantom}");
    let r = get(
        &format!("{base}/v1/projects/group%2Fproj/files?q=a%20b&x=%2F&y"),
        &[("authorization", &auth), ("accept-encoding", "br")],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let echo = r.json();
    assert_eq!(
        echo["path_and_query"],
        "/v1/projects/group%2Fproj/files?q=a%20b&x=%2F&y"
    );
    assert_eq!(echo["headers"]["x-api-key"], json!([REAL_KEY]));
    assert!(echo["headers"].get("authorization").is_none());
    assert_eq!(echo["headers"]["accept-encoding"], json!(["br"]));
    assert_eq!(echo["headers"]["host"], json!([up.to_string()]));
    // Every response header relayed, duplicates kept.
    assert_eq!(r.headers.get_all("set-cookie").iter().count(), 2);
    assert_eq!(r.headers["x-ratelimit-remaining"], "41");
    assert_no_phantom(&state.seen()[0], &phantom);

    // X-Api-Key phantom, Bearer route with a base path.
    let phantom = tok("bearer");
    let r = get(&format!("{base}/v1/x"), &[("x-api-key", &phantom)]).await;
    assert_eq!(r.status, 200);
    let echo = r.json();
    assert_eq!(echo["path_and_query"], "/base/v1/x");
    assert_eq!(
        echo["headers"]["authorization"],
        json!([format!("Bearer {REAL_KEY}")])
    );
    assert!(echo["headers"].get("x-api-key").is_none());

    // PRIVATE-TOKEN phantom and route.
    let phantom = tok("gitlab");
    let r = get(
        &format!("{base}/api/v4/user"),
        &[("PRIVATE-TOKEN", &phantom)],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["private-token"], json!([REAL_KEY]));
    for seen in state.seen() {
        assert_no_phantom(&seen, &tok("plain"));
        assert_no_phantom(&seen, &tok("bearer"));
        assert_no_phantom(&seen, &tok("gitlab"));
    }

    // Health needs no token and never reaches an upstream.
    let before = state.seen().len();
    let r = get(&format!("{base}/-/health"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status": "ok"}));
    assert_eq!(state.seen().len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_missing_wrong_foreign_and_unrouted_tokens() {
    let (up, state) = fake_upstream().await;
    let b = start_broker(routes_for(up), options(None)).await;
    b.store.provide(memory_store());
    let url = format!("http://{}/v1/x", b.addr);
    type Case<'a> = (Vec<(&'a str, String)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (vec![], 401, "Missing authentication"),
        (
            vec![("authorization", "Bearer".into())],
            401,
            "Invalid token",
        ),
        (
            vec![("authorization", format!("Bearer {}", tok("nope")))],
            401,
            "Invalid token",
        ),
        (
            vec![("x-api-key", "sk-anything".into())],
            401,
            "Invalid token",
        ),
        (
            vec![("authorization", format!("Bearer {}", tok("foreign")))],
            401,
            "Invalid token",
        ),
        (
            vec![("authorization", format!("Bearer {}", tok("unrouted")))],
            404,
            "No route for provider: unrouted",
        ),
        (
            vec![("authorization", format!("Bearer {}", tok("nocred")))],
            502,
            "Credential not configured for this provider",
        ),
    ];
    for (headers, status, message) in cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = get(&url, &h).await;
        assert_eq!(r.status.as_u16(), status, "{headers:?}");
        assert_eq!(r.json(), json!({"error": message}), "{headers:?}");
    }
    assert!(
        state.seen().is_empty(),
        "a rejected request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vault_tokens_work_until_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("vault/credentials.db");
    let db = terok::vault::Db::open(&db_path, "test-pass", terok::vault::OpenMode::Create).unwrap();
    db.store_credential("default", "plain", &api_key(REAL_KEY))
        .unwrap();
    let phantom = db
        .create_token("proj", SUBJECT, "default", "plain")
        .unwrap();
    let (up, state) = fake_upstream().await;
    let b = start_broker(routes_for(up), options(None)).await;
    b.store.provide(VaultStore::new(db));

    let url = format!("http://{}/v1/messages", b.addr);
    let r = get(&url, &[("x-api-key", &phantom)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["x-api-key"], json!([REAL_KEY]));
    assert_no_phantom(&state.seen()[0], &phantom);

    // What `terok-run cleanup` does, through another connection: the next request is 401.
    let other =
        terok::vault::Db::open(&db_path, "test-pass", terok::vault::OpenMode::Existing).unwrap();
    assert_eq!(other.revoke_tokens("proj", SUBJECT).unwrap(), 1);
    let r = get(&url, &[("x-api-key", &phantom)]).await;
    assert_eq!(r.status, 401);
    assert_eq!(state.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_chunked_upload_arrives_intact() {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 800; // 50 MiB
    let (up, state) = fake_upstream().await;
    let b = start_broker(routes_for(up), options(None)).await;
    b.store.provide(memory_store());

    // Generated chunk by chunk (never held whole); no Content-Length, so it goes chunked.
    let chunk = |i: usize| -> Bytes {
        (0..CHUNK)
            .map(|j| (i.wrapping_mul(31) ^ j.wrapping_mul(7)) as u8)
            .collect::<Vec<u8>>()
            .into()
    };
    let mut want = Sha256::new();
    for i in 0..CHUNKS {
        want.update(chunk(i));
    }
    let want: String = want.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let stream = futures_util::stream::iter(
        (0..CHUNKS).map(move |i| Ok::<_, BoxError>(Frame::data(chunk(i)))),
    );
    let started = Instant::now();
    let phantom = tok("plain");
    let r = request(
        "POST",
        &format!("http://{}/upload", b.addr),
        &[
            ("x-api-key", &phantom),
            ("content-type", "application/octet-stream"),
        ],
        Some(BodyExt::boxed(StreamBody::new(stream))),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let got = r.json();
    assert_eq!(got["len"], CHUNK * CHUNKS);
    assert_eq!(got["sha256"], want);
    let seen = &state.seen()[0];
    assert_eq!(seen.headers["transfer-encoding"], "chunked");
    assert!(seen.headers.get("content-length").is_none());
    eprintln!(
        "50 MiB through the broker in {:?} ({} upstream frames)",
        started.elapsed(),
        got["frames"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_stream_before_the_upstream_finishes() {
    let (up, state) = fake_upstream().await;
    let b = start_broker(routes_for(up), options(None)).await;
    b.store.provide(memory_store());
    let phantom = tok("plain");
    let req = Request::get(format!("http://{}/sse", b.addr))
        .header("x-api-key", &phantom)
        .header("accept", "text/event-stream")
        .body(Empty::new().map_err(|e| match e {}).boxed())
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    // The upstream holds its second event until released: the first must arrive alone.
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first SSE event did not arrive while the upstream was still open")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(first, "data: one\n\n");
    state.release.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "data: two\n\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_redirects_are_followed_without_the_credential() {
    let (up, provider) = fake_upstream().await;
    let (storage_addr, storage) = fake_upstream().await;
    *provider.redirect_to.lock().unwrap() = format!("http://{storage_addr}/blob/1?sig=s3cr3t");
    let b = start_broker(routes_for(up), options(None)).await;
    b.store.provide(memory_store());
    let phantom = tok("bearer");
    let auth = format!("Bearer {phantom}");

    let r = get(
        &format!("http://{}/redirect", b.addr),
        &[
            ("authorization", &auth),
            ("accept", "application/json"),
            ("user-agent", "agent/1"),
            ("x-private", "not-for-storage"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let echo = r.json();
    assert_eq!(echo["path_and_query"], "/blob/1?sig=s3cr3t");
    // The provider hop had the real credential, the storage hop nothing of it.
    assert_eq!(
        provider.seen()[0].headers["authorization"],
        format!("Bearer {REAL_KEY}")
    );
    let hop = &storage.seen()[0];
    assert_eq!(hop.path_and_query, "/blob/1?sig=s3cr3t");
    assert!(hop.headers.get("authorization").is_none());
    assert!(hop.headers.get("x-private").is_none());
    assert_eq!(hop.headers["accept"], "application/json");
    assert_eq!(hop.headers["user-agent"], "agent/1");
    assert_no_phantom(hop, &phantom);
    assert!(!format!("{:?}", hop.headers).contains(REAL_KEY));

    // A POST redirect is relayed, not followed.
    let r = request(
        "POST",
        &format!("http://{}/redirect", b.addr),
        &[("authorization", &auth)],
        Some(body("{}")),
    )
    .await;
    assert_eq!(r.status, 302);
    assert_eq!(
        r.headers["location"],
        provider.redirect_to.lock().unwrap().as_str()
    );
    assert_eq!(
        storage.seen().len(),
        1,
        "the POST redirect target was fetched"
    );
    assert_eq!(provider.seen()[1].method, "POST");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_passes_through() {
    // A WebSocket echo upstream that records the handshake headers it got.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_addr = listener.local_addr().unwrap();
    let handshake: Arc<Mutex<Option<HeaderMap>>> = Arc::default();
    let seen = handshake.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                #[allow(clippy::result_large_err)] // tungstenite's own callback signature
                let callback =
                    |req: &tungstenite::handshake::server::Request,
                     resp: tungstenite::handshake::server::Response| {
                        *seen.lock().unwrap() = Some(req.headers().clone());
                        Ok(resp)
                    };
                let mut ws = tokio_tungstenite::accept_hdr_async(stream, callback)
                    .await
                    .unwrap();
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        ws.send(msg).await.unwrap();
                    }
                }
            });
        }
    });
    let routes = json!({"ws": {"upstream": format!("http://{ws_addr}")}});
    let b = start_broker(routes, options(None)).await;
    let store = MemoryStore::new();
    store.add_token(&tok("ws"), info("ws", SUBJECT));
    store.set_credential("default", "ws", api_key(REAL_KEY));
    b.store.provide(store);

    let mut req = format!("ws://{}/v1/realtime?model=m", b.addr)
        .into_client_request()
        .unwrap();
    let auth = format!("Bearer {}", tok("ws"));
    req.headers_mut()
        .insert("authorization", auth.parse().unwrap());
    req.headers_mut().insert(
        "sec-websocket-extensions",
        "permessage-deflate; client_max_window_bits"
            .parse()
            .unwrap(),
    );
    let tcp = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    assert_eq!(resp.status(), 101);
    assert!(resp.headers().get("sec-websocket-extensions").is_none());
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    let blob: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(blob));
    ws.close(None).await.unwrap();

    let headers = handshake.lock().unwrap().clone().unwrap();
    assert_eq!(headers["authorization"], format!("Bearer {REAL_KEY}"));
    assert!(headers.get("sec-websocket-extensions").is_none());
    assert!(!format!("{headers:?}").contains(&tok("ws")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstream_with_a_ca_of_our_own() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "terok broker test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(UpstreamState::default());
    let st = state.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, st) = (acceptor.clone(), st.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| upstream_handler(st.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });

    let routes = json!({
        "tls": {"upstream": format!("https://{addr}"), "ca_file": ca_file},
        "untrusted": {"upstream": format!("https://{addr}")},
        "broken-ca": {"upstream": format!("https://{addr}"), "ca_file": dir.path().join("missing.pem")},
    });
    let b = start_broker(routes, options(None)).await;
    let store = MemoryStore::new();
    for p in ["tls", "untrusted", "broken-ca"] {
        store.add_token(&tok(p), info(p, SUBJECT));
        store.set_credential("default", p, api_key(REAL_KEY));
    }
    b.store.provide(store);

    let auth = format!("Bearer {}", tok("tls"));
    let r = get(
        &format!("http://{}/v1/secure?a=1", b.addr),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let echo = r.json();
    assert_eq!(echo["path_and_query"], "/v1/secure?a=1");
    assert_eq!(
        echo["headers"]["authorization"],
        json!([format!("Bearer {REAL_KEY}")])
    );

    // Without the CA, the same upstream is refused (certificate not trusted).
    let auth = format!("Bearer {}", tok("untrusted"));
    let r = get(
        &format!("http://{}/v1/secure", b.addr),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json(), json!({"error": "Upstream request failed"}));
    // An unreadable ca_file does not stop the broker: that route alone fails.
    let auth = format!("Bearer {}", tok("broken-ca"));
    let r = get(
        &format!("http://{}/v1/secure", b.addr),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(r.status, 502);
    assert_eq!(state.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_requests_wait_for_the_store() {
    let (up, _state) = fake_upstream().await;
    let b = start_broker(routes_for(up), options(None)).await;
    let phantom = tok("plain");
    let url = format!("http://{}/v1/early", b.addr);
    // Health answers at once, before any store.
    assert_eq!(
        get(&format!("http://{}/-/health", b.addr), &[])
            .await
            .status,
        200
    );
    let started = Instant::now();
    let early = tokio::spawn(async move { get(&url, &[("x-api-key", &phantom)]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!early.is_finished(), "the early request did not wait");
    b.store.provide(memory_store());
    let r = early.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    // A store that cannot be had: 503 with the reason, not a hang.
    let (up, _state) = fake_upstream().await;
    let b = start_broker(routes_for(up), options(None)).await;
    let url = format!("http://{}/v1/x", b.addr);
    let phantom = tok("plain");
    let waiting = tokio::spawn(async move { get(&url, &[("x-api-key", &phantom)]).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.store.fail("vault locked: run `terok-admin vault unlock`");
    let r = waiting.await.unwrap();
    assert_eq!(r.status, 503);
    assert!(r.json()["error"].as_str().unwrap().contains("vault locked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lines_carry_no_secrets() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("vault/credential_audit.jsonl");
    let (up, _state) = fake_upstream().await;
    let b = start_broker(routes_for(up), options(Some(&audit))).await;
    b.store.provide(memory_store());
    let base = format!("http://{}", b.addr);
    let phantom = tok("plain");
    let r = get(
        &format!("{base}/v1/models?api_key=querysecret"),
        &[("x-api-key", &phantom)],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(get(&format!("{base}/v1/none"), &[]).await.status, 401);
    let bad = tok("nope");
    assert_eq!(
        get(&format!("{base}/v1/bad"), &[("x-api-key", &bad)])
            .await
            .status,
        401
    );
    let unrouted = tok("unrouted");
    assert_eq!(
        get(&format!("{base}/v1/u"), &[("x-api-key", &unrouted)])
            .await
            .status,
        404
    );
    let text = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{text}");
    let ok = &lines[0];
    for field in [
        "ts",
        "scope",
        "subject",
        "credential_set",
        "provider",
        "method",
        "path",
    ] {
        assert!(ok[field].is_string(), "{field} in {ok}");
    }
    assert_eq!(ok["path"], "/v1/models");
    assert_eq!(ok["subject"], SUBJECT);
    assert_eq!(ok["provider"], "plain");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["outcome"], "ok");
    assert!(ok["duration_ms"].is_u64());
    assert!(ok["ts"].as_str().unwrap().ends_with("+00:00"));
    let outcomes: Vec<&str> = lines
        .iter()
        .map(|l| l["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["ok", "missing_token", "invalid_token", "no_route"]
    );
    for secret in [
        REAL_KEY,
        phantom.as_str(),
        bad.as_str(),
        unrouted.as_str(),
        "querysecret",
    ] {
        assert!(!text.contains(secret), "audit log holds {secret}");
    }
    let mode = std::fs::metadata(&audit).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_connection_is_retried_only_for_empty_idempotent_requests() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that drops every connection whose number is in `drop_next` after reading
    // the request head, and answers the others.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let drop_next = Arc::new(AtomicUsize::new(1));
    let (c, d) = (connections.clone(), drop_next.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let drop_it = d.swap(0, Ordering::SeqCst) == 1;
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = stream.read(&mut buf).await;
                if !drop_it {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    let routes = json!({"plain": {"upstream": format!("http://{addr}")}});
    let b = start_broker(routes, options(None)).await;
    b.store.provide(memory_store());
    let phantom = tok("plain");
    let url = format!("http://{}/v1/x", b.addr);

    let r = get(&url, &[("x-api-key", &phantom)]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body, "ok");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        2,
        "GET was not retried once"
    );

    // A POST with a body cannot be replayed: 502, no second connection.
    drop_next.store(1, Ordering::SeqCst);
    let before = connections.load(Ordering::SeqCst);
    let r = request("POST", &url, &[("x-api-key", &phantom)], Some(body("{}"))).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json(), json!({"error": "Upstream disconnected"}));
    assert_eq!(connections.load(Ordering::SeqCst), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_times_out() {
    let (up, _state) = fake_upstream().await;
    let b = start_broker(
        routes_for(up),
        BrokerOptions {
            read_timeout: Duration::from_millis(400),
            ..options(None)
        },
    )
    .await;
    b.store.provide(memory_store());
    // The SSE upstream sends one event and then nothing (never released): the body ends
    // with an error after the idle timeout instead of hanging.
    let phantom = tok("plain");
    let req = Request::get(format!("http://{}/sse", b.addr))
        .header("x-api-key", &phantom)
        .body(Empty::new().map_err(|e| match e {}).boxed())
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect()).await;
    let outcome = outcome.expect("the broker kept a stalled body open");
    assert!(outcome.is_err(), "a stalled body ended cleanly");
    assert!(started.elapsed() >= Duration::from_millis(300));

    // An upstream that never answers at all: 504.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let b = start_broker(
        json!({"plain": {"upstream": format!("http://{silent_addr}")}}),
        BrokerOptions {
            read_timeout: Duration::from_millis(300),
            ..options(None)
        },
    )
    .await;
    b.store.provide(memory_store());
    let r = get(
        &format!("http://{}/v1/x", b.addr),
        &[("x-api-key", &phantom)],
    )
    .await;
    assert_eq!(r.status, 504);
    assert_eq!(r.json(), json!({"error": "Upstream timed out"}));
}
