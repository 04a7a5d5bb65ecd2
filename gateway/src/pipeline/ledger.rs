//! The ledger of records that are neither acknowledged nor committed: the in-memory half of the
//! durability contract. Pure state, no I/O; the writer, the publisher and the committer share it
//! behind a mutex held only for these short calls.
//!
//! A record enters when the writer creates it. It leaves when the broker acknowledges it (then
//! nothing ever touches the disk for it) or when the committer takes it to write it to disk; a
//! record acknowledged while its commit is running is deleted from disk right after the commit.
//! An acknowledgement for a record the ledger does not hold means the record is on disk.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::buffer::Record;

/// What an acknowledgement means for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The record was only in memory: nothing to do on disk.
    Forgotten,
    /// The record is being committed: it is deleted once the commit is done.
    AfterCommit,
    /// The record is on disk: delete it.
    Delete,
}

#[derive(Debug)]
struct Pending {
    record: Arc<Record>,
    read_at: Instant,
}

/// Records not yet acknowledged nor committed, and deletions owed to the disk.
#[derive(Debug, Default)]
pub struct Ledger {
    pending: BTreeMap<u64, Pending>,
    /// Stored bytes of the pending records.
    pending_bytes: u64,
    committing: BTreeSet<u64>,
    acked_while_committing: Vec<u64>,
    deletes: HashSet<u64>,
}

impl Ledger {
    /// Adds a new record, read at `read_at`.
    pub fn insert(&mut self, record: Arc<Record>, read_at: Instant) {
        self.pending_bytes += record.stored_len() as u64;
        if let Some(old) = self.pending.insert(record.seq, Pending { record, read_at }) {
            self.pending_bytes -= old.record.stored_len() as u64;
        }
    }

    fn remove_pending(&mut self, seq: u64) -> Option<Pending> {
        let p = self.pending.remove(&seq)?;
        self.pending_bytes -= p.record.stored_len() as u64;
        Some(p)
    }

    /// Records a PUBACK for `seq`.
    pub fn ack(&mut self, seq: u64) -> AckOutcome {
        if self.remove_pending(seq).is_some() {
            AckOutcome::Forgotten
        } else if self.committing.contains(&seq) {
            self.acked_while_committing.push(seq);
            AckOutcome::AfterCommit
        } else {
            self.deletes.insert(seq);
            AckOutcome::Delete
        }
    }

