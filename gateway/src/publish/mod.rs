//! The MQTT publisher: owns the rumqttc client and event loop.
//!
//! Invariants:
//! - Live records go out first, as they come; replayed records from disk fill what is left of
//!   the window, oldest first, flagged historical. Live data is never starved by a backlog.
//! - Publishes are submitted only while connected (between a CONNACK and the next error), so
//!   every `Outgoing::Publish` belongs to the current connection and maps to the right record.
//! - On any connection error the window is forgotten and nothing is taken as delivered: the
//!   records are still in the ledger (committed within `commit_interval`) or on disk, and go out
//!   again after the next CONNACK. Records keep queueing for live sending while disconnected; one
//!   that falls out of the bounded live queue is simply left to the ledger and comes back
//!   through the disk.
//! - A window that sees no PUBACK for `ack_timeout` is a dead link: the connection is dropped.
//!   A slow link that keeps acknowledging is not dead, however long a full window takes to
//!   drain; a record left unacknowledged for `ack_timeout` while later ones are acknowledged
//!   is a broker that skipped it, and drops the connection too (see [`dead_link`]).

pub mod pace;
pub(crate) mod tls;
pub mod window;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocols::backoff::Backoff;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, error, info, warn};

use crate::buffer::Record;
use crate::config::MqttSettings;
use crate::metrics::Metrics;
use crate::pipeline::ledger::AckOutcome;
use crate::pipeline::Shared;
use pace::Pace;
use window::Window;

/// Records read from disk per replay step.
const REPLAY_CHUNK: usize = 64;
/// Payload bytes the live queue holds at most while the broker is away; older records fall back
/// to the ledger and the disk buffer.
const LIVE_BYTES: usize = 16 << 20;

type PollResult = (EventLoop, Option<Result<Event, ConnectionError>>);
type PollFuture = Pin<Box<dyn Future<Output = PollResult> + Send>>;

/// Polls the event loop once, after `delay`; a kick abandons the poll (to drop the connection).
/// The event loop is moved in and handed back, so the publisher can keep one poll running across
/// its `select!` without cancelling it whenever a record arrives.
fn poll_after(mut el: EventLoop, delay: Duration, kick: Arc<Notify>) -> PollFuture {
    Box::pin(async move {
        if !delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = kick.notified() => return (el, None),
            }
        }
        let r = tokio::select! {
            r = el.poll() => Some(r),
            _ = kick.notified() => None,
        };
        (el, r)
    })
}

/// Whether a connection with unacknowledged records is dead: the oldest was submitted at
/// `oldest`, the last PUBACK came at `last_ack.0` for a record submitted at `last_ack.1`. Dead
/// when nothing was acknowledged for `timeout` since the oldest went out, or when the oldest
/// waited `timeout` while a record submitted after it was acknowledged (the broker skipped it).
pub fn dead_link(
    now: Instant,
    oldest: Instant,
    last_ack: Option<(Instant, Instant)>,
    timeout: Duration,
) -> bool {
    let waited = |since: Instant| now.saturating_duration_since(since) > timeout;
    match last_ack {
        None => waited(oldest),
        Some((acked_at, submitted)) => {
            waited(oldest.max(acked_at)) || (waited(oldest) && submitted > oldest)
        }
    }
}

/// Drops what rumqttc remembers of a finished connection beyond its own `clean()`: its events,
/// a packet-id collision, and the publishes it would send again before anything new (it keeps
/// them when a broker answers "session present"). The gateway re-sends from its ledger and the
/// disk; a publish rumqttc re-sent on its own would shift the window's pkid-to-record mapping.
fn forget_old_connection(el: &mut EventLoop) {
    el.state.events.clear();
    el.state.collision = None;
    el.pending.clear();
}

/// Whether a CONNACK contradicts the clean session the gateway always asks for.
fn claims_a_session(event: &Option<Result<Event, ConnectionError>>) -> bool {
    matches!(event, Some(Ok(Event::Incoming(Packet::ConnAck(ack)))) if ack.session_present)
}

/// Builds the MQTT client options from the settings.
pub fn mqtt_options(settings: &MqttSettings, password: Option<String>) -> MqttOptions {
    let mut o = MqttOptions::new(&settings.client_id, &settings.host, settings.port);
    o.set_keep_alive(settings.keep_alive.max(Duration::from_secs(1)));
    o.set_clean_session(true);
    // rumqttc's own limit stays far above the window so packet ids are not reused while a
    // broker acknowledges out of order.
    o.set_inflight(settings.max_inflight.saturating_mul(4).max(16));
    o.set_max_packet_size(64 * 1024, settings.max_packet_size);
    o.set_request_channel_capacity(usize::from(settings.max_inflight) + 8);

    if let Some(user) = &settings.username {
        o.set_credentials(user, password.unwrap_or_default());
    }
    o
}

