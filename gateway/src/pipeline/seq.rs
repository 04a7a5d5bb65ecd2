//! The gateway's small state file: the boot counter and the sequence numbers reserved ahead of
//! use. A `seq` never repeats for different content, across restarts and crashes: before a
//! sequence number is handed out, a range containing it is on disk (written to a temporary file,
//! fsynced, renamed over the old one, directory fsynced). A crash wastes at most the unused rest
//! of the range, which shows up as a jump between boots, never as a repeat.
//!
//! When the file cannot be read or made durable (a failing disk), the gateway does not stop:
//! it goes on with a *volatile boot*, whose boot number is the time in milliseconds and whose
//! sequence numbers start from a time-based floor, neither of which a restart reading the old
//! file can repeat; so a `(boot, seq)` still never names two different records, and sequence
//! numbers stay contiguous within a boot. The file is tried again every second, and a volatile
//! boot that gets it written is durable from then on. That rests on the clock, so a volatile
//! boot needs a clock past 2026 and past the last write this disk saw (an edge box without a
//! real-time clock starts in 1970 until NTP sets it): until then the numbers are held, and so
//! is the pipeline.
//!
//! The file always has the same size ([`FILE_SIZE`], padded), so on a full disk, where the
//! temporary file cannot be written, it is overwritten in place instead: that needs no new
//! block, and a write this small lies within one sector.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use protocols::model::Timestamp;
use tracing::{error, info, warn};

/// How many sequence numbers are reserved per write of the state file.
pub const RESERVE: u64 = 100_000;

/// How often a volatile boot tries to write the state file again.
const RETRY: Duration = Duration::from_secs(1);

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
    /// One past the highest sequence number known to be used (from the buffer).
    floor: u64,
    /// The data directory is new.
    fresh: bool,
    mode: Mode,
    /// When the file is tried again (volatile or held).
    retry_at: Instant,
    /// The clock must be at least this (ms since the epoch) for a volatile boot.
    trusted_after_ms: u64,
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

/// The time-based sequence floor: above anything an earlier boot can have used, unless it
/// handed out more than 1,000 sequence numbers per millisecond of wall time.
fn time_floor() -> u64 {
    Timestamp::now().unix_ms().saturating_mul(1000)
}

/// 2026-01-01 in ms since the epoch: a clock below it is not set yet (a box without a
/// real-time clock starts in 1970 until NTP sets it).
const MIN_PLAUSIBLE_MS: u64 = 1_767_225_600_000;

