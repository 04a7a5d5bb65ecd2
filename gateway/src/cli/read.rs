//! The `read` command: one Modbus read, printed raw and decoded as every type and word order,
//! so an integrator on site can find which type and order a device's documentation meant.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use protocols::modbus::{
    codec, driver, Address, BlockData, DataType, Link, ModbusSettings, Parity, ReadError,
    SerialSettings, WordOrder,
};

use protocols::model::Value;

use crate::config::{self, DeviceKind};

/// Options of `edge-gateway read`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["device", "tcp", "rtu_over_tcp", "serial"])))]
pub struct ReadArgs {
    /// A Modbus device of --config (for a line with units: the line's name, with --unit).
    #[arg(long, requires = "config")]
    pub device: Option<String>,
    /// The config file that defines --device.
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// With --device: the unit's name or unit id, when the line has several units.
    #[arg(long, requires = "device")]
    pub unit: Option<String>,
    /// A Modbus TCP device or gateway, `host:port`.
    #[arg(long)]
    pub tcp: Option<String>,
    /// A serial-to-Ethernet converter speaking RTU over TCP, `host:port`.
    #[arg(long)]
    pub rtu_over_tcp: Option<String>,
    /// A serial port, e.g. /dev/ttyUSB0.
    #[arg(long)]
    pub serial: Option<String>,
    /// Serial bits per second.
    #[arg(long, default_value_t = 19_200, value_parser = clap::value_parser!(u32).range(50..=4_000_000))]
    pub baud_rate: u32,
    /// Serial parity: none, even or odd.
    #[arg(long, default_value = "even", value_parser = parse_parity)]
    pub parity: Parity,
    /// Serial stop bits, 1 or 2.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub stop_bits: u8,
    /// Unit id (slave id) for --tcp, --rtu-over-tcp and --serial.
    #[arg(long, default_value_t = 1)]
    pub unit_id: u8,
    /// How long to wait for the answer (e.g. 500ms, 2s); default the device's or 1s.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// The first register or bit, e.g. hr:100, ir:7, co:0, di:12 (zero-based).
    #[arg(long, value_parser = parse_address)]
    pub address: Address,
    /// How many registers (at most 125) or bits (at most 2000).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=2000))]
    pub count: u16,
}

