//! The gate-owned hooks directory. Only requests through the gate set `core.hooksPath` to
//! it, so only agent pushes run it; hooks stored in a repo never run.
//!
//! `post-receive` (POSIX sh, no interpreter on the host beyond git and coreutils): for every
//! branch that was force-moved or deleted it saves the old tip as
//! `refs/terok/backup/<branch>/<YYYYmmddTHHMMSSZ>-<old12>` and appends every ref update and
//! backup to `terok-push.log` in the repo; an unborn HEAD follows the first branch pushed.
//! It always exits 0 (post-receive cannot reject).

use std::path::Path;

use super::{GateError, io};
use crate::fsutil;

pub const POST_RECEIVE: &str = r#"#!/bin/sh
# terok gate: keep the old tip of force-moved and deleted branches; log every push.
# Installed by terok; rewritten when it differs.
now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
log="${GIT_DIR:-.}/terok-push.log"
while read -r old new ref; do
    printf '%s\tpush\t%s\t%s\t%s\n' "$now" "$old" "$new" "$ref" >>"$log"
    # A gate whose HEAD is unborn (a fresh remoteless one) follows the first branch pushed,
    # so later clones check it out.
    case "$ref:$new" in
    refs/heads/*:*[!0]*)
        git rev-parse -q --verify HEAD >/dev/null 2>&1 || git symbolic-ref HEAD "$ref" 2>/dev/null
        ;;
    esac
    case "$ref" in refs/heads/*) ;; *) continue ;; esac
    case "$old" in *[!0]*) ;; *) continue ;; esac
    case "$new" in
    *[!0]*) git merge-base --is-ancestor "$old" "$new" 2>/dev/null && continue ;;
    esac
    branch=${ref#refs/heads/}
    short=$(printf '%.12s' "$old")
    backup="refs/terok/backup/$branch/$stamp-$short"
    if git update-ref "$backup" "$old" "" 2>/dev/null; then
        echo "gate: saved $backup" >&2
        printf '%s\tbackup\t%s\t%s\n' "$now" "$backup" "$old" >>"$log"
    else
        echo "gate: WARNING could not back up $branch ($short) - old tip remains in the reflog only" >&2
        printf '%s\tbackup-failed\t%s\t%s\n' "$now" "$ref" "$old" >>"$log"
    fi
done
exit 0
"#;

/// Write the hooks (idempotent: unchanged content is not rewritten; atomic: a reader never
/// sees half a script).
pub fn install(dir: &Path) -> Result<(), GateError> {
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let path = dir.join("post-receive");
    if std::fs::read(&path).is_ok_and(|c| c == POST_RECEIVE.as_bytes()) {
        return Ok(());
    }
    fsutil::write_atomic(&path, POST_RECEIVE.as_bytes(), 0o755)
        .map_err(io(format!("write {}", path.display())))
}
