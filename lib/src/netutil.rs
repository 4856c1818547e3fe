//! Small pieces the HTTP services (broker, gate) share.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Errors of `accept` that pass (a peer gone before we took it, a short fd or memory
/// shortage): retried after a pause instead of ending the service.
pub fn is_transient_accept(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Accept the next connection, riding out transient errors; `service` names the caller in
/// the log. Cancel-safe (for `select!` against a shutdown signal).
pub async fn accept(
    listener: &TcpListener,
    service: &str,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    loop {
        match listener.accept().await {
            Ok(pair) => return Ok(pair),
            Err(e) if is_transient_accept(&e) => {
                tracing::warn!("{service} accept: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