/// The publisher task.
pub struct Publisher {
    settings: MqttSettings,
    client: AsyncClient,
    shared: Arc<Shared>,
    window: Window,
    live: VecDeque<(Arc<Record>, Instant)>,
    live_cap: usize,
    /// Payload bytes in `live`, capped at LIVE_BYTES: OPC UA records of 10k samples are
    /// half a megabyte each, so a count alone does not bound memory during an outage.
    live_bytes: usize,
    commit_interval: Duration,
    replay_from: Option<u64>,
    /// The last PUBACK on this connection: when it came, and when its record was submitted.
    last_ack: Option<(Instant, Instant)>,
    /// Paces the replay at `replay_rate`.
    pace: Pace,
    /// After a failed read of the buffer, the replay waits until then.
    replay_held_until: Option<Instant>,
    connected: bool,
    draining: bool,
    /// A CONNACK claiming a session was logged (once per run of such answers).
    session_lie_logged: bool,
    down_logged: bool,
    kick: Arc<Notify>,
}

impl Publisher {
    /// Runs the publisher until the live channel closes (the writer is done) and the grace
    /// period for outstanding acknowledgements has passed.
    pub async fn run(
        settings: MqttSettings,
        commit_interval: Duration,
        replay_rate: Option<u32>,
        password: Option<String>,
        shared: Arc<Shared>,
        mut live_rx: mpsc::Receiver<Arc<Record>>,
    ) {
        let options = mqtt_options(&settings, password);
        let (client, mut eventloop) =
            AsyncClient::new(options, usize::from(settings.max_inflight) + 8);
        // Nagle's algorithm holds a small publish until TCP has acknowledged the previous one,
        // and the broker's delayed ACK makes that about 40 ms: records go out as they come.
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let window_cap = usize::from(settings.max_inflight);
        let mut p = Publisher {
            settings,
            client,
            shared,
            window: Window::new(window_cap),
            live: VecDeque::new(),
            live_cap: window_cap * 4,
            live_bytes: 0,
            commit_interval,
            replay_from: None,
            last_ack: None,
            pace: Pace::new(replay_rate),
            replay_held_until: None,
            connected: false,
            draining: false,
            down_logged: false,
            session_lie_logged: false,
            kick: Arc::new(Notify::new()),
        };
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(15));
        let mut poll = poll_after(eventloop, Duration::ZERO, p.kick.clone());
        let mut check = tokio::time::interval(Duration::from_millis(500));
        let mut draining_until: Option<tokio::time::Instant> = None;

        loop {
            if p.connected {
                p.fill_window().await;
            }
            if let Some(deadline) = draining_until {
                let done = p.window.is_empty() && p.live.is_empty();
                if done || tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
            let now = Instant::now();
            let replay_at = if p.connected && p.replay_from.is_some() && !p.draining {
                p.pace.next_at(now)
            } else {
                None
            };
            tokio::select! {
                (el, event) = &mut poll => {
                    let mut el = el;
                    if matches!(event, Some(Ok(Event::Incoming(Packet::ConnAck(_))))) {
                        // rumqttc keeps events and a packet-id collision of the previous
                        // connection across `clean()`: a stale `Outgoing::Publish` would shift
                        // the window's pkid mapping and credit an ack to the wrong record.
                        forget_old_connection(&mut el);
                    }
                    let delay = match event {
                        _ if claims_a_session(&event) => {
                            // MQTT forbids it; a broker that does it may hold anything of an
                            // old session: a protocol error, never a connection to publish on.
                            if !p.session_lie_logged {
                                error!(host = %p.settings.host, port = p.settings.port, "the broker answered a clean-session CONNECT with \"session present\" (MQTT forbids it); not publishing on this connection, retrying");
                                p.session_lie_logged = true;
                            }
                            p.on_disconnect("CONNACK with session present for a clean session");
                            el.clean();
                            forget_old_connection(&mut el);
                            backoff.next_delay()
                        }
                        Some(Ok(ev)) => {
                            if p.on_event(ev) {
                                backoff.reset();
                            }
                            Duration::ZERO
                        }
                        Some(Err(e)) => {
                            p.on_disconnect(&e.to_string());
                            backoff.next_delay()
                        }
                        None => {
                            // Kicked: drop the network so the next poll makes a new connection.
                            if p.connected {
                                p.on_disconnect("connection abandoned");
                            }
                            el.clean();
                            forget_old_connection(&mut el);
                            backoff.next_delay()
                        }
                    };
                    poll = poll_after(el, delay, p.kick.clone());
                }
                rec = live_rx.recv(), if draining_until.is_none() => match rec {
                    Some(r) => p.queue_live(r),
                    None => {
                        let grace = p.settings.shutdown_grace;
                        debug!(outstanding = p.window.len(), grace_ms = grace.as_millis() as u64, "publisher draining");
                        draining_until = Some(tokio::time::Instant::now() + grace);
                        p.draining = true;
                    }
                },
                _ = p.shared.committed.notified() => {
                    if let Some(seq) = p.shared.take_replay_hint() {
                        p.replay_from = Some(p.replay_from.map_or(seq, |c| c.min(seq)));
                    }
                }
                _ = check.tick() => p.check_ack_timeout(),
                // The replay waits for its pace; live records and acknowledgements wake the
                // loop on their own.
                _ = tokio::time::sleep_until(replay_at.unwrap_or(now).into()), if replay_at.is_some() => {}
            }
        }
        p.disconnect(poll).await;
    }

