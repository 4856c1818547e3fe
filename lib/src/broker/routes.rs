//! The route table (`<vault_dir>/routes.json`): where each provider's upstream is and how its
//! credential is injected. Same format as the original, plus two optional fields of ours:
//! `env` (the variables the provider's own clients read, which the launcher points at the
//! broker) and `ca_file` (an extra PEM CA bundle trusted for this route's upstream).
//!
//! ```json
//! {
//!   "anthropic": {
//!     "upstream": "https://api.anthropic.com",
//!     "auth_header": "x-api-key", "auth_prefix": "",
//!     "oauth_extra_headers": {"anthropic-beta": "oauth-2025-04-20"},
//!     "env": {"base_url": "ANTHROPIC_BASE_URL", "api_key": "ANTHROPIC_API_KEY"}
//!   }
//! }
//! ```
//!
//! A missing file means no routes (every provider answers 404), never an error. A file that
//! exists is validated whole at load time; the first problem is reported as one line naming
//! the file, the route and the field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use http::{HeaderName, HeaderValue, Uri};
use serde_json::{Map, Value, json};
use thiserror::Error;

use crate::fsutil;

/// File name of the route table inside the vault directory.
pub const ROUTES_FILE: &str = "routes.json";

/// `<vault_dir>/routes.json`.
pub fn routes_path(vault_dir: &Path) -> PathBuf {
    vault_dir.join(ROUTES_FILE)
}

#[derive(Debug, Error)]
pub enum RoutesError {
    #[error("{path}: {detail}; fix the file (or move it away to get no routes)")]
    Invalid { path: PathBuf, detail: String },
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// An upstream base: scheme, authority and base path (no trailing `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub scheme: String,
    pub authority: String,
    pub base_path: String,
}

impl Upstream {
    /// Parse `scheme://host[:port][/base-path]`; only http and https.
    pub fn parse(text: &str) -> Result<Upstream, String> {
        let uri: Uri = text
            .parse()
            .map_err(|e| format!("'{text}' is not a URL ({e})"))?;
        let scheme = uri.scheme_str().unwrap_or_default().to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!("'{text}' must start with http:// or https://"));
        }
        let Some(authority) = uri.authority() else {
            return Err(format!("'{text}' has no host"));
        };
        if authority.as_str().contains('@') {
            return Err(format!("'{text}' must not carry user info"));
        }
        if uri.query().is_some() {
            return Err(format!("'{text}' must not have a query string"));
        }
        Ok(Upstream {
            scheme,
            authority: authority.as_str().to_owned(),
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The URL for a raw (still percent-encoded) client path and query.
    pub fn url(&self, path_and_query: &str) -> String {
        let sep = if path_and_query.starts_with('/') {
            ""
        } else {
            "/"
        };
        format!(
            "{}://{}{}{sep}{path_and_query}",
            self.scheme, self.authority, self.base_path
        )
    }

    /// `scheme://authority`, for comparing origins.
    pub fn origin(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }
}

/// Background OAuth refresh settings (parsed and kept for compatibility; not acted upon yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthRefresh {
    pub token_url: String,
    pub client_id: String,
    pub scope: Option<String>,
    pub client_secret_set: bool,
}

/// The environment variables a provider's own clients read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteEnv {
    /// Variable holding the base URL (set to the broker's URL).
    pub base_url: Option<String>,
    /// Variable holding the API key (set to the phantom token).
    pub api_key: Option<String>,
}

/// One validated route.
#[derive(Debug, Clone)]
pub struct Route {
    pub provider: String,
    pub upstream: Upstream,
    /// Header that carries a non-OAuth credential (`dynamic` resolves to `x-api-key`).
    pub auth_header: HeaderName,
    /// Prefix of a non-OAuth credential value (`Bearer `, `token `, or empty).
    pub auth_prefix: String,
    /// Path-prefix overrides, longest prefix first.
    pub path_upstreams: Vec<(String, Upstream)>,
    /// Headers merged into requests that carry an OAuth credential.
    pub oauth_extra_headers: Vec<(HeaderName, HeaderValue)>,
    pub oauth_refresh: Option<OAuthRefresh>,
    pub env: RouteEnv,
    /// Extra PEM CA bundle trusted for this route's upstreams.
    pub ca_file: Option<PathBuf>,
}

