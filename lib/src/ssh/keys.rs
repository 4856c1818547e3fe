//! Key material: generation, the stored form (unencrypted PKCS#8 DER inside the encrypted
//! vault), import of OpenSSH private keys, export to OpenSSH PEM, public lines, comments.
//!
//! Private material lives in zeroizing buffers or in `ssh-key`/`rsa` types that wipe
//! themselves on drop.

use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ssh_key::private::{Ed25519Keypair, KeypairData, RsaKeypair};
use ssh_key::rand_core::OsRng;
use ssh_key::{LineEnding, PrivateKey};
use zeroize::Zeroizing;

use super::SshError;
use crate::vault::store::fingerprint;

/// RSA keys we mint.
pub const RSA_BITS: usize = 3072;
/// Longest comment accepted at any storage entry point.
pub const MAX_COMMENT: usize = 200;

/// The DER prefix of an ed25519 PKCS#8 v1 private key (RFC 8410), then the 32-byte seed.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The key types the vault stores (`ssh_keys.key_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Ed25519,
    Rsa,
}

impl KeyType {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Ed25519 => "ed25519",
            KeyType::Rsa => "rsa",
        }
    }

    pub fn parse(s: &str) -> Result<Self, SshError> {
        match s {
            "ed25519" => Ok(KeyType::Ed25519),
            "rsa" => Ok(KeyType::Rsa),
            other => Err(SshError::Invalid(format!(
                "unknown stored key type {:?} (expected ed25519 or rsa)",
                crate::vault::sanitize(other)
            ))),
        }
    }

    /// The SSH algorithm name of the public key.
    pub fn ssh_name(self) -> &'static str {
        match self {
            KeyType::Ed25519 => "ssh-ed25519",
            KeyType::Rsa => "ssh-rsa",
        }
    }
}

/// A key ready to store: what `ssh_keys` holds.
pub struct Material {
    pub key_type: KeyType,
    pub private_der: Zeroizing<Vec<u8>>,
    pub public_blob: Vec<u8>,
    pub fingerprint: String,
}

/// Comment rules of every storage entry point: ≤ 200 chars, no C0 control or DEL.
pub fn validate_comment(comment: &str) -> Result<(), SshError> {
    let chars = comment.chars().count();
    if chars > MAX_COMMENT {
        return Err(SshError::Comment(format!(
            "comment is {chars} characters long; at most {MAX_COMMENT} are allowed"
        )));
    }
    if let Some((pos, c)) = comment
        .chars()
        .enumerate()
        .find(|(_, c)| (*c as u32) < 0x20 || *c as u32 == 0x7f)
    {
        return Err(SshError::Comment(format!(
            "comment contains control character \\x{:02X} at position {pos}",
            c as u32
        )));
    }
    Ok(())
}

fn crypto(what: &str) -> impl FnOnce(ssh_key::Error) -> SshError + '_ {
    move |e| SshError::Invalid(format!("{what}: {e}"))
}

/// Generate a fresh key of `key_type`.
pub fn generate(key_type: KeyType) -> Result<Material, SshError> {
    let data = match key_type {
        KeyType::Ed25519 => KeypairData::Ed25519(Ed25519Keypair::random(&mut OsRng)),
        KeyType::Rsa => KeypairData::Rsa(
            RsaKeypair::random(&mut OsRng, RSA_BITS).map_err(crypto("generate an RSA key"))?,
        ),
    };
    material_of(&data)
}

/// The stored form of a key pair.
pub fn material_of(data: &KeypairData) -> Result<Material, SshError> {
    let (key_type, private_der) = match data {
        KeypairData::Ed25519(kp) => {
            let mut der = Zeroizing::new(ED25519_PKCS8_PREFIX.to_vec());
            der.extend_from_slice(kp.private.as_ref());
            (KeyType::Ed25519, der)
        }
        KeypairData::Rsa(kp) => {
            let key = rsa_private(kp)?;
            let doc = key
                .to_pkcs8_der()
                .map_err(|e| SshError::Invalid(format!("encode the RSA key: {e}")))?;
            (KeyType::Rsa, Zeroizing::new(doc.as_bytes().to_vec()))
        }
        other => {
            return Err(SshError::Invalid(format!(
                "Unsupported key algorithm: {} (expected Ed25519 or RSA)",
                other
                    .algorithm()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| "unknown".into())
            )));
        }
    };
    let public =
        ssh_key::public::KeyData::try_from(data).map_err(crypto("derive the public key"))?;
    let public_blob = ssh_key::PublicKey::new(public, "")
        .to_bytes()
        .map_err(crypto("encode the public key"))?;
    let fingerprint = fingerprint(&public_blob);
    Ok(Material {
        key_type,
        private_der,
        public_blob,
        fingerprint,
    })
}

