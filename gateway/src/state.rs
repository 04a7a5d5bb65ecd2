//! The gateway's small state file: the boot counter and the sequence numbers reserved ahead of
//! use. A `seq` never repeats for different content, across restarts and crashes: before a
//! sequence number is handed out, a range containing it is on disk (written to a temporary file,
//! fsynced, renamed over the old one, directory fsynced). A crash wastes at most the unused rest
//! of the range, which shows up as a jump between boots, never as a repeat.
//!
//! The file always has the same size ([`FILE_SIZE`], padded), so on a full disk, where the
//! temporary file cannot be written, it is overwritten in place instead: that needs no new
//! block, and a write this small lies within one sector.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::warn;

/// How many sequence numbers are reserved per write of the state file.
pub const RESERVE: u64 = 100_000;

/// The state file's size: its text, padded with spaces.
const FILE_SIZE: usize = 128;

/// Errors reading or writing the state file.
#[derive(Debug, thiserror::Error)]
#[error("state file {path}: {source}")]
pub struct StateError {
    /// The file.
    pub path: PathBuf,
    /// The OS error.
    pub source: std::io::Error,
}

/// Boot counter and sequence allocator.
#[derive(Debug)]
pub struct SeqState {
    path: PathBuf,
    boot: u64,
    next: u64,
    reserved: u64,
}

/// The file's text: the values, then a checksum of them (an in-place write torn by a power cut
/// must not read as a lower reservation).
fn text(boot: u64, reserved: u64) -> String {
    let values = format!("boot={boot}\nseq_reserved={reserved}\n");
    let crc = crc32fast::hash(values.as_bytes());
    format!("{values}crc={crc:08x}\n")
}

fn parse(text: &str) -> Option<(u64, u64)> {
    let mut boot = None;
    let mut reserved = None;
    let mut crc = None;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("boot", v)) => boot = v.trim().parse().ok(),
            Some(("seq_reserved", v)) => reserved = v.trim().parse().ok(),
            Some(("crc", v)) => crc = Some(u32::from_str_radix(v.trim(), 16).ok()?),
            _ => {}
        }
    }
    let (boot, reserved) = (boot?, reserved?);
    // Files written before the checksum have none; one that has it must match.
    let values = format!("boot={boot}\nseq_reserved={reserved}\n");
    if crc.is_some_and(|c| c != crc32fast::hash(values.as_bytes())) {
        return None;
    }
    Some((boot, reserved))
}

impl SeqState {
    /// Opens the state in `dir`, counts this boot and reserves the first range. `floor` is one
    /// past the highest sequence number known to be used (from the buffer). `fresh` says the data
    /// directory is new, so a missing state file means a first start, not a lost file.
    pub fn open(dir: &Path, floor: u64, fresh: bool) -> Result<SeqState, StateError> {
        let path = dir.join("state");
        // Unknown how far an earlier boot got: start past anything it could have used.
        let time_floor = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64 * 1000)
                .unwrap_or(0)
        };
        let (boot, reserved) = match fs::read_to_string(&path) {
            Ok(text) => match parse(&text) {
                Some(v) => v,
                None => {
                    warn!(path = %path.display(), "state file is damaged; continuing sequence numbers from a time-based floor");
                    (0, time_floor())
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && fresh => (0, 0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                warn!(path = %path.display(), "state file is missing from a used data directory; continuing sequence numbers from a time-based floor");
                (0, time_floor())
            }
            Err(source) => return Err(StateError { path, source }),
        };
        let next = reserved.max(floor);
        let mut state = SeqState {
            path,
            boot: boot + 1,
            next,
            reserved: next,
        };
        state.reserve()?;
        Ok(state)
    }

    fn reserve(&mut self) -> Result<(), StateError> {
        let reserved = self.next + RESERVE;
        let tmp = self.path.with_extension("tmp");
        let err = |source| StateError {
            path: self.path.clone(),
            source,
        };
        let mut text = text(self.boot, reserved);
        text.push_str(&" ".repeat(FILE_SIZE.saturating_sub(text.len() + 1)));
        text.push('\n');
        let replace = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                File::open(dir).and_then(|d| d.sync_all())?;
            }
            Ok(())
        };
        match replace() {
            Ok(()) => {}
            Err(e) if is_disk_full(&e) && self.path.exists() => {
                let _ = fs::remove_file(&tmp);
                warn!(path = %self.path.display(), "disk full: overwriting the state file in place");
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .open(&self.path)
                    .map_err(err)?;
                f.write_all(text.as_bytes()).map_err(err)?;
                f.sync_all().map_err(err)?;
            }
            Err(e) => return Err(err(e)),
        }
        self.reserved = reserved;
        Ok(())
    }

    /// This boot's number (1 for the first start).
    pub fn boot(&self) -> u64 {
        self.boot
    }

    /// The next sequence number; reserves a new range on disk when the current one is used up.
    pub fn next_seq(&mut self) -> Result<u64, StateError> {
        let seq = self.peek_seq()?;
        self.next += 1;
        Ok(seq)
    }

    /// The sequence number [`SeqState::next_seq`] will return, without using it up.
    pub fn peek_seq(&mut self) -> Result<u64, StateError> {
        if self.next >= self.reserved {
            self.reserve()?;
        }
        Ok(self.next)
    }
}

/// Whether an I/O error says the file system is full (ENOSPC, EDQUOT).
fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(28 | 122))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boots_count_up_and_sequences_never_repeat_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SeqState::open(dir.path(), 0, true).unwrap();
        assert_eq!(s.boot(), 1);
        let a = s.next_seq().unwrap();
        let b = s.next_seq().unwrap();
        assert_eq!((a, b), (0, 1));
        drop(s); // a crash: the rest of the range is skipped
        let mut s = SeqState::open(dir.path(), 0, true).unwrap();
        assert_eq!(s.boot(), 2);
        assert!(s.next_seq().unwrap() >= RESERVE);
    }

    #[test]
    fn the_floor_from_the_buffer_wins_over_a_lost_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SeqState::open(dir.path(), 500, true).unwrap();
        assert_eq!(s.next_seq().unwrap(), 500);
    }

    #[test]
    fn a_new_range_is_reserved_when_one_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SeqState::open(dir.path(), 0, true).unwrap();
        for _ in 0..RESERVE {
            s.next_seq().unwrap();
        }
        assert_eq!(s.next_seq().unwrap(), RESERVE);
        let text = fs::read_to_string(dir.path().join("state")).unwrap();
        assert!(text.contains(&format!("seq_reserved={}", 2 * RESERVE)));
    }

    #[test]
    fn a_lost_state_file_in_a_used_data_directory_does_not_restart_sequences_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SeqState::open(dir.path(), 0, false).unwrap();
        assert!(s.next_seq().unwrap() > 1_000_000_000);
    }

    #[test]
    fn a_state_file_torn_in_place_is_damaged_not_a_lower_reservation() {
        let good = text(7, 1_000_000);
        assert_eq!(parse(&good), Some((7, 1_000_000)));
        // The new text's start over the old one's end: the digits no longer match the crc.
        let torn = format!("{}{}", &text(7, 900_000)[..22], &good[22..]);
        assert_eq!(parse(&torn), None);
        assert_eq!(
            parse("boot=3\nseq_reserved=5\n"),
            Some((3, 5)),
            "before checksums"
        );
    }

    #[test]
    fn a_damaged_state_file_does_not_restart_sequences_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("state"), "garbage").unwrap();
        let mut s = SeqState::open(dir.path(), 0, true).unwrap();
        assert!(s.next_seq().unwrap() > 1_000_000_000);
    }
}
