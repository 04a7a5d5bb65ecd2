//! A chunk: records committed together, stored as one value in the disk buffer, and the set of
//! its records not yet acknowledged.
//!
//! The store rewrites a tree node whenever an entry in it changes, and a node holds many
//! entries: a value per record cost about 5 bytes written per byte of payload (measured), one
//! value per commit about 3.4. So the records of a commit go into chunks of at most
//! [`MAX_RECORDS`] records and [`MAX_BYTES`] bytes, keyed by their first sequence number; a
//! chunk is deleted once every record in it is acknowledged (or evicted). Which records of a
//! chunk are still unacknowledged is kept in memory only: after a restart a partly acknowledged
//! chunk is sent again whole, which the cloud de-duplicates by `seq` like any re-send.
//!
//! Format: `[0xC2][record count, u32][body length, u32][body, raw deflate]`, the body being
//! `[(record length, u32)(record)]...`, each record in its own checksummed form
//! ([`Record::to_bytes`]). The buffer lives on eMMC or SD cards, which wear out with the bytes
//! written, and JSON scans repeat their keys, tag names and timestamps: deflate at level 4
//! shrinks a chunk of 64 scans of 10 or 100 tags about 9x when the values change and 15 to 18x
//! when they do not (measured), at over 100 MB/s on one core. A body that does not shrink is
//! stored as is, `[0xC1][record count, u32][body]`: the format from before compression, which
//! still reads. A damaged record in a plain body is dropped alone; damage in a deflated body
//! loses the records from the damage on (what inflated before it is read, each record checked
//! against its checksum, so nothing garbled gets through). A value in the form of a single
//! record is a value from before chunks and reads as a chunk of one. First bytes 0xC3 to 0xCF
//! are kept for later formats: a buffer that holds one (after a downgrade) is set aside whole,
//! not read as damage and dropped.

use std::sync::Arc;

use super::record::Record;

/// First byte of a chunk with a plain body (a single record starts with its version, 1).
const PLAIN: u8 = 0xC1;
/// First byte of a chunk with a deflated body.
const DEFLATED: u8 = 0xC2;
/// Deflate level: about 97% of level 6's ratio at twice its speed (measured).
const LEVEL: u8 = 4;
/// Largest body a deflated chunk may state, so a damaged length cannot claim a huge buffer.
const MAX_BODY: usize = 64 << 20;
/// Records in one chunk at most: about one replay step, so a replay reads few chunks twice.
pub const MAX_RECORDS: usize = 64;
/// Record bytes in one chunk at most, before compression (a larger record is a chunk alone).
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

/// Encodes records as one chunk value: deflated, or plain when that is not smaller.
pub fn encode(records: &[Arc<Record>]) -> Vec<u8> {
    let plain = encode_plain(records);
    let body = plain.get(5..).unwrap_or_default();
    let len = match u32::try_from(body.len()) {
        Ok(len) if body.len() <= MAX_BODY => len,
        _ => return plain,
    };
    let packed = miniz_oxide::deflate::compress_to_vec(body, LEVEL);
    if packed.len() + 4 >= body.len() {
        return plain;
    }
    let mut out = Vec::with_capacity(9 + packed.len());
    out.push(DEFLATED);
    out.extend_from_slice(&plain[1..5]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&packed);
    out
}

