//! The southbound contract: what a driver gets ([`DriverContext`]) and how it hands over what it
//! read ([`Emitter`]). All drivers share one bounded channel; when it is full a driver waits and
//! counts an overrun, because a device cannot buffer for us and silently dropping is worse.
//!
//! Writes go the other way: each driver task may get a bounded [`WriteInbox`] of
//! [`WriteRequest`]s (one per task, shared by the units of a Modbus line: a request names its
//! device). A driver performs a write between two reads, never during one, reads the tag back
//! and answers on the request's oneshot: [`WriteDone`] with the value read back, or a
//! [`WriteError`] saying whether the value, the device or the link said no.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::model::{Batch, DeviceId, TagId, Value};

/// Errors that end a driver task. Per-read failures are not errors: they become bad samples.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The pipeline behind the emitter is gone (shutdown).
    #[error("the pipeline is closed")]
    Closed,
    /// The driver's configuration cannot be used.
    #[error("invalid driver configuration: {0}")]
    Config(String),
}

/// Live counters of one device, read by metrics and the demo view.
#[derive(Debug, Default)]
pub struct DeviceStatus {
    /// Whether a connection to the device is established.
    pub connected: AtomicBool,
    /// Completed scans.
    pub scans: AtomicU64,
    /// Requests sent to the device.
    pub requests: AtomicU64,
    /// Failed requests (exceptions, timeouts, transport errors).
    pub errors: AtomicU64,
    /// Failed requests by kind, indexed by [`ErrorKind`]; their sum is at most `errors` (a
    /// driver that cannot tell counts in `errors` only).
    pub errors_by_kind: [AtomicU64; ErrorKind::ALL.len()],
    /// Connection attempts after the first.
    pub reconnects: AtomicU64,
    /// Times the driver had to wait because the pipeline was full.
    pub overruns: AtomicU64,
    /// Samples emitted.
    pub samples: AtomicU64,
    /// Duration of the last scan in microseconds.
    pub last_scan_us: AtomicU64,
    /// Durations of the scans the device answered.
    pub scan_duration: crate::histogram::Histogram,
    /// When the device last answered a scan (Unix milliseconds; 0: never).
    pub last_answer_ms: AtomicU64,
}

/// Why a request failed, for the per-reason error counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No answer within the timeout.
    Timeout = 0,
    /// The device answered with an exception (Modbus) or a bad status.
    Exception = 1,
    /// The connection or serial line failed.
    Link = 2,
    /// An answer that does not fit the request, or cannot be decoded.
    Protocol = 3,
}

impl ErrorKind {
    /// Every kind, in index order.
    pub const ALL: [ErrorKind; 4] = [
        ErrorKind::Timeout,
        ErrorKind::Exception,
        ErrorKind::Link,
        ErrorKind::Protocol,
    ];

    /// The name used as a metric label.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Exception => "exception",
            ErrorKind::Link => "link",
            ErrorKind::Protocol => "protocol",
        }
    }

    /// The kind of failure a bad sample's reason stands for.
    pub fn of(reason: crate::model::Reason) -> ErrorKind {
        use crate::model::Reason;
        match reason {
            Reason::Timeout => ErrorKind::Timeout,
            Reason::Exception(_) | Reason::Status(_) => ErrorKind::Exception,
            Reason::Disconnected => ErrorKind::Link,
            Reason::Decode | Reason::Protocol => ErrorKind::Protocol,
        }
    }
}

impl DeviceStatus {
    /// Counts a failed request of `kind`.
    pub fn count_error(&self, kind: ErrorKind) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.errors_by_kind[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the device is connected right now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Counts a scan the device answered, which took `us` microseconds.
    pub fn answered(&self, us: u64) {
        self.scans.fetch_add(1, Ordering::Relaxed);
        self.last_scan_us.store(us, Ordering::Relaxed);
        self.scan_duration.observe(us);
        let now = crate::model::Timestamp::now().unix_ms();
        self.last_answer_ms.store(now, Ordering::Relaxed);
    }
}

/// Hands batches to the pipeline, waiting (and counting an overrun) when it is full.
#[derive(Debug, Clone)]
pub struct Emitter {
    tx: mpsc::Sender<Batch>,
}

impl Emitter {
    /// An emitter over the pipeline's batch channel.
    pub fn new(tx: mpsc::Sender<Batch>) -> Self {
        Emitter { tx }
    }

