//! The credential broker: an HTTP/1.1 reverse proxy that swaps a container's phantom token
//! (`terok-p-<32 hex>`) for the real credential and forwards to the provider's upstream.
//!
//! # Use (from the supervisor's broker child)
//!
//! ```no_run
//! # async fn demo(listener: tokio::net::TcpListener, db: terok::vault::Db) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use terok::broker::{self, Broker, Routes, VaultStore};
//! let routes = Routes::load(&broker::routes_path("/vault".as_ref()))?; // missing file: no routes
//! let (broker, store) = Broker::new(
//!     routes,
//!     Some(broker::audit_path("/vault".as_ref())), // None: no audit log
//!     Some("my-container".into()),                  // only this subject's tokens count
//! )?;
//! let broker = Arc::new(broker);
//! // Serve at once; requests that arrive before the store is ready wait for it.
//! let server = tokio::spawn(broker::serve(listener, broker, std::future::pending::<()>()));
//! // … open the vault in the background (one key derivation, ~160 ms) …
//! store.provide(VaultStore::new(db)); // or store.fail("vault locked: …")
//! # server.await??; Ok(()) }
//! ```
//!
//! * [`Broker::new`] / [`Broker::with_options`] build the broker from a validated
//!   [`Routes`] table and return a [`StoreSender`] through which the token store arrives
//!   later. Until it does, requests wait (bounded by [`BrokerOptions::store_wait`]); if the
//!   store fails or the sender is dropped, they get 503 with the reason.
//! * [`serve`] accepts connections on a bound listener until `shutdown` completes. It runs
//!   on any tokio runtime (a `current_thread` one is enough and keeps the child small).
//! * [`TokenStore`] is the seam to the vault; [`VaultStore`] wraps a [`crate::vault::Db`],
//!   [`MemoryStore`] keeps tokens in memory.
//!
//! # Behaviour (reference vault.md §3, with its gaps fixed)
//!
//! `GET /-/health` → 200 `{"status":"ok"}`, no auth. Everything else: phantom token from
//! `Authorization` (after the first whitespace run), `X-Api-Key` or `PRIVATE-TOKEN` → 401
//! `Missing authentication`; unknown, revoked or other-subject token → 401 `Invalid token`;
//! no route for its provider → 404 `No route for provider: <p>`; no credential → 502
//! `Credential not configured for this provider`; unusable credential → 502 `Credential
//! misconfigured`. Error bodies are `{"error": "<message>"}`.
//! The request goes to the route's upstream with the raw path and query (percent-encoding
//! kept), without hop-by-hop, auth, `Host` and `Expect` headers, with the credential injected.
//! Bodies stream both ways (no buffering, no size limit, no decompression). Only idempotent
//! requests (GET/HEAD/OPTIONS or with `Idempotency-Key`) **with an empty body** are retried,
//! once, when a pooled connection turns out dead. Redirects of idempotent requests are
//! followed by the broker (≤ 10 hops) with only `Accept`, `Accept-Encoding`, `User-Agent` —
//! never the credential; HEAD stays HEAD, 303 becomes GET. Other redirects are relayed with
//! their `Location` (rewritten to a broker-relative path when it points back at the route's
//! upstream). WebSocket upgrades are forwarded with the credential and, on 101, the two
//! upgraded connections are spliced byte for byte (`Sec-WebSocket-Extensions` is not
//! forwarded, so no compression is negotiated). Timeouts: connect 10 s, response head and
//! each body read 1200 s. One audit line per request ([`audit`]). Neither credentials nor
//! whole tokens are ever logged or returned.

pub mod audit;
pub mod headers;
mod proxy;
pub mod routes;
pub mod store;
pub mod upstream;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use audit::{AuditLog, audit_path};
pub use routes::{
    Route, RouteEnv, Routes, RoutesError, default_routes, routes_path, write_default_routes,
};
pub use store::{MemoryStore, StoreError, TokenInfo, TokenStore, VaultStore};

/// The port the broker listens on inside every container's network namespace.
pub const BROKER_PORT: u16 = 9419;

#[derive(Debug, Error)]
pub enum BrokerError {
    #[error(
        "CA file {path}: {detail}; point ca_file (or SSL_CERT_FILE) at a PEM certificate bundle"
    )]
    CaFile { path: PathBuf, detail: String },
    #[error(transparent)]
    Routes(#[from] RoutesError),
    #[error("broker listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Tunables of a broker; `Default` gives the production values.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Where audit lines go; `None` disables auditing.
    pub audit_path: Option<PathBuf>,
    /// Only tokens minted for this subject (the container name) are honoured.
    pub subject: Option<String>,
    /// How long a request waits for the store before 503 (default 120 s).
    pub store_wait: Duration,
    /// TCP connect timeout to upstreams (default 10 s).
    pub connect_timeout: Duration,
    /// Time to the response head, and between body reads (default 1200 s).
    pub read_timeout: Duration,
    /// Extra PEM CA bundle trusted for every route (default: `SSL_CERT_FILE` when set).
    pub extra_ca_file: Option<PathBuf>,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            audit_path: None,
            subject: None,
            store_wait: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(1200),
            extra_ca_file: std::env::var_os("SSL_CERT_FILE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        }
    }
}

#[derive(Clone)]
enum StoreState {
    Pending,
    Ready(Arc<dyn TokenStore>),
    Failed(String),
}

