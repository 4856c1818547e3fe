//! The gate's HTTP front end: one repo, one token, smart-HTTP routes only. Every check runs
//! before git does; a refused request never starts a process.
//!
//! | condition | response |
//! |---|---|
//! | not a smart-HTTP route (`GET /<repo>.git/info/refs?service=git-upload-pack\|git-receive-pack`, `POST /<repo>.git/git-upload-pack\|git-receive-pack`) | 404 |
//! | no HTTP Basic credentials, or a username other than the gate token | 401 + `WWW-Authenticate` |
//! | a repo other than `<project>.git` | 404 |
//! | a `Content-Length` that is not a number | 400 |
//! | otherwise | `git http-backend` ([`super::cgi`]) |

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use super::{GateError, home_dir, hooks, hooks_dir, io, repo_path};
use crate::sidecar::Sidecar;

pub type GateBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// One container's gate: the repo it serves and the token it accepts.
pub struct Gate {
    pub(crate) gate_dir: PathBuf,
    pub(crate) project: String,
    token: String,
    pub(crate) backend: PathBuf,
    /// How many times git ran (for logs and tests: refused requests never add to it).
    pub(crate) runs: AtomicU64,
    /// The Landlock lane every git process gets: its own repo writable, the gate's hooks
    /// and home and the system readable, other projects' mirrors not even readable.
    pub(crate) lane: Option<std::os::fd::OwnedFd>,
    /// At most [`MAX_GIT`] git processes at a time per container: more requests wait, so a
    /// container cannot fill the host with processes.
    pub(crate) slots: Arc<tokio::sync::Semaphore>,
}

/// Concurrent git processes per gate.
pub const MAX_GIT: usize = 8;

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("gate_dir", &self.gate_dir)
            .field("project", &self.project)
            .finish_non_exhaustive()
    }
}

impl Gate {
    /// A gate for `project`'s mirror under `gate_dir`, accepting `token`. Installs the
    /// gate-owned hooks and the private git home.
    pub fn new(gate_dir: PathBuf, project: &str, token: String) -> Result<Self, GateError> {
        repo_path(&gate_dir, project)?;
        hooks::install(&hooks_dir(&gate_dir))?;
        let home = home_dir(&gate_dir);
        crate::fsutil::ensure_private_dir(&home, true)
            .map_err(io(format!("create {}", home.display())))?;
        let mut read = crate::supervisor::harden::system_read_paths();
        read.extend([hooks_dir(&gate_dir), home.clone()]);
        let lane = crate::supervisor::harden::ruleset_fd(&crate::supervisor::harden::Lane {
            read,
            write: vec![repo_path(&gate_dir, project)?],
        });
        if lane.is_none() {
            tracing::warn!(
                "gate: no Landlock lane (kernel without Landlock, or no repo yet); git runs unconfined"
            );
        }
        Ok(Gate {
            gate_dir,
            project: project.to_owned(),
            token,
            backend: PathBuf::from(super::HTTP_BACKEND),
            runs: AtomicU64::new(0),
            lane,
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_GIT)),
        })
    }

    /// The gate a sidecar wires, if it wires one.
    pub fn from_sidecar(sidecar: &Sidecar) -> Result<Option<Self>, GateError> {
        match (&sidecar.gate_dir, &sidecar.project, &sidecar.gate_token) {
            (Some(dir), Some(project), Some(token)) if sidecar.gate => {
                Self::new(dir.clone(), project, token.clone()).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Use another CGI program than git's (tests).
    pub fn with_backend(mut self, backend: PathBuf) -> Self {
        self.backend = backend;
        self
    }

    /// How many times git has run for this gate.
    pub fn git_runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }
}

/// What a smart-HTTP request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    UploadPack,
    ReceivePack,
}

impl Rpc {
    pub fn name(self) -> &'static str {
        match self {
            Rpc::UploadPack => "git-upload-pack",
            Rpc::ReceivePack => "git-receive-pack",
        }
    }
}

