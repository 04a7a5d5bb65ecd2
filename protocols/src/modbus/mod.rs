//! Modbus adapters. The runtime types here are built by the gateway's config loader after
//! validation; a driver never sees an unchecked value.

pub mod codec;
pub mod driver;
mod planner;
mod scan;
mod schedule;
mod transport;
pub mod write;

pub use schedule::BUDGET_FACTOR;
pub use transport::{frame, mbap, BlockData, LinkError, ReadError};

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The four Modbus data areas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Area {
    /// Read/write bits (`co:`), function 01.
    Coil,
    /// Read-only bits (`di:`), function 02.
    DiscreteInput,
    /// Read/write registers (`hr:`), function 03.
    HoldingRegister,
    /// Read-only registers (`ir:`), function 04.
    InputRegister,
}

impl Area {
    /// Whether the area holds single bits rather than 16-bit registers.
    pub fn is_bit(self) -> bool {
        matches!(self, Area::Coil | Area::DiscreteInput)
    }

    /// The config prefix: `co`, `di`, `hr` or `ir`.
    pub fn prefix(self) -> &'static str {
        match self {
            Area::Coil => "co",
            Area::DiscreteInput => "di",
            Area::HoldingRegister => "hr",
            Area::InputRegister => "ir",
        }
    }
}

/// A config word that names none of a type's values, e.g. `type = "float"`; says which
/// words there are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{text}`: use {expected}")]
pub struct UnknownWord {
    /// What the word names: `area`, `type`, `order` or `parity`.
    what: &'static str,
    /// The word as written.
    text: String,
    /// The words there are, for the message.
    expected: &'static str,
}

impl UnknownWord {
    fn new(what: &'static str, text: &str, expected: &'static str) -> Self {
        UnknownWord {
            what,
            text: text.to_owned(),
            expected,
        }
    }
}

impl FromStr for Area {
    type Err = UnknownWord;

    /// `hr`, `ir`, `co` or `di`, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "hr" => Ok(Area::HoldingRegister),
            "ir" => Ok(Area::InputRegister),
            "co" => Ok(Area::Coil),
            "di" => Ok(Area::DiscreteInput),
            _ => Err(UnknownWord::new(
                "area",
                s,
                "hr (holding), ir (input), co (coil) or di (discrete input)",
            )),
        }
    }
}

impl fmt::Display for Area {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.prefix())
    }
}

/// A zero-based address in one area, written `hr:100` in configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    /// The data area.
    pub area: Area,
    /// Zero-based register or bit number.
    pub offset: u16,
}

/// Why an address string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// The text has no `area:` prefix.
    #[error("expected `AREA:NUMBER` with AREA one of hr, ir, co, di (e.g. `hr:100`)")]
    Format,
    /// The prefix is not one of the four areas.
    #[error(transparent)]
    Area(#[from] UnknownWord),
    /// The number is not in 0..=65535.
    #[error("`{0}` is not a register number between 0 and 65535")]
    Number(String),
    /// A Modicon-style number such as `40001`, which names an area by its first digit and
    /// counts from 1.
    #[error(
        "`{text}` looks like a Modicon register number (first digit the area, counted from 1): \
         did you mean `{suggestion}`? Addresses here are `AREA:NUMBER`, counted from 0"
    )]
    Modicon {
        /// The address as written.
        text: String,
        /// The zero-based address it stands for.
        suggestion: Address,
    },
    /// The bit after the register (`hr:5.3`) is not in 0..=15.
    #[error("`{0}` is not a bit number between 0 (least significant) and 15")]
    Bit(String),
    /// A bit given on a coil or discrete input (`co:5.3`), which is a single bit already.
    #[error("`{0}:` is one bit already: `.BIT` is only for a bit of a register (hr or ir)")]
    BitOfBit(Area),
}

/// A Modicon-style address (`40001`, `400001`, `30001`, `10001`, `00001`) as the zero-based
/// address it stands for; None when the text is not one.
fn modicon(text: &str) -> Option<Address> {
    if !(5..=6).contains(&text.len()) || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let area = match text.as_bytes().first()? {
        b'0' => Area::Coil,
        b'1' => Area::DiscreteInput,
        b'3' => Area::InputRegister,
        b'4' => Area::HoldingRegister,
        _ => return None,
    };
    let number: u32 = text.get(1..)?.parse().ok()?;
    let offset = u16::try_from(number.checked_sub(1)?).ok()?;
    Some(Address { area, offset })
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((area, num)) = s.trim().split_once(':') else {
            return Err(match modicon(s.trim()) {
                Some(suggestion) => AddressError::Modicon {
                    text: s.trim().to_owned(),
                    suggestion,
                },
                None => AddressError::Format,
            });
        };
        // Lower-cased first, so that an unknown area is named the way the known ones are.
        let area = area.to_ascii_lowercase().parse::<Area>()?;
        let offset = num
            .trim()
            .parse::<u16>()
            .map_err(|_| AddressError::Number(num.to_string()))?;
        Ok(Address { area, offset })
    }
}

