//! One generation's bookkeeping: what it holds (chunks, counts, sequence range, commit mark and
//! times), whether its database is open, and where it is in its life ([`State`]).
//!
//! A generation's life:
//! ```text
//!   created ──> Accepting ──begin_commit──> Committing ──durable──> Accepting
//!                                              │ the store failed ──> Draining
//!                                              │ our fsync failed ──> Frozen
//!   found on open ──> Draining
//! ```
//! What each state allows (the methods of [`State`] say each, the tests below check each):
//! ```text
//!               commit   delete   seal   reopen   be deleted
//!   Accepting    yes      yes      yes    yes      yes, once empty
//!   Committing   no       yes      no     yes      no
//!   Draining     no       yes      yes    yes      yes, once empty
//!   Frozen       no       no       no     no       yes, once empty
//! ```
//! ("delete" is an acknowledged chunk removed from its database; "be deleted" is the whole
//! generation going, or being evicted with what it holds.)
//!
//! Invariants of the states:
//! - Only an `Accepting` generation takes a commit, and commits go to the newest one only (an
//!   older one still `Accepting` simply gets none). One commit at a time: `begin_commit` takes
//!   an `Accepting` one to `Committing`, and the commit's end takes it back to `Accepting`, or on
//!   a failure to `Draining` or `Frozen`, which are final.
//! - A `Committing` one is being written without the buffer's lock: it is neither sealed nor
//!   deleted (nor evicted) until the commit ends. Reads and deletes of what it already holds go
//!   on.
//! - `Draining` (found at start, or the store failed a write into it: the store holds such an
//!   error until the database is opened again) takes no commits; deletes, seals and reopens go
//!   on as usual.
//! - `Frozen` (an fsync of it failed) takes no write at all, deletes included: Linux may drop
//!   the pages whose writeback failed, leaving a hole in the store's log, and its recovery
//!   stops at a hole, so anything written after it (a delete that makes the store move committed
//!   pages while it cleans a segment) could take committed records with it. So it is never
//!   sealed (a sync is a write) nor reopened (opening writes), it keeps its handle after a
//!   failed read, and close does not sync it. Its acknowledgements are kept in memory only, and
//!   it is deleted whole once drained (a restart before that sends what it holds again, as
//!   re-sends).
//! - Any state but `Committing` may be deleted once it holds no record.
//! - The counts (`records`, `bytes`) are those of the tracked chunks: a chunk is tracked only
//!   once its commit is durable, and untracked when its last record goes.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::debug;

use super::chunk::{self, Live};
use super::store::{self, Entry, Store};
use super::{io_err, BufferError};

/// Commit times kept per generation for the oldest record's age; past this, one a second.
const MAX_COMMIT_TIMES: usize = 1024;

/// Where a generation is in its life (see the module comment for what each state allows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Takes commits while it is the newest generation.
    Accepting,
    /// A commit is writing into it without the buffer's lock.
    Committing,
    /// Takes no more commits: found at start (commits go to a fresh generation after a start),
    /// or the store failed a write into it.
    Draining,
    /// An fsync of it failed: nothing at all is written to it any more.
    Frozen,
}

/// How a commit into a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CommitEnd {
    /// Written and fsynced.
    Durable,
    /// The store failed the write (or its flush, or panicked): it holds that error until the
    /// database is opened again.
    StoreFailed,
    /// The store's write went through, our fsync of its files failed.
    SyncFailed,
}

impl CommitEnd {
    /// How a commit that failed with `e` ended.
    pub(super) fn of(e: &BufferError) -> CommitEnd {
        match e {
            BufferError::Io { .. } => CommitEnd::SyncFailed,
            _ => CommitEnd::StoreFailed,
        }
    }
}

impl State {
    /// Whether a commit may go into it (if it is the newest).
    pub(super) fn takes_commits(self) -> bool {
        self == State::Accepting
    }

    /// Whether a delete is written to it (an acknowledged chunk removed from its database).
    pub(super) fn takes_deletes(self) -> bool {
        self != State::Frozen
    }

    /// Whether it may be sealed: synced and closed.
    pub(super) fn may_seal(self) -> bool {
        matches!(self, State::Accepting | State::Draining)
    }

    /// Whether its database may be opened again once closed.
    pub(super) fn may_reopen(self) -> bool {
        self != State::Frozen
    }

