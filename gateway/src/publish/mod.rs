//! The MQTT publisher: owns the MQTT client and its event loop ([`link`]).
//!
//! Invariants:
//! - Live records go out first, as they come; replayed records from disk fill what is left of
//!   the window, oldest first, flagged historical. Live data is never starved by a backlog.
//! - Publishes are submitted only while connected (between a CONNACK and the next error), so
//!   every `Sent` happening belongs to the current connection and maps to the right record.
//! - On any connection error the window is forgotten and nothing is taken as delivered: the
//!   records are still in the ledger (committed within `commit_interval`) or on disk, and go out
//!   again after the next CONNACK. Records keep queueing for live sending while disconnected; one
//!   that falls out of the bounded live queue is simply left to the ledger and comes back
//!   through the disk.
//! - Only a PUBACK that accepts a record credits it. One that refuses it (an MQTT 5 failure
//!   reason code) leaves it in the ledger, to be committed and replayed, and holds all sending
//!   for a backoff: a broker over its quota is not hammered.
//! - A window that sees no PUBACK for `ack_timeout` is a dead link: the connection is dropped.
//!   A slow link that keeps acknowledging is not dead, however long a full window takes to
//!   drain; a record left unacknowledged for `ack_timeout` while later ones are acknowledged
//!   is a broker that skipped it, and drops the connection too (see [`dead_link`]).
//! - Connection attempts follow `backoff_min`..`backoff_max` (jittered); the first attempt
//!   after a connection that was up for a while is immediate. Every attempt is prepared afresh
//!   ([`connect`]): TLS files and passwords are read again, and a failure there waits for the
//!   next attempt instead of connecting without them.

pub mod alias;
mod commands;
pub(crate) mod connect;
mod fill;
pub(crate) mod link;
pub mod meta;
pub mod pace;
pub(crate) mod sas;
pub mod sparkplug;
pub mod status;
pub mod subscribe;
pub(crate) mod tls;
pub mod window;

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use protocols::backoff::Backoff;
use tokio::sync::{mpsc, Notify};
use tracing::{debug, error, info, warn};

use crate::buffer::Record;
use crate::config::{MqttSettings, ProtocolVersion};
use crate::metrics::Metrics;
use crate::pipeline::ledger::AckOutcome;
use crate::pipeline::writer::PACKET_OVERHEAD;
use crate::pipeline::Shared;
use alias::Aliases;
use connect::Connector;
use link::{BrokerLimits, Happening, Link, LinkError, Outbound, Refusal, Sender};
use pace::Pace;
use sparkplug::FAREWELL_TOKEN;
use window::{Acked, Window, NO_TOKEN};

/// The rustls crypto provider the gateway's TLS uses (ring), for the demo's TLS peers.
#[cfg(feature = "demo")]
pub fn tls_provider() -> Arc<rustls::crypto::CryptoProvider> {
    tls::provider()
}

/// What the writer hands the publisher, in order.
#[derive(Debug)]
pub enum Live {
    /// A record to publish.
    Record(Arc<Record>),
    /// In Sparkplug: a device starts (`true`) or stops answering, between its records.
    Device(protocols::model::DeviceId, bool),
}

/// Records read from disk per replay step.
const REPLAY_CHUNK: usize = 64;
/// Payload bytes the live queue holds at most while the broker is away; older records fall back
/// to the ledger and the disk buffer.
const LIVE_BYTES: usize = 16 << 20;

/// What a poll brought: a happening, a failed connection or attempt, or a kick.
enum Polled {
    Happened(Happening),
    Failed(LinkError),
    /// The attempt could not be prepared (TLS files, password): no connection was tried.
    Unprepared(connect::PrepareError),
    Kicked,
}

type PollFuture = Pin<Box<dyn Future<Output = (Link, Polled)> + Send>>;