    /// Queues a record to go out live, also while disconnected: a connection that comes back
    /// within the commit interval (or the first one at start-up) then costs no disk write. When
    /// the queue is full its oldest record is dropped from memory: it is still in the ledger, is
    /// committed, and comes back through the replay.
    fn queue_live(&mut self, r: Arc<Record>) {
        self.live_bytes += r.payload.len();
        self.live.push_back((r, Instant::now()));
        while self.live.len() > self.live_cap
            || (self.live_bytes > LIVE_BYTES && self.live.len() > 1)
        {
            if let Some((old, _)) = self.live.pop_front() {
                self.live_bytes -= old.payload.len();
            }
        }
    }

    /// Submits live records, then replayed ones, while the window has room.
    async fn fill_window(&mut self) {
        while self.window.room() > 0 {
            let Some((r, queued)) = self.live.pop_front() else {
                break;
            };
            self.live_bytes -= r.payload.len();
            // A record that waited out a commit interval (an outage) went the store-and-forward
            // way, even when it is still in memory: it is flagged historical like a replayed one.
            let stale = queued.elapsed() >= self.commit_interval;
            if stale && self.pace.is_limited() && !self.shared.ledger().is_pending(r.seq) {
                // With a replay rate, a record already on disk (or being committed, or
                // acknowledged) is left to the replay, which paces it; the commit pointed the
                // replay at it. One held in memory only (commits failing) goes now: nothing
                // else would send it.
                continue;
            }
            let payload = if stale {
                r.historical_payload()
            } else {
                r.payload.clone()
            };
            self.submit(&r.topic, payload, r.seq).await;
        }
        // While draining for shutdown only live records go out: the backlog stays on disk.
        let held_back = self.replay_held_until.is_some_and(|t| Instant::now() < t);
        while self.window.room() > 0 && !self.draining && !held_back {
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
            let (window, shared) = (&self.window, &self.shared);
            let chunk = shared.buffer.read_range(from, u64::MAX, limit, |s| {
                window.contains(s) || shared.ledger().is_acknowledged(s)
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
                Metrics::add(&self.shared.metrics.replayed, 1);
                let payload = r.historical_payload();
                self.submit(&r.topic, payload, r.seq).await;
            }
        }
    }

    async fn submit(&mut self, topic: &str, payload: bytes::Bytes, seq: u64) {
        match self
            .client
            .publish_bytes(topic, QoS::AtLeastOnce, false, payload)
            .await
        {
            Ok(()) => {
                self.window.submit(seq, Instant::now());
                Metrics::add(&self.shared.metrics.published, 1);
            }
            Err(e) => {
                // Only possible when the event loop is gone; the record stays in ledger or disk.
                debug!(error = %e, seq, "publish not accepted by the MQTT client");
            }
        }
    }

    /// Handles one event; returns true when a connection was established.
    fn on_event(&mut self, ev: Event) -> bool {
        match ev {
            Event::Incoming(Packet::ConnAck(_)) => {
                info!(host = %self.settings.host, port = self.settings.port, "connected to MQTT broker");
                self.connected = true;
                self.down_logged = false;
                self.session_lie_logged = false;
                self.window.clear();
                self.last_ack = None;
                // Everything on disk is unacknowledged: replay it from the start.
                self.replay_from = Some(0);
                let m = &self.shared.metrics;
                m.mqtt_connected.store(true, Ordering::Relaxed);
                Metrics::add(&m.mqtt_connects, 1);
                return true;
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                self.window.on_outgoing(pkid);
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                warn!(
                    pkid,
                    "broker acknowledges out of order and a packet id collided; reconnecting"
                );
                self.kick.notify_one();
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some((seq, submitted)) = self.window.on_ack(ack.pkid) {
                    self.last_ack = Some((Instant::now(), submitted));
                    let m = &self.shared.metrics;
                    Metrics::add(&m.acked, 1);
                    // A record that was committed is deleted by the committer's next tick.
                    let _: AckOutcome = self.shared.ledger().ack(seq);
                }
            }
            _ => {}
        }
        false
    }

    fn on_disconnect(&mut self, error: &str) {
        let lost = self.window.clear();
        if self.connected || !self.down_logged {
            warn!(host = %self.settings.host, port = self.settings.port, error, unacknowledged = lost, "MQTT connection lost; buffering to disk and retrying");
            self.down_logged = true;
        } else {
            debug!(error, "MQTT reconnect failed");
        }
        self.connected = false;
        self.shared
            .metrics
            .mqtt_connected
            .store(false, Ordering::Relaxed);
    }

    fn check_ack_timeout(&mut self) {
        if let Some(oldest) = self.window.oldest() {
            if dead_link(
                Instant::now(),
                oldest,
                self.last_ack,
                self.settings.ack_timeout,
            ) {
                warn!(
                    timeout_s = self.settings.ack_timeout.as_secs(),
                    outstanding = self.window.len(),
                    "no PUBACK within the ack timeout; dropping the MQTT connection"
                );
                self.on_disconnect("ack timeout");
                self.kick.notify_one();
            }
        }
    }

    async fn disconnect(&mut self, poll: PollFuture) {
        let outstanding = self.window.len();
        if outstanding > 0 {
            info!(
                outstanding,
                "shutting down with unacknowledged records; they are committed to disk"
            );
        }
        if !self.connected {
            return;
        }
        let _ = self.client.try_disconnect();
        // Give the event loop a moment to send DISCONNECT.
        let mut poll = poll;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        loop {
            let r = tokio::time::timeout_at(deadline, &mut poll).await;
            match r {
                Ok((el, Some(Ok(Event::Outgoing(Outgoing::Disconnect))))) => {
                    drop(el);
                    break;
                }
                Ok((el, Some(Ok(_)))) => poll = poll_after(el, Duration::ZERO, self.kick.clone()),
                _ => break,
            }
        }
        self.shared
            .metrics
            .mqtt_connected
            .store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(30);

    #[test]
    fn a_window_without_any_puback_for_the_timeout_is_a_dead_link() {
        let t0 = Instant::now();
        assert!(!dead_link(t0 + Duration::from_secs(29), t0, None, T));
        assert!(dead_link(t0 + Duration::from_secs(31), t0, None, T));
        // The last PUBACK was long ago, before the oldest record went out.
        let long_ago = Some((t0, t0));
        let oldest = t0 + Duration::from_secs(100);
        assert!(dead_link(
            oldest + Duration::from_secs(31),
            oldest,
            long_ago,
            T
        ));
    }

    #[test]
    fn a_slow_link_that_keeps_acknowledging_in_order_is_alive() {
        let t0 = Instant::now();
        // The oldest record went out a minute ago; the broker acknowledged the one before it
        // a second ago (in order: it was submitted earlier still).
        let now = t0 + Duration::from_secs(60);
        let ack = Some((now - Duration::from_secs(1), t0 - Duration::from_millis(10)));
        assert!(!dead_link(now, t0, ack, T));
        // Acknowledgements stopped 31 s ago: dead.
        let ack = Some((
            now - Duration::from_secs(31),
            t0 - Duration::from_millis(10),
        ));
        assert!(dead_link(now, t0, ack, T));
    }

    #[test]
    fn a_record_skipped_while_later_ones_are_acknowledged_is_a_dead_link() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(31);
        // A record submitted after the oldest was just acknowledged.
        let ack = Some((now, t0 + Duration::from_millis(5)));
        assert!(dead_link(now, t0, ack, T));
        assert!(!dead_link(t0 + Duration::from_secs(29), t0, ack, T));
    }
}
