//! Setup's vault phase: pick (or reuse) a passphrase tier, store the passphrase there, and
//! create the encrypted DB. Non-interactive set-up without an explicit tier fails closed: a
//! silently chosen volatile tier would lose the vault at the next logout.

use std::io::IsTerminal;

use super::cli::{announce, can_announce, encrypt_db};
use super::store::{self, FileKind};
use super::tiers::{Chain, Tier, keyring, prompt, systemd};
use super::{Db, OpenMode, Secret, VaultError};
use crate::Context;

/// Validate `--passphrase-tier` before any phase mutates the host.
pub fn parse_tier(arg: Option<&str>) -> Result<Option<Tier>, VaultError> {
    let Some(arg) = arg else { return Ok(None) };
    let tier = Tier::from_id(arg)
        .filter(|t| Tier::PROVISIONABLE.contains(t))
        .ok_or_else(|| {
            VaultError::Refused(format!(
                "unknown --passphrase-tier {:?}; expected one of: {}",
                super::sanitize(arg),
                Tier::PROVISIONABLE.map(Tier::id).join(", ")
            ))
        })?;
    if tier == Tier::SystemdCreds
        && let Some(reason) = systemd::unavailable_reason()
    {
        return Err(VaultError::Refused(format!(
            "--passphrase-tier systemd-creds is unusable here: {reason}"
        )));
    }
    Ok(Some(tier))
}

fn tier_unavailable(chain: &Chain, tier: Tier) -> Option<String> {
    match tier {
        Tier::SystemdCreds => systemd::unavailable_reason(),
        Tier::Keyring => keyring::unavailable_reason(),
        Tier::KernelKeyring => match chain.session().backing() {
            super::tiers::Backing::None { reason } => Some(reason),
            _ => None,
        },
        _ => Some("not provisionable".into()),
    }
}

/// Interactive chooser between the keyring and the kernel-keyring cache.
fn choose(chain: &Chain) -> Result<Tier, VaultError> {
    println!("  Where should the vault passphrase live?");
    let options = [
        (
            'k',
            Tier::Keyring,
            "OS keyring (Secret Service) — survives reboots",
        ),
        (
            'n',
            Tier::KernelKeyring,
            "kernel keyring — RAM only, gone at logout/reboot",
        ),
    ];
    for (key, tier, desc) in options {
        match tier_unavailable(chain, tier) {
            None => println!("    [{key}] {desc}"),
            Some(r) => println!("    [-] {desc} — unavailable ({r})"),
        }
    }
    println!("  (systemd ≥ 257 would seal it with systemd-creds automatically)");
    let answer = prompt::read_line()?.unwrap_or_default();
    let first = answer.trim().chars().next().map(|c| c.to_ascii_lowercase());
    let pick = options
        .iter()
        .find(|(k, t, _)| Some(*k) == first && tier_unavailable(chain, *t).is_none())
        .map(|(_, t, _)| *t)
        .unwrap_or(Tier::Keyring);
    if let Some(r) = tier_unavailable(chain, pick) {
        return Err(VaultError::Refused(format!(
            "the {pick} tier is unavailable here ({r}); re-run setup with --passphrase-tier"
        )));
    }
    Ok(pick)
}

fn store_in(ctx: &Context, chain: &Chain, tier: Tier, pw: &str) -> Result<(), VaultError> {
    match tier {
        Tier::SystemdCreds => systemd::seal(pw, &chain.sealed_file, "auto"),
        Tier::Keyring => {
            keyring::store(pw)?;
            super::patch_user_config(
                ctx,
                &[("use_keyring", serde_yaml_ng::Value::Bool(true))],
                false,
            )?;
            Ok(())
        }
        Tier::KernelKeyring => chain.session().store(pw).map(|_| ()),
        other => Err(VaultError::Refused(format!(
            "the {other} tier cannot be provisioned by terok"
        ))),
    }
}

