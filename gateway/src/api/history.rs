//! The last minutes of each numeric tag, for the status page's sparklines: a page opened now
//! shows the minutes before it was opened, not only what it saw itself.
//!
//! Time is cut into steps of [`STEP_MS`] (by the gateway's read time of each sample). A tag's
//! history is a ring of [`POINTS`] slots indexed by step number modulo [`POINTS`]; a sample
//! overwrites the slot of its step, so each step keeps the last value read in it.
//!
//! Invariants:
//! - a slot holds `(step, value)` of the newest sample seen whose step maps to it; reading keeps
//!   only the slots whose step lies in the window asked for, so an old lap never shows as new;
//! - a sample older than the slot's step (a replay, a clock stepped back) never overwrites a
//!   newer one;
//! - at most [`MAX_TAGS`] tags get a ring (the first ones to bring a numeric value), so the
//!   memory is bounded by `MAX_TAGS * POINTS * 8` bytes whatever the config; a ring is made once
//!   and recording a sample afterwards allocates nothing;
//! - bad samples and text or array values leave a gap (no point), never a zero.

use protocols::model::{Quality, Sample, Timestamp};

/// The length of one step in milliseconds.
pub const STEP_MS: u64 = 10_000;
/// Steps kept per tag: five minutes.
pub const POINTS: usize = 30;
/// Tags with a history at most.
pub const MAX_TAGS: usize = 1_000;

/// One tag's ring: `(step, value)` per slot; step 0 marks an empty slot.
type Ring = [(u32, f32); POINTS];

/// Recent numeric values of tags, by device and tag id.
#[derive(Debug, Default)]
pub struct History {
    rings: Vec<Vec<Option<Box<Ring>>>>,
    count: usize,
}

/// The step a time falls in (0 only for times within the first step after the epoch).
pub fn step_of(time: Timestamp) -> u32 {
    u32::try_from(time.unix_ms() / STEP_MS).unwrap_or(u32::MAX)
}

impl History {
    /// Takes in one sample of device `device`; says whether it gave a point (a good or
    /// uncertain numeric value of a tag that has a ring or got one).
    pub fn record(&mut self, device: usize, sample: &Sample) -> bool {
        let point = match &sample.value {
            Some(v) if !matches!(sample.quality, Quality::Bad(_)) => v.as_f64(),
            _ => None,
        };
        let Some(point) = point else { return false };
        let step = step_of(sample.gateway_time);
        let tag = sample.tag.0 as usize;
        if self.rings.len() <= device {
            self.rings.resize_with(device + 1, Vec::new);
        }
        let row = &mut self.rings[device];
        if row.len() <= tag {
            if self.count >= MAX_TAGS {
                return false;
            }
            row.resize_with(tag + 1, || None);
        }
        let ring = match &mut row[tag] {
            Some(ring) => ring,
            slot @ None => {
                if self.count >= MAX_TAGS {
                    return false;
                }
                self.count += 1;
                slot.insert(Box::new([(0, 0.0); POINTS]))
            }
        };
        let slot = &mut ring[step as usize % POINTS];
        if slot.0 <= step {
            *slot = (step, point as f32);
        }
        true
    }

    /// The points of one tag for the [`POINTS`] steps ending with step `last`, oldest first,
    /// `None` where the step holds no value; `None` for a tag without a history.
    pub fn points(&self, device: usize, tag: usize, last: u32) -> Option<[Option<f32>; POINTS]> {
        let ring = self.rings.get(device)?.get(tag)?.as_ref()?;
        let mut out = [None; POINTS];
        let first = last.saturating_sub(POINTS as u32 - 1);
        for (i, step) in (first..=last).enumerate() {
            let (at, value) = ring[step as usize % POINTS];
            if at == step && at != 0 {
                out[i] = Some(value);
            }
        }
        Some(out)
    }

    /// Drops a device's rings: a device a reload stopped (its id is never reused), so that
    /// its share of [`MAX_TAGS`] goes to the devices that run.
    pub fn forget_device(&mut self, device: usize) {
        if let Some(row) = self.rings.get_mut(device) {
            self.count -= row.iter().filter(|r| r.is_some()).count();
            row.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use protocols::model::{Reason, TagId, Value};

    use super::*;

    fn at(step: u64) -> Timestamp {
        Timestamp((step * STEP_MS + 123) as i64)
    }

    fn good(tag: u32, v: f64, step: u64) -> Sample {
        Sample::good(TagId(tag), Value::Float(v), at(step))
    }

    #[test]
    fn each_step_keeps_the_last_value_read_in_it_and_steps_without_one_are_gaps() {
        let mut h = History::default();
        h.record(0, &good(0, 1.0, 100));
        h.record(0, &good(0, 2.0, 100));
        h.record(0, &good(0, 5.0, 102));
        let p = h.points(0, 0, 102).unwrap();
        assert_eq!(&p[POINTS - 3..], &[Some(2.0), None, Some(5.0)]);
        assert!(p[..POINTS - 3].iter().all(Option::is_none));
    }

    #[test]
    fn a_value_a_whole_lap_old_is_not_shown_as_new() {
        let mut h = History::default();
        h.record(0, &good(0, 7.0, 100));
        let later = 100 + POINTS as u32;
        let p = h.points(0, 0, later).unwrap();
        assert!(p.iter().all(Option::is_none), "{p:?}");
        assert_eq!(h.points(0, 0, later - 1).unwrap()[0], Some(7.0));
    }

    #[test]
    fn an_older_sample_never_overwrites_a_newer_one_in_the_same_slot() {
        let mut h = History::default();
        h.record(0, &good(0, 9.0, 100 + POINTS as u64));
        h.record(0, &good(0, 1.0, 100));
        let p = h.points(0, 0, 100 + POINTS as u32).unwrap();
        assert_eq!(p[POINTS - 1], Some(9.0));
    }

    #[test]
    fn bad_samples_and_text_leave_gaps_and_make_no_ring() {
        let mut h = History::default();
        h.record(0, &Sample::bad(TagId(0), Reason::Timeout, at(100)));
        h.record(
            0,
            &Sample::good(TagId(1), Value::Text("idle".into()), at(100)),
        );
        assert!(h.points(0, 0, 100).is_none());
        assert!(h.points(0, 1, 100).is_none());
        h.record(0, &Sample::good(TagId(2), Value::Bool(true), at(100)));
        assert_eq!(h.points(0, 2, 100).unwrap()[POINTS - 1], Some(1.0));
    }

    #[test]
    fn no_more_than_max_tags_get_a_ring_and_a_forgotten_device_frees_its_share() {
        let mut h = History::default();
        for tag in 0..(MAX_TAGS as u32 + 5) {
            h.record(1, &good(tag, 1.0, 100));
        }
        assert!(h.points(1, MAX_TAGS - 1, 100).is_some());
        assert!(h.points(1, MAX_TAGS, 100).is_none());
        h.record(2, &good(0, 1.0, 100));
        assert!(
            h.points(2, 0, 100).is_none(),
            "the cap holds across devices"
        );
        h.forget_device(1);
        h.record(2, &good(0, 1.0, 100));
        assert!(h.points(2, 0, 100).is_some());
    }
}
