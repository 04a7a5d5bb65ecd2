//! Builds the running gateway from a validated config: drivers, writer, committer, publisher.
//!
//! Shutdown is ordered so nothing is lost: cancel the drivers → the writer drains their channel
//! and closes the publisher's → the publisher waits `shutdown_grace` for outstanding PUBACKs and
//! disconnects → the committer commits everything still unacknowledged and syncs. Each stage ends
//! when the one before it has dropped its sending half, so no record is in flight between them.

pub mod committer;
pub mod ledger;
pub mod seq;
pub mod writer;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use protocols::driver::{DeviceStatus, DriverContext, Emitter};
use protocols::model::{Batch, Catalog};
use protocols::{modbus, opcua};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::{ApiState, DeviceInfo};
use crate::buffer::{self, Buffer, BufferError};
use crate::config::{Config, DeviceKind};
use crate::encode::json::JsonEncoder;
use crate::metrics::Metrics;
use crate::publish::Publisher;
use committer::run_committer;
use ledger::Ledger;
use seq::SeqState;
use writer::run_writer;

/// Capacity of the drivers' shared batch channel.
const BATCH_CHANNEL: usize = 1024;

/// State shared by the writer, the committer and the publisher.
#[derive(Debug)]
pub struct Shared {
    /// Records neither acknowledged nor committed.
    pub ledger: Mutex<Ledger>,
    /// The disk buffer.
    pub buffer: Arc<Buffer>,
    /// Pipeline counters.
    pub metrics: Arc<Metrics>,
    /// Lowest sequence number committed since the publisher last looked.
    replay_hint: Mutex<Option<u64>>,
    /// Wakes the publisher after a commit.
    pub committed: Notify,
    /// The largest packet the broker takes, from its CONNACK (MQTT 5); the writer makes no
    /// record larger than this or the configured `max_packet_size`, whichever is smaller.
    broker_packet_limit: AtomicUsize,
    /// Whether the publisher has said what the broker takes (after its first attempt).
    broker_limit_known: AtomicBool,
    /// Wakes a writer waiting for the broker's limit.
    broker_limit_set: Notify,
    /// The latest sample of every tag, for the HTTP API; the writer folds each batch in.
    pub latest: Arc<crate::api::Latest>,
}

impl Shared {
    /// The publisher says what the broker takes: `Some(bytes)` from an MQTT 5 CONNACK, `None`
    /// for no limit beyond the configured one (MQTT 3.1.1, a broker that names none, or a first
    /// attempt that failed).
    pub fn set_broker_packet_limit(&self, limit: Option<usize>) {
        let limit = limit.unwrap_or(usize::MAX);
        self.broker_packet_limit.store(limit, Ordering::Relaxed);
        self.broker_limit_known.store(true, Ordering::Release);
        self.broker_limit_set.notify_waiters();
    }

    /// The largest packet the broker takes, as far as known.
    pub fn broker_packet_limit(&self) -> usize {
        self.broker_packet_limit.load(Ordering::Relaxed)
    }

