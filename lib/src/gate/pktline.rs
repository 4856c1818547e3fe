//! pkt-line, the framing of git's wire protocol: four hex digits of length (including
//! themselves), then the payload; `0000` flush, `0001` delim, `0002` response-end. Only used
//! to read the command list at the head of a `git-receive-pack` request for the log; the
//! protocol itself is git's business.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pkt<'a> {
    Flush,
    Delim,
    ResponseEnd,
    Data(&'a [u8]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPkt(pub &'static str);

/// The next packet of `buf` and its length on the wire, `Ok(None)` when more bytes are
/// needed.
pub fn next(buf: &[u8]) -> Result<Option<(Pkt<'_>, usize)>, BadPkt> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let hex = std::str::from_utf8(&buf[..4]).map_err(|_| BadPkt("length is not hex"))?;
    let len = usize::from_str_radix(hex, 16).map_err(|_| BadPkt("length is not hex"))?;
    match len {
        0 => Ok(Some((Pkt::Flush, 4))),
        1 => Ok(Some((Pkt::Delim, 4))),
        2 => Ok(Some((Pkt::ResponseEnd, 4))),
        3 => Err(BadPkt("length 3 is invalid")),
        _ if len > 65520 => Err(BadPkt("packet longer than 65520 bytes")),
        _ if buf.len() < len => Ok(None),
        _ => Ok(Some((Pkt::Data(&buf[4..len]), len))),
    }
}

/// One `<old> <new> <ref>` command of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefUpdate {
    pub old: String,
    pub new: String,
    pub name: String,
}

/// The command list at the head of a receive-pack request: `Ok(None)` while it is
/// incomplete, the commands once the flush arrived.
pub fn ref_updates(buf: &[u8]) -> Result<Option<Vec<RefUpdate>>, BadPkt> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let Some((pkt, used)) = next(&buf[at..])? else {
            return Ok(None);
        };
        at += used;
        match pkt {
            Pkt::Flush => return Ok(Some(out)),
            Pkt::Data(line) => {
                // Capabilities follow a NUL on the first line; `shallow` lines may precede.
                let line = line.split(|b| *b == 0).next().unwrap_or_default();
                let line = line.strip_suffix(b"\n").unwrap_or(line);
                let text = std::str::from_utf8(line).map_err(|_| BadPkt("command is not UTF-8"))?;
                if text.starts_with("shallow ") || text.starts_with("push-cert") {
                    continue;
                }
                let mut parts = text.splitn(3, ' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(old), Some(new), Some(name)) => out.push(RefUpdate {
                        old: old.into(),
                        new: new.into(),
                        name: name.into(),
                    }),
                    _ => return Err(BadPkt("malformed command")),
                }
            }
            Pkt::Delim | Pkt::ResponseEnd => return Err(BadPkt("unexpected special packet")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(s: &[u8]) -> Vec<u8> {
        let mut v = format!("{:04x}", s.len() + 4).into_bytes();
        v.extend_from_slice(s);
        v
    }

    #[test]
    fn frames() {
        assert_eq!(next(b"000"), Ok(None));
        assert_eq!(next(b"0000rest"), Ok(Some((Pkt::Flush, 4))));
        assert_eq!(next(b"0001"), Ok(Some((Pkt::Delim, 4))));
        assert_eq!(next(b"0002"), Ok(Some((Pkt::ResponseEnd, 4))));
        assert_eq!(next(b"0009hello"), Ok(Some((Pkt::Data(b"hello"), 9))));
        assert_eq!(next(b"0009hel"), Ok(None));
        assert!(next(b"0003").is_err());
        assert!(next(b"zzzz").is_err());
        assert!(next(b"ffff").is_err());
    }

    #[test]
    fn push_commands() {
        let a = "1".repeat(40);
        let b = "2".repeat(40);
        let z = "0".repeat(40);
        let mut body =
            pkt(format!("{a} {b} refs/heads/main\0report-status side-band-64k\n").as_bytes());
        body.extend(pkt(format!("{a} {z} refs/heads/old\n").as_bytes()));
        assert_eq!(ref_updates(&body), Ok(None), "no flush yet");
        body.extend(b"0000PACK....");
        let cmds = ref_updates(&body).unwrap().unwrap();
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[0].name, "refs/heads/main");
        assert_eq!(cmds[0].old, a);
        assert_eq!(cmds[1].new, z);
        assert!(
            ref_updates(&pkt(b"garbage")).is_err()
                || ref_updates(&[pkt(b"garbage"), b"0000".to_vec()].concat()).is_err()
        );
    }
}
