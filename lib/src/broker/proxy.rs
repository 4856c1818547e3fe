//! The per-request algorithm: authorise, route, inject, forward (HTTP or WebSocket), relay.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;

use super::Broker;
use super::audit::{Entry, Outcome};
use super::headers::{self, Injection};
use super::routes::{Route, Upstream};
use super::store::TokenInfo;
use super::upstream::{self, IdleTimeout, ProxyBody};
use crate::vault::store::mask_token;

/// Redirect hops the broker follows before giving up.
const MAX_REDIRECTS: usize = 10;
/// Client headers carried onto a followed redirect (never the credential).
const REDIRECT_HEADERS: [header::HeaderName; 3] =
    [header::ACCEPT, header::ACCEPT_ENCODING, header::USER_AGENT];

/// A request the broker answers itself.
struct Reject {
    status: StatusCode,
    message: String,
    outcome: Outcome,
}

impl Reject {
    fn new(status: StatusCode, message: impl Into<String>, outcome: Outcome) -> Reject {
        Reject {
            status,
            message: message.into(),
            outcome,
        }
    }
}

fn full(status: StatusCode, content_type: &'static str, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn error_response(status: StatusCode, message: &str) -> Response<ProxyBody> {
    full(
        status,
        "application/json",
        serde_json::json!({ "error": message }).to_string(),
    )
}

fn empty_body() -> ProxyBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Entry point for one request; never fails (errors become responses).
pub(super) async fn handle(broker: Arc<Broker>, req: Request<Incoming>) -> Response<ProxyBody> {
    let start = Instant::now();
    if req.uri().path() == "/-/health" && matches!(*req.method(), Method::GET | Method::HEAD) {
        return full(
            StatusCode::OK,
            "application/json",
            r#"{"status":"ok"}"#.into(),
        );
    }
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let mut info: Option<TokenInfo> = None;
    let (resp, outcome) = match proxy(&broker, req, &mut info).await {
        Ok(resp) => (resp, Outcome::Ok),
        Err(reject) => {
            let line = format!(
                "{method} {path} -> {} {}",
                reject.status.as_u16(),
                reject.message
            );
            if reject.status.is_server_error() {
                tracing::error!("{line}");
            } else {
                tracing::warn!("{line}");
            }
            (
                error_response(reject.status, &reject.message),
                reject.outcome,
            )
        }
    };
    let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    broker.audit.record(&Entry::new(
        info.as_ref(),
        &method,
        &path,
        resp.status().as_u16(),
        outcome,
        ms,
    ));
    resp
}

/// Run a store call off the event loop.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, super::StoreError> + Send + 'static,
) -> Result<T, Reject> {
    let store_failed = |detail: String| {
        tracing::error!("credential store: {detail}");
        Reject::new(
            StatusCode::BAD_GATEWAY,
            "Credential store error",
            Outcome::StoreUnavailable,
        )
    };
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(store_failed(e.to_string())),
        Err(e) => Err(store_failed(format!("lookup task failed: {e}"))),
    }
}

