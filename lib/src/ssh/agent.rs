//! The SSH agent server: request-identities and sign for one scope's keys, nothing else.
//!
//! Framing: 4-byte big-endian length L (1..=256 KiB), then L bytes whose first is the type.
//! A bad length or EOF ends the connection. Messages are decoded by `ssh-agent-lib`; every
//! request other than request-identities (11) and a well-formed sign (13) for one of the
//! connection's keys gets `SSH_AGENT_FAILURE`. Keys are read from the vault afresh for every
//! connection, held only in this process's memory for that connection, and wiped on drop.
//! Ed25519 signs plainly; RSA signs PKCS#1 v1.5 with SHA-512 when the client sets
//! `SSH_AGENT_RSA_SHA2_512`, otherwise SHA-256: SHA-1 is never produced.

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rsa::signature::Signer as _;
use ssh_agent_lib::proto::{Identity, PublicCredential, Request, Response};
use ssh_agent_lib::ssh_encoding::{Decode, Encode};
use ssh_key::private::{Ed25519Keypair, KeypairData};
use ssh_key::public::KeyData;
use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, HashAlg, Signature};

use super::SshError;
use super::db;
use super::keys::{KeyType, keypair_from_der};
use crate::vault::Db;

/// Largest message accepted (the original's bound).
pub const MAX_FRAME: usize = 256 * 1024;
/// `SSH_AGENT_RSA_SHA2_512`.
const RSA_SHA2_512: u32 = 0x04;
/// Connections served at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 32;
/// A connection idle this long is closed.
const IDLE: Duration = Duration::from_secs(300);
/// `SSH_AGENT_FAILURE`, as a whole frame.
const FAILURE: [u8; 5] = [0, 0, 0, 1, 5];

enum Signer {
    Ed25519(Box<Ed25519Keypair>),
    Rsa(Box<rsa::RsaPrivateKey>),
}

/// One key of a connection.
pub struct SessionKey {
    public: KeyData,
    comment: String,
    signer: Signer,
}

/// The scope's keys, in the agent's order; undecodable rows are logged and skipped.
pub fn load_keys(db: &Db, scope: &str) -> Result<Vec<SessionKey>, SshError> {
    let mut out = Vec::new();
    for stored in db::agent_keys(db, scope)? {
        match session_key(&stored) {
            Ok(k) => out.push(k),
            Err(e) => tracing::warn!(scope, "skipping an undecodable ssh key: {e}"),
        }
    }
    Ok(out)
}

fn session_key(stored: &db::StoredKey) -> Result<SessionKey, SshError> {
    let kt = KeyType::parse(&stored.key_type)?;
    let public = KeyData::decode(&mut &stored.public_blob[..])
        .map_err(|e| SshError::Invalid(format!("stored public key: {e}")))?;
    let signer = match keypair_from_der(kt, &stored.private_der)? {
        KeypairData::Ed25519(kp) => Signer::Ed25519(Box::new(kp)),
        KeypairData::Rsa(kp) => Signer::Rsa(Box::new(super::keys::rsa_private(&kp)?)),
        _ => return Err(SshError::Invalid("unsupported stored key".into())),
    };
    Ok(SessionKey {
        public,
        comment: stored.comment.clone(),
        signer,
    })
}

fn sign(key: &SessionKey, data: &[u8], flags: u32) -> Option<Signature> {
    match &key.signer {
        Signer::Ed25519(kp) => kp.as_ref().try_sign(data).ok(),
        Signer::Rsa(k) => {
            use sha2::{Digest, Sha256, Sha512};
            let (alg, padding, digest) = if flags & RSA_SHA2_512 != 0 {
                (
                    HashAlg::Sha512,
                    rsa::Pkcs1v15Sign::new::<Sha512>(),
                    Sha512::digest(data).to_vec(),
                )
            } else {
                (
                    HashAlg::Sha256,
                    rsa::Pkcs1v15Sign::new::<Sha256>(),
                    Sha256::digest(data).to_vec(),
                )
            };
            let raw = k.sign_with_rng(&mut OsRng, padding, &digest).ok()?;
            Signature::new(Algorithm::Rsa { hash: Some(alg) }, raw).ok()
        }
    }
}

