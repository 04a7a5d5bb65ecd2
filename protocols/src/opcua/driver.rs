//! The OPC UA driver: one task per device, one session per task.
//!
//! Design:
//! - async-opcua's session event loop does the reconnecting and transfers or re-creates the
//!   subscription on a new session. The driver polls that event loop itself, in the same task
//!   that hands batches to the pipeline: while the pipeline is full the event loop is not
//!   polled, so notifications wait on the server instead of in an unbounded queue here. The
//!   server keeps only `queue_size` values per item and only for the subscription's lifetime;
//!   values it had to drop arrive with the overflow bit, which is counted as an overrun.
//! - A notification message becomes one batch.
//! - Tags go bad with reason `disconnected` once per outage; after a reconnect every tag is read
//!   once and publishing is restarted, so a tag whose value did not change during the outage
//!   does not stay bad and the subscription does not stay idle.
//! - Watchdogs end a session that cannot recover on its own: a subscription that has been
//!   silent for longer than its keep-alive, a reconnect that hangs without any event, an outage
//!   longer than the server keeps the session, a setup call (browse, subscribe) that failed as
//!   a whole, and rejected credentials or certificates (which would only pile up half-open
//!   sessions on the server). The driver then discovers the endpoint again with its own
//!   jittered backoff, which only resets after a session that worked.
//! - Writes (`write.rs`) are performed by the control half between two reads; while there is
//!   no session set up (connecting, resolving, subscribing, backing off) a write request is
//!   answered "not connected" at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use opcua::client::{
    MonitoredItemMap, OnSubscriptionNotificationCore, Session, SessionConnectMode,
    SessionPollResult, SubscriptionActivity,
};
use opcua::types::{
    DataChangeFilter, DataChangeNotification, DataChangeTrigger, ExtensionObject,
    MonitoredItemCreateRequest, MonitoringMode, MonitoringParameters, NodeId, NotificationMessage,
    ReadValueId, StatusChangeNotification, StatusCode, TimestampsToReturn, VariableId, Variant,
};
use tokio::sync::Notify;
use tracing::{debug, error, info, trace, warn};

use super::client::{self, OpcUaError, KEEP_ALIVE_COUNT, SESSION_TIMEOUT};
use super::convert::sample_of;
use super::write;
use super::{Mode, NodeRef, OpcUaSettings, SecurityPolicy};
use crate::backoff::Backoff;
use crate::driver::{
    next_write, refusing_writes, DeviceStatus, DriverContext, DriverError, ErrorKind,
};
use crate::model::{Batch, DeviceId, Reason, Sample, TagId, Timestamp};

/// Monitored items created per CreateMonitoredItems call (unless the server allows fewer).
const CREATE_CHUNK: usize = 1000;
/// Notifications the server may put in one Publish response. Unbounded, the first response
/// of a subscription carried every item's initial value at once (10k items: 2.5 MB decoded
/// and converted at the same moment, the session's peak); bounded, the server sends the rest
/// in the next responses, each taken as soon as it arrives.
const MAX_NOTIFICATIONS_PER_PUBLISH: u32 = 2000;
/// How long a session must have lived before giving it up resets the backoff.
const HEALTHY: Duration = Duration::from_secs(30);
/// How long a closing session may take to say goodbye at shutdown.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long a subscription survives without publish requests: long enough to outlast a
/// stalled pipeline or a short outage, so the transfer after a reconnect finds it.
const SUBSCRIPTION_LIFETIME: Duration = Duration::from_secs(300);