/// An `rsa` private key from an OpenSSH key pair. (ssh-key 0.6.7's own `TryFrom` passes
/// `p` twice instead of `p, q`, so every real key fails its check.)
pub fn rsa_private(kp: &RsaKeypair) -> Result<rsa::RsaPrivateKey, SshError> {
    let big = |m: &ssh_key::Mpint| {
        m.as_positive_bytes()
            .map(rsa::BigUint::from_bytes_be)
            .ok_or_else(|| SshError::Invalid("RSA key component is not positive".into()))
    };
    let mut key = rsa::RsaPrivateKey::from_components(
        big(&kp.public.n)?,
        big(&kp.public.e)?,
        big(&kp.private.d)?,
        vec![big(&kp.private.p)?, big(&kp.private.q)?],
    )
    .map_err(|e| SshError::Invalid(format!("RSA key: {e}")))?;
    key.precompute()
        .map_err(|e| SshError::Invalid(format!("RSA key: {e}")))?;
    Ok(key)
}

/// A stored private key back as a key pair.
pub fn keypair_from_der(key_type: KeyType, der: &[u8]) -> Result<KeypairData, SshError> {
    match key_type {
        KeyType::Ed25519 => {
            let seed = der
                .strip_prefix(&ED25519_PKCS8_PREFIX[..])
                .filter(|s| s.len() == 32)
                .ok_or_else(|| {
                    SshError::Invalid("stored ed25519 key is not PKCS#8 v1 DER".into())
                })?;
            let mut buf = Zeroizing::new([0u8; 32]);
            buf.copy_from_slice(seed);
            Ok(KeypairData::Ed25519(Ed25519Keypair::from_seed(&buf)))
        }
        KeyType::Rsa => {
            let key = rsa::RsaPrivateKey::from_pkcs8_der(der)
                .map_err(|e| SshError::Invalid(format!("stored rsa key: {e}")))?;
            Ok(KeypairData::Rsa(
                RsaKeypair::try_from(key).map_err(crypto("stored rsa key"))?,
            ))
        }
    }
}

/// `<algo> <base64(blob)> <comment>`, trailing whitespace trimmed.
pub fn public_line(key_type: KeyType, blob: &[u8], comment: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(blob);
    format!("{} {b64} {comment}", key_type.ssh_name())
        .trim_end()
        .to_owned()
}

/// OpenSSH PEM of a stored key (for `ssh export`).
pub fn openssh_pem(
    key_type: KeyType,
    der: &[u8],
    comment: &str,
) -> Result<Zeroizing<String>, SshError> {
    let data = keypair_from_der(key_type, der)?;
    let key = PrivateKey::new(data, comment).map_err(crypto("build the key"))?;
    key.to_openssh(LineEnding::LF)
        .map_err(crypto("encode the key"))
}

/// `id_<type>_<first 8 hex of sha256(public blob)>`.
pub fn export_stem(key_type: KeyType, blob: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(blob);
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("id_{}_{hex}", key_type.as_str())
}

/// What parsing a private key file gave.
pub enum Parsed {
    Key(Box<KeypairData>, String),
    /// The key is passphrase-protected: decrypt it with [`decrypt`].
    Encrypted(Box<PrivateKey>),
}

