//! The `[[devices]]` array: each entry's protocol, read first, picks the keys and rules the
//! entry is checked by (`modbus.rs`, `opcua.rs`); the rules every device shares
//! (names, timing, tags present) and those across devices (unique names) are here.

use std::collections::{BTreeSet, HashMap};
use std::ops::{Range, RangeInclusive};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::de::{keys_of, one_of, plain_serde_message, unknown_key_message};
use crate::config::problem::FieldPath;
use crate::config::raw::{
    Dur, RawModbusDevice, RawOpcUaDevice, RawOpcUaTag, RawTag, MODBUS_ARRAYS, OPCUA_ARRAYS,
    SERIAL_KEYS,
};
use crate::config::split;
use crate::config::values::{
    check_device_name, check_tag_name, fmt_duration, MAX_DURATION, MS, NONZERO,
};
use crate::config::{DeviceKind, DeviceSettings};

use super::Checker;
use protocols::model::TagMeta;

/// The text of a file split at its devices (`split.rs`), and each device's piece of it.
pub(in crate::config) struct Pieces<'s> {
    pub(in crate::config) src: &'s str,
    pub(in crate::config) pieces: Vec<split::Piece>,
}

/// A device's `[[devices.tags]]` entries: its table's `tags` value, or, when the file was
/// split, the text and each tag's piece of it.
pub(super) enum TagSource<'s> {
    Value(Option<toml::Value>),
    Pieces(&'s str, Vec<Range<usize>>),
}

impl TagSource<'_> {
    /// Whether the device has a `tags` key (pieces are only made of `[[devices.tags]]`).
    pub(super) fn is_given(&self) -> bool {
        match self {
            TagSource::Value(value) => value.is_some(),
            TagSource::Pieces(_, pieces) => !pieces.is_empty(),
        }
    }
}

/// The `[[devices]]` entries in order, each with its tags' pieces (empty when its table holds
/// them); `None` for a piece that does not parse on its own.
enum Entries<'s> {
    Parsed(std::vec::IntoIter<toml::Value>),
    Pieces(&'s str, std::vec::IntoIter<split::Piece>),
}

impl<'s> Iterator for Entries<'s> {
    type Item = Option<(toml::Value, TagSource<'s>)>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Entries::Parsed(values) => values.next().map(|v| Some((v, TagSource::Value(None)))),
            Entries::Pieces(src, pieces) => pieces.next().map(|p| {
                let entry = split::parse_piece(src, &p)?;
                Some((entry, TagSource::Pieces(src, p.tags)))
            }),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            Entries::Parsed(values) => values.size_hint(),
            Entries::Pieces(_, pieces) => pieces.size_hint(),
        }
    }
}

impl ExactSizeIterator for Entries<'_> {}

/// A tags array's entries in order; `None` for a piece that does not parse on its own.
pub(super) enum TagEntries<'s> {
    Parsed(std::vec::IntoIter<toml::Value>),
    Pieces(&'s str, std::vec::IntoIter<Range<usize>>),
}

impl Iterator for TagEntries<'_> {
    type Item = Option<toml::Value>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            TagEntries::Parsed(values) => values.next().map(Some),
            TagEntries::Pieces(src, pieces) => pieces.next().map(|p| split::parse_tag(src, &p)),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            TagEntries::Parsed(values) => values.size_hint(),
            TagEntries::Pieces(_, pieces) => pieces.size_hint(),
        }
    }
}

impl ExactSizeIterator for TagEntries<'_> {}

/// What checking one `[[devices]]` entry gave.
pub(super) enum DeviceOutcome {
    /// Boxed: an OPC UA device's settings are large, the other outcomes empty.
    Enabled(Box<DeviceSettings>),
    /// `enabled = false`: how many devices it would publish (each unit of a Modbus line).
    Disabled(usize),
    Invalid,
}

/// The protocols a device can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::config) enum Protocol {
    ModbusTcp,
    ModbusRtu,
    ModbusRtuOverTcp,
    OpcUa,
}