async fn proxy(
    broker: &Broker,
    req: Request<Incoming>,
    info_out: &mut Option<TokenInfo>,
) -> Result<Response<ProxyBody>, Reject> {
    let Some(token) = headers::extract_token(req.headers()) else {
        return Err(Reject::new(
            StatusCode::UNAUTHORIZED,
            "Missing authentication",
            Outcome::MissingToken,
        ));
    };
    let store = broker.wait_store().await.map_err(|reason| {
        Reject::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Credential store unavailable: {reason}"),
            Outcome::StoreUnavailable,
        )
    })?;
    let lookup_store = store.clone();
    let masked = mask_token(&token);
    let info = blocking(move || lookup_store.lookup(&token)).await?;
    let invalid = || {
        Reject::new(
            StatusCode::UNAUTHORIZED,
            "Invalid token",
            Outcome::InvalidToken,
        )
    };
    let Some(info) = info else {
        tracing::debug!("unknown phantom token {masked}");
        return Err(invalid());
    };
    if let Some(subject) = &broker.subject
        && &info.subject != subject
    {
        tracing::warn!(
            "phantom token {masked} belongs to subject {:?}, not {subject:?}",
            info.subject
        );
        return Err(invalid());
    }
    *info_out = Some(info.clone());
    let Some(route) = broker.routes.get(&info.provider) else {
        return Err(Reject::new(
            StatusCode::NOT_FOUND,
            format!("No route for provider: {}", info.provider),
            Outcome::NoRoute,
        ));
    };
    let (set, provider) = (info.credential_set.clone(), info.provider.clone());
    let credential = blocking(move || store.credential(&set, &provider)).await?;
    let Some(credential) = credential else {
        return Err(Reject::new(
            StatusCode::BAD_GATEWAY,
            "Credential not configured for this provider",
            Outcome::CredentialMissing,
        ));
    };
    let Some(injection) = headers::injection(&credential, route) else {
        return Err(Reject::new(
            StatusCode::BAD_GATEWAY,
            "Credential misconfigured",
            Outcome::CredentialMisconfigured,
        ));
    };
    drop(credential);

    let raw = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let upstream = route.upstream_for(req.uri().path());
    let uri: Uri = upstream.url(&raw).parse().map_err(|e| {
        Reject::new(
            StatusCode::BAD_GATEWAY,
            format!("Upstream URL invalid: {e}"),
            Outcome::UpstreamError,
        )
    })?;
    let client = broker.client_for(&route.provider);

    if headers::is_websocket(req.headers()) {
        return websocket(broker, client, route, &injection, uri, req).await;
    }

    let method = req.method().clone();
    let mut out_headers = headers::request_headers(req.headers());
    headers::inject(&mut out_headers, &injection, route);
    let idempotent = matches!(method, Method::GET | Method::HEAD | Method::OPTIONS)
        || req.headers().contains_key("idempotency-key");
    let empty = req.body().is_end_stream();
    let client_headers = req.headers().clone();
    let body = if empty {
        None
    } else {
        Some(req.into_body().map_err(Into::into).boxed_unsync())
    };
    let resp = send(
        broker,
        client,
        &method,
        &uri,
        &out_headers,
        body,
        idempotent && empty,
    )
    .await?;
    drop(out_headers);

    let followable = matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    let (resp, followed) = if followable && is_redirect(&resp) {
        (
            follow(broker, client, &method, uri, &client_headers, resp).await?,
            true,
        )
    } else {
        (resp, false)
    };
    Ok(relay(broker, resp, (!followed).then_some(upstream)))
}

fn is_redirect(resp: &Response<Incoming>) -> bool {
    matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308)
        && resp.headers().contains_key(header::LOCATION)
}

/// Send one request upstream; an empty-bodied idempotent request is retried once when the
/// connection died before a response came.
async fn send(
    broker: &Broker,
    client: &upstream::Client,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    mut body: Option<ProxyBody>,
    replayable: bool,
) -> Result<Response<Incoming>, Reject> {
    let host = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut req = Request::new(body.take().unwrap_or_else(empty_body));
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri.clone();
        *req.headers_mut() = headers.clone();
        match tokio::time::timeout(broker.options.read_timeout, client.request(req)).await {
            Ok(Ok(resp)) => return Ok(resp),
            Err(_) => {
                return Err(Reject::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Upstream timed out",
                    Outcome::UpstreamTimeout,
                ));
            }
            Ok(Err(e)) => {
                let disconnect = upstream::is_disconnect(&e);
                if disconnect && replayable && attempt == 1 {
                    tracing::debug!("upstream {host} closed a pooled connection; retrying once");
                    continue;
                }
                tracing::warn!("upstream {host}: {}", chain(&e));
                return Err(if disconnect {
                    Reject::new(
                        StatusCode::BAD_GATEWAY,
                        "Upstream disconnected",
                        Outcome::UpstreamDisconnected,
                    )
                } else {
                    Reject::new(
                        StatusCode::BAD_GATEWAY,
                        "Upstream request failed",
                        Outcome::UpstreamError,
                    )
                });
            }
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Follow redirects of an idempotent request without the credential.
async fn follow(
    broker: &Broker,
    client: &upstream::Client,
    method: &Method,
    mut current: Uri,
    client_headers: &HeaderMap,
    mut resp: Response<Incoming>,
) -> Result<Response<Incoming>, Reject> {
    let mut headers = HeaderMap::new();
    for name in REDIRECT_HEADERS {
        for value in client_headers.get_all(&name) {
            headers.append(name.clone(), value.clone());
        }
    }
    let mut method = method.clone();
    for _ in 0..MAX_REDIRECTS {
        if !is_redirect(&resp) {
            return Ok(resp);
        }
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let Some(next) = upstream::resolve_location(&current, location) else {
            // Not something we can follow (another scheme, garbage): relay it as is.
            return Ok(resp);
        };
        if resp.status() == StatusCode::SEE_OTHER && method != Method::HEAD {
            method = Method::GET;
        }
        drop(resp);
        resp = send(broker, client, &method, &next, &headers, None, true).await?;
        current = next;
    }
    if is_redirect(&resp) {
        return Err(Reject::new(
            StatusCode::BAD_GATEWAY,
            "Too many redirects",
            Outcome::TooManyRedirects,
        ));
    }
    Ok(resp)
}

/// Relay an upstream response: status, every end-to-end header (duplicates kept), the body
/// streamed with the idle-read timeout. `origin`: the upstream the request went to, for
/// rewriting a `Location` that points back at it into a broker-relative one.
fn relay(
    broker: &Broker,
    resp: Response<Incoming>,
    origin: Option<&Upstream>,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    parts.headers = headers::strip_hop_by_hop(&parts.headers);
    if let Some(up) = origin {
        rewrite_location(&mut parts.headers, up);
    }
    let body = IdleTimeout::new(
        body.map_err(Into::into).boxed_unsync(),
        broker.options.read_timeout,
    )
    .boxed_unsync();
    Response::from_parts(parts, body)
}

/// `https://upstream/base/x?y` → `/x?y` (the client reaches it through the broker).
fn rewrite_location(headers: &mut HeaderMap, up: &Upstream) {
    let Some(loc) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) else {
        return;
    };
    let Ok(uri) = loc.parse::<Uri>() else { return };
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return;
    };
    if !scheme.eq_ignore_ascii_case(&up.scheme)
        || !authority.as_str().eq_ignore_ascii_case(&up.authority)
    {
        return;
    }
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let Some(rest) = pq.strip_prefix(up.base_path.as_str()) else {
        return;
    };
    let rel = if rest.starts_with('/') {
        rest.to_owned()
    } else if rest.is_empty() || rest.starts_with('?') {
        format!("/{rest}")
    } else {
        return; // base path matched mid-segment: leave it absolute
    };
    if let Ok(v) = HeaderValue::from_str(&rel) {
        headers.insert(header::LOCATION, v);
    }
}

