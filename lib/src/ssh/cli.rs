//! `terok-admin ssh …`: the operator's verbs over the vault's SSH keys, and a host-side
//! agent for one scope.
//!
//! Scopes starting with `%` are the sandbox's own infrastructure scopes: hidden from every
//! listing and refused as arguments. Every displayed field is sanitised.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::json;

use super::keys::{self, KeyType, Parsed};
use super::{SshError, agent, db};
use crate::vault::store::FileKind;
use crate::vault::tiers::prompt;
use crate::vault::{OpenMode, Secret, sanitize};
use crate::{Context, names};

/// `terok-admin ssh …`
#[derive(Debug, clap::Subcommand)]
pub enum SshCommand {
    /// List SSH keys per scope (one row per scope and key)
    List {
        #[arg(long)]
        scope: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Generate a key for a scope (idempotent: an existing `tk-main:` key is returned)
    Add {
        scope: String,
        /// ed25519 (default) or rsa (3072 bits)
        #[arg(long, default_value = "ed25519")]
        key_type: String,
        #[arg(long)]
        comment: Option<String>,
        /// Replace the scope's keys with a fresh primary key
        #[arg(long)]
        force: bool,
    },
    /// Import an OpenSSH private key into a scope (a protected key's passphrase is asked for)
    Import {
        scope: String,
        #[arg(long)]
        private_key: PathBuf,
        #[arg(long)]
        public_key: Option<PathBuf>,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Write a scope's key as OpenSSH files (`<stem>` 0600, `<stem>.pub` 0644)
    Export {
        scope: String,
        #[arg(long)]
        out_dir: PathBuf,
        #[arg(long)]
        key_id: Option<i64>,
        #[arg(long)]
        out_name: Option<String>,
    },
    /// Print a scope's public key line (default: the most recently assigned key)
    Pub {
        scope: String,
        #[arg(long)]
        key_id: Option<i64>,
        #[arg(long)]
        all: bool,
    },
    /// Link an existing vault key to another scope
    Link {
        scope: String,
        #[arg(long)]
        key_id: i64,
    },
    /// Change a key's comment (in every scope it is linked to)
    Rename {
        /// Fingerprint or a unique prefix of it (`SHA256:` optional)
        fingerprint: String,
        comment: String,
    },
    /// Unlink keys from scopes (keys left in no scope are deleted)
    Remove {
        #[arg(long)]
        scope: Option<String>,
        /// Shell glob on the KEY column (comment or `id=<n>`)
        #[arg(long)]
        comment: Option<String>,
        #[arg(long)]
        fingerprint: Option<String>,
        #[arg(long)]
        yes: bool,
    },
    /// Serve an SSH agent for one scope on a Unix socket (0600) for your own git/ssh use
    Agent {
        scope: String,
        #[arg(long)]
        socket: PathBuf,
    },
}

fn refuse(msg: impl Into<String>) -> SshError {
    SshError::Refused(msg.into())
}

/// A user-facing scope argument: the scope grammar, and never a `%` infrastructure scope.
fn user_scope(scope: &str) -> Result<&str, SshError> {
    if scope.starts_with('%') {
        return Err(refuse(format!(
            "the '%' prefix is reserved for sandbox infrastructure scopes (e.g. '%host'); pick a plain name instead of '{}'",
            sanitize(scope)
        )));
    }
    Ok(names::scope(scope)?)
}

fn open(ctx: &Context) -> Result<crate::vault::Db, SshError> {
    Ok(crate::vault::open(ctx, true, OpenMode::Existing)?.0)
}

/// Open for a write that may create the vault; a prompt never keys a new one.
fn open_for_write(ctx: &Context) -> Result<crate::vault::Db, SshError> {
    let prompt = crate::vault::store::file_kind(&crate::vault::db_path(ctx))? != FileKind::Missing;
    Ok(crate::vault::open(ctx, prompt, OpenMode::Create)?.0)
}

pub fn run(ctx: &Context, cmd: SshCommand) -> Result<(), SshError> {
    match cmd {
        SshCommand::List { scope, json } => list(ctx, scope.as_deref(), json),
        SshCommand::Add {
            scope,
            key_type,
            comment,
            force,
        } => add(ctx, &scope, &key_type, comment.as_deref(), force),
        SshCommand::Import {
            scope,
            private_key,
            public_key,
            comment,
        } => import(
            ctx,
            &scope,
            &private_key,
            public_key.as_deref(),
            comment.as_deref(),
        ),
        SshCommand::Export {
            scope,
            out_dir,
            key_id,
            out_name,
        } => export(ctx, &scope, &out_dir, key_id, out_name.as_deref()),
        SshCommand::Pub { scope, key_id, all } => public(ctx, &scope, key_id, all),
        SshCommand::Link { scope, key_id } => link(ctx, &scope, key_id),
        SshCommand::Rename {
            fingerprint,
            comment,
        } => rename(ctx, &fingerprint, &comment),
        SshCommand::Remove {
            scope,
            comment,
            fingerprint,
            yes,
        } => remove(
            ctx,
            scope.as_deref(),
            comment.as_deref(),
            fingerprint.as_deref(),
            yes,
        ),
        SshCommand::Agent { scope, socket } => serve_agent(ctx, &scope, &socket),
    }
}

// ---- list ------------------------------------------------------------------------------

fn visible(rows: Vec<db::KeyRow>) -> Vec<db::KeyRow> {
    let mut rows: Vec<_> = rows
        .into_iter()
        .filter(|r| !r.scope.starts_with('%'))
        .collect();
    rows.sort_by(|a, b| (&a.scope, a.label()).cmp(&(&b.scope, b.label())));
    rows
}

fn table_rows(rows: &[db::KeyRow], numbered: bool) -> Vec<Vec<String>> {
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let mut cells = vec![
                sanitize(&r.scope),
                sanitize(&r.label()),
                sanitize(&r.key_type),
                sanitize(&r.fingerprint),
                format!("db:ssh_keys/{}", r.id),
            ];
            if numbered {
                cells.insert(0, (i + 1).to_string());
            }
            cells
        })
        .collect()
}