    /// Whether it may be deleted, once it holds no record (or evicted with what it holds).
    pub(super) fn may_delete(self) -> bool {
        self != State::Committing
    }

    /// Whether it keeps its open handle after a failed read or write.
    pub(super) fn keeps_handle_on_failure(self) -> bool {
        self == State::Frozen
    }

    /// Whether closing the buffer syncs it.
    pub(super) fn syncs_on_close(self) -> bool {
        self != State::Frozen
    }

    /// The state a commit puts it in while it writes; `None` if it takes no commit.
    pub(super) fn begin_commit(self) -> Option<State> {
        self.takes_commits().then_some(State::Committing)
    }

    /// The state after a commit into it ended (a final state stays as it is).
    pub(super) fn end_commit(self, end: CommitEnd) -> State {
        match (self, end) {
            (State::Draining | State::Frozen, _) => self,
            (_, CommitEnd::Durable) => State::Accepting,
            (_, CommitEnd::StoreFailed) => State::Draining,
            (_, CommitEnd::SyncFailed) => State::Frozen,
        }
    }
}

/// A chunk on disk.
#[derive(Debug)]
pub(super) struct Stored {
    /// Its records not yet acknowledged.
    pub(super) live: Live,
    /// The bytes it takes (key and value).
    pub(super) bytes: u64,
}

/// What one durable commit put into a generation.
#[derive(Debug)]
pub(super) struct Committed {
    /// The generation's new commit mark.
    pub(super) mark: u64,
    /// When, unix ms.
    pub(super) now: u64,
    /// Records and bytes written.
    pub(super) records: u64,
    pub(super) bytes: u64,
    /// The chunks written, by key.
    pub(super) chunks: Vec<(u64, Stored)>,
}

/// What taking one sequence number out of a generation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Taken {
    /// It was not there (not in a tracked chunk, or acknowledged already).
    Absent,
    /// It was there; its chunk still holds others.
    Record,
    /// It was the last one of its chunk, which is untracked now: its key and the bytes it took.
    LastOfChunk { key: u64, bytes: u64 },
}

/// What scanning one generation found.
#[derive(Debug, Default)]
pub(super) struct Scanned {
    pub(super) records: u64,
    pub(super) bytes: u64,
    pub(super) damaged: u64,
    pub(super) last_seq: Option<u64>,
}

/// One database of the buffer. Only the newest generation, the oldest one holding records
/// (the next to replay), the one a replay reads and frozen ones are kept open; the others are
/// sealed: synced and closed, so the store's memory for them is given back (it keeps what it
/// wrote in memory while open), and opened again only when a replay or an acknowledgement
/// reaches them.
#[derive(Debug)]
pub(super) struct Generation {
    pub(super) id: u64,
    pub(super) dir: PathBuf,
    /// Shared with a commit in progress, which writes and syncs without the buffer's lock.
    pub(super) open: Option<Arc<Store>>,
    /// Lowest and highest sequence number ever put into it: routes deletes and reads.
    pub(super) seqs: Option<(u64, u64)>,
    /// Records and stored bytes in it now.
    pub(super) records: u64,
    pub(super) bytes: u64,
    /// Bytes committed into it since it was created or opened.
    pub(super) written: u64,
    /// Its commit mark: the highest sequence number committed into it, if any.
    pub(super) mark: Option<u64>,
    /// (highest sequence number, unix ms) of its commits, oldest first: the oldest record's
    /// age. A generation found on open has one entry, its first commit's time.
    times: VecDeque<(u64, u64)>,
    /// Its chunks by key (first sequence number): the records not yet acknowledged in each, and
    /// the bytes the chunk takes (key and value). Only chunks with such records are here.
    pub(super) chunks: BTreeMap<u64, Stored>,
    pub(super) state: State,
}

impl Generation {
    /// A generation with nothing counted, taking commits, over the database `open` (if open).
    fn new(id: u64, dir: PathBuf, open: Option<Arc<Store>>) -> Generation {
        Generation {
            id,
            dir,
            open,
            seqs: None,
            records: 0,
            bytes: 0,
            written: 0,
            mark: None,
            times: VecDeque::new(),
            chunks: BTreeMap::new(),
            state: State::Accepting,
        }
    }

