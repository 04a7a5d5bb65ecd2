//! Fault injection for unit tests (the buffer's and the writer's): the one [`Faults`] value a
//! [`Buffer`](super::Buffer) carries under `cfg(test)`. This file is compiled only for tests,
//! so no fault hook is in any other build.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Mutex;

use super::{io_err, BufferError};

/// The switches, each off until a test turns it on.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Commits fail as if the disk were full.
    fail_commits: AtomicBool,
    /// The fsync after a commit's write fails, as a failing disk's would (after the real one,
    /// so what the commit wrote did reach the disk).
    fail_syncs: AtomicBool,
    /// A commit panics inside its write, as the store can on a damaged file.
    panic_commits: AtomicBool,
    /// A commit says it is writing (first channel) and waits for a go (second), without the
    /// generations' lock.
    pause_commits: Mutex<Option<(Sender<()>, Receiver<()>)>>,
}

impl Faults {
    /// Makes every commit fail as a full disk would, until called with `false`.
    pub(crate) fn fail_commits(&self, on: bool) {
        self.fail_commits.store(on, Ordering::Relaxed);
    }

    /// Makes the fsync after each commit's write fail, until called with `false`.
    pub(crate) fn fail_syncs(&self, on: bool) {
        self.fail_syncs.store(on, Ordering::Relaxed);
    }

    /// Makes each commit panic inside its write, until called with `false`.
    pub(crate) fn panic_commits(&self, on: bool) {
        self.panic_commits.store(on, Ordering::Relaxed);
    }

    /// Makes each commit signal `entered` and wait for `go` once it writes, until called with
    /// `None`.
    pub(crate) fn pause_commits(&self, gate: Option<(Sender<()>, Receiver<()>)>) {
        *self.pause_commits.lock().unwrap_or_else(|e| e.into_inner()) = gate;
    }

    /// At a commit's start: the error of a full disk, while commits fail.
    pub(super) fn commit(&self, dir: &Path) -> Result<(), BufferError> {
        if self.fail_commits.load(Ordering::Relaxed) {
            return Err(io_err(
                dir,
                std::io::Error::other("no space left on device (injected)"),
            ));
        }
        Ok(())
    }

    /// Once a commit writes, without the generations' lock: the pause, while set.
    pub(super) fn writing(&self) {
        if let Some((entered, go)) = &*self.pause_commits.lock().unwrap_or_else(|e| e.into_inner())
        {
            let _ = entered.send(());
            let _ = go.recv();
        }
    }

    /// Inside a commit's write: the panic, while set.
    pub(super) fn inside_write(&self) {
        if self.panic_commits.load(Ordering::Relaxed) {
            panic!("injected panic inside a commit");
        }
    }

    /// After a commit's write and fsync: the failed fsync, while set.
    pub(super) fn synced(&self, dir: &Path) -> Result<(), BufferError> {
        if self.fail_syncs.load(Ordering::Relaxed) {
            return Err(io_err(
                dir,
                std::io::Error::other("fsync failed (injected)"),
            ));
        }
        Ok(())
    }
}