fn print_rows(rows: &[db::KeyRow], numbered: bool) {
    let mut headers = vec!["SCOPE", "KEY", "TYPE", "FINGERPRINT", "PATH"];
    if numbered {
        headers.insert(0, "#");
    }
    crate::vault::cli::print_table(&headers, &table_rows(rows, numbered));
}

fn list(ctx: &Context, scope: Option<&str>, as_json: bool) -> Result<(), SshError> {
    if let Some(s) = scope {
        user_scope(s)?;
    }
    let db = open(ctx)?;
    let mut rows = visible(db::all_rows(&db)?);
    if let Some(s) = scope {
        rows.retain(|r| r.scope == s);
        if rows.is_empty() && !as_json {
            return Err(refuse(format!("No keys registered for scope '{s}'")));
        }
    }
    if as_json {
        let keys: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "scope": r.scope,
                    "key": r.label(),
                    "id": r.id,
                    "type": r.key_type,
                    "comment": r.comment,
                    "fingerprint": r.fingerprint,
                    "path": format!("db:ssh_keys/{}", r.id),
                    "is_default": r.is_default,
                })
            })
            .collect();
        println!("{}", json!({ "keys": keys }));
    } else if rows.is_empty() {
        println!("No SSH keys registered.");
    } else {
        print_rows(&rows, false);
    }
    Ok(())
}

// ---- add / import ----------------------------------------------------------------------

fn add(
    ctx: &Context,
    scope: &str,
    key_type: &str,
    comment: Option<&str>,
    force: bool,
) -> Result<(), SshError> {
    let kt = match key_type {
        "ed25519" => KeyType::Ed25519,
        "rsa" => KeyType::Rsa,
        _ => return Err(refuse("Unsupported --key-type. Use 'ed25519' or 'rsa'.")),
    };
    user_scope(scope)?;
    if let Some(c) = comment {
        keys::validate_comment(c)?;
    }
    let db = open_for_write(ctx)?;
    let existing = db::scope_rows(&db, scope)?;
    let (id, kt_out, fp, stored_comment, blob) = if let Some(main) = existing
        .iter()
        .find(|r| !force && comment.is_none() && r.comment.starts_with("tk-main:"))
    {
        (
            main.id,
            main.key_type.clone(),
            main.fingerprint.clone(),
            main.comment.clone(),
            main.public_blob.clone(),
        )
    } else {
        let material = keys::generate(kt)?;
        let primary = force || existing.is_empty();
        let c = match comment {
            Some(c) => c.to_owned(),
            None if primary => format!("tk-main:{scope}"),
            None => format!("tk-side:{scope}:{}", existing.len() + 1),
        };
        keys::validate_comment(&c)?;
        let id = db.transaction(|db| {
            let (id, _) = db::store(db, &material, &c).map_err(into_vault)?;
            if force {
                db::replace_scope(db, scope, id).map_err(into_vault)?;
            } else {
                db::assign(db, scope, id, primary).map_err(into_vault)?;
            }
            Ok(id)
        })?;
        (
            id,
            kt.as_str().to_owned(),
            material.fingerprint.clone(),
            c,
            material.public_blob.clone(),
        )
    };
    let line = keys::public_line(db::key_type(&kt_out)?, &blob, &stored_comment);
    println!("SSH key ready for scope '{scope}':");
    println!("  id:          {id}");
    println!("  type:        {kt_out}");
    println!("  fingerprint: {fp}");
    println!("  comment:     {}", sanitize(&stored_comment));
    println!("Public key (register as a deploy key):");
    println!("  {}", sanitize(&line));
    Ok(())
}