    /// Opens (creating it if needed) generation `id` under the buffer directory `dir`, with
    /// nothing counted yet.
    pub(super) fn open(dir: &Path, id: u64) -> Result<Generation, BufferError> {
        let path = store::gen_dir(dir, id);
        let open = Store::open(&path)?;
        Ok(Generation::new(id, path, Some(Arc::new(open))))
    }

    /// Opens generation `id` and reads what it holds, dropping damaged records (a chunk left
    /// with none is deleted), then seals it: it drains, commits go to a fresh one.
    pub(super) fn load(dir: &Path, id: u64) -> Result<(Generation, Scanned), BufferError> {
        let path = store::gen_dir(dir, id);
        if !path.is_dir() {
            // Loading never makes a generation: an empty one would pass for the one that is gone.
            return Err(super::io_err(
                &path,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        let mut g = Generation::open(dir, id)?;
        let mut found = Scanned::default();
        let mut born_ms = None;
        g.store()?.scan(|entry| match entry {
            Entry::Mark(mark) => {
                g.mark = mark;
                Ok(true)
            }
            Entry::Born(t) => {
                born_ms = t;
                Ok(true)
            }
            Entry::Other => Ok(false),
            Entry::Chunk(key, value) => {
                if chunk::from_a_newer_version(value) {
                    // After a downgrade: set the generation aside whole rather than drop it.
                    return Err(BufferError::NewerVersion(g.dir.clone()));
                }
                let (records, damaged) = chunk::decode(value);
                found.damaged += damaged;
                let mut live = Live::new(key);
                for r in &records {
                    // A record outside its chunk's span is not where it belongs: damaged.
                    if live.insert(r.seq) {
                        found.last_seq = found.last_seq.max(Some(r.seq));
                    } else {
                        found.damaged += 1;
                    }
                }
                if live.is_empty() {
                    return Ok(false);
                }
                found.records += live.len();
                let bytes = 8 + value.len() as u64;
                found.bytes += bytes;
                g.chunks.insert(key, Stored { live, bytes });
                Ok(true)
            }
        })?;
        g.seqs = g.first_live().zip(found.last_seq);
        g.records = found.records;
        g.bytes = found.bytes;
        if let Some(t) = born_ms.zip(found.last_seq) {
            g.times.push_back((t.1, t.0));
        }
        g.seal()?;
        g.state = State::Draining;
        Ok((g, found))
    }

    /// Deletes its directory (its database closed first) from the buffer directory `dir`.
    pub(super) fn delete(self, dir: &Path) -> Result<(), BufferError> {
        let Generation {
            id,
            dir: path,
            open,
            ..
        } = self;
        // The store's background threads hold the files until the last handle is gone.
        drop(open);
        store::delete_generation(dir, id, &path)
    }

    /// A handle on its database, opening it if it is sealed.
    pub(super) fn store(&mut self) -> Result<Arc<Store>, BufferError> {
        if let Some(open) = &self.open {
            return Ok(open.clone());
        }
        if !self.state.may_reopen() {
            // Opening writes (the store pads its file, fsyncs): never again into a frozen one.
            return Err(io_err(
                &self.dir,
                std::io::Error::other("frozen and closed"),
            ));
        }
        let open = Arc::new(Store::open(&self.dir)?);
        self.open = Some(open.clone());
        Ok(open)
    }

    /// Drops the handle after a failed write or read: the store keeps a failed write (a full
    /// disk, an I/O error) as an error of the whole database until it is opened again, so the
    /// next use reopens it, and commits resume once the disk takes writes again.
    pub(super) fn failed(&mut self) {
        // A frozen one keeps its handle: it may not be opened again.
        if !self.state.keeps_handle_on_failure() && self.open.take().is_some() {
            debug!(
                generation = self.id,
                "buffer generation closed after a failed write; the next use reopens it"
            );
        }
    }

    /// Syncs and closes the database (never a frozen one: see `State::may_seal`).
    pub(super) fn seal(&mut self) -> Result<(), BufferError> {
        if let Some(o) = &self.open {
            o.sync()?;
        }
        self.open = None;
        Ok(())
    }

    /// Marks a commit into it as started; `false` (and no change) if it takes no commits.
    pub(super) fn begin_commit(&mut self) -> bool {
        match self.state.begin_commit() {
            Some(state) => {
                self.state = state;
                true
            }
            None => false,
        }
    }

    /// Ends a commit of the records `lo..=hi` that failed with `e`: its chunks are not tracked
    /// (never read nor counted), and it takes no more commits. Returns how it ended.
    pub(super) fn commit_failed(&mut self, (lo, hi): (u64, u64), e: &BufferError) -> CommitEnd {
        self.widen(lo, hi);
        let end = CommitEnd::of(e);
        self.state = self.state.end_commit(end);
        if end == CommitEnd::StoreFailed {
            // The store holds the error until the database is opened again.
            self.failed();
        }
        end
    }

    /// Ends a durable commit of the records `lo..=hi`: its chunks are tracked and counted.
    pub(super) fn commit_durable(&mut self, (lo, hi): (u64, u64), c: Committed) {
        self.widen(lo, hi);
        self.state = self.state.end_commit(CommitEnd::Durable);
        self.mark = Some(c.mark);
        self.written += c.bytes;
        // A record is in one successful commit only (the chunks of a failed one are never
        // tracked), so no key is taken twice.
        self.chunks.extend(c.chunks);
        let spaced = self.times.back().is_none_or(|&(_, t)| c.now >= t + 1000);
        if self.times.len() < MAX_COMMIT_TIMES || spaced {
            self.times.push_back((c.mark, c.now));
        } else if let Some(last) = self.times.back_mut() {
            // Too many commits to keep each: the newest entry covers this one too.
            last.0 = c.mark;
        }
        self.records += c.records;
        self.bytes += c.bytes;
    }

    fn widen(&mut self, lo: u64, hi: u64) {
        self.seqs = Some(self.seqs.map_or((lo, hi), |(a, b)| (a.min(lo), b.max(hi))));
    }

    /// Takes `seq` out of the records it holds (acknowledged, or unreadable); a chunk left
    /// with none is untracked (deleting it from the database is the caller's).
    pub(super) fn take(&mut self, seq: u64) -> Taken {
        let Some(key) = self.chunk_of(seq) else {
            return Taken::Absent;
        };
        let Some(stored) = self.chunks.get_mut(&key) else {
            return Taken::Absent;
        };
        if !stored.live.remove(seq) {
            return Taken::Absent;
        }
        self.records = self.records.saturating_sub(1);
        if !stored.live.is_empty() {
            return Taken::Record;
        }
        let bytes = stored.bytes;
        self.chunks.remove(&key);
        self.bytes = self.bytes.saturating_sub(bytes);
        Taken::LastOfChunk { key, bytes }
    }

    /// When the oldest record it holds was committed, unix ms (forgetting the times of commits
    /// acknowledged in full).
    pub(super) fn oldest_commit_ms(&mut self) -> Option<u64> {
        let first = self.first_live()?;
        while self.times.len() > 1 && self.times.front().is_some_and(|&(hi, _)| hi < first) {
            self.times.pop_front();
        }
        self.times.front().map(|&(_, at)| at)
    }

    /// The key of the chunk that may hold `seq`.
    pub(super) fn chunk_of(&self, seq: u64) -> Option<u64> {
        self.chunks.range(..=seq).next_back().map(|(&k, _)| k)
    }

    /// The lowest sequence number not yet acknowledged in it.
    pub(super) fn first_live(&self) -> Option<u64> {
        self.chunks.values().find_map(|c| c.live.first())
    }

    /// Whether `seq` is within the range ever put into it.
    pub(super) fn may_hold(&self, seq: u64) -> bool {
        self.seqs.is_some_and(|(lo, hi)| lo <= seq && seq <= hi)
    }

    /// Whether the range ever put into it meets `from..below`.
    pub(super) fn overlaps(&self, from: u64, below: u64) -> bool {
        self.seqs.is_some_and(|(lo, hi)| lo < below && from <= hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [State; 4] = [
        State::Accepting,
        State::Committing,
        State::Draining,
        State::Frozen,
    ];

    fn generation() -> Generation {
        Generation::new(1, PathBuf::from("gen-1"), None)
    }

    fn io() -> BufferError {
        io_err(Path::new("gen-1"), std::io::Error::other("fsync failed"))
    }

    fn store_failed() -> BufferError {
        BufferError::DbIo {
            path: PathBuf::from("gen-1"),
            source: std::io::Error::other("no space left on device"),
        }
    }

    /// A durable commit of the records `seqs` (one chunk) at `now`.
    fn commit(g: &mut Generation, seqs: std::ops::Range<u64>, now: u64) {
        assert!(g.begin_commit());
        let mut live = Live::new(seqs.start);
        for s in seqs.clone() {
            live.insert(s);
        }
        let records = live.len();
        let span = (seqs.start, seqs.end - 1);
        g.commit_durable(
            span,
            Committed {
                mark: span.1,
                now,
                records,
                bytes: 100,
                chunks: vec![(seqs.start, Stored { live, bytes: 100 })],
            },
        );
    }

    #[test]
    fn only_an_accepting_generation_takes_a_commit() {
        for s in ALL {
            assert_eq!(s.takes_commits(), s == State::Accepting, "{s:?}");
            assert_eq!(
                s.begin_commit(),
                (s == State::Accepting).then_some(State::Committing),
                "{s:?}"
            );
        }
    }

    #[test]
    fn a_committing_generation_is_neither_sealed_nor_deleted() {
        assert!(!State::Committing.may_seal());
        assert!(!State::Committing.may_delete());
        assert!(!State::Committing.takes_commits(), "one commit at a time");
    }

    #[test]
    fn a_durable_commit_makes_it_take_commits_again() {
        assert_eq!(
            State::Committing.end_commit(CommitEnd::Durable),
            State::Accepting
        );
    }

    #[test]
    fn a_write_the_store_failed_makes_it_drain_with_deletes_seals_and_reopens_as_usual() {
        let s = State::Committing.end_commit(CommitEnd::StoreFailed);
        assert_eq!(s, State::Draining);
        assert!(!s.takes_commits());
        assert!(s.takes_deletes() && s.may_seal() && s.may_reopen() && s.may_delete());
        assert!(s.syncs_on_close());
        assert!(!s.keeps_handle_on_failure(), "the next use reopens it");
    }

    #[test]
    fn a_failed_fsync_freezes_it_against_every_write() {
        let s = State::Committing.end_commit(CommitEnd::SyncFailed);
        assert_eq!(s, State::Frozen);
        assert!(!s.takes_commits());
        assert!(!s.takes_deletes(), "not even a delete");
        assert!(!s.may_seal(), "a seal syncs");
        assert!(!s.may_reopen(), "opening writes");
        assert!(!s.syncs_on_close());
        assert!(s.keeps_handle_on_failure());
    }

    #[test]
    fn a_frozen_generation_is_still_deleted_whole_once_drained() {
        assert!(State::Frozen.may_delete());
    }

    #[test]
    fn draining_and_frozen_are_final() {
        for end in [
            CommitEnd::Durable,
            CommitEnd::StoreFailed,
            CommitEnd::SyncFailed,
        ] {
            assert_eq!(State::Draining.end_commit(end), State::Draining);
            assert_eq!(State::Frozen.end_commit(end), State::Frozen);
        }
    }

    #[test]
    fn a_generation_taking_commits_may_be_sealed_reopened_and_deleted() {
        let s = State::Accepting;
        assert!(s.may_seal() && s.may_reopen() && s.may_delete() && s.takes_deletes());
    }

    #[test]
    fn our_own_fsync_failing_freezes_and_the_store_failing_drains() {
        assert_eq!(CommitEnd::of(&io()), CommitEnd::SyncFailed);
        assert_eq!(CommitEnd::of(&store_failed()), CommitEnd::StoreFailed);
        assert_eq!(
            CommitEnd::of(&BufferError::Panicked(PathBuf::from("gen-1"))),
            CommitEnd::StoreFailed
        );
    }

    #[test]
    fn the_states_allow_what_the_module_comment_says() {
        use State::*;
        // (state, commit, delete, seal, reopen, be deleted)
        let table = [
            (Accepting, true, true, true, true, true),
            (Committing, false, true, false, true, false),
            (Draining, false, true, true, true, true),
            (Frozen, false, false, false, false, true),
        ];
        for (s, commit, delete, seal, reopen, deleted) in table {
            assert_eq!(
                (
                    s.takes_commits(),
                    s.takes_deletes(),
                    s.may_seal(),
                    s.may_reopen(),
                    s.may_delete()
                ),
                (commit, delete, seal, reopen, deleted),
                "{s:?}"
            );
        }
    }

    #[test]
    fn a_new_generation_takes_commits_and_counts_nothing() {
        let g = generation();
        assert_eq!(g.state, State::Accepting);
        assert_eq!((g.records, g.bytes, g.mark, g.seqs), (0, 0, None, None));
    }

    #[test]
    fn a_durable_commit_is_tracked_counted_and_marked() {
        let mut g = generation();
        commit(&mut g, 10..20, 1_000);
        assert_eq!(g.state, State::Accepting);
        assert_eq!((g.records, g.bytes, g.written), (10, 100, 100));
        assert_eq!(g.mark, Some(19));
        assert_eq!(g.seqs, Some((10, 19)));
        assert_eq!(g.first_live(), Some(10));
        assert!(g.may_hold(15) && !g.may_hold(20));
        assert!(g.overlaps(0, 11) && !g.overlaps(0, 10) && !g.overlaps(20, 30));
    }

    #[test]
    fn a_failed_commit_is_neither_tracked_nor_counted_but_widens_the_range() {
        let mut g = generation();
        commit(&mut g, 0..10, 1_000);
        assert!(g.begin_commit());
        assert_eq!(g.commit_failed((10, 19), &io()), CommitEnd::SyncFailed);
        assert_eq!(g.state, State::Frozen);
        assert_eq!((g.records, g.mark), (10, Some(9)));
        assert_eq!(
            g.seqs,
            Some((0, 19)),
            "a restart may find the batch after all"
        );
        assert_eq!(g.take(15), Taken::Absent);
    }

    #[test]
    fn a_generation_whose_store_failed_a_write_takes_no_more_commits() {
        let mut g = generation();
        assert!(g.begin_commit());
        assert_eq!(
            g.commit_failed((0, 9), &store_failed()),
            CommitEnd::StoreFailed
        );
        assert_eq!(g.state, State::Draining);
        assert!(!g.begin_commit());
        assert_eq!(g.state, State::Draining);
    }

    #[test]
    fn a_frozen_generation_is_not_reopened_once_its_handle_is_gone() {
        let mut g = generation();
        g.state = State::Frozen;
        let e = g.store().expect_err("a frozen generation without a handle");
        assert!(e.to_string().contains("frozen and closed"), "{e}");
    }

    #[test]
    fn taking_records_untracks_a_chunk_with_its_last_one() {
        let mut g = generation();
        commit(&mut g, 0..3, 1_000);
        assert_eq!(g.take(1), Taken::Record);
        assert_eq!(g.take(1), Taken::Absent, "taken once");
        assert_eq!(g.take(7), Taken::Absent, "never there");
        assert_eq!(g.take(0), Taken::Record);
        assert_eq!(g.records, 1);
        assert_eq!(g.take(2), Taken::LastOfChunk { key: 0, bytes: 100 });
        assert_eq!((g.records, g.bytes), (0, 0));
        assert!(g.chunks.is_empty());
        assert_eq!(g.first_live(), None);
    }

    #[test]
    fn the_oldest_commit_time_follows_the_oldest_record_held() {
        let mut g = generation();
        commit(&mut g, 0..2, 1_000);
        commit(&mut g, 2..4, 2_000);
        assert_eq!(g.oldest_commit_ms(), Some(1_000));
        g.take(0);
        assert_eq!(g.oldest_commit_ms(), Some(1_000), "1 is still held");
        g.take(1);
        assert_eq!(g.oldest_commit_ms(), Some(2_000));
        g.take(2);
        g.take(3);
        assert_eq!(g.oldest_commit_ms(), None);
    }

    #[test]
    fn past_its_limit_a_commit_time_is_kept_once_a_second() {
        let mut g = generation();
        for i in 0..MAX_COMMIT_TIMES as u64 + 10 {
            commit(&mut g, 2 * i..2 * i + 2, 5_000);
        }
        assert_eq!(g.times.len(), MAX_COMMIT_TIMES);
        assert_eq!(
            g.times.back(),
            Some(&(2 * MAX_COMMIT_TIMES as u64 + 19, 5_000))
        );
        commit(&mut g, 10_000..10_002, 6_000);
        assert_eq!(g.times.len(), MAX_COMMIT_TIMES + 1);
    }
}