/// Where a tag is: an address, and for a bool in a register (`hr:5.3`) the bit, 0 being the
/// least significant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TagAddress {
    /// The register (or coil, or discrete input).
    pub address: Address,
    /// The bit of the register, 0..=15; only in `hr` and `ir`.
    pub bit: Option<u8>,
}

impl FromStr for TagAddress {
    type Err = AddressError;

    /// `hr:5` or `hr:5.3` (bit 3 of holding register 5).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let (register, bit) = match text.split_once(':') {
            Some((_, number)) => match number.rsplit_once('.') {
                Some((_, bit)) => (&text[..text.len() - bit.len() - 1], Some(bit)),
                None => (text, None),
            },
            None => (text, None),
        };
        let address = register.parse::<Address>()?;
        let bit = match bit {
            None => None,
            Some(_) if address.area.is_bit() => return Err(AddressError::BitOfBit(address.area)),
            Some(bit) => match bit.trim().parse::<u8>() {
                Ok(b) if b < 16 => Some(b),
                _ => return Err(AddressError::Bit(bit.to_owned())),
            },
        };
        Ok(TagAddress { address, bit })
    }
}

impl fmt::Display for TagAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bit {
            Some(bit) => write!(f, "{}.{bit}", self.address),
            None => write!(f, "{}", self.address),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.area.prefix(), self.offset)
    }
}

/// How the bits or registers of a tag are interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// A coil or discrete input, or a register that is non-zero.
    Bool,
    /// One register, signed.
    I16,
    /// One register, unsigned.
    U16,
    /// Two registers, signed.
    I32,
    /// Two registers, unsigned.
    U32,
    /// Four registers, signed.
    I64,
    /// Four registers, unsigned.
    U64,
    /// Two registers, IEEE 754 single precision.
    F32,
    /// Four registers, IEEE 754 double precision.
    F64,
    /// `length` bytes of text, two per register.
    String,
}

impl DataType {
    /// The config name of the type.
    pub fn name(self) -> &'static str {
        match self {
            DataType::Bool => "bool",
            DataType::I16 => "i16",
            DataType::U16 => "u16",
            DataType::I32 => "i32",
            DataType::U32 => "u32",
            DataType::I64 => "i64",
            DataType::U64 => "u64",
            DataType::F32 => "f32",
            DataType::F64 => "f64",
            DataType::String => "string",
        }
    }
}

impl FromStr for DataType {
    type Err = UnknownWord;

    /// The config name ([`DataType::name`]), in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
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
            _ => {
                return Err(UnknownWord::new(
                    "type",
                    s,
                    "bool, i16, u16, i32, u32, i64, u64, f32, f64 or string",
                ))
            }
        })
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Byte order of multi-register values; `A` is the most significant byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WordOrder {
    /// Big-endian: registers most significant first, bytes high first (the Modbus default).
    #[default]
    ABCD,
    /// Registers least significant first, bytes high first ("word swap").
    CDAB,
    /// Registers most significant first, bytes low first ("byte swap").
    BADC,
    /// Little-endian: registers least significant first, bytes low first.
    DCBA,
}

impl WordOrder {
    /// All four orders, for the `read` command's table.
    pub const ALL: [WordOrder; 4] = [
        WordOrder::ABCD,
        WordOrder::CDAB,
        WordOrder::BADC,
        WordOrder::DCBA,
    ];

    /// The config name: `ABCD`, `CDAB`, `BADC` or `DCBA`.
    pub fn name(self) -> &'static str {
        match self {
            WordOrder::ABCD => "ABCD",
            WordOrder::CDAB => "CDAB",
            WordOrder::BADC => "BADC",
            WordOrder::DCBA => "DCBA",
        }
    }
}

impl FromStr for WordOrder {
    type Err = UnknownWord;

    /// The config name ([`WordOrder::name`]), in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WordOrder::ALL
            .into_iter()
            .find(|order| order.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownWord::new("order", s, "ABCD, CDAB, BADC or DCBA"))
    }
}