impl Route {
    /// The upstream for a raw path: the longest `path_upstreams` prefix that matches on a
    /// segment boundary, else the route's `upstream`.
    pub fn upstream_for(&self, raw_path: &str) -> &Upstream {
        self.path_upstreams
            .iter()
            .find(|(prefix, _)| prefix_matches(prefix, raw_path))
            .map(|(_, up)| up)
            .unwrap_or(&self.upstream)
    }
}

/// `prefix` matches `path` itself or `path` continuing with `/` (segment boundary).
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'),
        None => false,
    }
}

/// The validated route table, keyed by provider.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    routes: BTreeMap<String, Route>,
}

impl Routes {
    /// No routes at all: every provider answers 404.
    pub fn empty() -> Routes {
        Routes::default()
    }

    /// Load `path`; a missing file is an empty table.
    pub fn load(path: &Path) -> Result<Routes, RoutesError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!("no route table at {}: no routes", path.display());
                return Ok(Routes::empty());
            }
            Err(source) => {
                return Err(RoutesError::Io {
                    what: format!("read {}", path.display()),
                    source,
                });
            }
        };
        Routes::parse(&text, path)
    }

    /// Parse and validate the JSON text of a route table (`origin` names it in errors).
    pub fn parse(text: &str, origin: &Path) -> Result<Routes, RoutesError> {
        let invalid = |detail: String| RoutesError::Invalid {
            path: origin.to_owned(),
            detail,
        };
        let doc: Value =
            serde_json::from_str(text).map_err(|e| invalid(format!("not valid JSON ({e})")))?;
        Routes::from_value(&doc).map_err(invalid)
    }

    /// Validate a parsed route table document.
    pub fn from_value(doc: &Value) -> Result<Routes, String> {
        let Value::Object(map) = doc else {
            return Err("the route table must be a JSON object keyed by provider name".into());
        };
        let mut routes = BTreeMap::new();
        for (name, spec) in map {
            if name.is_empty() {
                return Err("a route has an empty provider name".into());
            }
            routes.insert(name.clone(), parse_route(name, spec)?);
        }
        Ok(Routes { routes })
    }

    pub fn get(&self, provider: &str) -> Option<&Route> {
        self.routes.get(provider)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.values()
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

fn parse_route(name: &str, spec: &Value) -> Result<Route, String> {
    let Value::Object(spec) = spec else {
        return Err(format!("route '{name}' must be a JSON object"));
    };
    let field = |key: &str| spec.get(key).filter(|v| !v.is_null());
    let upstream = match field("upstream") {
        None => return Err(format!("Route '{name}' missing required 'upstream' field")),
        Some(Value::String(s)) if !s.is_empty() => {
            Upstream::parse(s).map_err(|e| format!("route '{name}': upstream {e}"))?
        }
        Some(_) => {
            return Err(format!(
                "route '{name}': 'upstream' must be a non-empty string"
            ));
        }
    };
    let optional_string = |key: &str| -> Result<Option<&str>, String> {
        match field(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(format!("route '{name}': '{key}' must be a string")),
        }
    };
    let (auth_header, default_prefix) = match optional_string("auth_header")? {
        None => (http::header::AUTHORIZATION, "Bearer "),
        Some(h) if h.eq_ignore_ascii_case("dynamic") => (HeaderName::from_static("x-api-key"), ""),
        Some(h) => (
            HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| format!("route '{name}': auth_header '{h}' is not a header name"))?,
            "Bearer ",
        ),
    };
    let auth_prefix = match optional_string("auth_prefix")? {
        Some(p) => {
            HeaderValue::from_str(p).map_err(|_| {
                format!("route '{name}': auth_prefix has characters a header cannot carry")
            })?;
            p.to_owned()
        }
        None => default_prefix.to_owned(),
    };
    let mut path_upstreams = Vec::new();
    if let Some(value) = field("path_upstreams") {
        let Value::Object(map) = value else {
            return Err(format!(
                "route '{name}': 'path_upstreams' must be an object"
            ));
        };
        for (prefix, target) in map {
            if !prefix.starts_with('/') {
                return Err(format!(
                    "route '{name}': path_upstreams key '{prefix}' must start with '/'"
                ));
            }
            let target = match target {
                Value::String(s) if !s.is_empty() => Upstream::parse(s)
                    .map_err(|e| format!("route '{name}': path_upstreams['{prefix}'] {e}"))?,
                _ => {
                    return Err(format!(
                        "route '{name}': path_upstreams['{prefix}'] must be a non-empty string"
                    ));
                }
            };
            path_upstreams.push((prefix.trim_end_matches('/').to_owned(), target));
        }
        path_upstreams.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
    }
    let mut oauth_extra_headers = Vec::new();
    if let Some(value) = field("oauth_extra_headers") {
        let Value::Object(map) = value else {
            return Err(format!(
                "route '{name}': 'oauth_extra_headers' must be an object"
            ));
        };
        for (header, v) in map {
            let hname = HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
                format!("route '{name}': oauth_extra_headers key '{header}' is not a header name")
            })?;
            let Value::String(v) = v else {
                return Err(format!(
                    "route '{name}': oauth_extra_headers['{header}'] must be a string"
                ));
            };
            let hvalue = HeaderValue::from_str(v).map_err(|_| {
                format!(
                    "route '{name}': oauth_extra_headers['{header}'] is not a valid header value"
                )
            })?;
            oauth_extra_headers.push((hname, hvalue));
        }
    }
    let oauth_refresh = match field("oauth_refresh") {
        None => None,
        Some(Value::Object(map)) => Some(parse_refresh(name, map)?),
        Some(_) => return Err(format!("route '{name}': 'oauth_refresh' must be an object")),
    };
    let env = match field("env") {
        None => RouteEnv::default(),
        Some(Value::Object(map)) => {
            for key in map.keys() {
                if key != "base_url" && key != "api_key" {
                    return Err(format!(
                        "route '{name}': env key '{key}' is unknown (use base_url and api_key)"
                    ));
                }
            }
            let var = |key: &str| -> Result<Option<String>, String> {
                match map.get(key).filter(|v| !v.is_null()) {
                    None => Ok(None),
                    Some(Value::String(s)) if is_env_name(s) => Ok(Some(s.clone())),
                    Some(_) => Err(format!(
                        "route '{name}': env.{key} must be a variable name like ANTHROPIC_API_KEY"
                    )),
                }
            };
            RouteEnv {
                base_url: var("base_url")?,
                api_key: var("api_key")?,
            }
        }
        Some(_) => return Err(format!("route '{name}': 'env' must be an object")),
    };
    let ca_file = match optional_string("ca_file")? {
        None => None,
        Some(p) if Path::new(p).is_absolute() => Some(PathBuf::from(p)),
        Some(p) => {
            return Err(format!(
                "route '{name}': ca_file '{p}' must be an absolute path"
            ));
        }
    };
    Ok(Route {
        provider: name.to_owned(),
        upstream,
        auth_header,
        auth_prefix,
        path_upstreams,
        oauth_extra_headers,
        oauth_refresh,
        env,
        ca_file,
    })
}

