//! The commands task: takes the command publishes the publisher hands over (a bounded
//! channel), checks each ([`super::Checks`]), asks the device's driver to write (its bounded
//! write channel), and hands the reply back to the publisher for
//! `{topic_prefix}/{device}/cmd/reply`. The metrics of a Sparkplug DCMD go the same way, one
//! write each, without a reply (the host sees the value in the device's next DDATA). One
//! write at a time; every outcome is an audit event (`target = "audit"`) and a count.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use protocols::driver::{write_channel, WriteError, WriteInbox, WriteRequest};
use protocols::model::{DeviceId, Value};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::{lenient_id, parse, Checks, Command, Refusal};
use crate::config::{Config, DeviceKind, DeviceSettings};
use crate::pipeline::Shared;

/// How long a driver may take to perform a write and read the tag back.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Capacity of the publisher-to-commands and commands-to-publisher channels.
pub const CHANNEL: usize = 16;

/// A command the publisher received.
#[derive(Debug, Clone)]
pub enum Incoming {
    /// A JSON command, answered on its topic's `/reply`.
    Json {
        /// Its topic, `{topic_prefix}/{device}/cmd`.
        topic: String,
        /// Its payload.
        payload: Bytes,
    },
    /// The metrics of a Sparkplug DCMD, in its order; no reply.
    Sparkplug {
        /// The DCMD's topic.
        topic: String,
        /// The device's gateway name.
        device: String,
        /// Each metric: its tag's name and value, or why it cannot be written.
        writes: Vec<DeviceWrite>,
    },
}

/// One metric of a DCMD, its alias resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceWrite {
    /// The tag's name, or why the metric names no tag.
    pub tag: Result<String, String>,
    /// The value, or why it cannot be read.
    pub value: Result<Value, String>,
}

/// A reply to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// `{topic_prefix}/{device}/cmd/reply`.
    pub topic: String,
    /// The JSON reply.
    pub payload: Bytes,
}

/// The publisher's ends of the command channels.
#[derive(Debug)]
pub struct CommandLink {
    /// Where command publishes go.
    pub incoming: mpsc::Sender<Incoming>,
    /// The replies to publish.
    pub replies: mpsc::Receiver<Reply>,
}

/// The commands task's ends of the command channels.
#[derive(Debug)]
pub struct TaskEnds {
    /// Command publishes from the publisher.
    pub incoming: mpsc::Receiver<Incoming>,
    /// Replies to the publisher.
    pub replies: mpsc::Sender<Reply>,
}

/// Both ends of the bounded channels between the publisher and the commands task.
pub fn channels() -> (CommandLink, TaskEnds) {
    let (in_tx, in_rx) = mpsc::channel(CHANNEL);
    let (out_tx, out_rx) = mpsc::channel(CHANNEL);
    (
        CommandLink {
            incoming: in_tx,
            replies: out_rx,
        },
        TaskEnds {
            incoming: in_rx,
            replies: out_tx,
        },
    )
}

/// How commands are wired at a start: a write channel for each driver task with a writable
/// tag, the checks, and the channels to the publisher. Nothing at all when `[commands]` is off.
#[derive(Debug)]
pub struct Wiring {
    enabled: bool,
    ids: Vec<(String, Vec<DeviceId>)>,
    writers: HashMap<DeviceId, mpsc::Sender<WriteRequest>>,
}

/// Write requests waiting for one driver task at most.
const WRITE_QUEUE: usize = 4;

impl Wiring {
    /// The wiring of `config`, whose devices got these catalog ids.
    pub fn new(config: &Config, lines: &[(DeviceSettings, Vec<DeviceId>)]) -> Self {
        Wiring {
            enabled: config.commands.enabled,
            ids: lines
                .iter()
                .map(|(d, ids)| (d.name.to_string(), ids.clone()))
                .collect(),
            writers: HashMap::new(),
        }
    }

    /// The write inbox of one device's driver task (a Modbus line's units share it; an OPC
    /// UA device has its own), when commands are on and the device has a writable tag.
    pub fn inbox(&mut self, settings: &DeviceSettings, ids: &[DeviceId]) -> Option<WriteInbox> {
        if !self.enabled {
            return None;
        }
        write_inbox(settings, ids, &mut self.writers)
    }