/// WebSocket pass-through: forward the upgrade request with the credential; on 101 splice
/// the two upgraded connections byte for byte.
async fn websocket(
    broker: &Broker,
    client: &upstream::Client,
    route: &Route,
    injection: &Injection,
    uri: Uri,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Reject> {
    let client_upgrade = hyper::upgrade::on(&mut req);
    let mut out = headers::request_headers(req.headers());
    // The broker cannot take part in a compression it did not negotiate: never offer one.
    out.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    out.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers::inject(&mut out, injection, route);
    let mut resp = send(broker, client, &Method::GET, &uri, &out, None, false).await?;
    drop(out);
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(relay(broker, resp, None));
    }
    let upstream_upgrade = hyper::upgrade::on(&mut resp);
    let mut headers = headers::strip_hop_by_hop(resp.headers());
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let host = uri.authority().map(|a| a.to_string()).unwrap_or_default();
    tokio::spawn(async move {
        let (down, up) = tokio::join!(client_upgrade, upstream_upgrade);
        match (down, up) {
            (Ok(down), Ok(up)) => {
                let mut down = hyper_util::rt::TokioIo::new(down);
                let mut up = hyper_util::rt::TokioIo::new(up);
                match tokio::io::copy_bidirectional(&mut down, &mut up).await {
                    Ok((sent, received)) => tracing::debug!(
                        "websocket to {host} closed ({sent} bytes up, {received} down)"
                    ),
                    Err(e) => tracing::debug!("websocket to {host} ended: {e}"),
                }
            }
            (down, up) => tracing::warn!(
                "websocket to {host}: upgrade failed (client: {:?}, upstream: {:?})",
                down.err().map(|e| e.to_string()),
                up.err().map(|e| e.to_string())
            ),
        }
    });
    let mut out = Response::new(empty_body());
    *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *out.headers_mut() = headers;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_rewrite_only_for_the_upstream_itself() {
        let up = Upstream::parse("https://api.example/v1").unwrap();
        let rewrite = |loc: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::LOCATION, HeaderValue::from_str(loc).unwrap());
            rewrite_location(&mut h, &up);
            h[header::LOCATION].to_str().unwrap().to_owned()
        };
        assert_eq!(rewrite("https://api.example/v1/jobs/7?x=1"), "/jobs/7?x=1");
        assert_eq!(rewrite("https://API.example/v1"), "/");
        assert_eq!(
            rewrite("https://api.example/v10/x"),
            "https://api.example/v10/x"
        );
        assert_eq!(
            rewrite("https://other.example/v1/x"),
            "https://other.example/v1/x"
        );
        assert_eq!(
            rewrite("http://api.example/v1/x"),
            "http://api.example/v1/x"
        );
        assert_eq!(rewrite("/relative"), "/relative");
    }
}