/// When the state file or the buffer's watermark was last written, in ms since the epoch, as
/// far as the disk says: an earlier boot's clock then.
fn last_written_ms(dir: &Path) -> u64 {
    [dir.join("state"), dir.join("buffer").join("watermark")]
        .iter()
        .filter_map(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
        .filter_map(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .max()
        .unwrap_or(0)
}

/// Where the sequence numbers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Reserved on disk ahead of use.
    Durable,
    /// A volatile boot: from the time-based floor, the file retried every [`RETRY`].
    Volatile,
    /// None handed out: the file cannot be written and the clock cannot be trusted for a
    /// volatile boot. Retried every [`RETRY`]; `unread` says the file is still to be read.
    Held { unread: bool },
}

impl SeqState {
    /// Opens the state in `dir`, counts this boot and reserves the first range. `floor` is one
    /// past the highest sequence number known to be used (from the buffer). `fresh` says the data
    /// directory is new, so a missing state file means a first start, not a lost file. Never
    /// fails: a state file that cannot be read or made durable starts a volatile boot, or holds
    /// the sequence numbers back while the clock is not plausible.
    pub fn open(dir: &Path, floor: u64, fresh: bool) -> SeqState {
        let mut state = SeqState {
            path: dir.join("state"),
            boot: 0,
            next: floor,
            reserved: floor,
            floor,
            fresh,
            mode: Mode::Durable,
            retry_at: Instant::now(),
            trusted_after_ms: MIN_PLAUSIBLE_MS.max(last_written_ms(dir)),
        };
        if state.read() {
            state.reserve();
        } else {
            state.cannot_write();
        }
        state
    }

    /// Reads the file: the boot number and where the sequence numbers go on. False when it
    /// cannot be read.
    fn read(&mut self) -> bool {
        let path = &self.path;
        let (boot, reserved) = match fs::read_to_string(path) {
            Ok(text) => match parse(&text) {
                Some(v) => v,
                None => {
                    // Unknown how far an earlier boot got: start past anything it could have used.
                    warn!(path = %path.display(), "state file is damaged; continuing sequence numbers from a time-based floor");
                    (0, time_floor())
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.fresh => (0, 0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                warn!(path = %path.display(), "state file is missing from a used data directory; continuing sequence numbers from a time-based floor");
                (0, time_floor())
            }
            Err(e) => {
                error!(path = %path.display(), error = %e, "cannot read the state file");
                return false;
            }
        };
        self.boot = boot + 1;
        self.next = reserved.max(self.floor);
        self.reserved = self.next;
        true
    }

    /// Reserves the next range on disk; when that fails, goes on with a volatile boot or holds.
    fn reserve(&mut self) {
        let reserved = self.next + RESERVE;
        match self.write(self.boot, reserved) {
            Ok(()) => {
                if self.mode != Mode::Durable {
                    info!(path = %self.path.display(), boot = self.boot, "state file writable again; sequence numbers are reserved on disk again");
                }
                self.mode = Mode::Durable;
                self.reserved = reserved;
            }
            Err(e) => {
                if self.mode == Mode::Durable {
                    error!(error = %e, "cannot reserve sequence numbers on disk");
                }
                self.cannot_write();
            }
        }
    }

    /// The file cannot be read or written: a volatile boot if the clock can be trusted for it,
    /// else hold. Either way the file is tried again in [`RETRY`].
    fn cannot_write(&mut self) {
        self.retry_at = Instant::now() + RETRY;
        let unread = matches!(self.mode, Mode::Held { unread: true })
            || (self.mode == Mode::Durable && self.boot == 0);
        match self.mode {
            Mode::Volatile => {
                // The range is in memory only: a restart does not reuse it (a new boot number,
                // and the time-based floor is far above it), so there is nothing to wait for.
                self.reserved = self.next + RESERVE;
            }
            _ if Timestamp::now().unix_ms() >= self.trusted_after_ms => {
                error!("going on with a volatile boot: a new boot number and sequence numbers from a time-based floor, which a restart cannot repeat");
                self.mode = Mode::Volatile;
                self.boot = Timestamp::now().unix_ms().max(self.boot + 1);
                self.next = self.next.max(time_floor());
                self.reserved = self.next + RESERVE;
            }
            Mode::Held { .. } => self.mode = Mode::Held { unread },
            Mode::Durable => {
                // The clock is before 2026, or before an earlier boot last wrote here: a
                // time-based floor could repeat that boot's numbers.
                error!(clock_ms = Timestamp::now().unix_ms(), trusted_after_ms = self.trusted_after_ms, "the clock is not set (it is before what this disk last saw), so no volatile boot either: holding the pipeline until the state file or the clock can be trusted");
                self.mode = Mode::Held { unread };
            }
        }
    }

    /// Writes the file (temporary file, fsync, rename, directory fsync; in place on a full disk).
    fn write(&self, boot: u64, reserved: u64) -> Result<(), StateError> {
        let tmp = self.path.with_extension("tmp");
        let err = |source| StateError {
            path: self.path.clone(),
            source,
        };
        let mut text = text(boot, reserved);
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
            Ok(()) => Ok(()),
            Err(e) if is_disk_full(&e) && self.path.exists() => {
                let _ = fs::remove_file(&tmp);
                warn!(path = %self.path.display(), "disk full: overwriting the state file in place");
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .open(&self.path)
                    .map_err(err)?;
                f.write_all(text.as_bytes()).map_err(err)?;
                f.sync_all().map_err(err)
            }
            Err(e) => Err(err(e)),
        }
    }

    /// This boot's number (1 for the first start). A volatile boot changes it (see
    /// [`SeqState::is_durable`]), so records take it from here, not once at start.
    pub fn boot(&self) -> u64 {
        self.boot
    }

    /// Whether the sequence numbers handed out are reserved on disk (false during a volatile
    /// boot, while the state file cannot be written).
    pub fn is_durable(&self) -> bool {
        self.mode == Mode::Durable
    }

    /// Whether the next [`SeqState::peek_seq`] goes to the disk (a new range, or a retry of the
    /// file), so a caller on an async runtime can run it where blocking is fine.
    pub fn wants_disk(&self) -> bool {
        match self.mode {
            Mode::Durable => self.next >= self.reserved,
            Mode::Volatile | Mode::Held { .. } => Instant::now() >= self.retry_at,
        }
    }

    /// The next sequence number; reserves a new range when the current one is used up.
    pub fn next_seq(&mut self) -> Result<u64, StateError> {
        let seq = self.peek_seq()?;
        self.next += 1;
        Ok(seq)
    }

    /// The sequence number [`SeqState::next_seq`] will return, without using it up; an error
    /// while the numbers are held (see [`SeqState::open`]).
    pub fn peek_seq(&mut self) -> Result<u64, StateError> {
        if self.wants_disk() {
            if self.mode == (Mode::Held { unread: true }) && !self.read() {
                self.cannot_write();
            } else {
                self.reserve();
            }
        }
        match self.mode {
            Mode::Held { .. } => Err(StateError {
                path: self.path.clone(),
                source: std::io::Error::other(
                    "cannot be written, and the clock cannot be trusted for a volatile boot",
                ),
            }),
            Mode::Durable | Mode::Volatile => Ok(self.next),
        }
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
        let mut s = SeqState::open(dir.path(), 0, true);
        assert_eq!(s.boot(), 1);
        let a = s.next_seq().unwrap();
        let b = s.next_seq().unwrap();
        assert_eq!((a, b), (0, 1));
        drop(s); // a crash: the rest of the range is skipped
        let mut s = SeqState::open(dir.path(), 0, true);
        assert_eq!(s.boot(), 2);
        assert!(s.next_seq().unwrap() >= RESERVE);
    }

    #[test]
    fn the_floor_from_the_buffer_wins_over_a_lost_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SeqState::open(dir.path(), 500, true);
        assert_eq!(s.next_seq().unwrap(), 500);
    }

    #[test]
    fn a_new_range_is_reserved_when_one_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SeqState::open(dir.path(), 0, true);
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
        let mut s = SeqState::open(dir.path(), 0, false);
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
        let mut s = SeqState::open(dir.path(), 0, true);
        assert!(s.next_seq().unwrap() > 1_000_000_000);
    }

    #[test]
    fn a_state_file_that_cannot_be_read_starts_a_volatile_boot_that_turns_durable_once_it_can() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading and replacing it both fail.
        fs::create_dir(dir.path().join("state")).unwrap();
        let mut s = SeqState::open(dir.path(), 0, false);
        assert!(!s.is_durable());
        let boot = s.boot();
        assert!(boot > 1_000_000_000, "a time-based boot number: {boot}");
        let first = s.next_seq().unwrap();
        assert!(first > 1_000_000_000);
        assert_eq!(
            s.next_seq().unwrap(),
            first + 1,
            "contiguous within the boot"
        );

        fs::remove_dir(dir.path().join("state")).unwrap();
        std::thread::sleep(RETRY);
        assert_eq!(s.next_seq().unwrap(), first + 2);
        assert!(s.is_durable());
        assert_eq!(s.boot(), boot, "the boot keeps its number once durable");
        let again = SeqState::open(dir.path(), 0, false);
        assert_eq!(again.boot(), boot + 1);
        assert!(again.next >= first + 3);
    }

    #[test]
    fn no_volatile_boot_while_the_clock_is_behind_what_the_disk_last_saw() {
        let dir = tempfile::tempdir().unwrap();
        // Unreadable, and written (by the disk's account) a moment from now: the clock is
        // behind an earlier boot's, so a time-based floor could repeat its numbers.
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        let ahead = std::time::SystemTime::now() + Duration::from_millis(1500);
        File::open(&state).unwrap().set_modified(ahead).unwrap();
        let mut s = SeqState::open(dir.path(), 0, false);
        assert!(s.peek_seq().is_err(), "held");
        assert!(s.next_seq().is_err());
        // The clock catches up (NTP has set it): a volatile boot.
        std::thread::sleep(Duration::from_millis(1600));
        let first = s.next_seq().unwrap();
        assert!(!s.is_durable());
        assert!(first >= 1000 * (ahead.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64));
        assert_eq!(s.next_seq().unwrap(), first + 1);
    }

    #[test]
    fn a_reservation_failing_mid_run_goes_on_with_a_boot_and_seqs_a_restart_cannot_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SeqState::open(dir.path(), 0, true);
        let mut used = Vec::new();
        for _ in 0..RESERVE {
            used.push((s.boot(), s.next_seq().unwrap()));
        }
        // The temporary file cannot be made: the next reservation fails.
        fs::create_dir(dir.path().join("state.tmp")).unwrap();
        for _ in 0..10 {
            used.push((s.boot(), s.next_seq().unwrap()));
        }
        assert!(!s.is_durable());
        assert_ne!(used[0].0, used[used.len() - 1].0, "a new boot number");
        let volatile: Vec<u64> = used[RESERVE as usize..].iter().map(|u| u.1).collect();
        assert!(volatile.windows(2).all(|w| w[1] == w[0] + 1));
        assert!(
            volatile[0] > used[RESERVE as usize - 1].1,
            "sequence numbers only grow"
        );

        // A crash now, and the disk works again: the restart reads the file as the first range
        // left it.
        fs::remove_dir(dir.path().join("state.tmp")).unwrap();
        let mut r = SeqState::open(dir.path(), 0, true);
        assert!(r.is_durable());
        for _ in 0..1000 {
            let next = (r.boot(), r.next_seq().unwrap());
            assert!(
                !used.contains(&next),
                "{next:?} was used before the restart"
            );
            assert!(!volatile.contains(&next.1));
        }
    }
}
