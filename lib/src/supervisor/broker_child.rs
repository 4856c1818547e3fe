//! The broker child's serving loop. PLACEHOLDER until the broker library lands: it answers
//! `/-/health` so the supervisor's plumbing (netns listeners, readiness, restart, teardown)
//! can be exercised.

use std::io::{Read, Write};
use std::net::TcpListener;

use crate::sidecar::{Sidecar, VaultPlan};
use crate::vault::Secret;

pub fn serve(
    listener: TcpListener,
    _sidecar: &Sidecar,
    _vault: &VaultPlan,
    _passphrase: Option<Secret>,
) -> Result<(), String> {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf);
        let _ = stream.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\nconnection: close\r\n\r\n{\"status\":\"ok\"}",
        );
    }
    Ok(())
}
