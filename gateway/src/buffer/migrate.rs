//! The layout from before generations: the store's files directly in the buffer directory.
//!
//! Invariant: such a buffer is moved into `gen-0/` on open, before the generations are listed,
//! so an upgrade keeps its backlog (the oldest generation, read and drained like any other).

use std::path::Path;

use tracing::info;

use super::store::{fsync_dir, gen_dir, holds_database};
use super::{io_err, BufferError};

/// Moves a buffer from before generations (the store's files in `dir` itself) into `gen-0/`.
pub(super) fn migrate_flat_layout(dir: &Path) -> Result<(), BufferError> {
    if !holds_database(dir) {
        return Ok(());
    }
    let target = gen_dir(dir, 0);
    std::fs::create_dir_all(&target).map_err(|e| io_err(&target, e))?;
    let entries = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("gen-") {
            continue;
        }
        let to = target.join(&name);
        std::fs::rename(entry.path(), &to).map_err(|e| io_err(&to, e))?;
    }
    fsync_dir(&target)?;
    fsync_dir(dir)?;
    info!(path = %dir.display(), "moved the buffer into its first generation");
    Ok(())
}
