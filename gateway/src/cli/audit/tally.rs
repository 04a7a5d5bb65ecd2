//! The accounting of `audit`: what a consumer received from each gateway boot, and what it did
//! not. Pure state, fed one record at a time.
//!
//! Invariants:
//! - Records are counted per stream, a stream being one gateway's boot: `seq` is contiguous
//!   within a boot over all the gateway's devices and starts again (anywhere) at a new boot.
//! - A hole is a seq between the lowest and the highest of a stream that never arrived; it is
//!   judged at the end ([`Tally::report`]), so a record that arrives late (a replay after a
//!   reconnect, out of order) fills its hole instead of being counted as lost. Losses before the
//!   first or after the last seq seen cannot be told from a start or an end, and are not claimed.
//! - A seq that arrives again is a duplicate (counted, never a second record or its samples).
//! - Seqs are kept as ranges, so a long run costs memory per hole, not per record.
//! - Latency is read-to-arrival of live samples (`historical` false): the arrival time minus
//!   each sample's `ts`, in whole milliseconds, counted exactly per millisecond.

use std::collections::BTreeMap;

/// One record as the consumer received it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    /// The gateway id.
    pub gateway: String,
    /// Its boot.
    pub boot: u64,
    /// The record's seq.
    pub seq: u64,
    /// Replayed from the gateway's disk.
    pub historical: bool,
    /// Each sample's read time (milliseconds since the Unix epoch).
    pub sample_ts: Vec<i64>,
}

/// Everything received from one gateway boot.
#[derive(Debug, Default, Clone)]
struct Stream {
    /// Received seqs as disjoint ranges: start -> end (inclusive).
    ranges: BTreeMap<u64, u64>,
    records: u64,
    samples: u64,
    historical_records: u64,
    duplicates: u64,
    /// Records that arrived after a higher seq of the same stream.
    out_of_order: u64,
    highest: Option<u64>,
    /// Live read-to-arrival latencies: milliseconds -> samples.
    latency_ms: BTreeMap<u64, u64>,
}

impl Stream {
    /// Adds `seq`; false when it was there already, or is `u64::MAX` (no gateway reaches it:
    /// a record claiming it is a forgery or corrupt, and counting it would overflow).
    fn insert(&mut self, seq: u64) -> bool {
        if seq == u64::MAX {
            return false;
        }
        if let Some((&start, &end)) = self.ranges.range(..=seq).next_back() {
            if seq <= end {
                return false;
            }
            if end + 1 == seq {
                // Extends the range below; may join the one above.
                let new_end = match self.ranges.get(&(seq + 1)).copied() {
                    Some(above_end) => {
                        self.ranges.remove(&(seq + 1));
                        above_end
                    }
                    None => seq,
                };
                self.ranges.insert(start, new_end);
                return true;
            }
        }
        match self.ranges.remove(&(seq + 1)) {
            Some(above_end) => self.ranges.insert(seq, above_end),
            None => self.ranges.insert(seq, seq),
        };
        true
    }

    /// The seqs missing between the lowest and the highest received, as ranges.
    fn holes(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut prev_end: Option<u64> = None;
        for (&start, &end) in &self.ranges {
            if let Some(p) = prev_end {
                out.push((p + 1, start - 1));
            }
            prev_end = Some(end);
        }
        out
    }
}

/// What `audit` found for one stream.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StreamReport {
    /// The gateway id.
    pub gateway: String,
    /// The boot.
    pub boot: u64,
    /// Distinct records received.
    pub records: u64,
    /// Their samples.
    pub samples: u64,
    /// The lowest and highest seq received.
    pub first_seq: u64,
    /// See `first_seq`.
    pub last_seq: u64,
    /// Seqs between them never received (lost).
    pub missing: u64,
    /// The missing seqs as ranges `[from, to]`, the first 20.
    pub holes: Vec<(u64, u64)>,
    /// Records received more than once (extra copies).
    pub duplicates: u64,
    /// Records that arrived after a higher seq.
    pub out_of_order: u64,
    /// Share of the records that were replayed from the gateway's disk (0 to 1).
    pub historical_share: f64,
    /// Read-to-arrival latency of live samples, milliseconds: p50, p90, p99, max.
    pub latency_ms: Option<Percentiles>,
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// The largest.
    pub max: u64,
    /// Live samples measured.
    pub samples: u64,
}

