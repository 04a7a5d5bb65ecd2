//! The watermark file, `watermark` in the buffer directory: the newest durable commit (its
//! generation and the highest sequence number committed into it) and the oldest record that may
//! be unacknowledged.
//!
//! Invariants:
//! - It is written only after the commit it names is durable, to a temporary file that is
//!   fsynced and then renamed over the old one: it is either the old watermark or the new one,
//!   never a torn mix. The rename is not fsynced per commit, so after a crash it may be one
//!   commit old: the check on open only gets weaker, never wrong.
//! - On open, a generation whose commit mark is below the watermark's lost a commit the store
//!   had made durable: that is reported ([`LostCommits`]), not trusted. A generation that is
//!   gone says nothing (it was deleted once drained, or quarantined, which is reported on its
//!   own); neither does a watermark whose generation was acknowledged to the end.
//! - A missing, damaged or unreadable file only means there is nothing to check against.

use std::fs::File;
use std::path::Path;

use tracing::warn;

use super::generation::Generation;
use super::{io_err, BufferError, LostCommits};

/// The watermark file's name, in the buffer directory.
const WATERMARK: &str = "watermark";

/// What the watermark file says: the newest durable commit, and the oldest record that may be
/// unacknowledged (everything below it was acknowledged or evicted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Watermark {
    pub(super) generation: u64,
    pub(super) committed_through: u64,
    pub(super) acked_below: u64,
}

impl Watermark {
    fn to_text(self) -> String {
        format!(
            "# edge-gateway buffer watermark: the newest durable commit, and the oldest record\n\
             # that may be unacknowledged. Rewritten after commits; do not edit.\n\
             generation={}\ncommitted_through={}\nacked_below={}\n",
            self.generation, self.committed_through, self.acked_below
        )
    }

    fn parse(text: &str) -> Option<Watermark> {
        let (mut generation, mut committed_through, mut acked_below) = (None, None, None);
        for line in text.lines() {
            match line.split_once('=') {
                Some(("generation", v)) => generation = v.trim().parse().ok(),
                Some(("committed_through", v)) => committed_through = v.trim().parse().ok(),
                Some(("acked_below", v)) => acked_below = v.trim().parse().ok(),
                _ => {}
            }
        }
        Some(Watermark {
            generation: generation?,
            committed_through: committed_through?,
            acked_below: acked_below?,
        })
    }

    /// Reads the watermark in `dir`; a missing file is `None`, an unreadable one is logged.
    pub(super) fn read(dir: &Path) -> Option<Watermark> {
        let path = dir.join(WATERMARK);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let w = Watermark::parse(&text);
                if w.is_none() {
                    warn!(path = %path.display(), "buffer watermark file is damaged; not checking the buffer against it");
                }
                w
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read the buffer watermark file; not checking the buffer against it");
                None
            }
        }
    }

    /// Writes the watermark in `dir`: temporary file, fsync, rename (the rename's own fsync of
    /// the directory is left to the next directory sync: an older watermark is still true).
    pub(super) fn write(self, dir: &Path) -> Result<(), BufferError> {
        let tmp = dir.join("watermark.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            std::io::Write::write_all(&mut f, self.to_text().as_bytes())?;
            f.sync_data()
        };
        write().map_err(|e| io_err(&tmp, e))?;
        let path = dir.join(WATERMARK);
        std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))
    }

    /// Compares the watermark with the generations found: the generation it names must show a
    /// commit mark at least as high.
    pub(super) fn check(self, gens: &[Generation]) -> Option<LostCommits> {
        let g = gens.iter().find(|g| g.id == self.generation)?;
        if self.committed_through < self.acked_below || g.mark >= Some(self.committed_through) {
            return None;
        }
        Some(LostCommits {
            generation: g.id,
            committed_through: self.committed_through,
            found_through: g.mark,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Watermark = Watermark {
        generation: 3,
        committed_through: 41,
        acked_below: 7,
    };

    #[test]
    fn a_written_watermark_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Watermark::read(dir.path()), None, "none written yet");
        W.write(dir.path()).unwrap();
        assert_eq!(Watermark::read(dir.path()), Some(W));
        assert!(!dir.path().join("watermark.tmp").exists());
    }

    #[test]
    fn a_damaged_watermark_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let text = W.to_text();
        let torn = &text[..text.find("acked_below").unwrap()];
        std::fs::write(dir.path().join(WATERMARK), torn).unwrap();
        assert_eq!(Watermark::read(dir.path()), None);
        std::fs::write(dir.path().join(WATERMARK), "generation=x\n").unwrap();
        assert_eq!(Watermark::read(dir.path()), None);
    }
}