impl fmt::Display for WordOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// When a device's samples are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    /// Every scan reports every tag.
    #[default]
    EveryScan,
    /// A tag is reported when it changes by more than its deadband, when its quality changes,
    /// or when `max_silence` has passed since it was last reported.
    OnChange,
}

/// One validated Modbus tag.
#[derive(Debug, Clone, PartialEq)]
pub struct TagSpec {
    /// Tag name, unique within the device.
    pub name: Arc<str>,
    /// Where the tag starts.
    pub address: Address,
    /// For a bool in a register area, the bit of the register (0 = least significant); the
    /// tag then occupies its one register, which other bit tags may share.
    pub bit: Option<u8>,
    /// How to interpret it.
    pub data_type: DataType,
    /// Word and byte order for multi-register types.
    pub order: WordOrder,
    /// For strings, the length in bytes; ignored otherwise.
    pub length: u16,
    /// value = raw * scale + offset.
    pub scale: f64,
    /// Added after scaling.
    pub offset: f64,
    /// Smallest change reported in `on_change` mode.
    pub deadband: f64,
    /// How often the tag is scanned.
    pub scan_interval: Duration,
    /// Unit, description and engineering range, for consumers; the driver never reads it.
    pub meta: Arc<crate::model::TagMeta>,
    /// Whether (and within which range) commands may write the tag; None: read-only.
    pub write: Option<crate::model::WriteAccess>,
}

impl TagSpec {
    /// The number of registers (or bits, in a bit area) the tag occupies.
    pub fn width(&self) -> u16 {
        if self.address.area.is_bit() || self.bit.is_some() {
            1
        } else {
            codec::register_count(self.data_type, self.length)
        }
    }
}

/// How the gateway reaches a Modbus line.
#[derive(Debug, Clone, PartialEq)]
pub enum Link {
    /// Modbus TCP (MBAP framing) to `host:port`.
    Tcp {
        /// `host:port` of the device or gateway.
        address: String,
    },
    /// RTU frames carried over a TCP connection to `host:port` (serial-to-Ethernet converters).
    RtuOverTcp {
        /// `host:port` of the converter.
        address: String,
    },
    /// RTU frames on a local serial port.
    Rtu(SerialSettings),
}

impl Link {
    /// Where the line is, for logs: an address or a port path.
    pub fn target(&self) -> &str {
        match self {
            Link::Tcp { address } | Link::RtuOverTcp { address } => address,
            Link::Rtu(serial) => &serial.port,
        }
    }

    /// Whether the link carries RTU frames (one transaction at a time, t3.5 gaps).
    pub fn is_rtu(&self) -> bool {
        !matches!(self, Link::Tcp { .. })
    }
}

/// Parity of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Parity {
    /// No parity bit.
    None,
    /// Even parity (the Modbus default).
    #[default]
    Even,
    /// Odd parity.
    Odd,
}

impl Parity {
    /// The config name: `none`, `even` or `odd`.
    pub fn name(self) -> &'static str {
        match self {
            Parity::None => "none",
            Parity::Even => "even",
            Parity::Odd => "odd",
        }
    }
}

impl FromStr for Parity {
    type Err = UnknownWord;

    /// The config name ([`Parity::name`]), in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Parity::None),
            "even" => Ok(Parity::Even),
            "odd" => Ok(Parity::Odd),
            _ => Err(UnknownWord::new("parity", s, "none, even or odd")),
        }
    }
}

impl fmt::Display for Parity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Settings of a serial line.
#[derive(Debug, Clone, PartialEq)]
pub struct SerialSettings {
    /// Path of the serial device, e.g. `/dev/ttyUSB0` or a `/dev/serial/by-id/...` link.
    pub port: String,
    /// Bits per second.
    pub baud_rate: u32,
    /// Parity bit.
    pub parity: Parity,
    /// Data bits per character (8 for RTU).
    pub data_bits: u8,
    /// Stop bits, 1 or 2.
    pub stop_bits: u8,
}

impl SerialSettings {
    /// Bits on the wire per character: start, data, parity and stop bits.
    pub fn bits_per_char(&self) -> u32 {
        let parity = u32::from(self.parity != Parity::None);
        1 + u32::from(self.data_bits) + parity + u32::from(self.stop_bits)
    }
}

