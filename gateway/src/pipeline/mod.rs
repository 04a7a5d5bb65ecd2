//! Builds the running gateway from a validated config: drivers, writer, committer, publisher.
//!
//! Shutdown is ordered so nothing is lost: cancel the drivers → the writer drains their channel
//! and closes the publisher's → the publisher waits `shutdown_grace` for outstanding PUBACKs and
//! disconnects → the committer commits everything still unacknowledged and syncs. Each stage ends
//! when the one before it has dropped its sending half, so no record is in flight between them.
//!
//! A reload ([`Running::reload`]) stops and starts only the driver tasks whose device changed
//! ([`reload::Plan`]), hands the writer a new encoder that knows the new devices (catalog ids
//! are never reused), and for an `[mqtt]` change replaces the publisher: the old one drains like
//! at shutdown and disconnects, then the new one connects. The buffer, the ledger, the seq
//! state and the boot are never touched, so everything unacknowledged is committed and
//! replayed as after any lost connection.

mod apply;
pub mod committer;
pub mod ledger;
pub mod reload;
pub mod seq;
pub mod writer;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use protocols::driver::{DeviceStatus, DriverContext, Emitter};
use protocols::model::{Batch, Catalog, DeviceId, TagInfo};
use protocols::{modbus, opcua};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::{ApiServer, ApiState, DeviceInfo};
use crate::buffer::{self, Buffer, BufferError};
use crate::config::{Config, ConfigErrors, DeviceKind, DeviceSettings, Format};
use crate::encode::json::JsonEncoder;
use crate::encode::meta::MetaMessage;
use crate::encode::sparkplug::{SparkplugEncoder, Topics};
use crate::encode::Encoder;
use crate::metrics::Metrics;
use crate::publish::sparkplug::Node;
use crate::publish::Publisher;
use committer::run_committer;
use ledger::Ledger;
use reload::Plan;
use seq::SeqState;
use writer::{run_writer, WriterUpdate};

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
    /// The latest sample of every tag, for the HTTP API; the writer folds each batch in while
    /// `latest_wanted` (an API is configured), and spends nothing on it otherwise.
    pub latest: Arc<crate::api::Latest>,
    /// Whether anyone reads `latest`.
    pub latest_wanted: AtomicBool,
    /// The meta documents of the current devices (JSON mode; none otherwise): the publisher
    /// sends them after each CONNACK and whenever a reload changes them.
    pub meta: tokio::sync::watch::Sender<Arc<Vec<MetaMessage>>>,
    /// The publisher's ends of the command channels, when commands are on: each publisher
    /// takes them at its start and gives them back at its end (a reload's new publisher).
    commands: Mutex<Option<crate::commands::task::CommandLink>>,
    /// Whether commands are taken now: false from the start when `[commands]` is off, and
    /// from the moment a reload turns them off (the commands task then refuses every one).
    pub commands_enabled: AtomicBool,
}

impl Shared {
    /// Hands the command channels to the publisher that starts.
    pub fn take_commands(&self) -> Option<crate::commands::task::CommandLink> {
        self.commands.lock().ok().and_then(|mut c| c.take())
    }

