//! Listening sockets inside a container's network namespace, for a process that stays in the
//! host's. A short-lived thread enters the namespace (`setns` changes only the calling
//! thread), creates and binds the sockets and exits; the sockets keep their namespace.
//! Never done on a thread that lives on: a rootless process cannot `setns` back.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::Path;

use nix::sched::{CloneFlags, setns};

use super::SupervisorError;

/// Bring `lo` up in the current thread's namespace (podman normally has; make sure).
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain ioctls on a socket we own, with a zeroed, correctly sized ifreq.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut result = Ok(());
        if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) < 0 {
            result = Err(std::io::Error::last_os_error());
        } else if req.ifr_ifru.ifru_flags & libc::IFF_UP as libc::c_short == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) < 0 {
                result = Err(std::io::Error::last_os_error());
            }
        }
        libc::close(sock);
        result
    }
}

/// Bind TCP listeners on `addrs` inside the network namespace at `netns`.
pub fn bind_tcp(netns: &Path, addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, SupervisorError> {
    let ns = File::open(netns).map_err(|source| SupervisorError::Io {
        what: format!("open network namespace {}", netns.display()),
        source,
    })?;
    let addrs = addrs.to_vec();
    let handle = std::thread::Builder::new()
        .name("netns-bind".into())
        .spawn(move || -> Result<Vec<TcpListener>, SupervisorError> {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| SupervisorError::Io {
                what: "enter the container's network namespace".into(),
                source: e.into(),
            })?;
            loopback_up().map_err(|source| SupervisorError::Io {
                what: "bring up the container's loopback".into(),
                source,
            })?;
            addrs
                .iter()
                .map(|addr| {
                    TcpListener::bind(addr).map_err(|source| SupervisorError::Io {
                        what: format!("listen on {addr} in the container"),
                        source,
                    })
                })
                .collect()
        })
        .map_err(|source| SupervisorError::Io {
            what: "start the netns thread".into(),
            source,
        })?;
    handle.join().unwrap_or_else(|_| {
        Err(SupervisorError::Protocol(
            "the netns thread panicked".into(),
        ))
    })
}