/// Setup's vault phase.
pub fn setup_phase(ctx: &Context, tier: Option<Tier>, echo: bool) -> Result<(), VaultError> {
    let chain = Chain::from_ctx(ctx);
    let db = chain.db_path.clone();
    println!("Vault:");
    let kind = store::file_kind(&db)?;
    let current = chain.resolve(false)?;
    let interactive = std::io::stdin().is_terminal();
    let target = match (tier, &current) {
        (Some(t), Some((_, from))) if *from == t => None,
        (Some(t), _) => Some(t),
        (None, Some(_)) => None,
        (None, None) if systemd::unavailable_reason().is_none() => Some(Tier::SystemdCreds),
        (None, None) if interactive => Some(choose(&chain)?),
        (None, None) => {
            return Err(VaultError::Refused(
                "non-interactive setup needs a passphrase tier: pass --passphrase-tier keyring|kernel-keyring (or systemd-creds on systemd ≥ 257), or set credentials.passphrase_command in config.yml; refusing to pick a volatile tier silently".into(),
            ));
        }
    };
    let mut minted = false;
    let pw: Secret = match (target, current) {
        (None, Some((pw, from))) => {
            println!("  passphrase    reusing the {from} tier");
            pw
        }
        (None, None) => unreachable!("a target is chosen when nothing resolves"),
        (Some(t), existing) => {
            if let Some(r) = tier_unavailable(&chain, t) {
                return Err(VaultError::Refused(format!(
                    "the {t} tier is unavailable here: {r}"
                )));
            }
            let value = match existing {
                Some((pw, _)) => Some(pw),
                None if kind == FileKind::Opaque => {
                    // An existing vault: only its own passphrase will do.
                    if !interactive {
                        return Err(VaultError::NoPassphrase { db: db.clone() });
                    }
                    Some(prompt::read("current vault passphrase: ")?)
                }
                None if t == Tier::KernelKeyring && interactive => prompt::read_new()?,
                None => None,
            };
            let value = match value {
                Some(v) => {
                    if kind == FileKind::Opaque {
                        Db::open(&db, &v, OpenMode::Existing)?.close()?;
                    }
                    v
                }
                None => {
                    if !can_announce(echo) {
                        return Err(VaultError::Refused(
                            "no terminal to show a generated passphrase on; re-run interactively, or pass --echo-passphrase".into(),
                        ));
                    }
                    minted = true;
                    store::generate_passphrase()
                }
            };
            store_in(ctx, &chain, t, &value)?;
            println!("  passphrase    stored in the {t} tier");
            value
        }
    };
    if minted {
        announce(&pw, echo)?;
        if echo {
            println!(
                "  recovery      save the passphrase above, then run `terok-admin vault passphrase acknowledge`"
            );
        } else if super::cli::confirm_saved("Type SAVED once the passphrase is stored off-host: ") {
            super::acknowledge(ctx)?;
            println!("  recovery      marked as saved");
        }
    }
    match kind {
        FileKind::Plaintext => {
            encrypt_db(ctx, Some(&pw))?;
        }
        FileKind::Missing | FileKind::Empty => {
            Db::open(&db, &pw, OpenMode::Create)?.close()?;
            println!("  credentials   created {} (SQLCipher 4)", db.display());
        }
        FileKind::Opaque => {
            Db::open(&db, &pw, OpenMode::Existing)?.close()?;
            println!("  credentials   {} opens with it", db.display());
        }
    }
    if !super::recovery_acknowledged(ctx) {
        println!(
            "  reminder      save the passphrase off-host: `terok-admin vault passphrase reveal`, then `terok-admin vault passphrase acknowledge`"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_tiers_are_rejected_with_the_vocabulary() {
        let err = parse_tier(Some("config")).unwrap_err().to_string();
        assert!(err.contains("keyring, kernel-keyring"), "{err}");
        assert!(parse_tier(Some("prompt")).is_err());
        assert_eq!(
            parse_tier(Some("kernel-keyring")).unwrap(),
            Some(Tier::KernelKeyring)
        );
        assert_eq!(parse_tier(None).unwrap(), None);
    }
}