impl Protocol {
    /// Every protocol, in the order they are listed to the user.
    pub(in crate::config) const ALL: [Protocol; 4] = [
        Protocol::ModbusTcp,
        Protocol::ModbusRtu,
        Protocol::ModbusRtuOverTcp,
        Protocol::OpcUa,
    ];

    /// The value of `protocol`.
    pub(in crate::config) fn name(self) -> &'static str {
        match self {
            Protocol::ModbusTcp => "modbus_tcp",
            Protocol::ModbusRtu => "modbus_rtu",
            Protocol::ModbusRtuOverTcp => "modbus_rtu_over_tcp",
            Protocol::OpcUa => "opcua",
        }
    }

    /// `modbus_tcp, modbus_rtu, modbus_rtu_over_tcp or opcua`.
    fn list() -> String {
        one_of(&Protocol::ALL.map(Protocol::name))
    }

    /// The keys of a `[[devices]]` entry of this protocol, its arrays of tables included.
    pub(super) fn device_keys(self) -> Vec<&'static str> {
        let (keys, arrays, not_ours): (_, _, &[&str]) = match self {
            Protocol::ModbusTcp | Protocol::ModbusRtuOverTcp => {
                (keys_of::<RawModbusDevice>(), MODBUS_ARRAYS, SERIAL_KEYS)
            }
            Protocol::ModbusRtu => (keys_of::<RawModbusDevice>(), MODBUS_ARRAYS, &["address"]),
            Protocol::OpcUa => (keys_of::<RawOpcUaDevice>(), OPCUA_ARRAYS, &[]),
        };
        let keys = keys.iter().chain(arrays).copied();
        keys.filter(|key| !not_ours.contains(key)).collect()
    }

    /// The keys of a tag of a device of this protocol.
    pub(super) fn tag_keys(self) -> Vec<&'static str> {
        match self {
            Protocol::OpcUa => keys_of::<RawOpcUaTag>().to_vec(),
            _ => keys_of::<RawTag>().to_vec(),
        }
    }

    /// The unit ids a Modbus device of this protocol can address. On a serial line 0 is the
    /// broadcast address, which no unit answers, and 248 to 255 are reserved; a Modbus TCP
    /// device takes any byte (many ignore it; a gateway routes by it).
    pub(super) fn unit_ids(self) -> RangeInclusive<i64> {
        match self {
            Protocol::ModbusTcp => 0..=255,
            _ => 1..=247,
        }
    }
}

/// A device's or tag's protocol and the other protocols' keys for the same kind of unit, so
/// that a key of another protocol is reported as unknown for this one, saying whose it is.
pub(super) struct Foreign {
    /// The protocol of the device the unit belongs to.
    pub(super) protocol: &'static str,
    /// The keys of the unit for this protocol: any other key is unknown.
    pub(super) own: Vec<&'static str>,
    /// Each other protocol with its keys (from [`keys_of`]), in the order of [`Protocol::ALL`].
    others: Vec<(&'static str, Vec<&'static str>)>,
}

impl Foreign {
    /// The other protocols' keys of one kind of unit, `keys` giving a protocol's.
    pub(super) fn new(protocol: Protocol, keys: fn(Protocol) -> Vec<&'static str>) -> Self {
        Foreign {
            protocol: protocol.name(),
            own: keys(protocol),
            others: Protocol::ALL
                .into_iter()
                .filter(|&other| other != protocol)
                .map(|other| (other.name(), keys(other)))
                .collect(),
        }
    }