/// The response frame (length included) to one request body.
pub fn respond(keys: &[SessionKey], body: &[u8]) -> Vec<u8> {
    let response = match Request::decode(&mut &body[..]) {
        Ok(Request::RequestIdentities) => Response::IdentitiesAnswer(
            keys.iter()
                .map(|k| Identity {
                    credential: PublicCredential::Key(k.public.clone()),
                    comment: k.comment.clone(),
                })
                .collect(),
        ),
        Ok(Request::SignRequest(req)) => {
            let key = match &req.credential {
                PublicCredential::Key(kd) => keys.iter().find(|k| &k.public == kd),
                PublicCredential::Cert(_) => None,
            };
            match key.and_then(|k| sign(k, &req.data, req.flags)) {
                Some(sig) => Response::SignResponse(sig),
                None => Response::Failure,
            }
        }
        _ => Response::Failure,
    };
    let mut out = vec![0u8; 4];
    if response.encode(&mut out).is_err() {
        return FAILURE.to_vec();
    }
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// Serve one connection until EOF, a bad frame or an I/O error.
pub fn serve_stream<S: Read + Write>(stream: &mut S, keys: &[SessionKey]) -> io::Result<()> {
    let mut body = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match stream.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame length {len} outside 1..={MAX_FRAME}"),
            ));
        }
        body.resize(len, 0);
        stream.read_exact(&mut body)?;
        stream.write_all(&respond(keys, &body))?;
        stream.flush()?;
    }
}

/// Where the keys of a connection come from.
pub struct KeySource {
    /// `None`: the vault could not be opened; every connection is closed at once.
    pub db: Option<Mutex<Db>>,
    pub scope: String,
}

impl KeySource {
    fn load(&self) -> Vec<SessionKey> {
        let Some(db) = &self.db else {
            return Vec::new();
        };
        let db = db.lock().unwrap_or_else(|e| e.into_inner());
        match load_keys(&db, &self.scope) {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(scope = %self.scope, "cannot read ssh keys: {e}");
                Vec::new()
            }
        }
    }
}

fn peer_label(stream: &UnixStream) -> String {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the given length on a valid socket fd.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        format!("pid={} uid={} gid={}", cred.pid, cred.uid, cred.gid)
    } else {
        "<unknown>".into()
    }
}

