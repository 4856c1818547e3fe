//! A service child of the supervisor: it inherits its listening socket on fd 3, resolves
//! what it needs before confinement (the passphrase helper may have to run a program), then
//! confines itself and serves.

use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;

use super::harden::{self, Lane};
use super::run::LISTENER_FD;
use super::{Service, SupervisorError};
use crate::broker::Routes;
use crate::sidecar::{Sidecar, VaultPlan};

/// `terok-service NAME --sidecar PATH`.
pub fn run(service: Service, sidecar_path: &Path) -> Result<(), SupervisorError> {
    // Orphaned before we could arm PDEATHSIG: the supervisor is gone, so are we.
    if nix::unistd::getppid().as_raw() == 1 {
        return Err(SupervisorError::Protocol("orphaned at start".into()));
    }
    let sidecar = Sidecar::load(sidecar_path)?;
    // SAFETY: the supervisor dup'ed our listening socket to this fd before exec.
    let listener = unsafe { OwnedFd::from_raw_fd(LISTENER_FD) };
    match service {
        Service::Broker => broker(TcpListener::from(listener), &sidecar),
        Service::Agent => agent(UnixListener::from(listener), &sidecar),
        Service::Gate => Err(SupervisorError::Protocol(format!(
            "{} does not run as a child in this supervisor",
            service.name()
        ))),
    }
}

/// The vault passphrase through the chain of the sidecar; `None` (logged, with what that
/// means for this service) when it is locked or a tier fails.
fn resolve_passphrase(vault: &VaultPlan, when_locked: &str) -> Option<crate::vault::Secret> {
    match vault.chain().resolve(false) {
        Ok(Some((secret, tier))) => {
            tracing::info!(%tier, "vault passphrase resolved");
            Some(secret)
        }
        Ok(None) => {
            tracing::error!("the vault is locked (no passphrase tier resolved); {when_locked}");
            None
        }
        Err(e) => {
            tracing::error!("vault passphrase: {e}");
            None
        }
    }
}

/// What a vault-using service may touch: the system read-only, the vault directory (SQLite's
/// WAL and shared-memory files, the audit log) read-write.
fn vault_lane(vault: &VaultPlan) -> Lane {
    Lane {
        read: harden::system_read_paths(),
        write: vec![vault.dir.clone()],
    }
}

/// The broker's lane: the vault's, plus the route table and every route's extra CA file
/// (which may live anywhere the operator put it).
fn broker_lane(vault: &VaultPlan, routes: &Routes) -> Lane {
    let mut lane = vault_lane(vault);
    lane.read.push(vault.routes.clone());
    lane.read
        .extend(routes.iter().filter_map(|r| r.ca_file.clone()));
    lane
}

fn broker(listener: TcpListener, sidecar: &Sidecar) -> Result<(), SupervisorError> {
    let vault = sidecar
        .vault
        .clone()
        .ok_or_else(|| SupervisorError::Protocol("the broker needs a vault plan".into()))?;
    // Resolve the passphrase while programs may still run and config is readable.
    let passphrase = resolve_passphrase(&vault, "requests will wait");
    let routes = Routes::load(&vault.routes).unwrap_or_else(|e| {
        // A broken table must not crash-loop the child: every provider gets 404 until fixed.
        tracing::error!("{e}; serving without routes");
        Routes::empty()
    });
    tracing::info!("{}", harden::confine(&broker_lane(&vault, &routes)));
    super::broker_child::serve(listener, sidecar, &vault, routes, passphrase)
        .map_err(|e| SupervisorError::Protocol(format!("broker: {e}")))
}

/// The SSH agent for the container's scope: open the vault before confinement is complete,
/// then answer on the inherited socket. A vault that cannot be opened leaves the agent
/// closing every connection (logged), never crash-looping.
fn agent(listener: UnixListener, sidecar: &Sidecar) -> Result<(), SupervisorError> {
    let (Some(vault), Some(scope)) = (sidecar.vault.clone(), sidecar.scope.clone()) else {
        return Err(SupervisorError::Protocol(
            "the ssh agent needs a scope and a vault plan".into(),
        ));
    };
    let passphrase = resolve_passphrase(&vault, "the ssh agent offers no keys");
    let lane = vault_lane(&vault);
    tracing::info!("{}", harden::confine(&lane));
    let db_path = vault.db_path.clone();
    let db = passphrase.and_then(|pw| {
        super::at_low_priority(move || {
            crate::vault::Db::open(&db_path, &pw, crate::vault::OpenMode::Existing)
        })
        .map_err(|e| tracing::error!("cannot open the vault: {e}"))
        .ok()
    });
    tracing::info!(%scope, vault_open = db.is_some(), "ssh agent ready");
    let source = std::sync::Arc::new(crate::ssh::agent::KeySource {
        db: db.map(std::sync::Mutex::new),
        scope,
    });
    crate::ssh::agent::serve(listener, source)
        .map_err(|e| SupervisorError::Protocol(format!("ssh agent: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_lane_reads_every_routes_ca_file() {
        let vault = VaultPlan {
            dir: "/v".into(),
            db_path: "/v/credentials.db".into(),
            sealed_file: "/v/vault.passphrase.cred".into(),
            use_keyring: false,
            passphrase_command: None,
            session_runtime_dir: None,
            routes: "/v/routes.json".into(),
            audit_log: "/v/credential_audit.jsonl".into(),
        };
        let routes = Routes::from_value(&serde_json::json!({
            "corp": {"upstream": "https://llm.corp.example", "ca_file": "/opt/corp/ca.pem"},
            "plain": {"upstream": "https://api.example"}
        }))
        .unwrap();
        let lane = broker_lane(&vault, &routes);
        assert!(lane.read.contains(&"/opt/corp/ca.pem".into()));
        assert!(lane.read.contains(&"/v/routes.json".into()));
        assert_eq!(lane.write, vec![std::path::PathBuf::from("/v")]);
    }
}
