//! The TOML configuration file: the validated runtime types, and the loader that builds them.
//!
//! # Design
//!
//! The runtime types at the top hold only checked values; the rest of the gateway codes
//! against them and never sees the file. Loading goes through three stages, and every
//! problem a stage finds is reported at once:
//!
//! 1. **Syntax.** The text is parsed with `toml_edit::ImDocument`, which keeps byte spans. A
//!    syntax error is the only problem reported: nothing else can be checked.
//! 2. **Shape.** The text is also parsed into a `toml::Table`, and each unit (`[gateway]`,
//!    `[buffer]`, `[mqtt]`, each `[[devices]]` entry without its `units` and `tags`, each
//!    `[[devices.units]]` entry without its `tags`, each `[[devices.tags]]` or
//!    `[[devices.units.tags]]` entry) is deserialized on its own into a plain
//!    `#[serde(deny_unknown_fields)]` raw struct. A small deserializer records which key
//!    failed; that key is then dropped and the unit retried, so every unknown key and every
//!    wrongly typed value of a unit is reported and the unit's other keys are still checked.
//!    A device's `protocol` is read first and picks the raw structs of the device and its
//!    tags (the Modbus protocols share theirs, `opcua` has its own) and the keys allowed:
//!    `address` for `modbus_tcp` and `modbus_rtu_over_tcp`, a serial port instead for
//!    `modbus_rtu`; a key that belongs to another protocol is reported as unknown for this
//!    one, saying whose key it is.
//! 3. **Meaning.** Each raw unit is checked and turned into its runtime type (ranges, names,
//!    addresses, durations, sizes, the broker URL); the rules that span units (unique names,
//!    overlapping registers) run as the units are collected.
//!
//! A Modbus device describes its units (slave ids) in one of two forms: `unit_id` and
//! `[[devices.tags]]` on the device for one unit, or `[[devices.units]]` entries, each with
//! its own `name`, `unit_id` and `[[devices.units.tags]]`, for several units sharing the line.
//!
//! A problem carries a field path such as `devices[0].tags[2].address` or
//! `devices[0].units[1].tags[2].address`. Its line is found by
//! walking the `toml_edit` document along that path: the key's line, or for a missing key the
//! line of its table's header.
//!
//! [`parse`] is pure. [`load`] reads the file, resolves relative paths (`data_dir`, the MQTT
//! `password_file`, and an OPC UA device's `pki_dir`, `password_file`, `user_cert_file` and
//! `user_key_file`) against the file's directory and checks that the credential files can be
//! opened; it never reads a secret. Nothing here panics, whatever the input.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use protocols::modbus::ModbusSettings;
use protocols::opcua::OpcUaSettings;

/// A validated configuration, ready to build a topology from.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[gateway]`
    pub gateway: GatewaySettings,
    /// `[buffer]`
    pub buffer: BufferSettings,
    /// `[mqtt]`
    pub mqtt: MqttSettings,
    /// `[[devices]]`, in file order; a device's index is its `DeviceId`.
    pub devices: Vec<DeviceSettings>,
}

/// `[gateway]`
#[derive(Debug, Clone, PartialEq)]
pub struct GatewaySettings {
    /// `[A-Za-z0-9_-]+`
    pub id: Arc<str>,
    /// Where the disk buffer and the gateway's state file live.
    pub data_dir: PathBuf,
}

/// What to do when the buffer reaches `max_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Evict the oldest records to make room.
    #[default]
    DropOldest,
    /// Refuse new records while full.
    DropNewest,
}

/// `[buffer]`
#[derive(Debug, Clone, PartialEq)]
pub struct BufferSettings {
    /// Hard cap on the buffer's disk use, in bytes.
    pub max_size: u64,
    /// Eviction policy when full.
    pub when_full: WhenFull,
    /// A record not acknowledged within this time is committed to disk.
    pub commit_interval: Duration,
    /// Replayed records per second at most; `None` (the default) replays as fast as the broker
    /// acknowledges, always after live records.
    pub replay_rate: Option<u32>,
}

/// Northbound payload format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON document per device scan.
    #[default]
    Json,
}

/// `[mqtt]`
#[derive(Debug, Clone, PartialEq)]
pub struct MqttSettings {
    /// Broker host name or IP address.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// MQTT client id.
    pub client_id: String,
    /// Topic prefix; records go to `{topic_prefix}/{device}`.
    pub topic_prefix: String,
    /// Payload format.
    pub format: Format,
    /// User name, if the broker wants one.
    pub username: Option<String>,
    /// File holding the password; read at start-up, never logged.
    pub password_file: Option<PathBuf>,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Publishes in flight (sent, not yet acknowledged) at most.
    pub max_inflight: u16,
    /// Largest MQTT packet the gateway sends.
    pub max_packet_size: usize,
    /// At shutdown, how long to wait for outstanding acknowledgements.
    pub shutdown_grace: Duration,
    /// Unacknowledged publishes and no PUBACK for this long (or one publish skipped this long
    /// while later ones are acknowledged) is taken as a dead link: reconnect.
    pub ack_timeout: Duration,
}

/// One `[[devices]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSettings {
    /// Device name, unique; `[A-Za-z0-9_-]+`-ish (no `/ + #` or NUL).
    pub name: Arc<str>,
    /// Scan interval of tags that set none of their own.
    pub scan_interval: Duration,
    /// The protocol and its settings.
    pub kind: DeviceKind,
}

impl DeviceSettings {
    /// Number of tags of the device (over all its units, for a Modbus line).
    pub fn tag_count(&self) -> usize {
        match &self.kind {
            DeviceKind::Modbus(m) => m.tag_count(),
            DeviceKind::OpcUa(o) => o.tags.len(),
        }
    }
}

/// The protocol of a device.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceKind {
    /// `protocol = "modbus_tcp"`, `"modbus_rtu"` or `"modbus_rtu_over_tcp"`
    Modbus(ModbusSettings),
    /// `protocol = "opcua"`
    OpcUa(OpcUaSettings),
}

// ----------------------------------------------------------------------------------------
// Loading and validation.
// ----------------------------------------------------------------------------------------

use std::collections::{BTreeSet, HashMap};
use std::fmt::{self, Write as _};
use std::net::Ipv6Addr;
use std::ops::{Range, RangeInclusive};
use std::path::Path;

use protocols::modbus::{
    Address, Area, DataType, Link, Parity, Report, SerialSettings, TagSpec, UnitSettings, WordOrder,
};
use protocols::opcua::{
    check_endpoint, check_security, parse_browse_path, parse_node_id, Identity, Mode, NodeRef,
    OpcUaTag, SecurityMode, SecurityPolicy,
};
use serde::de::{self, DeserializeOwned, IntoDeserializer};
use serde::Deserialize;
use toml_edit::{Item, TableLike};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
/// The longest duration the file may set (7 days); keeps the runtime's time arithmetic safe.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The smallest duration that is not zero.
const NONZERO: Duration = Duration::from_nanos(1);
const MS: Duration = Duration::from_millis(1);
const DEFAULT_MQTT_PORT: u16 = 1883;
/// The sections of the file, in the order they are documented.
const SECTIONS: &[&str] = &["gateway", "buffer", "mqtt", "devices"];
/// The keys of a Modbus device that hold arrays of tables, checked apart from the device.
const MODBUS_ARRAYS: &[&str] = &["units", "tags"];
/// The keys of an OPC UA device that hold arrays of tables.
const OPCUA_ARRAYS: &[&str] = &["tags"];
/// The keys of a [`RawModbusDevice`] that only a `modbus_rtu` device has.
const SERIAL_KEYS: &[&str] = &["port", "baud_rate", "parity", "data_bits", "stop_bits"];
/// Serial line speeds the gateway accepts, in bits per second.
const BAUD_RATES: RangeInclusive<i64> = 50..=4_000_000;
/// The longest pause between two Modbus transactions on a line.
const MAX_INTER_REQUEST_DELAY: Duration = Duration::from_secs(10);
/// Largest server-side queue of an OPC UA monitored item.
const MAX_QUEUE_SIZE: i64 = 10_000;

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigErrors {
    /// The file, as given to [`load`] or [`parse`].
    pub file: String,
    /// The problems, ordered by line (problems without a line first).
    pub problems: Vec<Problem>,
}

impl ConfigErrors {
    /// One line per problem: `{file}:{line}: {field}: {message}`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let separator = if problem.line.is_some() { ":" } else { ": " };
            let _ = write!(out, "{}{separator}{problem}", self.file);
        }
        out
    }

    fn whole_file(file: &str, line: Option<usize>, message: String) -> Self {
        ConfigErrors {
            file: file.to_owned(),
            problems: vec![Problem {
                line,
                field: String::new(),
                message,
            }],
        }
    }
}

/// One problem: where and what.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// 1-based line in the file, if known.
    pub line: Option<usize>,
    /// Field path such as `devices[0].tags[2].address`; empty when about the whole file.
    pub field: String,
    /// What is wrong, and how to fix it when that is not obvious.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "{line}: ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// Reads and validates the config file at `path`, resolving relative paths against its directory.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors::whole_file(&file, None, format!("cannot read the file: {e}")))?;
    let dir = path.parent().unwrap_or_else(|| Path::new(""));
    let config = check(&src, &file, Some(dir))?;
    tracing::debug!(
        file = %file,
        devices = config.devices.len(),
        "configuration loaded"
    );
    Ok(config)
}

/// Parses and validates config text; `file` names it in problems. Touches no file.
pub fn parse(src: &str, file: &str) -> Result<Config, ConfigErrors> {
    check(src, file, None)
}

/// Both entry points: `dir` is the config file's directory when loading from disk.
fn check(src: &str, file: &str, dir: Option<&Path>) -> Result<Config, ConfigErrors> {
    // toml_edit's document (kept only for the line numbers of problems) is parsed when a
    // problem needs it: holding it next to the table doubled the parse's memory.
    let root: toml::Table = match toml::from_str(src) {
        Ok(root) => root,
        Err(e) => {
            toml_edit::ImDocument::parse(src)
                .map_err(|e| syntax_error(src, file, e.message(), e.span()))?;
            return Err(syntax_error(src, file, e.message(), e.span()));
        }
    };
    let mut checker = Checker {
        line_starts: std::iter::once(0)
            .chain(src.match_indices('\n').map(|(i, _)| i + 1))
            .collect(),
        src,
        doc: std::cell::OnceCell::new(),
        dir,
        problems: Vec::new(),
    };
    let config = checker.config(root);
    let mut problems = checker.problems;
    match config {
        Some(config) if problems.is_empty() => Ok(config),
        _ => {
            if problems.is_empty() {
                problems.push(Problem {
                    line: None,
                    field: String::new(),
                    message: "the configuration is incomplete".to_owned(),
                });
            }
            problems.sort_by_key(|p| p.line);
            Err(ConfigErrors {
                file: file.to_owned(),
                problems,
            })
        }
    }
}

fn syntax_error(src: &str, file: &str, message: &str, span: Option<Range<usize>>) -> ConfigErrors {
    let message = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let line = span.map(|s| line_at(src, s.start));
    ConfigErrors::whole_file(file, line, format!("TOML syntax error: {message}"))
}

/// The 1-based line holding byte `offset` of `src`.
fn line_at(src: &str, offset: usize) -> usize {
    src.as_bytes()
        .iter()
        .take(offset)
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

// ---- Field paths and their lines ----------------------------------------------------------

/// Where a value lives in the document, e.g. `devices[0].tags[2].address`.
#[derive(Debug, Clone)]
struct FieldPath(Vec<Segment>);

#[derive(Debug, Clone)]
enum Segment {
    Key(String),
    Index(usize),
}

impl FieldPath {
    fn top(key: &str) -> Self {
        FieldPath(vec![Segment::Key(key.to_owned())])
    }

    fn key(&self, key: &str) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Key(key.to_owned()));
        path
    }

    fn index(&self, index: usize) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Index(index));
        path
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// A position while walking the `toml_edit` document.
#[derive(Clone, Copy)]
enum Node<'d> {
    Table(&'d toml_edit::Table),
    Item(&'d Item),
    Value(&'d toml_edit::Value),
}

impl<'d> Node<'d> {
    fn table_like(self) -> Option<&'d dyn TableLike> {
        match self {
            Node::Table(table) => Some(table),
            Node::Item(item) => item.as_table_like(),
            Node::Value(value) => value.as_inline_table().map(|t| t as &dyn TableLike),
        }
    }

    /// Entry `index` of an array (of tables), with its span.
    fn element(self, index: usize) -> Option<(Option<Range<usize>>, Node<'d>)> {
        let array = match self {
            Node::Item(Item::ArrayOfTables(tables)) => {
                let table = tables.get(index)?;
                return Some((table.span(), Node::Table(table)));
            }
            Node::Item(Item::Value(toml_edit::Value::Array(array)))
            | Node::Value(toml_edit::Value::Array(array)) => array,
            _ => return None,
        };
        let value = array.get(index)?;
        Some((value.span(), Node::Value(value)))
    }
}

// ---- Deserializing one unit, collecting every key that fails ------------------------------

/// Why a unit did not deserialize; the derived `Deserialize` impls build these through the
/// `de::Error` hooks, so the failing key is known without parsing messages.
#[derive(Debug, thiserror::Error)]
enum UnitError {
    #[error("unknown key `{key}`")]
    UnknownKey {
        key: String,
        expected: &'static [&'static str],
    },
    #[error("missing key `{0}`")]
    MissingKey(&'static str),
    #[error("{message}")]
    BadValue { key: String, message: String },
    #[error("{0}")]
    Other(String),
}

impl de::Error for UnitError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        UnitError::Other(msg.to_string())
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        UnitError::UnknownKey {
            key: field.to_owned(),
            expected,
        }
    }

    fn missing_field(field: &'static str) -> Self {
        UnitError::MissingKey(field)
    }
}

/// Deserializes a struct from a table, naming the key whose value failed. When the keys of
/// the unit are given, any other key is unknown, even one the struct has.
struct UnitDeserializer<'k>(toml::Table, Option<&'k [&'static str]>);

impl<'de> de::Deserializer<'de> for UnitDeserializer<'_> {
    type Error = UnitError;

    fn deserialize_any<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, UnitError> {
        visitor.visit_map(UnitMap {
            entries: self.0.into_iter(),
            known: self.1,
            pending: None,
        })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

struct UnitMap<'k> {
    entries: <toml::Table as IntoIterator>::IntoIter,
    known: Option<&'k [&'static str]>,
    pending: Option<(String, toml::Value)>,
}

impl<'de> de::MapAccess<'de> for UnitMap<'_> {
    type Error = UnitError;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, UnitError> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        if self
            .known
            .is_some_and(|known| !known.iter().any(|k| *k == key))
        {
            return Err(UnitError::UnknownKey { key, expected: &[] });
        }
        let deserializer: de::value::StrDeserializer<'_, UnitError> =
            key.as_str().into_deserializer();
        let parsed = seed.deserialize(deserializer)?;
        self.pending = Some((key, value));
        Ok(Some(parsed))
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, UnitError> {
        let Some((key, value)) = self.pending.take() else {
            return Err(UnitError::Other("a value without a key".to_owned()));
        };
        seed.deserialize(value).map_err(|e| UnitError::BadValue {
            key,
            message: plain_serde_message(e.message()),
        })
    }
}

/// Serde's messages, in the words of a config file.
fn plain_serde_message(message: &str) -> String {
    message
        .replace("unknown variant", "unknown value")
        .replace("expected i64", "expected an integer")
        .replace("expected f64", "expected a number")
        .replace("invalid type: map", "invalid type: table")
        .replace("invalid type: sequence", "invalid type: array")
}

/// An unknown key of a device or tag unit; a key of other protocols is named as such, with
/// the keys of this one (a near name would be no typo: the key is in the wrong device).
fn unknown_device_key_message(key: &str, known: &[&str], foreign: &Foreign) -> String {
    let owners = foreign.owners(key);
    let Some((last, first)) = owners.split_last() else {
        return unknown_key_message("key", key, known);
    };
    let owners = match first {
        [] => format!("protocol `{last}`"),
        _ => format!("protocols `{}` and `{last}`", first.join("`, `")),
    };
    format!(
        "unknown key `{key}` for protocol `{}` (it belongs to {owners}); expected one of: {}",
        foreign.protocol,
        known.join(", ")
    )
}

/// `a, b or c`.
fn one_of(words: &[&str]) -> String {
    match words.split_last() {
        Some((last, first)) if !first.is_empty() => format!("{} or {last}", first.join(", ")),
        Some((last, _)) => (*last).to_owned(),
        None => String::new(),
    }
}

fn unknown_key_message(what: &str, key: &str, known: &[&str]) -> String {
    format!("unknown {what} `{key}`; {}", suggestion(key, known))
}

/// `did you mean `x`?` for a likely typo, else the list of known names.
fn suggestion(key: &str, known: &[&str]) -> String {
    match closest(key, known) {
        Some(near) => format!("did you mean `{near}`?"),
        None => format!("expected one of: {}", known.join(", ")),
    }
}

/// The known name nearest to a misspelt one, if it is near enough to be a likely typo: two
/// edits away at most, or the start of a known name (`password` for `password_file`).
fn closest<'k>(word: &str, known: &[&'k str]) -> Option<&'k str> {
    let word = word.to_ascii_lowercase();
    let typo = known
        .iter()
        .map(|k| (edit_distance(&word, k), *k))
        .filter(|&(d, k)| d <= 2 && d < k.len())
        .min_by_key(|&(d, _)| d)
        .map(|(_, k)| k);
    typo.or_else(|| {
        known
            .iter()
            .find(|k| word.len() >= 4 && k.starts_with(word.as_str()))
            .copied()
    })
}

fn edit_distance(a: &str, b: &str) -> usize {
    const LONGEST: usize = 64;
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    if a.len() > LONGEST || b.len() > LONGEST {
        return usize::MAX;
    }
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

// ---- Raw (file) types ----------------------------------------------------------------------

/// A duration written as a string with a unit, e.g. `"250ms"`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurVisitor;
        impl de::Visitor<'_> for DurVisitor {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"250ms\"")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Dur, E> {
                parse_duration(text).map(Dur).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Dur, E> {
                Err(E::custom(BARE_DURATION))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Dur, E> {
                Err(E::custom(BARE_DURATION))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Dur, E> {
                Err(E::custom(BARE_DURATION))
            }
        }
        deserializer.deserialize_any(DurVisitor)
    }
}

const BARE_DURATION: &str = "durations are strings with a unit, e.g. \"250ms\"";

/// A size in bytes, written `"512MiB"`, `"100MB"`, `"1000"` or as a bare number of bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Size(u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl de::Visitor<'_> for SizeVisitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size string such as \"512MiB\"")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Size, E> {
                parse_size(text).map(Size).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<Size, E> {
                u64::try_from(bytes)
                    .map(Size)
                    .map_err(|_| E::custom("a size must not be negative"))
            }
            fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<Size, E> {
                Ok(Size(bytes))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Size, E> {
                Err(E::custom(
                    "sizes are whole numbers with a unit, e.g. \"512MiB\"",
                ))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    id: String,
    data_dir: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuffer {
    max_size: Option<Size>,
    when_full: Option<WhenFull>,
    commit_interval: Option<Dur>,
    replay_rate: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    url: String,
    client_id: Option<String>,
    topic_prefix: Option<String>,
    format: Option<Format>,
    username: Option<String>,
    password_file: Option<String>,
    keep_alive: Option<Dur>,
    max_inflight: Option<i64>,
    max_packet_size: Option<Size>,
    shutdown_grace: Option<Dur>,
    ack_timeout: Option<Dur>,
}

/// A `protocol = "modbus_tcp"`, `"modbus_rtu"` or `"modbus_rtu_over_tcp"` `[[devices]]`
/// entry without its `units` and `tags`, which are checked one by one. The protocol allows
/// either `address` or `port` and the serial keys ([`Protocol::device_keys`]), and requires
/// `address` or `port` ([`Checker::modbus_settings`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModbusDevice {
    name: String,
    /// Read and checked before the unit is deserialized; listed so that it is a known key.
    #[allow(dead_code)]
    protocol: de::IgnoredAny,
    address: Option<String>,
    port: Option<String>,
    baud_rate: Option<i64>,
    parity: Option<String>,
    data_bits: Option<i64>,
    stop_bits: Option<i64>,
    unit_id: Option<i64>,
    inter_request_delay: Option<Dur>,
    scan_interval: Option<Dur>,
    timeout: Option<Dur>,
    max_registers_per_read: Option<i64>,
    max_gap: Option<i64>,
    report: Option<Report>,
    max_silence: Option<Dur>,
    backoff_min: Option<Dur>,
    backoff_max: Option<Dur>,
    enabled: Option<bool>,
}

/// A `[[devices.units]]` entry of a Modbus device, without its `tags`. Its keys are required,
/// but optional here so that a unit missing both is reported once for each.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnit {
    name: Option<String>,
    unit_id: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTag {
    name: String,
    address: String,
    #[serde(rename = "type")]
    data_type: Option<String>,
    length: Option<i64>,
    order: Option<String>,
    scale: Option<f64>,
    offset: Option<f64>,
    deadband: Option<f64>,
    /// Engineering unit: accepted and kept for later; nothing uses it yet.
    #[allow(dead_code)]
    unit: Option<String>,
    scan_interval: Option<Dur>,
}

/// A `protocol = "opcua"` `[[devices]]` entry without its `tags`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOpcUaDevice {
    name: String,
    /// Read and checked before the unit is deserialized; listed so that it is a known key.
    #[allow(dead_code)]
    protocol: de::IgnoredAny,
    endpoint: String,
    security_policy: Option<String>,
    security_mode: Option<String>,
    username: Option<String>,
    password_file: Option<String>,
    user_cert_file: Option<String>,
    user_key_file: Option<String>,
    pki_dir: Option<String>,
    trust_server_cert: Option<bool>,
    publishing_interval: Option<Dur>,
    mode: Option<RawMode>,
    scan_interval: Option<Dur>,
    timeout: Option<Dur>,
    backoff_min: Option<Dur>,
    backoff_max: Option<Dur>,
    enabled: Option<bool>,
}

/// `mode` of an OPC UA device.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawMode {
    Subscribe,
    Poll,
}

/// A `[[devices.tags]]` entry of an OPC UA device.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOpcUaTag {
    name: String,
    node_id: Option<String>,
    browse_path: Option<String>,
    sampling_interval: Option<Dur>,
    deadband: Option<f64>,
    queue_size: Option<i64>,
}

/// The keys of a raw struct, as its derived `Deserialize` knows them: asked for by
/// deserializing a table whose only key no struct has.
fn keys_of<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut probe = toml::Table::new();
    probe.insert("\0".to_owned(), toml::Value::Boolean(true));
    match T::deserialize(UnitDeserializer(probe, None)) {
        Err(UnitError::UnknownKey { expected, .. }) => expected,
        _ => &[],
    }
}

/// A device's or tag's protocol and the other protocols' keys for the same kind of unit, so
/// that a key of another protocol is reported as unknown for this one, saying whose it is.
struct Foreign {
    /// The protocol of the device the unit belongs to.
    protocol: &'static str,
    /// The keys of the unit for this protocol: any other key is unknown.
    own: Vec<&'static str>,
    /// Each other protocol with its keys (from [`keys_of`]), in the order of [`Protocol::ALL`].
    others: Vec<(&'static str, Vec<&'static str>)>,
}

