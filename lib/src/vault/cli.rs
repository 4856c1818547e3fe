//! `terok-admin vault …` and `terok-admin credentials …`.
//!
//! Nothing here prints a passphrase or a credential value unless the verb exists to do so
//! (`vault passphrase reveal`); tokens are listed masked, credential payloads by field name.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::store::{self, FileKind, mask_token};
use super::tiers::{Chain, ProbeRow, Tier, keyring, prompt, systemd};
use super::{Db, OpenMode, Secret, VaultError, sanitize};
use crate::{Context, fsutil, names};

/// `terok-admin vault …`
#[derive(Debug, clap::Subcommand)]
pub enum VaultCommand {
    /// Show whether the vault is unlocked, which tier holds the passphrase, and what it stores
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Cache the passphrase for this login session (kernel keyring, tmpfs fallback)
    Unlock {
        /// Cache even when a durable tier already unlocks the vault
        #[arg(long)]
        force: bool,
    },
    /// Destroy every stored copy of the passphrase (cache, keyring, sealed file, helper wiring)
    Lock {
        /// Skip the "recovery key saved?" confirmation
        #[arg(long)]
        force: bool,
    },
    /// Seal the current passphrase with systemd-creds (same as `vault passphrase seal`)
    Seal {
        /// Sealing key: auto, host, tpm or tpm+host
        #[arg(long, default_value = "auto")]
        key: String,
    },
    /// List stored credentials (field names only) and, on request, masked phantom tokens
    List {
        #[arg(long)]
        include_tokens: bool,
        #[arg(long)]
        json: bool,
    },
    /// Revoke the phantom tokens of one (scope, container) pair
    Revoke { scope: String, subject: String },
    /// Reveal, acknowledge, change or move the passphrase
    #[command(subcommand)]
    Passphrase(PassphraseCommand),
}

/// `terok-admin vault passphrase …`
#[derive(Debug, clap::Subcommand)]
pub enum PassphraseCommand {
    /// Show the passphrase on the terminal (/dev/tty) so you can save it off-host
    Reveal {
        /// Print it on stdout (and only it) instead, e.g. to pipe it into a password manager
        #[arg(long)]
        allow_redirect: bool,
    },
    /// Record that the recovery passphrase is saved off-host
    Acknowledge,
    /// Re-encrypt the vault under a new passphrase and rewrite every tier that holds it
    Change,
    /// Move the passphrase into the OS keyring (Secret Service)
    ToKeyring,
    /// Seal the current passphrase with systemd-creds
    Seal {
        /// Sealing key: auto, host, tpm or tpm+host
        #[arg(long, default_value = "auto")]
        key: String,
    },
}

/// `terok-admin credentials …`
#[derive(Debug, clap::Subcommand)]
pub enum CredentialsCommand {
    /// Encrypt a legacy plaintext credentials DB in place (after a 0600 tar.gz backup)
    EncryptDb,
    /// Store a provider credential in a credential set; the secret is read from stdin
    #[command(
        after_help = "Examples:\n  printf %s \"$KEY\" | terok-admin credentials set default anthropic\n  terok-admin credentials set default github --type pat --field token\n  terok-admin credentials set default openai --json < oauth.json"
    )]
    Set {
        /// Credential set (e.g. default, or a scope)
        set: String,
        /// Provider (anthropic, openai, github, …)
        provider: String,
        /// Credential type recorded in the payload
        #[arg(long = "type", default_value = "api_key")]
        kind: String,
        /// Payload field that holds the secret
        #[arg(long, default_value = "key")]
        field: String,
        /// Read a whole JSON object (e.g. an OAuth token set) from stdin instead
        #[arg(long, conflicts_with_all = ["kind", "field"])]
        json: bool,
    },
    /// Delete a provider credential from a credential set
    Remove { set: String, provider: String },
    /// List credential sets and their providers (never the values)
    List {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(ctx: &Context, cmd: VaultCommand) -> Result<(), VaultError> {
    match cmd {
        VaultCommand::Status { json } => status(ctx, json),
        VaultCommand::Unlock { force } => unlock(ctx, force),
        VaultCommand::Lock { force } => lock(ctx, force),
        VaultCommand::Seal { key } | VaultCommand::Passphrase(PassphraseCommand::Seal { key }) => {
            seal(ctx, &key)
        }
        VaultCommand::List {
            include_tokens,
            json,
        } => list(ctx, include_tokens, json),
        VaultCommand::Revoke { scope, subject } => {
            names::scope(&scope)?;
            names::container(&subject)?;
            let n = super::revoke_container_tokens(ctx, &scope, &subject)?;
            println!("revoked {n} phantom token(s) of scope {scope}, subject {subject}");
            Ok(())
        }
        VaultCommand::Passphrase(p) => match p {
            PassphraseCommand::Reveal { allow_redirect } => reveal(ctx, allow_redirect),
            PassphraseCommand::Acknowledge => {
                if super::acknowledge(ctx)? {
                    println!("recovery key marked as saved.");
                } else {
                    println!("recovery key already marked as saved.");
                }
                Ok(())
            }
            PassphraseCommand::Change => change(ctx),
            PassphraseCommand::ToKeyring => to_keyring(ctx),
            PassphraseCommand::Seal { .. } => unreachable!("handled above"),
        },
    }
}

pub fn run_credentials(ctx: &Context, cmd: CredentialsCommand) -> Result<(), VaultError> {
    match cmd {
        CredentialsCommand::EncryptDb => encrypt_db(ctx, None).map(|_| ()),
        CredentialsCommand::Set {
            set,
            provider,
            kind,
            field,
            json,
        } => credentials_set(ctx, &set, &provider, &kind, &field, json),
        CredentialsCommand::Remove { set, provider } => {
            names::scope(&set)?;
            names::profile(&provider)?;
            let (db, _) = super::open(ctx, true, OpenMode::Existing)?;
            if db.delete_credential(&set, &provider)? {
                println!("removed credential {set}/{provider}");
            } else {
                println!("no credential {set}/{provider}; nothing to remove");
            }
            Ok(())
        }
        CredentialsCommand::List { json } => {
            let (db, _) = super::open(ctx, true, OpenMode::Existing)?;
            let rows = credential_rows(&db)?;
            if json {
                println!("{}", json!({ "credentials": rows }));
            } else {
                print_credentials(&rows);
            }
            Ok(())
        }
    }
}

// ---- status ------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct Warning {
    kind: &'static str,
    severity: &'static str,
    message: String,
}