/// Runs the driver until the context is cancelled.
pub async fn run(settings: OpcUaSettings, ctx: DriverContext) -> Result<(), DriverError> {
    if settings.tags.is_empty() {
        return Err(DriverError::Config(format!(
            "device {} has no tags",
            ctx.name
        )));
    }
    if settings.security_policy == SecurityPolicy::None {
        warn!(device = %ctx.name, endpoint = %settings.endpoint, "security_policy is None: values and credentials travel unsigned and unencrypted");
    }
    // Key generation on first use is CPU work; keep it off the async workers.
    let built = {
        let settings = settings.clone();
        tokio::task::spawn_blocking(move || client::build_client(&settings)).await
    };
    let mut client = match built {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(unusable(&ctx, settings.tags.len(), e.to_string()).await),
        Err(e) => return Err(unusable(&ctx, settings.tags.len(), e.to_string()).await),
    };
    let mut backoff = Backoff::new(settings.backoff_min, settings.backoff_max);
    let mut down = Outage::default();
    let mut attempts: u64 = 0;

    loop {
        if attempts > 0 {
            ctx.status.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        attempts += 1;
        let opened = tokio::select! {
            _ = ctx.cancel.cancelled() => return Ok(()),
            r = refusing_writes(ctx.writes.as_ref(), client::open_session(&mut client, &settings)) => r,
        };
        match opened {
            Ok((session, event_loop, endpoint)) => {
                let end = run_session(&settings, &ctx, &session, event_loop, &endpoint, &mut down)
                    .await?;
                match end {
                    SessionEnd::Cancelled => return Ok(()),
                    SessionEnd::GaveUp { worked: true } => backoff.reset(),
                    SessionEnd::GaveUp { worked: false } => {}
                }
            }
            Err(e) => {
                if down.begin() {
                    match &e {
                        OpcUaError::Unreachable { .. } => {
                            warn!(device = %ctx.name, error = %e, "cannot reach OPC UA server; retrying with backoff")
                        }
                        _ => {
                            error!(device = %ctx.name, error = %e, "cannot open an OPC UA session; retrying with backoff")
                        }
                    }
                    emit_all_bad(&ctx, settings.tags.len(), Reason::Disconnected).await?;
                } else {
                    debug!(device = %ctx.name, error = %e, "session attempt failed");
                }
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = ctx.cancel.cancelled() => return Ok(()),
            _ = refusing_writes(ctx.writes.as_ref(), tokio::time::sleep(delay)) => {}
        }
    }
}

/// The client cannot be set up (say, the PKI directory is not writable): the tags say so once,
/// and the driver stops with the reason.
async fn unusable(ctx: &DriverContext, tags: usize, message: String) -> DriverError {
    error!(device = %ctx.name, error = %message, "cannot set up the OPC UA client; the device stays bad until the gateway is restarted");
    let reason = Reason::Status(StatusCode::BadConfigurationError.bits());
    if let Err(e) = emit_all_bad(ctx, tags, reason).await {
        return e;
    }
    DriverError::Config(format!("device {}: {message}", ctx.name))
}

/// Whether the tags already went bad for the current outage (reported once per episode).
#[derive(Debug, Default)]
struct Outage {
    active: bool,
    cert_advice_given: bool,
}

impl Outage {
    /// Starts an outage; true the first time (the caller reports it).
    fn begin(&mut self) -> bool {
        !std::mem::replace(&mut self.active, true)
    }

    fn end(&mut self) {
        self.active = false;
        self.cert_advice_given = false;
    }
}

enum SessionEnd {
    Cancelled,
    /// The session is abandoned; `worked` when it delivered data at some point.
    GaveUp {
        worked: bool,
    },
}

/// What the halves of one session tell each other.
#[derive(Debug, Default)]
struct SessionFlags {
    /// The subscription and its monitored items exist.
    subscribed: AtomicBool,
    /// The server reported the subscription gone (a bad StatusChangeNotification).
    subscription_lost: AtomicBool,
    /// The session delivered values at least once.
    delivered: AtomicBool,
    /// How long the subscription may stay silent, in ms, from the publishing interval and
    /// keep-alive count the server granted (it may raise what was asked).
    silence_ms: AtomicU64,
}

/// Why the control half of a session stopped.
enum ControlEnd {
    /// The pipeline is gone.
    Closed,
    /// A setup call failed as a whole (not per item): start over with a new session.
    /// `reported` when the tags already went bad with the server's status.
    Retry { status: StatusCode, reported: bool },
}

impl From<DriverError> for ControlEnd {
    fn from(_: DriverError) -> Self {
        ControlEnd::Closed
    }
}

/// Statuses that mean the server will not accept who we are; retrying at once only leaves
/// half-open sessions on the server.
fn is_identity_problem(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BadUserAccessDenied
            | StatusCode::BadIdentityTokenInvalid
            | StatusCode::BadIdentityTokenRejected
            | StatusCode::BadUserSignatureInvalid
            | StatusCode::BadSecurityPolicyRejected
            | StatusCode::BadSecurityModeRejected
    )
}

/// How long a subscription may stay silent: the server sends at least a keep-alive every
/// `keep_alive` publishing intervals; two more and the request timeout are grace.
fn silence_limit(publishing: Duration, keep_alive: u32, timeout: Duration) -> Duration {
    publishing.saturating_mul(keep_alive.saturating_add(2)) + timeout
}

/// Drives one session: its event loop, the subscription or the poll loop, until cancelled or
/// until a watchdog gives the session up.
async fn run_session(
    settings: &OpcUaSettings,
    ctx: &DriverContext,
    session: &Arc<Session>,
    event_loop: client::EventLoop,
    endpoint: &opcua::types::EndpointDescription,
    down: &mut Outage,
) -> Result<SessionEnd, DriverError> {
    let pending: Arc<Mutex<Vec<Batch>>> = Arc::default();
    let flags = Arc::new(SessionFlags::default());
    let reconnected = Notify::new();
    let stream = event_loop.enter();
    tokio::pin!(stream);
    let control = control(
        settings,
        ctx,
        session,
        pending.clone(),
        flags.clone(),
        &reconnected,
    );
    tokio::pin!(control);
    let mut control_done = false;
    let mut connected_before = false;
    let mut first_connected: Option<Instant> = None;
    let mut connected = false;
    let mut last_event = Instant::now();
    let mut last_publish = Instant::now();
    let mut subscribed = false;
    let mut down_since = Instant::now();
    let mut watchdog = tokio::time::interval(Duration::from_millis(250));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // One reconnect may open a channel, create and activate a session, and re-create every
    // monitored item (one call per thousand) without a single event in between.
    let calls = 6 + u32::try_from(settings.tags.len() / CREATE_CHUNK).unwrap_or(u32::MAX);
    let hang_limit = settings.timeout.saturating_mul(calls) + settings.backoff_max;

    let give_up = loop {
        tokio::select! {
            _ = ctx.cancel.cancelled() => {
                close(session, &mut stream).await;
                ctx.status.connected.store(false, Ordering::Relaxed);
                flush(&pending, ctx).await?;
                return Ok(SessionEnd::Cancelled);
            }
            r = &mut control, if !control_done => {
                control_done = true;
                match r {
                    Ok(()) => {}
                    Err(ControlEnd::Closed) => return Err(DriverError::Closed),
                    Err(ControlEnd::Retry { status, reported }) => {
                        warn!(device = %ctx.name, %status, "setting up the session failed; starting over");
                        if reported {
                            // The tags show the server's status; the give-up keeps it.
                            down.begin();
                        }
                        break true;
                    }
                }
            }
            _ = watchdog.tick() => {
                if flags.subscription_lost.load(Ordering::Relaxed) {
                    warn!(device = %ctx.name, "the server ended the subscription; starting over");
                    break true;
                }
                if !subscribed && flags.subscribed.load(Ordering::Relaxed) {
                    // The silence clock starts when there is something to be silent.
                    subscribed = true;
                    last_publish = Instant::now();
                }
                let silence = Duration::from_millis(flags.silence_ms.load(Ordering::Relaxed));
                if connected && subscribed && last_publish.elapsed() > silence {
                    warn!(device = %ctx.name, silent = ?last_publish.elapsed(), "the subscription went silent; starting over");
                    break true;
                }
                if !connected && last_event.elapsed() > hang_limit {
                    warn!(device = %ctx.name, "reconnecting hangs without an answer; starting over");
                    break true;
                }
                if !connected && connected_before && down_since.elapsed() > SESSION_TIMEOUT {
                    debug!(device = %ctx.name, "outage outlasted the session; discovering the endpoint again");
                    break true;
                }
            }
            event = stream.next() => {
                last_event = Instant::now();
                match event {
                    None => break true,
                    Some(Err(status)) => {
                        warn!(device = %ctx.name, %status, "OPC UA session ended");
                        break true;
                    }
                    Some(Ok(SessionPollResult::Reconnected(mode))) => {
                        connected = true;
                        last_publish = Instant::now();
                        ctx.status.connected.store(true, Ordering::Relaxed);
                        down.end();
                        let how = match mode {
                            SessionConnectMode::NewSession(_) => "new session",
                            SessionConnectMode::ReactivatedSession(_) => "session reactivated",
                        };
                        if connected_before {
                            ctx.status.reconnects.fetch_add(1, Ordering::Relaxed);
                            info!(device = %ctx.name, endpoint = %settings.endpoint, how, "reconnected to OPC UA server");
                            // async-opcua's new subscription loop waits for a trigger before it
                            // publishes again.
                            if settings.mode == Mode::Subscribe {
                                session.trigger_publish_now();
                            }
                            reconnected.notify_one();
                        } else {
                            info!(device = %ctx.name, endpoint = %settings.endpoint, policy = %settings.security_policy, mode = %settings.security_mode, "connected to OPC UA server");
                        }
                        connected_before = true;
                        first_connected.get_or_insert_with(Instant::now);
                    }
                    Some(Ok(SessionPollResult::ConnectionLost(status))) => {
                        connected = false;
                        down_since = Instant::now();
                        ctx.status.connected.store(false, Ordering::Relaxed);
                        flush(&pending, ctx).await?;
                        if down.begin() {
                            warn!(device = %ctx.name, %status, "lost the OPC UA session; reconnecting");
                            emit_all_bad(ctx, settings.tags.len(), Reason::Disconnected).await?;
                        }
                    }
                    Some(Ok(SessionPollResult::ReconnectFailed(status))) => {
                        ctx.status.reconnects.fetch_add(1, Ordering::Relaxed);
                        let first = down.begin();
                        let refused = client::is_certificate_problem(status) || is_identity_problem(status);
                        if client::is_certificate_problem(status) {
                            if !down.cert_advice_given {
                                down.cert_advice_given = true;
                                error!(device = %ctx.name, %status, "{}", client::untrusted_server_advice(&settings.pki_dir, &endpoint.server_certificate));
                            }
                        } else if is_identity_problem(status) {
                            if first {
                                error!(device = %ctx.name, %status, identity = identity_kind(settings), "the server refused the session's identity or security; check username/password_file or user_cert_file, and security_policy/security_mode");
                            }
                        } else if first {
                            warn!(device = %ctx.name, %status, "cannot connect to OPC UA server; retrying with backoff");
                        } else {
                            debug!(device = %ctx.name, %status, "reconnect failed");
                        }
                        if first {
                            let reason = if refused { Reason::Status(status.bits()) } else { Reason::Disconnected };
                            emit_all_bad(ctx, settings.tags.len(), reason).await?;
                        }
                        if refused {
                            break false;
                        }
                    }
                    Some(Ok(SessionPollResult::Subscription(activity))) => match activity {
                        SubscriptionActivity::Publish => last_publish = Instant::now(),
                        SubscriptionActivity::PublishFailed(StatusCode::BadNoSubscription)
                            if flags.subscribed.load(Ordering::Relaxed) =>
                        {
                            warn!(device = %ctx.name, "the server no longer knows the subscription; starting over");
                            break true;
                        }
                        other => trace!(device = %ctx.name, activity = ?other, "subscription activity"),
                    },
                    Some(Ok(other)) => {
                        trace!(device = %ctx.name, event = ?other, "session event");
                    }
                }
            }
        }
        let flushing = Instant::now();
        flush(&pending, ctx).await?;
        if flushing.elapsed() > Duration::from_millis(100) {
            // The pipeline held us up and the event loop was not polled meanwhile: the
            // server's answers are waiting unread, not missing.
            last_publish = Instant::now();
        }
    };

    // Giving up a session: say goodbye (it may still be half alive), report the outage once.
    // Only a session that delivered values resets the backoff: one that fails right after
    // connecting must not be retried at full speed.
    let worked = give_up
        && flags.delivered.load(Ordering::Relaxed)
        && first_connected.is_some_and(|t| t.elapsed() >= HEALTHY.max(settings.backoff_max));
    close(session, &mut stream).await;
    flush(&pending, ctx).await?;
    ctx.status.connected.store(false, Ordering::Relaxed);
    if down.begin() {
        emit_all_bad(ctx, settings.tags.len(), Reason::Disconnected).await?;
    }
    Ok(SessionEnd::GaveUp { worked })
}

fn identity_kind(settings: &OpcUaSettings) -> &'static str {
    match settings.identity {
        super::Identity::Anonymous => "anonymous",
        super::Identity::UserName { .. } => "username",
        super::Identity::X509 { .. } => "x509",
    }
}

