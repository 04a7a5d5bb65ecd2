//! The rules of a Modbus device (`modbus_tcp`, `modbus_rtu`, `modbus_rtu_over_tcp`): how the
//! line is reached, its units in either form, and each unit's tags, which must fit the
//! register map (no overlap, nothing past register 65535, each tag in one read).

use std::collections::{BTreeSet, HashMap};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use protocols::modbus::{
    Address, Area, DataType, Link, ModbusSettings, Parity, SerialSettings, TagAddress, TagSpec,
    UnitSettings, WordOrder,
};

use protocols::model::WriteAccess;

use crate::config::problem::FieldPath;
use crate::config::raw::{RawModbusDevice, RawTag, RawUnit};
use crate::config::values::{check_device_name, split_host_port, MAX_DURATION, MS, NONZERO};
use crate::config::{DeviceKind, DeviceSettings};

use super::devices::{
    Common, DeviceOutcome, Foreign, Protocol, TagEntries, TagMetaText, TagSource, Timing,
};
use super::Checker;

/// Serial line speeds the gateway accepts, in bits per second.
const BAUD_RATES: RangeInclusive<i64> = 50..=4_000_000;
/// The longest pause between two Modbus transactions on a line.
const MAX_INTER_REQUEST_DELAY: Duration = Duration::from_secs(10);

/// What a device lends its tags: defaults and limits.
struct TagDefaults {
    scan_interval: Duration,
    max_registers_per_read: u16,
}

/// A tag placed in a device's register map, for the overlap check.
struct Placed {
    name: Arc<str>,
    address: Address,
    bit: Option<u8>,
    width: u16,
}

/// Who holds a register (or coil) of a device's map: one tag, or distinct bits of it.
enum Holder {
    /// The first placed tag covering the whole register.
    Whole(usize),
    /// The placed tags of each bit taken, as a 16-bit mask and the first holder.
    Bits(u16, usize),
}

fn area_name(area: Area) -> &'static str {
    match area {
        Area::Coil => "a coil (co:)",
        Area::DiscreteInput => "a discrete input (di:)",
        Area::HoldingRegister => "a holding register (hr:)",
        Area::InputRegister => "an input register (ir:)",
    }
}

/// `hr:1..hr:2`, or `hr:1` for one register, or `hr:1.3` for a bit of it.
fn fmt_range(address: Address, bit: Option<u8>, width: u16) -> String {
    let last = u32::from(address.offset) + u32::from(width.max(1)) - 1;
    if let Some(bit) = bit {
        format!("{address}.{bit}")
    } else if width <= 1 {
        address.to_string()
    } else {
        format!("{address}..{}:{last}", address.area.prefix())
    }
}