#[derive(Debug, Serialize)]
struct Status {
    state: &'static str,
    locked: bool,
    lock_reason: Option<String>,
    db_error: Option<String>,
    passphrase_source: Option<&'static str>,
    chain: Vec<ProbeRow>,
    recovery_acknowledged: bool,
    warnings: Vec<Warning>,
    credentials: Option<Vec<String>>,
    credential_types: Option<BTreeMap<String, String>>,
    ssh_keys: Option<i64>,
    db_path: PathBuf,
}

fn load_status(ctx: &Context) -> Status {
    let chain = Chain::from_ctx(ctx);
    let probe = chain.probe();
    let db_path = chain.db_path.clone();
    let db_exists = db_path.exists();
    let acknowledged = super::recovery_acknowledged(ctx);
    let mut st = Status {
        state: "locked",
        locked: true,
        lock_reason: None,
        db_error: None,
        passphrase_source: None,
        chain: probe,
        recovery_acknowledged: acknowledged,
        warnings: Vec::new(),
        credentials: None,
        credential_types: None,
        ssh_keys: None,
        db_path: db_path.clone(),
    };
    let mut resolve_error = None;
    match chain.resolve(false) {
        Err(e) => {
            st.lock_reason = Some(format!("a configured tier is unreadable — {e}"));
            resolve_error = Some(e.to_string());
        }
        Ok(None) => st.lock_reason = Some("no passphrase in any tier".into()),
        Ok(Some((pw, tier))) => {
            st.passphrase_source = Some(tier.id());
            if !db_exists {
                st.credentials = Some(Vec::new());
                st.credential_types = Some(BTreeMap::new());
                st.ssh_keys = Some(0);
            } else {
                match Db::open(&db_path, &pw, OpenMode::Existing) {
                    Err(VaultError::WrongPassphrase { .. }) => {
                        st.lock_reason = Some(format!(
                            "the passphrase via {tier} does not open the DB — wrong key, or a DB from another install"
                        ));
                    }
                    Err(e) => st.db_error = Some(e.to_string()),
                    Ok(db) => match summary(&db) {
                        Ok((providers, types, keys)) => {
                            st.credentials = Some(providers);
                            st.credential_types = Some(types);
                            st.ssh_keys = Some(keys);
                        }
                        Err(e) => st.db_error = Some(e.to_string()),
                    },
                }
            }
        }
    }
    st.state = if st.db_error.is_some() {
        "error"
    } else if st.lock_reason.is_none() {
        "unlocked"
    } else if !db_exists && st.passphrase_source.is_none() && resolve_error.is_none() {
        "unprovisioned"
    } else {
        "locked"
    };
    st.locked = st.state != "unlocked";
    if let Some(e) = &resolve_error {
        st.warnings.push(Warning {
            kind: "broken-tier",
            severity: "error",
            message: format!("broken passphrase tier: {e}"),
        });
    }
    let volatile = st
        .passphrase_source
        .and_then(Tier::from_id)
        .is_some_and(|t| !t.durable());
    if !acknowledged && volatile {
        st.warnings.push(Warning {
            kind: "recovery-volatile",
            severity: "error",
            message: "recovery key UNSAVED, vault dies at logout".into(),
        });
    } else if !acknowledged && st.passphrase_source.is_some() {
        st.warnings.push(Warning {
            kind: "recovery-unconfirmed",
            severity: "warning",
            message: "recovery key UNCONFIRMED".into(),
        });
    }
    st
}