    /// Takes the records read at least `min_age` before `now` for a commit.
    pub fn take_due(&mut self, now: Instant, min_age: Duration) -> Vec<Arc<Record>> {
        // Everything up to the newest due record: drivers stamp `read_at` before their batches
        // meet in the channel, so read times are not quite in `seq` order, and commits that take
        // a prefix of the pending records never interleave their sequence numbers on disk.
        let Some(last) = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.read_at) >= min_age)
            .map(|(s, _)| *s)
            .next_back()
        else {
            return Vec::new();
        };
        let due: Vec<u64> = self.pending.range(..=last).map(|(s, _)| *s).collect();
        self.take(&due)
    }

    /// Takes every pending record (shutdown: whatever is unacknowledged is committed).
    pub fn take_all(&mut self) -> Vec<Arc<Record>> {
        let all: Vec<u64> = self.pending.keys().copied().collect();
        self.take(&all)
    }

    fn take(&mut self, seqs: &[u64]) -> Vec<Arc<Record>> {
        let mut out = Vec::with_capacity(seqs.len());
        for s in seqs {
            if let Some(p) = self.remove_pending(*s) {
                self.committing.insert(*s);
                out.push(p.record);
            }
        }
        out
    }

    /// The commit of these records is durable; returns those acknowledged meanwhile (delete them).
    pub fn committed(&mut self, seqs: impl IntoIterator<Item = u64>) -> Vec<u64> {
        for s in seqs {
            self.committing.remove(&s);
        }
        std::mem::take(&mut self.acked_while_committing)
    }

    /// The commit failed: the records go back to pending so the next commit retries them.
    pub fn commit_failed(&mut self, records: Vec<Arc<Record>>, read_at: Instant) {
        for r in records {
            self.committing.remove(&r.seq);
            if let Some(i) = self.acked_while_committing.iter().position(|s| *s == r.seq) {
                // Acknowledged while the failed commit ran: nothing is owed any more.
                self.acked_while_committing.swap_remove(i);
                continue;
            }
            self.insert(r, read_at);
        }
    }

    /// Drops the oldest pending records until at most `max_bytes` remain (the disk is failing
    /// and memory is the only place left: the newest data is kept). Returns the records dropped.
    pub fn trim_pending(&mut self, max_bytes: u64) -> u64 {
        let mut dropped = 0;
        while self.pending_bytes > max_bytes {
            let Some(&oldest) = self.pending.keys().next() else {
                break;
            };
            self.remove_pending(oldest);
            dropped += 1;
        }
        dropped
    }

    /// Stored bytes of the records held in memory, not yet acknowledged nor committed.
    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// Drops records without committing them (buffer full, `drop_newest`).
    pub fn discard(&mut self, seqs: impl IntoIterator<Item = u64>) {
        for s in seqs {
            self.committing.remove(&s);
        }
    }

    /// Takes the deletions owed to the disk.
    pub fn take_deletes(&mut self) -> Vec<u64> {
        let mut d: Vec<u64> = self.deletes.drain().collect();
        d.sort_unstable();
        d
    }

    /// Whether `seq` was acknowledged but is still on disk (its delete is pending), so a replay
    /// must not send it again.
    pub fn is_acknowledged(&self, seq: u64) -> bool {
        self.deletes.contains(&seq) || self.acked_while_committing.contains(&seq)
    }

    /// Whether `seq` is held in memory only: neither acknowledged nor committed (nor being
    /// committed).
    pub fn is_pending(&self, seq: u64) -> bool {
        self.pending.contains_key(&seq)
    }

    /// Pending records (held in memory only).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn rec(seq: u64) -> Arc<Record> {
        Arc::new(Record {
            seq,
            topic: "t".into(),
            payload: Bytes::new(),
            flag_offset: 0,
        })
    }

    #[test]
    fn trimming_drops_the_oldest_pending_records_and_keeps_the_byte_count() {
        let mut l = Ledger::default();
        let t0 = Instant::now();
        for seq in 1..=4 {
            l.insert(rec(seq), t0);
        }
        let each = rec(1).stored_len() as u64;
        assert_eq!(l.pending_bytes(), 4 * each);
        assert_eq!(l.ack(2), AckOutcome::Forgotten);
        assert_eq!(l.pending_bytes(), 3 * each);
        assert_eq!(l.trim_pending(2 * each), 1);
        let left: Vec<u64> = l.take_all().iter().map(|r| r.seq).collect();
        assert_eq!(left, vec![3, 4], "the oldest went first");
        assert_eq!(l.pending_bytes(), 0);
    }

    #[test]
    fn a_record_acked_in_time_never_reaches_the_disk() {
        let mut l = Ledger::default();
        let t0 = Instant::now();
        l.insert(rec(1), t0);
        assert_eq!(l.ack(1), AckOutcome::Forgotten);
        assert!(l
            .take_due(t0 + Duration::from_secs(1), Duration::ZERO)
            .is_empty());
        assert!(l.take_deletes().is_empty());
    }

    #[test]
    fn only_records_older_than_the_min_age_are_due() {
        let mut l = Ledger::default();
        let t0 = Instant::now();
        l.insert(rec(1), t0);
        l.insert(rec(2), t0 + Duration::from_millis(80));
        let due = l.take_due(t0 + Duration::from_millis(100), Duration::from_millis(50));
        assert_eq!(due.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1]);
        assert_eq!(l.pending_len(), 1);
    }

    #[test]
    fn an_ack_during_a_commit_deletes_after_it() {
        let mut l = Ledger::default();
        let t0 = Instant::now();
        l.insert(rec(1), t0);
        let due = l.take_due(t0, Duration::ZERO);
        assert_eq!(l.ack(1), AckOutcome::AfterCommit);
        assert_eq!(l.committed(due.iter().map(|r| r.seq)), vec![1]);
        assert_eq!(l.ack(1), AckOutcome::Delete, "later acks refer to the disk");
        assert!(
            l.is_acknowledged(1),
            "a replay must not resend it before the delete"
        );
        assert_eq!(l.take_deletes(), vec![1]);
        assert!(!l.is_acknowledged(1));
    }

    #[test]
    fn a_failed_commit_is_retried_unless_acked_meanwhile() {
        let mut l = Ledger::default();
        let t0 = Instant::now();
        l.insert(rec(1), t0);
        l.insert(rec(2), t0);
        let due = l.take_all();
        l.ack(2);
        l.commit_failed(due, t0);
        assert_eq!(l.pending_len(), 1);
        assert_eq!(l.take_all()[0].seq, 1);
    }
}