impl Checker<'_> {
    /// One serial line is one device: two devices on one port would take it from each other,
    /// and two connections to one RTU-over-TCP converter would each get the other's answers.
    /// Serial paths that exist are compared resolved, so a `/dev/serial/by-id/` link and the
    /// `/dev/ttyUSB0` it points to are the same port.
    pub(super) fn port_not_shared(
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

    /// A `modbus_tcp`, `modbus_rtu` or `modbus_rtu_over_tcp` device: its own keys, then its
    /// units, in either form (one unit on the device, or `[[devices.units]]`).
    pub(super) fn modbus_device(
        &mut self,
        path: &FieldPath,
        protocol: Protocol,
        mut table: toml::Table,
        tags: TagSource<'_>,
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
            Some(units) if unit_id_given || tags.is_given() => {
                let given = match (unit_id_given, tags.is_given()) {
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
                        tags: tags.into(),
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
                    Some(text) => text.parse::<Parity>().unwrap_or_else(|e| {
                        self.report(&path.key("parity"), e.to_string());
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
                TagSource::Value(tags),
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
                    tags: tags.into(),
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
        } else if matches!(name.as_str(), "cmd" | "meta") {
            // A unit's records go to `{prefix}/{line}/{unit}`: these would be the line's
            // command or meta topic, which consumers and the command subscription read.
            let what = if name == "cmd" {
                "a command topic (the gateway subscribes to `{topic_prefix}/+/cmd`)"
            } else {
                "a meta topic (consumers read `{topic_prefix}/+/meta` as tag catalogs)"
            };
            let message = format!(
                "a unit may not be named `{name}`: its records' topic `{{topic_prefix}}/{{line}}/{name}` is {what}"
            );
            self.report(&name_path, message);
        }
        if let Some(&first) = names.get(&name) {
            let first_path = units.index(first).key("name");
            let message = format!(
                "duplicate unit name `{name}`: {} has it already",
                self.first_holder(&first_path, "unit")
            );
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
        let message = format!(
            "duplicate unit_id {unit_id}: {} has it already",
            self.first_holder(&first_path, "unit")
        );
        self.report(&units.index(index).key("unit_id"), message);
    }

    /// Checks the tags of a Modbus unit (written `header`), each on its own and then against
    /// each other (names, overlapping registers).
    fn tags(
        &mut self,
        path: &FieldPath,
        entries: TagEntries<'_>,
        defaults: &TagDefaults,
        protocol: Protocol,
        header: &str,
    ) -> Option<Vec<TagSpec>> {
        let foreign = Foreign::new(protocol, Protocol::tag_keys);
        let mut specs = Vec::new();
        let mut complete = true;
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut placed: Vec<Placed> = Vec::new();
        // Register -> who covers it; a tag is at most 125 registers wide. Bit tags share a
        // register as long as their bits differ.
        let mut covered: HashMap<(Area, u32), Holder> = HashMap::new();
        for (index, entry) in entries.enumerate() {
            let Some(entry) = entry else {
                self.whole_text_needed = true;
                return None;
            };
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
            let mask = spec.bit.map(|b| 1u16 << b);
            let overlapping = (start..=last)
                .filter_map(|register| match (covered.get(&(area, register)), mask) {
                    (Some(Holder::Whole(i)), _) => Some(*i),
                    (Some(Holder::Bits(_, i)), None) => Some(*i),
                    (Some(Holder::Bits(taken, _)), Some(bit)) if taken & bit != 0 => placed
                        .iter()
                        .position(|p| p.address == spec.address && p.bit == spec.bit),
                    _ => None,
                })
                .min();
            if let Some(other) = overlapping.and_then(|i| placed.get(i)) {
                let message = format!(
                    "overlaps tag `{}` ({})",
                    other.name,
                    fmt_range(other.address, other.bit, other.width)
                );
                self.report(&tag_path.key("address"), message);
            }
            for register in start..=last {
                let index = placed.len();
                let holder = covered.entry((area, register));
                match (holder, mask) {
                    (std::collections::hash_map::Entry::Vacant(v), Some(bit)) => {
                        v.insert(Holder::Bits(bit, index));
                    }
                    (std::collections::hash_map::Entry::Vacant(v), None) => {
                        v.insert(Holder::Whole(index));
                    }
                    (std::collections::hash_map::Entry::Occupied(mut o), Some(bit)) => {
                        if let Holder::Bits(taken, _) = o.get_mut() {
                            *taken |= bit;
                        }
                    }
                    (std::collections::hash_map::Entry::Occupied(_), None) => {}
                }
            }
            placed.push(Placed {
                name: Arc::clone(&spec.name),
                address: spec.address,
                bit: spec.bit,
                width,
            });
            specs.push(spec);
        }
        complete.then_some(specs)
    }

    /// Checks a tag's `writable`, `write_min` and `write_max`; the write access when writable.
    fn write_access(
        &mut self,
        path: &FieldPath,
        raw: &RawTag,
        address: Option<Address>,
        data_type: Option<DataType>,
    ) -> Option<WriteAccess> {
        let writable = raw.writable.unwrap_or(false);
        if let (true, Some(a)) = (writable, address) {
            if matches!(a.area, Area::InputRegister | Area::DiscreteInput) {
                let message = format!(
                    "{} is read-only in Modbus: only coils (co) and holding registers (hr) can \
                     be written",
                    area_name(a.area)
                );
                self.report(&path.key("writable"), message);
            }
        }
        let not_numeric = match data_type {
            Some(t @ (DataType::Bool | DataType::String)) => Some(t.name()),
            _ => None,
        };
        self.write_bounds(path, writable, not_numeric, raw.write_min, raw.write_max)
    }

    /// Checks one tag; returns it when its address and type are known.
    fn tag(&mut self, path: &FieldPath, raw: RawTag, defaults: &TagDefaults) -> Option<TagSpec> {
        let tag_address = raw
            .address
            .parse::<TagAddress>()
            .map_err(|e| self.report(&path.key("address"), e.to_string()))
            .ok();
        let address = tag_address.map(|a| a.address);
        let bit = tag_address.and_then(|a| a.bit);
        let data_type = match raw.data_type.as_deref() {
            None => address.map(|a| {
                if a.area.is_bit() || bit.is_some() {
                    DataType::Bool
                } else {
                    DataType::U16
                }
            }),
            Some(text) => text
                .parse::<DataType>()
                .map_err(|e| self.report(&path.key("type"), e.to_string()))
                .ok(),
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
            if let (Some(bit), false) = (bit, data_type == DataType::Bool) {
                let message = format!(
                    "`{address}.{bit}` is one bit of a register: use type = \"bool\" (or \
                     `{address}` without `.{bit}` for type \"{}\")",
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
            Some(text) => text.parse::<WordOrder>().unwrap_or_else(|e| {
                self.report(&path.key("order"), e.to_string());
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
        let write = self.write_access(path, &raw, address, data_type);
        let meta = self.tag_meta(
            path,
            TagMetaText {
                unit: raw.unit,
                description: raw.description,
                min: raw.min,
                max: raw.max,
            },
        );
        let spec = TagSpec {
            meta: meta.shared(),
            write,
            name: raw.name.into(),
            address: address?,
            bit,
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
}