    /// Takes back the command channels from a publisher that ends.
    pub fn give_back_commands(&self, link: Option<crate::commands::task::CommandLink>) {
        if let Ok(mut c) = self.commands.lock() {
            *c = link;
        }
    }

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
            latest_wanted: AtomicBool::new(false),
            meta: tokio::sync::watch::channel(Arc::default()).0,
            commands: Mutex::new(None),
            commands_enabled: AtomicBool::new(false),
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

/// A refused file's findings and data directory problem, one line each.
fn files_problems(
    findings: &[crate::publish::tls::Finding],
    data_dir: Option<&crate::preflight::DataDirError>,
) -> String {
    let mut lines: Vec<String> = findings.iter().map(ToString::to_string).collect();
    if let Some(e) = data_dir {
        lines.push(format!("gateway.data_dir: {e}"));
    }
    lines.join("\n")
}

/// Why a reload was refused; the running config stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new file fails `check` (or cannot be read).
    #[error("the new configuration is refused, the running one stays:\n{0}")]
    Config(#[from] ConfigErrors),
    /// The new file passes the config's checks but not what `check` finds beyond them (a TLS
    /// file that does not load, a key that is not its certificate's, a new data directory
    /// that cannot be written).
    #[error("the new configuration is refused, the running one stays:\n{}", files_problems(.findings, .data_dir.as_ref()))]
    Files {
        /// What `check` finds wrong with the TLS files, each naming its field.
        findings: Vec<crate::publish::tls::Finding>,
        /// Why a new `data_dir` cannot be used.
        data_dir: Option<crate::preflight::DataDirError>,
    },
    /// The new `[mqtt]` password cannot be read.
    #[error("the new configuration is refused, the running one stays: mqtt.password_file: {0}")]
    Secret(#[from] crate::secret::SecretError),
}

/// One `[[devices]]` entry's driver task (a Modbus line with units runs them all in one task).
#[derive(Debug)]
struct DriverTask {
    /// Its `[[devices]]` entry's name; the entry itself is the running config's (kept once:
    /// a second copy of every tag's settings cost 1.7 MB with 10k tags).
    name: Arc<str>,
    /// The catalog ids of its devices (a Modbus line's units), one per handle.
    ids: Vec<DeviceId>,
    handles: Vec<DeviceHandle>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// The running gateway.
#[derive(Debug)]
pub struct Running {
    /// Pipeline counters.
    pub metrics: Arc<Metrics>,
    /// Devices in config order.
    pub devices: Vec<DeviceHandle>,
    /// Device and tag names: every id handed out since start (a reload only adds entries).
    pub catalog: Arc<Catalog>,
    /// This start's boot number.
    pub boot: u64,
    /// The buffer, for inspection.
    pub buffer: Arc<Buffer>,
    config: Config,
    drivers: Vec<DriverTask>,
    drivers_cancel: CancellationToken,
    /// Kept for drivers started by a reload; dropped at shutdown so the writer can end.
    batch_tx: mpsc::Sender<Batch>,
    /// The writer-to-publisher channel, only to see how many records wait in it (weak: the
    /// publisher still ends when the writer drops its sender).
    live: mpsc::WeakSender<crate::publish::Live>,
    updates: mpsc::Sender<WriterUpdate>,
    shared: Arc<Shared>,
    writer: JoinHandle<()>,
    publisher: Option<JoinHandle<()>>,
    committer: JoinHandle<()>,
    committer_stop: CancellationToken,
    /// The data directory's lock, held until everything is on disk.
    lock: Option<std::fs::File>,
    /// The HTTP API, when `[api]` is configured: its server and what it reads.
    api: Option<(ApiServer, Arc<ApiState>, CancellationToken)>,
    /// The commands task, when `[commands]` was on at the start: a reload rewires it.
    commands: Option<crate::commands::task::CommandsHandle>,
}

/// The `[[devices]]` entry of `config` that a driver runs.
fn settings_of<'a>(config: &'a Config, driver: &DriverTask) -> Option<&'a DeviceSettings> {
    config.devices.iter().find(|s| s.name == driver.name)
}

/// What the HTTP API shows of the running drivers (started from `config`): their devices'
/// handles, scan intervals and catalog ids, in config order.
fn api_view(
    config: &Config,
    drivers: &[DriverTask],
) -> (Vec<DeviceHandle>, Vec<DeviceInfo>, Vec<DeviceId>) {
    let mut handles = Vec::new();
    let mut infos = Vec::new();
    let mut ids = Vec::new();
    for d in drivers {
        let Some(settings) = settings_of(config, d) else {
            continue;
        };
        let intervals: Vec<Option<std::time::Duration>> = match &settings.kind {
            DeviceKind::Modbus(m) => m
                .units
                .iter()
                .map(|u| {
                    let fastest = u.tags.iter().map(|t| t.scan_interval).min();
                    Some(fastest.unwrap_or(settings.scan_interval))
                })
                .collect(),
            DeviceKind::OpcUa(o) => {
                vec![(o.mode == opcua::Mode::Poll).then_some(o.scan_interval)]
            }
        };
        for ((h, id), scan_interval) in d.handles.iter().zip(&d.ids).zip(intervals) {
            handles.push(h.clone());
            infos.push(DeviceInfo { scan_interval });
            ids.push(*id);
        }
    }
    (handles, infos, ids)
}

impl Running {
    /// Stops the gateway in order and waits until everything unacknowledged is on disk.
    pub async fn shutdown(self) {
        if let Some((server, state, cancel)) = self.api {
            state.set_ready(false);
            cancel.cancel();
            server.stopped().await;
        }
        info!("shutting down: stopping drivers");
        self.drivers_cancel.cancel();
        for d in self.drivers {
            let _ = d.task.await;
        }
        // Only the writer's own receivers are left: it drains the channel and ends.
        drop(self.batch_tx);
        drop(self.updates);
        let _ = self.writer.await;
        if let Some(p) = self.publisher {
            let _ = p.await;
        }
        self.committer_stop.cancel();
        let _ = self.committer.await;
        drop(self.lock);
        info!("shutdown complete");
    }