    /// Starts the commands task and hands the publisher its ends (before the publisher
    /// starts); the handle a reload rewires it with. Nothing when commands are off.
    pub fn start(self, config: &Config, shared: Arc<Shared>) -> Option<CommandsHandle> {
        if !self.enabled {
            return None;
        }
        let (link, ends) = channels();
        shared.give_back_commands(Some(link));
        let checks = Checks::for_config(config, &self.ids);
        shared.commands_enabled.store(true, Ordering::Relaxed);
        let slot = Arc::new(RewireSlot::default());
        let gate = Gate {
            checks,
            writers: self.writers.clone(),
            shared: shared.clone(),
        };
        tokio::spawn(run(
            gate,
            config.mqtt.topic_prefix.clone(),
            ends,
            slot.clone(),
        ));
        Some(CommandsHandle {
            writers: self.writers,
            slot,
        })
    }
}

/// A write channel for the driver task of `settings` (its units: `ids`) when it has a
/// writable tag, kept in `writers` for each unit.
fn write_inbox(
    settings: &DeviceSettings,
    ids: &[DeviceId],
    writers: &mut HashMap<DeviceId, mpsc::Sender<WriteRequest>>,
) -> Option<WriteInbox> {
    let writable = match &settings.kind {
        DeviceKind::Modbus(m) => m
            .units
            .iter()
            .flat_map(|u| u.tags.iter())
            .any(|t| t.write.is_some()),
        DeviceKind::OpcUa(o) => o.tags.iter().any(|t| t.write.is_some()),
    };
    if !writable {
        return None;
    }
    let (tx, inbox) = write_channel(WRITE_QUEUE);
    for id in ids {
        writers.insert(*id, tx.clone());
    }
    Some(inbox)
}

/// What a reload changes in the running commands task: the checks of the new config and the
/// write channel of every driver that takes writes now.
#[derive(Debug)]
struct Rewire {
    checks: Checks,
    writers: HashMap<DeviceId, mpsc::Sender<WriteRequest>>,
}

/// The latest rewiring not yet taken by the task (a newer one replaces it: never a queue that
/// could wait on a write in progress).
#[derive(Debug, Default)]
struct RewireSlot {
    next: std::sync::Mutex<Option<Rewire>>,
    ready: tokio::sync::Notify,
}

impl RewireSlot {
    fn put(&self, rewire: Rewire) {
        if let Ok(mut next) = self.next.lock() {
            *next = Some(rewire);
        }
        self.ready.notify_one();
    }

    fn take(&self) -> Option<Rewire> {
        self.next.lock().ok().and_then(|mut next| next.take())
    }
}

/// The running commands task as the pipeline keeps it: a reload gives the drivers it starts
/// their write channels and the task the new checks.
#[derive(Debug)]
pub struct CommandsHandle {
    writers: HashMap<DeviceId, mpsc::Sender<WriteRequest>>,
    slot: Arc<RewireSlot>,
}

impl CommandsHandle {
    /// The write inbox of a driver task a reload starts (the same rule as at a start).
    pub fn inbox(&mut self, settings: &DeviceSettings, ids: &[DeviceId]) -> Option<WriteInbox> {
        write_inbox(settings, ids, &mut self.writers)
    }

    /// Forgets the write channels of drivers a reload stopped.
    pub fn forget(&mut self, ids: &[DeviceId]) {
        for id in ids {
            self.writers.remove(id);
        }
    }

    /// Hands the task the checks of `config`, whose devices now have these catalog ids, and
    /// the write channels of the running drivers; taken before the task's next command. The
    /// tags' last writes carry over (`write_interval` still holds across a reload).
    pub fn rewire(&self, config: &Config, ids: &[(String, Vec<DeviceId>)]) {
        self.slot.put(Rewire {
            checks: Checks::for_config(config, ids),
            writers: self.writers.clone(),
        });
    }
}

/// The subscriptions for commands: `{topic_prefix}/+/cmd` for a device, and
/// `{topic_prefix}/+/+/cmd` for a named unit of a Modbus line (device `line/unit`).
pub fn filters(topic_prefix: &str) -> [String; 2] {
    [
        format!("{topic_prefix}/+/cmd"),
        format!("{topic_prefix}/+/+/cmd"),
    ]
}

/// The device named by a command topic, if it is one: `device` or `line/unit` (device names
/// hold no `/`).
pub fn device_of<'a>(topic_prefix: &str, topic: &'a str) -> Option<&'a str> {
    let device = topic
        .strip_prefix(topic_prefix)?
        .strip_prefix('/')?
        .strip_suffix("/cmd")?;
    let levels = device.split('/').count();
    (levels <= 2 && device.split('/').all(|level| !level.is_empty())).then_some(device)
}

/// How a command ended, for the reply, the audit event and the metrics.
enum Outcome {
    Written {
        old: Option<Value>,
        new: Option<Value>,
    },
    Refused(String),
    Failed(String),
}

