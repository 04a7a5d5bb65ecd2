//! Scan scheduling and report filtering, kept free of I/O.
//!
//! Tags are grouped into scan classes by interval; each class has its own block plan and due
//! time, and one scan of a class becomes one batch. In `on_change` mode the [`ChangeFilter`]
//! decides which samples of a scan are worth a record: a value that moved by more than the
//! tag's deadband, a quality change, or a heartbeat after `max_silence`.

use std::time::{Duration, Instant};

use super::planner::{self, Block, Limits};
use super::{Report, TagSpec};
use crate::model::{Quality, Sample, TagId, Value};

/// The tags that share one scan interval, and the reads that cover them.
#[derive(Debug, Clone)]
pub(crate) struct ScanClass {
    /// How often the class is scanned.
    pub interval: Duration,
    /// The block reads; splits learned from the device are kept here.
    pub blocks: Vec<Block>,
    /// When the class is next due.
    pub next_due: Instant,
}

impl ScanClass {
    /// Moves the due time one interval on, skipping scans that were missed entirely.
    pub(crate) fn advance(&mut self, now: Instant) {
        self.next_due += self.interval;
        if self.next_due <= now {
            self.next_due = now + self.interval;
        }
    }
}

/// Groups tags into scan classes (ordered by interval) and plans each class's reads.
pub(crate) fn classes(tags: &[TagSpec], limits: Limits, start: Instant) -> Vec<ScanClass> {
    let mut intervals: Vec<Duration> = tags.iter().map(|t| t.scan_interval).collect();
    intervals.sort();
    intervals.dedup();
    intervals
        .into_iter()
        .map(|interval| {
            let members: Vec<_> = tags
                .iter()
                .enumerate()
                .filter(|(_, t)| t.scan_interval == interval)
                .map(|(i, t)| (TagId(i as u32), t.address, t.width()))
                .collect();
            ScanClass {
                interval,
                blocks: planner::plan(&members, limits),
                next_due: start,
            }
        })
        .collect()
}

#[derive(Debug, Clone)]
struct LastReport {
    value: Option<Value>,
    quality: Quality,
    at: Instant,
}

/// Decides which samples are reported, per the device's report mode.
#[derive(Debug)]
pub(crate) struct ChangeFilter {
    mode: Report,
    max_silence: Duration,
    deadbands: Vec<f64>,
    last: Vec<Option<LastReport>>,
}

impl ChangeFilter {
    /// A filter for a device's tags.
    /// In `every_scan` mode it remembers nothing (10k tags would hold 0.6 MB for no use).
    pub(crate) fn new(mode: Report, max_silence: Duration, tags: &[TagSpec]) -> Self {
        let tracked = if mode == Report::EveryScan {
            &[][..]
        } else {
            tags
        };
        ChangeFilter {
            mode,
            max_silence,
            deadbands: tracked.iter().map(|t| t.deadband).collect(),
            last: vec![None; tracked.len()],
        }
    }

    /// Whether the sample is to be reported; remembers it when it is.
    pub(crate) fn admit(&mut self, sample: &Sample, now: Instant) -> bool {
        if self.mode == Report::EveryScan {
            return true;
        }
        let i = sample.tag.0 as usize;
        let Some(slot) = self.last.get_mut(i) else {
            return true;
        };
        let deadband = self.deadbands.get(i).copied().unwrap_or(0.0);
        let report = match slot {
            None => true,
            Some(last) => {
                last.quality != sample.quality
                    || now.duration_since(last.at) >= self.max_silence
                    || changed(last.value.as_ref(), sample.value.as_ref(), deadband)
            }
        };
        if report {
            *slot = Some(LastReport {
                value: sample.value.clone(),
                quality: sample.quality,
                at: now,
            });
        }
        report
    }

    /// Forgets everything, so the next scan reports every tag (after a reconnect).
    pub(crate) fn reset(&mut self) {
        self.last.iter_mut().for_each(|l| *l = None);
    }
}

fn changed(old: Option<&Value>, new: Option<&Value>, deadband: f64) -> bool {
    match (old, new) {
        (Some(a), Some(b)) => match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) if x.is_finite() && y.is_finite() => {
                let d = (x - y).abs();
                if deadband > 0.0 {
                    d > deadband
                } else {
                    d != 0.0
                }
            }
            _ => a != b,
        },
        (None, None) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modbus::{Address, DataType, WordOrder};
    use crate::model::{Reason, Timestamp};

    fn tag(name: &str, deadband: f64) -> TagSpec {
        TagSpec {
            meta: Default::default(),
            name: name.into(),
            address: Address {
                area: crate::modbus::Area::HoldingRegister,
                offset: 0,
            },
            bit: None,
            data_type: DataType::U16,
            order: WordOrder::ABCD,
            length: 0,
            scale: 1.0,
            offset: 0.0,
            deadband,
            scan_interval: Duration::from_secs(1),
            write: None,
        }
    }

    fn float(v: f64) -> Sample {
        Sample::good(TagId(0), Value::Float(v), Timestamp(0))
    }

    #[test]
    fn every_scan_admits_everything() {
        let mut f = ChangeFilter::new(Report::EveryScan, Duration::from_secs(60), &[tag("a", 1.0)]);
        let now = Instant::now();
        assert!(f.admit(&float(1.0), now));
        assert!(f.admit(&float(1.0), now));
    }

    #[test]
    fn on_change_suppresses_moves_within_the_deadband() {
        let mut f = ChangeFilter::new(Report::OnChange, Duration::from_secs(60), &[tag("a", 0.5)]);
        let now = Instant::now();
        assert!(f.admit(&float(1.0), now), "first value is always reported");
        assert!(!f.admit(&float(1.4), now));
        assert!(f.admit(&float(1.6), now));
        assert!(!f.admit(&float(1.6), now));
    }

    #[test]
    fn on_change_reports_quality_changes_and_heartbeats() {
        let mut f = ChangeFilter::new(Report::OnChange, Duration::from_secs(10), &[tag("a", 0.0)]);
        let t0 = Instant::now();
        assert!(f.admit(&float(1.0), t0));
        assert!(f.admit(&Sample::bad(TagId(0), Reason::Timeout, Timestamp(0)), t0));
        assert!(!f.admit(&Sample::bad(TagId(0), Reason::Timeout, Timestamp(0)), t0));
        assert!(f.admit(&float(1.0), t0));
        assert!(!f.admit(&float(1.0), t0 + Duration::from_secs(9)));
        assert!(f.admit(&float(1.0), t0 + Duration::from_secs(10)));
    }

    #[test]
    fn tags_with_different_intervals_form_separate_classes() {
        let mut fast = tag("fast", 0.0);
        fast.scan_interval = Duration::from_millis(250);
        let slow = tag("slow", 0.0);
        let limits = Limits {
            max_registers: 125,
            max_bits: 2000,
            max_gap_registers: 16,
            max_gap_bits: 16,
        };
        let c = classes(&[slow, fast], limits, Instant::now());
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].interval, Duration::from_millis(250));
        assert_eq!(c[0].blocks[0].slots[0].tag, TagId(1));
    }

    #[test]
    fn a_class_that_fell_behind_skips_missed_scans() {
        let t0 = Instant::now();
        let mut c = ScanClass {
            interval: Duration::from_millis(100),
            blocks: vec![],
            next_due: t0,
        };
        c.advance(t0 + Duration::from_millis(350));
        assert_eq!(c.next_due, t0 + Duration::from_millis(450));
        c.advance(t0 + Duration::from_millis(400));
        assert_eq!(c.next_due, t0 + Duration::from_millis(550));
    }
}
