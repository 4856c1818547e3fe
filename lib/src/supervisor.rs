//! The per-container supervisor. Its services (broker, gate, DNS filter, SSH agent) arrive
//! with later work; for now the hook does not spawn it.
