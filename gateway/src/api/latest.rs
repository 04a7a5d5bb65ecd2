//! The latest sample of every tag, for `/api/tags` and the status page.
//!
//! The writer calls [`Latest::record`] once per batch: one uncontended lock and a copy of each
//! sample (a value is plain data or a shared `Arc`, so the copy allocates nothing once a tag's
//! slot exists). Every batch is folded in, so a record holding only the tags that changed
//! (`report = "on_change"`) or half of a split scan leaves the other tags' values in place.
//! The API takes a copy under the same lock and does its formatting off it.
//!
//! The same lock keeps the last minutes of each numeric tag ([`History`]) for the page's
//! sparklines. A tag's slot remembers the last step it gave the history, so the history is
//! touched once per tag and step (the first good value read in the step), not per sample: the
//! per-sample cost stays one compare on the cache line the sample is written to anyway.
//!
//! Invariant: `rows[device][tag]` is the last sample the writer took for that tag, or `None`
//! when none came yet; rows grow to the largest id seen and shrink only when a reload stopped
//! the device ([`Latest::keep_only`]: ids are never reused).

use std::sync::{Mutex, MutexGuard};

use protocols::model::{Batch, DeviceId, Sample};

use super::history::{step_of, History, POINTS};

#[derive(Debug, Default)]
struct Inner {
    rows: Vec<Vec<Slot>>,
    history: History,
}

/// A tag's latest sample and the last step it gave the history (0: none yet).
#[derive(Debug, Clone, Default)]
struct Slot {
    sample: Option<Sample>,
    step: u32,
}

/// The latest sample of every tag, by device and tag id.
#[derive(Debug, Default)]
pub struct Latest {
    inner: Mutex<Inner>,
}

impl Latest {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Poisoned only by a panic while held; every slot holds a whole sample still.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes in the samples of one batch.
    pub fn record(&self, batch: &Batch) {
        let device = batch.device.0 as usize;
        let mut inner = self.inner();
        let Inner { rows, history } = &mut *inner;
        if rows.len() <= device {
            rows.resize_with(device + 1, Vec::new);
        }
        let row = &mut rows[device];
        for sample in &batch.samples {
            let tag = sample.tag.0 as usize;
            if row.len() <= tag {
                row.resize(tag + 1, Slot::default());
            }
            let slot = &mut row[tag];
            let step = step_of(sample.gateway_time);
            if slot.step != step && history.record(device, sample) {
                slot.step = step;
            }
            slot.sample = Some(sample.clone());
        }
    }

    /// A copy of every device's row.
    pub fn snapshot(&self) -> Vec<Vec<Option<Sample>>> {
        let inner = self.inner();
        inner
            .rows
            .iter()
            .map(|row| row.iter().map(|slot| slot.sample.clone()).collect())
            .collect()
    }

    /// The history of each tag of `tags` (device id, tag id) for the steps ending with `last`
    /// (see [`History::points`]), in the same order.
    pub fn history(
        &self,
        tags: impl Iterator<Item = (usize, usize)>,
        last: u32,
    ) -> Vec<Option<[Option<f32>; POINTS]>> {
        let inner = self.inner();
        tags.map(|(d, t)| inner.history.points(d, t, last))
            .collect()
    }

    /// Forgets the devices not in `ids` (stopped by a reload: their ids are never reused).
    pub fn keep_only(&self, ids: &[DeviceId]) {
        let mut inner = self.inner();
        for device in 0..inner.rows.len() {
            if !ids.iter().any(|id| id.0 as usize == device) {
                inner.rows[device].clear();
                inner.history.forget_device(device);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use protocols::model::{DeviceId, Reason, TagId, Timestamp, Value};

    use super::*;

    fn batch(device: u32, samples: Vec<Sample>) -> Batch {
        Batch {
            device: DeviceId(device),
            samples,
            read_at: Instant::now(),
        }
    }

    #[test]
    fn a_batch_with_only_changed_tags_keeps_the_other_tags_latest_values() {
        let latest = Latest::default();
        latest.record(&batch(
            1,
            vec![
                Sample::good(TagId(0), Value::Int(1), Timestamp(10)),
                Sample::good(TagId(1), Value::Int(2), Timestamp(10)),
            ],
        ));
        latest.record(&batch(
            1,
            vec![Sample::bad(TagId(1), Reason::Timeout, Timestamp(20))],
        ));
        let rows = latest.snapshot();
        assert_eq!(rows.len(), 2, "rows grow to the largest device id");
        assert!(rows[0].is_empty());
        let tag0 = rows[1][0].as_ref().unwrap();
        assert_eq!(tag0.value, Some(Value::Int(1)));
        let tag1 = rows[1][1].as_ref().unwrap();
        assert_eq!(tag1.value, None);
        assert_eq!(tag1.gateway_time, Timestamp(20));
    }

    #[test]
    fn a_device_a_reload_stopped_is_forgotten_and_the_others_kept() {
        let latest = Latest::default();
        let now = Timestamp::now();
        for device in [1, 2] {
            latest.record(&batch(
                device,
                vec![Sample::good(TagId(0), Value::Int(5), now)],
            ));
        }
        latest.keep_only(&[DeviceId(2)]);
        let rows = latest.snapshot();
        assert!(rows[1].is_empty());
        assert!(rows[2][0].is_some());
        let last = step_of(now);
        let h = latest.history([(1, 0), (2, 0)].into_iter(), last);
        assert!(h[0].is_none());
        assert_eq!(h[1].unwrap()[POINTS - 1], Some(5.0));
    }

    #[test]
    fn each_step_of_the_history_keeps_the_first_good_value_read_in_it() {
        let latest = Latest::default();
        let t = |ms: i64| Timestamp(1_000_000 * super::super::history::STEP_MS as i64 + ms);
        for (value, at) in [(None, 0), (Some(2), 10), (Some(3), 20)] {
            let sample = match value {
                None => Sample::bad(TagId(0), Reason::Timeout, t(at)),
                Some(v) => Sample::good(TagId(0), Value::Int(v), t(at)),
            };
            latest.record(&batch(0, vec![sample]));
        }
        let h = latest.history([(0, 0)].into_iter(), step_of(t(0)));
        assert_eq!(
            h[0].unwrap()[POINTS - 1],
            Some(2.0),
            "the bad sample gave no point"
        );
        let rows = latest.snapshot();
        assert_eq!(rows[0][0].as_ref().unwrap().value, Some(Value::Int(3)));
    }
}
