//! Just enough SSH key-format handling for the v0 → v1 migration: an unencrypted OpenSSH
//! private key (PEM) becomes unencrypted PKCS#8 DER, as the original stores it.

use base64::Engine;

fn der_len(len: usize) -> Vec<u8> {
    if len < 0x80 {
        vec![len as u8]
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        let mut out = vec![0x80 | bytes.len() as u8];
        out.extend(bytes);
        out
    }
}

fn der(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(der_len(body.len()));
    out.extend_from_slice(body);
    out
}

/// A DER INTEGER from an unsigned big-endian magnitude.
fn der_uint(mag: &[u8]) -> Vec<u8> {
    let mut m: Vec<u8> = mag.iter().copied().skip_while(|b| *b == 0).collect();
    if m.is_empty() || m[0] & 0x80 != 0 {
        m.insert(0, 0);
    }
    der(0x02, &m)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u32(&mut self) -> Result<u32, String> {
        if self.0.len() < 4 {
            return Err("truncated key".into());
        }
        let (head, rest) = self.0.split_at(4);
        self.0 = rest;
        Ok(u32::from_be_bytes(head.try_into().expect("4 bytes")))
    }
    fn string(&mut self) -> Result<&'a [u8], String> {
        let len = self.u32()? as usize;
        if self.0.len() < len {
            return Err("truncated key".into());
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(head)
    }
}

/// Compare two big-endian magnitudes of equal length.
fn ge(a: &[u8], b: &[u8]) -> bool {
    a >= b
}

fn sub_in_place(a: &mut [u8], b: &[u8]) {
    let mut borrow = 0i16;
    for i in (0..a.len()).rev() {
        let mut v = a[i] as i16 - b[i] as i16 - borrow;
        borrow = if v < 0 {
            v += 256;
            1
        } else {
            0
        };
        a[i] = v as u8;
    }
}

/// `x mod m` for big-endian magnitudes (shift-and-subtract; keys are small).
fn big_mod(x: &[u8], m: &[u8]) -> Vec<u8> {
    let width = m.len() + 1;
    let mut modulus = vec![0u8; width - m.len()];
    modulus.extend_from_slice(m);
    let mut r = vec![0u8; width];
    for byte in x {
        for bit in (0..8).rev() {
            // r = r << 1 | bit
            let mut carry = (byte >> bit) & 1;
            for v in r.iter_mut().rev() {
                let next = *v >> 7;
                *v = (*v << 1) | carry;
                carry = next;
            }
            if ge(&r, &modulus) {
                sub_in_place(&mut r, &modulus);
            }
        }
    }
    r
}

fn minus_one(x: &[u8]) -> Vec<u8> {
    let mut out = x.to_vec();
    for v in out.iter_mut().rev() {
        if *v > 0 {
            *v -= 1;
            break;
        }
        *v = 0xff;
    }
    out
}

fn pkcs8(algorithm: &[u8], private_key: &[u8]) -> Vec<u8> {
    let mut body = der_uint(&[0]);
    body.extend(der(0x30, algorithm));
    body.extend(der(0x04, private_key));
    der(0x30, &body)
}

fn from_openssh(blob: &[u8]) -> Result<Vec<u8>, String> {
    let rest = blob
        .strip_prefix(b"openssh-key-v1\0")
        .ok_or("not an openssh-key-v1 key")?;
    let mut r = Reader(rest);
    let cipher = r.string()?;
    let _kdf = r.string()?;
    let _kdf_options = r.string()?;
    if cipher != b"none" {
        return Err("the key is passphrase-protected".into());
    }
    if r.u32()? != 1 {
        return Err("more than one key in the file".into());
    }
    let _public = r.string()?;
    let mut p = Reader(r.string()?);
    if p.u32()? != p.u32()? {
        return Err("check bytes differ (corrupt key)".into());
    }
    match p.string()? {
        b"ssh-ed25519" => {
            let _public = p.string()?;
            let private = p.string()?;
            if private.len() != 64 {
                return Err("ed25519 private key is not 64 bytes".into());
            }
            // RFC 8410: OID 1.3.101.112, CurvePrivateKey = OCTET STRING(seed).
            Ok(pkcs8(
                &[0x06, 0x03, 0x2b, 0x65, 0x70],
                &der(0x04, &private[..32]),
            ))
        }
        b"ssh-rsa" => {
            let n = p.string()?;
            let e = p.string()?;
            let d = p.string()?;
            let iqmp = p.string()?;
            let prime_p = p.string()?;
            let prime_q = p.string()?;
            let dp = big_mod(d, &minus_one(prime_p));
            let dq = big_mod(d, &minus_one(prime_q));
            let mut body = der_uint(&[0]);
            for part in [n, e, d, prime_p, prime_q, &dp, &dq, iqmp] {
                body.extend(der_uint(part));
            }
            let pkcs1 = der(0x30, &body);
            // rsaEncryption OID 1.2.840.113549.1.1.1 with NULL parameters.
            Ok(pkcs8(
                &[
                    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
                ],
                &pkcs1,
            ))
        }
        other => Err(format!(
            "unsupported key type {:?}",
            String::from_utf8_lossy(other)
        )),
    }
}

/// Convert a PEM private key (OpenSSH, PKCS#1 RSA or PKCS#8) to unencrypted PKCS#8 DER.
pub fn openssh_pem_to_pkcs8(pem: &[u8]) -> Result<Vec<u8>, String> {
    let text = std::str::from_utf8(pem).map_err(|_| "the key is not PEM text")?;
    let mut label = None;
    let mut body = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(l) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        {
            label = Some(l.to_owned());
        } else if line.starts_with("-----END ") {
            break;
        } else if label.is_some() {
            body.push_str(line);
        }
    }
    let label = label.ok_or("no PEM header")?;
    let der_bytes = base64::engine::general_purpose::STANDARD
        .decode(body.as_bytes())
        .map_err(|e| format!("bad base64 in the key: {e}"))?;
    match label.as_str() {
        "OPENSSH PRIVATE KEY" => from_openssh(&der_bytes),
        "PRIVATE KEY" => Ok(der_bytes),
        "RSA PRIVATE KEY" => Ok(pkcs8(
            &[
                0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
            ],
            &der_bytes,
        )),
        other => Err(format!("unsupported PEM block {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_mod_matches_small_numbers() {
        assert_eq!(big_mod(&[0x01, 0x00], &[0x07]), vec![0, 4]); // 256 % 7
        assert_eq!(
            big_mod(&[0xff, 0xff, 0xff], &[0x01, 0x00]),
            vec![0, 0, 0xff]
        );
        assert_eq!(minus_one(&[1, 0]), vec![0, 0xff]);
    }

    #[test]
    fn fixture_ed25519_key_converts() {
        let pem = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/fixtures/upstream-vault-0.6.0/keys/id_ed25519"
        ))
        .expect("the upstream fixture (../shared/fixtures/upstream-vault-0.6.0) is present");
        let der = openssh_pem_to_pkcs8(&pem).unwrap();
        assert_eq!(der.len(), 48);
        assert_eq!(
            &der[..16],
            &[
                0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
                0x04, 0x20
            ]
        );
    }
}