    /// The other protocols that have `key`.
    fn owners(&self, key: &str) -> Vec<&'static str> {
        self.others
            .iter()
            .filter(|(_, keys)| keys.contains(&key))
            .map(|&(protocol, _)| protocol)
            .collect()
    }

    /// The message for an unknown key of the unit: a key of other protocols is named as
    /// such, with the keys of this one (a near name would be no typo: the key is in the wrong
    /// device); any other unknown key gets a did-you-mean.
    pub(super) fn unknown_key_message(&self, key: &str) -> String {
        let owners = self.owners(key);
        let Some((last, first)) = owners.split_last() else {
            return unknown_key_message("key", key, &self.own);
        };
        let owners = match first {
            [] => format!("protocol `{last}`"),
            _ => format!("protocols `{}` and `{last}`", first.join("`, `")),
        };
        format!(
            "unknown key `{key}` for protocol `{}` (it belongs to {owners}); expected one of: {}",
            self.protocol,
            self.own.join(", ")
        )
    }
}

/// The timing keys every device has.
pub(super) struct Timing<T> {
    pub(super) scan_interval: T,
    pub(super) timeout: T,
    pub(super) backoff_min: T,
    pub(super) backoff_max: T,
}

/// What every device has besides its protocol's settings.
pub(super) struct Common {
    pub(super) name: Arc<str>,
    pub(super) scan_interval: Duration,
    pub(super) enabled: bool,
}

impl Common {
    pub(super) fn outcome(self, kind: DeviceKind) -> DeviceOutcome {
        if self.enabled {
            DeviceOutcome::Enabled(Box::new(DeviceSettings {
                name: self.name,
                scan_interval: self.scan_interval,
                kind,
            }))
        } else {
            DeviceOutcome::Disabled(match &kind {
                DeviceKind::Modbus(m) => m.units.len().max(1),
                DeviceKind::OpcUa(_) => 1,
            })
        }
    }
}