/// Accept and serve connections forever, a thread each (bounded).
pub fn serve(listener: UnixListener, source: Arc<KeySource>) -> io::Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let (mut stream, _) = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // Not a listening socket at all: nothing will ever be accepted.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOTSOCK | libc::EBADF | libc::EINVAL)
                ) =>
            {
                return Err(e);
            }
            Err(e) => {
                tracing::error!("accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        while active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            std::thread::sleep(Duration::from_millis(10));
        }
        active.fetch_add(1, Ordering::SeqCst);
        let source = source.clone();
        let active2 = active.clone();
        let spawned = std::thread::Builder::new()
            .name("ssh-agent-conn".into())
            .spawn(move || {
                let peer = peer_label(&stream);
                let keys = source.load();
                if keys.is_empty() {
                    tracing::warn!(scope = %source.scope, %peer, "no ssh keys for the scope; closing");
                } else {
                    let _ = stream.set_read_timeout(Some(IDLE));
                    if let Err(e) = serve_stream(&mut stream, &keys) {
                        tracing::debug!(%peer, "agent connection ended: {e}");
                    }
                }
                drop(keys);
                active2.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Bind a socket for the host-side agent: refuse a non-socket path, replace a stale socket,
/// create the parent, and leave the socket 0600.
pub fn bind_private(path: &Path) -> Result<UnixListener, SshError> {
    let io_err = |what: String| move |source| SshError::Io { what, source };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(io_err(format!("remove {}", path.display())))?
        }
        Ok(_) => {
            return Err(SshError::Refused(format!(
                "{} exists and is not a socket; choose another --socket path",
                path.display()
            )));
        }
        Err(_) => {}
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
    }
    // Created 0600 from the start: no window in which another user could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(io_err(format!("listen on {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("chmod {}", path.display())))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssh::keys::generate;

    fn key(kt: KeyType) -> SessionKey {
        let m = generate(kt).unwrap();
        session_key(&db::StoredKey {
            key_type: kt.as_str().into(),
            private_der: m.private_der,
            public_blob: m.public_blob,
            comment: "c".into(),
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn identities_sign_and_failure() {
        let keys = vec![key(KeyType::Ed25519)];
        let r = respond(&keys, &[11]);
        assert_eq!(r[4], 12);
        assert_eq!(respond(&keys, &[17, 0, 0]), FAILURE.to_vec());
        assert_eq!(respond(&keys, &[19]), FAILURE.to_vec());
        // sign: string(blob) string(data) uint32 flags
        let mut blob = Vec::new();
        keys[0].public.encode(&mut blob).unwrap();
        let mut req = vec![13];
        req.extend((blob.len() as u32).to_be_bytes());
        req.extend(&blob);
        req.extend(3u32.to_be_bytes());
        req.extend(b"abc");
        let no_flags = respond(&keys, &req);
        assert_eq!(no_flags, FAILURE.to_vec(), "missing flags is malformed");
        req.extend(0u32.to_be_bytes());
        let r = respond(&keys, &req);
        assert_eq!(r[4], 14);
    }

    #[test]
    fn rsa_never_sha1() {
        let keys = vec![key(KeyType::Rsa)];
        let mut blob = Vec::new();
        keys[0].public.encode(&mut blob).unwrap();
        for (flags, alg) in [
            (0u32, "rsa-sha2-256"),
            (2, "rsa-sha2-256"),
            (4, "rsa-sha2-512"),
        ] {
            let mut req = vec![13];
            req.extend((blob.len() as u32).to_be_bytes());
            req.extend(&blob);
            req.extend(1u32.to_be_bytes());
            req.push(b'x');
            req.extend(flags.to_be_bytes());
            let r = respond(&keys, &req);
            assert_eq!(r[4], 14);
            let text = String::from_utf8_lossy(&r);
            assert!(text.contains(alg), "flags {flags}");
        }
    }

    #[test]
    fn oversize_and_zero_frames_close() {
        let keys = vec![key(KeyType::Ed25519)];
        let mut io = std::io::Cursor::new(((MAX_FRAME + 1) as u32).to_be_bytes().to_vec());
        struct Rw<'a>(&'a mut std::io::Cursor<Vec<u8>>, Vec<u8>);
        impl Read for Rw<'_> {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                self.0.read(b)
            }
        }
        impl Write for Rw<'_> {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.1.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut rw = Rw(&mut io, Vec::new());
        assert!(serve_stream(&mut rw, &keys).is_err());
        assert!(rw.1.is_empty());
        let mut io = std::io::Cursor::new(frame(&[11]));
        let mut rw = Rw(&mut io, Vec::new());
        serve_stream(&mut rw, &keys).unwrap();
        assert_eq!(rw.1[4], 12);
    }

    #[test]
    fn random_bodies_never_panic() {
        let keys = vec![key(KeyType::Ed25519)];
        let mut seed = [0u8; 4096];
        for i in 0..3000u32 {
            getrandom::fill(&mut seed).unwrap();
            let len = 1 + (u16::from_be_bytes([seed[0], seed[1]]) as usize % 600);
            let mut body = seed[2..2 + len.min(4000)].to_vec();
            body[0] = [11, 13, 17, 18, 19, 22, 25, 27, body[0]][i as usize % 9];
            let r = respond(&keys, &body);
            assert!(matches!(r[4], 5 | 12 | 14), "{:?}", &r[..5]);
        }
    }
}