type Summary = (Vec<String>, BTreeMap<String, String>, i64);

fn summary(db: &Db) -> Result<Summary, VaultError> {
    let mut providers = Vec::new();
    let mut types = BTreeMap::new();
    for set in db.list_credential_sets()? {
        for p in db.list_credentials(&set)? {
            let kind = db
                .load_credential(&set, &p)?
                .and_then(|m| m.get("type").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| "unknown".into());
            types.entry(p.clone()).or_insert(kind);
            providers.push(p);
        }
    }
    providers.sort();
    providers.dedup();
    Ok((providers, types, db.count_ssh_keys()?))
}

fn status(ctx: &Context, as_json: bool) -> Result<(), VaultError> {
    let st = load_status(ctx);
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&st).expect("status serialises")
        );
        return Ok(());
    }
    let header = match st.state {
        "error" => format!("ERROR — {}", st.db_error.clone().unwrap_or_default()),
        "unprovisioned" => {
            "UNPROVISIONED — no credentials DB and no stored passphrase yet".to_owned()
        }
        "unlocked" => format!(
            "unlocked — passphrase via {}",
            st.passphrase_source.unwrap_or("?")
        ),
        _ => format!("LOCKED — {}", st.lock_reason.clone().unwrap_or_default()),
    };
    println!("Vault: {}", sanitize(&header));
    let created = if st.db_path.exists() {
        ""
    } else {
        " (created encrypted on first use)"
    };
    println!("  DB:  {}{created}", st.db_path.display());
    println!("  Passphrase resolution chain:");
    for row in &st.chain {
        let marker = if row.active {
            "active"
        } else if row.present {
            "present"
        } else {
            "–"
        };
        println!(
            "    {:<19}{:<9}{}",
            row.source,
            marker,
            sanitize(&row.detail)
        );
    }
    match st.state {
        "unprovisioned" => println!(
            "  hint: run `terok-admin setup --passphrase-tier …` to create the vault and store its passphrase"
        ),
        "locked" => println!(
            "  hint: run `terok-admin vault unlock` (or fix the tier named above) to unlock it"
        ),
        _ => {}
    }
    if st.recovery_acknowledged {
        println!("  Recovery key: acknowledged");
    } else {
        println!(
            "  Recovery key: NOT acknowledged — save the passphrase off-host before you rely on a machine-bound tier"
        );
    }
    for w in &st.warnings {
        println!("  {}: {}", w.severity, sanitize(&w.message));
    }
    match (&st.credentials, st.state) {
        (Some(list), _) => {
            let types = st.credential_types.clone().unwrap_or_default();
            let shown: Vec<String> = list
                .iter()
                .map(|p| {
                    format!(
                        "{} ({})",
                        sanitize(p),
                        sanitize(types.get(p).map(String::as_str).unwrap_or("unknown"))
                    )
                })
                .collect();
            println!(
                "  Credentials: {} stored ({})",
                list.len(),
                shown.join(", ")
            );
        }
        (None, "error") => println!("  Credentials: DB unreadable — see the error above"),
        (None, _) => println!("  Credentials: vault locked"),
    }
    if let Some(n) = st.ssh_keys {
        println!("  SSH keys:    {n} stored");
    }
    Ok(())
}

// ---- list --------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct CredentialRow {
    credential_set: String,
    provider: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    fields: Vec<String>,
}

fn credential_rows(db: &Db) -> Result<Vec<CredentialRow>, VaultError> {
    let mut rows = Vec::new();
    for set in db.list_credential_sets()? {
        for provider in db.list_credentials(&set)? {
            let data = db.load_credential(&set, &provider)?.unwrap_or_default();
            let kind = data.get("type").and_then(Value::as_str).map(str::to_owned);
            let mut fields: Vec<String> = data.keys().filter(|k| *k != "type").cloned().collect();
            fields.sort();
            rows.push(CredentialRow {
                credential_set: set.clone(),
                provider,
                kind,
                fields,
            });
        }
    }
    Ok(rows)
}

pub(crate) fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| (*h).to_owned()).collect());
    line(widths.iter().map(|w| "-".repeat(*w)).collect());
    for row in rows {
        line(row.clone());
    }
}

fn print_credentials(rows: &[CredentialRow]) {
    if rows.is_empty() {
        println!("(no credentials stored)");
        return;
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                sanitize(&r.credential_set),
                sanitize(&r.provider),
                sanitize(r.kind.as_deref().unwrap_or("—")),
                if r.fields.is_empty() {
                    "—".into()
                } else {
                    sanitize(&r.fields.join(", "))
                },
            ]
        })
        .collect();
    print_table(&["credential_set", "provider", "type", "fields"], &cells);
}