/// One unit (slave id) on a Modbus line and its tags.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitSettings {
    /// The unit's name from a `[[devices.units]]` entry; `None` for the one-unit form
    /// (`unit_id` and `tags` on the device itself).
    pub name: Option<Arc<str>>,
    /// Unit id (slave id), 0-247 on RTU (0 only for TCP devices that ignore it), 0-255 on TCP.
    pub unit_id: u8,
    /// The unit's tags, in config order; a tag's index is its `TagId` within the unit. Shared:
    /// the running config, the driver and a reload's comparison hold one copy (10k tags are
    /// about 1.7 MB).
    pub tags: Arc<[TagSpec]>,
}

/// A validated Modbus line: one connection or serial port shared by one or more units.
#[derive(Debug, Clone, PartialEq)]
pub struct ModbusSettings {
    /// How the line is reached.
    pub link: Link,
    /// Timeout for connecting and for each request.
    pub timeout: Duration,
    /// Pause between the end of one transaction and the next request on the line.
    pub inter_request_delay: Duration,
    /// Largest number of registers in one read request.
    pub max_registers_per_read: u16,
    /// Largest run of unused registers read to merge two blocks.
    pub max_gap: u16,
    /// When samples are reported.
    pub report: Report,
    /// In `on_change` mode, the longest time a tag goes unreported.
    pub max_silence: Duration,
    /// First reconnect delay; doubles up to `backoff_max`. Also the longest probe period of a
    /// demoted unit is `backoff_max`.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// The units on the line, at least one.
    pub units: Vec<UnitSettings>,
}

impl ModbusSettings {
    /// A line with one unnamed unit and the defaults of a Modbus TCP device.
    pub fn tcp(address: impl Into<String>, unit_id: u8, tags: Vec<TagSpec>) -> Self {
        ModbusSettings {
            link: Link::Tcp {
                address: address.into(),
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
                unit_id,
                tags: tags.into(),
            }],
        }
    }

    /// Number of tags over all units.
    pub fn tag_count(&self) -> usize {
        self.units.iter().map(|u| u.tags.len()).sum()
    }
}

impl TagSpec {
    /// Where the tag is, with its bit: `hr:5.3`.
    pub fn tag_address(&self) -> TagAddress {
        TagAddress {
            address: self.address,
            bit: self.bit,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tag_address(s: &str) -> Result<TagAddress, AddressError> {
        s.parse()
    }

    #[test]
    fn a_bit_of_a_register_is_written_after_a_dot() {
        let a = tag_address("hr:5.3").unwrap();
        assert_eq!(
            a.address,
            Address {
                area: Area::HoldingRegister,
                offset: 5
            }
        );
        assert_eq!(a.bit, Some(3));
        assert_eq!(a.to_string(), "hr:5.3");
        let a = tag_address("IR:0.15").unwrap();
        assert_eq!((a.address.area, a.bit), (Area::InputRegister, Some(15)));
        assert_eq!(tag_address("hr:5").unwrap().bit, None);
    }

    #[test]
    fn a_bit_past_15_or_of_a_coil_is_refused() {
        assert_eq!(tag_address("hr:5.16"), Err(AddressError::Bit("16".into())));
        assert_eq!(tag_address("hr:5.x"), Err(AddressError::Bit("x".into())));
        assert_eq!(tag_address("hr:5."), Err(AddressError::Bit("".into())));
        assert_eq!(
            tag_address("co:5.1"),
            Err(AddressError::BitOfBit(Area::Coil))
        );
        assert!(matches!(
            tag_address("hr:70000.1"),
            Err(AddressError::Number(_))
        ));
    }

    #[test]
    fn modicon_numbers_are_explained_with_the_address_they_stand_for() {
        let suggest = |s: &str| match s.parse::<Address>() {
            Err(AddressError::Modicon { suggestion, .. }) => Some(suggestion.to_string()),
            _ => None,
        };
        assert_eq!(suggest("40001").as_deref(), Some("hr:0"));
        assert_eq!(suggest("40101").as_deref(), Some("hr:100"));
        assert_eq!(suggest("30001").as_deref(), Some("ir:0"));
        assert_eq!(suggest("10005").as_deref(), Some("di:4"));
        assert_eq!(suggest("00001").as_deref(), Some("co:0"));
        assert_eq!(suggest("400001").as_deref(), Some("hr:0"));
        assert_eq!(suggest("465536").as_deref(), Some("hr:65535"));
        assert_eq!(suggest("465537"), None);
        assert_eq!(suggest("40000"), None, "Modicon numbers count from 1");
        assert_eq!(suggest("20001"), None, "2 is no area");
        assert_eq!(suggest("4001"), None);
        assert_eq!("4001".parse::<Address>(), Err(AddressError::Format));
    }
}
