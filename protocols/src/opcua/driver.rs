//! The OPC UA driver: one task per device, one session per task.
//!
//! Design:
//! - async-opcua's session event loop does the reconnecting (with backoff) and transfers or
//!   re-creates the subscription on a new session. The driver polls that event loop itself, in
//!   the same task that hands batches to the pipeline: while the pipeline is full the event loop
//!   is not polled, so the server keeps the notifications (backpressure instead of an unbounded
//!   queue). A notification message becomes one batch.
//! - Tags go bad with reason `disconnected` once per outage; after a reconnect every tag is read
//!   once, so a tag whose value did not change during the outage does not stay bad.
//! - If the session cannot come back (say, the server was reinstalled with a new certificate),
//!   the driver drops it after a few failed attempts and discovers the endpoint again.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use opcua::client::{
    MonitoredItemMap, OnSubscriptionNotificationCore, Session, SessionConnectMode,
    SessionPollResult,
};
use opcua::types::{
    DataChangeFilter, DataChangeNotification, DataChangeTrigger, ExtensionObject,
    MonitoredItemCreateRequest, MonitoringMode, MonitoringParameters, NodeId, NotificationMessage,
    ReadValueId, StatusChangeNotification, StatusCode, TimestampsToReturn, VariableId, Variant,
};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use super::client::{self, OpcUaError};
use super::convert::sample_of;
use super::{Mode, NodeRef, OpcUaSettings, SecurityPolicy};
use crate::backoff::Backoff;
use crate::driver::{DriverContext, DriverError};
use crate::model::{Batch, DeviceId, Reason, Sample, TagId, Timestamp};