fn parse_refresh(name: &str, map: &Map<String, Value>) -> Result<OAuthRefresh, String> {
    let get = |key: &str, required: bool| -> Result<Option<String>, String> {
        match map.get(key).filter(|v| !v.is_null()) {
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            None if !required => Ok(None),
            _ => Err(format!(
                "route '{name}': oauth_refresh.{key} must be a non-empty string"
            )),
        }
    };
    Ok(OAuthRefresh {
        token_url: get("token_url", true)?.unwrap_or_default(),
        client_id: get("client_id", true)?.unwrap_or_default(),
        scope: get("scope", false)?,
        client_secret_set: get("client_secret", false)?.is_some(),
    })
}

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The default route table `setup` writes: the common providers with their public base URLs
/// and header rules. Each `base_url` variable is meant to be set to the broker's bare URL
/// (`http://127.0.0.1:9419`): the upstream carries whatever base path the client omits.
pub fn default_routes() -> Value {
    json!({
        "anthropic": {
            "upstream": "https://api.anthropic.com",
            "auth_header": "x-api-key",
            "auth_prefix": "",
            "oauth_extra_headers": {"anthropic-beta": "oauth-2025-04-20"},
            "env": {"base_url": "ANTHROPIC_BASE_URL", "api_key": "ANTHROPIC_API_KEY"}
        },
        "openai": {
            "upstream": "https://api.openai.com/v1",
            "env": {"base_url": "OPENAI_BASE_URL", "api_key": "OPENAI_API_KEY"}
        },
        "github": {
            "upstream": "https://api.github.com",
            "auth_prefix": "token ",
            "env": {"base_url": "GITHUB_API_URL", "api_key": "GH_TOKEN"}
        },
        "gitlab": {
            "upstream": "https://gitlab.com",
            "auth_header": "PRIVATE-TOKEN",
            "auth_prefix": "",
            "env": {"base_url": "GITLAB_URI", "api_key": "GITLAB_TOKEN"}
        },
        "mistral": {
            "upstream": "https://api.mistral.ai",
            "env": {"base_url": "MISTRAL_BASE_URL", "api_key": "MISTRAL_API_KEY"}
        },
        "openrouter": {
            "upstream": "https://openrouter.ai/api/v1",
            "env": {"base_url": "OPENROUTER_BASE_URL", "api_key": "OPENROUTER_API_KEY"}
        }
    })
}