/// Parse an OpenSSH private key (or a PKCS#8 / PKCS#1 PEM one); the comment is the file's.
pub fn parse_private(pem: &[u8]) -> Result<Parsed, SshError> {
    match PrivateKey::from_openssh(pem) {
        Ok(key) if key.is_encrypted() => Ok(Parsed::Encrypted(Box::new(key))),
        Ok(key) => {
            let comment = key.comment().to_owned();
            Ok(Parsed::Key(Box::new(key.key_data().clone()), comment))
        }
        Err(openssh_err) => {
            let text = String::from_utf8_lossy(pem);
            if text.contains("ENCRYPTED") {
                return Err(SshError::Protected(
                    "the key is passphrase-protected (legacy PEM encryption)".into(),
                ));
            }
            if text.contains("-----BEGIN PRIVATE KEY-----")
                || text.contains("-----BEGIN RSA PRIVATE KEY-----")
            {
                let der = Zeroizing::new(
                    crate::vault::sshkey::openssh_pem_to_pkcs8(pem).map_err(SshError::Invalid)?,
                );
                let kt = if der.starts_with(&ED25519_PKCS8_PREFIX) {
                    KeyType::Ed25519
                } else {
                    KeyType::Rsa
                };
                return Ok(Parsed::Key(
                    Box::new(keypair_from_der(kt, &der)?),
                    String::new(),
                ));
            }
            Err(SshError::Invalid(format!(
                "not an OpenSSH private key ({openssh_err})"
            )))
        }
    }
}

/// Decrypt a passphrase-protected key.
pub fn decrypt(key: &PrivateKey, passphrase: &str) -> Result<(KeypairData, String), SshError> {
    let plain = key
        .decrypt(passphrase)
        .map_err(|_| SshError::Protected("wrong passphrase for the key".into()))?;
    Ok((plain.key_data().clone(), plain.comment().to_owned()))
}

/// Parse `<type> <base64> [comment]` of a `.pub` file into (blob, comment).
pub fn parse_public_line(line: &str) -> Result<(Vec<u8>, String), SshError> {
    use base64::Engine;
    let mut fields = line.split_whitespace();
    let (Some(_algo), Some(b64)) = (fields.next(), fields.next()) else {
        return Err(SshError::Invalid(
            "malformed public key file (expected '<type> <base64> [comment]')".into(),
        ));
    };
    let comment = fields.collect::<Vec<_>>().join(" ");
    let blob = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| SshError::Invalid(format!("malformed public key file: {e}")))?;
    ssh_key::PublicKey::from_bytes(&blob)
        .map_err(|e| SshError::Invalid(format!("malformed public key: {e}")))?;
    Ok((blob, comment))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_are_checked() {
        assert!(validate_comment("tk-main:demo").is_ok());
        assert!(validate_comment("").is_ok());
        let e = validate_comment("ab\x1b[31m").unwrap_err().to_string();
        assert!(e.contains("\\x1B") && e.contains("position 2"), "{e}");
        assert!(validate_comment(&"x".repeat(201)).is_err());
        assert!(validate_comment("a\x7f").is_err());
    }

    #[test]
    fn ed25519_round_trips_through_der() {
        let m = generate(KeyType::Ed25519).unwrap();
        assert_eq!(m.private_der.len(), 48);
        let data = keypair_from_der(KeyType::Ed25519, &m.private_der).unwrap();
        let again = material_of(&data).unwrap();
        assert_eq!(again.public_blob, m.public_blob);
        assert!(m.fingerprint.starts_with("SHA256:"));
        let pem = openssh_pem(KeyType::Ed25519, &m.private_der, "c").unwrap();
        let Parsed::Key(back, comment) = parse_private(pem.as_bytes()).unwrap() else {
            panic!("not encrypted")
        };
        assert_eq!(comment, "c");
        assert_eq!(material_of(&back).unwrap().fingerprint, m.fingerprint);
    }

    #[test]
    fn public_lines_and_stems() {
        assert_eq!(public_line(KeyType::Ed25519, b"x", ""), "ssh-ed25519 eA==");
        assert_eq!(public_line(KeyType::Rsa, b"x", "c d"), "ssh-rsa eA== c d");
        assert!(export_stem(KeyType::Rsa, b"x").starts_with("id_rsa_"));
        assert_eq!(export_stem(KeyType::Rsa, b"x").len(), "id_rsa_".len() + 8);
        assert!(parse_public_line("ssh-ed25519").is_err());
    }
}
