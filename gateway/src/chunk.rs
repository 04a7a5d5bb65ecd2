//! A chunk: records committed together, stored as one value in the disk buffer, and the set of
//! its records not yet acknowledged.
//!
//! sled rewrites a tree node whenever an entry in it changes, and a node holds many entries: a
//! value per record cost about 5 bytes written per byte of payload (measured), one value per
//! commit about 3.4. So the records of a commit go into chunks of at most [`MAX_RECORDS`]
//! records and [`MAX_BYTES`] bytes, keyed by their first sequence number; a chunk is deleted
//! once every record in it is acknowledged (or evicted). Which records of a chunk are still
//! unacknowledged is kept in memory only: after a restart a partly acknowledged chunk is sent
//! again whole, which the cloud de-duplicates by `seq` like any re-send.
//!
//! Format: `[0xC1][record count, u32][(record length, u32)(record)]...`, each record in its own
//! checksummed form ([`Record::to_bytes`]), so a damaged record is dropped alone. A value in
//! the form of a single record is a value from before chunks and reads as a chunk of one.

use std::sync::Arc;

use crate::record::Record;

/// First byte of a chunk (a single record starts with its version, 1).
const CHUNK_VERSION: u8 = 0xC1;
/// Records in one chunk at most: about one replay step, so a replay reads few chunks twice.
pub const MAX_RECORDS: usize = 64;
/// Stored bytes in one chunk at most (a larger record is a chunk alone).
pub const MAX_BYTES: usize = 256 << 10;
/// Sequence numbers one chunk spans at most, so its live set stays small.
const MAX_SPAN: u64 = 4096;

