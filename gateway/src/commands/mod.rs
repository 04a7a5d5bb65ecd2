//! Commands: writes from the cloud. The pure part is here (the payload parser and the checks);
//! the I/O shell that takes commands from the publisher, asks a driver and replies is
//! [`task`].
//!
//! Invariants:
//! - [`parse`] never panics: any bytes give a [`Command`] or a [`ParseError`]. A command is a
//!   JSON object `{"id": "...", "tag": "...", "value": ...}` and nothing else: `id` a string of
//!   1 to 128 characters, `tag` a string, `value` a bool, a number or a string.
//! - [`Checks::check`] refuses, in this order: commands disabled, unknown device, unknown tag,
//!   a tag without `writable = true`, a value of another kind than the tag's type, a number
//!   outside `write_min`..=`write_max`, a second write of the tag within `write_interval`.
//!   (An OPC UA tag's type is its node's, known to the server only: its driver refuses a
//!   value of the wrong kind.)
//!   Only a command that passes every check reaches a device; only such a command counts for
//!   the tag's rate (and not when the driver refuses it before sending anything).
//! - Commands never enter the buffer and are never replayed: a command that cannot be
//!   performed now is refused, not queued.

pub mod task;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocols::model::{DeviceId, TagId, Value, WriteAccess};
use serde::Deserialize;

use crate::config::{Config, DeviceKind};

/// The longest `id` a command may carry, in characters.
pub const MAX_ID_CHARS: usize = 128;

/// A parsed command.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The caller's id, repeated in the reply.
    pub id: String,
    /// The tag's name within the device of the topic.
    pub tag: String,
    /// The value to write, in engineering units.
    pub value: Value,
}

/// Why a payload is no command.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Not a JSON object of the expected fields.
    #[error("not a command {{\"id\", \"tag\", \"value\"}}: {0}")]
    Json(#[source] serde_json::Error),
    /// The id is empty or too long.
    #[error("`id` must have 1 to {MAX_ID_CHARS} characters")]
    Id,
    /// The value is null, an object or an array.
    #[error("`value` must be a bool, a number or a string")]
    Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    id: String,
    tag: String,
    value: serde_json::Value,
}

/// Parses a command payload; never panics.
pub fn parse(payload: &[u8]) -> Result<Command, ParseError> {
    let raw: RawCommand = serde_json::from_slice(payload).map_err(ParseError::Json)?;
    let chars = raw.id.chars().count();
    if chars == 0 || chars > MAX_ID_CHARS {
        return Err(ParseError::Id);
    }
    let value = match raw.value {
        serde_json::Value::Bool(b) => Value::Bool(b),
        serde_json::Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else {
                Value::Float(n.as_f64().ok_or(ParseError::Value)?)
            }
        }
        serde_json::Value::String(s) => Value::Text(s.into()),
        _ => return Err(ParseError::Value),
    };
    Ok(Command {
        id: raw.id,
        tag: raw.tag,
        value,
    })
}

/// The id of a payload that is no valid command, when one can be found, for the reply.
pub fn lenient_id(payload: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let id = v.get("id")?.as_str()?;
    (id.chars().count() <= MAX_ID_CHARS).then(|| id.to_owned())
}

/// Why a command was refused before reaching a device.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// `[commands] enabled` is false.
    #[error("commands are disabled on this gateway")]
    Disabled,
    /// The payload is no command.
    #[error("{0}")]
    Malformed(String),
    /// No device of that name takes commands.
    #[error("unknown device `{0}`")]
    UnknownDevice(String),
    /// The device has no tag of that name.
    #[error("unknown tag `{0}`")]
    UnknownTag(String),
    /// The tag is not `writable = true`.
    #[error("tag `{0}` is not writable")]
    NotWritable(String),
    /// The value's kind does not fit the tag.
    #[error("tag `{tag}` takes {expected}, not {got}")]
    WrongType {
        /// The tag.
        tag: String,
        /// What it takes: `a bool`, `a number`, `text`.
        expected: &'static str,
        /// What was given.
        got: &'static str,
    },
    /// Below `write_min`.
    #[error("{value} is below write_min {min} of tag `{tag}`")]
    BelowMin {
        /// The tag.
        tag: String,
        /// The value asked for.
        value: f64,
        /// The tag's `write_min`.
        min: f64,
    },
    /// Above `write_max`.
    #[error("{value} is above write_max {max} of tag `{tag}`")]
    AboveMax {
        /// The tag.
        tag: String,
        /// The value asked for.
        value: f64,
        /// The tag's `write_max`.
        max: f64,
    },
    /// The tag was written less than `write_interval` ago.
    #[error("tag `{tag}` was written less than {interval:?} ago; try again in {wait:?}")]
    TooSoon {
        /// The tag.
        tag: String,
        /// The configured interval.
        interval: Duration,
        /// How long until a write is taken.
        wait: Duration,
    },
}