fn list(ctx: &Context, include_tokens: bool, as_json: bool) -> Result<(), VaultError> {
    let (db, _) = super::open(ctx, true, OpenMode::Existing)?;
    let rows = credential_rows(&db)?;
    let tokens = if include_tokens {
        Some(db.list_tokens()?)
    } else {
        None
    };
    db.close()?;
    if as_json {
        let mut doc = json!({ "credentials": rows });
        if let Some(tokens) = &tokens {
            doc["tokens"] = tokens
                .iter()
                .map(|t| {
                    json!({
                        "token_prefix": mask_token(&t.token),
                        "scope": t.scope,
                        "subject": t.subject,
                        "credential_set": t.credential_set,
                        "provider": t.provider,
                    })
                })
                .collect();
        }
        println!("{doc}");
        return Ok(());
    }
    print_credentials(&rows);
    if let Some(tokens) = tokens {
        println!();
        println!("proxy tokens (token values masked):");
        if tokens.is_empty() {
            println!("(no proxy tokens issued)");
        } else {
            let cells: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    vec![
                        mask_token(&t.token),
                        sanitize(&t.scope),
                        sanitize(&t.subject),
                        sanitize(&t.credential_set),
                        sanitize(&t.provider),
                    ]
                })
                .collect();
            print_table(
                &["token", "scope", "subject", "credential_set", "provider"],
                &cells,
            );
        }
    }
    Ok(())
}

// ---- unlock / lock / seal ----------------------------------------------------------------

/// Check `pw` against an existing DB; a missing DB accepts any value.
fn validate(db_path: &Path, pw: &str) -> Result<bool, VaultError> {
    match store::file_kind(db_path)? {
        FileKind::Missing => Ok(false),
        FileKind::Plaintext => Err(VaultError::Plaintext {
            db: db_path.to_owned(),
        }),
        _ => Db::open(db_path, pw, OpenMode::Existing)?
            .close()
            .map(|()| true),
    }
}

fn unlock(ctx: &Context, force: bool) -> Result<(), VaultError> {
    let chain = Chain::from_ctx(ctx);
    if !force && let Some(tier) = chain.active_durable() {
        println!(
            "vault already auto-unlocks via {tier}; not caching a passphrase (a durable tier already resolves it). Re-run with --force to override."
        );
        return Ok(());
    }
    let pw = prompt::read("credentials.db passphrase: ")?;
    let verified = validate(&chain.db_path, &pw).map_err(|e| match e {
        VaultError::WrongPassphrase { db, .. } => VaultError::Refused(format!(
            "that passphrase does not open {} — nothing was written (lost it? see `terok-admin vault passphrase reveal` on a machine where the vault is unlocked)",
            db.display()
        )),
        other => other,
    })?;
    let backing = chain.session().store(&pw)?;
    println!("→ cached passphrase in {backing} (RAM-only, cleared at logout)");
    if verified {
        println!("  verified: the value opens the credentials DB");
    } else {
        println!(
            "  no DB at {} yet — this value becomes its key on first use",
            chain.db_path.display()
        );
    }
    Ok(())
}

/// Ask for `SAVED` on the terminal; false without a terminal or on any other answer.
pub(crate) fn confirm_saved(question: &str) -> bool {
    let Ok(mut tty) = OpenOptions::new().read(true).write(true).open("/dev/tty") else {
        return false;
    };
    let _ = write!(tty, "{question}");
    let _ = tty.flush();
    let mut answer = String::new();
    if BufReader::new(&tty).read_line(&mut answer).is_err() {
        return false;
    }
    answer.trim() == "SAVED"
}

/// Remove every stored copy of the passphrase (no prompts). Returns the lines to report.
pub fn purge_tiers(ctx: &Context) -> Result<Vec<String>, VaultError> {
    let chain = Chain::from_ctx(ctx);
    let mut out = Vec::new();
    if !chain.session().forget() {
        return Err(VaultError::Refused(
            "failed to clear the session cache; future processes may still auto-unlock from it"
                .into(),
        ));
    }
    out.push("→ cleared session cache".to_owned());
    if chain.use_keyring {
        match keyring::unavailable_reason() {
            Some(reason) => out.push(format!(
                "→ keyring not reachable ({reason}); nothing to clear"
            )),
            None if keyring::forget() => out.push("→ cleared keyring entry".into()),
            None => {
                return Err(VaultError::Refused(
                    "failed to clear the keyring entry; future processes may still auto-unlock from the keyring".into(),
                ));
            }
        }
    }
    if chain.passphrase_command.is_some()
        && let Some(file) = super::patch_user_config(
            ctx,
            &[("passphrase_command", serde_yaml_ng::Value::Null)],
            false,
        )?
    {
        out.push(format!(
            "→ cleared credentials.passphrase_command from {} (the external secret itself is untouched)",
            file.display()
        ));
    }
    if chain.sealed_file.exists() {
        std::fs::remove_file(&chain.sealed_file).map_err(|e| {
            VaultError::Refused(format!(
                "failed to remove sealed credential at {}: {e}",
                chain.sealed_file.display()
            ))
        })?;
        out.push(format!(
            "→ removed sealed credential at {}",
            chain.sealed_file.display()
        ));
    }
    fsutil::remove_file_if_exists(&super::marker_path(ctx))
        .map_err(|e| VaultError::io("remove the recovery marker", e))?;
    Ok(out)
}