/// Runs the commands task until the publisher's end closes; a reload's rewiring (in `slot`)
/// is taken between two commands.
async fn run(mut gate: Gate, topic_prefix: String, mut ends: TaskEnds, slot: Arc<RewireSlot>) {
    loop {
        let incoming = tokio::select! {
            incoming = ends.incoming.recv() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
            () = slot.ready.notified() => {
                if let Some(rewire) = slot.take() {
                    gate.rewire(rewire);
                }
                continue;
            }
        };
        if let Some(rewire) = slot.take() {
            gate.rewire(rewire);
        }
        let (topic, payload) = match incoming {
            Incoming::Json { topic, payload } => (topic, payload),
            Incoming::Sparkplug {
                topic,
                device,
                writes,
            } => {
                for w in writes {
                    let outcome = match (&w.tag, &w.value) {
                        (Err(reason), _) | (_, Err(reason)) => Outcome::Refused(reason.clone()),
                        (Ok(tag), Ok(value)) => {
                            let command = Command {
                                id: String::new(),
                                tag: tag.clone(),
                                value: value.clone(),
                            };
                            gate.perform(&device, &command).await
                        }
                    };
                    let tag = w.tag.as_deref().ok();
                    gate.account(&topic, &device, tag, w.value.as_ref().ok(), &outcome);
                }
                continue;
            }
        };
        let Some(device) = device_of(&topic_prefix, &topic) else {
            continue;
        };
        let device = device.to_owned();
        let (id, command, outcome) = match parse(&payload) {
            Err(e) => (
                lenient_id(&payload),
                None,
                Outcome::Refused(Refusal::Malformed(e.to_string()).to_string()),
            ),
            Ok(command) => {
                let outcome = gate.perform(&device, &command).await;
                (Some(command.id.clone()), Some(command), outcome)
            }
        };
        let tag = command.as_ref().map(|c| c.tag.as_str());
        let value = command.as_ref().map(|c| &c.value);
        gate.account(&topic, &device, tag, value, &outcome);
        let reply = Reply {
            topic: format!("{topic}/reply"),
            payload: reply_payload(id.as_deref(), &outcome),
        };
        if ends.replies.send(reply).await.is_err() {
            return;
        }
    }
}

/// What a command passes on its way to a device: the checks, then the device's driver.
struct Gate {
    checks: Checks,
    writers: HashMap<DeviceId, mpsc::Sender<WriteRequest>>,
    shared: Arc<Shared>,
}

impl Gate {
    /// A reload's checks and write channels from now on, the tags' last writes kept.
    fn rewire(&mut self, rewire: Rewire) {
        let Rewire {
            mut checks,
            writers,
        } = rewire;
        checks.keep_last_writes(&self.checks);
        self.checks = checks;
        self.writers = writers;
    }

    /// Checks one command and, when it passes, has the driver write it.
    async fn perform(&mut self, device: &str, command: &Command) -> Outcome {
        let checked = if self.shared.commands_enabled.load(Ordering::Relaxed) {
            self.checks.check(device, command, Instant::now())
        } else {
            Err(Refusal::Disabled)
        };
        let target = match checked {
            Err(refusal) => return Outcome::Refused(refusal.to_string()),
            Ok(target) => target,
        };
        let Some(writer) = self.writers.get(&target.device) else {
            return Outcome::Refused(format!(
                "device `{device}` takes no writes until the gateway restarts"
            ));
        };
        let outcome = write(writer, target.clone(), command.value.clone(), device).await;
        if let Outcome::Refused(_) = outcome {
            self.checks.forget(&target);
        }
        outcome
    }

