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
//! - A clear is remembered until the broker acknowledged it ([`MetaState::acked`] with the
//!   token it went out with): one lost with its connection goes again after the next
//!   CONNACK, so a removed device's catalog never stays retained.
//! - Nothing here counts against the record window: like the status, a meta message stands
//!   for no record and its PUBACK credits nothing. At most [`MAX_UNWRITTEN`] of the gateway's
//!   own messages wait in the MQTT client's request channel at once, which is sized for the
//!   window plus a few.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use crate::encode::meta::MetaMessage;
use crate::publish::window::NO_TOKEN;

/// The gateway's own messages (status, meta) handed to the MQTT client and not yet written, at
/// most: the client's request channel holds the window and 8 more.
pub const MAX_UNWRITTEN: usize = 4;

/// What was handed out, and what is still to go.
#[derive(Debug, Default)]
pub struct MetaState {
    /// The digest of the last document handed out per device (`None`: a clear not yet
    /// acknowledged).
    sent: BTreeMap<Arc<str>, Option<u64>>,
    /// Due on this connection, in order: the document, or `None` for a clear of the device.
    pending: VecDeque<(Arc<str>, Option<MetaMessage>)>,
    /// Clears handed out on this connection, by their token.
    clearing: BTreeMap<u64, Arc<str>>,
    /// The last token given.
    last_token: u64,
}

impl MetaState {
    /// The documents are `current` now; `reconnected` after a CONNACK (everything goes out
    /// again), otherwise after a change (only what differs). Replaces what was still due.
    pub fn due(&mut self, current: &[MetaMessage], reconnected: bool) {
        let mut next: BTreeMap<Arc<str>, Option<u64>> = BTreeMap::new();
        let mut pending = VecDeque::new();
        // What was due and not handed out yet is no more "sent" than before.
        let untaken: BTreeSet<Arc<str>> = self.pending.iter().map(|(d, _)| d.clone()).collect();
        for m in current {
            let same =
                !untaken.contains(&m.device) && self.sent.get(&m.device) == Some(&Some(m.digest));
            if reconnected || !same {
                pending.push_back((m.device.clone(), Some(m.clone())));
            }
            next.insert(m.device.clone(), Some(m.digest));
        }
        if reconnected {
            // Acknowledgements of the old connection will never come.
            self.clearing.clear();
        }
        for device in self.sent.keys() {
            if next.contains_key(device) {
                continue;
            }
            // Gone: cleared, unless a clear of it is on its way on this connection.
            let on_its_way = self.clearing.values().any(|d| d == device);
            if !on_its_way {
                pending.push_back((device.clone(), None));
            }
            next.insert(device.clone(), None);
        }
        self.sent = next;
        self.pending = pending;
    }

    /// The next message to send, if any (its document rendered now; empty for a clear), with
    /// the token its acknowledgement is to name ([`NO_TOKEN`] for a document).
    pub fn take_next(&mut self) -> Option<(Arc<str>, Bytes, u64)> {
        let (device, message) = self.pending.pop_front()?;
        Some(match message {
            Some(m) => (device, m.payload(), NO_TOKEN),
            None => {
                self.last_token += 1;
                self.clearing.insert(self.last_token, device.clone());
                (device, Bytes::new(), self.last_token)
            }
        })
    }

    /// The broker acknowledged the message that went out with `token`: a clear is done with
    /// (unless the device came back meanwhile).
    pub fn acked(&mut self, token: u64) {
        if let Some(device) = self.clearing.remove(&token) {
            if self.sent.get(&device).is_some_and(Option::is_none) {
                self.sent.remove(&device);
            }
        }
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
        MetaMessage::fixed(device, body)
    }

    /// Everything due, each acknowledged at once.
    fn drain(s: &mut MetaState) -> Vec<(String, String)> {
        let out = std::iter::from_fn(|| s.take_next()).collect::<Vec<_>>();
        for (_, _, token) in &out {
            s.acked(*token);
        }
        out.into_iter()
            .map(|(d, p, _)| (d.to_string(), String::from_utf8(p.to_vec()).unwrap()))
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

    #[test]
    fn a_clear_lost_with_its_connection_goes_again_after_the_next_connack() {
        let mut s = MetaState::default();
        s.due(&[doc("a", "A1"), doc("b", "B1")], true);
        drain(&mut s);
        s.due(&[doc("a", "A1")], false);
        let (device, payload, _unacked) = s.take_next().unwrap();
        assert_eq!((&*device, payload.is_empty()), ("b", true));
        // Another change on the same connection: the clear is on its way, not sent twice.
        s.due(&[doc("a", "A2")], false);
        assert_eq!(drain(&mut s), pairs(&[("a", "A2")]));
        // The connection dropped before the PUBACK.
        s.due(&[doc("a", "A2")], true);
        assert_eq!(drain(&mut s), pairs(&[("a", "A2"), ("b", "")]));
        s.due(&[doc("a", "A2")], true);
        assert_eq!(drain(&mut s), pairs(&[("a", "A2")]), "acknowledged: done");
    }

    #[test]
    fn a_device_back_before_its_clear_was_acknowledged_keeps_its_document() {
        let mut s = MetaState::default();
        s.due(&[doc("a", "A1")], true);
        drain(&mut s);
        s.due(&[], false);
        let (_, _, token) = s.take_next().unwrap();
        s.due(&[doc("a", "A2")], false);
        s.acked(token);
        assert_eq!(drain(&mut s), pairs(&[("a", "A2")]));
        s.due(&[doc("a", "A2")], false);
        assert!(!s.has_pending(), "its document stays known");
    }

    #[test]
    fn what_was_due_and_not_yet_handed_out_stays_due_through_another_change() {
        let mut s = MetaState::default();
        s.due(&[doc("a", "A1"), doc("b", "B1")], true);
        drain(&mut s);
        // b removed, a changed; nothing handed out before the next change.
        s.due(&[doc("a", "A2")], false);
        s.due(&[doc("a", "A2"), doc("c", "C1")], false);
        let mut out = drain(&mut s);
        out.sort();
        assert_eq!(out, pairs(&[("a", "A2"), ("b", ""), ("c", "C1")]));
    }
}