impl Refusal {
    /// A short label for metrics: one of a fixed set.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Disabled => "disabled",
            Refusal::Malformed(_) => "malformed",
            Refusal::UnknownDevice(_) => "unknown_device",
            Refusal::UnknownTag(_) => "unknown_tag",
            Refusal::NotWritable(_) => "not_writable",
            Refusal::WrongType { .. } => "wrong_type",
            Refusal::BelowMin { .. } | Refusal::AboveMax { .. } => "out_of_range",
            Refusal::TooSoon { .. } => "rate_limited",
        }
    }
}

/// What kind of value a tag takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `true` or `false`.
    Bool,
    /// A JSON number.
    Number,
    /// A JSON string.
    Text,
    /// Any of them: the device knows the type (an OPC UA node's data type), so its driver
    /// refuses a value of the wrong kind.
    Any,
}

impl Kind {
    fn expected(self) -> &'static str {
        match self {
            Kind::Bool => "a bool",
            Kind::Number => "a number",
            Kind::Text => "text",
            Kind::Any => "a bool, a number or text",
        }
    }

    fn of(value: &Value) -> &'static str {
        match value {
            Value::Bool(_) => "a bool",
            Value::Int(_) | Value::UInt(_) | Value::Float(_) => "a number",
            Value::Text(_) => "text",
            Value::Array(_) => "an array",
        }
    }

    fn accepts(self, value: &Value) -> bool {
        matches!(
            (self, value),
            (Kind::Bool, Value::Bool(_))
                | (
                    Kind::Number,
                    Value::Int(_) | Value::UInt(_) | Value::Float(_)
                )
                | (Kind::Text, Value::Text(_))
                | (
                    Kind::Any,
                    Value::Bool(_)
                        | Value::Int(_)
                        | Value::UInt(_)
                        | Value::Float(_)
                        | Value::Text(_)
                )
        )
    }
}

/// One tag as the checks know it.
#[derive(Debug, Clone, PartialEq)]
pub struct TagRule {
    /// Its index in the device.
    pub tag: TagId,
    /// The kind of value it takes.
    pub kind: Kind,
    /// None when not writable.
    pub access: Option<WriteAccess>,
}

/// One device's tags by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceRules {
    /// The device's catalog id.
    pub id: Option<DeviceId>,
    /// Its tags.
    pub tags: HashMap<Arc<str>, TagRule>,
}

/// A command that passed every check: where it goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The device.
    pub device: DeviceId,
    /// The tag.
    pub tag: TagId,
}

/// The checks and the state they keep (the last accepted write of each tag).
#[derive(Debug)]
pub struct Checks {
    enabled: bool,
    interval: Duration,
    devices: HashMap<Arc<str>, DeviceRules>,
    last_write: HashMap<(DeviceId, TagId), Instant>,
}

impl Checks {
    /// Checks for these devices.
    pub fn new(enabled: bool, interval: Duration, devices: HashMap<Arc<str>, DeviceRules>) -> Self {
        Checks {
            enabled,
            interval,
            devices,
            last_write: HashMap::new(),
        }
    }