    /// What the stages have done so far, for the watchdog's progress check (`service.rs`).
    pub fn progress(&self) -> crate::service::Snapshot {
        let m = &self.metrics;
        let waiting = |max: usize, free: usize| max.saturating_sub(free);
        crate::service::Snapshot {
            batches_waiting: waiting(self.batch_tx.max_capacity(), self.batch_tx.capacity()),
            written: Metrics::get(&m.records) + Metrics::get(&m.oversized),
            writer_holding: m.writer_holding.load(Ordering::Relaxed),
            live_waiting: self
                .live
                .upgrade()
                .map_or(0, |tx| waiting(tx.max_capacity(), tx.capacity())),
            live_taken: Metrics::get(&m.live_taken),
        }
    }

    /// What the service manager shows (`STATUS=`): devices connected, the broker, the buffer.
    pub fn status(&self) -> crate::service::Status {
        let handles = self.drivers.iter().flat_map(|d| &d.handles);
        crate::service::Status {
            devices_connected: handles.clone().filter(|h| h.status.is_connected()).count(),
            devices: handles.count(),
            mqtt_connected: self.metrics.mqtt_connected.load(Ordering::Relaxed),
            buffered_on_disk: Metrics::get(&self.metrics.buffer_records),
            in_memory: self.shared.ledger().pending_len(),
        }
    }

    /// The address the HTTP API listens on, when `[api]` is configured.
    pub fn api_addr(&self) -> Option<std::net::SocketAddr> {
        self.api.as_ref().map(|(server, _, _)| server.addr)
    }

    /// RELOAD HOOK: what `POST /api/reload` runs; `false` when there is no API or a hook was
    /// set already.
    pub fn set_reload_hook(&self, hook: crate::api::ReloadHook) -> bool {
        self.api
            .as_ref()
            .is_some_and(|(_, state, _)| state.set_reload_hook(hook))
    }

    /// The config the gateway runs (after a reload: the new one, with the gateway id, data
    /// directory and buffer settings it started with).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Reads the config file at `path` again and applies it with [`Running::reload`]; a file
    /// that fails `check` is refused (logged, counted in `reloads_refused`) and the running
    /// config stays. This is what SIGHUP and `POST /api/reload` call.
    ///
    /// "Fails `check`" is the config's own checks and what `check` finds beyond them
    /// (`preflight::inspect`: the `[mqtt]` TLS files, the `[api]` certificate and key); its
    /// warnings are logged. The data directory is probed (a file written and removed) only
    /// when the file names another one than the running gateway's: that one is in use, locked
    /// and written by this process, and a probe failing there (a full disk) must not refuse
    /// a device change, as a failing disk never stops the gateway; a new directory waits for
    /// the next start, which it would stop.
    pub async fn reload_file(&mut self, path: &std::path::Path) -> Result<Plan, ReloadError> {
        info!(file = %path.display(), "reloading the configuration");
        let checked = crate::config::load(path)
            .map_err(ReloadError::from)
            .and_then(|config| {
                self.preflight(path, &config)?;
                Ok(config)
            });
        match checked {
            Ok(config) => self.reload(config).await,
            Err(e) => {
                Metrics::add(&self.metrics.reloads_refused, 1);
                error!(file = %path.display(), "the new configuration fails check; keeping the running one:\n{e}");
                Err(e)
            }
        }
    }