    /// Sends one batch; waits while the pipeline is full.
    pub(crate) async fn emit(
        &self,
        batch: Batch,
        status: &DeviceStatus,
    ) -> Result<(), DriverError> {
        let n = batch.samples.len() as u64;
        let batch = match self.tx.try_send(batch) {
            Ok(()) => {
                status.samples.fetch_add(n, Ordering::Relaxed);
                return Ok(());
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(DriverError::Closed),
            Err(mpsc::error::TrySendError::Full(batch)) => batch,
        };
        status.overruns.fetch_add(1, Ordering::Relaxed);
        self.tx.send(batch).await.map_err(|_| DriverError::Closed)?;
        status.samples.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

/// Everything a driver task needs besides its own configuration.
#[derive(Debug, Clone)]
pub struct DriverContext {
    /// The device's id in the catalog.
    pub device: DeviceId,
    /// The device's name, for logs.
    pub name: Arc<str>,
    /// Where batches go.
    pub emitter: Emitter,
    /// Cancelled at shutdown; the driver returns promptly.
    pub cancel: CancellationToken,
    /// Counters shared with metrics.
    pub status: Arc<DeviceStatus>,
    /// Where write requests come from; None when the device takes no writes.
    pub writes: Option<WriteInbox>,
}

/// One write asked of a driver.
#[derive(Debug)]
pub struct WriteRequest {
    /// The device (a unit of a Modbus line has its own).
    pub device: DeviceId,
    /// The tag, by its index in the device's tags.
    pub tag: TagId,
    /// The value, in engineering units (scale and offset are inverted by the driver).
    pub value: Value,
    /// Where the outcome goes; a dropped receiver is fine.
    pub reply: oneshot::Sender<Result<WriteDone, WriteError>>,
}

impl WriteRequest {
    /// Whether nobody waits for this write any more (the commands task gave up and answered
    /// "failed"): a write done now would land long after it was asked for, unseen, so the
    /// driver drops it instead; audited here.
    pub fn abandoned(&self) -> bool {
        let gone = self.reply.is_closed();
        if gone {
            tracing::warn!(target: "audit", device = self.device.0, tag = self.tag.0, "a write waited too long behind the reads and was dropped; it never reached the device");
        }
        gone
    }
}

/// A write the device accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteDone {
    /// The tag's value read right before the write (for the audit); None when that read
    /// failed.
    pub previous: Option<Value>,
    /// The tag's value read back right after the write; None when that read failed.
    pub read_back: Option<Value>,
}

/// Why a write did not happen (or did not complete).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The value cannot be stored in the tag (type, range, read-only area); nothing was sent.
    #[error("{0}")]
    Refused(String),
    /// The device or this driver cannot do this kind of write; `what` says which and why.
    #[error("{0}")]
    Unsupported(String),
    /// The device answered with a Modbus exception.
    #[error("the device refused the write (exception {0})")]
    Exception(u8),
    /// The OPC UA server answered with a bad status code.
    #[error("the server refused the write ({0})")]
    Status(String),
    /// The driver has no connection to the device right now; nothing was sent.
    #[error("the device is not connected")]
    NotConnected,
    /// The device does not know the tag (a request for another config).
    #[error("unknown tag")]
    UnknownTag,
    /// No answer, a garbled answer or a failed link: whether the write landed is unknown.
    #[error("the write got no valid answer: {0}")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The receiving end of a driver task's write requests; cloned into each unit's context.
#[derive(Debug, Clone)]
pub struct WriteInbox(Arc<tokio::sync::Mutex<mpsc::Receiver<WriteRequest>>>);

impl WriteInbox {
    /// The next request; None when every sender is gone. Cancel-safe.
    pub async fn next(&self) -> Option<WriteRequest> {
        self.0.lock().await.recv().await
    }
}

/// A bounded write channel for one driver task.
pub fn write_channel(capacity: usize) -> (mpsc::Sender<WriteRequest>, WriteInbox) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (tx, WriteInbox(Arc::new(tokio::sync::Mutex::new(rx))))
}

/// The next write request of an inbox, or never when there is none (a driver without writes).
pub async fn next_write(inbox: Option<&WriteInbox>) -> WriteRequest {
    match inbox {
        Some(inbox) => match inbox.next().await {
            Some(request) => request,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Runs `work` to its end, answering every write request that arrives meanwhile with
/// [`WriteError::NotConnected`] (a driver that is connecting or waiting to reconnect), so a
/// command is refused at once instead of waiting for a session that may never come.
pub async fn refusing_writes<F: std::future::Future>(
    inbox: Option<&WriteInbox>,
    work: F,
) -> F::Output {
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            request = next_write(inbox) => {
                let _ = request.reply.send(Err(WriteError::NotConnected));
            }
        }
    }
}