/// Monitored items created per CreateMonitoredItems call.
const CREATE_CHUNK: usize = 1000;
/// Failed reconnects of one session before the driver discovers the endpoint again.
const RECONNECTS_PER_SESSION: u32 = 5;
/// How long a closing session may take to say goodbye at shutdown.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

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
    let mut client = client::build_client(&settings)
        .map_err(|e| DriverError::Config(format!("device {}: {e}", ctx.name)))?;
    let mut backoff = Backoff::new(settings.backoff_min, settings.backoff_max);
    let mut down = Outage::default();

    loop {
        let opened = tokio::select! {
            _ = ctx.cancel.cancelled() => return Ok(()),
            r = client::open_session(&mut client, &settings) => r,
        };
        match opened {
            Ok((session, event_loop, endpoint)) => {
                let end = run_session(&settings, &ctx, &session, event_loop, &endpoint, &mut down)
                    .await?;
                match end {
                    SessionEnd::Cancelled => return Ok(()),
                    SessionEnd::GaveUp => backoff.reset(),
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
                ctx.status.reconnects.fetch_add(1, Ordering::Relaxed);
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = ctx.cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
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
    GaveUp,
}

/// Drives one session: its event loop, the subscription or the poll loop, until cancelled or
/// until the session cannot be re-established.
async fn run_session(
    settings: &OpcUaSettings,
    ctx: &DriverContext,
    session: &Arc<Session>,
    event_loop: client::EventLoop,
    endpoint: &opcua::types::EndpointDescription,
    down: &mut Outage,
) -> Result<SessionEnd, DriverError> {
    let pending: Arc<Mutex<Vec<Batch>>> = Arc::default();
    let reconnected = Notify::new();
    let stream = event_loop.enter();
    tokio::pin!(stream);
    let control = control(settings, ctx, session, pending.clone(), &reconnected);
    tokio::pin!(control);
    let mut control_done = false;
    let mut connected_before = false;
    let mut failed_attempts = 0u32;

    loop {
        tokio::select! {
            _ = ctx.cancel.cancelled() => {
                close(session, &mut stream).await;
                return Ok(SessionEnd::Cancelled);
            }
            r = &mut control, if !control_done => {
                control_done = true;
                r?;
            }
            event = stream.next() => match event {
                None => return Ok(SessionEnd::GaveUp),
                Some(Err(status)) => {
                    warn!(device = %ctx.name, %status, "OPC UA session ended");
                    return Ok(SessionEnd::GaveUp);
                }
                Some(Ok(SessionPollResult::Reconnected(mode))) => {
                    failed_attempts = 0;
                    ctx.status.connected.store(true, Ordering::Relaxed);
                    down.end();
                    let how = match mode {
                        SessionConnectMode::NewSession(_) => "new session",
                        SessionConnectMode::ReactivatedSession(_) => "session reactivated",
                    };
                    if connected_before {
                        ctx.status.reconnects.fetch_add(1, Ordering::Relaxed);
                        info!(device = %ctx.name, endpoint = %settings.endpoint, how, "reconnected to OPC UA server");
                        reconnected.notify_one();
                    } else {
                        info!(device = %ctx.name, endpoint = %settings.endpoint, policy = %settings.security_policy, mode = %settings.security_mode, "connected to OPC UA server");
                    }
                    connected_before = true;
                }
                Some(Ok(SessionPollResult::ConnectionLost(status))) => {
                    ctx.status.connected.store(false, Ordering::Relaxed);
                    flush(&pending, ctx).await?;
                    if down.begin() {
                        warn!(device = %ctx.name, %status, "lost the OPC UA session; reconnecting");
                        emit_all_bad(ctx, settings.tags.len(), Reason::Disconnected).await?;
                    }
                }
                Some(Ok(SessionPollResult::ReconnectFailed(status))) => {
                    ctx.status.reconnects.fetch_add(1, Ordering::Relaxed);
                    failed_attempts += 1;
                    let first = down.begin();
                    if client::is_certificate_problem(status) && !down.cert_advice_given {
                        down.cert_advice_given = true;
                        error!(device = %ctx.name, %status, "{}", client::untrusted_server_advice(&settings.pki_dir, &endpoint.server_certificate));
                    } else if first {
                        warn!(device = %ctx.name, %status, "cannot connect to OPC UA server; retrying with backoff");
                    } else {
                        debug!(device = %ctx.name, %status, "reconnect failed");
                    }
                    if first {
                        emit_all_bad(ctx, settings.tags.len(), Reason::Disconnected).await?;
                    }
                    if failed_attempts >= RECONNECTS_PER_SESSION {
                        debug!(device = %ctx.name, "dropping the session to discover the endpoint again");
                        return Ok(SessionEnd::GaveUp);
                    }
                }
                Some(Ok(other)) => {
                    tracing::trace!(device = %ctx.name, event = ?other, "session event");
                }
            }
        }
        flush(&pending, ctx).await?;
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
    reconnected: &Notify,
) -> Result<(), DriverError> {
    session.wait_for_connection().await;
    let limits = Limits::read(session).await;
    debug!(device = %ctx.name, ?limits, "server operation limits");
    let nodes = resolve(settings, ctx, session).await?;
    match settings.mode {
        Mode::Subscribe => {
            subscribe(settings, ctx, session, &nodes, limits, pending).await?;
            loop {
                reconnected.notified().await;
                read_all(ctx, session, &nodes, limits).await?;
            }
        }
        Mode::Poll => {
            let mut tick = tokio::time::interval(settings.scan_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if ctx.status.is_connected() {
                    read_all(ctx, session, &nodes, limits).await?;
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
) -> Result<Vec<Result<NodeId, StatusCode>>, DriverError> {
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
) -> Result<(), DriverError> {
    let publishing = settings.publishing_interval;
    let keep_alive = 10u32;
    let notifier = Notifier {
        device: ctx.device,
        tags: settings.tags.len(),
        pending,
        name: ctx.name.clone(),
    };
    let subscription = match session
        .create_subscription(publishing, keep_alive * 6, keep_alive, 0, 0, true, notifier)
        .await
    {
        Ok(id) => id,
        Err(e) => {
            error!(device = %ctx.name, status = %e.status(), "the server refused the subscription; use mode = \"poll\" for servers without working subscriptions");
            return emit_all_bad(ctx, settings.tags.len(), Reason::Status(e.status().bits())).await;
        }
    };
    let requests: Vec<(usize, MonitoredItemCreateRequest)> = settings
        .tags
        .iter()
        .zip(nodes)
        .enumerate()
        .filter_map(|(i, (tag, node))| {
            let node = node.as_ref().ok()?;
            let filter = match tag.deadband {
                Some(deadband) => ExtensionObject::from_message(DataChangeFilter {
                    trigger: DataChangeTrigger::StatusValue,
                    // 1 = absolute deadband (OPC UA Part 4, DeadbandType).
                    deadband_type: 1,
                    deadband_value: deadband,
                }),
                None => ExtensionObject::null(),
            };
            Some((
                i,
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
                },
            ))
        })
        .collect();
    let now = Timestamp::now();
    let mut bad = Vec::new();
    let mut created = 0usize;
    let per_call = limits
        .monitored_items_per_call
        .map_or(CREATE_CHUNK, |n| n.min(CREATE_CHUNK));
    for chunk in requests.chunks(per_call) {
        let items: Vec<MonitoredItemCreateRequest> = chunk.iter().map(|(_, r)| r.clone()).collect();
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
                for (i, _) in chunk {
                    bad.push(Sample::bad(
                        tag_id(*i),
                        Reason::Status(e.status().bits()),
                        now,
                    ));
                }
            }
        }
    }
    info!(device = %ctx.name, subscription, monitored_items = created, publishing_interval = ?publishing, "subscribed");
    emit(ctx, bad).await
}

/// Reads every resolved tag and emits one batch: one Read call, or as few as the server's
/// MaxNodesPerRead allows.
async fn read_all(
    ctx: &DriverContext,
    session: &Session,
    nodes: &[Result<NodeId, StatusCode>],
    limits: Limits,
) -> Result<(), DriverError> {
    let ids: Vec<ReadValueId> = nodes
        .iter()
        .filter_map(|n| n.as_ref().ok().map(ReadValueId::from))
        .collect();
    let started = Instant::now();
    let per_call = limits.nodes_per_read.unwrap_or(usize::MAX).max(1);
    let mut result = Ok(Vec::with_capacity(ids.len()));
    for chunk in ids.chunks(per_call) {
        ctx.status.requests.fetch_add(1, Ordering::Relaxed);
        match session.read(chunk, TimestampsToReturn::Both, 0.0).await {
            Ok(values) => {
                if let Ok(all) = result.as_mut() {
                    all.extend(values);
                }
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let now = Timestamp::now();
    let samples: Vec<Sample> = match result {
        Ok(values) => {
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
            ctx.status.errors.fetch_add(1, Ordering::Relaxed);
            if !ctx.status.is_connected() {
                // The event loop reports the outage; no second batch of bad samples.
                return Ok(());
            }
            debug!(device = %ctx.name, status = %e.status(), "read failed");
            let reason = match e.status() {
                StatusCode::BadTimeout | StatusCode::BadRequestTimeout => Reason::Timeout,
                s => Reason::Status(s.bits()),
            };
            (0..nodes.len())
                .map(|i| Sample::bad(tag_id(i), reason, now))
                .collect()
        }
    };
    ctx.status.scans.fetch_add(1, Ordering::Relaxed);
    ctx.status
        .last_scan_us
        .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
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
    device: DeviceId,
    tags: usize,
    pending: Arc<Mutex<Vec<Batch>>>,
    name: Arc<str>,
}

impl Notifier {
    fn batch_of(&self, notification: NotificationMessage) -> Option<Batch> {
        let now = Timestamp::now();
        let mut samples = Vec::new();
        for object in notification.notification_data.into_iter().flatten() {
            if let Some(change) = object.inner_as::<DataChangeNotification>() {
                for item in change.monitored_items.iter().flatten() {
                    let handle = item.client_handle as usize;
                    if handle == 0 || handle > self.tags {
                        debug!(device = %self.name, handle, "notification for an unknown monitored item");
                        continue;
                    }
                    samples.push(sample_of(tag_id(handle - 1), &item.value, now));
                }
            } else if let Some(status) = object.inner_as::<StatusChangeNotification>() {
                warn!(device = %self.name, status = %status.status, "subscription status changed");
            }
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