fn lock(ctx: &Context, force: bool) -> Result<(), VaultError> {
    if !force && !super::recovery_acknowledged(ctx) {
        let asked = confirm_saved(
            "`vault lock` clears EVERY stored copy of the vault passphrase; without a copy stored elsewhere the vault becomes UNRECOVERABLE.\nType SAVED to confirm you have it stored elsewhere: ",
        );
        if !asked {
            return Err(VaultError::Refused(
                "lock aborted — passphrase not confirmed saved. Save it (see `terok-admin vault passphrase reveal`) then retry, or pass --force.".into(),
            ));
        }
    }
    for line in purge_tiers(ctx)? {
        println!("{line}");
    }
    println!("vault locked: no stored copy of the passphrase is left on this host");
    Ok(())
}

fn map_key(key: &str) -> Result<&'static str, VaultError> {
    Ok(match key {
        "auto" => "auto",
        "tpm" => "tpm2",
        "host" => "host",
        "tpm+host" => "host+tpm2",
        other => {
            return Err(VaultError::Refused(format!(
                "unknown --key value: {:?} (expected one of: auto, host, tpm, tpm+host)",
                sanitize(other)
            )));
        }
    })
}

fn seal(ctx: &Context, key: &str) -> Result<(), VaultError> {
    let mode = map_key(key)?;
    if let Some(reason) = systemd::unavailable_reason() {
        return Err(VaultError::Refused(format!(
            "systemd-creds unavailable here: {reason}"
        )));
    }
    let chain = Chain::from_ctx(ctx);
    let (pw, _) = chain
        .resolve(false)
        .map_err(|e| VaultError::Refused(format!("cannot seal: {e}")))?
        .ok_or_else(|| {
            VaultError::Refused(
                "no current passphrase to seal — run `terok-admin vault unlock` first".into(),
            )
        })?;
    validate(&chain.db_path, &pw)?;
    if !super::recovery_acknowledged(ctx) {
        return Err(VaultError::Refused(
            "cannot enable the systemd-creds tier: the recovery passphrase isn't marked as saved; run `terok-admin vault passphrase reveal` (or `… acknowledge`) first".into(),
        ));
    }
    systemd::seal(&pw, &chain.sealed_file, mode)?;
    println!(
        "→ sealed passphrase to {} (--with-key={mode})",
        chain.sealed_file.display()
    );
    if !chain.session().forget() {
        eprintln!("⚠ could not clear the now-redundant session cache");
    }
    println!("the next container start picks it up; nothing needs restarting");
    Ok(())
}

// ---- passphrase reveal / change / to-keyring ---------------------------------------------

fn reveal(ctx: &Context, allow_redirect: bool) -> Result<(), VaultError> {
    let chain = Chain::from_ctx(ctx);
    let (pw, tier) = chain
        .resolve(true)
        .map_err(|e| VaultError::Refused(format!("cannot reveal passphrase: {e}")))?
        .ok_or_else(|| {
            VaultError::Refused(
                "no current passphrase resolvable; run `terok-admin vault unlock` first".into(),
            )
        })?;
    if allow_redirect {
        eprintln!("Vault passphrase ({tier}) follows on stdout — save it off-host.");
        let mut out = std::io::stdout().lock();
        out.write_all(pw.as_bytes())
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.flush())
            .map_err(|e| VaultError::io("write the passphrase to stdout", e))?;
    } else {
        let mut tty = OpenOptions::new().write(true).open("/dev/tty").map_err(|_| {
            VaultError::Refused(
                "no terminal to show the passphrase on; re-run from a terminal, or pass --allow-redirect to print it on stdout".into(),
            )
        })?;
        let text = Secret::new(format!(
            "\nVault passphrase ({tier}): {}\n  Recovery key — save it off-host (password manager, paper).\n",
            pw.as_str()
        ));
        tty.write_all(text.as_bytes())
            .map_err(|e| VaultError::io("write to /dev/tty", e))?;
        if std::io::stdout().is_terminal() {
            println!(
                "(shown on the terminal only; use --allow-redirect to send it to stdout instead)"
            );
        }
    }
    if super::recovery_acknowledged(ctx) {
        eprintln!("recovery key already marked as saved.");
    } else if OpenOptions::new().read(true).open("/dev/tty").is_err() {
        eprintln!(
            "no terminal to confirm on: run `terok-admin vault passphrase acknowledge` once the passphrase is saved."
        );
    } else if confirm_saved("Mark recovery key as saved? Type SAVED to confirm: ") {
        super::acknowledge(ctx)?;
        eprintln!("recovery key marked as saved.");
    } else {
        eprintln!("recovery key NOT confirmed; unconfirmed-recovery warning stays on.");
    }
    Ok(())
}