    /// The audit event and the count of one outcome.
    fn account(
        &self,
        topic: &str,
        device: &str,
        tag: Option<&str>,
        value: Option<&Value>,
        outcome: &Outcome,
    ) {
        audit(topic, device, tag, value, outcome);
        let m = &self.shared.metrics;
        let counter = match outcome {
            Outcome::Written { .. } => &m.commands_written,
            Outcome::Refused(_) => &m.commands_refused,
            Outcome::Failed(_) => &m.commands_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Hands one write to a driver and waits for its outcome.
async fn write(
    writer: &mpsc::Sender<WriteRequest>,
    target: super::Target,
    value: Value,
    device: &str,
) -> Outcome {
    let (reply, outcome) = oneshot::channel();
    let request = WriteRequest {
        device: target.device,
        tag: target.tag,
        value,
        reply,
    };
    if let Err(e) = writer.try_send(request) {
        return Outcome::Refused(match e {
            mpsc::error::TrySendError::Full(_) => {
                format!("device `{device}` is busy with other writes; try again")
            }
            mpsc::error::TrySendError::Closed(_) => {
                format!("device `{device}` is not running")
            }
        });
    }
    match tokio::time::timeout(WRITE_TIMEOUT, outcome).await {
        Err(_) => Outcome::Failed(format!(
            "no outcome from the driver within {WRITE_TIMEOUT:?}; the write may or may not have landed"
        )),
        Ok(Err(_)) => Outcome::Failed("the driver stopped before answering".into()),
        Ok(Ok(Ok(done))) => Outcome::Written {
            old: done.previous,
            new: done.read_back,
        },
        Ok(Ok(Err(
            e @ (WriteError::Refused(_)
            | WriteError::Unsupported(_)
            | WriteError::NotConnected
            | WriteError::UnknownTag),
        ))) => Outcome::Refused(e.to_string()),
        Ok(Ok(Err(e))) => Outcome::Failed(error_chain(&e)),
    }
}

/// An error with its sources, for a reply.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

fn json_value(value: Option<&Value>) -> serde_json::Value {
    match value {
        None => serde_json::Value::Null,
        Some(Value::Bool(b)) => json!(b),
        Some(Value::Int(i)) => json!(i),
        Some(Value::UInt(u)) => json!(u),
        Some(Value::Float(f)) => json!(f),
        Some(other) => json!(other.to_string()),
    }
}

/// The reply document: the command's id, the outcome, the reason of a refusal or failure,
/// and the value read back after a write.
fn reply_payload(id: Option<&str>, outcome: &Outcome) -> Bytes {
    let doc = match outcome {
        Outcome::Written { new, .. } => {
            json!({"id": id, "outcome": "written", "value": json_value(new.as_ref())})
        }
        Outcome::Refused(reason) => json!({"id": id, "outcome": "refused", "reason": reason}),
        Outcome::Failed(reason) => json!({"id": id, "outcome": "failed", "reason": reason}),
    };
    Bytes::from(doc.to_string())
}

/// One audit event per command, whatever its outcome.
fn audit(topic: &str, device: &str, tag: Option<&str>, value: Option<&Value>, outcome: &Outcome) {
    let tag = tag.unwrap_or("");
    let new = json_value(value).to_string();
    match outcome {
        Outcome::Written {
            old,
            new: read_back,
        } => info!(
            target: "audit",
            source_topic = topic,
            client = "mqtt",
            device,
            tag,
            old_value = %json_value(old.as_ref()),
            new_value = %new,
            read_back = %json_value(read_back.as_ref()),
            outcome = "written",
            "write command performed"
        ),
        Outcome::Refused(reason) => warn!(
            target: "audit",
            source_topic = topic,
            client = "mqtt",
            device,
            tag,
            new_value = %new,
            outcome = "refused",
            reason = %reason,
            "write command refused"
        ),
        Outcome::Failed(reason) => warn!(
            target: "audit",
            source_topic = topic,
            client = "mqtt",
            device,
            tag,
            new_value = %new,
            outcome = "failed",
            reason = %reason,
            "write command failed"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_topic_names_one_device_or_one_unit_of_a_line() {
        assert_eq!(device_of("plant", "plant/press7/cmd"), Some("press7"));
        assert_eq!(device_of("plant", "plant/press7/cmd/reply"), None);
        assert_eq!(device_of("plant", "plant//cmd"), None);
        assert_eq!(device_of("plant", "plantx/press7/cmd"), None);
        assert_eq!(device_of("plant", "other/press7/cmd"), None);
        assert_eq!(device_of("plant", "plant/meters/m3/cmd"), Some("meters/m3"));
        assert_eq!(device_of("plant", "plant/meters//cmd"), None);
        assert_eq!(device_of("plant", "plant/a/b/c/cmd"), None);
        assert_eq!(filters("plant"), ["plant/+/cmd", "plant/+/+/cmd"]);
    }

    #[test]
    fn a_reply_carries_the_id_the_outcome_and_the_reason_or_the_value() {
        let written = Outcome::Written {
            old: Some(Value::UInt(1)),
            new: Some(Value::UInt(7)),
        };
        assert_eq!(
            reply_payload(Some("42"), &written),
            Bytes::from(r#"{"id":"42","outcome":"written","value":7}"#)
        );
        assert_eq!(
            reply_payload(None, &Outcome::Refused("unknown tag `x`".into())),
            Bytes::from(r#"{"id":null,"outcome":"refused","reason":"unknown tag `x`"}"#)
        );
    }
}