/// The audit so far.
#[derive(Debug, Default)]
pub struct Tally {
    streams: BTreeMap<(String, u64), Stream>,
    /// Messages that were not records (status, meta).
    pub other: u64,
    /// Messages that could not be read as any known payload.
    pub garbled: u64,
}

impl Tally {
    /// Counts one record that arrived at `arrival_ms` (milliseconds since the Unix epoch).
    pub fn record(&mut self, seen: &Seen, arrival_ms: i64) {
        let stream = self
            .streams
            .entry((seen.gateway.clone(), seen.boot))
            .or_default();
        if !stream.insert(seen.seq) {
            stream.duplicates += 1;
            return;
        }
        stream.records += 1;
        stream.samples += seen.sample_ts.len() as u64;
        if seen.historical {
            stream.historical_records += 1;
        } else {
            for ts in &seen.sample_ts {
                let ms = u64::try_from(arrival_ms.saturating_sub(*ts)).unwrap_or(0);
                *stream.latency_ms.entry(ms).or_default() += 1;
            }
        }
        match stream.highest {
            Some(h) if seen.seq < h => stream.out_of_order += 1,
            _ => stream.highest = Some(seen.seq),
        }
    }

    /// Whether any stream has a hole.
    pub fn has_holes(&self) -> bool {
        self.streams.values().any(|s| s.ranges.len() > 1)
    }

    /// Records received over all streams.
    pub fn records(&self) -> u64 {
        self.streams.values().map(|s| s.records).sum()
    }

    /// One report per stream, by gateway and boot.
    pub fn report(&self) -> Vec<StreamReport> {
        self.streams
            .iter()
            .map(|((gateway, boot), s)| {
                let holes = s.holes();
                let missing = holes.iter().map(|(a, b)| b - a + 1).sum();
                StreamReport {
                    gateway: gateway.clone(),
                    boot: *boot,
                    records: s.records,
                    samples: s.samples,
                    first_seq: s.ranges.keys().next().copied().unwrap_or(0),
                    last_seq: s.ranges.values().next_back().copied().unwrap_or(0),
                    missing,
                    holes: holes.into_iter().take(20).collect(),
                    duplicates: s.duplicates,
                    out_of_order: s.out_of_order,
                    historical_share: if s.records == 0 {
                        0.0
                    } else {
                        s.historical_records as f64 / s.records as f64
                    },
                    latency_ms: percentiles(&s.latency_ms),
                }
            })
            .collect()
    }
}

