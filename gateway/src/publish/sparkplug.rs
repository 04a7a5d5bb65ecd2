//! The publisher's side of a Sparkplug B edge node: the subscriptions, births and deaths a
//! [`Session`] asks for, the will's `bdSeq` (persisted in the data directory, stepped on
//! every connection attempt), and the commands that come in (a rebirth, the primary host's
//! STATE). Records themselves go out as in JSON mode; only their `seq` is appended here.
//!
//! Births and deaths go into the node's queue and out to the MQTT client while few of the
//! gateway's own messages wait unwritten ([`SESSION_UNWRITTEN`]): the client's request channel
//! holds the window and a few more, and only the publisher's own loop drains it, so a burst of
//! births (one per device) handed over at once, with the backlog behind it, would fill the
//! channel and stop that loop for good. No record goes out while births or deaths wait in the
//! queue: a DDATA always follows its device's DBIRTH on the wire, as its `seq` does.
//!
//! A DDATA goes out only for a device born in this session, with one exception: a record in
//! the backlog of a device the node does not know (removed by a reload, or configured in an
//! earlier boot) goes out as it was recorded, since nothing could birth it. A device that is offline now (it
//! stopped answering during an outage) still has records in the backlog: before the first of
//! them a DBIRTH is published for it, and once the backlog is through, its DDEATH again, so a
//! host sees its history between a birth and a death like any other device's data.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use protocols::model::{DeviceId, TagMeta, Timestamp};
use tracing::{debug, info, warn};

use super::link::Outbound;
use super::window::NO_TOKEN;
use super::Publisher;
use crate::api::Latest;
use crate::commands::task::{DeviceWrite, Incoming};
use crate::config::SparkplugSettings;
use crate::encode::sparkplug::command::{self, MetricRef};
use crate::encode::sparkplug::session::{Session, Stale, Step};
use crate::encode::sparkplug::{self as sp, Declared, Topics};
use crate::metrics::Metrics;

/// Births and deaths handed to the MQTT client and not yet written, at most (with the other own
/// messages: see `link::open` for the channel they share with the window).
pub(super) const SESSION_UNWRITTEN: usize = 8;

/// The token of the NDEATH published at a clean shutdown (meta clears count up from 1).
pub(super) const FAREWELL_TOKEN: u64 = u64::MAX;

/// The file of the last `bdSeq` used, in the data directory.
const BD_SEQ_FILE: &str = "sparkplug_bdseq";

/// `bdSeq`: 0..=255, one more on every connection attempt, kept across restarts.
#[derive(Debug)]
pub(crate) struct BdSeq {
    path: PathBuf,
    last: Option<u64>,
    failing: bool,
}

impl BdSeq {
    /// The counter kept in `data_dir`; a missing or unreadable file starts at 0.
    pub(crate) fn open(data_dir: &Path) -> Self {
        let path = data_dir.join(BD_SEQ_FILE);
        let last = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .map(|n| n % 256);
        BdSeq {
            path,
            last,
            failing: false,
        }
    }

    /// The `bdSeq` of the next attempt, written to disk (temporary file, fsync, rename) first.
    /// A disk that fails is logged once; the count goes on in memory.
    pub(crate) fn step(&mut self) -> u64 {
        let next = self.last.map_or(0, |n| (n + 1) % 256);
        self.last = Some(next);
        match write_atomically(&self.path, next) {
            Ok(()) => self.failing = false,
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true) {
                    warn!(file = %self.path.display(), error = %e, "cannot persist the Sparkplug bdSeq; counting on in memory");
                }
            }
        }
        next
    }
}

fn write_atomically(path: &Path, n: u64) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{n}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The will of a Sparkplug connection: NDEATH with the attempt's `bdSeq`.
#[derive(Debug)]
pub(crate) struct NodeWill {
    pub(crate) topic: String,
    pub(crate) bd_seq: BdSeq,
    /// The `bdSeq` of the last attempt prepared.
    pub(crate) current: u64,
}

impl NodeWill {
    /// Steps `bdSeq` for a new attempt: the will's topic and payload.
    pub(crate) fn next(&mut self) -> (String, Bytes) {
        self.current = self.bd_seq.step();
        let payload = sp::ndeath(self.current, Timestamp::now().unix_ms());
        (self.topic.clone(), Bytes::from(payload))
    }
}