/// Encodes records as one chunk value with a plain body (the 0xC1 format).
pub(crate) fn encode_plain(records: &[Arc<Record>]) -> Vec<u8> {
    let size: usize = records.iter().map(|r| 4 + r.stored_len()).sum();
    let mut out = Vec::with_capacity(5 + size);
    out.push(PLAIN);
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

/// Whether a value is a chunk in a format a newer version of the gateway writes (first bytes
/// 0xC3 to 0xCF are kept for those): it cannot be read here, and must not be taken for damage.
pub fn from_a_newer_version(value: &[u8]) -> bool {
    value
        .first()
        .is_some_and(|&b| (DEFLATED + 1..=0xCF).contains(&b))
}

/// The records a chunk value holds, and how many were damaged (dropped). Never panics: a
/// truncated or damaged value gives the records before the cut or the damage.
pub fn decode(value: &[u8]) -> (Vec<Record>, u64) {
    let version = value.first().copied();
    if version != Some(PLAIN) && version != Some(DEFLATED) {
        return match Record::from_bytes(value) {
            Ok(r) => (vec![r], 0),
            Err(_) => (Vec::new(), 1),
        };
    }
    let Some(count) = be_u32(value, 1) else {
        return (Vec::new(), 1);
    };
    let count = count as usize;
    if version == Some(PLAIN) {
        return decode_body(value.get(5..).unwrap_or_default(), count);
    }
    match inflate(value) {
        // What inflated before the damage is read like a plain body cut short: each record
        // there still has its checksum, so a garbled one is dropped, and the rest count as lost.
        Some(body) => decode_body(&body, count),
        None => (Vec::new(), count.clamp(1, MAX_RECORDS) as u64),
    }
}

/// The body of a deflated chunk value, as far as it inflates (all of it unless damaged), or
/// `None` when its header is damaged.
fn inflate(value: &[u8]) -> Option<Vec<u8>> {
    let len = be_u32(value, 5)? as usize;
    let packed = value.get(9..).filter(|p| !p.is_empty())?;
    if len > MAX_BODY {
        return None;
    }
    // The output grows with what actually inflates, up to `len` and no further.
    Some(
        miniz_oxide::inflate::decompress_to_vec_with_limit(packed, len)
            .unwrap_or_else(|e| e.output),
    )
}

fn be_u32(value: &[u8], at: usize) -> Option<u32> {
    let b = value.get(at..at.checked_add(4)?)?;
    b.try_into().ok().map(u32::from_be_bytes)
}

/// The records of a chunk body of `count` records, and how many were damaged.
fn decode_body(body: &[u8], count: usize) -> (Vec<Record>, u64) {
    let mut records = Vec::with_capacity(count.min(MAX_RECORDS));
    let mut damaged = 0;
    let mut at = 0;
    for i in 0..count {
        let bytes = be_u32(body, at).and_then(|len| {
            let start = at + 4;
            body.get(start..start.checked_add(len as usize)?)
        });
        let Some(bytes) = bytes else {
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
    if at < body.len() && damaged == 0 {
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
    use crate::buffer::incompressible;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn rec(seq: u64, size: usize) -> Arc<Record> {
        Arc::new(Record {
            seq,
            topic: "edge/gw/press".into(),
            payload: Bytes::from(vec![b'x'; size]),
            flag_offset: crate::buffer::NO_FLAG,
        })
    }

    /// A record shaped like a device scan of `tags` tags, as the JSON encoder writes it.
    fn scan(seq: u64, tags: u64) -> Arc<Record> {
        let mut p = format!(
            r#"{{"gateway":"bench-gw","boot":3,"device":"dev007","seq":{seq},"historical":false,"samples":["#
        );
        for t in 0..tags {
            let v = (seq * 7919 + t * 104_729) % 65_536;
            let ts = 1_764_230_400_123 + seq * 100;
            p += &format!(r#"{{"tag":"t{t:03}","value":{v}.5,"quality":"good","ts":{ts}}},"#);
        }
        p.pop();
        p += "]}";
        Arc::new(Record {
            seq,
            topic: "edge/bench-gw/dev007".into(),
            payload: Bytes::from(p),
            flag_offset: crate::buffer::NO_FLAG,
        })
    }

    /// A chunk value as the version before compression wrote it.
    fn old_chunk(records: &[Arc<Record>]) -> Vec<u8> {
        let mut out = vec![0xC1];
        out.extend_from_slice(&(records.len() as u32).to_be_bytes());
        for r in records {
            let b = r.to_bytes();
            out.extend_from_slice(&(b.len() as u32).to_be_bytes());
            out.extend_from_slice(&b);
        }
        out
    }

    fn owned(records: &[Arc<Record>]) -> Vec<Record> {
        records.iter().map(|r| (**r).clone()).collect()
    }

    /// A deflated chunk value with the given header fields.
    fn deflated(count: u32, len: u32, packed: &[u8]) -> Vec<u8> {
        let mut out = vec![DEFLATED];
        out.extend_from_slice(&count.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(packed);
        out
    }

    #[test]
    fn formats_of_newer_versions_are_told_apart_from_damage() {
        let records: Vec<_> = (1..=3).map(|s| scan(s, 10)).collect();
        assert!(!from_a_newer_version(&encode(&records)));
        assert!(!from_a_newer_version(&encode_plain(&records)));
        assert!(!from_a_newer_version(&records[0].to_bytes()));
        assert!(from_a_newer_version(&[0xC3, 0, 0]));
        assert!(from_a_newer_version(&[0xCF]));
        assert!(!from_a_newer_version(&[0xD0]) && !from_a_newer_version(&[]));
    }

    #[test]
    fn a_chunk_reads_back_the_records_it_was_made_of() {
        let records: Vec<_> = [3, 4, 9].iter().map(|&s| rec(s, 100)).collect();
        let value = encode(&records);
        assert_eq!(value[0], DEFLATED);
        assert_eq!(decode(&value), (owned(&records), 0));
    }

    #[test]
    fn scans_are_stored_deflated_several_times_smaller() {
        for tags in [10, 100] {
            let records: Vec<_> = (1000..1064).map(|s| scan(s, tags)).collect();
            let value = encode(&records);
            let plain = encode_plain(&records);
            assert_eq!(value[0], DEFLATED);
            assert_eq!(&value[1..5], &plain[1..5], "the same record count");
            assert_eq!(&value[5..9], &((plain.len() - 5) as u32).to_be_bytes());
            assert!(
                value.len() * 5 < plain.len(),
                "{tags} tags: {} bytes deflated, {} plain",
                value.len(),
                plain.len()
            );
            assert_eq!(decode(&value), (owned(&records), 0));
        }
    }

    #[test]
    fn a_body_that_does_not_shrink_is_stored_plain() {
        let records: Vec<_> = (1..=3).map(|s| incompressible(s, 300)).collect();
        let value = encode(&records);
        assert_eq!(value, encode_plain(&records));
        assert_eq!(value, old_chunk(&records));
        assert_eq!(decode(&value), (owned(&records), 0));
        assert_eq!(encode(&[]), old_chunk(&[]), "an empty chunk too");
    }

    #[test]
    fn a_chunk_from_before_compression_still_reads() {
        let records: Vec<_> = (1..=5).map(|s| scan(s, 10)).collect();
        assert_eq!(decode(&old_chunk(&records)), (owned(&records), 0));
    }

    #[test]
    fn a_value_from_before_chunks_is_a_chunk_of_one() {
        let r = rec(7, 10);
        assert_eq!(decode(&r.to_bytes()), (vec![(*r).clone()], 0));
    }

    #[test]
    fn a_damaged_record_is_dropped_alone_and_a_cut_keeps_what_came_before() {
        let records: Vec<_> = (1..=3).map(|s| rec(s, 50)).collect();
        let mut value = encode_plain(&records);
        // Flip a payload byte of the second record: its checksum fails.
        let second = 5 + 4 + records[0].stored_len() + 4 + 30;
        value[second] ^= 0xff;
        let (back, damaged) = decode(&value);
        assert_eq!(back.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(damaged, 1);
        let cut = &encode_plain(&records)[..5 + 4 + records[0].stored_len() + 10];
        let (back, damaged) = decode(cut);
        assert_eq!(back.len(), 1);
        assert_eq!(damaged, 2);
    }

    #[test]
    fn a_damaged_deflated_chunk_is_reported_and_invents_nothing() {
        let records: Vec<_> = (1..=3).map(|s| scan(s, 10)).collect();
        let value = encode(&records);
        assert_eq!(value[0], DEFLATED);
        let mut kept_some = 0;
        for i in 9..value.len() {
            let mut bad = value.clone();
            bad[i] ^= 0xff;
            let (back, damaged) = decode(&bad);
            for r in &back {
                assert!(records.iter().any(|o| **o == *r), "flip at {i}: invented");
            }
            // A flip in the bits after the last byte needed changes nothing.
            assert!(
                damaged >= 1 || back == owned(&records),
                "flip at {i} went unnoticed"
            );
            assert!(
                back.len() as u64 + damaged >= 3,
                "flip at {i}: a loss not counted"
            );
            if !back.is_empty() {
                kept_some += 1;
            }
        }
        assert!(kept_some > 0, "no record before the damage was kept");
    }

    #[test]
    fn a_cut_deflated_chunk_gives_the_records_before_the_cut() {
        let records: Vec<_> = (1..=3).map(|s| scan(s, 10)).collect();
        let value = encode(&records);
        let mut kept = Vec::new();
        for cut in 0..value.len() {
            let (back, damaged) = decode(&value[..cut]);
            assert_eq!(
                back,
                owned(&records[..back.len()]),
                "cut at {cut}: not a prefix"
            );
            let want = if cut < 5 { 1 } else { 3 - back.len() as u64 };
            assert_eq!(damaged, want, "cut at {cut}");
            kept.push(back.len());
        }
        assert!(
            kept.contains(&2),
            "the records inflated before a cut are kept"
        );
    }

    #[test]
    fn a_wrong_or_absurd_stated_length_is_damage() {
        let records: Vec<_> = (1..=3).map(|s| scan(s, 10)).collect();
        let value = encode(&records);
        let len = u32::from_be_bytes(value[5..9].try_into().unwrap());
        let packed = &value[9..];
        assert_eq!(decode(&deflated(3, len, packed)), (owned(&records), 0));
        for bad in [0, 1, MAX_BODY as u32 + 1, u32::MAX] {
            assert_eq!(decode(&deflated(3, bad, packed)), (Vec::new(), 3), "{bad}");
        }
        // Short by one: the last record is cut; long by one: nothing is missing.
        assert_eq!(
            decode(&deflated(3, len - 1, packed)),
            (owned(&records[..2]), 1)
        );
        assert_eq!(decode(&deflated(3, len + 1, packed)), (owned(&records), 0));
        // The count is damaged too: the loss is bounded by a chunk's size, and never zero.
        assert_eq!(
            decode(&deflated(u32::MAX, u32::MAX, packed)).1,
            MAX_RECORDS as u64
        );
        assert_eq!(decode(&deflated(0, u32::MAX, packed)).1, 1);
        assert_eq!(decode(&deflated(3, 100, &[])), (Vec::new(), 3));
        // A stream that inflates past its stated length stops there.
        let bomb = miniz_oxide::deflate::compress_to_vec(&vec![0u8; 4 << 20], LEVEL);
        assert_eq!(decode(&deflated(3, 1000, &bomb)), (Vec::new(), 3));
        let big = MAX_BODY as u32;
        assert_eq!(decode(&deflated(3, big, &bomb)), (Vec::new(), 3));
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
        fn any_bytes_after_a_deflated_header_never_panic(
            count in any::<u32>(),
            len in prop_oneof![0u32..2048, any::<u32>()],
            packed in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let (back, damaged) = decode(&deflated(count, len, &packed));
            prop_assert!(back.len() <= count as usize);
            prop_assert!(back.len() as u64 + damaged >= 1);
        }

        #[test]
        fn any_bytes_after_a_real_deflated_header_never_panic(
            tags in 1u64..20,
            cut in any::<prop::sample::Index>(),
            tail in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let records: Vec<_> = (1..=4).map(|s| scan(s, tags)).collect();
            let value = encode(&records);
            prop_assert_eq!(value[0], DEFLATED);
            let mut bad = value[..9 + cut.index(value.len() - 9)].to_vec();
            bad.extend_from_slice(&tail);
            let (back, _) = decode(&bad);
            for r in &back {
                prop_assert!(records.iter().any(|o| **o == *r), "a record that was never written");
            }
        }

        #[test]
        fn any_chunk_reads_back_whole(
            sizes in proptest::collection::vec((0usize..300, any::<bool>()), 0..8),
        ) {
            let records: Vec<_> = sizes
                .iter()
                .enumerate()
                .map(|(i, &(n, random))| if random { incompressible(i as u64, n) } else { rec(i as u64, n) })
                .collect();
            let value = encode(&records);
            prop_assert!(value.len() <= encode_plain(&records).len());
            prop_assert_eq!(decode(&value), (owned(&records), 0));
        }

        #[test]
        fn decoding_a_chunk_with_any_byte_changed_never_panics_nor_invents_records(
            sizes in proptest::collection::vec(0usize..200, 1..8),
            plain in any::<bool>(),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let records: Vec<_> = sizes.iter().enumerate().map(|(i, &n)| rec(i as u64, n)).collect();
            let mut value = if plain { encode_plain(&records) } else { encode(&records) };
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
