//! The normalized tag model: every value read from any device becomes a [`Sample`], and every
//! device scan becomes one [`Batch`]. Tag and device names live once in a [`Catalog`]; samples
//! carry small integer ids so the hot path never clones a string.

use std::fmt;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Timestamp(ms)
    }

    /// Milliseconds since the Unix epoch as an unsigned count (0 for a time before it).
    pub fn unix_ms(self) -> u64 {
        u64::try_from(self.0).unwrap_or(0)
    }
}

/// A typed tag value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A coil, discrete input or boolean register.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// An unsigned integer.
    UInt(u64),
    /// A float, or any scaled value.
    Float(f64),
    /// Text, shared so re-reporting it costs no allocation.
    Text(Arc<str>),
    /// A one-dimensional array (OPC UA arrays), shared like text.
    Array(Arc<[Value]>),
}

/// Whether commands may write a tag, and the range they may write (engineering units, both
/// ends included). Gateway policy carried with the tag; a driver never looks at it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WriteAccess {
    /// The smallest value that may be written.
    pub min: Option<f64>,
    /// The largest value that may be written.
    pub max: Option<f64>,
}

impl Value {
    /// The value as a float, for deadband comparison; `None` for text.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            Value::Int(i) => Some(*i as f64),
            Value::UInt(u) => Some(*u as f64),
            Value::Float(f) => Some(*f),
            Value::Text(_) | Value::Array(_) => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::UInt(u) => write!(f, "{u}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Text(s) => write!(f, "{s:?}"),
            Value::Array(items) => {
                f.write_str("[")?;
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// Why a value is not good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The device did not answer within the configured timeout.
    Timeout,
    /// The device answered with a Modbus exception code.
    Exception(u8),
    /// There is no connection to the device.
    Disconnected,
    /// The answer could not be decoded into the configured type.
    Decode,
    /// The device answered with something that does not match the request.
    Protocol,
    /// An OPC UA status code other than Good (the full 32-bit code).
    Status(u32),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Timeout => f.write_str("timeout"),
            Reason::Exception(code) => write!(f, "exception:{code}"),
            Reason::Disconnected => f.write_str("disconnected"),
            Reason::Decode => f.write_str("decode"),
            Reason::Protocol => f.write_str("protocol"),
            Reason::Status(code) => {
                let name = opcua::types::StatusCode::from(*code).sub_code().name();
                f.write_str(name)
            }
        }
    }
}

/// The quality of a sample, in the spirit of OPC UA status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quality {
    /// The value is trustworthy.
    Good,
    /// The value is usable but suspect.
    Uncertain(Reason),
    /// There is no usable value.
    Bad(Reason),
}

impl Quality {
    /// The short name used in payloads: `good`, `uncertain` or `bad`.
    pub fn name(&self) -> &'static str {
        match self {
            Quality::Good => "good",
            Quality::Uncertain(_) => "uncertain",
            Quality::Bad(_) => "bad",
        }
    }

    /// The reason, when the quality is not good.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            Quality::Good => None,
            Quality::Uncertain(r) | Quality::Bad(r) => Some(*r),
        }
    }
}

/// Index of a device in the [`Catalog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u32);

/// Index of a tag within its device's tag list in the [`Catalog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TagId(pub u32);

/// One value of one tag, as read.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Which tag of the batch's device.
    pub tag: TagId,
    /// The value; `None` when the tag could not be read.
    pub value: Option<Value>,
    /// How far the value can be trusted.
    pub quality: Quality,
    /// The device's own timestamp, when it has one.
    pub source_time: Option<Timestamp>,
    /// When the gateway read the value.
    pub gateway_time: Timestamp,
}

impl Sample {
    /// A good sample read at `time`.
    pub fn good(tag: TagId, value: Value, time: Timestamp) -> Self {
        Sample {
            tag,
            value: Some(value),
            quality: Quality::Good,
            source_time: None,
            gateway_time: time,
        }
    }