/// One device of the node.
#[derive(Debug)]
pub struct NodeDevice {
    /// Its tag names, by tag id.
    pub tags: Vec<Arc<str>>,
    /// The datatype a tag's values will have, when the config says (for a birth before any
    /// value was read).
    pub declared: Vec<Declared>,
    /// Each tag's unit, range and description (for the births).
    pub meta: Vec<Arc<TagMeta>>,
    /// Its gateway name (commands name devices so).
    name: Arc<str>,
    dbirth: String,
    ddeath: String,
}

/// A device as the node declares it: its gateway name, its tag names, their datatypes and
/// their unit, range and description.
pub type DeviceDecl = (Arc<str>, Vec<Arc<str>>, Vec<Declared>, Vec<Arc<TagMeta>>);

/// The edge node: its identity, devices and session.
#[derive(Debug)]
pub struct Node {
    topics: Topics,
    primary_host: Option<String>,
    pub(crate) session: Session,
    devices: Vec<NodeDevice>,
    /// Each device's DDATA topic (a record's topic), to its index.
    by_ddata: HashMap<String, usize>,
    /// Each device's DCMD topic, to its index.
    by_dcmd: HashMap<String, usize>,
    /// Whether each device answered at its last scan (the writer's verdicts, in order).
    online: Vec<bool>,
    /// Offline devices born in this session only for their records in the backlog: each gets
    /// its DDEATH once the backlog is through.
    born_for_history: Vec<usize>,
    /// Births and deaths of this session waiting for the client, in `seq` order.
    out: VecDeque<(String, Bytes)>,
    latest: Arc<Latest>,
    boot: u64,
    will: Option<NodeWill>,
}

impl Node {
    /// The node for `settings` over the devices of the catalog (by id: name, tags and the
    /// datatypes the config declares), reading births' values from `latest`.
    pub fn new(
        settings: &SparkplugSettings,
        devices: Vec<DeviceDecl>,
        latest: Arc<Latest>,
        data_dir: &Path,
        boot: u64,
    ) -> Self {
        let topics = Topics::new(&settings.group_id, &settings.edge_node_id);
        let by_topic = |kind: &str| {
            devices
                .iter()
                .enumerate()
                .map(|(d, (name, ..))| (topics.device(kind, name), d))
                .collect::<HashMap<_, _>>()
        };
        let (by_ddata, by_dcmd) = (by_topic("DDATA"), by_topic("DCMD"));
        let devices = devices
            .into_iter()
            .map(|(name, tags, declared, meta)| NodeDevice {
                dbirth: topics.device("DBIRTH", &name),
                ddeath: topics.device("DDEATH", &name),
                name,
                tags,
                declared,
                meta,
            })
            .collect();
        let will = NodeWill {
            topic: topics.ndeath(),
            bd_seq: BdSeq::open(data_dir),
            current: 0,
        };
        Node {
            session: Session::new(settings.primary_host_id.is_some()),
            primary_host: settings.primary_host_id.clone(),
            topics,
            devices,
            by_ddata,
            by_dcmd,
            online: Vec::new(),
            born_for_history: Vec::new(),
            out: VecDeque::new(),
            latest,
            boot,
            will: Some(will),
        }
    }

    /// The will, for the connector (taken once).
    pub(crate) fn take_will(&mut self) -> Option<NodeWill> {
        self.will.take()
    }

    /// What the node subscribes to before its NBIRTH.
    fn subscriptions(&self) -> Vec<String> {
        let mut s = vec![self.topics.ncmd(), self.topics.dcmd_filter()];
        if let Some(host) = &self.primary_host {
            s.push(Topics::state(host));
        }
        s
    }

    /// The connection is gone: so is the session, and what it had still to say.
    pub(crate) fn lost(&mut self) {
        self.session.lost();
        self.out.clear();
    }

    fn set_online(&mut self, device: usize, online: bool) {
        if self.online.len() <= device {
            self.online.resize(device + 1, false);
        }
        self.online[device] = online;
        // Alive, or dead by its own DDEATH: no longer born only for its history.
        self.born_for_history.retain(|&d| d != device);
    }

    /// The DBIRTH of `device` (its latest values), with the session's next `seq`, if it may
    /// be born now.
    fn dbirth_message(&mut self, d: usize, now: u64) -> Option<(String, Bytes)> {
        let dev = self.devices.get(d)?;
        let seq = self.session.dbirth(d)?;
        let rows = self.latest.snapshot();
        let row = rows.get(d).map_or(&[][..], |r| &r[..]);
        let payload = sp::dbirth(d as u32, &dev.tags, &dev.declared, &dev.meta, row, now);
        Some((dev.dbirth.clone(), sp::with_seq(&payload, seq)))
    }

