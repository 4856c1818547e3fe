//! The upstream leg: pooled HTTP/1.1 clients over rustls, bodies with an idle-read timeout,
//! redirect targets and error classification.

use std::error::Error as StdError;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::time::Sleep;

use super::BrokerError;

pub type BoxError = Box<dyn StdError + Send + Sync>;
/// The body type on both legs.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;
pub type Client = HyperClient<HttpsConnector<HttpConnector>, ProxyBody>;

/// How long an idle pooled connection is kept: shorter than providers' own idle limits, so
/// the broker never reuses a connection the other side is about to close.
const POOL_IDLE: Duration = Duration::from_secs(30);

/// Trust anchors: the bundled webpki roots plus every certificate of each extra PEM file.
pub fn root_store(extra: &[&Path]) -> Result<RootCertStore, BrokerError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for path in extra {
        let bad = |detail: String| BrokerError::CaFile {
            path: path.to_path_buf(),
            detail,
        };
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
            let cert = cert.map_err(|e| bad(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("unusable certificate: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(bad("no PEM certificate in it".into()));
        }
    }
    Ok(roots)
}

/// A pooled client trusting `roots`, HTTP/1.1 only, connect timeout `connect_timeout`.
pub fn client(roots: RootCertStore, connect_timeout: Duration) -> Client {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    HyperClient::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(8)
        .build(https)
}

/// True when the failure means the connection went away before a response arrived (a stale
/// pooled connection): worth one retry for a request that can be replayed.
pub fn is_disconnect(err: &hyper_util::client::legacy::Error) -> bool {
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            return h.is_incomplete_message() || h.is_canceled() || h.is_closed();
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = e.source();
    }
    false
}

/// A body that fails when no frame arrives for `idle` (the per-read timeout).
pub struct IdleTimeout {
    inner: ProxyBody,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl IdleTimeout {
    pub fn new(inner: ProxyBody, idle: Duration) -> IdleTimeout {
        IdleTimeout {
            inner,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl Body for IdleTimeout {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + this.idle;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(frame)
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err("upstream read timed out".into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Resolve a `Location` value against the URL it came from (RFC 3986 §5.2, without
/// fragments). `None` when it cannot be turned into an http(s) URL.
pub fn resolve_location(base: &http::Uri, location: &str) -> Option<http::Uri> {
    let location = location.split('#').next().unwrap_or_default().trim();
    if location.is_empty() {
        return None;
    }
    let scheme = base.scheme_str()?;
    let authority = base.authority()?.as_str();
    let text = if let Some(rest) = location.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if location.contains("://") {
        location.to_owned()
    } else if location.starts_with('/') {
        let (path, query) = split_query(location);
        format!("{scheme}://{authority}{}{query}", remove_dots(path))
    } else if location.starts_with('?') {
        format!("{scheme}://{authority}{}{location}", base.path())
    } else {
        let (path, query) = split_query(location);
        let dir = &base.path()[..base.path().rfind('/').map_or(0, |i| i + 1)];
        let merged = if dir.is_empty() {
            format!("/{path}")
        } else {
            format!("{dir}{path}")
        };
        format!("{scheme}://{authority}{}{query}", remove_dots(&merged))
    };
    let uri: http::Uri = text.parse().ok()?;
    matches!(uri.scheme_str(), Some("http" | "https"))
        .then_some(uri)
        .filter(|u| u.authority().is_some())
}

fn split_query(s: &str) -> (&str, &str) {
    match s.find('?') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    }
}

/// RFC 3986 §5.2.4 remove_dot_segments for an absolute path.
fn remove_dots(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_resolve() {
        let base: http::Uri = "https://api.example/v1/a/b?x=1".parse().unwrap();
        let r = |l: &str| resolve_location(&base, l).map(|u| u.to_string());
        assert_eq!(
            r("https://store.example/f?sig=1").as_deref(),
            Some("https://store.example/f?sig=1")
        );
        assert_eq!(
            r("//cdn.example/f").as_deref(),
            Some("https://cdn.example/f")
        );
        assert_eq!(
            r("/x/./y/../z?q").as_deref(),
            Some("https://api.example/x/z?q")
        );
        assert_eq!(r("c").as_deref(), Some("https://api.example/v1/a/c"));
        assert_eq!(r("../c#frag").as_deref(), Some("https://api.example/v1/c"));
        assert_eq!(r("?y=2").as_deref(), Some("https://api.example/v1/a/b?y=2"));
        assert_eq!(r("ftp://x/y"), None);
        assert_eq!(r(""), None);
    }

    #[test]
    fn extra_ca_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "nothing here\n").unwrap();
        let err = root_store(&[&empty]).unwrap_err().to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
        let err = root_store(&[&dir.path().join("missing.pem")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.pem"), "{err}");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, cert.cert.pem()).unwrap();
        let n = root_store(&[]).unwrap().len();
        assert_eq!(root_store(&[&good]).unwrap().len(), n + 1);
    }
}
