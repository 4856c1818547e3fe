//! The broker child's serving loop: serve at once on the inherited listener, open the vault
//! in the background (one key derivation, ~160 ms) and hand it to the broker; requests that
//! come before that wait for it.

use std::net::TcpListener;
use std::sync::Arc;

use crate::broker::{self, Broker, Routes, VaultStore};
use crate::sidecar::{Sidecar, VaultPlan};
use crate::vault::{Db, OpenMode, Secret};

pub fn serve(
    listener: TcpListener,
    sidecar: &Sidecar,
    vault: &VaultPlan,
    routes: Routes,
    passphrase: Option<Secret>,
) -> Result<(), String> {
    let (broker, store) = Broker::new(
        routes,
        Some(vault.audit_log.clone()),
        Some(sidecar.container_name.clone()),
    )
    .map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let db_path = vault.db_path.clone();
    runtime.block_on(async move {
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        let server = tokio::spawn(broker::serve(
            listener,
            Arc::new(broker),
            std::future::pending::<()>(),
        ));
        match passphrase {
            None => store.fail(
                "the vault is locked: run `terok-admin vault unlock`, then restart the container",
            ),
            Some(pw) => {
                let opened = tokio::task::spawn_blocking(move || {
                    super::at_low_priority(move || Db::open(&db_path, &pw, OpenMode::Existing))
                })
                .await;
                match opened {
                    Ok(Ok(db)) => {
                        tracing::info!("vault open; broker ready");
                        store.provide(VaultStore::new(db));
                    }
                    Ok(Err(e)) => {
                        tracing::error!("cannot open the vault: {e}");
                        store.fail(format!("cannot open the vault: {e}"));
                    }
                    Err(e) => store.fail(format!("vault open task failed: {e}")),
                }
            }
        }
        server
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    })
}