/// Hands every batch the subscription callback queued to the pipeline.
async fn flush(pending: &Mutex<Vec<Batch>>, ctx: &DriverContext) -> Result<(), DriverError> {
    let batches = match pending.lock() {
        Ok(mut p) => std::mem::take(&mut *p),
        Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
    };
    // In subscribe mode a notification message is what a scan is in poll mode.
    ctx.status
        .scans
        .fetch_add(batches.len() as u64, Ordering::Relaxed);
    for batch in batches {
        ctx.emitter.emit(batch, &ctx.status).await?;
    }
    Ok(())
}

/// Closes the session politely (keeping the event loop polled so CloseSession goes out).
async fn close<S>(session: &Arc<Session>, stream: &mut std::pin::Pin<&mut S>)
where
    S: futures::Stream<Item = Result<SessionPollResult, StatusCode>>,
{
    session.disable_reconnects();
    let disconnect = session.disconnect();
    tokio::pin!(disconnect);
    let deadline = tokio::time::sleep(CLOSE_GRACE);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut disconnect => return,
            _ = &mut deadline => return,
            event = stream.next() => if event.is_none() { return },
        }
    }
}

/// The part of a session that issues requests: resolving nodes, then either creating the
/// subscription or polling. Runs concurrently with the event loop.
async fn control(
    settings: &OpcUaSettings,
    ctx: &DriverContext,
    session: &Session,
    pending: Arc<Mutex<Vec<Batch>>>,
    flags: Arc<SessionFlags>,
    reconnected: &Notify,
) -> Result<(), ControlEnd> {
    // Until the session is set up, a write is refused at once.
    let setup = async {
        session.wait_for_connection().await;
        let limits = Limits::read(session).await;
        debug!(device = %ctx.name, ?limits, "server operation limits");
        let nodes = resolve(settings, ctx, session).await?;
        if settings.mode == Mode::Subscribe {
            subscribe(
                settings,
                ctx,
                session,
                &nodes,
                limits,
                pending,
                flags.clone(),
            )
            .await?;
            flags.subscribed.store(true, Ordering::Relaxed);
        }
        Ok::<_, ControlEnd>((limits, nodes))
    };
    let (limits, nodes) = refusing_writes(ctx.writes.as_ref(), setup).await?;
    // The Read request is the same every scan: built once per session.
    let reads: Vec<ReadValueId> = nodes
        .iter()
        .filter_map(|n| n.as_ref().ok().map(ReadValueId::from))
        .collect();
    // Writes are performed here, between two reads (never during one).
    let inbox = ctx.writes.as_ref();
    match settings.mode {
        Mode::Subscribe => loop {
            tokio::select! {
                _ = reconnected.notified() => {
                    read_all(ctx, session, &nodes, &reads, limits, &flags).await?;
                }
                request = next_write(inbox) => {
                    write::answer(session, &nodes, &ctx.status, request).await;
                }
            }
        },
        Mode::Poll => {
            let mut tick = tokio::time::interval(settings.scan_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if ctx.status.is_connected() {
                            read_all(ctx, session, &nodes, &reads, limits, &flags).await?;
                        }
                    }
                    request = next_write(inbox) => {
                        write::answer(session, &nodes, &ctx.status, request).await;
                    }
                }
            }
        }
    }
}

