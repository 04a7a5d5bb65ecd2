//! The latest sample of every tag, for `/api/tags` and the status page.
//!
//! The writer calls [`Latest::record`] once per batch: one uncontended lock and a copy of each
//! sample (a value is plain data or a shared `Arc`, so the copy allocates nothing once a tag's
//! slot exists). Every batch is folded in, so a record holding only the tags that changed
//! (`report = "on_change"`) or half of a split scan leaves the other tags' values in place.
//! The API takes a copy under the same lock and does its formatting off it.
//!
//! Invariant: `rows[device][tag]` is the last sample the writer took for that tag, or `None`
//! when none came yet; rows grow to the largest id seen and never shrink.

use std::sync::{Mutex, MutexGuard};

use protocols::model::{Batch, Sample};

/// The latest sample of every tag, by device and tag id.
#[derive(Debug, Default)]
pub struct Latest {
    rows: Mutex<Vec<Vec<Option<Sample>>>>,
}

impl Latest {
    fn rows(&self) -> MutexGuard<'_, Vec<Vec<Option<Sample>>>> {
        // Poisoned only by a panic while held; every slot holds a whole sample still.
        self.rows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes in the samples of one batch.
    pub fn record(&self, batch: &Batch) {
        let device = batch.device.0 as usize;
        let mut rows = self.rows();
        if rows.len() <= device {
            rows.resize_with(device + 1, Vec::new);
        }
        let row = &mut rows[device];
        for sample in &batch.samples {
            let tag = sample.tag.0 as usize;
            if row.len() <= tag {
                row.resize(tag + 1, None);
            }
            row[tag] = Some(sample.clone());
        }
    }

    /// A copy of every device's row.
    pub fn snapshot(&self) -> Vec<Vec<Option<Sample>>> {
        self.rows().clone()
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
}
