//! The publisher's side of commands: the subscriptions to `{topic_prefix}/+/cmd` (devices)
//! and `{topic_prefix}/+/+/cmd` (units of a Modbus line) after each CONNACK, command publishes
//! handed to the commands task (a bounded channel; a command that finds it full is dropped,
//! audited and counted, never queued without bound), and replies sent at QoS 0,
//! which take no packet id and no place in the records' window. Commands never touch the
//! ledger or the buffer.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tracing::{debug, warn};

use super::link::Sender;
use crate::commands::task::{device_of, filters, CommandLink, Incoming, Reply};

/// Subscribes to the command topics, when commands are on.
pub(super) async fn subscribe(client: &Sender, link: Option<&CommandLink>, topic_prefix: &str) {
    if link.is_none() {
        return;
    }
    for filter in filters(topic_prefix) {
        if let Err(e) = client.subscribe(&filter).await {
            warn!(filter = %filter, error = %e, "cannot subscribe to the command topics");
        }
    }
}

/// Whether `topic` is a command topic, `{topic_prefix}/{device}/cmd`.
pub(super) fn is_command_topic(topic_prefix: &str, topic: &str) -> bool {
    device_of(topic_prefix, topic).is_some()
}

/// Hands a publish from the broker to the commands task. A retained command is never
/// executed: the broker would hand it again at every reconnect and restart, and the write
/// would be repeated long after anyone asked for it. What never reaches the task is counted
/// in `refused` here.
pub(super) fn forward(
    link: Option<&CommandLink>,
    topic: String,
    payload: Bytes,
    retain: bool,
    refused: &AtomicU64,
) {
    let Some(link) = link else {
        debug!(topic = %topic, "publish received while commands are off; ignored");
        return;
    };
    if retain {
        refuse_retained(&topic, refused);
        return;
    }
    hand_over(link, Incoming::Json { topic, payload }, refused);
}

/// Hands a Sparkplug DCMD's writes to the commands task. The node subscribes to DCMD whatever
/// `[commands]` says, so one that comes while commands are off is refused here; like a JSON
/// command, a retained one is never executed.
pub(super) fn forward_sparkplug(
    link: Option<&CommandLink>,
    incoming: Incoming,
    retain: bool,
    refused: &AtomicU64,
) {
    let Incoming::Sparkplug { topic, .. } = &incoming else {
        return;
    };
    let Some(link) = link else {
        warn!(target: "audit", source_topic = %topic, outcome = "refused", reason = "commands are disabled on this gateway", "a DCMD arrived while commands are off; nothing written");
        refused.fetch_add(1, Ordering::Relaxed);
        return;
    };
    if retain {
        refuse_retained(topic, refused);
        return;
    }
    hand_over(link, incoming, refused);
}

fn refuse_retained(topic: &str, refused: &AtomicU64) {
    warn!(target: "audit", source_topic = %topic, outcome = "refused", reason = "retained", "a retained command is never executed (publish commands without retain)");
    refused.fetch_add(1, Ordering::Relaxed);
}

/// A command into the commands task's bounded channel, or dropped (audited, counted as
/// refused) when it is full.
fn hand_over(link: &CommandLink, incoming: Incoming, refused: &AtomicU64) {
    if let Err(e) = link.incoming.try_send(incoming) {
        let (tokio::sync::mpsc::error::TrySendError::Full(i)
        | tokio::sync::mpsc::error::TrySendError::Closed(i)) = e;
        let topic = match i {
            Incoming::Json { topic, .. } | Incoming::Sparkplug { topic, .. } => topic,
        };
        warn!(target: "audit", source_topic = %topic, outcome = "refused", reason = "busy", "command dropped: the commands task is busy (too many commands at once)");
        refused.fetch_add(1, Ordering::Relaxed);
    }
}

/// The next reply to publish; never when commands are off (or their task ended).
pub(super) async fn next_reply(link: &mut Option<CommandLink>) -> Reply {
    let Some(l) = link.as_mut() else {
        return std::future::pending().await;
    };
    match l.replies.recv().await {
        Some(reply) => reply,
        None => {
            *link = None;
            std::future::pending().await
        }
    }
}

/// Replies handed to the MQTT client and not yet written, at most: with the gateway's own
/// messages ([`super::meta::MAX_UNWRITTEN`] and a status) they stay within the 8 places the
/// client's request channel has beyond the window, so a record's publish never waits on a
/// full channel (which would stop the loop that drains it).
pub(super) const MAX_REPLIES_UNWRITTEN: usize = 3;

/// Publishes a reply at QoS 0.
/// Says whether the client took it.
pub(super) fn send_reply(client: &Sender, reply: Reply) -> bool {
    match client.try_publish_qos0(reply.topic, reply.payload) {
        Ok(()) => true,
        Err(e) => {
            debug!(error = %e, "command reply not accepted by the MQTT client");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_command_topic;

    #[test]
    fn a_command_topic_is_the_prefix_one_device_and_cmd() {
        assert!(is_command_topic("plant/gw", "plant/gw/press1/cmd"));
        assert!(is_command_topic("plant/gw", "plant/gw/meters/m3/cmd"));
        assert!(!is_command_topic("plant/gw", "plant/gw/press1/cmd/reply"));
        assert!(!is_command_topic("plant/gw", "plant/gw//cmd"));
        assert!(!is_command_topic("plant/gw", "plant/gwx/press1/cmd"));
        assert!(!is_command_topic("plant/gw", "spBv1.0/g/NCMD/gw"));
    }
}