/// The server's per-call limits (OPC UA Part 5, OperationLimits); `None` when it sets none.
#[derive(Debug, Clone, Copy, Default)]
struct Limits {
    nodes_per_read: Option<usize>,
    monitored_items_per_call: Option<usize>,
}

impl Limits {
    /// Reads the limits; a server that does not publish them gets no limits (0 means none too).
    async fn read(session: &Session) -> Limits {
        let ids = [
            VariableId::Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
            VariableId::Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
        ]
        .map(|v| ReadValueId::from(NodeId::from(v)));
        let Ok(values) = session.read(&ids, TimestampsToReturn::Neither, 0.0).await else {
            return Limits::default();
        };
        let limit = |i: usize| match values.get(i).and_then(|v| v.value.as_ref()) {
            Some(Variant::UInt32(n)) if *n > 0 => Some(*n as usize),
            _ => None,
        };
        Limits {
            nodes_per_read: limit(0),
            monitored_items_per_call: limit(1),
        }
    }
}

/// Node ids for every tag; a browse path that does not resolve gives its status instead.
async fn resolve(
    settings: &OpcUaSettings,
    ctx: &DriverContext,
    session: &Session,
) -> Result<Vec<Result<NodeId, StatusCode>>, ControlEnd> {
    let mut nodes = Vec::with_capacity(settings.tags.len());
    let mut bad = Vec::new();
    let now = Timestamp::now();
    for (i, tag) in settings.tags.iter().enumerate() {
        let node = match &tag.node {
            NodeRef::Id(id) => Ok(id.clone()),
            NodeRef::BrowsePath(path) => match client::resolve_path(session, path).await {
                Ok(id) => {
                    debug!(device = %ctx.name, tag = %tag.name, node = %id, "resolved browse path");
                    Ok(id)
                }
                Err(OpcUaError::Call(status)) => {
                    return Err(ControlEnd::Retry {
                        status,
                        reported: false,
                    })
                }
                Err(e) => {
                    let status = match e {
                        OpcUaError::Service(s) => s,
                        _ => StatusCode::BadNoMatch,
                    };
                    warn!(device = %ctx.name, tag = %tag.name, path = %tag.node, %status, "browse path does not resolve");
                    bad.push(Sample::bad(tag_id(i), Reason::Status(status.bits()), now));
                    Err(status)
                }
            },
        };
        nodes.push(node);
    }
    emit(ctx, bad).await?;
    Ok(nodes)
}