impl Checker<'_> {
    /// The `[[devices]]` entries: the root table's `value` when the whole file was parsed,
    /// else the file's `pieces`, each parsed when its turn comes (`split.rs`). A piece that
    /// does not parse on its own leaves `whole_text_needed` set.
    pub(super) fn devices(
        &mut self,
        value: Option<toml::Value>,
        pieces: Option<Pieces<'_>>,
        data_dir: &Path,
    ) -> Option<Vec<DeviceSettings>> {
        let path = FieldPath::top("devices");
        let entries = match (pieces, value) {
            (Some(Pieces { src, pieces }), _) => Entries::Pieces(src, pieces.into_iter()),
            (None, Some(value)) => {
                Entries::Parsed(self.entries(value, &path, "[[devices]]").into_iter())
            }
            (None, None) => Entries::Parsed(Vec::new().into_iter()),
        };
        if entries.len() == 0 && !self.problems.iter().any(|p| p.field == "devices") {
            self.report(&path, "no [[devices]]: configure at least one device");
            return None;
        }
        let mut names = HashMap::new();
        let mut devices = Vec::new();
        // Serial ports of enabled lines, with the index of the first device on each.
        let mut ports: HashMap<String, (usize, Arc<str>)> = HashMap::new();
        let mut complete = true;
        for (index, entry) in entries.enumerate() {
            let Some(entry) = entry else {
                self.whole_text_needed = true;
                return None;
            };
            let (entry, tags) = entry;
            let outcome = self.device(index, entry, tags, &mut names, data_dir);
            if self.whole_text_needed {
                return None;
            }
            match outcome {
                DeviceOutcome::Enabled(device) => {
                    self.port_not_shared(index, &device, &mut ports);
                    devices.push(*device);
                }
                DeviceOutcome::Disabled(published) => self.disabled += published,
                DeviceOutcome::Invalid => complete = false,
            }
        }
        complete.then_some(devices)
    }

    fn device(
        &mut self,
        index: usize,
        entry: toml::Value,
        tags: TagSource<'_>,
        names: &mut HashMap<String, usize>,
        data_dir: &Path,
    ) -> DeviceOutcome {
        let path = FieldPath::top("devices").index(index);
        let Some(mut table) = self.entry(entry, &path, "[[devices]]") else {
            return DeviceOutcome::Invalid;
        };
        let tags = match tags {
            TagSource::Pieces(src, pieces) if !pieces.is_empty() => TagSource::Pieces(src, pieces),
            _ => TagSource::Value(table.remove("tags")),
        };
        match self.protocol(&path, table.get("protocol")) {
            Some(Protocol::OpcUa) => self.opcua_device(&path, table, tags, names, data_dir),
            Some(protocol) => self.modbus_device(&path, protocol, table, tags, names),
            None => {
                // Its tags are not checked, but a piece of them that does not parse is a
                // syntax error of the file, reported from the whole text like any other.
                if let TagSource::Pieces(src, pieces) = &tags {
                    if pieces.iter().any(|p| split::parse_tag(src, p).is_none()) {
                        self.whole_text_needed = true;
                    }
                }
                DeviceOutcome::Invalid
            }
        }
    }

    /// A device's protocol, read first: it decides which keys the device and its tags have,
    /// so a device without a known protocol is not checked further.
    fn protocol(&mut self, path: &FieldPath, value: Option<&toml::Value>) -> Option<Protocol> {
        let field = path.key("protocol");
        let use_one = Protocol::list();
        let protocol = match value {
            Some(toml::Value::String(protocol)) => protocol,
            Some(other) => {
                let message = match other.clone().try_into::<String>() {
                    Err(e) => plain_serde_message(e.message()),
                    Ok(_) => "expected a string".to_owned(),
                };
                self.report(&field, message);
                return None;
            }
            None => {
                let message = format!("missing required key `protocol`: use {use_one}");
                self.report(&field, message);
                return None;
            }
        };
        let known = Protocol::ALL.into_iter().find(|p| p.name() == protocol);
        if known.is_none() {
            self.report(
                &field,
                format!("unknown protocol `{protocol}`: use {use_one}"),
            );
        }
        known
    }

    /// The entries of a `tags` array of tables (written `header`); `missing`, when given, is
    /// the problem reported when there are none.
    pub(super) fn tag_entries<'s>(
        &mut self,
        path: &FieldPath,
        tags: TagSource<'s>,
        header: &str,
        missing: Option<&str>,
    ) -> TagEntries<'s> {
        let before = self.problems.len();
        let entries = match tags {
            TagSource::Value(Some(tags)) => {
                TagEntries::Parsed(self.entries(tags, path, header).into_iter())
            }
            TagSource::Value(None) => TagEntries::Parsed(Vec::new().into_iter()),
            TagSource::Pieces(src, pieces) => TagEntries::Pieces(src, pieces.into_iter()),
        };
        if let Some(message) = missing {
            if entries.len() == 0 && self.problems.len() == before {
                self.report(path, message);
            }
        }
        entries
    }

    /// Checks a device name and that no earlier device has it.
    pub(super) fn device_name(
        &mut self,
        path: &FieldPath,
        name: &str,
        names: &mut HashMap<String, usize>,
    ) {
        let index = path.last_index().unwrap_or(0);
        let name_path = path.key("name");
        if let Err(message) = check_device_name(name) {
            self.report(&name_path, message);
        }
        if let Some(&first) = names.get(name) {
            let first_path = FieldPath::top("devices").index(first).key("name");
            let message = match self.line_of(&first_path) {
                Some(line) => format!(
                    "duplicate device name `{name}`: devices[{first}] on line {line} has it already"
                ),
                None => format!("duplicate device name `{name}`: devices[{first}] has it already"),
            };
            self.report(&name_path, message);
        } else {
            names.insert(name.to_owned(), index);
        }
    }

    /// Checks a tag name and that no earlier tag of the device (under `tags`) has it.
    pub(super) fn tag_name(
        &mut self,
        tags: &FieldPath,
        index: usize,
        name: &str,
        names: &mut HashMap<String, usize>,
    ) {
        let name_path = tags.index(index).key("name");
        if let Err(message) = check_tag_name(name) {
            self.report(&name_path, message);
        }
        if let Some(&first) = names.get(name) {
            let first_path = tags.index(first).key("name");
            let message = format!(
                "duplicate tag name `{name}`: {} has it already",
                self.first_holder(&first_path, "tag")
            );
            self.report(&name_path, message);
        } else {
            names.insert(name.to_owned(), index);
        }
    }

    /// The timing keys every device has, checked alike whatever its protocol.
    pub(super) fn timing(
        &mut self,
        path: &FieldPath,
        raw: Timing<Option<Dur>>,
        dropped: &BTreeSet<String>,
        defaults: Timing<Duration>,
    ) -> Timing<Duration> {
        let scan_interval = self.duration(
            &path.key("scan_interval"),
            raw.scan_interval,
            defaults.scan_interval,
            MS,
            MAX_DURATION,
        );
        let timeout = self.duration(
            &path.key("timeout"),
            raw.timeout,
            defaults.timeout,
            NONZERO,
            MAX_DURATION,
        );
        let backoff_min = self.duration(
            &path.key("backoff_min"),
            raw.backoff_min,
            defaults.backoff_min,
            NONZERO,
            MAX_DURATION,
        );
        let backoff_max = self.duration(
            &path.key("backoff_max"),
            raw.backoff_max,
            defaults.backoff_max,
            NONZERO,
            MAX_DURATION,
        );
        if backoff_max < backoff_min
            && !dropped.contains("backoff_min")
            && !dropped.contains("backoff_max")
        {
            let message = format!(
                "must be at least backoff_min ({}), not {}",
                fmt_duration(backoff_min),
                fmt_duration(backoff_max)
            );
            self.report(&path.key("backoff_max"), message);
        }
        Timing {
            scan_interval,
            timeout,
            backoff_min,
            backoff_max,
        }
    }
}