/// Announce a minted passphrase on /dev/tty (and on stdout with `echo`).
pub(crate) fn announce(pw: &str, echo: bool) -> Result<(), VaultError> {
    let block = Secret::new(format!(
        "Vault passphrase: {pw}\n  Write this down and keep it off-host: it is the recovery key of the vault.\n"
    ));
    let tty = OpenOptions::new()
        .write(true)
        .open("/dev/tty")
        .and_then(|mut t| t.write_all(block.as_bytes()));
    if echo {
        print!("{}", block.as_str());
        let _ = std::io::stdout().flush();
        return Ok(());
    }
    tty.map_err(|_| {
        VaultError::Refused(
            "no terminal to show the generated passphrase on; re-run interactively, or pass --echo-passphrase to print it on stdout".into(),
        )
    })
}

/// Whether a minted passphrase could be shown at all (checked before anything is written).
pub(crate) fn can_announce(echo: bool) -> bool {
    echo || OpenOptions::new().write(true).open("/dev/tty").is_ok()
}

fn change(ctx: &Context) -> Result<(), VaultError> {
    let chain = Chain::from_ctx(ctx);
    if chain
        .passphrase_command
        .as_deref()
        .is_some_and(|c| !c.is_empty())
    {
        return Err(VaultError::Refused(
            "nothing was changed: credentials.passphrase_command is configured and terok cannot write to that store; change it there first or remove the setting".into(),
        ));
    }
    let db_kind = store::file_kind(&chain.db_path)?;
    if db_kind == FileKind::Plaintext {
        return Err(VaultError::Plaintext {
            db: chain.db_path.clone(),
        });
    }
    let db_exists = db_kind != FileKind::Missing;
    let current = match chain.resolve(false).map_err(|e| {
        VaultError::Refused(format!(
            "cannot change the passphrase: {e}; fix or remove the broken tier first"
        ))
    })? {
        Some((pw, _)) => pw,
        None if !db_exists => {
            return Err(VaultError::Refused(
                "nothing to change: no credentials DB and no stored passphrase — run `terok-admin setup` instead".into(),
            ));
        }
        None => {
            eprintln!("The vault is locked — enter the CURRENT passphrase first.");
            prompt::read("current passphrase: ")?
        }
    };
    let interactive = std::io::stdin().is_terminal();
    let new = if interactive {
        eprintln!("Enter the NEW passphrase (leave empty to generate one):");
        prompt::read_new()?
    } else {
        match prompt::read_line()? {
            Some(line) if !line.is_empty() => Some(line),
            _ => {
                return Err(VaultError::Refused(
                    "nothing was changed: a generated passphrase needs a terminal; pipe the new passphrase on stdin".into(),
                ));
            }
        }
    };
    let generated = new.is_none();
    let new = new.unwrap_or_else(store::generate_passphrase);
    if *new == *current {
        return Err(VaultError::Refused(
            "nothing was changed: the new passphrase is identical to the current one".into(),
        ));
    }
    let present: Vec<Tier> = chain
        .probe()
        .into_iter()
        .filter(|r| r.present)
        .map(|r| r.tier)
        .collect();
    let escrow = ctx.paths.runtime_dir.join("vault.passphrase.pending");
    if db_exists {
        fsutil::ensure_private_dir(&ctx.paths.runtime_dir, false).map_err(|e| {
            VaultError::io(format!("create {}", ctx.paths.runtime_dir.display()), e)
        })?;
        let mut line = Secret::new(new.to_string());
        line.push('\n');
        fsutil::write_atomic(&escrow, line.as_bytes(), 0o600)
            .map_err(|e| VaultError::io(format!("write {}", escrow.display()), e))?;
        if let Err(e) = store::rekey_in_place(&chain.db_path, &current, &new) {
            let _ = fsutil::remove_file_if_exists(&escrow);
            return Err(match e {
                VaultError::WrongPassphrase { db, .. } => VaultError::Refused(format!(
                    "that passphrase does not open {} — nothing was changed",
                    db.display()
                )),
                other => other,
            });
        }
        println!(
            "→ re-encrypted {} under the new passphrase",
            chain.db_path.display()
        );
    }
    let targets = if present.is_empty() {
        vec![Tier::KernelKeyring]
    } else {
        present
    };
    let mut any_ok = false;
    let mut failed = false;
    for tier in targets {
        let (ok, detail) = match tier {
            Tier::KernelKeyring => match chain.session().store(&new) {
                Ok(_) => (true, "kernel-keyring cache rewritten".to_owned()),
                Err(e) => {
                    let cleared = chain.session().forget();
                    (
                        false,
                        format!(
                            "cannot cache ({e}) — stale cache {}",
                            if cleared { "cleared" } else { "may remain" }
                        ),
                    )
                }
            },
            Tier::SystemdCreds => match systemd::unavailable_reason() {
                Some(r) => {
                    let _ = fsutil::remove_file_if_exists(&chain.sealed_file);
                    (
                        false,
                        format!(
                            "cannot re-seal ({r}) — stale sealed credential removed; re-run `vault passphrase seal` on a capable host"
                        ),
                    )
                }
                None => match systemd::seal(&new, &chain.sealed_file, "auto") {
                    Ok(()) => (true, "credential re-sealed under the new passphrase".into()),
                    Err(e) => {
                        let _ = fsutil::remove_file_if_exists(&chain.sealed_file);
                        (false, format!("{e} — stale sealed credential removed"))
                    }
                },
            },
            Tier::Keyring => match keyring::store(&new) {
                Ok(()) => (true, "keyring entry rewritten".into()),
                Err(e) if keyring::forget() => (false, format!("{e} — stale entry removed")),
                Err(e) => (
                    false,
                    format!(
                        "{e} — the stale entry could not be removed; it still holds the OLD passphrase"
                    ),
                ),
            },
            other => (
                false,
                format!("{other}: tier cannot be rewritten programmatically"),
            ),
        };
        any_ok |= ok;
        failed |= !ok;
        println!("{} {tier}: {detail}", if ok { "→" } else { "✗" });
    }
    let _ = fsutil::remove_file_if_exists(&super::marker_path(ctx));
    if any_ok {
        let _ = fsutil::remove_file_if_exists(&escrow);
    } else if db_exists {
        eprintln!(
            "the new passphrase is kept in {} (0600) — the only copy on this host",
            escrow.display()
        );
    }
    let stamp = ctx.paths.runtime_dir.join("vault.rekeyed_at");
    let _ = fsutil::ensure_private_dir(&ctx.paths.runtime_dir, false);
    let _ = fsutil::write_atomic(&stamp, b"", 0o600);
    println!("running containers keep the old passphrase until they restart");
    if generated {
        announce(&new, false)?;
        if confirm_saved("Type SAVED once the new passphrase is stored off-host: ") {
            super::acknowledge(ctx)?;
        }
    }
    if failed {
        return Err(VaultError::Refused(
            "the vault now uses the new passphrase, but the tiers marked ✗ above could not be rewritten — fix them before the next reboot".into(),
        ));
    }
    Ok(())
}