/// Creates one subscription with a monitored item per resolved tag.
async fn subscribe(
    settings: &OpcUaSettings,
    ctx: &DriverContext,
    session: &Session,
    nodes: &[Result<NodeId, StatusCode>],
    limits: Limits,
    pending: Arc<Mutex<Vec<Batch>>>,
    flags: Arc<SessionFlags>,
) -> Result<(), ControlEnd> {
    let publishing = settings.publishing_interval;
    let lifetime = lifetime_count(publishing);
    let notifier = Notifier {
        flags: flags.clone(),
        status: ctx.status.clone(),
        device: ctx.device,
        tags: settings.tags.len(),
        pending,
        name: ctx.name.clone(),
    };
    let subscription = match session
        .create_subscription(
            publishing,
            lifetime,
            KEEP_ALIVE_COUNT,
            MAX_NOTIFICATIONS_PER_PUBLISH,
            0,
            true,
            notifier,
        )
        .await
    {
        Ok(id) => id,
        Err(e) => {
            error!(device = %ctx.name, status = %e.status(), "the server refused the subscription; use mode = \"poll\" for servers without working subscriptions");
            emit_all_bad(ctx, settings.tags.len(), Reason::Status(e.status().bits())).await?;
            return Err(ControlEnd::Retry {
                status: e.status(),
                reported: true,
            });
        }
    };
    // The requests are built one call at a time: built all at once (160 bytes each plus the node
    // id; 2.6 MB for 10k tags once the Vec had grown), with a clone of each call's share, they
    // stood next to the client's own copy of every item.
    let resolved: Vec<(usize, &NodeId)> = settings
        .tags
        .iter()
        .zip(nodes)
        .enumerate()
        .filter_map(|(i, (_, node))| Some((i, node.as_ref().ok()?)))
        .collect();
    let now = Timestamp::now();
    let mut bad = Vec::new();
    let mut created = 0usize;
    let per_call = limits
        .monitored_items_per_call
        .map_or(CREATE_CHUNK, |n| n.min(CREATE_CHUNK));
    for chunk in resolved.chunks(per_call) {
        let items: Vec<MonitoredItemCreateRequest> = chunk
            .iter()
            .map(|&(i, node)| create_request(i, &settings.tags[i], node))
            .collect();
        match session
            .create_monitored_items(subscription, TimestampsToReturn::Both, items)
            .await
        {
            Ok(results) => {
                for ((i, _), result) in chunk.iter().zip(&results) {
                    let status = result.result.status_code;
                    if status.is_bad() {
                        warn!(device = %ctx.name, tag = %settings.tags[*i].name, %status, "the server refused the monitored item");
                        bad.push(Sample::bad(tag_id(*i), Reason::Status(status.bits()), now));
                    } else {
                        created += 1;
                    }
                }
            }
            Err(e) => {
                warn!(device = %ctx.name, status = %e.status(), items = chunk.len(), "creating monitored items failed");
                return Err(ControlEnd::Retry {
                    status: e.status(),
                    reported: false,
                });
            }
        }
    }
    // The server may have revised the timing; the silence watchdog follows what it granted.
    let (granted, keep_alive) = {
        let state = session.subscription_state.lock();
        state
            .get(subscription)
            .map(|s| (s.publishing_interval(), s.max_keep_alive_count()))
            .unwrap_or((publishing, KEEP_ALIVE_COUNT))
    };
    let silence = silence_limit(granted.max(publishing), keep_alive.max(1), settings.timeout);
    flags
        .silence_ms
        .store(silence.as_millis() as u64, Ordering::Relaxed);
    info!(device = %ctx.name, subscription, monitored_items = created, publishing_interval = ?granted, keep_alive, "subscribed");
    Ok(emit(ctx, bad).await?)
}

