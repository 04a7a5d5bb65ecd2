//! The southbound contract: what a driver gets ([`DriverContext`]) and how it hands over what it
//! read ([`Emitter`]). All drivers share one bounded channel; when it is full a driver waits and
//! counts an overrun, because a device cannot buffer for us and silently dropping is worse.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::model::{Batch, DeviceId};

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
}
