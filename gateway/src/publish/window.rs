//! The in-flight window: which record each MQTT packet id stands for. Pure state, no I/O.
//!
//! rumqttc reports `Outgoing::Publish(pkid)` in the order publishes were submitted, so the k-th
//! such event belongs to the k-th submitted record; `PubAck(pkid)` then names the record. On a
//! lost connection the whole window is forgotten: with a clean session rumqttc drops its own
//! queue, and everything unacknowledged is sent again from the ledger or the disk.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

/// Records submitted to the MQTT client and not yet acknowledged.
#[derive(Debug)]
pub struct Window {
    capacity: usize,
    submitted: VecDeque<(u64, Instant)>,
    inflight: HashMap<u16, (u64, Instant)>,
    outstanding: HashSet<u64>,
}

impl Window {
    /// A window of at most `capacity` unacknowledged records.
    pub fn new(capacity: usize) -> Self {
        Window {
            capacity: capacity.max(1),
            submitted: VecDeque::new(),
            inflight: HashMap::new(),
            outstanding: HashSet::new(),
        }
    }

    /// Free places in the window.
    pub fn room(&self) -> usize {
        self.capacity.saturating_sub(self.outstanding.len())
    }

    /// Unacknowledged records.
    pub fn len(&self) -> usize {
        self.outstanding.len()
    }

    /// Whether nothing is outstanding.
    pub fn is_empty(&self) -> bool {
        self.outstanding.is_empty()
    }

    /// Whether `seq` is in the window (so a replay must not send it again).
    pub fn contains(&self, seq: u64) -> bool {
        self.outstanding.contains(&seq)
    }

    /// A record was handed to the MQTT client.
    pub fn submit(&mut self, seq: u64, now: Instant) {
        self.submitted.push_back((seq, now));
        self.outstanding.insert(seq);
    }

    /// The client wrote a publish with `pkid`: it is the oldest submitted record.
    pub fn on_outgoing(&mut self, pkid: u16) -> Option<u64> {
        let (seq, at) = self.submitted.pop_front()?;
        self.inflight.insert(pkid, (seq, at));
        Some(seq)
    }

    /// The broker acknowledged `pkid`: returns the record's seq and when it was submitted.
    pub fn on_ack(&mut self, pkid: u16) -> Option<(u64, Instant)> {
        let (seq, at) = self.inflight.remove(&pkid)?;
        self.outstanding.remove(&seq);
        Some((seq, at))
    }

    /// When the oldest unacknowledged record was submitted.
    pub fn oldest(&self) -> Option<Instant> {
        let a = self.submitted.iter().map(|(_, t)| *t).min();
        let b = self.inflight.values().map(|(_, t)| *t).min();
        a.into_iter().chain(b).min()
    }

    /// Forgets everything (connection lost); returns how many records were outstanding.
    pub fn clear(&mut self) -> usize {
        let n = self.outstanding.len();
        self.submitted.clear();
        self.inflight.clear();
        self.outstanding.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_map_back_to_sequence_numbers_in_submission_order() {
        let mut w = Window::new(3);
        let t = Instant::now();
        w.submit(10, t);
        w.submit(11, t);
        assert_eq!(w.room(), 1);
        assert_eq!(w.on_outgoing(1), Some(10));
        assert_eq!(w.on_outgoing(2), Some(11));
        assert_eq!(w.on_ack(2).map(|x| x.0), Some(11));
        assert!(w.contains(10));
        assert!(!w.contains(11));
        assert_eq!(w.on_ack(1).map(|x| x.0), Some(10));
        assert!(w.is_empty());
    }

    #[test]
    fn unknown_acks_are_ignored() {
        let mut w = Window::new(2);
        assert_eq!(w.on_ack(7), None);
        assert_eq!(w.on_outgoing(7), None);
    }

    #[test]
    fn clearing_forgets_the_window() {
        let mut w = Window::new(2);
        let t = Instant::now();
        w.submit(1, t);
        w.on_outgoing(1);
        w.submit(2, t);
        assert_eq!(w.oldest(), Some(t));
        assert_eq!(w.clear(), 2);
        assert_eq!(w.room(), 2);
        assert_eq!(w.oldest(), None);
    }
}