    /// Waits (at most `max`) until the publisher has said what the broker takes, so the first
    /// records are not made larger than an MQTT 5 broker's limit: a record too large for the
    /// broker could not be split again without a new seq.
    pub async fn wait_for_broker_packet_limit(&self, max: std::time::Duration) {
        let set = self.broker_limit_set.notified();
        tokio::pin!(set);
        set.as_mut().enable();
        if !self.broker_limit_known.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(max, set).await;
        }
    }

    /// Shared state over an open buffer.
    pub fn new(buffer: Arc<Buffer>, metrics: Arc<Metrics>) -> Self {
        metrics
            .buffer_records
            .store(buffer.len(), Ordering::Relaxed);
        metrics
            .buffer_bytes
            .store(buffer.bytes(), Ordering::Relaxed);
        Shared {
            ledger: Mutex::new(Ledger::default()),
            buffer,
            metrics,
            replay_hint: Mutex::new(None),
            committed: Notify::new(),
            broker_packet_limit: AtomicUsize::new(usize::MAX),
            broker_limit_known: AtomicBool::new(false),
            broker_limit_set: Notify::new(),
            latest: Arc::default(),
        }
    }

    /// Locks the ledger. A poisoned lock is recovered: the ledger's state stays consistent
    /// between its method calls, which never panic midway.
    pub fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the lowest sequence number committed since the last call.
    pub fn take_replay_hint(&self) -> Option<u64> {
        self.replay_hint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn hint_replay(&self, seq: u64) {
        let mut h = self.replay_hint.lock().unwrap_or_else(|e| e.into_inner());
        *h = Some(h.map_or(seq, |s| s.min(seq)));
        drop(h);
        self.committed.notify_one();
    }

    fn refresh_gauges(&self) {
        let m = &self.metrics;
        m.buffer_records.store(self.buffer.len(), Ordering::Relaxed);
        m.buffer_bytes.store(self.buffer.bytes(), Ordering::Relaxed);
        let age = self.buffer.oldest_age().map_or(0, |a| a.as_millis() as u64);
        m.oldest_age_ms.store(age, Ordering::Relaxed);
        let memory = self.ledger().pending_bytes();
        m.memory_bytes.store(memory, Ordering::Relaxed);
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory cannot be created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another gateway runs on the same data directory.
    #[error("data directory {path} is in use by another gateway process (its `lock` file is locked); two gateways on one buffer would hand out the same sequence numbers")]
    DataDirInUse {
        /// The directory.
        path: std::path::PathBuf,
    },
    /// The task that opens the disk buffer failed (it panicked outside the store's own
    /// containment, or the runtime is shutting down).
    #[error("opening the buffer at {path}: {source}")]
    OpenTask {
        /// The buffer directory.
        path: std::path::PathBuf,
        /// How the task ended.
        source: tokio::task::JoinError,
    },
    /// The disk buffer cannot be opened.
    #[error(transparent)]
    Buffer(#[from] BufferError),
    /// The MQTT password cannot be read (its file or credential).
    #[error("mqtt.password_file: {0}")]
    Secret(#[from] crate::secret::SecretError),
    /// The HTTP API cannot start.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
}

/// A device's name and live status.
#[derive(Debug, Clone)]
pub struct DeviceHandle {
    /// The device name.
    pub name: Arc<str>,
    /// Its counters.
    pub status: Arc<DeviceStatus>,
}

/// The running gateway.
#[derive(Debug)]
pub struct Running {
    /// Pipeline counters.
    pub metrics: Arc<Metrics>,
    /// Devices in config order.
    pub devices: Vec<DeviceHandle>,
    /// Device and tag names.
    pub catalog: Arc<Catalog>,
    /// This start's boot number.
    pub boot: u64,
    /// The buffer, for inspection.
    pub buffer: Arc<Buffer>,
    /// The HTTP API's address and state, when `[api]` is configured.
    api: Option<(std::net::SocketAddr, Arc<ApiState>)>,
    cancel: CancellationToken,
    done: JoinHandle<()>,
}

impl Running {
    /// Stops the gateway in order and waits until everything unacknowledged is on disk.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        if let Err(e) = self.done.await {
            error!(error = %e, "shutdown task failed");
        }
    }

    /// The address the HTTP API listens on, when `[api]` is configured.
    pub fn api_addr(&self) -> Option<std::net::SocketAddr> {
        self.api.as_ref().map(|(addr, _)| *addr)
    }

    /// RELOAD HOOK: what `POST /api/reload` runs; `false` when there is no API or a hook was
    /// set already.
    pub fn set_reload_hook(&self, hook: crate::api::ReloadHook) -> bool {
        self.api
            .as_ref()
            .is_some_and(|(_, state)| state.set_reload_hook(hook))
    }

    /// A token that stops the gateway when cancelled.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

fn read_password(config: &Config) -> Result<Option<String>, StartError> {
    let Some(source) = &config.mqtt.password_file else {
        return Ok(None);
    };
    Ok(Some(source.read()?.expose().to_owned()))
}

/// Takes the data directory's lock (`flock` on `lock`, released by the kernel whenever the
/// process ends), so a second gateway started on the same directory by mistake stops at once
/// instead of sharing the state file's sequence numbers and the buffer with the first. Only a
/// lock held by another process stops the start: a disk that cannot make or lock the file (full,
/// failing) is warned about, as the gateway runs on such a disk.
fn lock_data_dir(data_dir: &std::path::Path) -> Result<Option<std::fs::File>, StartError> {
    use fs2::FileExt;
    let path = data_dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path);
    let file = match file {
        Ok(f) => f,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot create the data directory's lock file; going on without the lock");
            return Ok(None);
        }
    };
    match file.try_lock_exclusive() {
        Ok(()) => Ok(Some(file)),
        Err(e) if e.kind() == fs2::lock_contended_error().kind() => Err(StartError::DataDirInUse {
            path: data_dir.to_path_buf(),
        }),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot lock the data directory; going on without the lock");
            Ok(None)
        }
    }
}