/// Hands the token store to a running broker. Dropping it before [`StoreSender::provide`]
/// fails the waiting requests (503).
pub struct StoreSender {
    tx: watch::Sender<StoreState>,
}

impl std::fmt::Debug for StoreSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSender").finish_non_exhaustive()
    }
}

impl StoreSender {
    /// The store is ready: waiting and future requests use it. May be called again to swap
    /// stores (e.g. after the vault was reopened).
    pub fn provide(&self, store: impl TokenStore) {
        self.provide_arc(Arc::new(store));
    }

    pub fn provide_arc(&self, store: Arc<dyn TokenStore>) {
        self.tx.send_replace(StoreState::Ready(store));
    }

    /// The store cannot be had: requests get 503 with `reason` (one line, no secret).
    pub fn fail(&self, reason: impl Into<String>) {
        self.tx.send_replace(StoreState::Failed(reason.into()));
    }
}

impl Drop for StoreSender {
    fn drop(&mut self) {
        self.tx.send_if_modified(|s| {
            if matches!(s, StoreState::Pending) {
                *s = StoreState::Failed("the credential store was never provided".into());
                true
            } else {
                false
            }
        });
    }
}

/// One broker: routes, clients, audit log, the (possibly pending) store.
pub struct Broker {
    routes: Routes,
    /// Per-route clients (routes with their own `ca_file`), else `default_client`.
    clients: HashMap<String, upstream::Client>,
    default_client: upstream::Client,
    audit: AuditLog,
    subject: Option<String>,
    store: watch::Receiver<StoreState>,
    options: BrokerOptions,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("routes", &self.routes.len())
            .field("subject", &self.subject)
            .field("audit", &self.audit)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// A broker with default options; see [`Broker::with_options`].
    pub fn new(
        routes: Routes,
        audit_path: Option<PathBuf>,
        subject: Option<String>,
    ) -> Result<(Broker, StoreSender), BrokerError> {
        Broker::with_options(
            routes,
            BrokerOptions {
                audit_path,
                subject,
                ..BrokerOptions::default()
            },
        )
    }

    /// Build the broker and the sender through which its store arrives. A CA file that
    /// cannot be read is logged and left out (that route trusts only the bundled roots, so
    /// a private upstream answers 502), so a bad `ca_file` never stops the broker serving.
    /// The `Result` is kept for future checks; today it does not fail.
    pub fn with_options(
        routes: Routes,
        options: BrokerOptions,
    ) -> Result<(Broker, StoreSender), BrokerError> {
        let mut extra: Vec<&Path> = Vec::new();
        if let Some(path) = &options.extra_ca_file {
            match upstream::root_store(&[path]) {
                Ok(_) => extra.push(path),
                Err(e) => tracing::error!("{e}"),
            }
        }
        let base_roots = upstream::root_store(&extra)?;
        let default_client = upstream::client(base_roots.clone(), options.connect_timeout);
        let mut clients = HashMap::new();
        for route in routes.iter() {
            if let Some(ca) = &route.ca_file {
                let mut files = extra.clone();
                files.push(ca);
                let roots = upstream::root_store(&files).unwrap_or_else(|e| {
                    tracing::error!("route {}: {e}", route.provider);
                    base_roots.clone()
                });
                clients.insert(
                    route.provider.clone(),
                    upstream::client(roots, options.connect_timeout),
                );
            }
        }
        let (tx, rx) = watch::channel(StoreState::Pending);
        let broker = Broker {
            routes,
            clients,
            default_client,
            audit: AuditLog::new(options.audit_path.clone()),
            subject: options.subject.clone(),
            store: rx,
            options,
        };
        Ok((broker, StoreSender { tx }))
    }

    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// True once a store was provided.
    pub fn store_ready(&self) -> bool {
        matches!(*self.store.borrow(), StoreState::Ready(_))
    }

    fn client_for(&self, provider: &str) -> &upstream::Client {
        self.clients.get(provider).unwrap_or(&self.default_client)
    }

    /// The store, waiting for it if it has not arrived yet.
    async fn wait_store(&self) -> Result<Arc<dyn TokenStore>, String> {
        let mut rx = self.store.clone();
        let waited = tokio::time::timeout(
            self.options.store_wait,
            rx.wait_for(|s| !matches!(s, StoreState::Pending)),
        )
        .await;
        match waited {
            Err(_) => Err(format!(
                "the credential store is not open after {} s",
                self.options.store_wait.as_secs()
            )),
            Ok(Err(_)) => Err("the credential store was never provided".into()),
            Ok(Ok(state)) => match &*state {
                StoreState::Ready(store) => Ok(store.clone()),
                StoreState::Failed(reason) => Err(reason.clone()),
                StoreState::Pending => unreachable!("waited for a settled state"),
            },
        }
    }
}

/// Serve HTTP/1.1 on `listener` until `shutdown` completes; each connection is a task on the
/// current tokio runtime. After shutdown no new connection is accepted; connections in
/// flight finish on their own (or end with the runtime).
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BrokerError> {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = crate::netutil::accept(&listener, "broker") => accepted?,
        };
        let _ = stream.set_nodelay(true);
        let broker = broker.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let broker = broker.clone();
                async move { Ok::<_, std::convert::Infallible>(proxy::handle(broker, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(60))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!("broker connection from {peer}: {e}");
            }
        });
    }
}
