//! The layout from before generations: the store's files directly in the buffer directory.
//!
//! Invariant: such a buffer is moved into `gen-0/` on open, before the generations are listed,
//! so an upgrade keeps its backlog (the oldest generation, read and drained like any other).
//! Only the database's own files move (`db`, `conf`, `blobs/`, snapshots), never the buffer's
//! (`watermark`, the generations).

use std::path::Path;

use tracing::{info, warn};

use super::store::{database_files, fsync_dir, gen_dir};
use super::{io_err, BufferError};

/// Moves a buffer from before generations (the store's files in `dir` itself) into `gen-0/`.
/// The files move one rename at a time; a cut between two leaves some in each place, and the
/// next open moves the rest, so the database is whole again before it is opened.
pub(super) fn migrate_flat_layout(dir: &Path) -> Result<(), BufferError> {
    let files = database_files(dir)?;
    if files.is_empty() {
        return Ok(());
    }
    let target = gen_dir(dir, 0);
    std::fs::create_dir_all(&target).map_err(|e| io_err(&target, e))?;
    for name in files {
        let to = target.join(&name);
        if to.exists() {
            // Both places: a cut kept the move's new entry but not the old one's removal (a
            // file system without atomic renames). The moved one is the database's; the other
            // is kept where it is, never deleted.
            warn!(path = %dir.join(&name).display(), "a buffer file is both in the buffer directory and in its first generation; the one in the generation is used");
            continue;
        }
        std::fs::rename(dir.join(&name), &to).map_err(|e| io_err(&to, e))?;
    }
    fsync_dir(&target)?;
    fsync_dir(dir)?;
    info!(path = %dir.display(), "moved the buffer into its first generation");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_into_the_first_generation_cut_halfway_is_finished_on_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let gen0 = gen_dir(dir.path(), 0);
        std::fs::create_dir_all(&gen0).unwrap();
        std::fs::write(gen0.join("db"), b"moved before the cut").unwrap();
        std::fs::write(dir.path().join("conf"), b"not yet moved").unwrap();
        std::fs::write(dir.path().join("snap.0000000000000010"), b"not yet moved").unwrap();
        std::fs::write(dir.path().join("watermark"), b"the buffer's own").unwrap();
        migrate_flat_layout(dir.path()).unwrap();
        assert!(gen0.join("conf").exists() && gen0.join("snap.0000000000000010").exists());
        assert!(gen0.join("db").exists());
        assert!(
            dir.path().join("watermark").exists(),
            "only database files move"
        );
        assert!(!dir.path().join("conf").exists());
    }
}
