//! Header rules: where the phantom token comes from, which headers cross the broker, and how
//! the real credential is put in.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use super::routes::Route;

/// The headers a phantom token may arrive in, in the order they are consulted.
pub const TOKEN_HEADERS: [&str; 3] = ["authorization", "x-api-key", "private-token"];

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy-only ones; never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The phantom token of a request: the first present of `Authorization`, `X-Api-Key`,
/// `PRIVATE-TOKEN`; a value with whitespace yields what follows the first whitespace run
/// (`Bearer x`, `token x` ⇒ `x`). `None` when no such header carries a non-empty value.
pub fn extract_token(headers: &HeaderMap) -> Option<String> {
    let value = TOKEN_HEADERS
        .iter()
        .find_map(|name| headers.get(*name))?
        .to_str()
        .ok()?
        .trim();
    let token = match value.find(char::is_whitespace) {
        Some(i) => value[i..].trim_start(),
        None => value,
    };
    (!token.is_empty()).then(|| token.to_owned())
}

/// Names listed in the request's `Connection` header (lower-cased).
fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Headers of a message with hop-by-hop headers (and those named in `Connection`) removed.
pub fn strip_hop_by_hop(headers: &HeaderMap) -> HeaderMap {
    let listed = connection_listed(headers);
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || listed.iter().any(|l| l == n) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// The request headers sent upstream: without hop-by-hop headers, without any of the three
/// auth headers (the phantom), without `Host` (set from the upstream URL) and `Expect` (the
/// broker already answered it on the client's leg).
pub fn request_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = strip_hop_by_hop(headers);
    for name in TOKEN_HEADERS {
        out.remove(name);
    }
    out.remove(header::HOST);
    out.remove(header::EXPECT);
    out
}

/// How the real credential goes into the upstream request.
#[derive(Clone)]
pub struct Injection {
    pub header: HeaderName,
    /// Prefix + secret, marked sensitive so it is never printed by `Debug`.
    pub value: HeaderValue,
    pub oauth: bool,
}

impl std::fmt::Debug for Injection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injection")
            .field("header", &self.header)
            .field("oauth", &self.oauth)
            .finish_non_exhaustive()
    }
}