    /// The checks of a config whose devices got these catalog ids (one per unit of a Modbus
    /// line, in order; one per OPC UA device; see `pipeline::add_to_catalog`).
    pub fn for_config(config: &Config, ids: &[(String, Vec<DeviceId>)]) -> Self {
        let mut devices = HashMap::new();
        for d in &config.devices {
            let Some((_, unit_ids)) = ids.iter().find(|(name, _)| **name == *d.name) else {
                continue;
            };
            let m = match &d.kind {
                DeviceKind::Modbus(m) => m,
                DeviceKind::OpcUa(o) => {
                    let Some(id) = unit_ids.first() else {
                        continue;
                    };
                    // A node's data type is the server's: the driver checks the value's kind.
                    let tags = o
                        .tags
                        .iter()
                        .enumerate()
                        .map(|(i, t)| {
                            let rule = TagRule {
                                tag: TagId(i as u32),
                                kind: Kind::Any,
                                access: t.write,
                            };
                            (t.name.clone(), rule)
                        })
                        .collect();
                    let rules = DeviceRules {
                        id: Some(*id),
                        tags,
                    };
                    devices.insert(d.name.clone(), rules);
                    continue;
                }
            };
            for (unit, id) in m.units.iter().zip(unit_ids) {
                let name: Arc<str> = match &unit.name {
                    Some(u) => format!("{}/{u}", d.name).into(),
                    None => d.name.clone(),
                };
                let tags = unit
                    .tags
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        let kind = match t.data_type {
                            protocols::modbus::DataType::Bool => Kind::Bool,
                            protocols::modbus::DataType::String => Kind::Text,
                            _ => Kind::Number,
                        };
                        let rule = TagRule {
                            tag: TagId(i as u32),
                            kind,
                            access: t.write,
                        };
                        (t.name.clone(), rule)
                    })
                    .collect();
                devices.insert(
                    name,
                    DeviceRules {
                        id: Some(*id),
                        tags,
                    },
                );
            }
        }
        Checks::new(
            config.commands.enabled,
            config.commands.write_interval,
            devices,
        )
    }

    /// Checks a command for `device` (the topic's) at `now`; on success the write counts for
    /// the tag's rate from `now`.
    pub fn check(
        &mut self,
        device: &str,
        command: &Command,
        now: Instant,
    ) -> Result<Target, Refusal> {
        if !self.enabled {
            return Err(Refusal::Disabled);
        }
        let rules = self
            .devices
            .get(device)
            .ok_or_else(|| Refusal::UnknownDevice(device.to_owned()))?;
        let Some(device_id) = rules.id else {
            return Err(Refusal::UnknownDevice(device.to_owned()));
        };
        let tag = command.tag.as_str();
        let rule = rules
            .tags
            .get(tag)
            .ok_or_else(|| Refusal::UnknownTag(tag.to_owned()))?;
        let access = rule
            .access
            .ok_or_else(|| Refusal::NotWritable(tag.to_owned()))?;
        if !rule.kind.accepts(&command.value) {
            return Err(Refusal::WrongType {
                tag: tag.to_owned(),
                expected: rule.kind.expected(),
                got: Kind::of(&command.value),
            });
        }
        let number = matches!(
            command.value,
            Value::Int(_) | Value::UInt(_) | Value::Float(_)
        );
        if let Some(value) = command.value.as_f64().filter(|_| number) {
            if let Some(min) = access.min.filter(|&min| value < min) {
                return Err(Refusal::BelowMin {
                    tag: tag.to_owned(),
                    value,
                    min,
                });
            }
            if let Some(max) = access.max.filter(|&max| value > max) {
                return Err(Refusal::AboveMax {
                    tag: tag.to_owned(),
                    value,
                    max,
                });
            }
        }
        let key = (device_id, rule.tag);
        if let Some(&last) = self.last_write.get(&key) {
            let since = now.saturating_duration_since(last);
            if since < self.interval {
                return Err(Refusal::TooSoon {
                    tag: tag.to_owned(),
                    interval: self.interval,
                    wait: self.interval - since,
                });
            }
        }
        self.last_write.insert(key, now);
        Ok(Target {
            device: device_id,
            tag: rule.tag,
        })
    }

    /// Takes the last writes `old` counted (a reload's new checks: a tag keeps its
    /// `write_interval`; a device a reload restarted has new ids, and starts afresh).
    pub fn keep_last_writes(&mut self, old: &Checks) {
        self.last_write.clone_from(&old.last_write);
    }

    /// Forgets the write of `target` that [`Checks::check`] counted: the driver refused it
    /// before sending anything, so it does not hold the tag's next write back.
    pub fn forget(&mut self, target: &Target) {
        self.last_write.remove(&(target.device, target.tag));
    }
}

#[cfg(test)]
mod tests;