/// A routed request: `/<repo>/info/refs?service=…` or `/<repo>/<rpc>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<'a> {
    /// `<name>.git`, name as the request spelled it (checked against the project later).
    pub repo: &'a str,
    pub rpc: Rpc,
    /// `true` for the ref advertisement (`GET …/info/refs`).
    pub advertisement: bool,
}

impl Route<'_> {
    /// The part of `PATH_INFO` after the repo.
    pub fn tail(&self) -> &'static str {
        match (self.advertisement, self.rpc) {
            (true, _) => "/info/refs",
            (false, r) => match r {
                Rpc::UploadPack => "/git-upload-pack",
                Rpc::ReceivePack => "/git-receive-pack",
            },
        }
    }
}

/// Match a request against the smart-HTTP routes. The path is taken raw (no
/// percent-decoding): anything but `[A-Za-z0-9._-]` in the repo name fails, so there is no
/// traversal and no second repo.
pub fn route<'a>(method: &Method, path: &'a str, query: Option<&str>) -> Option<Route<'a>> {
    let rest = path.strip_prefix('/')?;
    let (repo, tail) = rest.split_at(rest.find('/')?);
    let stem = repo.strip_suffix(".git")?;
    crate::names::project(stem).ok()?;
    match (method, tail) {
        (&Method::GET, "/info/refs") => {
            let service = query?.strip_prefix("service=")?;
            let rpc = match service {
                "git-upload-pack" => Rpc::UploadPack,
                "git-receive-pack" => Rpc::ReceivePack,
                _ => return None,
            };
            Some(Route {
                repo,
                rpc,
                advertisement: true,
            })
        }
        (&Method::POST, "/git-upload-pack") => Some(Route {
            repo,
            rpc: Rpc::UploadPack,
            advertisement: false,
        }),
        (&Method::POST, "/git-receive-pack") => Some(Route {
            repo,
            rpc: Rpc::ReceivePack,
            advertisement: false,
        }),
        _ => None,
    }
}

/// The username of an HTTP Basic `Authorization` header (the password is ignored).
pub fn basic_user(value: Option<&HeaderValue>) -> Option<String> {
    let value = value?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let decoded = LENIENT.decode(rest.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, _password) = text.split_once(':')?;
    (!user.is_empty()).then(|| user.to_owned())
}

/// Constant-time token comparison (the length of our tokens is public).
pub fn token_matches(given: &str, expected: &str) -> bool {
    given.len() == expected.len() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

pub(crate) fn text(status: StatusCode, body: &'static str) -> Response<GateBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Route, authenticate and authorise, then hand over to git.
pub async fn handle(gate: Arc<Gate>, req: Request<Incoming>) -> Response<GateBody> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let refuse = |status: StatusCode, why: &str| {
        tracing::info!(%method, path = %path, status = status.as_u16(), "gate: refused ({why})");
    };
    let Some(route) = route(req.method(), req.uri().path(), req.uri().query()) else {
        refuse(StatusCode::NOT_FOUND, "not a smart-HTTP route");
        return text(StatusCode::NOT_FOUND, "Not Found\n");
    };
    let authorised = basic_user(req.headers().get(header::AUTHORIZATION))
        .is_some_and(|user| token_matches(&user, &gate.token));
    if !authorised {
        refuse(StatusCode::UNAUTHORIZED, "no or wrong gate token");
        let mut resp = text(StatusCode::UNAUTHORIZED, "Authentication required\n");
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"terok gate\""),
        );
        return resp;
    }
    if route.repo.strip_suffix(".git") != Some(gate.project.as_str()) {
        refuse(StatusCode::NOT_FOUND, "another project's repo");
        return text(StatusCode::NOT_FOUND, "Not Found\n");
    }
    let (rpc, advertisement) = (route.rpc, route.advertisement);
    let tail = route.tail();
    super::cgi::run(gate, rpc, advertisement, tail, req).await
}