    /// The DDEATH of `device`, with the session's next `seq`, if it was born.
    fn ddeath_message(&mut self, d: usize, now: u64) -> Option<(String, Bytes)> {
        let dev = self.devices.get(d)?;
        let seq = self.session.ddeath(d)?;
        Some((dev.ddeath.clone(), sp::with_seq(&sp::ddeath(now), seq)))
    }
}

impl Publisher {
    /// After a CONNACK: the subscriptions, then the births unless a primary host is awaited.
    pub(super) async fn sparkplug_connected(&mut self) {
        let bd_seq = self
            .connector
            .lock()
            .map_or(0, |c| c.sparkplug.as_ref().map_or(0, |w| w.current));
        let Some(node) = &mut self.node else { return };
        for filter in node.subscriptions() {
            if let Err(e) = self.client.subscribe(&filter).await {
                debug!(error = %e, filter, "subscribe not accepted by the MQTT client");
            }
        }
        let step = node.session.connected(bd_seq);
        self.sparkplug_step(step).await;
    }

    async fn sparkplug_step(&mut self, step: Option<Step>) {
        match step {
            Some(Step::Births) => self.births().await,
            Some(Step::Disconnect) => {
                info!("the primary host is offline: dropping the connection (the broker publishes NDEATH); data waits in the buffer");
                self.on_disconnect("primary host offline");
                self.kick.notify_one();
            }
            None => {}
        }
    }

    /// NBIRTH, then a DBIRTH for every device that answers, with its latest values.
    async fn births(&mut self) {
        let Some(node) = &mut self.node else { return };
        let now = Timestamp::now().unix_ms();
        let seq = node.session.nbirth();
        let nbirth = sp::nbirth(node.session.bd_seq(), node.boot, now);
        let mut out = vec![(node.topics.nbirth(), sp::with_seq(&nbirth, seq))];
        node.born_for_history.clear();
        for d in 0..node.devices.len() {
            if !node.online.get(d).copied().unwrap_or(false) {
                continue;
            }
            out.extend(node.dbirth_message(d, now));
        }
        info!(
            bd_seq = node.session.bd_seq(),
            devices = out.len() - 1,
            "Sparkplug births published"
        );
        for (topic, payload) in out {
            self.publish_session(topic, payload).await;
        }
    }

    /// A device's liveness changed (in order with its records): DBIRTH or DDEATH while the
    /// node is up.
    pub(super) async fn device_changed(&mut self, device: DeviceId, online: bool) {
        let Some(node) = &mut self.node else { return };
        let d = device.0 as usize;
        node.set_online(d, online);
        let now = Timestamp::now().unix_ms();
        let message = if online {
            node.dbirth_message(d, now)
        } else {
            node.ddeath_message(d, now)
        };
        if let Some((topic, payload)) = message {
            self.publish_session(topic, payload).await;
        }
    }

    /// Before a record goes out on `topic`: the DBIRTH of its device when it is not born in
    /// this session (an offline device's record from the backlog).
    pub(super) async fn birth_for_record(&mut self, topic: &str) {
        let Some(node) = &mut self.node else { return };
        let Some(&d) = node.by_ddata.get(topic) else {
            return;
        };
        if node.session.is_born(d) {
            return;
        }
        let Some(message) = node.dbirth_message(d, Timestamp::now().unix_ms()) else {
            return;
        };
        if !node.online.get(d).copied().unwrap_or(false) {
            node.born_for_history.push(d);
        }
        debug!(
            device = d,
            "DBIRTH for an offline device's records from the backlog"
        );
        self.publish_session(message.0, message.1).await;
    }

    /// The backlog is through: the DDEATH of every offline device born only for it.
    pub(super) async fn deaths_after_history(&mut self) {
        let Some(node) = &mut self.node else { return };
        if node.born_for_history.is_empty() {
            return;
        }
        let now = Timestamp::now().unix_ms();
        let mut out = Vec::new();
        for d in std::mem::take(&mut node.born_for_history) {
            out.extend(node.ddeath_message(d, now));
        }
        for (topic, payload) in out {
            self.publish_session(topic, payload).await;
        }
    }