impl Foreign {
    /// The other protocols' keys of one kind of unit, `keys` giving a protocol's.
    fn new(protocol: Protocol, keys: fn(Protocol) -> Vec<&'static str>) -> Self {
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
}

// ---- Durations and sizes -------------------------------------------------------------------

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not a number followed by a unit.
    #[error("`{0}` is not a duration: write a number and a unit, e.g. \"250ms\" or \"1.5s\"")]
    Syntax(String),
    /// A bare number.
    #[error("`{0}` has no unit: durations are strings with a unit, e.g. \"250ms\"")]
    NoUnit(String),
    /// A unit that is not us, ms, s, m or h.
    #[error("`{text}` has an unknown unit `{unit}`: use us, ms, s, m or h")]
    Unit {
        /// The whole text.
        text: String,
        /// The unit found.
        unit: String,
    },
    /// Longer than 7 days.
    #[error("`{0}` is too long: durations are at most 168h (7 days)")]
    TooLong(String),
}

/// Parses `"250ms"`, `"1.5s"`, `"2m"`, `"1h"`, `"500us"`.
/// Parses a duration such as `250ms`, `1.5s`, `2m`.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let unit = unit.trim_start();
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || (number.contains('.') && fraction.is_empty()) || fraction.contains('.') {
        return Err(DurationError::Syntax(text.to_owned()));
    }
    let unit_nanos: u128 = match unit {
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" | "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "" => return Err(DurationError::NoUnit(text.to_owned())),
        _ if unit.starts_with(|c: char| c.is_ascii_digit() || c == '.' || c == '-') => {
            return Err(DurationError::Syntax(text.to_owned()))
        }
        _ => {
            return Err(DurationError::Unit {
                text: text.to_owned(),
                unit: unit.to_owned(),
            })
        }
    };
    let too_long = || DurationError::TooLong(text.to_owned());
    if whole.len() > 30 {
        return Err(too_long());
    }
    let whole: u128 = whole.parse().map_err(|_| too_long())?;
    // Nanosecond precision is plenty: digits past the 18th are dropped.
    let fraction = &fraction[..fraction.len().min(18)];
    let fraction_nanos = if fraction.is_empty() {
        0
    } else {
        let digits: u128 = fraction
            .parse()
            .map_err(|_| DurationError::Syntax(text.to_owned()))?;
        let scale = 10u128.pow(u32::try_from(fraction.len()).unwrap_or(18));
        digits * unit_nanos / scale
    };
    let nanos = whole
        .checked_mul(unit_nanos)
        .and_then(|n| n.checked_add(fraction_nanos))
        .ok_or_else(too_long)?;
    if nanos > MAX_DURATION.as_nanos() {
        return Err(too_long());
    }
    u64::try_from(nanos)
        .map(Duration::from_nanos)
        .map_err(|_| too_long())
}

/// A duration the way the file writes it: `250ms`, `1s`, `2m`.
fn fmt_duration(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    for (unit, name) in [
        (3_600_000_000_000u128, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
    ] {
        if nanos % unit == 0 {
            return format!("{}{name}", nanos / unit);
        }
    }
    format!("{nanos}ns")
}

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum SizeError {
    #[error(
        "`{0}` is not a size: write a whole number and a unit (B, KB, MB, GB, KiB, MiB or \
         GiB), e.g. \"512MiB\""
    )]
    Syntax(String),
    #[error("`{text}` has an unknown unit `{unit}`: use B, KB, MB, GB, KiB, MiB or GiB")]
    Unit { text: String, unit: String },
    #[error("`{0}` is too large")]
    TooLarge(String),
}

/// Parses `"512MiB"`, `"1GiB"`, `"100MB"`, `"64KiB"`, `"1000"`: binary KiB/MiB/GiB, decimal
/// KB/MB/GB, plain bytes with `B` or no unit.
fn parse_size(text: &str) -> Result<u64, SizeError> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let unit = unit.trim_start();
    if number.is_empty() || unit.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        return Err(SizeError::Syntax(text.to_owned()));
    }
    let multiplier = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => KIB,
        "mib" => MIB,
        "gib" => GIB,
        _ => {
            return Err(SizeError::Unit {
                text: text.to_owned(),
                unit: unit.to_owned(),
            })
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| SizeError::TooLarge(text.to_owned()))
}

/// A size the way the file writes it: `1GiB`, `100MB`, `1000B`.
fn fmt_size(bytes: u64) -> String {
    for (unit, name) in [
        (GIB, "GiB"),
        (MIB, "MiB"),
        (KIB, "KiB"),
        (1_000_000_000, "GB"),
        (1_000_000, "MB"),
        (1_000, "KB"),
    ] {
        if bytes >= unit && bytes % unit == 0 {
            return format!("{}{name}", bytes / unit);
        }
    }
    format!("{bytes}B")
}

// ---- Addresses and URLs --------------------------------------------------------------------

/// Why a `HOST:PORT` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum HostPortError {
    #[error("no host: write HOST:PORT, e.g. \"192.168.1.10:502\"")]
    NoHost,
    #[error("`{0}` is not a valid host name or IP address (IPv6 goes in brackets: [::1]:502)")]
    Host(String),
    #[error("`{0}` has no port: write HOST:PORT, e.g. \"192.168.1.10:502\"")]
    NoPort(String),
    #[error("`{0}` is not a port number between 1 and 65535")]
    Port(String),
    #[error("write HOST:PORT without a scheme, e.g. \"192.168.1.10:502\"")]
    Scheme,
}

/// Splits `host:port` or `[v6]:port`; the port may be left out when there is a default.
fn split_host_port(text: &str, default_port: Option<u16>) -> Result<(String, u16), HostPortError> {
    if text.contains("://") {
        return Err(HostPortError::Scheme);
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| HostPortError::Host(text.to_owned()))?;
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(HostPortError::Host(format!("[{host}]")));
        }
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| HostPortError::Host(text.to_owned()))?,
            ),
        };
        (host, port)
    } else {
        let (host, port) = match text.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        };
        if host.is_empty() {
            return Err(HostPortError::NoHost);
        }
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
        if !host.chars().all(valid) || port.is_some_and(|p| p.contains(':')) {
            return Err(HostPortError::Host(host.to_owned()));
        }
        (host, port)
    };
    let port = match port {
        None => default_port.ok_or_else(|| HostPortError::NoPort(text.to_owned()))?,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| HostPortError::Port(port.to_owned()))?,
    };
    Ok((host.to_owned(), port))
}

/// Why the broker URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum UrlError {
    #[error("expected `mqtt://HOST[:PORT]`, e.g. \"mqtt://10.0.0.5:1883\"")]
    Form,
    #[error("TLS is not supported yet: use mqtt:// or tcp://")]
    Tls,
    #[error("unsupported scheme `{0}://`: use mqtt:// or tcp://")]
    Scheme(String),
    #[error("credentials do not belong in the url: use `username` and `password_file`")]
    Credentials,
    #[error("the url must be `mqtt://HOST[:PORT]`, without a path, query or fragment")]
    Path,
    #[error("{0}")]
    HostPort(#[from] HostPortError),
}

/// Splits `mqtt://host[:port]` (or `tcp://`) into host and port, port 1883 by default.
fn parse_mqtt_url(url: &str) -> Result<(String, u16), UrlError> {
    let (scheme, rest) = url.split_once("://").ok_or(UrlError::Form)?;
    match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => {}
        "mqtts" | "ssl" | "tls" | "wss" => return Err(UrlError::Tls),
        _ => return Err(UrlError::Scheme(scheme.to_owned())),
    }
    if rest.contains('@') {
        return Err(UrlError::Credentials);
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err(UrlError::Path);
    }
    Ok(split_host_port(authority, Some(DEFAULT_MQTT_PORT))?)
}

fn parse_data_type(text: &str) -> Option<DataType> {
    Some(match text.to_ascii_lowercase().as_str() {
        "bool" => DataType::Bool,
        "i16" => DataType::I16,
        "u16" => DataType::U16,
        "i32" => DataType::I32,
        "u32" => DataType::U32,
        "i64" => DataType::I64,
        "u64" => DataType::U64,
        "f32" => DataType::F32,
        "f64" => DataType::F64,
        "string" => DataType::String,
        _ => return None,
    })
}

/// `none`, `even` or `odd`, in any case.
fn parse_parity(text: &str) -> Option<Parity> {
    match text.to_ascii_lowercase().as_str() {
        "none" => Some(Parity::None),
        "even" => Some(Parity::Even),
        "odd" => Some(Parity::Odd),
        _ => None,
    }
}

fn parse_order(text: &str) -> Option<WordOrder> {
    WordOrder::ALL
        .into_iter()
        .find(|order| format!("{order:?}").eq_ignore_ascii_case(text))
}

fn area_name(area: Area) -> &'static str {
    match area {
        Area::Coil => "a coil (co:)",
        Area::DiscreteInput => "a discrete input (di:)",
        Area::HoldingRegister => "a holding register (hr:)",
        Area::InputRegister => "an input register (ir:)",
    }
}

/// `hr:1..hr:2`, or `hr:1` for one register.
fn fmt_range(address: Address, width: u16) -> String {
    let last = u32::from(address.offset) + u32::from(width.max(1)) - 1;
    if width <= 1 {
        address.to_string()
    } else {
        format!("{address}..{}:{last}", address.area.prefix())
    }
}

// ---- Names ---------------------------------------------------------------------------------

fn check_gateway_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".to_owned());
    }
    match id
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
    {
        Some(c) => Err(format!(
            "{c:?} is not allowed: use letters A-Z a-z, digits, `_` and `-`"
        )),
        None => Ok(()),
    }
}

fn check_device_name(name: &str) -> Result<(), String> {
    let count = name.chars().count();
    if !(1..=64).contains(&count) {
        return Err(format!("must be 1 to 64 characters long, not {count}"));
    }
    match name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        Some(c) => Err(format!(
            "{c:?} is not allowed: use letters A-Z a-z, digits, `_`, `.` and `-`"
        )),
        None => Ok(()),
    }
}

fn check_tag_name(name: &str) -> Result<(), String> {
    let count = name.chars().count();
    if !(1..=128).contains(&count) {
        return Err(format!("must be 1 to 128 characters long, not {count}"));
    }
    if let Some(c) = name.chars().find(|c| matches!(c, '/' | '+' | '#' | '\0')) {
        return Err(format!(
            "{c:?} is not allowed in a tag name (`/`, `+`, `#` and NUL are reserved by MQTT)"
        ));
    }
    if name.starts_with(char::is_whitespace) || name.ends_with(char::is_whitespace) {
        return Err("must not start or end with a space".to_owned());
    }
    Ok(())
}

fn check_topic_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if prefix.contains(['+', '#']) {
        return Err("must not contain the MQTT wildcards `+` or `#`".to_owned());
    }
    if prefix.contains('\0') {
        return Err("must not contain NUL".to_owned());
    }
    if prefix.starts_with('/') || prefix.ends_with('/') {
        return Err("must not start or end with `/`".to_owned());
    }
    Ok(())
}

fn check_client_id(client_id: &str) -> Result<(), String> {
    if client_id.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if client_id.len() > usize::from(u16::MAX) {
        return Err("is longer than MQTT allows (65535 bytes)".to_owned());
    }
    if client_id.chars().any(char::is_control) {
        return Err("must not contain control characters".to_owned());
    }
    Ok(())
}

/// Checks that a credential file (password, certificate, key) exists and can be opened;
/// never reads it.
fn check_readable(path: &Path) -> Result<(), String> {
    let cannot = |e: std::io::Error| format!("cannot read `{}`: {e}", path.display());
    let metadata = std::fs::metadata(path).map_err(cannot)?;
    if !metadata.is_file() {
        return Err(format!("`{}` is not a regular file", path.display()));
    }
    std::fs::File::open(path).map(drop).map_err(cannot)
}

// ---- The checker ---------------------------------------------------------------------------

/// Walks the units of one document and collects problems.
struct Checker<'a> {
    /// Byte offset of the start of each line.
    line_starts: Vec<usize>,
    src: &'a str,
    /// The document with spans, parsed on the first problem.
    doc: std::cell::OnceCell<Option<toml_edit::ImDocument<&'a str>>>,
    /// The config file's directory, when loading from disk: relative paths are resolved
    /// against it and the credential files are checked.
    dir: Option<&'a Path>,
    problems: Vec<Problem>,
}

/// What a device lends its tags: defaults and limits.
struct TagDefaults {
    scan_interval: Duration,
    max_registers_per_read: u16,
}

/// A tag placed in a device's register map, for the overlap check.
struct Placed {
    name: Arc<str>,
    address: Address,
    width: u16,
}

enum DeviceOutcome {
    /// Boxed: an OPC UA device's settings are large, the other outcomes empty.
    Enabled(Box<DeviceSettings>),
    Disabled,
    Invalid,
}

/// The protocols a device can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    ModbusTcp,
    ModbusRtu,
    ModbusRtuOverTcp,
    OpcUa,
}

impl Protocol {
    /// Every protocol, in the order they are listed to the user.
    const ALL: [Protocol; 4] = [
        Protocol::ModbusTcp,
        Protocol::ModbusRtu,
        Protocol::ModbusRtuOverTcp,
        Protocol::OpcUa,
    ];

    /// The value of `protocol`.
    fn name(self) -> &'static str {
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
    fn device_keys(self) -> Vec<&'static str> {
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
    fn tag_keys(self) -> Vec<&'static str> {
        match self {
            Protocol::OpcUa => keys_of::<RawOpcUaTag>().to_vec(),
            _ => keys_of::<RawTag>().to_vec(),
        }
    }

    /// The unit ids a Modbus device of this protocol can address. On a serial line 0 is the
    /// broadcast address, which no unit answers, and 248 to 255 are reserved; a Modbus TCP
    /// device takes any byte (many ignore it; a gateway routes by it).
    fn unit_ids(self) -> RangeInclusive<i64> {
        match self {
            Protocol::ModbusTcp => 0..=255,
            _ => 1..=247,
        }
    }
}

/// The timing keys every device has.
struct Timing<T> {
    scan_interval: T,
    timeout: T,
    backoff_min: T,
    backoff_max: T,
}

/// What every device has besides its protocol's settings.
struct Common {
    name: Arc<str>,
    scan_interval: Duration,
    enabled: bool,
}

impl Common {
    fn outcome(self, kind: DeviceKind) -> DeviceOutcome {
        if self.enabled {
            DeviceOutcome::Enabled(Box::new(DeviceSettings {
                name: self.name,
                scan_interval: self.scan_interval,
                kind,
            }))
        } else {
            DeviceOutcome::Disabled
        }
    }
}