/// A parity as the config file writes it, or the one letter of `8N1`, `8E1`, `8O1`.
fn parse_parity(s: &str) -> Result<Parity, String> {
    match s.to_ascii_lowercase().as_str() {
        "n" => Ok(Parity::None),
        "e" => Ok(Parity::Even),
        "o" => Ok(Parity::Odd),
        _ => s
            .parse()
            .map_err(|e: protocols::modbus::UnknownWord| format!("{e} (or n, e, o)")),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    match config::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be longer than 0s".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_address(s: &str) -> Result<Address, String> {
    s.parse::<Address>().map_err(|e| e.to_string())
}

/// Why `read` printed no values.
#[derive(Debug, thiserror::Error)]
pub enum ReadCommandError {
    /// The config file does not load.
    #[error("{0}")]
    Config(#[from] config::ConfigErrors),
    /// The device or unit is not in the config, is not a Modbus device, or the read asked
    /// for more than one request can return.
    #[error("{0}")]
    Invalid(String),
    /// The device answered with an exception.
    #[error("unit {unit} answered exception {code} ({meaning})")]
    Exception {
        /// The unit id.
        unit: u8,
        /// The exception code.
        code: u8,
        /// What the code means.
        meaning: &'static str,
    },
    /// No usable answer.
    #[error("{target}: {error}")]
    Read {
        /// The line that was read.
        target: String,
        /// What went wrong.
        error: ReadError,
    },
}

/// Runs the command and returns the text to print.
pub async fn run(args: &ReadArgs) -> Result<String, ReadCommandError> {
    if !args.address.area.is_bit() && args.count > 125 {
        return Err(ReadCommandError::Invalid(format!(
            "--count {}: one read returns at most 125 registers",
            args.count
        )));
    }
    let (settings, unit_id, label) = target(args)?;
    let answer = driver::read_once(
        &settings,
        unit_id,
        args.address.area,
        args.address.offset,
        args.count,
    )
    .await
    .map_err(|error| ReadCommandError::Read {
        target: settings.link.target().to_string(),
        error,
    })?;
    match answer {
        Ok(data) => Ok(render(&label, args.address, &data)),
        Err(code) => {
            let code = u8::from(code);
            Err(ReadCommandError::Exception {
                unit: unit_id,
                code,
                meaning: exception_meaning(code),
            })
        }
    }
}

/// The line settings, unit id and a label for the heading.
fn target(args: &ReadArgs) -> Result<(ModbusSettings, u8, String), ReadCommandError> {
    let bare = |link: Link| {
        let mut s = ModbusSettings::tcp(String::new(), args.unit_id, Vec::new());
        s.link = link;
        if let Some(t) = args.timeout {
            s.timeout = t;
        }
        s
    };
    if let Some(address) = &args.tcp {
        let s = bare(Link::Tcp {
            address: address.clone(),
        });
        return Ok((s, args.unit_id, format!("{address} unit {}", args.unit_id)));
    }
    if let Some(address) = &args.rtu_over_tcp {
        let s = bare(Link::RtuOverTcp {
            address: address.clone(),
        });
        return Ok((
            s,
            args.unit_id,
            format!("{address} (RTU) unit {}", args.unit_id),
        ));
    }
    if let Some(port) = &args.serial {
        let s = bare(Link::Rtu(SerialSettings {
            port: port.clone(),
            baud_rate: args.baud_rate,
            parity: args.parity,
            data_bits: 8,
            stop_bits: args.stop_bits,
        }));
        return Ok((s, args.unit_id, format!("{port} unit {}", args.unit_id)));
    }
    let (Some(device), Some(path)) = (&args.device, &args.config) else {
        return Err(ReadCommandError::Invalid(
            "give --device with --config, or one of --tcp, --rtu-over-tcp, --serial".into(),
        ));
    };
    let cfg = config::load(path)?;
    // `line/unit` names a unit directly, as it appears in topics.
    let (line_name, unit_arg) = match (device.split_once('/'), &args.unit) {
        (Some((line_name, unit)), None) => (line_name, Some(unit.to_string())),
        _ => (device.as_str(), args.unit.clone()),
    };
    let Some(found) = cfg.devices.iter().find(|d| &*d.name == line_name) else {
        let names: Vec<&str> = cfg.devices.iter().map(|d| &*d.name).collect();
        return Err(ReadCommandError::Invalid(format!(
            "{}: no device `{line_name}`; devices: {}",
            path.display(),
            names.join(", ")
        )));
    };
    let DeviceKind::Modbus(settings) = &found.kind else {
        return Err(ReadCommandError::Invalid(format!(
            "{}: device `{line_name}` is not a Modbus device",
            path.display()
        )));
    };
    let unit = match &unit_arg {
        None if settings.units.len() == 1 => settings.units.first(),
        None => {
            return Err(ReadCommandError::Invalid(format!(
                "device `{line_name}` has {} units: name one with --unit ({})",
                settings.units.len(),
                unit_list(settings)
            )))
        }
        Some(u) => settings.units.iter().find(|x| {
            x.name.as_deref() == Some(u.as_str()) || u.parse::<u8>().ok() == Some(x.unit_id)
        }),
    };
    let Some(unit) = unit else {
        return Err(ReadCommandError::Invalid(format!(
            "device `{line_name}` has no unit `{}`; units: {}",
            unit_arg.unwrap_or_default(),
            unit_list(settings)
        )));
    };
    let mut settings = settings.clone();
    if let Some(t) = args.timeout {
        settings.timeout = t;
    }
    let label = match &unit.name {
        Some(n) => format!("{line_name}/{n} (unit {})", unit.unit_id),
        None => format!("{line_name} (unit {})", unit.unit_id),
    };
    Ok((settings.clone(), unit.unit_id, label))
}

fn unit_list(settings: &ModbusSettings) -> String {
    settings
        .units
        .iter()
        .map(|u| match &u.name {
            Some(n) => format!("{n} = {}", u.unit_id),
            None => u.unit_id.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a Modbus exception code means.
pub fn exception_meaning(code: u8) -> &'static str {
    match code {
        1 => "illegal function",
        2 => "illegal data address",
        3 => "illegal data value",
        4 => "server device failure",
        5 => "acknowledge",
        6 => "server device busy",
        8 => "memory parity error",
        10 => "gateway path unavailable",
        11 => "gateway target device failed to respond",
        _ => "unknown exception",
    }
}

const COLUMN: usize = 24;

/// The raw values and, for registers, every type decoded in every word order from the first
/// register on.
pub fn render(label: &str, address: Address, data: &BlockData) -> String {
    let mut out = String::new();
    let area = address.area.prefix();
    match data {
        BlockData::Bits(bits) => {
            let _ = writeln!(out, "{label}: {} from {address}", plural(bits.len(), "bit"));
            for (i, b) in bits.iter().enumerate() {
                let at = usize::from(address.offset) + i;
                let _ = writeln!(out, "  {area}:{at:<6} {}", u8::from(*b));
            }
        }
        BlockData::Registers(regs) => {
            let _ = writeln!(
                out,
                "{label}: {} from {address}",
                plural(regs.len(), "register")
            );
            let _ = writeln!(
                out,
                "  {:<10} {:<8} {:<8} {:<8} bits",
                "address", "hex", "u16", "i16"
            );
            for (i, r) in regs.iter().enumerate() {
                let at = format!("{area}:{}", usize::from(address.offset) + i);
                let _ = writeln!(
                    out,
                    "  {at:<10} 0x{r:04X}   {r:<8} {:<8} {:016b}",
                    *r as i16, r
                );
            }
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "  decoded from {address} (use --address to start elsewhere):"
            );
            let mut header = format!("  {:<7}", "type");
            for order in WordOrder::ALL {
                let _ = write!(header, "{:<COLUMN$}", format!("{order:?}"));
            }
            let _ = writeln!(out, "{}", header.trim_end());
            for data_type in [
                DataType::U16,
                DataType::I16,
                DataType::U32,
                DataType::I32,
                DataType::F32,
                DataType::U64,
                DataType::I64,
                DataType::F64,
                DataType::String,
            ] {
                let length = u16::try_from(regs.len() * 2).unwrap_or(u16::MAX);
                let width = usize::from(codec::register_count(data_type, length));
                let Some(slice) = regs.get(..width) else {
                    continue;
                };
                let mut row = format!("  {:<7}", data_type.name());
                for order in WordOrder::ALL {
                    let text = match codec::decode_registers(data_type, order, length, slice) {
                        Ok(Value::Float(x)) if data_type == DataType::F32 => float_text(x as f32),
                        Ok(Value::Float(x)) => float_text(x),
                        Ok(v) => v.to_string(),
                        Err(e) => e.to_string(),
                    };
                    let _ = write!(row, "{text:<w$} ", w = COLUMN - 1);
                }
                let _ = writeln!(out, "{}", row.trim_end());
            }
        }
    }
    out
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// A float as plain digits when that is short, else in exponent form (denormals, huge values).
fn float_text<F: Into<f64> + std::fmt::Display + std::fmt::LowerExp + Copy>(x: F) -> String {
    let a = x.into().abs();
    if a == 0.0 || !a.is_finite() || (1e-4..1e12).contains(&a) {
        format!("{x}")
    } else {
        format!("{x:e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocols::modbus::Area;

    #[test]
    fn renders_raw_registers_and_every_type_in_every_order() {
        // 12.5f32 = 0x4148_0000; as CDAB the device sends 0x0000 0x4148.
        let text = render(
            "meters/meter3 (unit 3)",
            Address {
                area: Area::InputRegister,
                offset: 12,
            },
            &BlockData::Registers(vec![0x0000, 0x4148]),
        );
        assert!(text.contains("ir:12      0x0000"), "{text}");
        assert!(text.contains("ir:13      0x4148"), "{text}");
        let f32_row = text
            .lines()
            .find(|l| l.trim_start().starts_with("f32"))
            .expect("an f32 row");
        let cells: Vec<&str> = f32_row.split_whitespace().collect();
        // Columns: type, ABCD, CDAB, BADC, DCBA.
        assert_eq!(cells[2], "12.5", "{f32_row}");
        assert!(
            !text.contains("f64"),
            "a 64-bit type needs 4 registers: {text}"
        );
        assert!(text.contains("string"), "{text}");
    }

    #[test]
    fn renders_bits() {
        let text = render(
            "x",
            Address {
                area: Area::Coil,
                offset: 3,
            },
            &BlockData::Bits(vec![true, false]),
        );
        assert!(text.contains("co:3      1"), "{text}");
        assert!(text.contains("co:4      0"), "{text}");
    }
}