    /// A device's liveness changed and is not published now (the node is not up, or the live
    /// queue overflowed): remembered for the next births. A born device that died this way
    /// gets its DDEATH with the backlog's deaths.
    pub(super) fn device_changed_offline(&mut self, device: DeviceId, online: bool) {
        if let Some(node) = &mut self.node {
            let d = device.0 as usize;
            node.set_online(d, online);
            if !online && node.session.is_born(d) {
                node.born_for_history.push(d);
            }
        }
    }

    /// A message on a subscribed topic: a rebirth request, the primary host's STATE, or a
    /// device's DCMD (returned, as the writes it asks for, for the commands task).
    pub(super) async fn sparkplug_message(
        &mut self,
        topic: &str,
        payload: &[u8],
    ) -> Option<Incoming> {
        let node = self.node.as_mut()?;
        if let Some(&d) = node.by_dcmd.get(topic) {
            let rows = node.latest.snapshot();
            let row = rows.get(d).map_or(&[][..], |r| &r[..]);
            return node
                .devices
                .get(d)
                .map(|dev| dcmd(topic, d, dev, row, payload));
        }
        let step = if topic == node.topics.ncmd() {
            let command = sp::node_command(payload);
            for metric in &command.others {
                warn!(target: "audit", source_topic = topic, client = "mqtt", tag = %metric, outcome = "refused", reason = "the edge node has no writable metric of that name", "NCMD write refused");
                Metrics::add(&self.shared.metrics.commands_refused, 1);
            }
            if command.rebirth {
                info!("rebirth requested (NCMD Node Control/Rebirth)");
                node.session.rebirth()
            } else {
                debug!(topic, "NCMD without a rebirth request");
                None
            }
        } else if node
            .primary_host
            .as_deref()
            .is_some_and(|h| topic == Topics::state(h))
        {
            match sp::host_state(payload) {
                Some(state) => match node.session.host_state(state.online, state.timestamp) {
                    Ok(step) => {
                        info!(online = state.online, "primary host STATE");
                        step
                    }
                    Err(Stale) => {
                        info!(online = state.online, timestamp = state.timestamp, "primary host STATE older than one already seen (an earlier session of the host); ignored");
                        None
                    }
                },
                None => {
                    warn!(topic, "unreadable primary host STATE; ignored");
                    None
                }
            }
        } else {
            debug!(
                topic,
                "Sparkplug message on no topic of this node's; ignored"
            );
            None
        };
        self.sparkplug_step(step).await;
        None
    }

    /// A payload of a record as it goes out: with the session's next `seq` in Sparkplug.
    pub(super) fn sequenced(&mut self, payload: Bytes) -> Bytes {
        match &mut self.node {
            Some(node) => sp::with_seq(&payload, node.session.next_seq()),
            None => payload,
        }
    }

    /// Whether records may go out (in Sparkplug: after the NBIRTH of this connection).
    pub(super) fn data_allowed(&self) -> bool {
        self.node.as_ref().is_none_or(|n| n.session.up())
    }

    /// NDEATH at a clean shutdown, with the connection's `bdSeq`: at once, before any birth
    /// or death still waiting (they would be dead news). Acknowledged with [`FAREWELL_TOKEN`].
    pub(super) async fn publish_ndeath(&mut self) {
        let Some(node) = &mut self.node else { return };
        node.out.clear();
        let payload = sp::ndeath(node.session.bd_seq(), Timestamp::now().unix_ms());
        let topic = node.topics.ndeath();
        self.publish_own(topic, Bytes::from(payload), FAREWELL_TOKEN)
            .await;
    }

    /// A birth or death: queued in `seq` order, and out as far as the budget allows.
    async fn publish_session(&mut self, topic: String, payload: Bytes) {
        if let Some(node) = &mut self.node {
            node.out.push_back((topic, payload));
        }
        self.send_session().await;
    }

    /// Hands queued births and deaths to the client while fewer than [`SESSION_UNWRITTEN`] of
    /// the gateway's own messages wait unwritten (the loop calls it again as they are written).
    pub(super) async fn send_session(&mut self) {
        while self.window.own_unwritten() < SESSION_UNWRITTEN {
            let Some((topic, payload)) = self.node.as_mut().and_then(|n| n.out.pop_front()) else {
                break;
            };
            self.publish_own(topic, payload, NO_TOKEN).await;
        }
    }

    /// Whether births or deaths wait: records wait behind them.
    pub(super) fn session_waiting(&self) -> bool {
        self.node.as_ref().is_some_and(|n| !n.out.is_empty())
    }