fn to_keyring(ctx: &Context) -> Result<(), VaultError> {
    let chain = Chain::from_ctx(ctx);
    let (pw, source) = chain
        .resolve(true)
        .map_err(|e| VaultError::Refused(format!("cannot move to keyring: {e}")))?
        .ok_or_else(|| {
            VaultError::Refused(
                "no current passphrase resolvable; run `terok-admin vault unlock` first".into(),
            )
        })?;
    if source == Tier::Keyring {
        println!("→ passphrase is already in the keyring; nothing to do");
        return Ok(());
    }
    validate(&chain.db_path, &pw)?;
    if !super::recovery_acknowledged(ctx) {
        return Err(VaultError::Refused(
            "cannot enable the keyring tier: the recovery passphrase isn't marked as saved; run `terok-admin vault passphrase reveal` (or `… acknowledge`) first".into(),
        ));
    }
    keyring::store(&pw).map_err(|e| {
        VaultError::Refused(format!(
            "OS keyring is unreachable or denied ({e}); aborting (nothing was changed)"
        ))
    })?;
    println!("→ stored passphrase in keyring (was: {source})");
    if let Some(file) = super::patch_user_config(
        ctx,
        &[
            ("use_keyring", serde_yaml_ng::Value::Bool(true)),
            ("passphrase_command", serde_yaml_ng::Value::Null),
        ],
        true,
    )? {
        println!(
            "→ updated {} (use_keyring: true, passphrase_command cleared)",
            file.display()
        );
    }
    if !chain.session().forget() {
        eprintln!("⚠ could not clear the session cache");
    }
    if chain.sealed_file.exists() {
        fsutil::remove_file_if_exists(&chain.sealed_file)
            .map_err(|e| VaultError::io(format!("remove {}", chain.sealed_file.display()), e))?;
        println!("→ removed {}", chain.sealed_file.display());
    }
    Ok(())
}

// ---- credentials -------------------------------------------------------------------------