/// Exact percentiles of a millisecond -> count table.
fn percentiles(table: &BTreeMap<u64, u64>) -> Option<Percentiles> {
    let total: u64 = table.values().sum();
    if total == 0 {
        return None;
    }
    let at = |q: f64| {
        let wanted = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (ms, n) in table {
            seen += n;
            if seen >= wanted {
                return *ms;
            }
        }
        table.keys().next_back().copied().unwrap_or(0)
    };
    Some(Percentiles {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        max: table.keys().next_back().copied().unwrap_or(0),
        samples: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(boot: u64, seq: u64, historical: bool) -> Seen {
        Seen {
            gateway: "edge-01".into(),
            boot,
            seq,
            historical,
            sample_ts: vec![1_000, 1_000],
        }
    }

    fn feed(t: &mut Tally, boot: u64, seqs: impl IntoIterator<Item = u64>) {
        for s in seqs {
            t.record(&seen(boot, s, false), 1_010);
        }
    }

    #[test]
    fn contiguous_seqs_are_no_loss() {
        let mut t = Tally::default();
        feed(&mut t, 3, 5..=104);
        let r = &t.report()[0];
        assert!(!t.has_holes());
        assert_eq!((r.records, r.samples, r.missing), (100, 200, 0));
        assert_eq!((r.first_seq, r.last_seq), (5, 104));
    }

    #[test]
    fn a_removed_seq_is_a_hole_and_says_which() {
        let mut t = Tally::default();
        feed(&mut t, 3, (0..10).filter(|s| *s != 4 && *s != 7 && *s != 8));
        assert!(t.has_holes());
        let r = &t.report()[0];
        assert_eq!(r.missing, 3);
        assert_eq!(r.holes, vec![(4, 4), (7, 8)]);
    }

    #[test]
    fn seqs_at_the_top_of_the_range_from_a_forged_record_neither_panic_nor_make_holes() {
        let mut t = Tally::default();
        feed(&mut t, 3, [u64::MAX - 1, u64::MAX, u64::MAX]);
        assert!(!t.has_holes());
    }

    #[test]
    fn a_seq_received_twice_is_a_duplicate_not_a_second_record() {
        let mut t = Tally::default();
        feed(&mut t, 3, [0, 1, 1, 2, 0]);
        let r = &t.report()[0];
        assert_eq!((r.records, r.duplicates, r.samples), (3, 2, 6));
        assert!(!t.has_holes());
    }

    #[test]
    fn a_replay_that_arrives_late_fills_its_hole_and_counts_as_out_of_order_and_historical() {
        let mut t = Tally::default();
        feed(&mut t, 3, [0, 1, 4, 5]);
        t.record(&seen(3, 2, true), 9_000);
        t.record(&seen(3, 3, true), 9_000);
        assert!(!t.has_holes());
        let r = &t.report()[0];
        assert_eq!((r.records, r.out_of_order, r.missing), (6, 2, 0));
        assert!((r.historical_share - 2.0 / 6.0).abs() < 1e-9);
        // Historical samples say nothing of the live latency.
        assert_eq!(r.latency_ms.unwrap().max, 10);
    }

    #[test]
    fn a_new_boot_is_a_stream_of_its_own_and_its_start_is_no_hole() {
        let mut t = Tally::default();
        feed(&mut t, 3, 0..5);
        feed(&mut t, 4, 500..505);
        assert!(!t.has_holes());
        let r = t.report();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].boot, r[0].records), (3, 5));
        assert_eq!((r[1].boot, r[1].first_seq), (4, 500));
    }

    #[test]
    fn two_gateways_are_two_streams() {
        let mut t = Tally::default();
        feed(&mut t, 3, 0..5);
        let mut other = seen(3, 9, false);
        other.gateway = "edge-02".into();
        t.record(&other, 1_010);
        assert!(
            !t.has_holes(),
            "edge-02's seq 9 is no hole in edge-01's 0..5"
        );
        assert_eq!(t.report().len(), 2);
    }

    #[test]
    fn latency_percentiles_are_exact_to_the_millisecond() {
        let mut t = Tally::default();
        for (i, lat) in (1..=100).enumerate() {
            let s = Seen {
                gateway: "g".into(),
                boot: 1,
                seq: i as u64,
                historical: false,
                sample_ts: vec![10_000 - lat],
            };
            t.record(&s, 10_000);
        }
        let p = t.report()[0].latency_ms.unwrap();
        assert_eq!(
            (p.p50, p.p90, p.p99, p.max, p.samples),
            (50, 90, 99, 100, 100)
        );
    }

    #[test]
    fn ranges_merge_whatever_the_arrival_order() {
        let mut t = Tally::default();
        feed(&mut t, 1, [5, 3, 4, 1, 2, 0, 9, 7, 8, 6]);
        assert!(!t.has_holes());
        assert_eq!(t.streams.values().next().unwrap().ranges.len(), 1);
    }
}