/// Run SSH-table writes inside `Db::transaction`, whose closure speaks `VaultError`.
fn into_vault(e: SshError) -> crate::vault::VaultError {
    match e {
        SshError::Vault(v) => v,
        other => crate::vault::VaultError::Refused(other.to_string()),
    }
}

fn expand(path: &Path) -> PathBuf {
    let s = path.to_string_lossy();
    let expanded = match (s.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ if s == "~" => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default(),
        _ => path.to_owned(),
    };
    std::path::absolute(&expanded).unwrap_or(expanded)
}

fn key_passphrase(path: &Path) -> Option<Secret> {
    let value = if std::io::stdin().is_terminal() {
        rpassword::prompt_password(format!("Passphrase for {}: ", path.display()))
            .ok()
            .map(Secret::new)
    } else {
        prompt::read_line().ok().flatten()
    };
    value.filter(|v| !v.is_empty())
}

fn import(
    ctx: &Context,
    scope: &str,
    private_key: &Path,
    public_key: Option<&Path>,
    comment: Option<&str>,
) -> Result<(), SshError> {
    user_scope(scope)?;
    let priv_path = expand(private_key);
    if !priv_path.is_file() {
        return Err(refuse(format!(
            "Private key not found: {}",
            priv_path.display()
        )));
    }
    let pub_path = public_key.map(expand);
    if let Some(p) = &pub_path
        && !p.is_file()
    {
        return Err(refuse(format!("Public key not found: {}", p.display())));
    }
    let pem =
        zeroize::Zeroizing::new(std::fs::read(&priv_path).map_err(|source| SshError::Io {
            what: format!("read {}", priv_path.display()),
            source,
        })?);
    let strip_hint = |msg: String| {
        refuse(format!(
            "{msg}  Run `ssh-keygen -p -f {}` to strip the passphrase.",
            priv_path.display()
        ))
    };
    let failed = |e: SshError| refuse(format!("Import failed: {e}"));
    let (data, file_comment) = match keys::parse_private(&pem) {
        Ok(Parsed::Key(data, c)) => (*data, c),
        Ok(Parsed::Encrypted(key)) => {
            let Some(pw) = key_passphrase(&priv_path) else {
                return Err(strip_hint("the key is passphrase-protected.".into()));
            };
            keys::decrypt(&key, &pw).map_err(|e| strip_hint(e.to_string()))?
        }
        Err(SshError::Protected(m)) => return Err(strip_hint(m)),
        Err(e) => return Err(failed(e)),
    };
    let material = keys::material_of(&data).map_err(failed)?;
    let mut pub_comment = None;
    if let Some(p) = &pub_path {
        let text = std::fs::read_to_string(p).map_err(|source| SshError::Io {
            what: format!("read {}", p.display()),
            source,
        })?;
        let (blob, c) = keys::parse_public_line(text.trim()).map_err(failed)?;
        if blob != material.public_blob {
            return Err(failed(SshError::Invalid(
                "the public key does not match the private key".into(),
            )));
        }
        pub_comment = Some(c);
    }
    let comment =
        comment
            .map(str::to_owned)
            .or(pub_comment)
            .unwrap_or(if file_comment.is_empty() {
                String::new()
            } else {
                file_comment
            });
    keys::validate_comment(&comment).map_err(failed)?;
    let db = open_for_write(ctx)?;
    let (id, already, linked) = db.transaction(|db| {
        let (id, already) = db::store(db, &material, &comment).map_err(into_vault)?;
        let was_linked = db::is_assigned(db, scope, id).map_err(into_vault)?;
        let first = db::scope_rows(db, scope).map_err(into_vault)?.is_empty();
        db::assign(db, scope, id, first).map_err(into_vault)?;
        Ok((id, already, was_linked))
    })?;
    println!(
        "{}",
        match (already, linked) {
            (false, _) => format!("Imported new key to scope '{scope}':"),
            (true, false) => format!("Linked existing vault key to scope '{scope}':"),
            (true, true) => format!("Key already linked to scope '{scope}' — nothing to do:"),
        }
    );
    println!("  id:          {id}");
    println!("  fingerprint: {}", material.fingerprint);
    println!("  comment:     {}", sanitize(&comment));
    Ok(())
}

