//! `git http-backend` as CGI, one process per request. The request body (hyper has already
//! undone any chunked framing) streams to git's stdin in its own task, stderr is drained in
//! another, and stdout streams back as the response body: no buffering of whole bodies, and
//! no pipe can fill up while we wait on another.

use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, ChildStdout};

use super::http::{Gate, GateBody, Rpc, text};
use super::{HIDDEN_NS, home_dir, hooks_dir, pktline};

/// A request body that sends nothing for this long is abandoned (git then sees EOF).
const IDLE: Duration = Duration::from_secs(300);
/// The CGI head must arrive within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(120);
/// A git process still alive this long after its request is killed.
const MAX_RUN: Duration = Duration::from_secs(3600);
/// At most this much of git's stderr is kept for the log.
const STDERR_KEEP: usize = 16 * 1024;
/// At most this much of a push's head is examined for its command list.
const SNIFF_LIMIT: usize = 64 * 1024;

/// Run git for an authorised request of the gate's own repo.
pub async fn run(
    gate: Arc<Gate>,
    rpc: Rpc,
    advertisement: bool,
    tail: &'static str,
    req: Request<Incoming>,
) -> Response<GateBody> {
    let content_length = match req.headers().get(header::CONTENT_LENGTH) {
        None => None,
        Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            Some(n) => Some(n),
            None => return text(StatusCode::BAD_REQUEST, "Invalid Content-Length\n"),
        },
    };
    let repo = gate.gate_dir.join(format!("{}.git", gate.project));
    let hooks = hooks_dir(&gate.gate_dir);
    let home = home_dir(&gate.gate_dir);
    let mut cmd = tokio::process::Command::new(&gate.backend);
    cmd.env_clear()
        .current_dir(&home)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_PROJECT_ROOT", &gate.gate_dir)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", format!("/{}.git{tail}", gate.project))
        .env(
            "QUERY_STRING",
            if advertisement {
                format!("service={}", rpc.name())
            } else {
                String::new()
            },
        )
        .env("REQUEST_METHOD", req.method().as_str())
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REMOTE_ADDR", "127.0.0.1")
        // Any REMOTE_USER enables receive-pack; the token itself never reaches git.
        .env("REMOTE_USER", "terok-agent");
    // Forced for every request, whatever the repo's own config says: gate-owned hooks only,
    // the terok namespace hidden both ways, every ref update logged.
    let config = [
        ("core.hooksPath", hooks.display().to_string()),
        ("transfer.hideRefs", HIDDEN_NS.to_owned()),
        ("core.logAllRefUpdates", "always".to_owned()),
        ("uploadpack.allowAnySHA1InWant", "false".to_owned()),
        ("uploadpack.allowReachableSHA1InWant", "false".to_owned()),
        ("uploadpack.allowTipSHA1InWant", "false".to_owned()),
        ("safe.directory", repo.display().to_string()),
    ];
    cmd.env("GIT_CONFIG_COUNT", config.len().to_string());
    for (i, (k, v)) in config.iter().enumerate() {
        cmd.env(format!("GIT_CONFIG_KEY_{i}"), k)
            .env(format!("GIT_CONFIG_VALUE_{i}"), v);
    }
    if let Some(n) = content_length {
        cmd.env("CONTENT_LENGTH", n.to_string());
    }
    // No `Git-Protocol` is passed on: protocol v2's upload-pack serves any object it has by
    // id, including tips that only hidden refs (backups) still reach; v0 checks every want
    // against the advertised refs.
    for (var, name) in [
        ("CONTENT_TYPE", header::CONTENT_TYPE),
        ("HTTP_CONTENT_ENCODING", header::CONTENT_ENCODING),
    ] {
        if let Some(v) = req.headers().get(&name).and_then(|v| v.to_str().ok())
            && !v.is_empty()
        {
            cmd.env(var, v);
        }
    }
    if let Some(lane) = &gate.lane {
        let fd = std::os::fd::AsRawFd::as_raw_fd(lane);
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(move || crate::supervisor::harden::restrict_self_raw(fd));
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let Ok(slot) = gate.slots.clone().acquire_owned().await else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "gate shutting down\n");
    };
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("gate: cannot run {}: {e}", gate.backend.display());
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "git http-backend unavailable\n",
            );
        }
    };
    let run = gate.runs.fetch_add(1, Ordering::Relaxed) + 1;
    tracing::info!(
        run,
        service = rpc.name(),
        advertisement,
        "gate: git http-backend"
    );
    let (stdin, stdout, mut stderr) = (
        child.stdin.take().expect("piped"),
        child.stdout.take().expect("piped"),
        child.stderr.take().expect("piped"),
    );
    tokio::spawn(pump(
        req.into_body(),
        stdin,
        rpc == Rpc::ReceivePack && !advertisement,
    ));
    tokio::spawn(async move {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match stderr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = STDERR_KEEP.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
        let text = String::from_utf8_lossy(&kept);
        if !text.trim().is_empty() {
            tracing::warn!("git http-backend: {}", text.trim());
        }
    });
    tokio::spawn(async move {
        let _slot = slot; // freed when git is gone
        match tokio::time::timeout(MAX_RUN, child.wait()).await {
            Ok(Ok(status)) if !status.success() => {
                tracing::warn!(run, "git http-backend exited with {status}")
            }
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(
                    run,
                    "git http-backend still running after an hour; killing it"
                );
                let _ = child.kill().await;
            }
        }
    });
    let mut out = BufReader::with_capacity(64 * 1024, stdout);
    match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut out)).await {
        Ok(Ok((status, headers))) => {
            let mut resp = Response::new(CgiBody { out }.boxed_unsync());
            *resp.status_mut() = status;
            for (name, value) in headers {
                resp.headers_mut().append(name, value);
            }
            resp
        }
        Ok(Err(why)) => {
            tracing::error!(run, "gate: bad CGI response from git: {why}");
            text(StatusCode::BAD_GATEWAY, "git http-backend failed\n")
        }
        Err(_) => {
            tracing::error!(
                run,
                "gate: no CGI response from git within {HEAD_TIMEOUT:?}"
            );
            text(StatusCode::GATEWAY_TIMEOUT, "git http-backend timed out\n")
        }
    }
}