/// Splits records (in ascending `seq` order) into the groups that become chunks.
pub fn split(records: &[Arc<Record>]) -> Vec<&[Arc<Record>]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, r) in records.iter().enumerate() {
        let size = 4 + r.stored_len();
        let full = i - start >= MAX_RECORDS
            || (i > start && bytes + size > MAX_BYTES)
            || r.seq.saturating_sub(records[start].seq) >= MAX_SPAN;
        if full {
            out.push(&records[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < records.len() {
        out.push(&records[start..]);
    }
    out
}

/// Encodes records as one chunk value.
pub fn encode(records: &[Arc<Record>]) -> Vec<u8> {
    let size: usize = records.iter().map(|r| 4 + r.stored_len()).sum();
    let mut out = Vec::with_capacity(5 + size);
    out.push(CHUNK_VERSION);
    let count = u32::try_from(records.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for r in records.iter().take(count as usize) {
        let bytes = r.to_bytes();
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&bytes[..len as usize]);
    }
    out
}

/// The records a chunk value holds, and how many were damaged (dropped). Never panics: a
/// truncated value gives the records before the cut.
pub fn decode(value: &[u8]) -> (Vec<Record>, u64) {
    if value.first() != Some(&CHUNK_VERSION) {
        return match Record::from_bytes(value) {
            Ok(r) => (vec![r], 0),
            Err(_) => (Vec::new(), 1),
        };
    }
    let Some(count) = value.get(1..5).and_then(|b| b.try_into().ok()) else {
        return (Vec::new(), 1);
    };
    let count = u32::from_be_bytes(count) as usize;
    let mut records = Vec::with_capacity(count.min(MAX_RECORDS));
    let mut damaged = 0;
    let mut at = 5;
    for i in 0..count {
        let len = value
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(|b| u32::from_be_bytes(b) as usize);
        let Some(bytes) = len.and_then(|len| value.get(at + 4..at + 4 + len)) else {
            // Cut short: the rest is lost.
            damaged += (count - i).min(MAX_RECORDS) as u64;
            break;
        };
        at += 4 + bytes.len();
        match Record::from_bytes(bytes) {
            Ok(r) => records.push(r),
            Err(_) => damaged += 1,
        }
    }
    if at < value.len() && damaged == 0 {
        // Bytes after the last record: the count itself was damaged, and records may be lost.
        damaged += 1;
    }
    (records, damaged)
}

/// The sequence numbers of a chunk not yet acknowledged: a bit set over the chunk's span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    base: u64,
    bits: Vec<u64>,
    count: u32,
}

impl Live {
    /// An empty set for a chunk whose first sequence number is `base`.
    pub fn new(base: u64) -> Self {
        Live {
            base,
            bits: Vec::new(),
            count: 0,
        }
    }

    fn slot(&self, seq: u64) -> Option<(usize, u64)> {
        let offset = seq.checked_sub(self.base)?;
        if offset >= MAX_SPAN {
            return None;
        }
        Some(((offset / 64) as usize, 1 << (offset % 64)))
    }

    /// Adds `seq`; a number outside the chunk's span is ignored (returns false).
    pub fn insert(&mut self, seq: u64) -> bool {
        let Some((word, bit)) = self.slot(seq) else {
            return false;
        };
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & bit != 0 {
            return false;
        }
        self.bits[word] |= bit;
        self.count += 1;
        true
    }

    /// Removes `seq`; returns whether it was there.
    pub fn remove(&mut self, seq: u64) -> bool {
        match self.slot(seq) {
            Some((word, bit)) if self.bits.get(word).is_some_and(|w| w & bit != 0) => {
                self.bits[word] &= !bit;
                self.count -= 1;
                true
            }
            _ => false,
        }
    }

    /// Whether `seq` is in the set.
    pub fn contains(&self, seq: u64) -> bool {
        self.slot(seq)
            .is_some_and(|(word, bit)| self.bits.get(word).is_some_and(|w| w & bit != 0))
    }

    /// How many sequence numbers are in the set.
    pub fn len(&self) -> u64 {
        u64::from(self.count)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The lowest sequence number in the set.
    pub fn first(&self) -> Option<u64> {
        self.next_from(self.base)
    }

    /// The lowest sequence number in the set at or above `from`.
    pub fn next_from(&self, from: u64) -> Option<u64> {
        let start = from.max(self.base) - self.base;
        let mut word = (start / 64) as usize;
        let mut mask = u64::MAX << (start % 64);
        while let Some(&w) = self.bits.get(word) {
            let hit = w & mask;
            if hit != 0 {
                return Some(self.base + word as u64 * 64 + u64::from(hit.trailing_zeros()));
            }
            word += 1;
            mask = u64::MAX;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn rec(seq: u64, size: usize) -> Arc<Record> {
        Arc::new(Record {
            seq,
            topic: "edge/gw/press".into(),
            payload: Bytes::from(vec![b'x'; size]),
            flag_offset: crate::record::NO_FLAG,
        })
    }

    #[test]
    fn a_chunk_reads_back_the_records_it_was_made_of() {
        let records: Vec<_> = [3, 4, 9].iter().map(|&s| rec(s, 100)).collect();
        let (back, damaged) = decode(&encode(&records));
        assert_eq!(damaged, 0);
        let want: Vec<Record> = records.iter().map(|r| (**r).clone()).collect();
        assert_eq!(back, want);
    }

    #[test]
    fn a_value_from_before_chunks_is_a_chunk_of_one() {
        let r = rec(7, 10);
        assert_eq!(decode(&r.to_bytes()), (vec![(*r).clone()], 0));
    }

    #[test]
    fn a_damaged_record_is_dropped_alone_and_a_cut_keeps_what_came_before() {
        let records: Vec<_> = (1..=3).map(|s| rec(s, 50)).collect();
        let mut value = encode(&records);
        // Flip a payload byte of the second record: its checksum fails.
        let second = 5 + 4 + records[0].stored_len() + 4 + 30;
        value[second] ^= 0xff;
        let (back, damaged) = decode(&value);
        assert_eq!(back.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(damaged, 1);
        let cut = &encode(&records)[..5 + 4 + records[0].stored_len() + 10];
        let (back, damaged) = decode(cut);
        assert_eq!(back.len(), 1);
        assert_eq!(damaged, 2);
    }

    #[test]
    fn records_split_by_count_size_and_span() {
        let many: Vec<_> = (0..150).map(|s| rec(s, 10)).collect();
        let sizes: Vec<usize> = split(&many).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![64, 64, 22]);
        let big: Vec<_> = (0..3).map(|s| rec(s, 200 << 10)).collect();
        assert_eq!(split(&big).len(), 3, "each large record alone");
        let spread = vec![rec(0, 10), rec(1, 10), rec(MAX_SPAN, 10)];
        let sizes: Vec<usize> = split(&spread).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![2, 1]);
        assert!(split(&[]).is_empty());
    }

    #[test]
    fn the_live_set_tracks_acknowledgements() {
        let mut live = Live::new(100);
        for s in [100, 101, 164, 230] {
            assert!(live.insert(s));
        }
        assert!(!live.insert(99), "below the chunk");
        assert!(!live.insert(100 + MAX_SPAN), "past its span");
        assert_eq!(live.len(), 4);
        assert_eq!(live.first(), Some(100));
        assert!(live.remove(100));
        assert!(!live.remove(100));
        assert_eq!(live.first(), Some(101));
        assert_eq!(live.next_from(102), Some(164));
        assert_eq!(live.next_from(165), Some(230));
        assert_eq!(live.next_from(231), None);
        assert!(live.contains(164) && !live.contains(165));
        for s in [101, 164, 230] {
            live.remove(s);
        }
        assert!(live.is_empty());
        assert_eq!(live.first(), None);
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(value in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&value);
        }

        #[test]
        fn decoding_a_chunk_with_any_byte_changed_never_panics_nor_invents_records(
            sizes in proptest::collection::vec(0usize..200, 1..8),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let records: Vec<_> = sizes.iter().enumerate().map(|(i, &n)| rec(i as u64, n)).collect();
            let mut value = encode(&records);
            let i = at.index(value.len());
            value[i] ^= flip;
            let (back, _) = decode(&value);
            for r in &back {
                prop_assert!(records.iter().any(|o| **o == *r), "a record that was never written");
            }
        }

        #[test]
        fn the_live_set_agrees_with_a_plain_set(ops in proptest::collection::vec((any::<bool>(), 0u64..300), 0..200)) {
            let mut live = Live::new(10);
            let mut plain = std::collections::BTreeSet::new();
            for (add, s) in ops {
                if add {
                    prop_assert_eq!(live.insert(s), s >= 10 && plain.insert(s));
                } else {
                    prop_assert_eq!(live.remove(s), plain.remove(&s));
                }
                prop_assert_eq!(live.len(), plain.len() as u64);
                prop_assert_eq!(live.first(), plain.iter().next().copied());
            }
        }
    }
}
