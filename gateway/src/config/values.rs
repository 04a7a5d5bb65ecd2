//! The values of the file that are more than a number or a word: durations, sizes, the broker
//! URL, `HOST:PORT` addresses and names; how each is parsed and checked, and how a duration or
//! a size is written back in a message.

use std::io;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(super) const KIB: u64 = 1024;
pub(super) const MIB: u64 = 1024 * KIB;
pub(super) const GIB: u64 = 1024 * MIB;
/// The longest duration the file may set (7 days); keeps the runtime's time arithmetic safe.
pub(super) const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The smallest duration that is not zero.
pub(super) const NONZERO: Duration = Duration::from_nanos(1);
pub(super) const MS: Duration = Duration::from_millis(1);
pub(super) const DEFAULT_MQTT_PORT: u16 = 1883;
pub(super) const DEFAULT_MQTTS_PORT: u16 = 8883;

// ---- Durations and sizes -----------------------------------------------------------------

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

/// Parses a duration: a number, whole or with a fraction, and a unit (`us`, `ms`, `s`, `m` or
/// `h`), e.g. `"250ms"`, `"1.5s"`, `"2m"`, `"1h"`, `"500us"`; at most 7 days.
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
pub(super) fn fmt_duration(duration: Duration) -> String {
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
pub(super) enum SizeError {
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
pub(super) fn parse_size(text: &str) -> Result<u64, SizeError> {
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
pub(super) fn fmt_size(bytes: u64) -> String {
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

// ---- Addresses and URLs ------------------------------------------------------------------

/// Why a `HOST:PORT` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum HostPortError {
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
pub(super) fn split_host_port(
    text: &str,
    default_port: Option<u16>,
) -> Result<(String, u16), HostPortError> {
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
pub(super) enum UrlError {
    #[error("expected `mqtt://HOST[:PORT]` or `mqtts://HOST[:PORT]`, e.g. \"mqtts://broker.example.com\"")]
    Form,
    #[error("MQTT over WebSocket is not supported: use mqtts:// (TLS) or mqtt://")]
    WebSocket,
    #[error("unsupported scheme `{0}://`: use mqtts:// (TLS) or mqtt://")]
    Scheme(String),
    #[error("credentials do not belong in the url: use `username` and `password_file`")]
    Credentials,
    #[error("the url must be `mqtt[s]://HOST[:PORT]`, without a path, query or fragment")]
    Path,
    #[error("{0}")]
    HostPort(#[from] HostPortError),
}

/// The broker's address from its url.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BrokerUrl {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) tls: bool,
}

/// Splits `mqtt://host[:port]` (or `tcp://`; port 1883 by default) and `mqtts://host[:port]`
/// (or `ssl://`, `tls://`; port 8883 by default) into host, port and whether TLS is used.
pub(super) fn parse_mqtt_url(url: &str) -> Result<BrokerUrl, UrlError> {
    let (scheme, rest) = url.split_once("://").ok_or(UrlError::Form)?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" | "tls" => true,
        "ws" | "wss" => return Err(UrlError::WebSocket),
        _ => return Err(UrlError::Scheme(scheme.to_owned())),
    };
    if rest.contains('@') {
        return Err(UrlError::Credentials);
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err(UrlError::Path);
    }
    let default_port = if tls {
        DEFAULT_MQTTS_PORT
    } else {
        DEFAULT_MQTT_PORT
    };
    let (host, port) = split_host_port(authority, Some(default_port))?;
    Ok(BrokerUrl { host, port, tls })
}

// ---- Names -------------------------------------------------------------------------------

pub(super) fn check_gateway_id(id: &str) -> Result<(), String> {
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

pub(super) fn check_device_name(name: &str) -> Result<(), String> {
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

pub(super) fn check_tag_name(name: &str) -> Result<(), String> {
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

pub(super) fn check_topic_prefix(prefix: &str) -> Result<(), String> {
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

/// A `topic` template: its placeholders are known ones, and whatever they stand for, the topic
/// holds no wildcard or NUL.
pub(super) fn check_topic_template(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if text.contains(['+', '#']) {
        return Err("must not contain the MQTT wildcards `+` or `#`".to_owned());
    }
    if text.contains('\0') {
        return Err("must not contain NUL".to_owned());
    }
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        rest = &rest[open..];
        let Some(known) = super::TopicTemplate::PLACEHOLDERS
            .iter()
            .find(|p| rest.starts_with(*p))
        else {
            let end = rest.find('}').map_or(rest.len(), |i| i + 1);
            return Err(format!(
                "unknown placeholder `{}`: use {}",
                &rest[..end],
                super::TopicTemplate::PLACEHOLDERS.join(", ")
            ));
        };
        rest = &rest[known.len()..];
    }
    Ok(())
}

pub(super) fn check_client_id(client_id: &str) -> Result<(), String> {
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

/// Why a credential file cannot be used.
#[derive(Debug, thiserror::Error)]
pub(super) enum FileError {
    /// It does not exist or cannot be opened.
    #[error("cannot read `{}`: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// It is a directory or a device.
    #[error("`{}` is not a regular file", .0.display())]
    NotAFile(PathBuf),
}

/// Checks that a credential file (password, certificate, key) exists and can be opened;
/// never reads it.
pub(super) fn check_readable(path: &Path) -> Result<(), FileError> {
    let cannot = |source: io::Error| FileError::Unreadable {
        path: path.to_owned(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(cannot)?;
    if !metadata.is_file() {
        return Err(FileError::NotAFile(path.to_owned()));
    }
    std::fs::File::open(path).map(drop).map_err(cannot)
}