/// Copy the request body into git's stdin, then close it. Logs the ref updates of a push.
async fn pump(mut body: Incoming, mut stdin: ChildStdin, sniff: bool) {
    let mut head: Option<Vec<u8>> = sniff.then(Vec::new);
    loop {
        let frame = match tokio::time::timeout(IDLE, body.frame()).await {
            Err(_) => {
                tracing::warn!("gate: request body idle for {IDLE:?}; abandoned");
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                tracing::warn!("gate: request body: {e}");
                break;
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if let Some(buf) = head.as_mut() {
            buf.extend_from_slice(
                &data[..data.len().min(SNIFF_LIMIT - buf.len().min(SNIFF_LIMIT))],
            );
            match pktline::ref_updates(buf) {
                Ok(Some(cmds)) => {
                    for c in cmds {
                        tracing::info!(
                            "gate: push {} {}..{}",
                            c.name,
                            &c.old[..c.old.len().min(12)],
                            &c.new[..c.new.len().min(12)]
                        );
                    }
                    head = None;
                }
                Ok(None) if buf.len() < SNIFF_LIMIT => {}
                _ => head = None,
            }
        }
        if stdin.write_all(&data).await.is_err() {
            // git stopped reading (it failed and says why on stderr).
            break;
        }
    }
    let _ = stdin.shutdown().await;
}

/// Read the CGI head: `Status:` and the other headers, up to the first empty line (CRLF or
/// LF).
async fn read_head(
    out: &mut BufReader<ChildStdout>,
) -> Result<(StatusCode, Vec<(HeaderName, HeaderValue)>), String> {
    let mut status = StatusCode::OK;
    let mut headers = Vec::new();
    let mut total = 0usize;
    loop {
        let mut line = Vec::new();
        let n = out
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("git ended before its response head".into());
        }
        total += n;
        if total > 64 * 1024 {
            return Err("response head too large".into());
        }
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            return Ok((status, headers));
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("status") {
            if let Some(code) = value
                .split_whitespace()
                .next()
                .and_then(|c| c.parse::<u16>().ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
            {
                status = code;
            }
            continue;
        }
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            headers.push((n, v));
        }
    }
}

/// git's stdout after the head, as the response body.
struct CgiBody {
    out: BufReader<ChildStdout>,
}

impl Body for CgiBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.out).poll_fill_buf(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok([])) => Poll::Ready(None),
            Poll::Ready(Ok(buf)) => {
                let bytes = Bytes::copy_from_slice(buf);
                let n = bytes.len();
                Pin::new(&mut this.out).consume(n);
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
        }
    }
}