fn credentials_set(
    ctx: &Context,
    set: &str,
    provider: &str,
    kind: &str,
    field: &str,
    as_json: bool,
) -> Result<(), VaultError> {
    names::scope(set)?;
    names::profile(provider)?;
    let data: Map<String, Value> = if as_json {
        let mut text = Secret::new(String::new());
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| VaultError::io("read stdin", e))?;
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(map)) if !map.is_empty() => map,
            _ => {
                return Err(VaultError::Refused(
                    "stdin is not a non-empty JSON object; nothing was stored".into(),
                ));
            }
        }
    } else {
        if kind.is_empty() || field.is_empty() || field == "type" {
            return Err(VaultError::Refused(
                "--type and --field must be non-empty and --field cannot be `type`".into(),
            ));
        }
        let value = if std::io::stdin().is_terminal() {
            Secret::new(
                rpassword::prompt_password(format!("{provider} {field}: "))
                    .map_err(|_| VaultError::Cancelled)?
                    .trim()
                    .to_owned(),
            )
        } else {
            prompt::read_line()?.unwrap_or_default()
        };
        if value.is_empty() {
            return Err(VaultError::Refused(
                "empty credential on stdin; nothing was stored".into(),
            ));
        }
        let mut map = Map::new();
        map.insert("type".into(), Value::from(kind));
        map.insert(field.into(), Value::from(value.as_str()));
        map
    };
    // A prompt may unlock an existing vault, never key a new one (a typo would become its key).
    let prompt = store::file_kind(&super::db_path(ctx))? != FileKind::Missing;
    let (db, _) = super::open(ctx, prompt, OpenMode::Create)?;
    db.store_credential(set, provider, &data)?;
    println!("stored credential {set}/{provider} (fields: {})", {
        let mut f: Vec<&String> = data.keys().filter(|k| *k != "type").collect();
        f.sort();
        f.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
    });
    Ok(())
}

/// Local time as `YYYYmmdd-HHMMSS`.
fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0);
    // SAFETY: localtime_r writes only into the tm we pass.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&now, &mut tm);
        tm
    };
    format!(
        "{:04}{:02}{:02}-{:02}{:02}{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// Back up a plaintext DB and its -wal/-shm/-journal into a new 0600 tar.gz.
pub fn backup_plaintext(db: &Path) -> Result<PathBuf, VaultError> {
    let mut name = db.as_os_str().to_owned();
    name.push(format!(".plaintext-backup-{}.tar.gz", timestamp()));
    let backup = PathBuf::from(name);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&backup)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => VaultError::Exists {
                path: backup.clone(),
            },
            _ => VaultError::io(format!("create {}", backup.display()), e),
        })?;
    let result = (|| -> std::io::Result<()> {
        let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        let mut files = vec![db.to_owned()];
        files.extend(store::existing_sidecars(db));
        for f in files {
            let name = f.file_name().expect("a file name").to_owned();
            tar.append_path_with_name(&f, name)?;
        }
        let gz = tar.into_inner()?;
        let file = gz.finish()?;
        file.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&backup);
        return Err(VaultError::io(format!("write {}", backup.display()), e));
    }
    Ok(backup)
}

/// `credentials encrypt-db`: back up, then encrypt in place. `passphrase` is given by setup;
/// otherwise the chain (with a prompt) supplies it. Returns the backup path.
pub fn encrypt_db(ctx: &Context, passphrase: Option<&str>) -> Result<Option<PathBuf>, VaultError> {
    let db = super::db_path(ctx);
    match store::file_kind(&db)? {
        FileKind::Missing => {
            println!(
                "no credentials DB at {}; it will be created encrypted on first use",
                db.display()
            );
            return Ok(None);
        }
        FileKind::Plaintext => {}
        FileKind::Empty | FileKind::Opaque => return Err(VaultError::NotPlaintext { db }),
    }
    let mut tmp = db.as_os_str().to_owned();
    tmp.push(".encrypting");
    let tmp = PathBuf::from(tmp);
    if tmp.exists() {
        return Err(VaultError::Exists { path: tmp });
    }
    let pw: Secret = match passphrase {
        Some(p) => Secret::new(p.to_owned()),
        None => {
            let chain = Chain::from_ctx(ctx);
            match chain.resolve(true)? {
                Some((pw, tier)) => {
                    println!("passphrase source: {tier}");
                    pw
                }
                None => {
                    return Err(VaultError::Refused(format!(
                        "no passphrase to encrypt {} with; store one first (`terok-admin setup --passphrase-tier …`, `terok-admin vault unlock`, or credentials.passphrase_command)",
                        db.display()
                    )));
                }
            }
        }
    };
    let backup = backup_plaintext(&db)?;
    println!("→ backed up the plaintext DB to {}", backup.display());
    store::encrypt_in_place(&db, &pw)?;
    // Bring the schema current under the new key.
    Db::open(&db, &pw, OpenMode::Existing)?.close()?;
    println!("→ encrypted {} (SQLCipher 4)", db.display());
    eprintln!(
        "\x1b[31mwarning: {} holds your credentials IN CLEAR; delete it once you have checked the vault (`terok-admin vault list`)\x1b[0m",
        backup.display()
    );
    Ok(Some(backup))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_keys_map_to_systemd_vocabulary() {
        assert_eq!(map_key("tpm+host").unwrap(), "host+tpm2");
        assert_eq!(map_key("tpm").unwrap(), "tpm2");
        assert!(map_key("tpm3").is_err());
    }

    #[test]
    fn timestamp_has_the_backup_shape() {
        let t = timestamp();
        assert_eq!(t.len(), 15);
        assert_eq!(&t[8..9], "-");
    }

    #[test]
    fn tiers_reexport_is_usable() {
        assert_eq!(super::super::tiers::Tier::ALL.len(), 5);
    }
}