// ---- export / pub ----------------------------------------------------------------------

fn pick(db: &crate::vault::Db, scope: &str, key_id: Option<i64>) -> Result<db::KeyRow, SshError> {
    let rows = db::scope_rows(db, scope)?;
    if rows.is_empty() {
        return Err(refuse(format!("scope '{scope}' has no SSH keys assigned")));
    }
    match key_id {
        Some(id) => rows
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| refuse(format!("key_id {id} is not assigned to scope '{scope}'"))),
        None => db::newest(db, scope)?
            .ok_or_else(|| refuse(format!("scope '{scope}' has no SSH keys assigned"))),
    }
}

/// Create `path` with O_EXCL and `mode`, write all of `data`, chmod; unlink on failure.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), SshError> {
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(refuse(format!(
                "Refusing to overwrite existing file: {}",
                path.display()
            )));
        }
        Err(source) => {
            return Err(SshError::Io {
                what: format!("create {}", path.display()),
                source,
            });
        }
    };
    let done = file
        .write_all(data)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)));
    if let Err(source) = done {
        let _ = std::fs::remove_file(path);
        return Err(SshError::Io {
            what: format!("write {}", path.display()),
            source,
        });
    }
    Ok(())
}

fn export(
    ctx: &Context,
    scope: &str,
    out_dir: &Path,
    key_id: Option<i64>,
    out_name: Option<&str>,
) -> Result<(), SshError> {
    user_scope(scope)?;
    if let Some(n) = out_name
        && (n.is_empty() || n == "." || n == ".." || n.contains('/') || n.contains('\0'))
    {
        return Err(refuse(format!(
            "--out-name must be a bare file name stem, not '{}'",
            sanitize(n)
        )));
    }
    let db = open(ctx)?;
    let row = pick(&db, scope, key_id)?;
    let stored = db::private(&db, row.id)?
        .ok_or_else(|| refuse(format!("No ssh_keys row with id={}", row.id)))?;
    drop(db);
    let kt = db::key_type(&stored.key_type)?;
    let pem = keys::openssh_pem(kt, &stored.private_der, &stored.comment)?;
    let line = keys::public_line(kt, &stored.public_blob, &stored.comment);
    let stem = out_name
        .map(str::to_owned)
        .unwrap_or_else(|| keys::export_stem(kt, &stored.public_blob));
    let dir = expand(out_dir);
    std::fs::create_dir_all(&dir).map_err(|source| SshError::Io {
        what: format!("create {}", dir.display()),
        source,
    })?;
    let private_path = dir.join(&stem);
    let public_path = dir.join(format!("{stem}.pub"));
    write_new(&private_path, pem.as_bytes(), 0o600)?;
    if let Err(e) = write_new(&public_path, format!("{line}\n").as_bytes(), 0o644) {
        let _ = std::fs::remove_file(&private_path);
        return Err(e);
    }
    println!("Exported key id={} ({}):", row.id, row.fingerprint);
    println!("  private: {}", private_path.display());
    println!("  public:  {}", public_path.display());
    Ok(())
}

fn public(ctx: &Context, scope: &str, key_id: Option<i64>, all: bool) -> Result<(), SshError> {
    if all && key_id.is_some() {
        return Err(refuse("--all and --key-id are mutually exclusive"));
    }
    user_scope(scope)?;
    let db = open(ctx)?;
    let line = |r: &db::KeyRow| -> Result<String, SshError> {
        Ok(sanitize(&keys::public_line(
            db::key_type(&r.key_type)?,
            &r.public_blob,
            &r.comment,
        )))
    };
    if all {
        let mut rows = db::scope_rows(&db, scope)?;
        if rows.is_empty() {
            return Err(refuse(format!("scope '{scope}' has no SSH keys assigned")));
        }
        rows.sort_by(|a, b| a.assigned_at.cmp(&b.assigned_at));
        for r in &rows {
            println!("{}", line(r)?);
        }
    } else {
        println!("{}", line(&pick(&db, scope, key_id)?)?);
    }
    Ok(())
}