/// Polls the event loop once, after `delay`; a kick abandons the poll (to drop the connection).
/// When `connect` is set the poll makes a new connection: the attempt is prepared first, after
/// the delay, so the files it reads are read at the time of the attempt. The link is moved in
/// and handed back, so the publisher can keep one poll running across its `select!` without
/// cancelling it whenever a record arrives.
fn poll_after(
    mut link: Link,
    delay: Duration,
    kick: Arc<Notify>,
    connect: Option<Arc<std::sync::Mutex<Connector>>>,
) -> PollFuture {
    Box::pin(async move {
        if !delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = kick.notified() => return (link, Polled::Kicked),
            }
        }
        if let Some(connector) = connect {
            let prepared = match connector.lock() {
                Ok(mut c) => c.prepare(),
                Err(poisoned) => poisoned.into_inner().prepare(),
            };
            match prepared {
                Ok(p) => link.prepare(p),
                Err(e) => return (link, Polled::Unprepared(e)),
            }
        }
        let polled = tokio::select! {
            r = link.poll() => match r {
                Ok(h) => Polled::Happened(h),
                Err(e) => Polled::Failed(e),
            },
            _ = kick.notified() => Polled::Kicked,
        };
        (link, polled)
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

/// A connection that lasted this long was healthy: the next attempt after it is immediate and
/// the backoff starts over. One that ends sooner (a broker that accepts and drops at once) is
/// retried with the growing backoff, so the gateway cannot spin against it.
const HEALTHY_CONNECTION: Duration = Duration::from_secs(1);

/// The publisher task.
pub struct Publisher {
    settings: MqttSettings,
    gateway: Arc<str>,
    boot: u64,
    client: Sender,
    connector: Arc<std::sync::Mutex<Connector>>,
    shared: Arc<Shared>,
    window: Window,
    aliases: Aliases,
    live: VecDeque<(Live, Instant)>,
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
    /// After a PUBACK refused a record, nothing is sent until then.
    refused_until: Option<Instant>,
    /// Waits after refused records, growing while the broker keeps refusing.
    refusal_backoff: Backoff,
    /// The last refusal; a run of refusals (an episode) ends after `2 * backoff_max` without.
    last_refusal: Option<Instant>,
    /// Records of this connection not sent because they exceed the broker's packet size: the
    /// replay passes over them (they stay on disk), instead of finding them again and again.
    too_large: HashSet<u64>,
    /// The next poll makes a new connection attempt (prepared afresh).
    attempt_due: bool,
    /// The connection just lost was healthy: the next attempt goes at once.
    retry_now: bool,
    /// The broker's limits from the current connection's CONNACK.
    limits: BrokerLimits,
    /// When the current connection was made.
    connected_at: Option<Instant>,
    /// The first connection attempt has ended (connected or failed).
    first_attempt_done: bool,
    /// When the current connection must be made again with a fresh SAS token.
    renew_at: Option<Instant>,
    connected: bool,
    draining: bool,
    /// A CONNACK claiming a session was logged (once per run of such answers).
    session_lie_logged: bool,
    /// A record too large for the broker was logged (once per connection).
    too_large_logged: bool,
    down_logged: bool,
    kick: Arc<Notify>,
    /// The meta messages due (JSON mode).
    meta: meta::MetaState,
    /// A meta message too large for the broker was logged (once per connection).
    meta_too_large_logged: bool,
    /// Sparkplug B: the edge node and its session; `None` in JSON mode.
    node: Option<sparkplug::Node>,
    /// Command replies handed to the client and not yet written (QoS 0: no packet id).
    replies_unwritten: usize,
}

impl Publisher {
    /// Runs the publisher until the live channel closes (the writer is done) and the grace
    /// period for outstanding acknowledgements has passed. `gateway` and `boot` name the
    /// gateway in its status messages.
    pub async fn run(
        settings: MqttSettings,
        commit_interval: Duration,
        replay_rate: Option<u32>,
        (gateway, boot): (Arc<str>, u64),
        shared: Arc<Shared>,
        mut live_rx: mpsc::Receiver<Live>,
        mut node: Option<sparkplug::Node>,
    ) {
        let (client, link) = link::open(&settings);
        let window_cap = usize::from(settings.max_inflight);
        let mut connector = Connector::new(settings.clone(), &gateway, boot);
        connector.sparkplug = node.as_mut().and_then(sparkplug::Node::take_will);
        let mut backoff = Backoff::new(settings.backoff_min, settings.backoff_max);
        let mut p = Publisher {
            refusal_backoff: Backoff::new(settings.backoff_min, settings.backoff_max),
            settings,
            gateway,
            boot,
            client,
            connector: Arc::new(std::sync::Mutex::new(connector)),
            shared,
            window: Window::new(window_cap),
            aliases: Aliases::default(),
            live: VecDeque::new(),
            live_cap: window_cap * 4,
            live_bytes: 0,
            commit_interval,
            replay_from: None,
            last_ack: None,
            pace: Pace::new(replay_rate),
            replay_held_until: None,
            refused_until: None,
            last_refusal: None,
            too_large: HashSet::new(),
            attempt_due: true,
            retry_now: false,
            limits: BrokerLimits::NONE,
            connected_at: None,
            first_attempt_done: false,
            renew_at: None,
            connected: false,
            draining: false,
            down_logged: false,
            session_lie_logged: false,
            too_large_logged: false,
            kick: Arc::new(Notify::new()),
            meta: meta::MetaState::default(),
            meta_too_large_logged: false,
            node,
            replies_unwritten: 0,
        };
        let mut meta_rx = p.shared.meta.subscribe();
        if p.settings.protocol_version == ProtocolVersion::V311 {
            // MQTT 3.1.1 brokers announce no limit: the configured one is all there is.
            p.shared.set_broker_packet_limit(None);
        }
        // Commands (when on): taken for this publisher's life, given back at its end.
        let mut commands = p.shared.take_commands();
        let mut poll = p.poll_next(link, Duration::ZERO);
        let mut check = tokio::time::interval(Duration::from_millis(500));
        let mut draining_until: Option<tokio::time::Instant> = None;

        loop {
            if p.connected {
                p.send_session().await;
                p.send_meta().await;
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
            // Sending held after a refusal resumes on its own.
            let resume_at = p.refused_until.filter(|_| p.connected);
            tokio::select! {
                (link, polled) = &mut poll => {
                    let mut link = link;
                    let delay = match polled {
                        Polled::Happened(Happening::Connected { session_present: true, .. }) => {
                            // MQTT forbids it; a broker that does it may hold anything of an
                            // old session: a protocol error, never a connection to publish on.
                            if !p.session_lie_logged {
                                error!(host = %p.settings.host, port = p.settings.port, "the broker answered a clean-session CONNECT with \"session present\" (MQTT forbids it); not publishing on this connection, retrying");
                                p.session_lie_logged = true;
                            }
                            p.on_disconnect("CONNACK with session present for a clean session");
                            link.drop_connection();
                            p.attempt_due = true;
                            backoff.next_delay()
                        }
                        Polled::Happened(Happening::Connected { limits, .. }) => {
                            // rumqttc keeps events and a packet-id collision of the previous
                            // connection across `clean()`: a stale `Sent` would shift the
                            // window's pkid mapping and credit an ack to the wrong record.
                            link.forget_old_connection();
                            p.on_connected(limits).await;
                            commands::subscribe(&p.client, commands.as_ref(), &p.settings.topic_prefix).await;
                            Duration::ZERO
                        }
                        Polled::Happened(Happening::Message { topic, payload, retain }) => {
                            if commands::is_command_topic(&p.settings.topic_prefix, &topic) {
                                let refused = &p.shared.metrics.commands_refused;
                                commands::forward(commands.as_ref(), topic, payload, retain, refused);
                            } else if let Some(dcmd) = p.sparkplug_message(&topic, &payload).await {
                                let refused = &p.shared.metrics.commands_refused;
                                commands::forward_sparkplug(commands.as_ref(), dcmd, retain, refused);
                            }
                            Duration::ZERO
                        }
                        Polled::Happened(h) => {
                            p.on_happening(h);
                            Duration::ZERO
                        }
                        Polled::Failed(e) if e.retain_not_supported() => {
                            // The will is retained; this broker keeps no retained messages.
                            warn!("the broker keeps no retained messages: the last will and the status go out without retain");
                            if let Ok(mut c) = p.connector.lock() {
                                c.will_retained = false;
                            }
                            p.after_lost(&mut backoff, "retain not supported");
                            Duration::ZERO
                        }
                        Polled::Failed(e) => p.after_lost(&mut backoff, &failure_text(&e)),
                        Polled::Unprepared(e) => {
                            p.on_unprepared(&e);
                            p.attempt_due = true;
                            backoff.next_delay()
                        }
                        Polled::Kicked => {
                            // Drop the network so the next poll makes a new connection.
                            link.drop_connection();
                            p.after_lost(&mut backoff, "connection abandoned")
                        }
                    };
                    poll = p.poll_next(link, delay);
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
                Ok(()) = meta_rx.changed() => p.meta_changed(false),
                _ = p.shared.committed.notified() => {
                    if let Some(seq) = p.shared.take_replay_hint() {
                        p.replay_from = Some(p.replay_from.map_or(seq, |c| c.min(seq)));
                    }
                }
                reply = commands::next_reply(&mut commands), if p.connected && p.replies_unwritten < commands::MAX_REPLIES_UNWRITTEN => {
                    if commands::send_reply(&p.client, reply) {
                        p.replies_unwritten += 1;
                    }
                }
                _ = check.tick() => {
                    p.check_ack_timeout();
                    p.check_token_renewal();
                }
                // The replay waits for its pace; live records and acknowledgements wake the
                // loop on their own.
                _ = tokio::time::sleep_until(replay_at.unwrap_or(now).into()), if replay_at.is_some() => {}
                _ = tokio::time::sleep_until(resume_at.unwrap_or(now).into()), if resume_at.is_some() => {}
            }
        }
        p.disconnect(poll).await;
        p.shared.give_back_commands(commands);
    }

    /// The next poll of `link`: a new connection attempt, prepared afresh, when one is due
    /// (events of a connection being dropped are polled without).
    fn poll_next(&mut self, link: Link, delay: Duration) -> PollFuture {
        let due = !self.connected && std::mem::take(&mut self.attempt_due);
        let connect = due.then(|| self.connector.clone());
        poll_after(link, delay, self.kick.clone(), connect)
    }

    /// After a lost connection (or a failed attempt): the delay before the next attempt, none
    /// after a healthy connection.
    fn after_lost(&mut self, backoff: &mut Backoff, error: &str) -> Duration {
        self.first_attempt_over();
        self.on_disconnect(error);
        self.attempt_due = true;
        if std::mem::take(&mut self.retry_now) {
            backoff.reset();
            Duration::ZERO
        } else {
            backoff.next_delay()
        }
    }

    /// The first attempt failed: the writer stops waiting for the broker's limit (the last
    /// known one, if any, stays).
    fn first_attempt_over(&mut self) {
        if !self.first_attempt_done {
            self.first_attempt_done = true;
            let limit = self.shared.broker_packet_limit();
            self.shared
                .set_broker_packet_limit((limit != usize::MAX).then_some(limit));
        }
    }

    /// An attempt that could not be prepared: logged once per episode, like a failed attempt.
    fn on_unprepared(&mut self, e: &connect::PrepareError) {
        self.first_attempt_over();
        if !self.down_logged {
            error!(host = %self.settings.host, port = self.settings.port, error = %e, "cannot connect to the MQTT broker; buffering to disk and retrying");
            self.down_logged = true;
        } else {
            debug!(error = %e, "MQTT connection attempt not prepared");
        }
    }

    /// Queues a record to go out live, also while disconnected: a connection that comes back
    /// within the commit interval (or the first one at start-up) then costs no disk write. When
    /// the queue is full its oldest record is dropped from memory: it is still in the ledger, is
    /// committed, and comes back through the replay.
    fn queue_live(&mut self, item: Live) {
        let r = match item {
            Live::Record(r) => {
                Metrics::add(&self.shared.metrics.live_taken, 1);
                r
            }
            // A device's liveness goes in order with its records while births have gone out;
            // otherwise it only tells the next births.
            Live::Device(d, online) if !self.connected || !self.data_allowed() => {
                self.device_changed_offline(d, online);
                return;
            }
            device => {
                self.live.push_back((device, Instant::now()));
                return;
            }
        };
        self.live_bytes += r.payload.len();
        self.live.push_back((Live::Record(r), Instant::now()));
        while self.live.len() > self.live_cap
            || (self.live_bytes > LIVE_BYTES && self.live.len() > 1)
        {
            match self.live.pop_front() {
                Some((Live::Record(old), _)) => self.live_bytes -= old.payload.len(),
                Some((Live::Device(d, online), _)) => self.device_changed_offline(d, online),
                None => {}
            }
        }
    }

    /// A CONNACK accepted the connection: the window starts empty with the broker's limits,
    /// the status goes out first, then everything on disk is replayed.
    async fn on_connected(&mut self, limits: BrokerLimits) {
        info!(host = %self.settings.host, port = self.settings.port, "connected to MQTT broker");
        self.connected = true;
        self.first_attempt_done = true;
        self.connected_at = Some(Instant::now());
        self.renew_at = None;
        if let Ok(c) = self.connector.lock() {
            self.renew_at = c.renew_in().map(|d| Instant::now() + d);
            let not_after = c
                .client_cert_not_after
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            self.shared
                .metrics
                .tls_client_cert_not_after
                .store(not_after, Ordering::Relaxed);
        }
        self.down_logged = false;
        self.session_lie_logged = false;
        self.too_large_logged = false;
        self.too_large.clear();
        self.window.clear();
        let cap = usize::from(self.settings.max_inflight);
        let cap = limits
            .receive_maximum
            .map_or(cap, |r| cap.min(usize::from(r)));
        self.window.set_capacity(cap);
        self.aliases.reset(limits.topic_alias_maximum);
        let broker_max = limits.maximum_packet_size.map(|m| m as usize);
        self.shared.set_broker_packet_limit(broker_max);
        if !limits.retain_available {
            if let Ok(mut c) = self.connector.lock() {
                c.will_retained = false;
            }
        }
        self.limits = limits;
        self.last_ack = None;
        // Everything on disk is unacknowledged: replay it from the start.
        self.replay_from = Some(0);
        let m = &self.shared.metrics;
        m.mqtt_connected.store(true, Ordering::Relaxed);
        Metrics::add(&m.mqtt_connects, 1);
        if self.node.is_some() {
            self.sparkplug_connected().await;
        } else if self.settings.status {
            self.publish_status(true).await;
        }
        self.meta_too_large_logged = false;
        self.meta_changed(true);
    }

    /// The meta documents changed (a reload), or a CONNACK came (`reconnected`): what is due
    /// goes out from the loop, a few at a time ([`meta::MAX_UNWRITTEN`]).
    /// Meta messages go out only with `status` on: they are the gateway's own retained
    /// messages beside its status, and a broker that takes only the records' topic (Azure IoT
    /// Hub closes the connection on any other) is configured with `status = false`.
    fn meta_changed(&mut self, reconnected: bool) {
        if !self.settings.status {
            return;
        }
        let current = self.shared.meta.borrow().clone();
        self.meta.due(&current, reconnected);
    }

    /// Hands due meta messages to the client, retained, while few of the gateway's own messages
    /// wait unwritten (the client's request channel has room for the window and a few more).
    async fn send_meta(&mut self) {
        let limit = self
            .limits
            .maximum_packet_size
            .map_or(usize::MAX, |m| m as usize)
            .min(self.settings.max_packet_size);
        while self.meta.has_pending() && self.window.own_unwritten() < meta::MAX_UNWRITTEN {
            let Some((device, payload, token)) = self.meta.take_next() else {
                break;
            };
            let topic =
                crate::encode::meta::MetaMessage::topic(&self.settings.topic_prefix, &device);
            if topic.len() + payload.len() + PACKET_OVERHEAD > limit {
                if !self.meta_too_large_logged {
                    error!(device = %device, bytes = payload.len(), max_packet = limit, "the meta message of a device is larger than a packet may be; it is not published (raise max_packet_size)");
                    self.meta_too_large_logged = true;
                }
                continue;
            }
            let out = Outbound {
                topic,
                alias: None,
                retain: self.limits.retain_available,
            };
            match self.client.publish(out, payload).await {
                Ok(()) => self.window.submit_own(Instant::now(), token),
                Err(e) => debug!(error = %e, "meta message not accepted by the MQTT client"),
            }
        }
    }

    /// Publishes the gateway's status, retained where the broker allows it.
    async fn publish_status(&mut self, online: bool) {
        let doc = status::document(&self.gateway, self.boot, online, SystemTime::now());
        let topic = self.settings.status_topic();
        let size = (topic.len() + doc.len()) as u64;
        let out = Outbound {
            topic,
            alias: None,
            retain: self.limits.retain_available,
        };
        match self.client.publish(out, doc).await {
            Ok(()) => {
                // The offline status is the shutdown's farewell: the disconnect waits for it.
                let token = if online { NO_TOKEN } else { FAREWELL_TOKEN };
                self.window.submit_own(Instant::now(), token);
                Metrics::add(&self.shared.metrics.published_bytes, size);
            }
            Err(e) => debug!(error = %e, "status not accepted by the MQTT client"),
        }
    }

    /// Handles one happening of a connection.
    fn on_happening(&mut self, h: Happening) {
        match h {
            Happening::Sent(pkid) => {
                self.window.on_outgoing(pkid);
            }
            Happening::Collision(pkid) => {
                warn!(
                    pkid,
                    "broker acknowledges out of order and a packet id collided; reconnecting"
                );
                self.kick.notify_one();
            }
            Happening::Acked { pkid, refused } => {
                self.on_puback(pkid, refused);
            }
            Happening::Connected { .. }
            | Happening::Message { .. }
            | Happening::DisconnectSent
            | Happening::Other => {}
            Happening::Qos0Written => {
                self.replies_unwritten = self.replies_unwritten.saturating_sub(1)
            }
            Happening::SubscriptionRefused { refused } => {
                error!(refused, "the broker refused a subscription (an ACL?): commands, Sparkplug NCMD/DCMD or the primary host's STATE will not arrive on it");
            }
        }
    }

    /// A PUBACK: credits the record it accepts (never one it refuses); returns what it was.
    fn on_puback(&mut self, pkid: u16, refused: Option<Refusal>) -> Option<Acked> {
        let acked = self.window.on_ack(pkid);
        match (acked, refused) {
            (Some(Acked::Record(seq, submitted)), None) => {
                self.last_ack = Some((Instant::now(), submitted));
                Metrics::add(&self.shared.metrics.acked, 1);
                // A record that was committed is deleted by the committer's next tick.
                let _: AckOutcome = self.shared.ledger().ack(seq);
            }
            (Some(Acked::Record(seq, _)), Some(refusal)) => self.on_refused(seq, &refusal),
            (Some(Acked::Own(token)), None) => self.meta.acked(token),
            (Some(Acked::Own(_)), Some(refusal)) => {
                warn!(code = refusal.code, reason = refusal.name, detail = refusal.reason.as_deref().unwrap_or(""), status_topic = %self.settings.status_topic(), "the broker refused one of the gateway's own messages (its status or a meta message)");
            }
            _ => {}
        }
        acked
    }

    /// A PUBACK refused record `seq`: it stays in the ledger (committed, then replayed) and
    /// sending pauses for a backoff that grows while the refusals go on, whatever else the
    /// broker accepts meanwhile (one refused topic must not be retried at full speed).
    fn on_refused(&mut self, seq: u64, refusal: &Refusal) {
        self.shared.metrics.count_puback_refusal(refusal.code);
        let now = Instant::now();
        let new_episode = self
            .last_refusal
            .is_none_or(|t| now.duration_since(t) > 2 * self.settings.backoff_max);
        if new_episode {
            self.refusal_backoff.reset();
        }
        self.last_refusal = Some(now);
        let pause = self.refusal_backoff.next_delay();
        if new_episode {
            warn!(seq, code = refusal.code, reason = refusal.name, detail = refusal.reason.as_deref().unwrap_or(""), pause_ms = pause.as_millis() as u64, "the broker refused a record (PUBACK reason code); it stays buffered and sending pauses");
        } else {
            debug!(
                seq,
                code = refusal.code,
                "the broker refused a record again"
            );
        }
        self.refused_until = Some(now + pause);
        // A record already on disk comes back through the replay; one still in the ledger is
        // committed and then points the replay at itself.
        self.replay_from = Some(self.replay_from.map_or(seq, |c| c.min(seq)));
    }

    fn on_disconnect(&mut self, error: &str) {
        let lost = self.window.clear();
        if let Some(node) = &mut self.node {
            node.lost();
        }
        let healthy = self
            .connected_at
            .take()
            .is_some_and(|at| at.elapsed() >= HEALTHY_CONNECTION);
        if self.connected && healthy {
            self.retry_now = true;
        }
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

    /// A connection made with a SAS token is made again with a fresh one before the token
    /// expires (the hub would drop it then): nothing is lost, the window goes out again.
    fn check_token_renewal(&mut self) {
        if self.connected && self.renew_at.is_some_and(|t| Instant::now() >= t) {
            info!("renewing the SAS token: reconnecting");
            self.renew_at = None;
            self.on_disconnect("SAS token renewal");
            self.kick.notify_one();
        }
    }

    /// A clean shutdown: the status says `offline` (so the broker does not need the will),
    /// then DISCONNECT.
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
        let mut poll = poll;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        let sparkplug_up = self.node.as_ref().is_some_and(|n| n.session.up());
        if sparkplug_up || (self.node.is_none() && self.settings.status) {
            if sparkplug_up {
                // Sparkplug: NDEATH ourselves, so the host need not wait for the will.
                self.publish_ndeath().await;
            } else {
                self.publish_status(false).await;
            }
            // Until the status is acknowledged (or the deadline).
            loop {
                match tokio::time::timeout_at(deadline, &mut poll).await {
                    Ok((link, Polled::Happened(h))) => {
                        // Records acknowledged meanwhile are credited as always.
                        let status_acked = match h {
                            Happening::Acked { pkid, refused } => {
                                self.on_puback(pkid, refused) == Some(Acked::Own(FAREWELL_TOKEN))
                            }
                            other => {
                                self.on_happening(other);
                                false
                            }
                        };
                        poll = poll_after(link, Duration::ZERO, self.kick.clone(), None);
                        if status_acked {
                            break;
                        }
                    }
                    _ => {
                        self.mark_disconnected();
                        return;
                    }
                }
            }
        }
        self.client.try_disconnect();
        // Give the event loop a moment to send DISCONNECT.
        loop {
            match tokio::time::timeout_at(deadline, &mut poll).await {
                Ok((_, Polled::Happened(Happening::DisconnectSent))) => break,
                Ok((link, Polled::Happened(_))) => {
                    poll = poll_after(link, Duration::ZERO, self.kick.clone(), None);
                }
                _ => break,
            }
        }
        self.mark_disconnected();
    }

    fn mark_disconnected(&mut self) {
        self.shared
            .metrics
            .mqtt_connected
            .store(false, Ordering::Relaxed);
    }
}

/// A lost connection in one line; a TLS failure with its cause.
fn failure_text(e: &LinkError) -> String {
    let tls = match e {
        LinkError::V4(e) => tls::describe_failure(e),
        LinkError::V5(e) => tls::describe_failure_v5(e),
    };
    match tls {
        Some(cause) => format!("TLS: {cause}"),
        None => e.to_string(),
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