/// Serve the gate on `listener` until `shutdown` completes; each connection is a task on the
/// current runtime.
pub async fn serve(
    listener: TcpListener,
    gate: Arc<Gate>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = crate::netutil::accept(&listener, "gate") => accepted?,
        };
        let _ = stream.set_nodelay(true);
        let gate = gate.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let gate = gate.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(gate, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(60))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!("gate connection from {peer}: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let get = Method::GET;
        let post = Method::POST;
        let r = route(&get, "/p.git/info/refs", Some("service=git-upload-pack")).unwrap();
        assert_eq!(
            (r.repo, r.rpc, r.advertisement),
            ("p.git", Rpc::UploadPack, true)
        );
        let r = route(&get, "/p.git/info/refs", Some("service=git-receive-pack")).unwrap();
        assert_eq!(r.rpc, Rpc::ReceivePack);
        assert_eq!(r.tail(), "/info/refs");
        let r = route(&post, "/p.git/git-receive-pack", None).unwrap();
        assert_eq!(
            (r.rpc, r.advertisement, r.tail()),
            (Rpc::ReceivePack, false, "/git-receive-pack")
        );
        assert!(route(&post, "/p.git/git-upload-pack", None).is_some());
        for (m, p, q) in [
            (&get, "/p.git/info/refs", None), // dumb HTTP
            (&get, "/p.git/info/refs", Some("service=git-upload-archive")),
            (&get, "/p.git/HEAD", None),
            (&get, "/p.git/objects/info/packs", None),
            (&get, "/p.git/git-upload-pack", None), // wrong method
            (&post, "/p.git/info/refs", Some("service=git-upload-pack")),
            (&get, "/../p.git/info/refs", Some("service=git-upload-pack")),
            (
                &get,
                "/..%2fp.git/info/refs",
                Some("service=git-upload-pack"),
            ),
            (&get, "/a/p.git/info/refs", Some("service=git-upload-pack")),
            (&get, "/.git/info/refs", Some("service=git-upload-pack")),
            (&get, "/..git/info/refs", Some("service=git-upload-pack")),
            (&get, "/p/info/refs", Some("service=git-upload-pack")),
            (&get, "/-x.git/info/refs", Some("service=git-upload-pack")),
            (&get, "/p.git/info/refs/", Some("service=git-upload-pack")),
            (&get, "/", None),
            (&get, "/-/health", None),
            (&Method::PUT, "/p.git/git-receive-pack", None),
        ] {
            assert!(route(m, p, q).is_none(), "{m} {p} {q:?}");
        }
    }

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn basic_auth() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(
            basic_user(Some(&hv(&format!("Basic {}", b64("tok:"))))),
            Some("tok".into())
        );
        assert_eq!(
            basic_user(Some(&hv(&format!("basic {}", b64("tok:pw:x"))))),
            Some("tok".into())
        );
        // Unpadded base64 is accepted too.
        let unpadded = b64("ab:").trim_end_matches('=').to_owned();
        assert_eq!(
            basic_user(Some(&hv(&format!("Basic {unpadded}")))),
            Some("ab".into())
        );
        assert_eq!(basic_user(None), None);
        assert_eq!(
            basic_user(Some(&hv(&format!("Basic {}", b64(":pw"))))),
            None
        );
        assert_eq!(
            basic_user(Some(&hv(&format!("Basic {}", b64("nocolon"))))),
            None
        );
        assert_eq!(basic_user(Some(&hv("Bearer abc"))), None);
        assert_eq!(basic_user(Some(&hv("Basic !!!"))), None);
        assert!(token_matches("terok-g-1", "terok-g-1"));
        assert!(!token_matches("terok-g-1", "terok-g-2"));
        assert!(!token_matches("terok-g-1", "terok-g-12"));
        assert!(!token_matches("", "terok-g-1"));
    }
}