    /// What `check` finds in `new` beyond its file's checks: warnings logged, problems
    /// returned (see [`Running::reload_file`] for the data directory).
    fn preflight(&self, path: &std::path::Path, new: &Config) -> Result<(), ReloadError> {
        let mut findings = Vec::new();
        for finding in crate::preflight::inspect(new) {
            match finding.severity {
                crate::publish::tls::Severity::Problem => findings.push(finding),
                crate::publish::tls::Severity::Warning => {
                    warn!(file = %path.display(), "{finding}");
                }
            }
        }
        let mut data_dir = None;
        if new.gateway.data_dir != self.config.gateway.data_dir {
            data_dir = crate::preflight::probe_data_dir(&new.gateway.data_dir).err();
        }
        if findings.is_empty() && data_dir.is_none() {
            Ok(())
        } else {
            Err(ReloadError::Files { findings, data_dir })
        }
    }
}

/// Adds a `[[devices]]` entry to the catalog, with what each tag is (type, source, scan
/// interval, unit, description, range): a Modbus line with a `units` list publishes each unit
/// as its own device, named `line/unit` (a meter on an RS-485 line is a device to the plant,
/// the line is not).
pub(crate) fn add_to_catalog(catalog: &mut Catalog, d: &DeviceSettings) -> Vec<DeviceId> {
    match &d.kind {
        DeviceKind::Modbus(m) => m
            .units
            .iter()
            .map(|u| {
                let name: Arc<str> = match &u.name {
                    Some(unit) => format!("{}/{unit}", d.name).into(),
                    None => d.name.clone(),
                };
                let info = u
                    .tags
                    .iter()
                    .map(|t| TagInfo {
                        name: t.name.clone(),
                        data_type: Some(t.data_type.name()),
                        source: protocols::model::Source::Modbus(t.address),
                        scan_interval: t.scan_interval,
                        meta: t.meta.clone(),
                    })
                    .collect();
                catalog.add_described(name, info)
            })
            .collect(),
        DeviceKind::OpcUa(o) => {
            let info = o
                .tags
                .iter()
                .map(|t| TagInfo {
                    name: t.name.clone(),
                    data_type: None,
                    source: protocols::model::Source::Text(t.node.to_string().into()),
                    scan_interval: match o.mode {
                        opcua::Mode::Poll => o.scan_interval,
                        opcua::Mode::Subscribe => t.sampling_interval,
                    },
                    meta: t.meta.clone(),
                })
                .collect();
            vec![catalog.add_described(d.name.clone(), info)]
        }
    }
}

/// Starts the driver task of one `[[devices]]` entry, stopped by its own token (a child of
/// `parent`, which stops every driver at shutdown).
fn spawn_driver(
    settings: DeviceSettings,
    ids: Vec<DeviceId>,
    catalog: &Catalog,
    batch_tx: &mpsc::Sender<Batch>,
    parent: &CancellationToken,
    writes: Option<protocols::driver::WriteInbox>,
) -> DriverTask {
    let cancel = parent.child_token();
    let mut handles = Vec::with_capacity(ids.len());
    let mut contexts = Vec::with_capacity(ids.len());
    for &id in &ids {
        let name = catalog
            .device(id)
            .map_or_else(|| "?".into(), |e| e.name.clone());
        let status = Arc::new(DeviceStatus::default());
        handles.push(DeviceHandle {
            name: name.clone(),
            status: status.clone(),
        });
        contexts.push(DriverContext {
            device: id,
            name,
            emitter: Emitter::new(batch_tx.clone()),
            cancel: cancel.clone(),
            status,
            writes: writes.clone(),
        });
    }
    let name = settings.name;
    let kind = settings.kind;
    let task = tokio::spawn(async move {
        let name = contexts
            .first()
            .map_or_else(|| "?".into(), |c| c.name.clone());
        // Each driver's future is boxed: inline, the task of every device would be as large
        // as the larger of the two (an OPC UA session's future, about 15 KB more than a
        // Modbus line's: 1.5 MB for 100 Modbus devices).
        let result = match kind {
            DeviceKind::Modbus(m) => Box::pin(modbus::driver::run(m, contexts)).await,
            DeviceKind::OpcUa(o) => match contexts.pop() {
                Some(ctx) => Box::pin(opcua::driver::run(o, ctx)).await,
                None => Ok(()),
            },
        };
        if let Err(e) = result {
            warn!(device = %name, error = %e, "driver stopped");
        }
    });
    DriverTask {
        name,
        ids,
        handles,
        cancel,
        task,
    }
}

/// The encoder of `config`'s format and topics over every device of `catalog`.
fn encoder_for(config: &Config, boot: u64, catalog: &Catalog) -> Encoder {
    let mqtt = &config.mqtt;
    if let Some(sp) = &mqtt.sparkplug {
        let topics = Topics::new(&sp.group_id, &sp.edge_node_id);
        return Encoder::Sparkplug(SparkplugEncoder::new(&topics, boot, catalog));
    }
    let topic = |device: &str| mqtt.topic.render(mqtt, &config.gateway.id, device);
    Encoder::Json(JsonEncoder::new(&config.gateway.id, boot, topic, catalog))
}

/// The Sparkplug edge node of `config` (none in JSON mode) over the devices of `catalog`,
/// `lines` naming the catalog ids of each `[[devices]]` entry.
fn node_for<'a>(
    config: &Config,
    catalog: &Catalog,
    lines: impl Iterator<Item = (&'a DeviceSettings, &'a [DeviceId])>,
    latest: Arc<crate::api::Latest>,
    boot: u64,
) -> Option<Node> {
    let sp = config.mqtt.sparkplug.as_ref()?;
    let mut declared: std::collections::HashMap<DeviceId, Vec<_>> = Default::default();
    for (settings, ids) in lines {
        for (id, types) in ids
            .iter()
            .zip(crate::publish::sparkplug::declared(&settings.kind))
        {
            declared.insert(*id, types);
        }
    }
    let devices = catalog
        .devices()
        .map(|(id, d)| {
            let types = declared.remove(&id).unwrap_or_default();
            let meta = d.info.iter().map(|t| t.meta.clone()).collect();
            (d.name.clone(), d.tags.clone(), types, meta)
        })
        .collect();
    Some(Node::new(
        sp,
        devices,
        latest,
        &config.gateway.data_dir,
        boot,
    ))
}