// ---- link / rename / remove ------------------------------------------------------------

fn link(ctx: &Context, scope: &str, key_id: i64) -> Result<(), SshError> {
    user_scope(scope)?;
    let db = open(ctx)?;
    // A key of a `%` infrastructure scope is not there as far as the operator's verbs go.
    let infra = db::all_rows(&db)?
        .iter()
        .any(|r| r.id == key_id && r.scope.starts_with('%'));
    if infra || !db::key_exists(&db, key_id)? {
        return Err(refuse(format!("No ssh_keys row with id={key_id}")));
    }
    let first = db::scope_rows(&db, scope)?.is_empty();
    if db::assign(&db, scope, key_id, first)? {
        println!("Linked key id={key_id} to scope '{scope}'");
    } else {
        println!("Scope '{scope}' is already linked to key id={key_id}");
    }
    Ok(())
}

fn strip_fp(s: &str) -> &str {
    s.strip_prefix("SHA256:").unwrap_or(s)
}

fn rename(ctx: &Context, prefix: &str, comment: &str) -> Result<(), SshError> {
    keys::validate_comment(comment).map_err(|e| refuse(format!("Invalid comment: {e}")))?;
    let db = open(ctx)?;
    let rows = db::all_rows(&db)?;
    // Keys of `%` scopes are not the operator's to rename (a quirk of the original).
    let infra: BTreeSet<i64> = rows
        .iter()
        .filter(|r| r.scope.starts_with('%'))
        .map(|r| r.id)
        .collect();
    let want = strip_fp(prefix);
    let matches: Vec<(i64, String)> = db::fingerprints(&db)?
        .into_iter()
        .filter(|(id, fp)| {
            !want.is_empty() && strip_fp(fp).starts_with(want) && !infra.contains(id)
        })
        .collect();
    match matches.as_slice() {
        [] => Err(refuse(format!(
            "No SSH key matches fingerprint prefix '{}'.",
            sanitize(prefix)
        ))),
        [(id, fp)] => {
            db::rename(&db, *id, comment)?;
            println!("Renamed {fp} → '{}'", sanitize(comment));
            Ok(())
        }
        many => {
            println!(
                "Ambiguous fingerprint prefix '{}' matched {} keys:",
                sanitize(prefix),
                many.len()
            );
            let ids: BTreeSet<i64> = many.iter().map(|(id, _)| *id).collect();
            let shown: Vec<_> = visible(rows)
                .into_iter()
                .filter(|r| ids.contains(&r.id))
                .collect();
            print_rows(&shown, false);
            Err(refuse("Refine the prefix to a single key."))
        }
    }
}

fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|i| go(rest, &t[i..])),
            Some(('?', rest)) => !t.is_empty() && go(rest, &t[1..]),
            Some(('[', rest)) => {
                let Some(end) = rest.iter().position(|c| *c == ']') else {
                    return t.first() == Some(&'[') && go(rest, &t[1..]);
                };
                let (class, after) = (&rest[..end], &rest[end + 1..]);
                let (negate, class) = match class.split_first() {
                    Some(('!', c)) => (true, c),
                    _ => (false, class),
                };
                let Some(c) = t.first() else { return false };
                let mut hit = false;
                let mut i = 0;
                while i < class.len() {
                    if i + 2 < class.len() && class[i + 1] == '-' {
                        hit |= class[i] <= *c && *c <= class[i + 2];
                        i += 3;
                    } else {
                        hit |= class[i] == *c;
                        i += 1;
                    }
                }
                hit != negate && go(after, &t[1..])
            }
            Some((c, rest)) => t.first() == Some(c) && go(rest, &t[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    go(&p, &t)
}

fn confirm(question: &str) -> bool {
    print!("{question} ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    match std::io::stdin().read_line(&mut answer) {
        Ok(0) | Err(_) => false,
        Ok(_) => matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes"),
    }
}

fn remove(
    ctx: &Context,
    scope: Option<&str>,
    comment: Option<&str>,
    fingerprint: Option<&str>,
    yes: bool,
) -> Result<(), SshError> {
    if let Some(s) = scope {
        user_scope(s)?;
    }
    let filtered = scope.is_some() || comment.is_some() || fingerprint.is_some();
    if yes && !filtered {
        return Err(refuse("Cannot use --yes without at least one filter flag."));
    }
    let db = open(ctx)?;
    let all = visible(db::all_rows(&db)?);
    if all.is_empty() {
        return Err(refuse("No SSH keys registered."));
    }
    let chosen: Vec<db::KeyRow> = if filtered {
        let want = fingerprint.map(strip_fp);
        let rows: Vec<_> = all
            .into_iter()
            .filter(|r| scope.is_none_or(|s| r.scope == s))
            .filter(|r| comment.is_none_or(|g| glob(g, &r.label())))
            .filter(|r| want.is_none_or(|w| strip_fp(&r.fingerprint).starts_with(w)))
            .collect();
        if rows.is_empty() {
            return Err(refuse("No keys match the given filters."));
        }
        if !yes {
            if rows.len() > 1 {
                println!("Multiple keys match ({}):", rows.len());
            }
            print_rows(&rows, false);
            let q = if rows.len() == 1 {
                "Remove this key? [y/N]".to_owned()
            } else {
                format!("Remove all {} keys? [y/N]", rows.len())
            };
            if !confirm(&q) {
                return Err(refuse("Aborted."));
            }
        }
        rows
    } else {
        print_rows(&all, true);
        print!("Select key(s) to remove (number, comma-separated, or 'all'): ");
        let _ = std::io::stdout().flush();
        let mut answer = String::new();
        let answer = match std::io::stdin().read_line(&mut answer) {
            Ok(0) | Err(_) => return Err(refuse("Aborted.")),
            Ok(_) => answer.trim().to_owned(),
        };
        if answer.is_empty() {
            return Err(refuse("Aborted."));
        }
        if answer.eq_ignore_ascii_case("all") {
            all
        } else {
            let mut picked = BTreeSet::new();
            for tok in answer.split(',').map(str::trim) {
                match tok.parse::<usize>() {
                    Ok(n) if (1..=all.len()).contains(&n) => {
                        picked.insert(n - 1);
                    }
                    _ => {
                        return Err(refuse(format!(
                            "Invalid selection '{}'. Enter a number 1–{}, comma-separated, or 'all'.",
                            sanitize(tok),
                            all.len()
                        )));
                    }
                }
            }
            picked.into_iter().map(|i| all[i].clone()).collect()
        }
    };
    db.transaction(|db| {
        for r in &chosen {
            db::unassign(db, &r.scope, r.id).map_err(into_vault)?;
        }
        Ok(())
    })?;
    println!("Unassigned {} key(s) from their scope(s).", chosen.len());
    Ok(())
}

// ---- agent ------------------------------------------------------------------------------

fn serve_agent(ctx: &Context, scope: &str, socket: &Path) -> Result<(), SshError> {
    user_scope(scope)?;
    let db = open(ctx)?;
    if db::scope_rows(&db, scope)?.is_empty() {
        return Err(refuse(format!(
            "scope '{scope}' has no SSH keys assigned; add one with `terok-admin ssh add {scope}`"
        )));
    }
    let path = expand(socket);
    let listener = agent::bind_private(&path)?;
    println!(
        "SSH agent for scope '{scope}' listening on {}",
        path.display()
    );
    println!("SSH_AUTH_SOCK={}; export SSH_AUTH_SOCK;", path.display());
    let _ = std::io::stdout().flush();
    let source = Arc::new(agent::KeySource {
        db: Some(Mutex::new(db)),
        scope: scope.to_owned(),
    });
    agent::serve(listener, source).map_err(|source| SshError::Io {
        what: format!("serve on {}", path.display()),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("tk-*", "tk-main:demo"));
        assert!(glob("id=?", "id=3"));
        assert!(!glob("tk-side*", "tk-main:demo"));
        assert!(glob("[a-c]x", "bx"));
        assert!(!glob("[!a-c]x", "bx"));
    }

    #[test]
    fn reserved_scopes_are_refused() {
        let e = user_scope("%host").unwrap_err().to_string();
        assert!(e.contains("reserved"), "{e}");
        assert!(user_scope("demo").is_ok());
    }
}