/// A tag's `unit`, `description`, `min` and `max` as the file gives them (both protocols).
pub(super) struct TagMetaText {
    pub(super) unit: Option<String>,
    pub(super) description: Option<String>,
    pub(super) min: Option<f64>,
    pub(super) max: Option<f64>,
}

/// The longest `unit` accepted, in characters.
const MAX_UNIT_CHARS: usize = 32;
/// The longest `description` accepted, in characters.
const MAX_DESCRIPTION_CHARS: usize = 256;

impl Checker<'_> {
    /// Checks what describes a tag (for consumers: the meta message, Sparkplug properties):
    /// text that is neither empty nor too long nor holds control characters, a range of finite
    /// numbers with `min <= max`. A bad value is reported and left out.
    pub(super) fn tag_meta(&mut self, path: &FieldPath, raw: TagMetaText) -> TagMeta {
        let mut text = |key: &str, value: Option<String>, max_chars: usize| {
            let value = value?;
            let problem = if value.trim().is_empty() {
                Some("must not be empty (leave the key out instead)".to_owned())
            } else if value.chars().count() > max_chars {
                Some(format!("must be at most {max_chars} characters long"))
            } else if value.chars().any(char::is_control) {
                Some("must not contain control characters (line breaks, tabs)".to_owned())
            } else {
                None
            };
            match problem {
                Some(message) => {
                    self.report(&path.key(key), message);
                    None
                }
                None => Some(Arc::<str>::from(value)),
            }
        };
        let unit = text("unit", raw.unit, MAX_UNIT_CHARS);
        let description = text("description", raw.description, MAX_DESCRIPTION_CHARS);
        let mut number = |key: &str, value: Option<f64>| match value {
            Some(v) if !v.is_finite() => {
                self.report(&path.key(key), "must be a finite number");
                None
            }
            other => other,
        };
        let min = number("min", raw.min);
        let max = number("max", raw.max);
        if let (Some(lo), Some(hi)) = (min, max) {
            if lo > hi {
                self.report(
                    &path.key("max"),
                    format!("must not be below `min` ({lo}): the range is min to max"),
                );
            }
        }
        TagMeta {
            unit,
            description,
            min,
            max,
        }
    }
}