/// The meta documents of the running drivers' devices, in config order (JSON mode only).
fn meta_for(config: &Config, catalog: &Catalog, drivers: &[DriverTask]) -> Arc<Vec<MetaMessage>> {
    if config.mqtt.format != Format::Json {
        return Arc::default();
    }
    let ids: Vec<DeviceId> = drivers.iter().flat_map(|d| d.ids.iter().copied()).collect();
    Arc::new(crate::encode::meta::messages(
        &config.gateway.id,
        catalog,
        &ids,
    ))
}

/// Reads the password once, so that one that cannot be read stops the start (or a reload).
fn read_password(config: &Config) -> Result<(), crate::secret::SecretError> {
    if let Some(source) = &config.mqtt.password_file {
        source.read()?;
    }
    Ok(())
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

    let mut catalog = Catalog::default();
    let lines: Vec<_> = config
        .devices
        .iter()
        .map(|d| (d.clone(), add_to_catalog(&mut catalog, d)))
        .collect();
    let catalog = Arc::new(catalog);
    let metrics = Arc::new(Metrics::default());
    metrics.count_quarantined(&report.quarantined);
    if report.lost_commits.is_some() {
        Metrics::add(&metrics.lost_commits, 1);
    }
    let shared = Arc::new(Shared::new(buffer.clone(), metrics.clone()));
    // Sparkplug births carry every tag's latest value.
    let sparkplug = config.mqtt.sparkplug.is_some();
    shared
        .latest_wanted
        .store(api_bound.is_some() || sparkplug, Ordering::Relaxed);
    let node = node_for(
        &config,
        &catalog,
        lines.iter().map(|(s, ids)| (s, &ids[..])),
        shared.latest.clone(),
        boot,
    );

    let drivers_cancel = CancellationToken::new();
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(BATCH_CHANNEL);
    let mut commands = crate::commands::task::Wiring::new(&config, &lines);
    let (live_tx, live_rx) = mpsc::channel(usize::from(config.mqtt.max_inflight) * 2);
    let (updates, updates_rx) = mpsc::channel(1);

    let drivers: Vec<DriverTask> = lines
        .into_iter()
        .map(|(settings, ids)| {
            let inbox = commands.inbox(&settings, &ids);
            spawn_driver(settings, ids, &catalog, &batch_tx, &drivers_cancel, inbox)
        })
        .collect();
    let commands = commands.start(&config, shared.clone());
    let devices = drivers
        .iter()
        .flat_map(|d| d.handles.iter().cloned())
        .collect();

    shared
        .meta
        .send_replace(meta_for(&config, &catalog, &drivers));
    let encoder = encoder_for(&config, boot, &catalog);
    let live = live_tx.downgrade();
    let writer = tokio::spawn(run_writer(
        batch_rx,
        updates_rx,
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
        node,
    ));

    let api = api_bound.map(|bound| {
        let (handles, infos, ids) = api_view(&config, &drivers);
        let state = Arc::new(ApiState::new(
            (config.gateway.id.clone(), boot),
            metrics.clone(),
            handles,
            infos,
            ids,
            catalog.clone(),
            shared.latest.clone(),
        ));
        let cancel = CancellationToken::new();
        let server = crate::api::serve(bound, state.clone(), cancel.clone());
        state.set_ready(true);
        (server, state, cancel)
    });

    Ok(Running {
        metrics,
        devices,
        catalog,
        boot,
        buffer,
        config,
        drivers,
        drivers_cancel,
        batch_tx,
        live,
        updates,
        shared,
        writer,
        publisher: Some(publisher),
        committer,
        committer_stop,
        lock,
        api,
        commands,
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

    #[test]
    fn the_catalog_knows_each_tags_type_source_interval_and_description_for_both_protocols() {
        let src = r#"
[gateway]
id = "edge-01"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "press7"
protocol = "modbus_tcp"
address = "127.0.0.1:5020"
scan_interval = "2s"

  [[devices.tags]]
  name = "oil"
  address = "hr:4"
  type = "i16"
  unit = "degC"
  min = -20
  max = 120

[[devices]]
name = "oven"
protocol = "opcua"
endpoint = "opc.tcp://127.0.0.1:4840"

  [[devices.tags]]
  name = "temp"
  node_id = "ns=2;s=Oven.Temp"
  sampling_interval = "500ms"
  description = "Chamber"
"#;
        let config = crate::config::parse(src, "t.toml").unwrap();
        let mut catalog = Catalog::default();
        let press = add_to_catalog(&mut catalog, &config.devices[0])[0];
        let oven = add_to_catalog(&mut catalog, &config.devices[1])[0];
        let oil = catalog.tag_info(press, protocols::model::TagId(0)).unwrap();
        assert_eq!(
            (oil.data_type, &*oil.source.to_string()),
            (Some("i16"), "hr:4")
        );
        assert_eq!(oil.scan_interval, std::time::Duration::from_secs(2));
        assert_eq!(oil.meta.unit.as_deref(), Some("degC"));
        assert_eq!((oil.meta.min, oil.meta.max), (Some(-20.0), Some(120.0)));
        let temp = catalog.tag_info(oven, protocols::model::TagId(0)).unwrap();
        assert_eq!(
            (temp.data_type, &*temp.source.to_string()),
            (None, "ns=2;s=Oven.Temp")
        );
        assert_eq!(temp.scan_interval, std::time::Duration::from_millis(500));
        assert_eq!(temp.meta.description.as_deref(), Some("Chamber"));
    }
}