/// Write the default route table to `path` (0600, atomically) unless a file is already
/// there. Returns true when it wrote one.
pub fn write_default_routes(path: &Path) -> Result<bool, RoutesError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(RoutesError::Io {
                what: format!("inspect {}", path.display()),
                source,
            });
        }
    }
    if let Some(dir) = path.parent() {
        fsutil::ensure_private_dir(dir, false).map_err(|source| RoutesError::Io {
            what: format!("create {}", dir.display()),
            source,
        })?;
    }
    let mut text = serde_json::to_string_pretty(&default_routes()).expect("JSON document");
    text.push('\n');
    fsutil::write_atomic(path, text.as_bytes(), 0o600).map_err(|source| RoutesError::Io {
        what: format!("write {}", path.display()),
        source,
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn parse(doc: Value) -> Result<Routes, String> {
        Routes::from_value(&doc)
    }

    #[test]
    fn defaults_validate_and_name_their_env() {
        let routes = parse(default_routes()).unwrap();
        for p in [
            "anthropic",
            "openai",
            "github",
            "gitlab",
            "mistral",
            "openrouter",
        ] {
            let r = routes.get(p).unwrap();
            assert_eq!(r.upstream.scheme, "https", "{p}");
            assert!(r.env.base_url.is_some() && r.env.api_key.is_some(), "{p}");
        }
        let a = routes.get("anthropic").unwrap();
        assert_eq!(a.auth_header.as_str(), "x-api-key");
        assert_eq!(a.auth_prefix, "");
        assert_eq!(a.env.api_key.as_deref(), Some("ANTHROPIC_API_KEY"));
        assert_eq!(routes.get("github").unwrap().auth_prefix, "token ");
        assert_eq!(
            routes.get("gitlab").unwrap().auth_header.as_str(),
            "private-token"
        );
        assert_eq!(routes.get("openai").unwrap().auth_prefix, "Bearer ");
    }

    #[test]
    fn defaults_and_dynamic() {
        let routes = parse(json!({
            "a": {"upstream": "http://127.0.0.1:1/base/"},
            "b": {"upstream": "https://x", "auth_header": "dynamic"},
        }))
        .unwrap();
        let a = routes.get("a").unwrap();
        assert_eq!(a.auth_header, http::header::AUTHORIZATION);
        assert_eq!(a.auth_prefix, "Bearer ");
        assert_eq!(a.upstream.base_path, "/base");
        assert_eq!(
            a.upstream.url("/v1/x%2Fy?q=1"),
            "http://127.0.0.1:1/base/v1/x%2Fy?q=1"
        );
        assert_eq!(a.upstream.url("v1"), "http://127.0.0.1:1/base/v1");
        let b = routes.get("b").unwrap();
        assert_eq!(b.auth_header.as_str(), "x-api-key");
        assert_eq!(b.auth_prefix, "");
    }

    #[test]
    fn validation_errors_are_one_clear_line() {
        let cases = [
            (
                json!({"p": {}}),
                "Route 'p' missing required 'upstream' field",
            ),
            (
                json!({"p": {"upstream": 3}}),
                "'upstream' must be a non-empty string",
            ),
            (
                json!({"p": {"upstream": "ftp://x"}}),
                "must start with http",
            ),
            (
                json!({"p": {"upstream": "https://x", "path_upstreams": []}}),
                "'path_upstreams' must be an object",
            ),
            (
                json!({"p": {"upstream": "https://x", "path_upstreams": {"v1": "https://y"}}}),
                "must start with '/'",
            ),
            (
                json!({"p": {"upstream": "https://x", "path_upstreams": {"/v1": ""}}}),
                "must be a non-empty string",
            ),
            (
                json!({"p": {"upstream": "https://x", "oauth_extra_headers": "x"}}),
                "'oauth_extra_headers' must be an object",
            ),
            (
                json!({"p": {"upstream": "https://x", "oauth_extra_headers": {"": "v"}}}),
                "is not a header name",
            ),
            (
                json!({"p": {"upstream": "https://x", "oauth_extra_headers": {"h": 1}}}),
                "must be a string",
            ),
            (
                json!({"p": {"upstream": "https://x", "env": {"api_key": "1BAD"}}}),
                "variable name",
            ),
            (
                json!({"p": {"upstream": "https://x", "env": {"token": "X"}}}),
                "env key 'token' is unknown",
            ),
            (
                json!({"p": {"upstream": "https://x", "ca_file": "rel.pem"}}),
                "absolute path",
            ),
            (
                json!({"p": {"upstream": "https://x", "oauth_refresh": {"client_id": "c"}}}),
                "oauth_refresh.token_url",
            ),
            (json!([]), "JSON object"),
        ];
        for (doc, want) in cases {
            let err = parse(doc.clone()).unwrap_err();
            assert!(err.contains(want), "{doc}: {err}");
            assert!(!err.contains('\n'));
        }
        let err = Routes::parse("{", Path::new("/v/routes.json")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/v/routes.json: not valid JSON")
        );
    }

    #[test]
    fn longest_prefix_on_segment_boundary() {
        let routes = parse(json!({"p": {
            "upstream": "https://main",
            "path_upstreams": {"/v1": "https://one", "/v1/files/": "https://files"}
        }}))
        .unwrap();
        let r = routes.get("p").unwrap();
        assert_eq!(r.upstream_for("/v1/files/abc").authority, "files");
        assert_eq!(r.upstream_for("/v1/files").authority, "files");
        assert_eq!(r.upstream_for("/v1/filesystem").authority, "one");
        assert_eq!(r.upstream_for("/v1").authority, "one");
        assert_eq!(r.upstream_for("/v10").authority, "main");
        assert_eq!(r.upstream_for("/").authority, "main");
    }

    #[test]
    fn missing_file_is_no_routes_and_defaults_are_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = routes_path(&dir.path().join("vault"));
        assert!(Routes::load(&path).unwrap().is_empty());
        assert!(write_default_routes(&path).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(Routes::load(&path).unwrap().len(), 6);
        std::fs::write(&path, "{}").unwrap();
        assert!(!write_default_routes(&path).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}");
    }
}
