//! The in-flight window: which record each MQTT packet id stands for. Pure state, no I/O.
//!
//! rumqttc reports `Outgoing::Publish(pkid)` in the order publishes were submitted, so the k-th
//! such event belongs to the k-th submitted record; `PubAck(pkid)` then names the record. On a
//! lost connection the whole window is forgotten: with a clean session rumqttc drops its own
//! queue, and everything unacknowledged is sent again from the ledger or the disk.
//!
//! The gateway's own status and meta messages go through the same client, so they take their
//! place in the submission order too ([`Window::submit_own`]); they stand for no record, never
//! count against the window's room, and their acknowledgement credits no record: it only
//! names the token they were submitted with.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

/// Records submitted to the MQTT client and not yet acknowledged.
#[derive(Debug)]
pub struct Window {
    capacity: usize,
    /// Handed to the client, not yet written.
    submitted: VecDeque<(Slot, Instant)>,
    inflight: HashMap<u16, (Slot, Instant)>,
    outstanding: HashSet<u64>,
}

/// What a publish handed to the client stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// A record, by its seq.
    Record(u64),
    /// One of the gateway's own messages, by the token it was submitted with.
    Own(u64),
}

/// What a PUBACK acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// A record, submitted at that time.
    Record(u64, Instant),
    /// One of the gateway's own messages (status, birth, meta), with its token.
    Own(u64),
}

/// The token of an own message whose acknowledgement nobody waits for.
pub const NO_TOKEN: u64 = 0;

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

    /// Changes the capacity (a broker's receive maximum); records already in flight stay.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
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
        self.submitted.push_back((Slot::Record(seq), now));
        self.outstanding.insert(seq);
    }

    /// A status message (or a Sparkplug birth or death) was handed to the MQTT client.
    pub fn submit_status(&mut self, now: Instant) {
        self.submit_own(now, NO_TOKEN);
    }

    /// One of the gateway's own messages was handed to the MQTT client; its PUBACK will name
    /// `token`.
    pub fn submit_own(&mut self, now: Instant, token: u64) {
        self.submitted.push_back((Slot::Own(token), now));
    }

    /// The gateway's own messages (status, meta) handed to the client and not yet written.
    pub fn own_unwritten(&self) -> usize {
        self.submitted
            .iter()
            .filter(|(slot, _)| matches!(slot, Slot::Own(_)))
            .count()
    }

    /// The client wrote a publish with `pkid`: it is the oldest submitted one. Returns the
    /// record's seq (`None` for a status message or an unknown publish).
    pub fn on_outgoing(&mut self, pkid: u16) -> Option<u64> {
        let (slot, at) = self.submitted.pop_front()?;
        self.inflight.insert(pkid, (slot, at));
        match slot {
            Slot::Record(seq) => Some(seq),
            Slot::Own(_) => None,
        }
    }

    /// The broker acknowledged `pkid`: what it was.
    pub fn on_ack(&mut self, pkid: u16) -> Option<Acked> {
        match self.inflight.remove(&pkid)? {
            (Slot::Record(seq), at) => {
                self.outstanding.remove(&seq);
                Some(Acked::Record(seq, at))
            }
            (Slot::Own(token), _) => Some(Acked::Own(token)),
        }
    }

    /// When the oldest unacknowledged record was submitted (status messages do not count).
    pub fn oldest(&self) -> Option<Instant> {
        let records = self.submitted.iter().chain(self.inflight.values());
        records
            .filter(|(slot, _)| matches!(slot, Slot::Record(_)))
            .map(|(_, t)| *t)
            .min()
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
        assert_eq!(w.on_ack(2), Some(Acked::Record(11, t)));
        assert!(w.contains(10));
        assert!(!w.contains(11));
        assert_eq!(w.on_ack(1), Some(Acked::Record(10, t)));
        assert!(w.is_empty());
    }

    #[test]
    fn a_status_message_keeps_its_place_in_the_order_and_credits_no_record() {
        let mut w = Window::new(2);
        let t = Instant::now();
        w.submit(10, t);
        w.submit_status(t);
        w.submit(11, t);
        // Status messages take no room.
        assert_eq!(w.room(), 0);
        assert_eq!(w.on_outgoing(1), Some(10));
        assert_eq!(w.on_outgoing(2), None);
        assert_eq!(w.on_outgoing(3), Some(11));
        assert_eq!(w.on_ack(2), Some(Acked::Own(NO_TOKEN)));
        assert!(w.contains(10) && w.contains(11));
        assert_eq!(w.on_ack(3), Some(Acked::Record(11, t)));
    }

    #[test]
    fn an_unacknowledged_status_message_does_not_make_the_link_look_dead() {
        let mut w = Window::new(2);
        let t = Instant::now();
        w.submit_status(t);
        w.on_outgoing(1);
        assert_eq!(w.oldest(), None);
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

    #[test]
    fn own_messages_count_as_unwritten_until_the_client_writes_them() {
        let mut w = Window::new(2);
        let t = Instant::now();
        w.submit_status(t);
        w.submit(1, t);
        w.submit_status(t);
        assert_eq!(w.own_unwritten(), 2);
        w.on_outgoing(10);
        assert_eq!(w.own_unwritten(), 1);
        w.on_outgoing(11);
        w.on_outgoing(12);
        assert_eq!(w.own_unwritten(), 0);
        assert_eq!(w.room(), 1, "own messages take no room");
    }

    #[test]
    fn an_own_message_is_acknowledged_by_the_token_it_was_submitted_with() {
        let mut w = Window::new(2);
        let t = Instant::now();
        w.submit_own(t, 7);
        w.submit(1, t);
        w.submit_own(t, 8);
        w.on_outgoing(1);
        w.on_outgoing(2);
        w.on_outgoing(3);
        assert_eq!(w.on_ack(3), Some(Acked::Own(8)));
        assert_eq!(w.on_ack(1), Some(Acked::Own(7)));
    }
}