/// Opens the buffer and starts every task of the gateway.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let data_dir = config.gateway.data_dir.clone();
    buffer::create_dir_durable(&data_dir).map_err(|source| StartError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let lock = lock_data_dir(&data_dir)?;
    // A password that cannot be read stops the start here, with a clear error, rather than in
    // a retry loop; the publisher reads it again at each connection attempt.
    read_password(&config)?;
    // The API's address and files too, before anything runs.
    let api_bound = match &config.api {
        Some(settings) => Some(crate::api::bind(settings).await?),
        None => None,
    };
    let buffer_dir = data_dir.join("buffer");
    let fresh = !buffer_dir.exists() && !data_dir.join("state").exists();
    let rotate_after = buffer::rotate_after_for(config.buffer.max_size);
    let (buffer, report) = tokio::task::spawn_blocking(move || {
        Buffer::open_with(&buffer_dir, rotate_after, buffer::ROTATE_DRAINED)
    })
    .await
    .map_err(|source| StartError::OpenTask {
        path: data_dir.join("buffer"),
        source,
    })??;
    let buffer = Arc::new(buffer);
    let floor = report.last_seq.map_or(0, |s| s + 1);
    let seqs = SeqState::open(&data_dir, floor, fresh);
    let boot = seqs.boot();
    info!(gateway = %config.gateway.id, boot, backlog = report.records, devices = config.devices.len(), "starting gateway");

    // A Modbus line with a `units` list publishes each unit as its own device, named
    // `line/unit`: a meter on an RS-485 line is a device to the plant, the line is not.
    let mut catalog = Catalog::default();
    let mut lines = Vec::new();
    let mut infos = Vec::new();
    for d in &config.devices {
        let ids: Vec<_> = match &d.kind {
            DeviceKind::Modbus(m) => m
                .units
                .iter()
                .map(|u| {
                    let fastest = u.tags.iter().map(|t| t.scan_interval).min();
                    infos.push(DeviceInfo {
                        scan_interval: Some(fastest.unwrap_or(d.scan_interval)),
                    });
                    let name: Arc<str> = match &u.name {
                        Some(unit) => format!("{}/{unit}", d.name).into(),
                        None => d.name.clone(),
                    };
                    catalog.add_device(name, u.tags.iter().map(|t| t.name.clone()).collect())
                })
                .collect(),
            DeviceKind::OpcUa(o) => {
                let polled = o.mode == opcua::Mode::Poll;
                infos.push(DeviceInfo {
                    scan_interval: polled.then_some(o.scan_interval),
                });
                vec![catalog.add_device(
                    d.name.clone(),
                    o.tags.iter().map(|t| t.name.clone()).collect(),
                )]
            }
        };
        lines.push((d.kind.clone(), ids));
    }
    let catalog = Arc::new(catalog);
    let metrics = Arc::new(Metrics::default());
    metrics.count_quarantined(&report.quarantined);
    if report.lost_commits.is_some() {
        Metrics::add(&metrics.lost_commits, 1);
    }
    let shared = Arc::new(Shared::new(buffer.clone(), metrics.clone()));

    let cancel = CancellationToken::new();
    let drivers_cancel = cancel.child_token();
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(BATCH_CHANNEL);
    let (live_tx, live_rx) = mpsc::channel(usize::from(config.mqtt.max_inflight) * 2);

    let mut devices = Vec::new();
    let mut drivers = Vec::new();
    for (kind, ids) in lines {
        let mut contexts = Vec::with_capacity(ids.len());
        for id in ids {
            let name = catalog
                .device(id)
                .map_or_else(|| "?".into(), |e| e.name.clone());
            let status = Arc::new(DeviceStatus::default());
            devices.push(DeviceHandle {
                name: name.clone(),
                status: status.clone(),
            });
            contexts.push(DriverContext {
                device: id,
                name,
                emitter: Emitter::new(batch_tx.clone()),
                cancel: drivers_cancel.clone(),
                status,
            });
        }
        drivers.push(tokio::spawn(async move {
            let name = contexts
                .first()
                .map_or_else(|| "?".into(), |c| c.name.clone());
            let result = match kind {
                DeviceKind::Modbus(m) => modbus::driver::run(m, contexts).await,
                DeviceKind::OpcUa(o) => match contexts.pop() {
                    Some(ctx) => opcua::driver::run(o, ctx).await,
                    None => Ok(()),
                },
            };
            if let Err(e) = result {
                warn!(device = %name, error = %e, "driver stopped");
            }
        }));
    }
    // Only the drivers hold senders now: the writer ends when the last driver does.
    drop(batch_tx);

    let mqtt = &config.mqtt;
    let topic = |device: &str| mqtt.topic.render(mqtt, &config.gateway.id, device);
    let encoder = JsonEncoder::new(&config.gateway.id, boot, topic, &catalog);
    let writer = tokio::spawn(run_writer(
        batch_rx,
        encoder,
        seqs,
        shared.clone(),
        live_tx,
        config.mqtt.max_packet_size,
    ));
    let committer_stop = CancellationToken::new();
    let committer = tokio::spawn(run_committer(
        shared.clone(),
        config.buffer.clone(),
        committer_stop.clone(),
    ));
    let publisher = tokio::spawn(Publisher::run(
        config.mqtt.clone(),
        config.buffer.commit_interval,
        config.buffer.replay_rate,
        (config.gateway.id.clone(), boot),
        shared.clone(),
        live_rx,
    ));

    let api = match api_bound {
        Some(bound) => {
            let state = Arc::new(ApiState::new(
                (config.gateway.id.clone(), boot),
                metrics.clone(),
                devices.clone(),
                infos,
                catalog.clone(),
                shared.latest.clone(),
            ));
            Some((
                crate::api::serve(bound, state.clone(), cancel.child_token()),
                state,
            ))
        }
        _ => None,
    };
    let api_addr = api.as_ref().map(|(server, state)| {
        state.set_ready(true);
        (server.addr, state.clone())
    });

    let stop = cancel.clone();
    let done = tokio::spawn(async move {
        // Held until everything is on disk.
        let _lock = lock;
        stop.cancelled().await;
        if let Some((server, state)) = api {
            state.set_ready(false);
            server.stopped().await;
        }
        info!("shutting down: stopping drivers");
        for d in drivers {
            let _ = d.await;
        }
        let _ = writer.await;
        let _ = publisher.await;
        committer_stop.cancel();
        let _ = committer.await;
        info!("shutdown complete");
    });

    Ok(Running {
        metrics,
        devices,
        catalog,
        boot,
        buffer,
        api: api_addr,
        cancel,
        done,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_gateway_on_the_same_data_directory_is_refused_until_the_first_ends() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_data_dir(dir.path()).unwrap();
        assert!(first.is_some());
        let second = lock_data_dir(dir.path());
        assert!(
            matches!(second, Err(StartError::DataDirInUse { .. })),
            "{second:?}"
        );
        drop(first);
        assert!(lock_data_dir(dir.path()).unwrap().is_some());
    }
}