/// Build the injection for a credential payload (reference §3.3 step 5): OAuth credentials
/// (`type == "oauth"`, or no type and an `access_token`) go as `Authorization: Bearer
/// <access_token>`; others as the route's header and prefix with `token`, else `key`.
/// `None` when the payload lacks a usable secret (502 "Credential misconfigured").
pub fn injection(credential: &Value, route: &Route) -> Option<Injection> {
    let ty = credential.get("type").and_then(Value::as_str);
    let non_empty = |key: &str| {
        credential
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let oauth = ty == Some("oauth") || (ty.is_none() && credential.get("access_token").is_some());
    let (header, prefix, secret) = if oauth {
        (header::AUTHORIZATION, "Bearer ", non_empty("access_token")?)
    } else {
        (
            route.auth_header.clone(),
            route.auth_prefix.as_str(),
            non_empty("token").or_else(|| non_empty("key"))?,
        )
    };
    let mut value = HeaderValue::from_str(&format!("{prefix}{secret}")).ok()?;
    value.set_sensitive(true);
    Some(Injection {
        header,
        value,
        oauth,
    })
}

/// Put the credential into outgoing headers; for OAuth credentials also merge the route's
/// extra headers (appended to an existing comma list unless that exact value is in it).
pub fn inject(headers: &mut HeaderMap, injection: &Injection, route: &Route) {
    headers.insert(injection.header.clone(), injection.value.clone());
    if !injection.oauth {
        return;
    }
    for (name, value) in &route.oauth_extra_headers {
        let wanted = value.to_str().unwrap_or_default();
        let existing: Vec<String> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if existing.iter().any(|e| e == wanted) {
            continue;
        }
        let merged = if existing.is_empty() {
            value.clone()
        } else {
            HeaderValue::from_str(&format!("{},{wanted}", existing.join(",")))
                .unwrap_or_else(|_| value.clone())
        };
        headers.insert(name.clone(), merged);
    }
}

/// True for a WebSocket upgrade request.
pub fn is_websocket(headers: &HeaderMap) -> bool {
    let has = |name: HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has(header::UPGRADE, "websocket") && has(header::CONNECTION, "upgrade")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::routes::Routes;
    use serde_json::json;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn route(doc: Value) -> Route {
        Routes::from_value(&json!({ "p": doc }))
            .unwrap()
            .get("p")
            .unwrap()
            .clone()
    }

    #[test]
    fn token_extraction() {
        let t = |pairs: &[(&str, &str)]| extract_token(&headers(pairs));
        assert_eq!(
            t(&[("Authorization", "Bearer abc")]).as_deref(),
            Some("abc")
        );
        assert_eq!(
            t(&[("authorization", "token  \t abc")]).as_deref(),
            Some("abc")
        );
        assert_eq!(t(&[("X-Api-Key", "abc")]).as_deref(), Some("abc"));
        assert_eq!(t(&[("PRIVATE-TOKEN", "abc")]).as_deref(), Some("abc"));
        assert_eq!(
            t(&[("x-api-key", "k"), ("authorization", "Bearer a")]).as_deref(),
            Some("a")
        );
        assert_eq!(t(&[]), None);
        assert_eq!(t(&[("authorization", "")]), None);
        assert_eq!(t(&[("cookie", "abc")]), None);
    }

    #[test]
    fn forwarded_headers_drop_auth_hop_by_hop_and_connection_listed() {
        let h = headers(&[
            ("authorization", "Bearer phantom"),
            ("x-api-key", "phantom"),
            ("private-token", "phantom"),
            ("host", "127.0.0.1:9419"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("expect", "100-continue"),
            ("accept-encoding", "gzip"),
            ("set-thing", "a"),
            ("set-thing", "b"),
        ]);
        let out = request_headers(&h);
        let mut names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["accept-encoding", "set-thing"]);
        assert_eq!(out.get_all("set-thing").iter().count(), 2);
    }

    #[test]
    fn injection_rules() {
        let api = route(json!({"upstream": "https://x"}));
        let i = injection(&json!({"type": "api_key", "key": "K"}), &api).unwrap();
        assert_eq!(i.header, header::AUTHORIZATION);
        assert_eq!(i.value, "Bearer K");
        assert!(!format!("{i:?}").contains('K'));
        let i = injection(&json!({"token": "T", "key": "K"}), &api).unwrap();
        assert_eq!(i.value, "Bearer T");
        assert!(injection(&json!({"type": "api_key"}), &api).is_none());
        assert!(injection(&json!({"type": "api_key", "key": ""}), &api).is_none());
        assert!(injection(&json!({"type": "api_key", "key": "a\nb"}), &api).is_none());

        let gl = route(
            json!({"upstream": "https://x", "auth_header": "PRIVATE-TOKEN", "auth_prefix": ""}),
        );
        let i = injection(&json!({"type": "pat", "token": "T"}), &gl).unwrap();
        assert_eq!(i.header.as_str(), "private-token");
        assert_eq!(i.value, "T");

        let dy = route(json!({"upstream": "https://x", "auth_header": "dynamic"}));
        let i = injection(&json!({"key": "K"}), &dy).unwrap();
        assert_eq!(
            (i.header.as_str(), i.value.to_str().unwrap()),
            ("x-api-key", "K")
        );
        // OAuth ignores the route's header.
        let i = injection(&json!({"access_token": "A"}), &dy).unwrap();
        assert_eq!(i.header, header::AUTHORIZATION);
        assert_eq!(i.value, "Bearer A");
        assert!(injection(&json!({"type": "oauth", "token": "T"}), &dy).is_none());
    }

    #[test]
    fn oauth_extra_headers_merge_by_exact_value() {
        let r =
            route(json!({"upstream": "https://x", "oauth_extra_headers": {"anthropic-beta": "x"}}));
        let oauth = injection(&json!({"type": "oauth", "access_token": "A"}), &r).unwrap();
        let mut h = headers(&[("anthropic-beta", "x-preview")]);
        inject(&mut h, &oauth, &r);
        assert_eq!(h["anthropic-beta"], "x-preview,x");
        let mut h = headers(&[("anthropic-beta", "a, x")]);
        inject(&mut h, &oauth, &r);
        assert_eq!(h["anthropic-beta"], "a, x");
        let mut h = HeaderMap::new();
        inject(&mut h, &oauth, &r);
        assert_eq!(h["anthropic-beta"], "x");
        assert_eq!(h["authorization"], "Bearer A");
        // Not for API keys.
        let key = injection(&json!({"key": "K"}), &r).unwrap();
        let mut h = HeaderMap::new();
        inject(&mut h, &key, &r);
        assert!(h.get("anthropic-beta").is_none());
    }

    #[test]
    fn websocket_detection() {
        assert!(is_websocket(&headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket")
        ])));
        assert!(!is_websocket(&headers(&[("upgrade", "websocket")])));
        assert!(!is_websocket(&headers(&[
            ("connection", "upgrade"),
            ("upgrade", "h2c")
        ])));
    }
}