impl Checker<'_> {
    fn report(&mut self, path: &FieldPath, message: impl Into<String>) {
        let line = self.line_of(path);
        self.problems.push(Problem {
            line,
            field: path.to_string(),
            message: message.into(),
        });
    }

    fn line_of(&self, path: &FieldPath) -> Option<usize> {
        let span = self.span_of(path)?;
        Some(
            self.line_starts
                .partition_point(|&start| start <= span.start),
        )
    }

    /// The span of the deepest part of `path` found in the document: the key itself, or the
    /// header of the table that should hold it.
    fn span_of(&self, path: &FieldPath) -> Option<Range<usize>> {
        let doc = self
            .doc
            .get_or_init(|| toml_edit::ImDocument::parse(self.src).ok())
            .as_ref()?;
        let mut node = Node::Table(doc.as_table());
        let mut found = None;
        for segment in &path.0 {
            let next = match segment {
                Segment::Key(key) => node
                    .table_like()
                    .and_then(|table| table.get_key_value(key))
                    .map(|(key, item)| (key.span().or_else(|| item.span()), Node::Item(item))),
                Segment::Index(index) => node.element(*index),
            };
            let Some((span, next)) = next else { break };
            if span.is_some() {
                found = span;
            }
            node = next;
        }
        found
    }

    /// Deserializes one unit; every unknown key and bad value is reported, and the unit is
    /// retried without it so that all of them are found. Also returns the keys dropped for a
    /// bad value, whose defaults must not be checked against other keys. A device's or tag's
    /// unit has the keys of its protocol, and names the other protocol when an unknown key is
    /// one of its keys (`foreign`); another unit has the keys of `T` and `extra_keys`.
    fn unit<T: DeserializeOwned>(
        &mut self,
        mut table: toml::Table,
        path: &FieldPath,
        extra_keys: &[&str],
        foreign: Option<&Foreign>,
    ) -> Option<(T, BTreeSet<String>)> {
        let mut dropped = BTreeSet::new();
        for _ in 0..=table.len() {
            let own = foreign.map(|foreign| &foreign.own[..]);
            match T::deserialize(UnitDeserializer(table.clone(), own)) {
                Ok(raw) => return Some((raw, dropped)),
                Err(UnitError::UnknownKey { key, expected }) => {
                    let message = match foreign {
                        Some(foreign) => unknown_device_key_message(&key, &foreign.own, foreign),
                        None => {
                            let known: Vec<&str> =
                                expected.iter().chain(extra_keys).copied().collect();
                            unknown_key_message("key", &key, &known)
                        }
                    };
                    self.report(&path.key(&key), message);
                    table.remove(&key)?;
                }
                Err(UnitError::BadValue { key, message }) => {
                    self.report(&path.key(&key), message);
                    table.remove(&key)?;
                    dropped.insert(key);
                }
                Err(UnitError::MissingKey(key)) => {
                    self.missing(path, key, &dropped);
                    return None;
                }
                Err(UnitError::Other(message)) => {
                    self.report(path, plain_serde_message(&message));
                    return None;
                }
            }
        }
        None
    }

    /// Reports a missing required key of the unit at `path`, unless it was dropped for a bad
    /// value (already reported).
    fn missing(&mut self, path: &FieldPath, key: &str, dropped: &BTreeSet<String>) {
        if !dropped.contains(key) {
            self.report(&path.key(key), format!("missing required key `{key}`"));
        }
    }

    /// A section's table; a missing optional section is an empty one.
    fn section(
        &mut self,
        value: Option<toml::Value>,
        path: &FieldPath,
        required: bool,
    ) -> Option<toml::Table> {
        match value {
            Some(toml::Value::Table(table)) => Some(table),
            Some(other) => {
                let message = format!("expected a [{path}] section, found {}", other.type_str());
                self.report(path, message);
                None
            }
            None if required => {
                self.report(path, format!("missing section [{path}]"));
                None
            }
            None => Some(toml::Table::new()),
        }
    }

    /// An entry of an array of tables.
    fn entry(&mut self, value: toml::Value, path: &FieldPath, what: &str) -> Option<toml::Table> {
        match value {
            toml::Value::Table(table) => Some(table),
            other => {
                let message = format!("expected a {what} table, found {}", other.type_str());
                self.report(path, message);
                None
            }
        }
    }

    /// The entries of an array of tables; a single table is reported.
    fn entries(&mut self, value: toml::Value, path: &FieldPath, header: &str) -> Vec<toml::Value> {
        match value {
            toml::Value::Array(entries) => entries,
            toml::Value::Table(_) => {
                let message = format!(
                    "write {header} with double brackets: each entry is one table of an array"
                );
                self.report(path, message);
                Vec::new()
            }
            other => {
                let message = format!("expected {header} entries, found {}", other.type_str());
                self.report(path, message);
                Vec::new()
            }
        }
    }

    fn duration(
        &mut self,
        path: &FieldPath,
        raw: Option<Dur>,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Duration {
        let Some(Dur(value)) = raw else {
            return default;
        };
        if value < min || value > max {
            let message = if value.is_zero() && min <= NONZERO {
                "must not be zero".to_owned()
            } else if value.is_zero() {
                format!("must not be zero (at least {})", fmt_duration(min))
            } else if max >= MAX_DURATION {
                format!(
                    "must be at least {}, not {}",
                    fmt_duration(min),
                    fmt_duration(value)
                )
            } else {
                format!(
                    "must be between {} and {}, not {}",
                    fmt_duration(min),
                    fmt_duration(max),
                    fmt_duration(value)
                )
            };
            self.report(path, message);
        }
        value
    }

    fn integer<T: TryFrom<i64> + Copy>(
        &mut self,
        path: &FieldPath,
        raw: Option<i64>,
        default: T,
        min: i64,
        max: i64,
    ) -> T {
        let Some(value) = raw else {
            return default;
        };
        if !(min..=max).contains(&value) {
            self.report(
                path,
                format!("must be between {min} and {max}, not {value}"),
            );
            return default;
        }
        T::try_from(value).unwrap_or(default)
    }

    /// A path from the file; resolved against the file's directory when loading.
    fn path(&mut self, path: &FieldPath, text: &str) -> PathBuf {
        if text.is_empty() {
            self.report(path, "must not be empty");
        } else if text.contains('\0') {
            self.report(path, "must not contain NUL");
        }
        let value = PathBuf::from(text);
        match self.dir {
            Some(dir) if value.is_relative() => dir.join(&value).components().collect(),
            _ => value,
        }
    }

    fn config(&mut self, root: toml::Table) -> Option<Config> {
        let (mut gateway, mut buffer, mut mqtt, mut devices) = (None, None, None, None);
        for (key, value) in root {
            match key.as_str() {
                "gateway" => gateway = Some(value),
                "buffer" => buffer = Some(value),
                "mqtt" => mqtt = Some(value),
                "devices" => devices = Some(value),
                _ => {
                    let message = unknown_key_message("section", &key, SECTIONS);
                    self.report(&FieldPath::top(&key), message);
                }
            }
        }
        let gateway = self.gateway(gateway);
        let id = gateway.as_ref().map(|g| Arc::clone(&g.id));
        let buffer = self.buffer(buffer);
        let mqtt = self.mqtt(mqtt, id.as_deref());
        let data_dir = gateway
            .as_ref()
            .map_or_else(|| PathBuf::from("data"), |g| g.data_dir.clone());
        let devices = self.devices(devices, &data_dir);
        Some(Config {
            gateway: gateway?,
            buffer: buffer?,
            mqtt: mqtt?,
            devices: devices?,
        })
    }

    fn gateway(&mut self, value: Option<toml::Value>) -> Option<GatewaySettings> {
        let path = FieldPath::top("gateway");
        let table = self.section(value, &path, true)?;
        let (raw, _) = self.unit::<RawGateway>(table, &path, &[], None)?;
        if let Err(message) = check_gateway_id(&raw.id) {
            self.report(&path.key("id"), message);
        }
        let data_dir = self.path(
            &path.key("data_dir"),
            raw.data_dir.as_deref().unwrap_or("./data"),
        );
        Some(GatewaySettings {
            id: raw.id.into(),
            data_dir,
        })
    }

    fn buffer(&mut self, value: Option<toml::Value>) -> Option<BufferSettings> {
        let path = FieldPath::top("buffer");
        let table = self.section(value, &path, false)?;
        let (raw, _) = self.unit::<RawBuffer>(table, &path, &[], None)?;
        let max_size = raw.max_size.map_or(GIB, |size| size.0);
        if max_size < MIB {
            let message = format!("must be at least 1MiB, not {}", fmt_size(max_size));
            self.report(&path.key("max_size"), message);
        }
        let commit_interval = self.duration(
            &path.key("commit_interval"),
            raw.commit_interval,
            Duration::from_millis(100),
            MS,
            Duration::from_secs(60),
        );
        let replay_rate = raw.replay_rate.map(|_| {
            self.integer(
                &path.key("replay_rate"),
                raw.replay_rate,
                1000,
                1,
                1_000_000,
            )
        });
        Some(BufferSettings {
            max_size,
            when_full: raw.when_full.unwrap_or_default(),
            commit_interval,
            replay_rate,
        })
    }

    fn mqtt(
        &mut self,
        value: Option<toml::Value>,
        gateway_id: Option<&str>,
    ) -> Option<MqttSettings> {
        let path = FieldPath::top("mqtt");
        let table = self.section(value, &path, true)?;
        let (raw, _) = self.unit::<RawMqtt>(table, &path, &[], None)?;
        let (host, port) = parse_mqtt_url(&raw.url).unwrap_or_else(|e| {
            self.report(&path.key("url"), e.to_string());
            (String::new(), DEFAULT_MQTT_PORT)
        });
        let id = gateway_id.unwrap_or("gateway");
        let client_id = raw.client_id.unwrap_or_else(|| id.to_owned());
        if let Err(message) = check_client_id(&client_id) {
            self.report(&path.key("client_id"), message);
        }
        let topic_prefix = raw.topic_prefix.unwrap_or_else(|| format!("edge/{id}"));
        if let Err(message) = check_topic_prefix(&topic_prefix) {
            self.report(&path.key("topic_prefix"), message);
        }
        if let Some(username) = &raw.username {
            if username.is_empty() {
                let message = "must not be empty: leave `username` out if the broker wants none";
                self.report(&path.key("username"), message);
            } else if username.contains('\0') {
                self.report(&path.key("username"), "must not contain NUL");
            }
        }
        let password_file = raw
            .password_file
            .map(|file| self.credential_file(&path.key("password_file"), &file));
        let keep_alive = self.duration(
            &path.key("keep_alive"),
            raw.keep_alive,
            Duration::from_secs(30),
            Duration::from_secs(1),
            Duration::from_secs(u64::from(u16::MAX)),
        );
        let max_inflight = self.integer(&path.key("max_inflight"), raw.max_inflight, 256, 1, 1024);
        let max_packet_size = raw.max_packet_size.map_or(MIB, |size| size.0);
        if !(16 * KIB..=256 * MIB).contains(&max_packet_size) {
            let message = format!(
                "must be between 16KiB and 256MiB, not {}",
                fmt_size(max_packet_size)
            );
            self.report(&path.key("max_packet_size"), message);
        }
        let shutdown_grace = self.duration(
            &path.key("shutdown_grace"),
            raw.shutdown_grace,
            Duration::from_secs(5),
            Duration::ZERO,
            MAX_DURATION,
        );
        let ack_timeout = self.duration(
            &path.key("ack_timeout"),
            raw.ack_timeout,
            Duration::from_secs(30),
            NONZERO,
            MAX_DURATION,
        );
        Some(MqttSettings {
            host,
            port,
            client_id,
            topic_prefix,
            format: raw.format.unwrap_or_default(),
            username: raw.username,
            password_file,
            keep_alive,
            max_inflight,
            max_packet_size: usize::try_from(max_packet_size).unwrap_or(usize::MAX),
            shutdown_grace,
            ack_timeout,
        })
    }

    fn devices(
        &mut self,
        value: Option<toml::Value>,
        data_dir: &Path,
    ) -> Option<Vec<DeviceSettings>> {
        let path = FieldPath::top("devices");
        let entries = match value {
            Some(value) => self.entries(value, &path, "[[devices]]"),
            None => Vec::new(),
        };
        if entries.is_empty() && !self.problems.iter().any(|p| p.field == "devices") {
            self.report(&path, "no [[devices]]: configure at least one device");
            return None;
        }
        let mut names = HashMap::new();
        let mut devices = Vec::new();
        // Serial ports of enabled lines, with the index of the first device on each.
        let mut ports: HashMap<String, (usize, Arc<str>)> = HashMap::new();
        let mut complete = true;
        for (index, entry) in entries.into_iter().enumerate() {
            match self.device(index, entry, &mut names, data_dir) {
                DeviceOutcome::Enabled(device) => {
                    self.port_not_shared(index, &device, &mut ports);
                    devices.push(*device);
                }
                DeviceOutcome::Disabled => {}
                DeviceOutcome::Invalid => complete = false,
            }
        }
        complete.then_some(devices)
    }

    /// One serial line is one device: two devices on one port would take it from each other,
    /// and two connections to one RTU-over-TCP converter would each get the other's answers.
    /// Serial paths that exist are compared resolved, so a `/dev/serial/by-id/` link and the
    /// `/dev/ttyUSB0` it points to are the same port.
    fn port_not_shared(
        &mut self,
        index: usize,
        device: &DeviceSettings,
        ports: &mut HashMap<String, (usize, Arc<str>)>,
    ) {
        let DeviceKind::Modbus(settings) = &device.kind else {
            return;
        };
        let (key, field, what) = match &settings.link {
            Link::Rtu(serial) => {
                let resolved = std::fs::canonicalize(&serial.port)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| serial.port.clone());
                (format!("serial {resolved}"), "port", "serial port")
            }
            Link::RtuOverTcp { address } => (
                format!("converter {address}"),
                "address",
                "RTU-over-TCP converter",
            ),
            Link::Tcp { .. } => return,
        };
        match ports.get(&key) {
            Some((first, name)) => {
                let message = format!(
                    "{what} `{}` is already the line of device `{name}` (devices[{first}]): \
                     one line is one device; list its units under that device's [[devices.units]]",
                    settings.link.target()
                );
                self.report(&FieldPath::top("devices").index(index).key(field), message);
            }
            None => {
                ports.insert(key, (index, device.name.clone()));
            }
        }
    }

    fn device(
        &mut self,
        index: usize,
        entry: toml::Value,
        names: &mut HashMap<String, usize>,
        data_dir: &Path,
    ) -> DeviceOutcome {
        let path = FieldPath::top("devices").index(index);
        let Some(mut table) = self.entry(entry, &path, "[[devices]]") else {
            return DeviceOutcome::Invalid;
        };
        let tags = table.remove("tags");
        match self.protocol(&path, table.get("protocol")) {
            Some(Protocol::OpcUa) => self.opcua_device(&path, table, tags, names, data_dir),
            Some(protocol) => self.modbus_device(&path, protocol, table, tags, names),
            None => DeviceOutcome::Invalid,
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
    fn tag_entries(
        &mut self,
        path: &FieldPath,
        tags: Option<toml::Value>,
        header: &str,
        missing: Option<&str>,
    ) -> Vec<toml::Value> {
        let before = self.problems.len();
        let entries = match tags {
            Some(tags) => self.entries(tags, path, header),
            None => Vec::new(),
        };
        if let Some(message) = missing {
            if entries.is_empty() && self.problems.len() == before {
                self.report(path, message);
            }
        }
        entries
    }

    /// Checks a device name and that no earlier device has it.
    fn device_name(&mut self, path: &FieldPath, name: &str, names: &mut HashMap<String, usize>) {
        let index = match path.0.last() {
            Some(Segment::Index(index)) => *index,
            _ => 0,
        };
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
    fn tag_name(
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
            let message = match self.line_of(&first_path) {
                Some(line) => {
                    format!("duplicate tag name `{name}`: the tag on line {line} has it already")
                }
                None => format!("duplicate tag name `{name}`: {first_path} has it already"),
            };
            self.report(&name_path, message);
        } else {
            names.insert(name.to_owned(), index);
        }
    }

    /// The timing keys every device has, checked alike whatever its protocol.
    fn timing(
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

    /// A file holding a secret or a key: resolved like any path, and when loading from disk
    /// checked to be readable (never read).
    fn credential_file(&mut self, field: &FieldPath, text: &str) -> PathBuf {
        let resolved = self.path(field, text);
        if self.dir.is_some() && !text.is_empty() && !text.contains('\0') {
            if let Err(message) = check_readable(&resolved) {
                self.report(field, message);
            }
        }
        resolved
    }

    // ---- Modbus devices ------------------------------------------------------------------

    /// A `modbus_tcp`, `modbus_rtu` or `modbus_rtu_over_tcp` device: its own keys, then its
    /// units, in either form (one unit on the device, or `[[devices.units]]`).
    fn modbus_device(
        &mut self,
        path: &FieldPath,
        protocol: Protocol,
        mut table: toml::Table,
        tags: Option<toml::Value>,
        names: &mut HashMap<String, usize>,
    ) -> DeviceOutcome {
        let units = table.remove("units");
        let unit_id_given = table.contains_key("unit_id");
        let foreign = Foreign::new(protocol, Protocol::device_keys);
        let device = self
            .unit::<RawModbusDevice>(table, path, &[], Some(&foreign))
            .and_then(|(raw, dropped)| self.modbus_settings(path, protocol, raw, &dropped, names));
        let defaults = TagDefaults {
            scan_interval: device
                .as_ref()
                .map_or(Duration::from_secs(1), |(common, _, _)| {
                    common.scan_interval
                }),
            max_registers_per_read: device
                .as_ref()
                .map_or(125, |(_, settings, _)| settings.max_registers_per_read),
        };
        let enabled = device.as_ref().is_none_or(|(common, _, _)| common.enabled);
        let units = match units {
            Some(units) if unit_id_given || tags.is_some() => {
                let given = match (unit_id_given, tags.is_some()) {
                    (true, true) => "`unit_id` and `tags`",
                    (true, false) => "`unit_id`",
                    _ => "`tags`",
                };
                let message = format!(
                    "give either `units` (a [[devices.units]] entry per unit) or `unit_id` and \
                     [[devices.tags]] (one unit), not both: this device also has {given}"
                );
                self.report(&path.key("units"), message);
                // Both forms are still checked, so that every problem is reported at once.
                self.units(&path.key("units"), units, protocol, &defaults);
                let tags_path = path.key("tags");
                let entries = self.tag_entries(&tags_path, tags, "[[devices.tags]]", None);
                self.tags(&tags_path, entries, &defaults, protocol, "[[devices.tags]]");
                None
            }
            Some(units) => self.units(&path.key("units"), units, protocol, &defaults),
            None => {
                let tags_path = path.key("tags");
                let missing = enabled.then_some(
                    "an enabled device needs at least one [[devices.tags]] entry, or \
                     [[devices.units]] entries with their tags (or enabled = false)",
                );
                let entries = self.tag_entries(&tags_path, tags, "[[devices.tags]]", missing);
                let tags = self.tags(&tags_path, entries, &defaults, protocol, "[[devices.tags]]");
                let unit_id = device.as_ref().and_then(|&(_, _, unit_id)| unit_id);
                tags.zip(unit_id).map(|(tags, unit_id)| {
                    vec![UnitSettings {
                        name: None,
                        unit_id,
                        tags,
                    }]
                })
            }
        };
        match (device, units) {
            (Some((common, mut settings, _)), Some(units)) => {
                settings.units = units;
                common.outcome(DeviceKind::Modbus(settings))
            }
            _ => DeviceOutcome::Invalid,
        }
    }

    /// Checks a Modbus device's own keys; returns its settings without units, and the unit id
    /// of the one-unit form (`unit_id`, 1 by default) when it is valid. Like any missing
    /// required key, a missing `address` (or `port` for `modbus_rtu`) leaves the rest unchecked.
    fn modbus_settings(
        &mut self,
        path: &FieldPath,
        protocol: Protocol,
        mut raw: RawModbusDevice,
        dropped: &BTreeSet<String>,
        names: &mut HashMap<String, usize>,
    ) -> Option<(Common, ModbusSettings, Option<u8>)> {
        let (key, target) = match protocol {
            Protocol::ModbusRtu => ("port", raw.port.take()),
            _ => ("address", raw.address.take()),
        };
        let Some(target) = target else {
            self.missing(path, key, dropped);
            return None;
        };
        self.device_name(path, &raw.name, names);
        let link = self.link(path, protocol, target, &raw);
        let unit_id = self.unit_id(&path.key("unit_id"), raw.unit_id.unwrap_or(1), protocol);
        let timing = self.timing(
            path,
            Timing {
                scan_interval: raw.scan_interval,
                timeout: raw.timeout,
                backoff_min: raw.backoff_min,
                backoff_max: raw.backoff_max,
            },
            dropped,
            Timing {
                scan_interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                backoff_min: Duration::from_millis(100),
                backoff_max: Duration::from_secs(30),
            },
        );
        let inter_request_delay = self.duration(
            &path.key("inter_request_delay"),
            raw.inter_request_delay,
            Duration::ZERO,
            Duration::ZERO,
            MAX_INTER_REQUEST_DELAY,
        );
        let max_registers_per_read = self.integer(
            &path.key("max_registers_per_read"),
            raw.max_registers_per_read,
            125,
            1,
            125,
        );
        let max_gap = self.integer(&path.key("max_gap"), raw.max_gap, 16, 0, 125);
        let max_silence = self.duration(
            &path.key("max_silence"),
            raw.max_silence,
            Duration::from_secs(60),
            NONZERO,
            MAX_DURATION,
        );
        let settings = ModbusSettings {
            link,
            timeout: timing.timeout,
            inter_request_delay,
            max_registers_per_read,
            max_gap,
            report: raw.report.unwrap_or_default(),
            max_silence,
            backoff_min: timing.backoff_min,
            backoff_max: timing.backoff_max,
            units: Vec::new(),
        };
        let common = Common {
            name: raw.name.into(),
            scan_interval: timing.scan_interval,
            enabled: raw.enabled.unwrap_or(true),
        };
        Some((common, settings, unit_id))
    }

    /// Checks how a Modbus device is reached: `target` is its address, or for `modbus_rtu` its
    /// serial port, whose settings are the serial keys of `raw`.
    fn link(
        &mut self,
        path: &FieldPath,
        protocol: Protocol,
        target: String,
        raw: &RawModbusDevice,
    ) -> Link {
        match protocol {
            Protocol::ModbusRtu => {
                let port = target;
                if port.is_empty() {
                    let message = "must not be empty: name the serial device, e.g. \
                                   \"/dev/ttyUSB0\"";
                    self.report(&path.key("port"), message);
                } else if port.contains('\0') {
                    self.report(&path.key("port"), "must not contain NUL");
                }
                let baud_rate = self.integer(
                    &path.key("baud_rate"),
                    raw.baud_rate,
                    19_200u32,
                    *BAUD_RATES.start(),
                    *BAUD_RATES.end(),
                );
                let parity = match raw.parity.as_deref() {
                    None => Parity::default(),
                    Some(text) => parse_parity(text).unwrap_or_else(|| {
                        let message = format!("unknown parity `{text}`: use none, even or odd");
                        self.report(&path.key("parity"), message);
                        Parity::default()
                    }),
                };
                let data_bits = match raw.data_bits {
                    None | Some(8) => 8,
                    Some(other) => {
                        let message =
                            format!("must be 8, not {other}: Modbus RTU frames carry 8-bit bytes");
                        self.report(&path.key("data_bits"), message);
                        8
                    }
                };
                let stop_bits = match raw.stop_bits {
                    None => 1,
                    Some(bits @ 1..=2) => u8::try_from(bits).unwrap_or(1),
                    Some(other) => {
                        self.report(
                            &path.key("stop_bits"),
                            format!("must be 1 or 2, not {other}"),
                        );
                        1
                    }
                };
                Link::Rtu(SerialSettings {
                    port,
                    baud_rate,
                    parity,
                    data_bits,
                    stop_bits,
                })
            }
            _ => {
                let address = target;
                if let Err(e) = split_host_port(&address, None) {
                    self.report(&path.key("address"), e.to_string());
                }
                match protocol {
                    Protocol::ModbusRtuOverTcp => Link::RtuOverTcp { address },
                    _ => Link::Tcp { address },
                }
            }
        }
    }

    /// Checks a unit id against the protocol's range; returns it when valid.
    fn unit_id(&mut self, path: &FieldPath, value: i64, protocol: Protocol) -> Option<u8> {
        let range = protocol.unit_ids();
        if range.contains(&value) {
            return u8::try_from(value).ok();
        }
        let why = match value {
            0 => ": 0 is the broadcast address, which no unit answers",
            248..=255 => ": 248 to 255 are reserved on a serial line",
            _ => "",
        };
        let message = format!(
            "must be between {} and {}, not {value}{why}",
            range.start(),
            range.end()
        );
        self.report(path, message);
        None
    }

    /// Checks a Modbus device's `[[devices.units]]` entries, each on its own and then against
    /// each other (names, unit ids); there must be at least one.
    fn units(
        &mut self,
        path: &FieldPath,
        value: toml::Value,
        protocol: Protocol,
        defaults: &TagDefaults,
    ) -> Option<Vec<UnitSettings>> {
        let before = self.problems.len();
        let entries = self.entries(value, path, "[[devices.units]]");
        if entries.is_empty() {
            if self.problems.len() == before {
                let message = "must not be empty: give each unit on the line a \
                               [[devices.units]] entry (or use `unit_id` and \
                               [[devices.tags]] for one unit)";
                self.report(path, message);
            }
            return None;
        }
        let mut units = Vec::new();
        let mut complete = true;
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut ids: HashMap<u8, usize> = HashMap::new();
        for (index, entry) in entries.into_iter().enumerate() {
            let unit_path = path.index(index);
            let Some(mut table) = self.entry(entry, &unit_path, "[[devices.units]]") else {
                complete = false;
                continue;
            };
            let tags = table.remove("tags");
            let (name, unit_id) = match self.unit::<RawUnit>(table, &unit_path, &["tags"], None) {
                Some((raw, dropped)) => {
                    let name = self.unit_name(path, index, raw.name, &dropped, &mut names);
                    let unit_id = self.unit_unit_id(path, index, raw.unit_id, &dropped, protocol);
                    if let Some(unit_id) = unit_id {
                        self.unique_unit_id(path, index, unit_id, &mut ids);
                    }
                    (name, unit_id)
                }
                None => (None, None),
            };
            let tags_path = unit_path.key("tags");
            let entries = self.tag_entries(
                &tags_path,
                tags,
                "[[devices.units.tags]]",
                Some("a unit needs at least one [[devices.units.tags]] entry"),
            );
            let tags = self.tags(
                &tags_path,
                entries,
                defaults,
                protocol,
                "[[devices.units.tags]]",
            );
            match (name, unit_id, tags) {
                (Some(name), Some(unit_id), Some(tags)) => units.push(UnitSettings {
                    name: Some(name.into()),
                    unit_id,
                    tags,
                }),
                _ => complete = false,
            }
        }
        complete.then_some(units)
    }

    /// Checks a unit's name (required; the rules of a device name) and that no earlier unit
    /// of the device (under `units`) has it.
    fn unit_name(
        &mut self,
        units: &FieldPath,
        index: usize,
        name: Option<String>,
        dropped: &BTreeSet<String>,
        names: &mut HashMap<String, usize>,
    ) -> Option<String> {
        let name_path = units.index(index).key("name");
        let Some(name) = name else {
            if !dropped.contains("name") {
                self.report(&name_path, "missing required key `name`");
            }
            return None;
        };
        if let Err(message) = check_device_name(&name) {
            self.report(&name_path, message);
        }
        if let Some(&first) = names.get(&name) {
            let first_path = units.index(first).key("name");
            let message = match self.line_of(&first_path) {
                Some(line) => {
                    format!("duplicate unit name `{name}`: the unit on line {line} has it already")
                }
                None => format!("duplicate unit name `{name}`: {first_path} has it already"),
            };
            self.report(&name_path, message);
        } else {
            names.insert(name.clone(), index);
        }
        Some(name)
    }

    /// Checks a unit's `unit_id` (required; the protocol's range).
    fn unit_unit_id(
        &mut self,
        units: &FieldPath,
        index: usize,
        unit_id: Option<i64>,
        dropped: &BTreeSet<String>,
        protocol: Protocol,
    ) -> Option<u8> {
        let id_path = units.index(index).key("unit_id");
        match unit_id {
            Some(unit_id) => self.unit_id(&id_path, unit_id, protocol),
            None => {
                if !dropped.contains("unit_id") {
                    self.report(&id_path, "missing required key `unit_id`");
                }
                None
            }
        }
    }

    /// Checks that no earlier unit of the device (under `units`) has the same unit id.
    fn unique_unit_id(
        &mut self,
        units: &FieldPath,
        index: usize,
        unit_id: u8,
        ids: &mut HashMap<u8, usize>,
    ) {
        let Some(&first) = ids.get(&unit_id) else {
            ids.insert(unit_id, index);
            return;
        };
        let first_path = units.index(first).key("unit_id");
        let message = match self.line_of(&first_path) {
            Some(line) => {
                format!("duplicate unit_id {unit_id}: the unit on line {line} has it already")
            }
            None => format!("duplicate unit_id {unit_id}: {first_path} has it already"),
        };
        self.report(&units.index(index).key("unit_id"), message);
    }

    /// Checks the tags of a Modbus unit (written `header`), each on its own and then against
    /// each other (names, overlapping registers).
    fn tags(
        &mut self,
        path: &FieldPath,
        entries: Vec<toml::Value>,
        defaults: &TagDefaults,
        protocol: Protocol,
        header: &str,
    ) -> Option<Vec<TagSpec>> {
        let foreign = Foreign::new(protocol, Protocol::tag_keys);
        let mut specs = Vec::new();
        let mut complete = true;
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut placed: Vec<Placed> = Vec::new();
        // Register -> the first placed tag covering it; a tag is at most 125 registers wide.
        let mut covered: HashMap<(Area, u32), usize> = HashMap::new();
        for (index, entry) in entries.into_iter().enumerate() {
            let tag_path = path.index(index);
            let Some(table) = self.entry(entry, &tag_path, header) else {
                complete = false;
                continue;
            };
            let Some((raw, _)) = self.unit::<RawTag>(table, &tag_path, &[], Some(&foreign)) else {
                complete = false;
                continue;
            };
            self.tag_name(path, index, &raw.name, &mut names);
            let Some(spec) = self.tag(&tag_path, raw, defaults) else {
                complete = false;
                continue;
            };

            let width = spec.width().max(1);
            let start = u32::from(spec.address.offset);
            let last = start + u32::from(width) - 1;
            let area = spec.address.area;
            let overlapping = (start..=last)
                .filter_map(|register| covered.get(&(area, register)).copied())
                .min();
            if let Some(other) = overlapping.and_then(|i| placed.get(i)) {
                let message = format!(
                    "overlaps tag `{}` ({})",
                    other.name,
                    fmt_range(other.address, other.width)
                );
                self.report(&tag_path.key("address"), message);
            }
            for register in start..=last {
                covered.entry((area, register)).or_insert(placed.len());
            }
            placed.push(Placed {
                name: Arc::clone(&spec.name),
                address: spec.address,
                width,
            });
            specs.push(spec);
        }
        complete.then_some(specs)
    }

    /// Checks one tag; returns it when its address and type are known.
    fn tag(&mut self, path: &FieldPath, raw: RawTag, defaults: &TagDefaults) -> Option<TagSpec> {
        let address = raw
            .address
            .parse::<Address>()
            .map_err(|e| self.report(&path.key("address"), e.to_string()))
            .ok();
        let data_type = match raw.data_type.as_deref() {
            None => address.map(|a| {
                if a.area.is_bit() {
                    DataType::Bool
                } else {
                    DataType::U16
                }
            }),
            Some(text) => {
                let parsed = parse_data_type(text);
                if parsed.is_none() {
                    let message = format!(
                        "unknown type `{text}`: use bool, i16, u16, i32, u32, i64, u64, f32, f64 \
                         or string"
                    );
                    self.report(&path.key("type"), message);
                }
                parsed
            }
        };
        if let (Some(address), Some(data_type)) = (address, data_type) {
            if address.area.is_bit() && data_type != DataType::Bool {
                let message = format!(
                    "{} holds a single bit: use type = \"bool\" (or a register area, hr or ir, \
                     for type \"{}\")",
                    area_name(address.area),
                    data_type.name()
                );
                self.report(&path.key("type"), message);
            }
        }
        let length = match (data_type, raw.length) {
            (Some(DataType::String), None) => {
                let message = "type \"string\" needs `length`, its size in bytes (1 to 250)";
                self.report(&path.key("length"), message);
                0
            }
            (Some(DataType::String), Some(length)) => {
                self.integer(&path.key("length"), Some(length), 0u16, 1, 250)
            }
            (Some(other), Some(_)) => {
                let message = format!(
                    "`length` is only for type \"string\", not \"{}\"",
                    other.name()
                );
                self.report(&path.key("length"), message);
                0
            }
            (Some(_), None) | (None, _) => 0,
        };
        let order = match raw.order.as_deref() {
            None => WordOrder::default(),
            Some(text) => parse_order(text).unwrap_or_else(|| {
                let message = format!("unknown order `{text}`: use ABCD, CDAB, BADC or DCBA");
                self.report(&path.key("order"), message);
                WordOrder::default()
            }),
        };
        let scale = raw.scale.unwrap_or(1.0);
        if !scale.is_finite() {
            self.report(&path.key("scale"), "must be a finite number");
        } else if scale == 0.0 {
            self.report(&path.key("scale"), "must not be zero");
        }
        let offset = raw.offset.unwrap_or(0.0);
        if !offset.is_finite() {
            self.report(&path.key("offset"), "must be a finite number");
        }
        let deadband = raw.deadband.unwrap_or(0.0);
        if !deadband.is_finite() {
            self.report(&path.key("deadband"), "must be a finite number");
        } else if deadband < 0.0 {
            self.report(&path.key("deadband"), "must not be negative");
        }
        let scan_interval = self.duration(
            &path.key("scan_interval"),
            raw.scan_interval,
            defaults.scan_interval,
            MS,
            MAX_DURATION,
        );
        let spec = TagSpec {
            name: raw.name.into(),
            address: address?,
            data_type: data_type?,
            order,
            length,
            scale,
            offset,
            deadband,
            scan_interval,
        };

        let width = spec.width().max(1);
        if u32::from(spec.address.offset) + u32::from(width) > 65536 {
            let message = format!(
                "`{}` with type \"{}\" needs {width} registers and extends past register 65535",
                spec.address,
                spec.data_type.name()
            );
            self.report(&path.key("address"), message);
        }
        if !spec.address.area.is_bit() && width > defaults.max_registers_per_read {
            let key = if spec.data_type == DataType::String {
                "length"
            } else {
                "type"
            };
            let message = format!(
                "type \"{}\" needs {width} registers, more than the device's \
                 max_registers_per_read ({})",
                spec.data_type.name(),
                defaults.max_registers_per_read
            );
            self.report(&path.key(key), message);
        }
        Some(spec)
    }

    // ---- OPC UA devices ------------------------------------------------------------------

    fn opcua_device(
        &mut self,
        path: &FieldPath,
        table: toml::Table,
        tags: Option<toml::Value>,
        names: &mut HashMap<String, usize>,
        data_dir: &Path,
    ) -> DeviceOutcome {
        let foreign = Foreign::new(Protocol::OpcUa, Protocol::device_keys);
        let device = self
            .unit::<RawOpcUaDevice>(table, path, &[], Some(&foreign))
            .map(|(raw, dropped)| self.opcua_settings(path, raw, &dropped, names, data_dir));
        let publishing_interval = device.as_ref().map_or_else(
            || OpcUaSettings::new("", Vec::new()).publishing_interval,
            |(_, settings)| settings.publishing_interval,
        );
        let enabled = device.as_ref().is_none_or(|(common, _)| common.enabled);
        let tags_path = path.key("tags");
        let missing = enabled.then_some(
            "an enabled device needs at least one [[devices.tags]] entry (or enabled = false)",
        );
        let entries = self.tag_entries(&tags_path, tags, "[[devices.tags]]", missing);
        let tags = self.opcua_tags(&tags_path, entries, publishing_interval);
        match (device, tags) {
            (Some((common, mut settings)), Some(tags)) => {
                settings.tags = tags;
                common.outcome(DeviceKind::OpcUa(settings))
            }
            _ => DeviceOutcome::Invalid,
        }
    }

    /// Checks an OPC UA device's own keys; returns its settings without tags. Defaults are
    /// those of [`OpcUaSettings::new`], except `pki_dir`, which lives in the data directory.
    fn opcua_settings(
        &mut self,
        path: &FieldPath,
        raw: RawOpcUaDevice,
        dropped: &BTreeSet<String>,
        names: &mut HashMap<String, usize>,
        data_dir: &Path,
    ) -> (Common, OpcUaSettings) {
        self.device_name(path, &raw.name, names);
        if let Err(message) = check_endpoint(&raw.endpoint) {
            self.report(&path.key("endpoint"), message);
        }
        let identity = self.identity(path, &raw, dropped);
        let mut settings = OpcUaSettings::new(raw.endpoint, Vec::new());
        settings.identity = identity;

        let policy = match raw.security_policy {
            _ if dropped.contains("security_policy") => None,
            None => Some(settings.security_policy),
            Some(text) => text
                .parse::<SecurityPolicy>()
                .map_err(|message| self.report(&path.key("security_policy"), message))
                .ok(),
        };
        let mode = match raw.security_mode {
            _ if dropped.contains("security_mode") => None,
            None => Some(settings.security_mode),
            Some(text) => text
                .parse::<SecurityMode>()
                .map_err(|message| self.report(&path.key("security_mode"), message))
                .ok(),
        };
        if let (Some(policy), Some(mode)) = (policy, mode) {
            if let Err(message) = check_security(policy, mode) {
                self.report(&path.key("security_mode"), message);
            }
            settings.security_policy = policy;
            settings.security_mode = mode;
        }

        settings.pki_dir = match raw.pki_dir {
            Some(text) => self.path(&path.key("pki_dir"), &text),
            None => data_dir.join("pki"),
        };
        settings.trust_server_cert = raw.trust_server_cert.unwrap_or(settings.trust_server_cert);
        settings.publishing_interval = self.duration(
            &path.key("publishing_interval"),
            raw.publishing_interval,
            settings.publishing_interval,
            NONZERO,
            MAX_DURATION,
        );
        settings.mode = match raw.mode {
            None => settings.mode,
            Some(RawMode::Subscribe) => Mode::Subscribe,
            Some(RawMode::Poll) => Mode::Poll,
        };
        let timing = self.timing(
            path,
            Timing {
                scan_interval: raw.scan_interval,
                timeout: raw.timeout,
                backoff_min: raw.backoff_min,
                backoff_max: raw.backoff_max,
            },
            dropped,
            Timing {
                scan_interval: settings.scan_interval,
                timeout: settings.timeout,
                backoff_min: settings.backoff_min,
                backoff_max: settings.backoff_max,
            },
        );
        settings.scan_interval = timing.scan_interval;
        settings.timeout = timing.timeout;
        settings.backoff_min = timing.backoff_min;
        settings.backoff_max = timing.backoff_max;
        let common = Common {
            name: raw.name.into(),
            scan_interval: timing.scan_interval,
            enabled: raw.enabled.unwrap_or(true),
        };
        (common, settings)
    }

    /// The user identity: anonymous, a user name with a password file, or a user certificate
    /// with its key; each file goes with its partner, and one identity at most.
    fn identity(
        &mut self,
        path: &FieldPath,
        raw: &RawOpcUaDevice,
        dropped: &BTreeSet<String>,
    ) -> Identity {
        if let Some(username) = &raw.username {
            if username.is_empty() {
                let message = "must not be empty: leave `username` out for an anonymous session";
                self.report(&path.key("username"), message);
            } else if username.contains('\0') {
                self.report(&path.key("username"), "must not contain NUL");
            }
        }
        let mut file = |key: &str, text: &Option<String>| {
            text.as_deref()
                .map(|text| self.credential_file(&path.key(key), text))
        };
        let password_file = file("password_file", &raw.password_file);
        let cert_file = file("user_cert_file", &raw.user_cert_file);
        let key_file = file("user_key_file", &raw.user_key_file);

        // A key dropped for a bad value was given: it is reported already.
        let given = |key: &str, set: bool| set || dropped.contains(key);
        let user = given("username", raw.username.is_some());
        let password = given("password_file", password_file.is_some());
        let cert = given("user_cert_file", cert_file.is_some());
        let key = given("user_key_file", key_file.is_some());
        let needs = [
            (
                user && !password,
                "username",
                "`username` needs `password_file`, the file holding the password",
            ),
            (
                password && !user,
                "password_file",
                "`password_file` needs `username`",
            ),
            (
                cert && !key,
                "user_cert_file",
                "`user_cert_file` needs `user_key_file`, the file holding the user's private key",
            ),
            (
                key && !cert,
                "user_key_file",
                "`user_key_file` needs `user_cert_file`, the user certificate",
            ),
            (
                user && cert,
                "user_cert_file",
                "a device has one user identity: `username` with `password_file`, or \
                 `user_cert_file` with `user_key_file`, not both",
            ),
        ];
        for (problem, key, message) in needs {
            if problem {
                self.report(&path.key(key), message);
            }
        }
        match (&raw.username, password_file, cert_file, key_file) {
            (Some(user), Some(password_file), None, None) => Identity::UserName {
                user: user.clone(),
                password_file,
            },
            (None, None, Some(cert_file), Some(key_file)) => Identity::X509 {
                cert_file,
                key_file,
            },
            _ => Identity::Anonymous,
        }
    }

    /// Checks an OPC UA device's tags, each on its own and then against each other (names,
    /// nodes).
    fn opcua_tags(
        &mut self,
        path: &FieldPath,
        entries: Vec<toml::Value>,
        publishing_interval: Duration,
    ) -> Option<Vec<OpcUaTag>> {
        let foreign = Foreign::new(Protocol::OpcUa, Protocol::tag_keys);
        let mut tags: Vec<OpcUaTag> = Vec::new();
        let mut complete = true;
        let mut names: HashMap<String, usize> = HashMap::new();
        // The node's text form -> the first tag reading it, as (index in `tags`, its path).
        let mut nodes: HashMap<String, (usize, FieldPath)> = HashMap::new();
        for (index, entry) in entries.into_iter().enumerate() {
            let tag_path = path.index(index);
            let Some(table) = self.entry(entry, &tag_path, "[[devices.tags]]") else {
                complete = false;
                continue;
            };
            let Some((raw, dropped)) =
                self.unit::<RawOpcUaTag>(table, &tag_path, &[], Some(&foreign))
            else {
                complete = false;
                continue;
            };
            self.tag_name(path, index, &raw.name, &mut names);
            let Some((tag, node_key)) =
                self.opcua_tag(&tag_path, raw, &dropped, publishing_interval)
            else {
                complete = false;
                continue;
            };
            let node_path = tag_path.key(node_key);
            match nodes.get(&tag.node.to_string()) {
                Some((first, first_path))
                    if tags.get(*first).is_some_and(|t| t.node == tag.node) =>
                {
                    let other = tags.get(*first).map_or("", |t| &*t.name);
                    let message = match self.line_of(first_path) {
                        Some(line) => format!(
                            "duplicate node `{}`: tag `{other}` on line {line} reads it already",
                            tag.node
                        ),
                        None => format!(
                            "duplicate node `{}`: tag `{other}` reads it already",
                            tag.node
                        ),
                    };
                    self.report(&node_path, message);
                }
                Some(_) => {}
                None => {
                    nodes.insert(tag.node.to_string(), (tags.len(), node_path));
                }
            }
            tags.push(tag);
        }
        complete.then_some(tags)
    }

    /// Checks one OPC UA tag; returns it when its node is known, with the key that names the
    /// node (`node_id` or `browse_path`).
    fn opcua_tag(
        &mut self,
        path: &FieldPath,
        raw: RawOpcUaTag,
        dropped: &BTreeSet<String>,
        publishing_interval: Duration,
    ) -> Option<(OpcUaTag, &'static str)> {
        let by_id = raw.node_id.as_deref().map(|text| {
            parse_node_id(text)
                .map(NodeRef::Id)
                .map_err(|message| self.report(&path.key("node_id"), message))
                .ok()
        });
        let by_path = raw.browse_path.as_deref().map(|text| {
            parse_browse_path(text)
                .map(NodeRef::BrowsePath)
                .map_err(|message| self.report(&path.key("browse_path"), message))
                .ok()
        });
        let node = match (by_id, by_path) {
            (Some(node), None) => node.map(|node| (node, "node_id")),
            (None, Some(node)) => node.map(|node| (node, "browse_path")),
            (Some(_), Some(_)) => {
                let message = "set either `node_id` or `browse_path`, not both";
                self.report(&path.key("browse_path"), message);
                None
            }
            (None, None) => {
                if !dropped.contains("node_id") && !dropped.contains("browse_path") {
                    let message = "a tag needs `node_id` (e.g. \"ns=2;s=Oven.Temp\") or \
                                   `browse_path` (e.g. \"Objects/Oven/Temp\")";
                    self.report(&path.key("node_id"), message);
                }
                None
            }
        };
        // Zero asks the server for its fastest practical rate.
        let sampling_interval = self.duration(
            &path.key("sampling_interval"),
            raw.sampling_interval,
            publishing_interval,
            Duration::ZERO,
            MAX_DURATION,
        );
        if let Some(deadband) = raw.deadband {
            if !deadband.is_finite() {
                self.report(&path.key("deadband"), "must be a finite number");
            } else if deadband < 0.0 {
                self.report(&path.key("deadband"), "must not be negative");
            }
        }
        let queue_size = self.integer(
            &path.key("queue_size"),
            raw.queue_size,
            10u32,
            1,
            MAX_QUEUE_SIZE,
        );
        let (node, node_key) = node?;
        let tag = OpcUaTag {
            name: raw.name.into(),
            node,
            sampling_interval,
            deadband: raw.deadband,
            queue_size,
        };
        Some((tag, node_key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = include_str!("../../deploy/gateway.example.toml");

    /// A small valid file that the rule tests edit.
    const BASE: &str = r#"[gateway]
id = "edge-01"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "press7"
protocol = "modbus_tcp"
address = "127.0.0.1:5020"

  [[devices.tags]]
  name = "counter"
  address = "hr:0"
"#;

    /// The contract's example, every key set. (The contract's tag block also shows
    /// `length = 16` on the f32 tag, which its own rules forbid; it is left out here.)
    const FULL: &str = r#"[gateway]
id = "edge-01"
data_dir = "./data"

[buffer]
max_size = "1GiB"
when_full = "drop_oldest"
commit_interval = "100ms"

[mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "edge-01"
topic_prefix = "edge/edge-01"
format = "json"
username = "gw"
password_file = "/path"
keep_alive = "30s"
max_inflight = 256
max_packet_size = "1MiB"
shutdown_grace = "5s"
ack_timeout = "30s"

[[devices]]
name = "press7"
protocol = "modbus_tcp"
address = "127.0.0.1:5020"
unit_id = 1
scan_interval = "1s"
timeout = "1s"
max_registers_per_read = 125
max_gap = 16
report = "every_scan"
max_silence = "60s"
backoff_min = "100ms"
backoff_max = "30s"
enabled = true

  [[devices.tags]]
  name = "sine"
  address = "hr:1"
  type = "f32"
  order = "ABCD"
  scale = 1.0
  offset = 0.0
  deadband = 0.0
  unit = "m/s"
  scan_interval = "250ms"
"#;

    fn config(src: &str) -> Config {
        match parse(src, "test.toml") {
            Ok(config) => config,
            Err(errors) => panic!("unexpected problems:\n{errors}"),
        }
    }

    fn problems(src: &str) -> Vec<Problem> {
        match parse(src, "test.toml") {
            Ok(_) => Vec::new(),
            Err(errors) => errors.problems,
        }
    }

    fn modbus(device: &DeviceSettings) -> &ModbusSettings {
        match &device.kind {
            DeviceKind::Modbus(settings) => settings,
            other => panic!("expected a Modbus device, got {other:?}"),
        }
    }

    /// The one unnamed unit of a Modbus device in the one-unit form.
    fn only_unit(device: &DeviceSettings) -> &UnitSettings {
        match &modbus(device).units[..] {
            [unit] if unit.name.is_none() => unit,
            other => panic!("expected one unnamed unit, got {other:?}"),
        }
    }

    fn opcua(device: &DeviceSettings) -> &OpcUaSettings {
        match &device.kind {
            DeviceKind::OpcUa(settings) => settings,
            other => panic!("expected an opcua device, got {other:?}"),
        }
    }

    /// The 1-based line of the first line of `src` containing `needle`.
    fn line_containing(src: &str, needle: &str) -> usize {
        match src.lines().position(|line| line.contains(needle)) {
            Some(index) => index + 1,
            None => panic!("`{needle}` is not in the test source"),
        }
    }

    fn listing(problems: &[Problem]) -> String {
        problems
            .iter()
            .map(|p| format!("  {p}\n"))
            .collect::<String>()
    }

    /// Asserts a problem on `field`, on the line holding `needle`, whose message holds
    /// `fragment`.
    fn assert_problem(src: &str, field: &str, needle: &str, fragment: &str) {
        let found = problems(src);
        let line = line_containing(src, needle);
        assert!(
            found
                .iter()
                .any(|p| p.field == field && p.line == Some(line) && p.message.contains(fragment)),
            "expected `{field}` on line {line} saying `{fragment}` in:\n{src}\ngot:\n{}",
            listing(&found)
        );
    }

    fn with_gateway(lines: &str) -> String {
        BASE.replace(
            "id = \"edge-01\"\n",
            &format!("id = \"edge-01\"\n{lines}\n"),
        )
    }

    fn with_mqtt(lines: &str) -> String {
        let url = "url = \"mqtt://127.0.0.1:1883\"\n";
        BASE.replace(url, &format!("{url}{lines}\n"))
    }

    fn with_url(url: &str) -> String {
        BASE.replace("mqtt://127.0.0.1:1883", url)
    }

    fn with_buffer(lines: &str) -> String {
        format!("{BASE}\n[buffer]\n{lines}\n")
    }

    fn with_device(lines: &str) -> String {
        let address = "address = \"127.0.0.1:5020\"\n";
        BASE.replace(address, &format!("{address}{lines}\n"))
    }

    fn with_tag(lines: &str) -> String {
        format!("{BASE}\n  [[devices.tags]]\n{lines}\n")
    }

    #[test]
    fn example_file_parses_without_problems() {
        let config = config(EXAMPLE);
        assert_eq!(&*config.gateway.id, "edge-01");
        assert_eq!(
            config.devices.len(),
            1,
            "the disabled Modbus and OPC UA devices are left out"
        );
        let press = &config.devices[0];
        let tags = &only_unit(press).tags;
        let summary: Vec<(&str, String, DataType, u16)> = tags
            .iter()
            .map(|t| (&*t.name, t.address.to_string(), t.data_type, t.width()))
            .collect();
        assert_eq!(
            summary,
            [
                ("counter", "hr:0".to_owned(), DataType::U16, 1),
                ("sine", "hr:1".to_owned(), DataType::F32, 2),
                ("position", "hr:3".to_owned(), DataType::I32, 2),
                ("energy", "hr:5".to_owned(), DataType::F64, 4),
                ("recipe", "hr:10".to_owned(), DataType::String, 8),
                ("running", "co:0".to_owned(), DataType::Bool, 1),
            ]
        );
        assert_eq!(tags[2].order, WordOrder::CDAB);
        assert_eq!(tags[4].length, 16);
    }

    #[test]
    fn full_contract_example_parses_to_the_expected_runtime_values() {
        let expected = Config {
            gateway: GatewaySettings {
                id: "edge-01".into(),
                data_dir: PathBuf::from("./data"),
            },
            buffer: BufferSettings {
                max_size: 1 << 30,
                when_full: WhenFull::DropOldest,
                commit_interval: Duration::from_millis(100),
                replay_rate: None,
            },
            mqtt: MqttSettings {
                host: "127.0.0.1".to_owned(),
                port: 1883,
                client_id: "edge-01".to_owned(),
                topic_prefix: "edge/edge-01".to_owned(),
                format: Format::Json,
                username: Some("gw".to_owned()),
                password_file: Some(PathBuf::from("/path")),
                keep_alive: Duration::from_secs(30),
                max_inflight: 256,
                max_packet_size: 1 << 20,
                shutdown_grace: Duration::from_secs(5),
                ack_timeout: Duration::from_secs(30),
            },
            devices: vec![DeviceSettings {
                name: "press7".into(),
                scan_interval: Duration::from_secs(1),
                kind: DeviceKind::Modbus(ModbusSettings {
                    link: Link::Tcp {
                        address: "127.0.0.1:5020".to_owned(),
                    },
                    timeout: Duration::from_secs(1),
                    inter_request_delay: Duration::ZERO,
                    max_registers_per_read: 125,
                    max_gap: 16,
                    report: Report::EveryScan,
                    max_silence: Duration::from_secs(60),
                    backoff_min: Duration::from_millis(100),
                    backoff_max: Duration::from_secs(30),
                    units: vec![UnitSettings {
                        name: None,
                        unit_id: 1,
                        tags: vec![TagSpec {
                            name: "sine".into(),
                            address: Address {
                                area: Area::HoldingRegister,
                                offset: 1,
                            },
                            data_type: DataType::F32,
                            order: WordOrder::ABCD,
                            length: 0,
                            scale: 1.0,
                            offset: 0.0,
                            deadband: 0.0,
                            scan_interval: Duration::from_millis(250),
                        }],
                    }],
                }),
            }],
        };
        assert_eq!(config(FULL), expected);
    }

    #[test]
    fn defaults_fill_in_every_optional_key() {
        let config = config(&with_tag("  name = \"running\"\n  address = \"co:3\""));
        assert_eq!(config.gateway.data_dir, PathBuf::from("./data"));
        assert_eq!(config.buffer.max_size, 1 << 30);
        assert_eq!(config.buffer.when_full, WhenFull::DropOldest);
        assert_eq!(config.buffer.commit_interval, Duration::from_millis(100));
        let mqtt = &config.mqtt;
        assert_eq!((mqtt.host.as_str(), mqtt.port), ("127.0.0.1", 1883));
        assert_eq!(mqtt.client_id, "edge-01");
        assert_eq!(mqtt.topic_prefix, "edge/edge-01");
        assert_eq!(mqtt.format, Format::Json);
        assert_eq!((&mqtt.username, &mqtt.password_file), (&None, &None));
        assert_eq!(mqtt.keep_alive, Duration::from_secs(30));
        assert_eq!(mqtt.max_inflight, 256);
        assert_eq!(mqtt.max_packet_size, 1 << 20);
        assert_eq!(mqtt.shutdown_grace, Duration::from_secs(5));
        assert_eq!(mqtt.ack_timeout, Duration::from_secs(30));
        let device = &config.devices[0];
        assert_eq!(device.scan_interval, Duration::from_secs(1));
        let settings = modbus(device);
        assert_eq!(
            settings.link,
            Link::Tcp {
                address: "127.0.0.1:5020".to_owned()
            }
        );
        assert_eq!(only_unit(device).unit_id, 1);
        assert_eq!(settings.timeout, Duration::from_secs(1));
        assert_eq!(settings.inter_request_delay, Duration::ZERO);
        assert_eq!(settings.max_registers_per_read, 125);
        assert_eq!(settings.max_gap, 16);
        assert_eq!(settings.report, Report::EveryScan);
        assert_eq!(settings.max_silence, Duration::from_secs(60));
        assert_eq!(settings.backoff_min, Duration::from_millis(100));
        assert_eq!(settings.backoff_max, Duration::from_secs(30));
        let tags = &only_unit(device).tags;
        let [register, coil] = &tags[..] else {
            panic!("expected two tags, got {tags:?}");
        };
        assert_eq!(register.data_type, DataType::U16, "u16 on registers");
        assert_eq!(coil.data_type, DataType::Bool, "bool on coils");
        for tag in [register, coil] {
            assert_eq!(tag.order, WordOrder::ABCD);
            assert_eq!((tag.scale, tag.offset, tag.deadband), (1.0, 0.0, 0.0));
            assert_eq!(tag.scan_interval, Duration::from_secs(1));
        }
    }

    #[test]
    fn a_tag_scans_at_its_own_interval_or_else_at_its_devices() {
        let src = with_device("scan_interval = \"2s\"");
        let src = format!(
            "{src}\n  [[devices.tags]]\n  name = \"fast\"\n  address = \"hr:9\"\n  \
             scan_interval = \"250ms\"\n"
        );
        let config = config(&src);
        let device = &config.devices[0];
        assert_eq!(device.scan_interval, Duration::from_secs(2));
        let intervals: Vec<Duration> = only_unit(device)
            .tags
            .iter()
            .map(|t| t.scan_interval)
            .collect();
        assert_eq!(
            intervals,
            [Duration::from_secs(2), Duration::from_millis(250)]
        );
    }

    #[test]
    fn disabled_devices_are_validated_but_left_out() {
        let disabled = "\n[[devices]]\nname = \"spare\"\nprotocol = \"modbus_tcp\"\n\
                        address = \"10.0.0.9:502\"\nenabled = false\n";
        let config = config(&format!("{BASE}{disabled}"));
        let names: Vec<&str> = config.devices.iter().map(|d| &*d.name).collect();
        assert_eq!(names, ["press7"], "a disabled device needs no tags either");

        let broken = format!("{BASE}{}", disabled.replace("10.0.0.9:502", "10.0.0.9"));
        assert_problem(&broken, "devices[1].address", "10.0.0.9", "has no port");
    }

    #[test]
    fn reports_every_problem_with_its_line() {
        let src = r#"[gateway]
id = "edge-01"

[mqtt]
url = "mqtt://127.0.0.1:1883"
keepalive = "30s"

[[devices]]
name = "press7"
protocol = "modbus_tcp"
address = "127.0.0.1:5020"
scan_interval = "fast"

  [[devices.tags]]
  name = "counter"
  address = "hr:0"

  [[devices.tags]]
  name = "sine"
  address = "xr:1"

  [[devices.tags]]
  name = "level"
  address = "hr:4"
  colour = "red"

  [[devices.tags]]
  name = "counter"
  address = "hr:8"
"#;
        let found = problems(src);
        let summary: Vec<(Option<usize>, &str)> =
            found.iter().map(|p| (p.line, p.field.as_str())).collect();
        assert_eq!(
            summary,
            [
                (Some(6), "mqtt.keepalive"),
                (Some(12), "devices[0].scan_interval"),
                (Some(20), "devices[0].tags[1].address"),
                (Some(25), "devices[0].tags[2].colour"),
                (Some(28), "devices[0].tags[3].name"),
            ],
            "got:\n{}",
            listing(&found)
        );
        assert!(found[0].message.contains("did you mean `keep_alive`?"));
        assert!(found[1].message.contains("`fast` is not a duration"));
        assert!(found[2]
            .message
            .contains("unknown area `xr`: use hr (holding)"));
        assert!(found[3].message.contains("unknown key `colour`"));
        assert!(found[4]
            .message
            .contains("the tag on line 15 has it already"));
    }

    #[test]
    fn problems_render_one_per_line_with_file_line_field_and_message() {
        let src = with_mqtt("keepalive = \"30s\"\nmax_inflight = 0");
        let errors = match parse(&src, "gateway.toml") {
            Ok(_) => panic!("expected problems"),
            Err(errors) => errors,
        };
        assert_eq!(
            errors.to_string(),
            "gateway.toml:6: mqtt.keepalive: unknown key `keepalive`; did you mean \
             `keep_alive`?\ngateway.toml:7: mqtt.max_inflight: must be between 1 and 1024, \
             not 0"
        );
        let no_line = ConfigErrors::whole_file("gateway.toml", None, "gone".to_owned());
        assert_eq!(no_line.to_string(), "gateway.toml: gone");
    }

    #[test]
    fn a_syntax_error_is_one_problem_with_its_line() {
        let found = problems("[gateway]\nid = \"edge-01\"\n\n[mqtt\nurl = 1\n");
        assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
        assert_eq!(found[0].line, Some(4));
        assert!(found[0].message.starts_with("TOML syntax error"));

        let found = problems("[gateway]\nid = \"a\"\nid = \"b\"\n");
        assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
        assert_eq!(found[0].line, Some(3));
        assert!(found[0].message.contains("duplicate key"));
    }

    #[test]
    fn lines_are_found_in_inline_tables_and_dotted_keys_too() {
        let src = r#"gateway = { id = "edge 01" }
mqtt.url = "mqtts://broker"
devices = [
  { name = "press7", protocol = "modbus_tcp", address = "127.0.0.1:5020", tags = [
    { name = "a", address = "xr:1" },
  ] },
]
"#;
        assert_problem(src, "gateway.id", "edge 01", "not allowed");
        assert_problem(src, "mqtt.url", "mqtts", "TLS is not supported yet");
        assert_problem(
            src,
            "devices[0].tags[0].address",
            "xr:1",
            "unknown area `xr`",
        );
    }

    #[test]
    fn section_rules() {
        let missing_mqtt = "[gateway]\nid = \"g\"\n\n[[devices]]\nname = \"d\"\n\
                            protocol = \"modbus_tcp\"\naddress = \"h:502\"\n\
                            [[devices.tags]]\nname = \"t\"\naddress = \"hr:0\"\n";
        let found = problems(missing_mqtt);
        assert_eq!(
            found,
            [Problem {
                line: None,
                field: "mqtt".to_owned(),
                message: "missing section [mqtt]".to_owned(),
            }]
        );
        assert_problem(
            &format!("{BASE}\n[[device]]\nname = \"x\"\n"),
            "device",
            "[[device]]",
            "did you mean `devices`?",
        );
        assert_problem(
            &BASE
                .replace("[[devices]]", "[devices]")
                .replace("[[devices.tags]]", "[devices.tags]"),
            "devices",
            "[devices]",
            "double brackets",
        );
        let found = problems("[gateway]\nid = \"g\"\n[mqtt]\nurl = \"mqtt://h\"\n");
        assert_eq!(
            found,
            [Problem {
                line: None,
                field: "devices".to_owned(),
                message: "no [[devices]]: configure at least one device".to_owned(),
            }]
        );
    }

    #[test]
    fn gateway_rules() {
        assert_problem(
            &BASE.replace("edge-01", "edge/01"),
            "gateway.id",
            "edge/01",
            "'/' is not allowed",
        );
        assert_problem(
            &BASE.replace("id = \"edge-01\"\n", ""),
            "gateway.id",
            "[gateway]",
            "missing required key `id`",
        );
        assert_problem(
            &with_gateway("data_dir = \"\""),
            "gateway.data_dir",
            "data_dir",
            "must not be empty",
        );
        assert_problem(
            &with_gateway("colour = 1"),
            "gateway.colour",
            "colour",
            "unknown key `colour`",
        );
    }

    #[test]
    fn buffer_rules() {
        let cases = [
            (
                "max_size = \"512KiB\"",
                "buffer.max_size",
                "at least 1MiB, not 512KiB",
            ),
            ("max_size = \"1TB\"", "buffer.max_size", "unknown unit `TB`"),
            ("max_size = \"big\"", "buffer.max_size", "is not a size"),
            (
                "when_full = \"drop_all\"",
                "buffer.when_full",
                "unknown value `drop_all`",
            ),
            (
                "commit_interval = \"2m\"",
                "buffer.commit_interval",
                "between 1ms and 1m",
            ),
            (
                "commit_interval = \"500us\"",
                "buffer.commit_interval",
                "between 1ms and 1m",
            ),
            (
                "commit_interval = 100",
                "buffer.commit_interval",
                BARE_DURATION,
            ),
            (
                "replay_rate = 0",
                "buffer.replay_rate",
                "between 1 and 1000000, not 0",
            ),
        ];
        for (line, field, fragment) in cases {
            assert_problem(&with_buffer(line), field, line, fragment);
        }
        let config = config(&with_buffer(
            "max_size = \"100MB\"\nwhen_full = \"drop_newest\"",
        ));
        assert_eq!(config.buffer.max_size, 100_000_000);
        assert_eq!(config.buffer.when_full, WhenFull::DropNewest);
        assert_eq!(config.buffer.replay_rate, None, "unlimited by default");
        let paced = self::tests::config(&with_buffer("replay_rate = 500"));
        assert_eq!(paced.buffer.replay_rate, Some(500));
    }

    #[test]
    fn mqtt_url_rules() {
        let cases = [
            ("mqtts://broker:8883", "TLS is not supported yet"),
            ("ssl://broker", "TLS is not supported yet"),
            ("http://broker", "unsupported scheme `http://`"),
            ("broker:1883", "expected `mqtt://HOST[:PORT]`"),
            (
                "mqtt://user:secret@broker",
                "credentials do not belong in the url",
            ),
            ("mqtt://broker/topic", "without a path"),
            ("mqtt://:1883", "no host"),
            ("mqtt://broker:0", "`0` is not a port"),
            ("mqtt://broker:65536", "`65536` is not a port"),
            ("mqtt://bro ker", "not a valid host"),
        ];
        for (url, fragment) in cases {
            assert_problem(&with_url(url), "mqtt.url", url, fragment);
        }
        for (url, host, port) in [
            ("tcp://broker", "broker", 1883),
            ("mqtt://10.0.0.5:1884/", "10.0.0.5", 1884),
            ("MQTT://[::1]:1885", "::1", 1885),
        ] {
            let mqtt = config(&with_url(url)).mqtt;
            assert_eq!((mqtt.host.as_str(), mqtt.port), (host, port), "{url}");
        }
        let secret = problems(&with_url("mqtt://user:hunter2@broker"));
        assert!(
            !format!("{secret:?}").contains("hunter2"),
            "the password is never echoed"
        );
        assert_problem(
            &BASE.replace("url = \"mqtt://127.0.0.1:1883\"\n", ""),
            "mqtt.url",
            "[mqtt]",
            "missing required key `url`",
        );
    }

    #[test]
    fn mqtt_rules() {
        let cases = [
            (
                "topic_prefix = \"edge/#\"",
                "mqtt.topic_prefix",
                "wildcards",
            ),
            (
                "topic_prefix = \"edge/+/x\"",
                "mqtt.topic_prefix",
                "wildcards",
            ),
            (
                "topic_prefix = \"/edge\"",
                "mqtt.topic_prefix",
                "start or end with `/`",
            ),
            (
                "topic_prefix = \"edge/\"",
                "mqtt.topic_prefix",
                "start or end with `/`",
            ),
            ("client_id = \"\"", "mqtt.client_id", "must not be empty"),
            ("format = \"xml\"", "mqtt.format", "unknown value `xml`"),
            (
                "max_inflight = 0",
                "mqtt.max_inflight",
                "between 1 and 1024, not 0",
            ),
            (
                "max_inflight = 1025",
                "mqtt.max_inflight",
                "between 1 and 1024, not 1025",
            ),
            (
                "max_inflight = \"many\"",
                "mqtt.max_inflight",
                "expected an integer",
            ),
            (
                "max_packet_size = \"8KiB\"",
                "mqtt.max_packet_size",
                "between 16KiB and 256MiB",
            ),
            (
                "max_packet_size = \"512MiB\"",
                "mqtt.max_packet_size",
                "between 16KiB and 256MiB",
            ),
            (
                "keep_alive = \"500ms\"",
                "mqtt.keep_alive",
                "between 1s and 65535s",
            ),
            ("keep_alive = 30", "mqtt.keep_alive", BARE_DURATION),
            (
                "ack_timeout = \"0s\"",
                "mqtt.ack_timeout",
                "must not be zero",
            ),
            ("username = \"\"", "mqtt.username", "must not be empty"),
            (
                "password = \"x\"",
                "mqtt.password",
                "did you mean `password_file`?",
            ),
        ];
        for (line, field, fragment) in cases {
            assert_problem(&with_mqtt(line), field, line, fragment);
        }
        let mqtt = config(&with_mqtt("shutdown_grace = \"0s\"\nkeep_alive = \"1.5s\"")).mqtt;
        assert_eq!(mqtt.shutdown_grace, Duration::ZERO, "zero grace is allowed");
        assert_eq!(mqtt.keep_alive, Duration::from_millis(1500));
    }

    #[test]
    fn device_rules() {
        let cases = [
            (
                "unit_id = 256",
                "devices[0].unit_id",
                "between 0 and 255, not 256",
            ),
            ("unit_id = -1", "devices[0].unit_id", "between 0 and 255"),
            (
                "unit_id = \"1\"",
                "devices[0].unit_id",
                "invalid type: string \"1\", expected an integer",
            ),
            (
                "max_registers_per_read = 0",
                "devices[0].max_registers_per_read",
                "between 1 and 125",
            ),
            (
                "max_registers_per_read = 126",
                "devices[0].max_registers_per_read",
                "between 1 and 125",
            ),
            ("max_gap = 126", "devices[0].max_gap", "between 0 and 125"),
            (
                "scan_interval = \"0ms\"",
                "devices[0].scan_interval",
                "must not be zero (at least 1ms)",
            ),
            (
                "scan_interval = \"500us\"",
                "devices[0].scan_interval",
                "at least 1ms, not 500us",
            ),
            (
                "scan_interval = 5",
                "devices[0].scan_interval",
                BARE_DURATION,
            ),
            ("timeout = \"0s\"", "devices[0].timeout", "must not be zero"),
            (
                "max_silence = \"8d\"",
                "devices[0].max_silence",
                "unknown unit `d`",
            ),
            (
                "report = \"sometimes\"",
                "devices[0].report",
                "unknown value `sometimes`",
            ),
            (
                "enabled = \"yes\"",
                "devices[0].enabled",
                "expected a boolean",
            ),
            (
                "adress = \"x\"",
                "devices[0].adress",
                "did you mean `address`?",
            ),
            ("tag = []", "devices[0].tag", "did you mean `tags`?"),
        ];
        for (line, field, fragment) in cases {
            assert_problem(&with_device(line), field, line, fragment);
        }
        assert_problem(
            &with_device("backoff_min = \"10s\"\nbackoff_max = \"1s\""),
            "devices[0].backoff_max",
            "backoff_max",
            "at least backoff_min (10s), not 1s",
        );
        let name_cases = [
            ("press 7", "' ' is not allowed"),
            ("press/7", "'/' is not allowed"),
            ("", "1 to 64 characters long, not 0"),
        ];
        for (name, fragment) in name_cases {
            let src = BASE.replace("name = \"press7\"", &format!("name = \"{name}\""));
            assert_problem(&src, "devices[0].name", "name = \"", fragment);
        }
        let long = "p".repeat(65);
        assert_problem(
            &BASE.replace("press7", &long),
            "devices[0].name",
            &long,
            "not 65",
        );
        config(&BASE.replace("press7", &"p".repeat(64)));
        config(&BASE.replace("press7", "Press_7.a-b"));
        config(&with_device("unit_id = 0\nmax_gap = 0"));
        let address_cases = [
            ("127.0.0.1", "has no port"),
            ("127.0.0.1:0", "`0` is not a port"),
            ("tcp://127.0.0.1:502", "without a scheme"),
            (":502", "no host"),
            ("[::1", "not a valid host"),
        ];
        for (address, fragment) in address_cases {
            let src = BASE.replace("127.0.0.1:5020", address);
            assert_problem(&src, "devices[0].address", "address = \"", fragment);
        }
        config(&BASE.replace("127.0.0.1:5020", "[fe80::1]:502"));
        config(&BASE.replace("127.0.0.1:5020", "plc-7.plant.local:502"));
    }

    #[test]
    fn protocol_rules() {
        assert_problem(
            &BASE.replace("\"modbus_tcp\"", "\"modbus\""),
            "devices[0].protocol",
            "protocol =",
            "unknown protocol `modbus`: use modbus_tcp, modbus_rtu, modbus_rtu_over_tcp or opcua",
        );
        // Without a known protocol the device's other keys mean nothing: only the protocol
        // is reported.
        for (protocol, message) in [
            (
                "\"opc-ua\"",
                "unknown protocol `opc-ua`: use modbus_tcp, modbus_rtu, modbus_rtu_over_tcp or \
                 opcua",
            ),
            ("5", "invalid type: integer `5`, expected a string"),
        ] {
            let src = OPCUA_BASE.replace("\"opcua\"", protocol);
            let found = problems(&src);
            assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
            assert_problem(&src, "devices[0].protocol", "protocol =", message);
        }
        let src = BASE.replace("protocol = \"modbus_tcp\"\n", "");
        let found = problems(&src);
        assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
        assert_problem(
            &src,
            "devices[0].protocol",
            "[[devices]]",
            "missing required key `protocol`: use modbus_tcp, modbus_rtu, modbus_rtu_over_tcp \
             or opcua",
        );
    }

    #[test]
    fn duplicate_device_names_name_the_first() {
        let second = "\n[[devices]]\nname = \"press7\" # again\nprotocol = \"modbus_tcp\"\n\
                      address = \"10.0.0.9:502\"\n  [[devices.tags]]\n  name = \"t\"\n  \
                      address = \"hr:0\"\n";
        let src = format!("{BASE}{second}");
        assert_problem(
            &src,
            "devices[1].name",
            "# again",
            "duplicate device name `press7`: devices[0] on line 8 has it already",
        );
    }

    #[test]
    fn an_enabled_device_needs_tags() {
        let src = BASE.replace(
            "\n  [[devices.tags]]\n  name = \"counter\"\n  address = \"hr:0\"\n",
            "\n",
        );
        assert_problem(
            &src,
            "devices[0].tags",
            "[[devices]]",
            "at least one [[devices.tags]]",
        );
        config(&src.replace(
            "address = \"127.0.0.1:5020\"",
            "address = \"127.0.0.1:5020\"\nenabled = false",
        ));
    }

    #[test]
    fn tag_rules() {
        let cases = [
            (
                "name = \"t\"\n  address = \"xr:1\"",
                "address",
                "unknown area `xr`: use hr (holding)",
            ),
            (
                "name = \"t\"\n  address = \"hr\"",
                "address",
                "expected `AREA:NUMBER`",
            ),
            (
                "name = \"t\"\n  address = \"hr:70000\"",
                "address",
                "`70000` is not a register number",
            ),
            (
                "name = \"t\"\n  address = \"co:1\"\n  type = \"f32\"",
                "type",
                "a coil (co:) holds a single bit",
            ),
            (
                "name = \"t\"\n  address = \"di:1\"\n  type = \"u16\"",
                "type",
                "a discrete input (di:) holds a single bit",
            ),
            (
                "name = \"t\"\n  address = \"hr:1\"\n  type = \"float\"",
                "type",
                "unknown type `float`",
            ),
            (
                "name = \"t\"\n  address = \"hr:1\"\n  type = \"u16\"\n  length = 2",
                "length",
                "only for type \"string\"",
            ),
            (
                "name = \"t\"\n  address = \"hr:1\"\n  type = \"string\"\n  length = 251",
                "length",
                "between 1 and 250, not 251",
            ),
            (
                "name = \"t\"\n  address = \"hr:1\"\n  type = \"string\"\n  length = 0",
                "length",
                "between 1 and 250, not 0",
            ),
            (
                "name = \"t\"\n  address = \"hr:1\"\n  order = \"ABDC\"",
                "order",
                "unknown order `ABDC`",
            ),
            (
                "name = \"t\"\n  address = \"hr:1\"\n  scale = 0.0",
                "scale",
                "must not be zero",
            ),
            (
                "name = \"t\"\n  address = \"hr:1\"\n  scale = nan",
                "scale",
                "finite",
            ),
            (
                "name = \"t\"\n  address = \"hr:1\"\n  scale = \"2\"",
                "scale",
                "expected a number",
            ),
            (
                "name = \"t\"\n  address = \"hr:1\"\n  offset = inf",
                "offset",
                "finite",
            ),
            (
                "name = \"t\"\n  address = \"hr:1\"\n  deadband = -0.5",
                "deadband",
                "must not be negative",
            ),
            (
                "name = \"t\"\n  address = \"hr:1\"\n  scan_interval = \"0s\"",
                "scan_interval",
                "must not be zero",
            ),
            (
                "name = \"t\"\n  address = \"hr:1\"\n  scan_interval = 250",
                "scan_interval",
                BARE_DURATION,
            ),
            (
                "name = \"t\"\n  address = \"hr:1\"\n  units = \"m\"",
                "units",
                "did you mean `unit`?",
            ),
            (
                "name = \"a/b\"\n  address = \"hr:1\"",
                "name",
                "'/' is not allowed",
            ),
            (
                "name = \"a#\"\n  address = \"hr:1\"",
                "name",
                "'#' is not allowed",
            ),
            (
                "name = \"a+b\"\n  address = \"hr:1\"",
                "name",
                "'+' is not allowed",
            ),
            (
                "name = \"a\\u0000\"\n  address = \"hr:1\"",
                "name",
                "'\\0' is not allowed",
            ),
            (
                "name = \" lead\"\n  address = \"hr:1\"",
                "name",
                "start or end with a space",
            ),
            (
                "name = \"\"\n  address = \"hr:1\"",
                "name",
                "1 to 128 characters long, not 0",
            ),
        ];
        for (lines, key, fragment) in cases {
            let src = with_tag(&format!("  {lines}"));
            let needle = lines
                .lines()
                .find(|l| l.trim_start().starts_with(key))
                .unwrap_or(lines);
            assert_problem(
                &src,
                &format!("devices[0].tags[1].{key}"),
                needle.trim(),
                fragment,
            );
        }
        let long = "t".repeat(129);
        let src = with_tag(&format!("  name = \"{long}\"\n  address = \"hr:1\""));
        assert_problem(&src, "devices[0].tags[1].name", &long, "not 129");
        config(&with_tag(&format!(
            "  name = \"{}\"\n  address = \"hr:1\"",
            "t".repeat(128)
        )));
        config(&with_tag(
            "  name = \"Motor 1 speed (rpm) °\"\n  address = \"hr:1\"\n  type = \"bool\"",
        ));
    }

    #[test]
    fn a_string_tag_needs_a_length() {
        let src = with_tag("  name = \"recipe\"\n  address = \"hr:10\"\n  type = \"string\"");
        let header = src
            .lines()
            .enumerate()
            .filter(|(_, l)| l.contains("[[devices.tags]]"))
            .last()
            .map(|(i, _)| i + 1);
        let found = problems(&src);
        assert_eq!(
            found,
            [Problem {
                line: header,
                field: "devices[0].tags[1].length".to_owned(),
                message: "type \"string\" needs `length`, its size in bytes (1 to 250)".to_owned(),
            }]
        );
    }

    #[test]
    fn a_tag_must_end_by_register_65535() {
        let src = with_tag("  name = \"t\"\n  address = \"hr:65535\"\n  type = \"f32\"");
        assert_problem(
            &src,
            "devices[0].tags[1].address",
            "hr:65535",
            "`hr:65535` with type \"f32\" needs 2 registers and extends past register 65535",
        );
        config(&with_tag(
            "  name = \"t\"\n  address = \"hr:65534\"\n  type = \"f32\"",
        ));
        config(&with_tag("  name = \"t\"\n  address = \"co:65535\""));
    }

    #[test]
    fn a_tag_must_fit_in_one_read() {
        let src = with_device("max_registers_per_read = 2");
        let wide = format!(
            "{src}\n  [[devices.tags]]\n  name = \"t\"\n  address = \"hr:4\"\n  type = \"f64\"\n"
        );
        assert_problem(
            &wide,
            "devices[0].tags[1].type",
            "f64",
            "type \"f64\" needs 4 registers, more than the device's max_registers_per_read (2)",
        );
        let text = format!(
            "{src}\n  [[devices.tags]]\n  name = \"t\"\n  address = \"hr:4\"\n  type = \"string\"\n  length = 5\n"
        );
        assert_problem(
            &text,
            "devices[0].tags[1].length",
            "length = 5",
            "needs 3 registers",
        );
        config(&format!(
            "{src}\n  [[devices.tags]]\n  name = \"t\"\n  address = \"hr:4\"\n  type = \"i32\"\n"
        ));
    }

    #[test]
    fn overlapping_tags_name_the_first() {
        let src = r#"[gateway]
id = "g"
[mqtt]
url = "mqtt://h"
[[devices]]
name = "d"
protocol = "modbus_tcp"
address = "h:502"
  [[devices.tags]]
  name = "a"
  address = "hr:1"
  type = "f32"
  [[devices.tags]]
  name = "other_area"
  address = "ir:1"
  [[devices.tags]]
  name = "b"
  address = "hr:2"
  [[devices.tags]]
  name = "c"
  address = "hr:0"
  type = "u64"
  [[devices.tags]]
  name = "s"
  address = "hr:20"
  type = "string"
  length = 20
  [[devices.tags]]
  name = "inside_s"
  address = "hr:29"
"#;
        let found = problems(src);
        let summary: Vec<(Option<usize>, &str, &str)> = found
            .iter()
            .map(|p| (p.line, p.field.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                (
                    Some(18),
                    "devices[0].tags[2].address",
                    "overlaps tag `a` (hr:1..hr:2)"
                ),
                (
                    Some(21),
                    "devices[0].tags[3].address",
                    "overlaps tag `a` (hr:1..hr:2)"
                ),
                (
                    Some(30),
                    "devices[0].tags[5].address",
                    "overlaps tag `s` (hr:20..hr:29)"
                ),
            ]
        );
        let adjacent = src
            .replace("hr:2\"", "hr:3\"")
            .replace("hr:0\"\n  type = \"u64\"", "hr:40\"\n  type = \"u64\"")
            .replace("hr:29", "hr:30");
        config(&adjacent);
    }

    #[test]
    fn duplicate_tag_names_name_the_first() {
        let src = with_tag("  name = \"counter\" # again\n  address = \"hr:5\"");
        assert_problem(
            &src,
            "devices[0].tags[1].name",
            "# again",
            "duplicate tag name `counter`: the tag on line 13 has it already",
        );
        // Names are unique per device, not across devices.
        let second =
            "\n[[devices]]\nname = \"other\"\nprotocol = \"modbus_tcp\"\naddress = \"h:502\"\n  \
                      [[devices.tags]]\n  name = \"counter\"\n  address = \"hr:0\"\n";
        config(&format!("{BASE}{second}"));
    }

    #[test]
    fn every_bad_value_in_one_unit_is_reported() {
        let src = with_mqtt("keepalive = \"1s\"\nmax_inflight = \"x\"\nack_timeout = 5\nqos = 1");
        let fields: Vec<String> = problems(&src).into_iter().map(|p| p.field).collect();
        assert_eq!(
            fields,
            [
                "mqtt.keepalive",
                "mqtt.max_inflight",
                "mqtt.ack_timeout",
                "mqtt.qos"
            ]
        );
        // A required key of the wrong type is reported once, not also as missing.
        let found = problems(&BASE.replace("id = \"edge-01\"", "id = 7"));
        assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
        assert!(found[0]
            .message
            .contains("invalid type: integer `7`, expected a string"));
    }

    #[test]
    fn sizes_parse() {
        let table = [
            ("1000", 1000),
            ("0", 0),
            ("10B", 10),
            ("64KiB", 64 * 1024),
            ("512MiB", 512 << 20),
            ("1GiB", 1 << 30),
            ("100MB", 100_000_000),
            ("5KB", 5_000),
            ("2GB", 2_000_000_000),
            (" 1 GiB ", 1 << 30),
            ("1mib", 1 << 20),
        ];
        for (text, bytes) in table {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for text in [
            "",
            "MiB",
            "1.5GiB",
            "-1",
            "1TiB",
            "1 2",
            "99999999999999999999",
            "20000000000GiB",
        ] {
            assert!(parse_size(text).is_err(), "{text} must be refused");
        }
        assert_eq!(fmt_size(1 << 30), "1GiB");
        assert_eq!(fmt_size(100_000_000), "100MB");
        assert_eq!(fmt_size(1001), "1001B");
    }

    #[test]
    fn durations_parse() {
        let table = [
            ("250ms", Duration::from_millis(250)),
            ("1s", Duration::from_secs(1)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("500us", Duration::from_micros(500)),
            ("1.5s", Duration::from_millis(1500)),
            ("0.25ms", Duration::from_micros(250)),
            ("0s", Duration::ZERO),
            (" 30 s ", Duration::from_secs(30)),
            ("168h", MAX_DURATION),
        ];
        for (text, duration) in table {
            assert_eq!(parse_duration(text), Ok(duration), "{text}");
        }
        let refused = [
            ("", "is not a duration"),
            ("s", "is not a duration"),
            ("1.s", "is not a duration"),
            (".5s", "is not a duration"),
            ("1.2.3s", "is not a duration"),
            ("-1s", "is not a duration"),
            ("5", "has no unit"),
            ("5d", "unknown unit `d`"),
            ("5 sec", "unknown unit `sec`"),
            ("169h", "too long"),
            ("99999999999999999999999999999999999h", "too long"),
        ];
        for (text, fragment) in refused {
            match parse_duration(text) {
                Ok(d) => panic!("{text} parsed as {d:?}"),
                Err(e) => assert!(e.to_string().contains(fragment), "{text}: {e}"),
            }
        }
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(fmt_duration(Duration::from_secs(120)), "2m");
        assert_eq!(fmt_duration(Duration::from_nanos(5)), "5ns");
    }

    #[test]
    fn load_resolves_relative_paths_against_the_config_directory() {
        let dir = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(e) => panic!("tempdir: {e}"),
        };
        let secret = dir.path().join("mqtt.password");
        let file = dir.path().join("gateway.toml");
        let src = with_mqtt("username = \"gw\"\npassword_file = \"mqtt.password\"");
        let writes = [
            std::fs::write(&secret, "hunter2"),
            std::fs::write(&file, src),
        ];
        assert!(writes.iter().all(Result::is_ok), "{writes:?}");
        let config = match load(&file) {
            Ok(config) => config,
            Err(errors) => panic!("{errors}"),
        };
        assert_eq!(config.gateway.data_dir, dir.path().join("data"));
        assert_eq!(config.mqtt.password_file, Some(secret));
        assert!(
            !format!("{config:?}").contains("hunter2"),
            "the secret is not stored"
        );
    }

    #[test]
    fn load_reports_an_unreadable_password_file_with_its_line() {
        let dir = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(e) => panic!("tempdir: {e}"),
        };
        let file = dir.path().join("gateway.toml");
        let src = with_mqtt("password_file = \"missing.password\"");
        assert!(std::fs::write(&file, &src).is_ok());
        let errors = match load(&file) {
            Ok(_) => panic!("a missing password file is a problem"),
            Err(errors) => errors,
        };
        assert_eq!(errors.problems.len(), 1, "{errors}");
        let problem = &errors.problems[0];
        assert_eq!(problem.field, "mqtt.password_file");
        assert_eq!(problem.line, Some(line_containing(&src, "password_file")));
        assert!(problem.message.contains("cannot read"), "{problem}");
        // `parse` touches no file, so the same text passes there.
        config(&src);
    }

    #[test]
    fn load_reports_a_missing_file_as_one_problem() {
        let errors = match load(Path::new("/nonexistent/gateway.toml")) {
            Ok(_) => panic!("no such file"),
            Err(errors) => errors,
        };
        assert_eq!(errors.file, "/nonexistent/gateway.toml");
        assert_eq!(errors.problems.len(), 1);
        assert!(errors.problems[0]
            .message
            .starts_with("cannot read the file"));
    }

    // ---- OPC UA devices ------------------------------------------------------------------

    /// A small valid file with one OPC UA device that the OPC UA rule tests edit.
    const OPCUA_BASE: &str = r#"[gateway]
id = "edge-01"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "oven2"
protocol = "opcua"
endpoint = "opc.tcp://127.0.0.1:4840"

  [[devices.tags]]
  name = "temperature"
  node_id = "ns=2;s=Oven.Temp"
"#;

    /// The issue's OPC UA example, every key set.
    const OPCUA_FULL: &str = r#"[gateway]
id = "edge-01"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "oven2"
protocol = "opcua"
endpoint = "opc.tcp://127.0.0.1:4840"
security_policy = "Basic256Sha256"
security_mode = "SignAndEncrypt"
username = "operator"
password_file = "/path"
pki_dir = "./pki"
trust_server_cert = true
publishing_interval = "250ms"
mode = "poll"
scan_interval = "2s"
timeout = "3s"
backoff_min = "100ms"
backoff_max = "10s"
enabled = true

  [[devices.tags]]
  name = "temperature"
  node_id = "ns=2;s=Oven.Temp"
  sampling_interval = "100ms"
  deadband = 0.1
  queue_size = 20

  [[devices.tags]]
  name = "door"
  browse_path = "Objects/Oven/2:Door"
"#;

    fn with_opcua_device(lines: &str) -> String {
        let endpoint = "endpoint = \"opc.tcp://127.0.0.1:4840\"\n";
        OPCUA_BASE.replace(endpoint, &format!("{endpoint}{lines}\n"))
    }

    fn with_opcua_tag(lines: &str) -> String {
        format!("{OPCUA_BASE}\n  [[devices.tags]]\n{lines}\n")
    }

    fn node_id(text: &str) -> NodeRef {
        match parse_node_id(text) {
            Ok(id) => NodeRef::Id(id),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn an_opcua_device_with_every_key_parses_into_its_settings() {
        let config = config(OPCUA_FULL);
        let [device] = &config.devices[..] else {
            panic!("expected one device, got {:?}", config.devices);
        };
        assert_eq!(&*device.name, "oven2");
        assert_eq!(device.scan_interval, Duration::from_secs(2));
        assert_eq!(device.tag_count(), 2);
        let expected = OpcUaSettings {
            endpoint: "opc.tcp://127.0.0.1:4840".to_owned(),
            security_policy: SecurityPolicy::Basic256Sha256,
            security_mode: SecurityMode::SignAndEncrypt,
            identity: Identity::UserName {
                user: "operator".to_owned(),
                password_file: PathBuf::from("/path"),
            },
            pki_dir: PathBuf::from("./pki"),
            trust_server_cert: true,
            publishing_interval: Duration::from_millis(250),
            mode: Mode::Poll,
            scan_interval: Duration::from_secs(2),
            timeout: Duration::from_secs(3),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            tags: vec![
                OpcUaTag {
                    name: "temperature".into(),
                    node: node_id("ns=2;s=Oven.Temp"),
                    sampling_interval: Duration::from_millis(100),
                    deadband: Some(0.1),
                    queue_size: 20,
                },
                OpcUaTag {
                    name: "door".into(),
                    node: NodeRef::BrowsePath(vec!["Oven".to_owned(), "2:Door".to_owned()]),
                    sampling_interval: Duration::from_millis(250),
                    deadband: None,
                    queue_size: 10,
                },
            ],
        };
        assert_eq!(opcua(device), &expected);
    }

    #[test]
    fn an_opcua_device_takes_the_runtime_defaults_and_keeps_its_pki_in_the_data_dir() {
        let config = config(OPCUA_BASE);
        let device = &config.devices[0];
        assert_eq!(device.scan_interval, Duration::from_secs(1));
        let mut expected = OpcUaSettings::new(
            "opc.tcp://127.0.0.1:4840",
            vec![OpcUaTag {
                name: "temperature".into(),
                node: node_id("ns=2;s=Oven.Temp"),
                sampling_interval: Duration::from_millis(500),
                deadband: None,
                queue_size: 10,
            }],
        );
        expected.pki_dir = PathBuf::from("./data/pki");
        assert_eq!(opcua(device), &expected);
        let settings = opcua(device);
        assert_eq!(
            (settings.security_policy, settings.security_mode),
            (SecurityPolicy::None, SecurityMode::None)
        );
        assert_eq!(settings.identity, Identity::Anonymous);
        assert!(!settings.trust_server_cert);
        assert_eq!(settings.mode, Mode::Subscribe);
        assert_eq!(settings.timeout, Duration::from_secs(5));

        let src = with_opcua_device("publishing_interval = \"2s\"").replace(
            "id = \"edge-01\"\n",
            "id = \"edge-01\"\ndata_dir = \"/var/lib/gw\"\n",
        );
        let config = self::config(&src);
        let settings = opcua(&config.devices[0]);
        assert_eq!(settings.pki_dir, PathBuf::from("/var/lib/gw/pki"));
        assert_eq!(
            settings.tags[0].sampling_interval,
            Duration::from_secs(2),
            "a tag samples at the publishing interval unless it sets its own"
        );
    }

    #[test]
    fn every_bad_opcua_field_is_reported_at_its_line_at_once() {
        let src = r#"[gateway]
id = "edge-01"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "oven2"
protocol = "opcua"
endpoint = "http://127.0.0.1:4840"
security_mode = "Sign"
username = "operator"
publishing_intervall = "1s"
address = "127.0.0.1:4840"

  [[devices.tags]]
  name = "temperature"
  node_id = "ns=2;x=Oven.Temp"

  [[devices.tags]]
  name = "pressure"
  node_id = "ns=2;s=Oven.Pressure"
  browse_path = "Objects/Oven/Pressure"

  [[devices.tags]]
  name = "level"
  type = "f32"

  [[devices.tags]]
  name = "speed"
  node_id = "ns=2;s=Oven.Speed"
  queue_size = 0
  deadband = -1.0

  [[devices.tags]]
  name = "speed_again"
  node_id = "ns=2;s=Oven.Speed"
"#;
        let found = problems(src);
        let summary: Vec<(Option<usize>, &str)> =
            found.iter().map(|p| (p.line, p.field.as_str())).collect();
        assert_eq!(
            summary,
            [
                (Some(10), "devices[0].endpoint"),
                (Some(11), "devices[0].security_mode"),
                (Some(12), "devices[0].username"),
                (Some(13), "devices[0].publishing_intervall"),
                (Some(14), "devices[0].address"),
                (Some(18), "devices[0].tags[0].node_id"),
                (Some(23), "devices[0].tags[1].browse_path"),
                (Some(25), "devices[0].tags[2].node_id"),
                (Some(27), "devices[0].tags[2].type"),
                (Some(32), "devices[0].tags[3].queue_size"),
                (Some(33), "devices[0].tags[3].deadband"),
                (Some(37), "devices[0].tags[4].node_id"),
            ],
            "got:\n{}",
            listing(&found)
        );
        let messages: Vec<&str> = found.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "endpoint \"http://127.0.0.1:4840\" must start with \"opc.tcp://\"",
                "security_mode \"Sign\" needs a security_policy other than \"None\"",
                "`username` needs `password_file`, the file holding the password",
                "unknown key `publishing_intervall`; did you mean `publishing_interval`?",
                "unknown key `address` for protocol `opcua` (it belongs to protocols `modbus_tcp` \
                 and `modbus_rtu_over_tcp`); expected one of: name, protocol, endpoint, \
                 security_policy, security_mode, username, password_file, user_cert_file, \
                 user_key_file, pki_dir, trust_server_cert, publishing_interval, mode, \
                 scan_interval, timeout, backoff_min, backoff_max, enabled, tags",
                "invalid node id \"ns=2;x=Oven.Temp\"; expected ns=<index>;<i|s|g|b>=<value>, \
                 e.g. \"ns=2;s=Oven.Temp\" or \"i=2258\"",
                "set either `node_id` or `browse_path`, not both",
                "a tag needs `node_id` (e.g. \"ns=2;s=Oven.Temp\") or `browse_path` \
                 (e.g. \"Objects/Oven/Temp\")",
                "unknown key `type` for protocol `opcua` (it belongs to protocols `modbus_tcp`, \
                 `modbus_rtu` and `modbus_rtu_over_tcp`); expected one of: name, node_id, \
                 browse_path, sampling_interval, deadband, queue_size",
                "must be between 1 and 10000, not 0",
                "must not be negative",
                "duplicate node `ns=2;s=Oven.Speed`: tag `speed` on line 31 reads it already",
            ]
        );
        let rendered = match parse(src, "gateway.toml") {
            Ok(_) => panic!("expected problems"),
            Err(errors) => errors.to_string(),
        };
        assert!(rendered.starts_with(
            "gateway.toml:10: devices[0].endpoint: endpoint \"http://127.0.0.1:4840\" must \
             start with \"opc.tcp://\"\ngateway.toml:11: devices[0].security_mode: "
        ));
    }

    #[test]
    fn opcua_device_rules() {
        for (endpoint, fragment) in [
            ("opc.tcp://:4840", "has no host"),
            ("opc.tcp://plc:0", "has an invalid port \"0\""),
            ("opc.tcp://plc:port", "has an invalid port \"port\""),
            ("127.0.0.1:4840", "must start with \"opc.tcp://\""),
        ] {
            let src = OPCUA_BASE.replace("opc.tcp://127.0.0.1:4840", endpoint);
            assert_problem(&src, "devices[0].endpoint", "endpoint =", fragment);
        }
        let cases = [
            (
                "security_policy = \"Basic128Rsa15\"",
                "security_policy",
                "unknown security policy \"Basic128Rsa15\"; expected one of \"None\", \
                 \"Basic256Sha256\", \"Aes128_Sha256_RsaOaep\", \"Aes256_Sha256_RsaPss\"",
            ),
            (
                "security_mode = \"Encrypt\"",
                "security_mode",
                "unknown security mode \"Encrypt\"; expected one of \"None\", \"Sign\", \
                 \"SignAndEncrypt\"",
            ),
            (
                "security_policy = \"Basic256Sha256\"\nsecurity_mode = \"None\"",
                "security_mode",
                "security_policy \"Basic256Sha256\" needs security_mode \"Sign\" or \
                 \"SignAndEncrypt\"",
            ),
            (
                "mode = \"push\"",
                "mode",
                "unknown value `push`, expected `subscribe` or `poll`",
            ),
            (
                "publishing_interval = \"0ms\"",
                "publishing_interval",
                "must not be zero",
            ),
            (
                "publishing_interval = 500",
                "publishing_interval",
                BARE_DURATION,
            ),
            (
                "scan_interval = \"0s\"",
                "scan_interval",
                "must not be zero (at least 1ms)",
            ),
            ("timeout = \"0s\"", "timeout", "must not be zero"),
            (
                "backoff_min = \"10s\"\nbackoff_max = \"1s\"",
                "backoff_max",
                "at least backoff_min (10s), not 1s",
            ),
            (
                "trust_server_cert = \"yes\"",
                "trust_server_cert",
                "expected a boolean",
            ),
            ("pki_dir = \"\"", "pki_dir", "must not be empty"),
            (
                "endpiont = \"x\"",
                "endpiont",
                "unknown key `endpiont`; did you mean `endpoint`?",
            ),
        ];
        for (lines, key, fragment) in cases {
            let src = with_opcua_device(lines);
            let needle = lines.lines().find(|l| l.starts_with(key)).unwrap_or(lines);
            assert_problem(&src, &format!("devices[0].{key}"), needle, fragment);
        }
        assert_problem(
            &OPCUA_BASE.replace("endpoint = \"opc.tcp://127.0.0.1:4840\"\n", ""),
            "devices[0].endpoint",
            "[[devices]]",
            "missing required key `endpoint`",
        );
        // The policy's own problem is reported, not also a pairing with the default mode.
        let found = problems(&with_opcua_device("security_policy = \"Basic128\""));
        assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
        for (policy, mode) in [
            ("None", "None"),
            ("Basic256Sha256", "Sign"),
            ("Aes128_Sha256_RsaOaep", "SignAndEncrypt"),
            ("Aes256_Sha256_RsaPss", "Sign"),
        ] {
            let config = config(&with_opcua_device(&format!(
                "security_policy = \"{policy}\"\nsecurity_mode = \"{mode}\""
            )));
            let settings = opcua(&config.devices[0]);
            assert_eq!(
                (
                    settings.security_policy.name(),
                    settings.security_mode.name()
                ),
                (policy, mode)
            );
        }
        config(&OPCUA_BASE.replace("127.0.0.1:4840", "plc-7.plant.local:4840/UA/Server"));
    }

    #[test]
    fn an_opcua_user_identity_is_a_name_with_a_password_file_or_a_certificate_with_a_key() {
        let cases = [
            (
                "username = \"operator\"",
                "username",
                "`username` needs `password_file`",
            ),
            (
                "password_file = \"/run/pw\"",
                "password_file",
                "`password_file` needs `username`",
            ),
            (
                "user_cert_file = \"/etc/gw/user.der\"",
                "user_cert_file",
                "`user_cert_file` needs `user_key_file`",
            ),
            (
                "user_key_file = \"/etc/gw/user.pem\"",
                "user_key_file",
                "`user_key_file` needs `user_cert_file`",
            ),
            (
                "username = \"\"\npassword_file = \"/run/pw\"",
                "username",
                "must not be empty",
            ),
            (
                "password = \"secret\"",
                "password",
                "did you mean `password_file`?",
            ),
        ];
        for (lines, key, fragment) in cases {
            let src = with_opcua_device(lines);
            let needle = lines.lines().find(|l| l.starts_with(key)).unwrap_or(lines);
            assert_problem(&src, &format!("devices[0].{key}"), needle, fragment);
        }
        let both = with_opcua_device(
            "username = \"operator\"\npassword_file = \"/run/pw\"\n\
             user_cert_file = \"/etc/gw/user.der\"\nuser_key_file = \"/etc/gw/user.pem\"",
        );
        let found = problems(&both);
        assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
        assert_problem(
            &both,
            "devices[0].user_cert_file",
            "user_cert_file",
            "a device has one user identity: `username` with `password_file`, or \
             `user_cert_file` with `user_key_file`, not both",
        );
        // A partner with a bad value is reported for its value, not as missing.
        let found = problems(&with_opcua_device(
            "username = \"operator\"\npassword_file = 7",
        ));
        assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
        assert_eq!(found[0].field, "devices[0].password_file");

        let config = config(&with_opcua_device(
            "user_cert_file = \"/etc/gw/user.der\"\nuser_key_file = \"/etc/gw/user.pem\"",
        ));
        assert_eq!(
            opcua(&config.devices[0]).identity,
            Identity::X509 {
                cert_file: PathBuf::from("/etc/gw/user.der"),
                key_file: PathBuf::from("/etc/gw/user.pem"),
            }
        );
    }

    #[test]
    fn opcua_tag_rules() {
        let cases = [
            (
                "name = \"t\"\n  node_id = \"i=abc\"",
                "node_id",
                "invalid node id \"i=abc\"",
            ),
            (
                "name = \"t\"\n  node_id = \"\"",
                "node_id",
                "invalid node id \"\"",
            ),
            (
                "name = \"t\"\n  browse_path = \"Objects//Temp\"",
                "browse_path",
                "invalid browse path \"Objects//Temp\"",
            ),
            (
                "name = \"t\"\n  browse_path = \"Objects\"",
                "browse_path",
                "invalid browse path",
            ),
            (
                "name = \"t\"\n  node_id = \"i=1\"\n  queue_size = 10001",
                "queue_size",
                "between 1 and 10000, not 10001",
            ),
            (
                "name = \"t\"\n  node_id = \"i=1\"\n  deadband = nan",
                "deadband",
                "must be a finite number",
            ),
            (
                "name = \"t\"\n  node_id = \"i=1\"\n  deadband = inf",
                "deadband",
                "must be a finite number",
            ),
            (
                "name = \"t\"\n  node_id = \"i=1\"\n  sampling_interval = \"fast\"",
                "sampling_interval",
                "`fast` is not a duration",
            ),
            (
                "name = \"t\"\n  node_id = \"i=1\"\n  address = \"hr:1\"",
                "address",
                "unknown key `address` for protocol `opcua` (it belongs to protocols \
                 `modbus_tcp`, `modbus_rtu` and `modbus_rtu_over_tcp`)",
            ),
            (
                "name = \"t\"\n  node_id = \"i=1\"\n  nodeid = \"i=2\"",
                "nodeid",
                "did you mean `node_id`?",
            ),
            (
                "name = \"a/b\"\n  node_id = \"i=1\"",
                "name",
                "'/' is not allowed",
            ),
            (
                "name = \"temperature\" # again\n  node_id = \"i=1\"",
                "name",
                "duplicate tag name `temperature`: the tag on line 13 has it already",
            ),
        ];
        for (lines, key, fragment) in cases {
            let src = with_opcua_tag(&format!("  {lines}"));
            let needle = lines
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with(key))
                .unwrap_or(lines);
            assert_problem(&src, &format!("devices[0].tags[1].{key}"), needle, fragment);
        }
        assert_problem(
            &OPCUA_BASE.replace("  node_id = \"ns=2;s=Oven.Temp\"\n", ""),
            "devices[0].tags[0].node_id",
            "[[devices.tags]]",
            "a tag needs `node_id`",
        );
        let src = OPCUA_BASE.replace(
            "\n  [[devices.tags]]\n  name = \"temperature\"\n  node_id = \"ns=2;s=Oven.Temp\"\n",
            "\n",
        );
        assert_problem(
            &src,
            "devices[0].tags",
            "[[devices]]",
            "at least one [[devices.tags]]",
        );
        config(&src.replace(
            "protocol = \"opcua\"",
            "protocol = \"opcua\"\nenabled = false",
        ));

        // Zero sampling asks for the server's fastest rate; any finite deadband >= 0 is fine.
        let config = config(&with_opcua_tag(
            "  name = \"t\"\n  node_id = \"i=2258\"\n  sampling_interval = \"0ms\"\n  \
             deadband = 0.0\n  queue_size = 10000",
        ));
        let tag = &opcua(&config.devices[0]).tags[1];
        assert_eq!(tag.sampling_interval, Duration::ZERO);
        assert_eq!((tag.deadband, tag.queue_size), (Some(0.0), 10_000));
    }

    #[test]
    fn the_same_opcua_node_twice_in_a_device_is_refused_whatever_its_spelling() {
        for (first, second) in [
            ("node_id = \"i=2258\"", "node_id = \"ns=0;i=2258\""),
            (
                "browse_path = \"Objects/Oven/Temp\"",
                "browse_path = \"Oven/Temp\"",
            ),
        ] {
            let src = with_opcua_tag(&format!("  name = \"a\"\n  {first}"));
            let src = format!("{src}\n  [[devices.tags]]\n  name = \"b\"\n  {second}\n");
            let key = second.split(' ').next().unwrap_or(second);
            assert_problem(
                &src,
                &format!("devices[0].tags[2].{key}"),
                second,
                "reads it already",
            );
        }
        // A node id and a browse path are different references, even to the same node; and
        // different devices may read the same node.
        config(&with_opcua_tag(
            "  name = \"a\"\n  browse_path = \"Objects/Oven/Temp\"",
        ));
        let second = OPCUA_BASE
            .split_once("[[devices]]")
            .map(|(_, device)| device.replace("oven2", "oven3"))
            .unwrap_or_default();
        config(&format!("{OPCUA_BASE}\n[[devices]]{second}"));
    }

    #[test]
    fn a_poll_mode_device_accepts_the_subscription_keys_of_its_tags() {
        let src = with_opcua_device("mode = \"poll\"\nscan_interval = \"250ms\"");
        let src = format!(
            "{src}\n  [[devices.tags]]\n  name = \"p\"\n  node_id = \"i=1\"\n  \
             sampling_interval = \"1s\"\n  deadband = 0.5\n  queue_size = 1\n"
        );
        let config = config(&src);
        let settings = opcua(&config.devices[0]);
        assert_eq!(settings.mode, Mode::Poll);
        assert_eq!(settings.scan_interval, Duration::from_millis(250));
    }

    #[test]
    fn each_protocols_keys_are_unknown_to_the_other() {
        assert_problem(
            &with_device("endpoint = \"opc.tcp://h:4840\""),
            "devices[0].endpoint",
            "endpoint",
            "unknown key `endpoint` for protocol `modbus_tcp` (it belongs to protocol `opcua`)",
        );
        assert_problem(
            &with_tag("  name = \"t\"\n  address = \"hr:1\"\n  node_id = \"i=1\""),
            "devices[0].tags[1].node_id",
            "node_id",
            "unknown key `node_id` for protocol `modbus_tcp` (it belongs to protocol `opcua`)",
        );
        assert_problem(
            &with_opcua_device("unit_id = 1"),
            "devices[0].unit_id",
            "unit_id",
            "unknown key `unit_id` for protocol `opcua` (it belongs to protocols `modbus_tcp`, \
             `modbus_rtu` and `modbus_rtu_over_tcp`)",
        );
        // Keys both have are known to both.
        config(&with_opcua_device(
            "scan_interval = \"1s\"\ntimeout = \"1s\"\nenabled = true",
        ));
    }

    #[test]
    fn modbus_and_opcua_devices_live_side_by_side() {
        let opcua_device = OPCUA_BASE
            .split_once("[[devices]]")
            .map(|(_, device)| device.to_owned())
            .unwrap_or_default();
        let config = config(&format!("{BASE}\n[[devices]]{opcua_device}"));
        let kinds: Vec<(&str, usize)> = config
            .devices
            .iter()
            .map(|d| (&*d.name, d.tag_count()))
            .collect();
        assert_eq!(kinds, [("press7", 1), ("oven2", 1)]);
        assert!(matches!(config.devices[1].kind, DeviceKind::OpcUa(_)));
    }

    #[test]
    fn load_resolves_opcua_paths_against_the_config_directory_and_checks_the_files() {
        let dir = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(e) => panic!("tempdir: {e}"),
        };
        let file = dir.path().join("gateway.toml");
        let cert = dir.path().join("user.der");
        let key = dir.path().join("user.pem");
        let src = with_opcua_device(
            "pki_dir = \"certs\"\nuser_cert_file = \"user.der\"\nuser_key_file = \"user.pem\"",
        );
        let writes = [
            std::fs::write(&cert, "cert"),
            std::fs::write(&key, "key"),
            std::fs::write(&file, &src),
        ];
        assert!(writes.iter().all(Result::is_ok), "{writes:?}");
        let loaded = match load(&file) {
            Ok(config) => config,
            Err(errors) => panic!("{errors}"),
        };
        let settings = opcua(&loaded.devices[0]);
        assert_eq!(settings.pki_dir, dir.path().join("certs"));
        assert_eq!(
            settings.identity,
            Identity::X509 {
                cert_file: cert,
                key_file: key.clone(),
            }
        );

        // Without pki_dir, the PKI lives in the resolved data directory.
        let plain = dir.path().join("plain.toml");
        assert!(std::fs::write(&plain, OPCUA_BASE).is_ok());
        match load(&plain) {
            Ok(config) => assert_eq!(
                opcua(&config.devices[0]).pki_dir,
                dir.path().join("data").join("pki")
            ),
            Err(errors) => panic!("{errors}"),
        }

        assert!(std::fs::remove_file(&key).is_ok());
        let errors = match load(&file) {
            Ok(_) => panic!("a missing key file is a problem"),
            Err(errors) => errors,
        };
        assert_eq!(errors.problems.len(), 1, "{errors}");
        let problem = &errors.problems[0];
        assert_eq!(problem.field, "devices[0].user_key_file");
        assert_eq!(problem.line, Some(line_containing(&src, "user_key_file")));
        assert!(problem.message.contains("cannot read"), "{problem}");
        // `parse` touches no file.
        config(&src);

        let secret = dir.path().join("oven.password");
        let with_user = with_opcua_device("username = \"op\"\npassword_file = \"oven.password\"");
        assert!(std::fs::write(&file, &with_user).is_ok());
        assert!(load(&file).is_err(), "the password file does not exist yet");
        assert!(std::fs::write(&secret, "hunter2").is_ok());
        match load(&file) {
            Ok(config) => assert_eq!(
                opcua(&config.devices[0]).identity,
                Identity::UserName {
                    user: "op".to_owned(),
                    password_file: secret,
                }
            ),
            Err(errors) => panic!("{errors}"),
        }
    }

    // ---- Modbus RTU and multi-unit lines ---------------------------------------------------

    /// The issue's RTU line, with a second unit.
    const RTU: &str = r#"[gateway]
id = "edge-01"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "meters"
protocol = "modbus_rtu"             # or "modbus_rtu_over_tcp" with address = "host:port"
port = "/dev/ttyUSB0"
baud_rate = 19200
parity = "even"                     # none, even, odd
data_bits = 8
stop_bits = 1
timeout = "300ms"
inter_request_delay = "0ms"         # some devices need a pause between transactions
scan_interval = "1s"

  [[devices.units]]                 # several unit ids share the line
  unit_id = 3
  name = "meter3"
    [[devices.units.tags]]
    name = "active_power"
    address = "ir:12"
    type = "f32"
    order = "CDAB"

  [[devices.units]]
  unit_id = 4
  name = "meter4"
    [[devices.units.tags]]
    name = "active_power"
    address = "ir:12"
    type = "f32"
    order = "CDAB"
    [[devices.units.tags]]
    name = "energy"
    address = "ir:20"
    type = "u32"
    scan_interval = "10s"
"#;

    /// A small valid RTU device in the one-unit form, for the rule tests to edit.
    const RTU_BASE: &str = r#"[gateway]
id = "edge-01"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "meters"
protocol = "modbus_rtu"
port = "/dev/ttyUSB0"

  [[devices.tags]]
  name = "active_power"
  address = "ir:12"
"#;

    fn with_rtu_device(lines: &str) -> String {
        let port = "port = \"/dev/ttyUSB0\"\n";
        RTU_BASE.replace(port, &format!("{port}{lines}\n"))
    }

    /// A Modbus tag with the defaults but for its address, type, order and scan interval.
    fn tag_spec(
        name: &str,
        address: &str,
        data_type: DataType,
        order: WordOrder,
        scan_interval: Duration,
    ) -> TagSpec {
        TagSpec {
            name: name.into(),
            address: match address.parse() {
                Ok(address) => address,
                Err(e) => panic!("{address}: {e}"),
            },
            data_type,
            order,
            length: 0,
            scale: 1.0,
            offset: 0.0,
            deadband: 0.0,
            scan_interval,
        }
    }

    fn unit_summary(settings: &ModbusSettings) -> Vec<(Option<&str>, u8, Vec<&str>)> {
        settings
            .units
            .iter()
            .map(|u| {
                let tags = u.tags.iter().map(|t| &*t.name).collect();
                (u.name.as_deref(), u.unit_id, tags)
            })
            .collect()
    }

    #[test]
    fn an_rtu_line_in_the_issues_shape_loads_into_its_settings() {
        let config = config(RTU);
        let [device] = &config.devices[..] else {
            panic!("expected one device, got {:?}", config.devices);
        };
        assert_eq!(&*device.name, "meters");
        assert_eq!(device.scan_interval, Duration::from_secs(1));
        assert_eq!(device.tag_count(), 3);
        let second = Duration::from_secs(1);
        let power = tag_spec(
            "active_power",
            "ir:12",
            DataType::F32,
            WordOrder::CDAB,
            second,
        );
        let expected = ModbusSettings {
            link: Link::Rtu(SerialSettings {
                port: "/dev/ttyUSB0".to_owned(),
                baud_rate: 19_200,
                parity: Parity::Even,
                data_bits: 8,
                stop_bits: 1,
            }),
            timeout: Duration::from_millis(300),
            inter_request_delay: Duration::ZERO,
            max_registers_per_read: 125,
            max_gap: 16,
            report: Report::EveryScan,
            max_silence: Duration::from_secs(60),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            units: vec![
                UnitSettings {
                    name: Some("meter3".into()),
                    unit_id: 3,
                    tags: vec![power.clone()],
                },
                UnitSettings {
                    name: Some("meter4".into()),
                    unit_id: 4,
                    tags: vec![
                        power,
                        tag_spec(
                            "energy",
                            "ir:20",
                            DataType::U32,
                            WordOrder::ABCD,
                            Duration::from_secs(10),
                        ),
                    ],
                },
            ],
        };
        assert_eq!(modbus(device), &expected);
        assert!(modbus(device).link.is_rtu());
    }

    #[test]
    fn an_rtu_device_takes_the_serial_defaults_and_other_serial_settings() {
        let settings = modbus(&config(RTU_BASE).devices[0]).clone();
        assert_eq!(
            settings.link,
            Link::Rtu(SerialSettings {
                port: "/dev/ttyUSB0".to_owned(),
                baud_rate: 19_200,
                parity: Parity::Even,
                data_bits: 8,
                stop_bits: 1,
            })
        );
        assert_eq!(settings.inter_request_delay, Duration::ZERO);
        assert_eq!(settings.timeout, Duration::from_secs(1));
        assert_eq!(unit_summary(&settings), [(None, 1, vec!["active_power"])]);

        for (lines, baud_rate, parity, stop_bits) in [
            (
                "baud_rate = 9600\nparity = \"none\"\nstop_bits = 2",
                9600,
                Parity::None,
                2,
            ),
            ("baud_rate = 50\nparity = \"odd\"", 50, Parity::Odd, 1),
            ("baud_rate = 4000000", 4_000_000, Parity::Even, 1),
            ("parity = \"ODD\"", 19_200, Parity::Odd, 1),
        ] {
            let config = config(&with_rtu_device(lines));
            let Link::Rtu(serial) = &modbus(&config.devices[0]).link else {
                panic!("expected a serial link");
            };
            assert_eq!(
                (serial.baud_rate, serial.parity, serial.stop_bits),
                (baud_rate, parity, stop_bits),
                "{lines}"
            );
        }
        let config = config(&RTU_BASE.replace(
            "/dev/ttyUSB0",
            "/dev/serial/by-id/usb-FTDI_RS485-if00-port0",
        ));
        assert_eq!(
            modbus(&config.devices[0]).link.target(),
            "/dev/serial/by-id/usb-FTDI_RS485-if00-port0"
        );
        let config = self::config(&with_rtu_device("inter_request_delay = \"10s\""));
        assert_eq!(
            modbus(&config.devices[0]).inter_request_delay,
            Duration::from_secs(10)
        );
    }

    #[test]
    fn an_rtu_over_tcp_converter_with_units_loads() {
        let serial = ["port", "baud_rate", "parity", "data_bits", "stop_bits"];
        let src: String = RTU
            .lines()
            .filter(|line| !serial.iter().any(|key| line.starts_with(key)))
            .map(|line| {
                if line.starts_with("protocol =") {
                    "protocol = \"modbus_rtu_over_tcp\"\naddress = \"10.0.0.7:4001\"\n".to_owned()
                } else {
                    format!("{}\n", line.replace("\"0ms\"", "\"20ms\""))
                }
            })
            .collect();
        let config = config(&src);
        let settings = modbus(&config.devices[0]);
        assert_eq!(
            settings.link,
            Link::RtuOverTcp {
                address: "10.0.0.7:4001".to_owned()
            }
        );
        assert!(settings.link.is_rtu());
        assert_eq!(settings.inter_request_delay, Duration::from_millis(20));
        assert_eq!(settings.timeout, Duration::from_millis(300));
        assert_eq!(
            unit_summary(settings),
            [
                (Some("meter3"), 3, vec!["active_power"]),
                (Some("meter4"), 4, vec!["active_power", "energy"]),
            ]
        );
    }

    #[test]
    fn a_modbus_tcp_gateway_with_units_loads() {
        let units = "\n  [[devices.units]]\n  name = \"drive-1\"\n  unit_id = 0\n    \
                     [[devices.units.tags]]\n    name = \"speed\"\n    address = \"hr:0\"\n\
                     \n  [[devices.units]]\n  name = \"drive-2\"\n  unit_id = 255\n    \
                     [[devices.units.tags]]\n    name = \"speed\"\n    address = \"hr:0\"\n    \
                     [[devices.units.tags]]\n    name = \"torque\"\n    address = \"hr:1\"\n    \
                     type = \"i16\"\n";
        let src = BASE.replace(
            "\n  [[devices.tags]]\n  name = \"counter\"\n  address = \"hr:0\"\n",
            units,
        );
        let config = config(&src);
        let device = &config.devices[0];
        let settings = modbus(device);
        assert_eq!(
            settings.link,
            Link::Tcp {
                address: "127.0.0.1:5020".to_owned()
            }
        );
        assert!(!settings.link.is_rtu());
        assert_eq!(
            unit_summary(settings),
            [
                (Some("drive-1"), 0, vec!["speed"]),
                (Some("drive-2"), 255, vec!["speed", "torque"]),
            ],
            "a TCP device takes unit ids 0 to 255"
        );
        assert_eq!(device.tag_count(), 3);
        let torque = &settings.units[1].tags[1];
        assert_eq!(torque.data_type, DataType::I16);
        assert_eq!(torque.scan_interval, Duration::from_secs(1));
    }

    #[test]
    fn the_one_unit_form_works_for_every_modbus_protocol() {
        let link_keys = [
            ("modbus_tcp", "address = \"10.0.0.7:502\""),
            ("modbus_rtu_over_tcp", "address = \"10.0.0.7:4001\""),
            ("modbus_rtu", "port = \"/dev/ttyS1\""),
        ];
        for (protocol, link) in link_keys {
            let src = BASE
                .replace("\"modbus_tcp\"", &format!("\"{protocol}\""))
                .replace("address = \"127.0.0.1:5020\"", link);
            let config = config(&src);
            let unit = only_unit(&config.devices[0]);
            assert_eq!(unit.unit_id, 1, "{protocol}: unit_id defaults to 1");
            assert_eq!(unit.tags.len(), 1);
            assert_eq!(&*unit.tags[0].name, "counter");
            let src = src.replace(link, &format!("{link}\nunit_id = 17"));
            let config = self::config(&src);
            assert_eq!(only_unit(&config.devices[0]).unit_id, 17, "{protocol}");
            let link = &modbus(&config.devices[0]).link;
            let expected = match protocol {
                "modbus_tcp" => matches!(link, Link::Tcp { .. }),
                "modbus_rtu_over_tcp" => matches!(link, Link::RtuOverTcp { .. }),
                _ => matches!(link, Link::Rtu(_)),
            };
            assert!(expected, "{protocol}: {link:?}");
        }
    }

    #[test]
    fn every_unit_and_serial_problem_is_reported_at_its_line_at_once() {
        let src = r#"[gateway]
id = "edge-01"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "meters"
protocol = "modbus_rtu"
port = "/dev/ttyUSB0"
baud_rate = 10
parity = "mark"
data_bits = 7
stop_bits = 3
inter_request_delay = "11s"
address = "10.0.0.7:502"

  [[devices.units]]
  unit_id = 3
  name = "meter3"
    [[devices.units.tags]]
    name = "a"
    address = "hr:0"
    type = "f32"
    [[devices.units.tags]]
    name = "b"
    address = "hr:1"

  [[devices.units]]
  unit_id = 3
  name = "meter3"
  colour = "red"
    [[devices.units.tags]]
    name = "a"
    address = "hr:0"
    [[devices.units.tags]]
    name = "a"
    address = "hr:1"
    [[devices.units.tags]]
    name = "c"
    address = "xr:2"

  [[devices.units]]
  unit_id = 0
  name = "meter 5"

  [[devices.units]]
    [[devices.units.tags]]
    name = "a"
    address = "hr:0"

  [[devices.units]]
  unit_id = 248
  name = "meter248"
    [[devices.units.tags]]
    name = "a"
    address = "hr:0"

[[devices]]
name = "drives"
protocol = "modbus_tcp"
address = "10.0.0.8:502"
unit_id = 1

  [[devices.units]]
  unit_id = 300
  name = "drive"
    [[devices.units.tags]]
    name = "speed"
    address = "hr:0"

[[devices]]
name = "converter"
protocol = "modbus_rtu_over_tcp"
address = "10.0.0.9:4001"
port = "/dev/ttyS0"
units = []
"#;
        let found = problems(src);
        let summary: Vec<(Option<usize>, &str)> =
            found.iter().map(|p| (p.line, p.field.as_str())).collect();
        assert_eq!(
            summary,
            [
                (Some(11), "devices[0].baud_rate"),
                (Some(12), "devices[0].parity"),
                (Some(13), "devices[0].data_bits"),
                (Some(14), "devices[0].stop_bits"),
                (Some(15), "devices[0].inter_request_delay"),
                (Some(16), "devices[0].address"),
                (Some(27), "devices[0].units[0].tags[1].address"),
                (Some(30), "devices[0].units[1].unit_id"),
                (Some(31), "devices[0].units[1].name"),
                (Some(32), "devices[0].units[1].colour"),
                (Some(37), "devices[0].units[1].tags[1].name"),
                (Some(41), "devices[0].units[1].tags[2].address"),
                (Some(43), "devices[0].units[2].tags"),
                (Some(44), "devices[0].units[2].unit_id"),
                (Some(45), "devices[0].units[2].name"),
                (Some(47), "devices[0].units[3].name"),
                (Some(47), "devices[0].units[3].unit_id"),
                (Some(53), "devices[0].units[4].unit_id"),
                (Some(65), "devices[1].units"),
                (Some(66), "devices[1].units[0].unit_id"),
                (Some(76), "devices[2].port"),
                (Some(77), "devices[2].units"),
            ],
            "got:\n{}",
            listing(&found)
        );
        let message = |field: &str| {
            found
                .iter()
                .filter(|p| p.field == field)
                .map(|p| p.message.as_str())
                .collect::<Vec<_>>()
                .join(" | ")
        };
        let expected = [
            (
                "devices[0].baud_rate",
                "must be between 50 and 4000000, not 10",
            ),
            (
                "devices[0].parity",
                "unknown parity `mark`: use none, even or odd",
            ),
            (
                "devices[0].data_bits",
                "must be 8, not 7: Modbus RTU frames carry 8-bit bytes",
            ),
            ("devices[0].stop_bits", "must be 1 or 2, not 3"),
            (
                "devices[0].inter_request_delay",
                "must be between 0s and 10s, not 11s",
            ),
            (
                "devices[0].address",
                "unknown key `address` for protocol `modbus_rtu` (it belongs to protocols \
                 `modbus_tcp` and `modbus_rtu_over_tcp`); expected one of: name, protocol, \
                 port, baud_rate, parity, data_bits, stop_bits, unit_id, inter_request_delay, \
                 scan_interval, timeout, max_registers_per_read, max_gap, report, \
                 max_silence, backoff_min, backoff_max, enabled, units, tags",
            ),
            (
                "devices[0].units[0].tags[1].address",
                "overlaps tag `a` (hr:0..hr:1)",
            ),
            (
                "devices[0].units[1].unit_id",
                "duplicate unit_id 3: the unit on line 19 has it already",
            ),
            (
                "devices[0].units[1].name",
                "duplicate unit name `meter3`: the unit on line 20 has it already",
            ),
            (
                "devices[0].units[1].colour",
                "unknown key `colour`; expected one of: name, unit_id, tags",
            ),
            (
                "devices[0].units[1].tags[1].name",
                "duplicate tag name `a`: the tag on line 34 has it already",
            ),
            (
                "devices[0].units[1].tags[2].address",
                "unknown area `xr`: use hr (holding)",
            ),
            (
                "devices[0].units[2].tags",
                "a unit needs at least one [[devices.units.tags]] entry",
            ),
            (
                "devices[0].units[2].unit_id",
                "must be between 1 and 247, not 0: 0 is the broadcast address, which no unit \
                 answers",
            ),
            ("devices[0].units[2].name", "' ' is not allowed"),
            ("devices[0].units[3].name", "missing required key `name`"),
            (
                "devices[0].units[3].unit_id",
                "missing required key `unit_id`",
            ),
            (
                "devices[0].units[4].unit_id",
                "must be between 1 and 247, not 248: 248 to 255 are reserved on a serial line",
            ),
            (
                "devices[1].units",
                "give either `units` (a [[devices.units]] entry per unit) or `unit_id` and \
                 [[devices.tags]] (one unit), not both: this device also has `unit_id`",
            ),
            (
                "devices[1].units[0].unit_id",
                "must be between 0 and 255, not 300",
            ),
            (
                "devices[2].port",
                "unknown key `port` for protocol `modbus_rtu_over_tcp` (it belongs to \
                 protocol `modbus_rtu`); expected one of:",
            ),
            (
                "devices[2].units",
                "must not be empty: give each unit on the line a [[devices.units]] entry",
            ),
        ];
        for (field, fragment) in expected {
            assert!(
                message(field).contains(fragment),
                "{field}: expected `{fragment}`, got `{}`",
                message(field)
            );
        }
        let rendered = match parse(src, "gateway.toml") {
            Ok(_) => panic!("expected problems"),
            Err(errors) => errors.to_string(),
        };
        assert!(
            rendered.contains(
                "\ngateway.toml:41: devices[0].units[1].tags[2].address: unknown area `xr`"
            ),
            "{rendered}"
        );
        assert!(
            rendered.contains("\ngateway.toml:30: devices[0].units[1].unit_id: duplicate"),
            "{rendered}"
        );
    }

    #[test]
    fn two_devices_on_one_serial_port_or_converter_are_refused() {
        let src = format!(
            "{RTU_BASE}\n[[devices]]\nname = \"drives\"\nprotocol = \"modbus_rtu\"\n\
             port = \"/dev/ttyUSB0\" # the same adapter\n\n  [[devices.tags]]\n  \
             name = \"speed\"\n  address = \"hr:1\"\n"
        );
        assert_problem(
            &src,
            "devices[1].port",
            "the same adapter",
            "serial port `/dev/ttyUSB0` is already the line of device `meters` (devices[0])",
        );
        let other_port = src.replace(
            "port = \"/dev/ttyUSB0\" # the same adapter",
            "port = \"/dev/ttyUSB1\"",
        );
        assert!(
            problems(&other_port).is_empty(),
            "{}",
            listing(&problems(&other_port))
        );

        let converter = "[[devices]]\nname = \"NAME\"\nprotocol = \"modbus_rtu_over_tcp\"\n\
                         address = \"10.0.0.9:4001\" # ADDR\n\n  [[devices.tags]]\n  \
                         name = \"x\"\n  address = \"hr:1\"\n";
        let two = format!(
            "{BASE}\n{}\n{}",
            converter.replace("NAME", "a").replace("ADDR", "first"),
            converter.replace("NAME", "b").replace("ADDR", "second")
        );
        assert_problem(
            &two,
            "devices[2].address",
            "# second",
            "RTU-over-TCP converter `10.0.0.9:4001` is already the line of device `a` (devices[1])",
        );
    }

    #[test]
    fn serial_rules() {
        let cases = [
            (
                "baud_rate = 4000001",
                "baud_rate",
                "between 50 and 4000000, not 4000001",
            ),
            (
                "baud_rate = 49",
                "baud_rate",
                "between 50 and 4000000, not 49",
            ),
            ("baud_rate = \"fast\"", "baud_rate", "expected an integer"),
            (
                "parity = \"space\"",
                "parity",
                "unknown parity `space`: use none, even or odd",
            ),
            (
                "parity = 1",
                "parity",
                "invalid type: integer `1`, expected a string",
            ),
            (
                "data_bits = 9",
                "data_bits",
                "must be 8, not 9: Modbus RTU frames carry 8-bit bytes",
            ),
            ("stop_bits = 0", "stop_bits", "must be 1 or 2, not 0"),
            (
                "inter_request_delay = \"1m\"",
                "inter_request_delay",
                "between 0s and 10s, not 1m",
            ),
            (
                "inter_request_delay = 5",
                "inter_request_delay",
                BARE_DURATION,
            ),
            (
                "unit_id = 0",
                "unit_id",
                "must be between 1 and 247, not 0: 0 is the broadcast address",
            ),
            (
                "unit_id = 255",
                "unit_id",
                "must be between 1 and 247, not 255",
            ),
            ("baudrate = 9600", "baudrate", "did you mean `baud_rate`?"),
        ];
        for (line, key, fragment) in cases {
            assert_problem(
                &with_rtu_device(line),
                &format!("devices[0].{key}"),
                line,
                fragment,
            );
        }
        assert_problem(
            &RTU_BASE.replace("port = \"/dev/ttyUSB0\"", "port = \"\""),
            "devices[0].port",
            "port = ",
            "must not be empty",
        );
        assert_problem(
            &RTU_BASE.replace("port = \"/dev/ttyUSB0\"\n", ""),
            "devices[0].port",
            "[[devices]]",
            "missing required key `port`",
        );
        // The common Modbus keys keep their rules on a serial line.
        assert_problem(
            &with_rtu_device("max_registers_per_read = 126"),
            "devices[0].max_registers_per_read",
            "max_registers_per_read",
            "between 1 and 125",
        );
        assert_problem(
            &with_rtu_device("backoff_min = \"10s\"\nbackoff_max = \"1s\""),
            "devices[0].backoff_max",
            "backoff_max",
            "at least backoff_min (10s), not 1s",
        );
        let settings = modbus(
            &config(&with_rtu_device(
                "report = \"on_change\"\nmax_silence = \"5m\"\nmax_gap = 0\n\
                 max_registers_per_read = 64\nbackoff_min = \"1s\"\nbackoff_max = \"5s\"",
            ))
            .devices[0],
        )
        .clone();
        assert_eq!(settings.report, Report::OnChange);
        assert_eq!(settings.max_silence, Duration::from_secs(300));
        assert_eq!((settings.max_gap, settings.max_registers_per_read), (0, 64));
        assert_eq!(
            (settings.backoff_min, settings.backoff_max),
            (Duration::from_secs(1), Duration::from_secs(5))
        );
        // Neither form: the device has no tags.
        let src = RTU_BASE.replace(
            "\n  [[devices.tags]]\n  name = \"active_power\"\n  address = \"ir:12\"\n",
            "\n",
        );
        assert_problem(
            &src,
            "devices[0].tags",
            "[[devices]]",
            "an enabled device needs at least one [[devices.tags]] entry, or [[devices.units]]",
        );
        config(&src.replace(
            "port = \"/dev/ttyUSB0\"",
            "port = \"/dev/ttyUSB0\"\nenabled = false",
        ));
    }

    #[test]
    fn unit_rules() {
        let one_unit = |lines: &str| {
            format!(
                "{}\n  [[devices.units]]\n{lines}\n",
                RTU_BASE.replace(
                    "\n  [[devices.tags]]\n  name = \"active_power\"\n  address = \"ir:12\"\n",
                    "\n",
                )
            )
        };
        let tag = "\n    [[devices.units.tags]]\n    name = \"t\"\n    address = \"hr:0\"";
        let cases = [
            (
                format!("  name = \"m\"\n  unit_id = 248{tag}"),
                "unit_id",
                "unit_id = 248",
                "between 1 and 247, not 248",
            ),
            (
                format!("  name = \"m\"\n  unit_id = \"1\"{tag}"),
                "unit_id",
                "unit_id = \"1\"",
                "invalid type: string \"1\", expected an integer",
            ),
            (
                format!("  name = \"m/1\"\n  unit_id = 1{tag}"),
                "name",
                "name = \"m/1\"",
                "'/' is not allowed",
            ),
            (
                format!("  name = \"{}\"\n  unit_id = 1{tag}", "m".repeat(65)),
                "name",
                "mmmm",
                "1 to 64 characters long, not 65",
            ),
            (
                format!("  unit_id = 1{tag}"),
                "name",
                "[[devices.units]]",
                "missing required key `name`",
            ),
            (
                format!("  name = \"m\"{tag}"),
                "unit_id",
                "[[devices.units]]",
                "missing required key `unit_id`",
            ),
            (
                "  name = \"m\"\n  unit_id = 1".to_owned(),
                "tags",
                "[[devices.units]]",
                "a unit needs at least one [[devices.units.tags]] entry",
            ),
            (
                "  name = \"m\"\n  unit_id = 1\n  tags = []".to_owned(),
                "tags",
                "tags = []",
                "a unit needs at least one [[devices.units.tags]] entry",
            ),
            (
                "  name = \"m\"\n  unit_id = 1\n    [devices.units.tags]\n    name = \"t\"\n    \
                 address = \"hr:0\""
                    .to_owned(),
                "tags",
                "[devices.units.tags]",
                "write [[devices.units.tags]] with double brackets",
            ),
            (
                format!("  name = \"m\"\n  unit_id = 1\n  port = \"/dev/ttyS0\"{tag}"),
                "port",
                "port = \"/dev/ttyS0\"",
                "unknown key `port`; expected one of: name, unit_id, tags",
            ),
            (
                format!("  name = \"m\"\n  unit_id = 1{tag}\n    colour = 1"),
                "tags[0].colour",
                "colour",
                "unknown key `colour`",
            ),
            (
                format!("  name = \"m\"\n  unit_id = 1{tag}\n    node_id = \"i=1\""),
                "tags[0].node_id",
                "node_id",
                "unknown key `node_id` for protocol `modbus_rtu` (it belongs to protocol \
                 `opcua`)",
            ),
        ];
        for (lines, key, needle, fragment) in cases {
            assert_problem(
                &one_unit(&lines),
                &format!("devices[0].units[0].{key}"),
                needle,
                fragment,
            );
        }
        let base = RTU_BASE.replace(
            "\n  [[devices.tags]]\n  name = \"active_power\"\n  address = \"ir:12\"\n",
            "\n",
        );
        assert_problem(
            &format!("{base}\n  [devices.units]\n  name = \"m\"\n  unit_id = 1\n"),
            "devices[0].units",
            "[devices.units]",
            "write [[devices.units]] with double brackets",
        );
        assert_problem(
            &with_rtu_device("units = \"meter3\""),
            "devices[0].units",
            "units = ",
            "expected [[devices.units]] entries, found string",
        );
        // Both forms at once: the fields are named, and both forms are still checked.
        let both = format!(
            "{}\n  [[devices.units]]\n  name = \"m\"\n  unit_id = 2{tag}\n",
            with_rtu_device("unit_id = 1")
        );
        let found = problems(&both);
        assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
        assert_problem(
            &both,
            "devices[0].units",
            "[[devices.units]]",
            "not both: this device also has `unit_id` and `tags`",
        );
        let both_bad = both
            .replace("address = \"ir:12\"", "address = \"xr:12\"")
            .replace("address = \"hr:0\"", "address = \"hr:x\"");
        let fields: Vec<String> = problems(&both_bad).into_iter().map(|p| p.field).collect();
        assert_eq!(
            fields,
            [
                "devices[0].tags[0].address",
                "devices[0].units",
                "devices[0].units[0].tags[0].address",
            ]
        );
        // A disabled device's units are still checked.
        assert_problem(
            &one_unit("  name = \"m\"\n  unit_id = 0").replace(
                "port = \"/dev/ttyUSB0\"",
                "port = \"/dev/ttyUSB0\"\nenabled = false",
            ),
            "devices[0].units[0].unit_id",
            "unit_id = 0",
            "not 0: 0 is the broadcast address",
        );
        // Unit names and ids are unique within a device, tag names within a unit; another
        // device may reuse them.
        let second = format!(
            "\n[[devices]]\nname = \"meters-2\"\nprotocol = \"modbus_rtu\"\n\
             port = \"/dev/ttyUSB1\"\n\n  [[devices.units]]\n  name = \"m\"\n  unit_id = 1{tag}\n"
        );
        let src = format!(
            "{}{second}",
            one_unit(&format!("  name = \"m\"\n  unit_id = 1{tag}"))
        );
        let config = config(&src);
        assert_eq!(config.devices.len(), 2);
    }

    #[test]
    fn each_modbus_protocol_has_its_own_link_keys() {
        for (key, line) in [
            ("port", "port = \"/dev/ttyUSB0\""),
            ("baud_rate", "baud_rate = 19200"),
            ("parity", "parity = \"even\""),
            ("data_bits", "data_bits = 8"),
            ("stop_bits", "stop_bits = 1"),
        ] {
            for protocol in ["modbus_tcp", "modbus_rtu_over_tcp"] {
                let src = with_device(line).replace("\"modbus_tcp\"", &format!("\"{protocol}\""));
                assert_problem(
                    &src,
                    &format!("devices[0].{key}"),
                    line,
                    &format!(
                        "unknown key `{key}` for protocol `{protocol}` (it belongs to protocol \
                         `modbus_rtu`); expected one of: name, protocol, address, unit_id, \
                         inter_request_delay, scan_interval"
                    ),
                );
            }
        }
        assert_problem(
            &with_rtu_device("address = \"10.0.0.7:502\""),
            "devices[0].address",
            "address = \"10.0.0.7:502\"",
            "unknown key `address` for protocol `modbus_rtu` (it belongs to protocols \
             `modbus_tcp` and `modbus_rtu_over_tcp`)",
        );
        assert_problem(
            &with_rtu_device("endpoint = \"opc.tcp://h:4840\""),
            "devices[0].endpoint",
            "endpoint",
            "unknown key `endpoint` for protocol `modbus_rtu` (it belongs to protocol `opcua`)",
        );
        // An address is checked the same way on a converter as on a TCP device.
        let converter = BASE.replace("\"modbus_tcp\"", "\"modbus_rtu_over_tcp\"");
        for (address, fragment) in [("10.0.0.7", "has no port"), (":4001", "no host")] {
            assert_problem(
                &converter.replace("127.0.0.1:5020", address),
                "devices[0].address",
                "address = ",
                fragment,
            );
        }
        assert_problem(
            &converter.replace("address = \"127.0.0.1:5020\"\n", ""),
            "devices[0].address",
            "[[devices]]",
            "missing required key `address`",
        );
        // inter_request_delay is a key of every Modbus protocol, and an OPC UA device's
        // `units` is reported as a Modbus key.
        config(&with_device("inter_request_delay = \"5ms\""));
        assert_problem(
            &format!("{OPCUA_BASE}\n  [[devices.units]]\n  name = \"m\"\n  unit_id = 1\n"),
            "devices[0].units",
            "[[devices.units]]",
            "unknown key `units` for protocol `opcua` (it belongs to protocols `modbus_tcp`, \
             `modbus_rtu` and `modbus_rtu_over_tcp`)",
        );
    }

    #[test]
    fn lines_are_found_under_units_in_every_toml_form() {
        // Array-of-tables headers.
        let found = problems(&RTU.replace("\"ir:20\"", "\"ir:x\""));
        assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
        assert_eq!(found[0].field, "devices[0].units[1].tags[1].address");
        assert_eq!(found[0].line, Some(line_containing(RTU, "\"ir:20\"")));
        // A missing key: the line of its table's header.
        let src = RTU.replace("  unit_id = 4\n", "");
        let found = problems(&src);
        assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
        assert_eq!(found[0].field, "devices[0].units[1].unit_id");
        let second_unit = src
            .lines()
            .enumerate()
            .filter(|(_, l)| l.trim_start().starts_with("[[devices.units]]"))
            .nth(1)
            .map(|(i, _)| i + 1);
        assert_eq!(found[0].line, second_unit);
        // Inline tables and arrays.
        let src = r#"[gateway]
id = "edge-01"
[mqtt]
url = "mqtt://127.0.0.1:1883"
[[devices]]
name = "meters"
protocol = "modbus_rtu"
port = "/dev/ttyUSB0"
units = [
  { name = "meter3", unit_id = 3, tags = [{ name = "p", address = "ir:12" }] },
  { name = "meter4", unit_id = 4, tags = [
    { name = "p", address = "ir:12" },
    { name = "q", address = "xr:13" },
  ] },
]
"#;
        assert_problem(
            src,
            "devices[0].units[1].tags[1].address",
            "xr:13",
            "unknown area `xr`",
        );
        // Dotted keys inside a unit's table.
        let dotted = RTU.replace(
            "  unit_id = 4\n  name = \"meter4\"\n",
            "  unit_id = 4\n  name = \"meter4\"\n  extra.colour = \"red\"\n",
        );
        assert_problem(
            &dotted,
            "devices[0].units[1].extra",
            "extra.colour",
            "unknown key `extra`",
        );
    }

    #[test]
    fn the_commented_modbus_rtu_examples_of_the_example_file_are_valid() {
        // Each commented-out device is a paragraph whose first line is `# [[devices]]`.
        let blocks: Vec<String> = EXAMPLE
            .split("\n\n")
            .filter(|paragraph| paragraph.starts_with("# [[devices]]"))
            .map(|paragraph| {
                paragraph
                    .lines()
                    .map(|line| {
                        line.strip_prefix("# ")
                            .unwrap_or(line.trim_start_matches('#'))
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect();
        assert_eq!(blocks.len(), 2, "an RTU line and an RTU-over-TCP converter");
        let src = format!("{EXAMPLE}\n{}\n", blocks.join("\n\n"));
        let config = config(&src);
        let lines: Vec<(&str, &Link, usize)> = config
            .devices
            .iter()
            .skip(1)
            .map(|d| (&*d.name, &modbus(d).link, modbus(d).units.len()))
            .collect();
        let [(_, Link::Rtu(serial), 2), (_, Link::RtuOverTcp { .. }, units)] = &lines[..] else {
            panic!("expected an RTU line with two units and a converter, got {lines:?}");
        };
        assert!(*units >= 1);
        assert_eq!(serial.data_bits, 8);
    }

    /// A small edit of the example file.
    #[derive(Debug, Clone)]
    enum Mutation {
        DeleteChar(prop::sample::Index),
        InsertChar(prop::sample::Index, char),
        DeleteLine(prop::sample::Index),
        DuplicateLine(prop::sample::Index),
        ReplaceValue(prop::sample::Index, String),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        let toml_char = prop_oneof![
            prop::sample::select(vec![
                '[', ']', '{', '}', '=', '"', '\'', ',', '.', '#', '\n', ':', '-', '0'
            ]),
            any::<char>(),
        ];
        let value = prop_oneof![
            any::<i64>().prop_map(|i| i.to_string()),
            any::<f64>().prop_map(|f| format!("{f:?}")),
            "[a-z0-9:.\\[\\] ]{0,12}".prop_map(|s| format!("\"{s}\"")),
            prop::sample::select(vec![
                "nan",
                "-inf",
                "true",
                "[]",
                "{}",
                "\"\"",
                "[1, 2]",
                "{ a = 1 }"
            ])
            .prop_map(str::to_owned),
        ];
        prop_oneof![
            any::<prop::sample::Index>().prop_map(Mutation::DeleteChar),
            (any::<prop::sample::Index>(), toml_char).prop_map(|(i, c)| Mutation::InsertChar(i, c)),
            any::<prop::sample::Index>().prop_map(Mutation::DeleteLine),
            any::<prop::sample::Index>().prop_map(Mutation::DuplicateLine),
            (any::<prop::sample::Index>(), value).prop_map(|(i, v)| Mutation::ReplaceValue(i, v)),
        ]
    }

    fn apply(src: &str, mutation: &Mutation) -> String {
        let mut chars: Vec<char> = src.chars().collect();
        let mut lines: Vec<String> = src.lines().map(str::to_owned).collect();
        match mutation {
            Mutation::DeleteChar(i) if !chars.is_empty() => {
                chars.remove(i.index(chars.len()));
            }
            Mutation::InsertChar(i, c) => {
                let at = i.index(chars.len() + 1);
                chars.insert(at, *c);
            }
            Mutation::DeleteLine(i) if !lines.is_empty() => {
                lines.remove(i.index(lines.len()));
                return lines.join("\n");
            }
            Mutation::DuplicateLine(i) if !lines.is_empty() => {
                let at = i.index(lines.len());
                let line = lines[at].clone();
                lines.insert(at, line);
                return lines.join("\n");
            }
            Mutation::ReplaceValue(i, value) => {
                let assignments: Vec<usize> = (0..lines.len())
                    .filter(|&n| {
                        lines[n].contains(" = ") && !lines[n].trim_start().starts_with('#')
                    })
                    .collect();
                if !assignments.is_empty() {
                    let n = assignments[i.index(assignments.len())];
                    if let Some((key, _)) = lines[n].split_once(" = ") {
                        lines[n] = format!("{key} = {value}");
                    }
                }
                return lines.join("\n");
            }
            _ => {}
        }
        chars.into_iter().collect()
    }

    fn assert_well_formed(src: &str) {
        if let Err(errors) = parse(src, "fuzz.toml") {
            assert!(!errors.problems.is_empty());
            let last_line = src.split('\n').count();
            for problem in &errors.problems {
                if let Some(line) = problem.line {
                    assert!(
                        (1..=last_line).contains(&line),
                        "{problem} (file has {last_line} lines)"
                    );
                }
            }
            let _ = errors.to_string();
        }
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_text(src in "(?s).{0,300}") {
            assert_well_formed(&src);
        }

        #[test]
        fn never_panics_on_toml_shaped_text(src in "([\\[\\]a-z_.]{0,12}( = )?[\"0-9a-z:.\\[\\]{},]{0,12}\n){0,20}") {
            assert_well_formed(&src);
        }

        #[test]
        fn never_panics_on_small_mutations_of_the_example(
            mutations in prop::collection::vec(mutation(), 1..6)
        ) {
            let src = mutations.iter().fold(EXAMPLE.to_owned(), |src, m| apply(&src, m));
            assert_well_formed(&src);
        }
    }
}