    /// A bad sample without a value.
    pub fn bad(tag: TagId, reason: Reason, time: Timestamp) -> Self {
        Sample {
            tag,
            value: None,
            quality: Quality::Bad(reason),
            source_time: None,
            gateway_time: time,
        }
    }
}

/// The samples of one device scan (or one OPC UA notification): it becomes one record.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The device that was scanned.
    pub device: DeviceId,
    /// The samples, in tag order of the scan.
    pub samples: Vec<Sample>,
    /// When the scan completed; the durability deadline counts from here.
    pub read_at: Instant,
}

/// What a tag is, beyond its name and value, as the config file describes it: for consumers
/// that need to know what a number means (the meta message, Sparkplug metric properties).
/// Every field is optional; `min <= max` when both are given (the config check sees to it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TagMeta {
    /// Engineering unit, e.g. `degC` or `kW`.
    pub unit: Option<Arc<str>>,
    /// What the tag measures, for a person.
    pub description: Option<Arc<str>>,
    /// Low end of the engineering range.
    pub min: Option<f64>,
    /// High end of the engineering range.
    pub max: Option<f64>,
}

impl TagMeta {
    /// Whether nothing is described.
    pub fn is_empty(&self) -> bool {
        *self == TagMeta::default()
    }

    /// The description as its holders keep it: shared by the config, the driver and the
    /// catalog, and one allocation for every tag described by nothing (most are; 64 bytes
    /// each, held twice, was 1.3 MB with 10k tags).
    pub fn shared(self) -> Arc<TagMeta> {
        static NONE: std::sync::OnceLock<Arc<TagMeta>> = std::sync::OnceLock::new();
        if self.is_empty() {
            NONE.get_or_init(|| Arc::new(TagMeta::default())).clone()
        } else {
            Arc::new(self)
        }
    }
}

/// Everything the gateway knows about one tag besides its values.
#[derive(Debug, Clone, PartialEq)]
pub struct TagInfo {
    /// The tag name, unique within its device.
    pub name: Arc<str>,
    /// The configured data type (`u16`, `f32`, `bool`, `string`, ...); `None` when the device
    /// decides (an OPC UA node's own type).
    pub data_type: Option<&'static str>,
    /// Where the value comes from: a Modbus address (`hr:100`) or an OPC UA node (`ns=2;s=T`,
    /// or a browse path).
    pub source: Source,
    /// How often the tag is read; for an OPC UA subscription, the sampling interval asked of
    /// the server (zero: the server's fastest).
    pub scan_interval: std::time::Duration,
    /// Unit, description and range.
    pub meta: Arc<TagMeta>,
}

/// Where a tag's value comes from, written as the config writes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A Modbus address, kept as such (10k of them written out were 10k allocations).
    Modbus(crate::modbus::Address),
    /// An OPC UA node id or browse path, as text.
    Text(Arc<str>),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Modbus(address) => address.fmt(f),
            Source::Text(text) => f.write_str(text),
        }
    }
}

impl From<&str> for Source {
    fn from(text: &str) -> Self {
        Source::Text(text.into())
    }
}

impl TagInfo {
    /// A tag known by its name only.
    pub fn named(name: Arc<str>) -> Self {
        TagInfo {
            name,
            data_type: None,
            source: Source::Text(Arc::from("")),
            scan_interval: std::time::Duration::ZERO,
            meta: TagMeta::default().shared(),
        }
    }
}

/// The names of all devices and tags, interned once at start-up, and what each tag is.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    devices: Vec<DeviceEntry>,
}

/// A device's name and its tags' names.
///
/// Invariant: `info` is empty (a device added by names alone) or holds one entry per tag, in
/// `tags` order, with the same names.
#[derive(Debug, Clone)]
pub struct DeviceEntry {
    /// The device name from the config.
    pub name: Arc<str>,
    /// Tag names, indexed by [`TagId`].
    pub tags: Vec<Arc<str>>,
    /// What each tag is, indexed by [`TagId`]; empty when only the names are known. Shared
    /// with whoever describes the device later (its meta document is rendered when sent).
    pub info: Arc<[TagInfo]>,
}

