//! terok-hook: the OCI hook podman runs (`precreate`, `poststop`) for containers carrying the
//! `terok.sandbox.sidecar` annotation. Sync and small on purpose: it is on every start path.
//! stdout belongs to podman (precreate prints the config back and nothing else); podman
//! discards stderr, so logs go to journald or `<state>/logs/hook.log`.

use std::io::{Read, Write};
use std::process::ExitCode;

use serde_json::Value;
use terok::hook::{self, HookSettings};
use terok::logging::{self, Fallback};

fn init_logging(doc: &Value) {
    if let Some(root) = hook::sidecar_path(doc)
        .as_deref()
        .and_then(hook::state_root)
    {
        logging::init(
            "terok-hook",
            "info",
            true,
            Fallback::File(&root.join("logs/hook.log")),
        );
    }
}

fn precreate(input: &[u8]) -> ExitCode {
    let doc: Value = match serde_json::from_slice(input) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("terok-hook: {}", hook::HookError::BadInput(e));
            return ExitCode::FAILURE;
        }
    };
    init_logging(&doc);
    let sidecar = hook::sidecar_path(&doc);
    match hook::precreate(&doc, &HookSettings::from_env()) {
        Ok(()) => {
            if let Some(path) = &sidecar {
                hook::record_outcome(path, None);
            }
            match hook::echo(&mut std::io::stdout().lock(), input) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("cannot hand the config back to podman: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            tracing::error!("precreate refused the container: {e}");
            if let Some(path) = &sidecar {
                hook::record_outcome(path, Some(&e.to_string()));
            }
            let _ = writeln!(std::io::stderr(), "terok-hook: {e}");
            ExitCode::FAILURE
        }
    }
}

fn poststop(input: &[u8]) -> ExitCode {
    if let Ok(doc) = serde_json::from_slice::<Value>(input) {
        init_logging(&doc);
        hook::poststop(&doc);
    }
    // Never fail the user's command.
    ExitCode::SUCCESS
}

fn create_runtime(input: &[u8]) -> ExitCode {
    if let Ok(doc) = serde_json::from_slice::<Value>(input) {
        init_logging(&doc);
        hook::create_runtime(&doc);
    }
    // Supervision is best effort; the container must not fail for it.
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let stage = std::env::args().nth(1).unwrap_or_default();
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("terok-hook: cannot read stdin: {e}");
        return ExitCode::FAILURE;
    }
    match stage.as_str() {
        "precreate" => precreate(&input),
        "poststop" => poststop(&input),
        "createRuntime" => create_runtime(&input),
        other => {
            eprintln!(
                "terok-hook: unknown stage {other:?}; expected precreate, createRuntime or poststop"
            );
            ExitCode::from(2)
        }
    }
}
