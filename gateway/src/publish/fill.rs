//! Filling the window: live records first, then the backlog from disk (paced), each record
//! after the births or deaths due before it; and the hand-over of one record to the client.

use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::{Live, Publisher, PACKET_OVERHEAD, REPLAY_CHUNK};
use crate::metrics::Metrics;

impl Publisher {
    /// Submits live records, then replayed ones, while the window has room.
    pub(super) async fn fill_window(&mut self) {
        if let Some(until) = self.refused_until {
            if Instant::now() < until {
                return;
            }
            self.refused_until = None;
        }
        if !self.data_allowed() || self.session_waiting() {
            // Sparkplug: nothing before this connection's NBIRTH, and no record before the
            // births and deaths already due.
            return;
        }
        while self.window.room() > 0 && !self.session_waiting() {
            let Some((item, queued)) = self.live.pop_front() else {
                break;
            };
            let r = match item {
                Live::Record(r) => r,
                Live::Device(d, online) => {
                    self.device_changed(d, online).await;
                    continue;
                }
            };
            // A record that waited out a commit interval (an outage) went the store-and-forward
            // way, even when it is still in memory: it is flagged historical like a replayed one.
            let stale = queued.elapsed() >= self.commit_interval;
            if stale && self.pace.is_limited() && !self.shared.ledger().is_pending(r.seq) {
                // With a replay rate, a record already on disk (or being committed, or
                // acknowledged) is left to the replay, which paces it; the commit pointed the
                // replay at it. One held in memory only (commits failing) goes now: nothing
                // else would send it.
                self.live_bytes -= r.payload.len();
                continue;
            }
            self.birth_for_record(&r.topic).await;
            if self.session_waiting() {
                // Its device's DBIRTH waits for the client: the record goes after it.
                self.live.push_front((Live::Record(r), queued));
                break;
            }
            self.live_bytes -= r.payload.len();
            let payload = if stale {
                r.historical_payload()
            } else {
                r.payload.clone()
            };
            self.submit(&r.topic, payload, r.seq).await;
        }
        // While draining for shutdown only live records go out: the backlog stays on disk.
        let held_back = self.replay_held_until.is_some_and(|t| Instant::now() < t);
        while self.window.room() > 0 && !self.draining && !held_back && !self.session_waiting() {
            let Some(from) = self.replay_from else {
                break;
            };
            let limit = self
                .pace
                .allowance(Instant::now(), self.window.room().min(REPLAY_CHUNK));
            if limit == 0 {
                break;
            }
            // The ledger's lock is taken per record, not across the read: a read can open a
            // sealed generation, and the writer must not wait for that.
            let (window, shared, too_large) = (&self.window, &self.shared, &self.too_large);
            let chunk = shared.buffer.read_range(from, u64::MAX, limit, |s| {
                window.contains(s) || too_large.contains(&s) || shared.ledger().is_acknowledged(s)
            });
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    // Tried again in a second (the periodic check wakes the loop), not on
                    // every event: one warning per failure, not a flood.
                    Metrics::add(&self.shared.metrics.io_errors, 1);
                    if self.replay_held_until.is_none() {
                        warn!(error = %e, "cannot read the buffer for replay; retrying every second");
                    } else {
                        debug!(error = %e, "buffer read for replay failed again");
                    }
                    self.replay_held_until = Some(Instant::now() + Duration::from_secs(1));
                    break;
                }
            };
            if self.replay_held_until.take().is_some() {
                info!("the buffer reads again; replay goes on");
            }
            let Some(last) = chunk.last().map(|r| r.seq) else {
                if from > 0 && !self.shared.buffer.is_empty() {
                    // Nothing past the cursor, yet records are on disk: one more pass from the
                    // start, so none is left behind until the next reconnect (it skips the
                    // ones in flight or acknowledged, and ends the replay when it finds none).
                    self.replay_from = Some(0);
                    continue;
                }
                self.replay_from = None;
                break;
            };
            self.replay_from = Some(last + 1);
            self.pace.spend(chunk.len());
            for r in chunk {
                self.birth_for_record(&r.topic).await;
                if self.session_waiting() {
                    // Its device's DBIRTH waits for the client: read again from here after it.
                    self.replay_from = Some(r.seq);
                    break;
                }
                Metrics::add(&self.shared.metrics.replayed, 1);
                let payload = r.historical_payload();
                self.submit(&r.topic, payload, r.seq).await;
            }
        }
        if self.replay_from.is_none() && self.live.is_empty() {
            self.deaths_after_history().await;
        }
    }

    /// Hands one record to the client, unless it exceeds the broker's packet size (it stays in
    /// the ledger or on disk; a record made before the broker said its limit cannot be split
    /// without a new seq).
    async fn submit(&mut self, topic: &str, payload: bytes::Bytes, seq: u64) {
        let limit = self
            .limits
            .maximum_packet_size
            .map_or(usize::MAX, |m| m as usize);
        if topic.len() + payload.len() + PACKET_OVERHEAD > limit {
            self.too_large.insert(seq);
            Metrics::add(&self.shared.metrics.too_large_for_broker, 1);
            if !self.too_large_logged {
                error!(seq, bytes = payload.len(), broker_max = limit, "a record is larger than the broker's maximum packet size; it stays in the buffer (new records are made smaller)");
                self.too_large_logged = true;
            }
            return;
        }
        let out = self.aliases.outbound(topic);
        let payload = self.sequenced(payload);
        let size = payload.len();
        match self.client.publish(out, payload).await {
            Ok(()) => {
                self.window.submit(seq, Instant::now());
                Metrics::add(&self.shared.metrics.published, 1);
                Metrics::add(
                    &self.shared.metrics.published_bytes,
                    (topic.len() + size) as u64,
                );
            }
            Err(e) => {
                // Only possible when the event loop is gone; the record stays in ledger or disk.
                debug!(error = %e, seq, "publish not accepted by the MQTT client");
            }
        }
    }
}