/// The CreateMonitoredItems request for tag `i`.
fn create_request(i: usize, tag: &super::OpcUaTag, node: &NodeId) -> MonitoredItemCreateRequest {
    let filter = match tag.deadband {
        Some(deadband) => ExtensionObject::from_message(DataChangeFilter {
            trigger: DataChangeTrigger::StatusValue,
            // 1 = absolute deadband (OPC UA Part 4, DeadbandType).
            deadband_type: 1,
            deadband_value: deadband,
        }),
        None => ExtensionObject::null(),
    };
    MonitoredItemCreateRequest {
        item_to_monitor: ReadValueId::from(node),
        monitoring_mode: MonitoringMode::Reporting,
        requested_parameters: MonitoringParameters {
            client_handle: handle_of(i),
            sampling_interval: tag.sampling_interval.as_secs_f64() * 1000.0,
            filter,
            queue_size: tag.queue_size,
            discard_oldest: true,
        },
    }
}

/// Lifetime count of the subscription: SUBSCRIPTION_LIFETIME worth of publishing intervals, and
/// at least three keep-alives as OPC UA requires.
fn lifetime_count(publishing: Duration) -> u32 {
    let ms = publishing.as_millis().max(1);
    let count = (SUBSCRIPTION_LIFETIME.as_millis() / ms).min(u128::from(u32::MAX)) as u32;
    count.max(KEEP_ALIVE_COUNT * 3)
}