impl Catalog {
    /// Adds a device with its tag names and returns its id.
    pub fn add_device(&mut self, name: Arc<str>, tags: Vec<Arc<str>>) -> DeviceId {
        self.devices.push(DeviceEntry {
            name,
            tags,
            info: Arc::new([]),
        });
        DeviceId((self.devices.len() - 1) as u32)
    }

    /// Adds a device with what is known of each of its tags and returns its id.
    pub fn add_described(&mut self, name: Arc<str>, info: Vec<TagInfo>) -> DeviceId {
        let tags = info.iter().map(|t| t.name.clone()).collect();
        self.devices.push(DeviceEntry {
            name,
            tags,
            info: info.into(),
        });
        DeviceId((self.devices.len() - 1) as u32)
    }

    /// The device entry for an id handed out by [`Catalog::add_device`].
    pub fn device(&self, id: DeviceId) -> Option<&DeviceEntry> {
        self.devices.get(id.0 as usize)
    }

    /// The name of a tag, if both ids are known.
    pub fn tag_name(&self, device: DeviceId, tag: TagId) -> Option<&Arc<str>> {
        self.device(device)?.tags.get(tag.0 as usize)
    }

    /// What is known of a tag, if both ids are known and the device was described.
    pub fn tag_info(&self, device: DeviceId, tag: TagId) -> Option<&TagInfo> {
        self.device(device)?.info.get(tag.0 as usize)
    }

    /// All devices in id order.
    pub fn devices(&self) -> impl Iterator<Item = (DeviceId, &DeviceEntry)> {
        self.devices
            .iter()
            .enumerate()
            .map(|(i, d)| (DeviceId(i as u32), d))
    }

    /// Total number of tags over all devices.
    pub fn tag_count(&self) -> usize {
        self.devices.iter().map(|d| d.tags.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_render_as_payload_strings() {
        assert_eq!(Reason::Timeout.to_string(), "timeout");
        assert_eq!(Reason::Exception(2).to_string(), "exception:2");
        assert_eq!(Reason::Disconnected.to_string(), "disconnected");
        let code = opcua::types::StatusCode::BadNodeIdUnknown.bits();
        assert_eq!(Reason::Status(code).to_string(), "BadNodeIdUnknown");
    }

    #[test]
    fn catalog_resolves_names_by_id() {
        let mut c = Catalog::default();
        let d = c.add_device("press7".into(), vec!["a".into(), "b".into()]);
        assert_eq!(c.tag_name(d, TagId(1)).map(|s| &**s), Some("b"));
        assert!(c.tag_name(d, TagId(2)).is_none());
        assert_eq!(c.tag_count(), 2);
    }

    #[test]
    fn a_described_device_keeps_each_tags_unit_range_and_source_beside_its_name() {
        let mut c = Catalog::default();
        let mut temp = TagInfo::named("temp".into());
        temp.source = "hr:4".into();
        temp.meta = TagMeta {
            unit: Some("degC".into()),
            description: None,
            min: Some(-20.0),
            max: Some(120.0),
        }
        .shared();
        let d = c.add_described("oven".into(), vec![TagInfo::named("a".into()), temp]);
        assert_eq!(c.tag_name(d, TagId(1)).map(|s| &**s), Some("temp"));
        let info = c.tag_info(d, TagId(1)).unwrap();
        assert_eq!(info.meta.unit.as_deref(), Some("degC"));
        assert_eq!((info.meta.min, info.meta.max), (Some(-20.0), Some(120.0)));
        assert_eq!(info.source.to_string(), "hr:4");
        assert!(c.tag_info(d, TagId(0)).unwrap().meta.is_empty());
        let named = c.add_device("bare".into(), vec!["x".into()]);
        assert!(
            c.tag_info(named, TagId(0)).is_none(),
            "names only: nothing described"
        );
    }
}
