//! Which meta messages (`{topic_prefix}/{device}/meta`, retained, QoS 1) go out when. Pure
//! state; the publisher sends what [`MetaState::due`] gives, a few at a time.
//!
//! Invariants:
//! - After each CONNACK every current device's document goes out again (a broker may have
//!   lost its retained messages, or never had them).
//! - After a change (a reload) only the documents that differ from the last ones handed out go
//!   out, and a device that is gone gets an empty retained message, which deletes its retained
//!   meta from the broker; a device gone while the broker was away is cleared after the next
//!   CONNACK.
//! - Nothing here counts against the record window: like the status, a meta message stands
//!   for no record and its PUBACK credits nothing. At most [`MAX_UNWRITTEN`] of the gateway's
//!   own messages wait in the MQTT client's request channel at once, which is sized for the
//!   window plus a few.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use crate::encode::meta::MetaMessage;

/// The gateway's own messages (status, meta) handed to the MQTT client and not yet written, at
/// most: the client's request channel holds the window and 8 more.
pub const MAX_UNWRITTEN: usize = 4;

/// What was handed out, and what is still to go.
#[derive(Debug, Default)]
pub struct MetaState {
    /// The last document handed out per device (an empty payload: cleared).
    sent: BTreeMap<Arc<str>, Bytes>,
    /// Due on this connection, in order: device and payload (empty: clear).
    pending: VecDeque<(Arc<str>, Bytes)>,
}

impl MetaState {
    /// The documents are `current` now; `reconnected` after a CONNACK (everything goes out
    /// again), otherwise after a change (only what differs). Replaces what was still due.
    pub fn due(&mut self, current: &[MetaMessage], reconnected: bool) {
        let mut next: BTreeMap<Arc<str>, Bytes> = BTreeMap::new();
        let mut pending = VecDeque::new();
        for m in current {
            let same = self.sent.get(&m.device) == Some(&m.payload);
            if reconnected || !same {
                pending.push_back((m.device.clone(), m.payload.clone()));
            }
            next.insert(m.device.clone(), m.payload.clone());
        }
        for device in self.sent.keys() {
            if !next.contains_key(device) {
                pending.push_back((device.clone(), Bytes::new()));
            }
        }
        // Clears stay remembered until they went out on a connection.
        for (device, payload) in &pending {
            next.entry(device.clone())
                .or_insert_with(|| payload.clone());
        }
        self.sent = next;
        self.pending = pending;
    }

    /// The next message to send, if any.
    pub fn take_next(&mut self) -> Option<(Arc<str>, Bytes)> {
        let out = self.pending.pop_front()?;
        if out.1.is_empty() {
            // Cleared once on the broker: forgotten.
            self.sent.remove(&out.0);
        }
        Some(out)
    }

    /// Whether messages are waiting to go out.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(device: &str, body: &str) -> MetaMessage {
        MetaMessage {
            device: device.into(),
            payload: Bytes::from(body.to_owned()),
        }
    }

    fn drain(s: &mut MetaState) -> Vec<(String, String)> {
        std::iter::from_fn(|| s.take_next())
            .map(|(d, p)| (d.to_string(), String::from_utf8(p.to_vec()).unwrap()))
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(d, p)| (d.to_string(), p.to_string()))
            .collect()
    }

    #[test]
    fn every_document_goes_out_after_each_connack() {
        let mut s = MetaState::default();
        let current = [doc("a", "A1"), doc("b", "B1")];
        s.due(&current, true);
        assert_eq!(drain(&mut s), pairs(&[("a", "A1"), ("b", "B1")]));
        s.due(&current, true);
        assert_eq!(drain(&mut s), pairs(&[("a", "A1"), ("b", "B1")]));
    }

    #[test]
    fn a_change_sends_only_the_documents_that_differ() {
        let mut s = MetaState::default();
        s.due(&[doc("a", "A1"), doc("b", "B1")], true);
        drain(&mut s);
        s.due(&[doc("a", "A1"), doc("b", "B2"), doc("c", "C1")], false);
        assert_eq!(drain(&mut s), pairs(&[("b", "B2"), ("c", "C1")]));
        s.due(&[doc("a", "A1"), doc("b", "B2"), doc("c", "C1")], false);
        assert!(!s.has_pending());
    }

    #[test]
    fn a_device_that_is_gone_gets_an_empty_retained_message_once() {
        let mut s = MetaState::default();
        s.due(&[doc("a", "A1"), doc("b", "B1")], true);
        drain(&mut s);
        s.due(&[doc("a", "A1")], false);
        assert_eq!(drain(&mut s), pairs(&[("b", "")]));
        s.due(&[doc("a", "A1")], true);
        assert_eq!(
            drain(&mut s),
            pairs(&[("a", "A1")]),
            "cleared once is enough"
        );
    }

    #[test]
    fn a_device_removed_while_the_broker_was_away_is_cleared_after_the_next_connack() {
        let mut s = MetaState::default();
        s.due(&[doc("a", "A1"), doc("b", "B1")], true);
        drain(&mut s);
        // The reload came while disconnected: nothing was sent, the next CONNACK sends all.
        s.due(&[doc("a", "A2")], false);
        s.due(&[doc("a", "A2")], true);
        assert_eq!(drain(&mut s), pairs(&[("a", "A2"), ("b", "")]));
    }
}