    /// One of the session's messages to the client: QoS 1, not retained, acknowledged like a
    /// status message (it stands for no record).
    async fn publish_own(&mut self, topic: String, payload: Bytes, token: u64) {
        let out = Outbound {
            topic,
            alias: None,
            retain: false,
        };
        match self.client.publish(out, payload).await {
            Ok(()) => self.window.submit_own(Instant::now(), token),
            Err(e) => debug!(error = %e, "Sparkplug message not accepted by the MQTT client"),
        }
    }
}

/// The writes a DCMD to device `d` asks for, its aliases resolved to the device's tag names;
/// a metric that names no datatype is read by the one its birth gave it (from `latest`, the
/// device's latest samples, as the births do).
fn dcmd(
    topic: &str,
    d: usize,
    dev: &NodeDevice,
    latest: &[Option<protocols::model::Sample>],
    payload: &[u8],
) -> Incoming {
    let index = |m: &MetricRef| match m {
        MetricRef::Name(name) => dev.tags.iter().position(|t| **t == **name),
        MetricRef::Alias(alias) => tag_index_of_alias(dev, d, *alias),
    };
    let birth_datatype = |m: &MetricRef| {
        let i = index(m)?;
        let latest = latest.get(i).and_then(Option::as_ref);
        Some(sp::birth_datatype(
            latest,
            dev.declared.get(i).copied().flatten(),
        ))
    };
    let writes = match command::device_writes(payload, birth_datatype) {
        Ok(writes) => writes
            .into_iter()
            .map(|w| DeviceWrite {
                tag: match w.metric {
                    Some(MetricRef::Name(name)) => Ok(name),
                    Some(MetricRef::Alias(alias)) => tag_index_of_alias(dev, d, alias)
                        .and_then(|i| dev.tags.get(i))
                        .map(|t| t.to_string())
                        .ok_or_else(|| format!("alias {alias} is no metric of this device")),
                    None => Err("a metric with neither a name nor an alias".to_owned()),
                },
                value: w.value,
            })
            .collect(),
        Err(e) => vec![DeviceWrite {
            tag: Err(e.to_string()),
            value: Err(e.to_string()),
        }],
    };
    Incoming::Sparkplug {
        topic: topic.to_owned(),
        device: dev.name.to_string(),
        writes,
    }
}

/// The index of the tag of device `d` that `alias` stands for (see [`sp::alias`]).
fn tag_index_of_alias(dev: &NodeDevice, d: usize, alias: u64) -> Option<usize> {
    let tag = (alias & u64::from(u32::MAX)) as usize;
    let device_of_alias = (alias >> 32).checked_sub(1);
    (device_of_alias == Some(d as u64) && tag < dev.tags.len()).then_some(tag)
}

/// The datatypes a Modbus unit's tags will have (from their config type and scaling); an OPC UA
/// device declares none (its values say).
pub fn declared(kind: &crate::config::DeviceKind) -> Vec<Vec<Declared>> {
    use crate::encode::sparkplug::proto::datatype;
    use protocols::modbus::DataType;
    match kind {
        crate::config::DeviceKind::Modbus(m) => m
            .units
            .iter()
            .map(|u| {
                u.tags
                    .iter()
                    .map(|t| {
                        let scaled = t.scale != 1.0 || t.offset != 0.0;
                        Some(match t.data_type {
                            DataType::Bool => datatype::BOOLEAN,
                            DataType::String => datatype::STRING,
                            DataType::F32 | DataType::F64 => datatype::DOUBLE,
                            _ if scaled => datatype::DOUBLE,
                            DataType::I16 | DataType::I32 | DataType::I64 => datatype::INT64,
                            DataType::U16 | DataType::U32 | DataType::U64 => datatype::UINT64,
                        })
                    })
                    .collect()
            })
            .collect(),
        crate::config::DeviceKind::OpcUa(o) => vec![vec![None; o.tags.len()]],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bd_seq_steps_on_every_attempt_wraps_after_255_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = BdSeq::open(dir.path());
        assert_eq!(b.step(), 0);
        assert_eq!(b.step(), 1);
        let mut again = BdSeq::open(dir.path());
        assert_eq!(again.step(), 2, "read back from the data directory");
        std::fs::write(dir.path().join(BD_SEQ_FILE), "255\n").unwrap();
        assert_eq!(BdSeq::open(dir.path()).step(), 0);
    }
}