/// Reads every resolved tag and emits one batch: one Read call, or as few as the server's
/// MaxNodesPerRead allows.
async fn read_all(
    ctx: &DriverContext,
    session: &Session,
    nodes: &[Result<NodeId, StatusCode>],
    reads: &[ReadValueId],
    limits: Limits,
    flags: &SessionFlags,
) -> Result<(), DriverError> {
    let started = Instant::now();
    let per_call = limits.nodes_per_read.unwrap_or(usize::MAX);
    let count_call = || {
        ctx.status.requests.fetch_add(1, Ordering::Relaxed);
    };
    let result = client::read_chunked(
        session,
        reads,
        per_call,
        TimestampsToReturn::Both,
        count_call,
    )
    .await;
    let now = Timestamp::now();
    let answered = result.is_ok();
    let samples: Vec<Sample> = match result {
        Ok(values) => {
            flags.delivered.store(true, Ordering::Relaxed);
            let mut values = values.into_iter();
            nodes
                .iter()
                .enumerate()
                .map(|(i, node)| match node {
                    Ok(_) => match values.next() {
                        Some(dv) => sample_of(tag_id(i), &dv, now),
                        None => Sample::bad(tag_id(i), Reason::Protocol, now),
                    },
                    Err(status) => Sample::bad(tag_id(i), Reason::Status(status.bits()), now),
                })
                .collect()
        }
        Err(e) => {
            let kind = if !ctx.status.is_connected() {
                ErrorKind::Link
            } else if matches!(e, StatusCode::BadTimeout | StatusCode::BadRequestTimeout) {
                ErrorKind::Timeout
            } else {
                ErrorKind::Exception
            };
            ctx.status.count_error(kind);
            if !ctx.status.is_connected() {
                // The event loop reports the outage; no second batch of bad samples.
                return Ok(());
            }
            debug!(device = %ctx.name, status = %e, "read failed");
            let reason = match e {
                StatusCode::BadTimeout | StatusCode::BadRequestTimeout => Reason::Timeout,
                s => Reason::Status(s.bits()),
            };
            (0..nodes.len())
                .map(|i| Sample::bad(tag_id(i), reason, now))
                .collect()
        }
    };
    let us = started.elapsed().as_micros() as u64;
    if answered {
        ctx.status.answered(us);
    } else {
        ctx.status.scans.fetch_add(1, Ordering::Relaxed);
        ctx.status.last_scan_us.store(us, Ordering::Relaxed);
    }
    emit(ctx, samples).await
}

async fn emit(ctx: &DriverContext, samples: Vec<Sample>) -> Result<(), DriverError> {
    if samples.is_empty() {
        return Ok(());
    }
    let batch = Batch {
        device: ctx.device,
        samples,
        read_at: Instant::now(),
    };
    ctx.emitter.emit(batch, &ctx.status).await
}

async fn emit_all_bad(ctx: &DriverContext, tags: usize, reason: Reason) -> Result<(), DriverError> {
    let now = Timestamp::now();
    let samples = (0..tags)
        .map(|i| Sample::bad(tag_id(i), reason, now))
        .collect();
    emit(ctx, samples).await
}

fn tag_id(index: usize) -> TagId {
    TagId(index as u32)
}

/// Client handles are tag index + 1: async-opcua assigns its own handle to a zero.
fn handle_of(index: usize) -> u32 {
    index as u32 + 1
}

/// Turns each notification message into one batch, queued for the driver task to emit.
struct Notifier {
    flags: Arc<SessionFlags>,
    status: Arc<DeviceStatus>,
    device: DeviceId,
    tags: usize,
    pending: Arc<Mutex<Vec<Batch>>>,
    name: Arc<str>,
}

impl Notifier {
    fn batch_of(&self, notification: NotificationMessage) -> Option<Batch> {
        let now = Timestamp::now();
        // Sized up front: a message carries up to thousands of values, and growing by doubling
        // would copy them several times and leave up to half the capacity unused in the batch.
        let values: usize = notification
            .notification_data
            .iter()
            .flatten()
            .filter_map(|object| object.inner_as::<DataChangeNotification>())
            .map(|change| change.monitored_items.as_ref().map_or(0, Vec::len))
            .sum();
        let mut samples = Vec::with_capacity(values);
        for object in notification.notification_data.into_iter().flatten() {
            if let Some(change) = object.inner_as::<DataChangeNotification>() {
                for item in change.monitored_items.iter().flatten() {
                    let handle = item.client_handle as usize;
                    if handle == 0 || handle > self.tags {
                        trace!(device = %self.name, handle, "notification for an unknown monitored item");
                        continue;
                    }
                    if item.value.status.is_some_and(|s| s.overflow()) {
                        // The server's queue for this item was full and it dropped a value.
                        self.status.overruns.fetch_add(1, Ordering::Relaxed);
                    }
                    samples.push(sample_of(tag_id(handle - 1), &item.value, now));
                }
            } else if let Some(change) = object.inner_as::<StatusChangeNotification>() {
                warn!(device = %self.name, status = %change.status, "subscription status changed");
                if change.status.is_bad() {
                    self.flags.subscription_lost.store(true, Ordering::Relaxed);
                }
            }
        }
        if !samples.is_empty() {
            self.flags.delivered.store(true, Ordering::Relaxed);
        }
        (!samples.is_empty()).then(|| Batch {
            device: self.device,
            samples,
            read_at: Instant::now(),
        })
    }
}

impl OnSubscriptionNotificationCore for Notifier {
    fn on_subscription_notification(
        &mut self,
        notification: NotificationMessage,
        _items: MonitoredItemMap<'_>,
    ) {
        if let Some(batch) = self.batch_of(notification) {
            match self.pending.lock() {
                Ok(mut p) => p.push(batch),
                Err(poisoned) => poisoned.into_inner().push(batch),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opcua::types::{DataValue, MonitoredItemNotification, Variant};

    fn notifier(tags: usize) -> Notifier {
        Notifier {
            flags: Arc::default(),
            status: Arc::default(),
            device: DeviceId(4),
            tags,
            pending: Arc::default(),
            name: "oven".into(),
        }
    }

    fn message(items: Vec<(u32, f64)>) -> NotificationMessage {
        let change = DataChangeNotification {
            monitored_items: Some(
                items
                    .into_iter()
                    .map(|(h, v)| MonitoredItemNotification {
                        client_handle: h,
                        value: DataValue::new_now(Variant::Double(v)),
                    })
                    .collect(),
            ),
            diagnostic_infos: None,
        };
        NotificationMessage {
            sequence_number: 1,
            publish_time: opcua::types::DateTime::now(),
            notification_data: Some(vec![ExtensionObject::from_message(change)]),
        }
    }

    #[test]
    fn one_notification_message_becomes_one_batch_in_tag_order_of_handles() {
        let n = notifier(3);
        let batch = n
            .batch_of(message(vec![(3, 1.0), (1, 2.0), (3, 3.0)]))
            .unwrap();
        assert_eq!(batch.device, DeviceId(4));
        let tags: Vec<u32> = batch.samples.iter().map(|s| s.tag.0).collect();
        assert_eq!(tags, vec![2, 0, 2], "queued values of one item all arrive");
        assert!(batch.samples.iter().all(|s| s.source_time.is_some()));
    }

    #[test]
    fn unknown_client_handles_are_ignored() {
        let n = notifier(2);
        assert!(n.batch_of(message(vec![(0, 1.0), (3, 1.0)])).is_none());
    }

    #[test]
    fn outages_are_reported_once_per_episode() {
        let mut o = Outage::default();
        assert!(o.begin());
        assert!(!o.begin());
        o.end();
        assert!(o.begin());
    }
}
