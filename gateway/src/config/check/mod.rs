//! The checker: walks the file's units in order, turns each into its runtime type and
//! collects every problem on the way, with its field path and line.
//!
//! A problem never stops the walk: each unit is checked as far as it can be, so that one run
//! reports every problem. A unit's value may therefore come back although problems were
//! reported about it (a value out of range is reported and replaced by its default); the
//! invariant is that [`check`] returns a [`Config`] only when no problem at all was reported.
//! The sections (`[gateway]`, `[buffer]`, `[mqtt]`) are checked here, the devices in
//! `devices.rs` (with their protocols' rules in `modbus.rs` and `opcua.rs`).

mod api;
mod cloud;
mod commands;
mod devices;
mod modbus;
mod mqtt;
mod opcua;
mod sparkplug;

pub(super) use devices::{Pieces, Protocol};

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::de::{plain_serde_message, unknown_key_message, UnitDeserializer, UnitError};
use super::problem::{ConfigErrors, FieldPath, Locator, Problem};
use super::raw::{Dur, RawBuffer, RawGateway, SECTIONS};
use super::values::{
    check_gateway_id, check_readable, fmt_duration, fmt_size, GIB, MAX_DURATION, MIB, MS, NONZERO,
};
use super::{BufferSettings, Config, GatewaySettings};
use devices::Foreign;

/// Checks the parsed file `root` (the text `src`, named `file` in problems); `dir` is the
/// config file's directory when loading from disk.
///
/// When the file was split at its devices (`split.rs`), `root` is the rest's table and the
/// devices come from `pieces`; `None` then means a piece did not parse on its own, and the
/// whole text must be checked instead.
pub(super) fn check(
    root: toml::Table,
    pieces: Option<Pieces<'_>>,
    src: &str,
    file: &str,
    dir: Option<&Path>,
) -> Option<Result<Config, ConfigErrors>> {
    let mut checker = Checker {
        locator: Locator::new(src),
        dir,
        problems: Vec::new(),
        whole_text_needed: false,
        disabled: 0,
    };
    let config = checker.config(root, pieces);
    if checker.whole_text_needed {
        return None;
    }
    let mut problems = checker.problems;
    Some(match config {
        Some(config) if problems.is_empty() => Ok(config),
        _ => {
            if problems.is_empty() {
                problems.push(Problem {
                    line: None,
                    field: String::new(),
                    message: "the configuration is incomplete".to_owned(),
                });
            }
            Err(ConfigErrors::new(file, problems))
        }
    })
}

/// Walks the units of one document and collects problems.
struct Checker<'a> {
    /// Finds the line of a field path.
    locator: Locator<'a>,
    /// The config file's directory, when loading from disk: relative paths are resolved
    /// against it and the credential files are checked.
    dir: Option<&'a Path>,
    problems: Vec<Problem>,
    /// A device's piece of a split file did not parse on its own: the whole text says why.
    whole_text_needed: bool,
    /// The devices left out with `enabled = false` (each unit of a Modbus line counts).
    disabled: usize,
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
        self.locator.line_of(path)
    }

    /// Names the first holder of a value that must be unique, for a duplicate's problem: `the
    /// {what} on line N` where its line is known, its field path otherwise.
    fn first_holder(&self, first_path: &FieldPath, what: &str) -> String {
        match self.line_of(first_path) {
            Some(line) => format!("the {what} on line {line}"),
            None => first_path.to_string(),
        }
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
                        Some(foreign) => foreign.unknown_key_message(&key),
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

    /// A file holding a secret or a key: resolved like any path, and when loading from disk
    /// checked to be readable (never read).
    fn credential_file(&mut self, field: &FieldPath, text: &str) -> PathBuf {
        let resolved = self.path(field, text);
        if self.dir.is_some() && !text.is_empty() && !text.contains('\0') {
            if let Err(e) = check_readable(&resolved) {
                self.report(field, e.to_string());
            }
        }
        resolved
    }

    fn config(&mut self, root: toml::Table, pieces: Option<Pieces<'_>>) -> Option<Config> {
        let (mut gateway, mut buffer, mut mqtt, mut devices) = (None, None, None, None);
        let (mut api, mut sparkplug) = (None, None);
        let mut commands = None;
        for (key, value) in root {
            match key.as_str() {
                "gateway" => gateway = Some(value),
                "buffer" => buffer = Some(value),
                "mqtt" => mqtt = Some(value),
                "devices" => devices = Some(value),
                "api" => api = Some(value),
                "commands" => commands = Some(value),
                "sparkplug" => sparkplug = Some(value),
                _ => {
                    let message = unknown_key_message("section", &key, SECTIONS);
                    self.report(&FieldPath::top(&key), message);
                }
            }
        }
        let gateway = self.gateway(gateway);
        let id = gateway.as_ref().map(|g| Arc::clone(&g.id));
        let buffer = self.buffer(buffer);
        let mut mqtt = self.mqtt(mqtt, id.as_deref());
        let sparkplug = self.sparkplug(sparkplug, mqtt.as_ref(), id.as_deref());
        if let Some(m) = &mut mqtt {
            m.sparkplug = sparkplug;
        }
        let data_dir = gateway
            .as_ref()
            .map_or_else(|| PathBuf::from("data"), |g| g.data_dir.clone());
        let api = api.map(|value| self.api(value));
        let commands = self.commands(commands);
        let devices = self.devices(devices, pieces, &data_dir);
        if let (Some(mqtt), Some(devices), Some(id)) = (&mqtt, &devices, &id) {
            self.status_topic_clash(mqtt, devices, id);
            self.cloud_rules(mqtt, devices, id);
        }
        Some(Config {
            gateway: gateway?,
            buffer: buffer?,
            mqtt: mqtt?,
            devices: devices?,
            api: api.flatten(),
            commands: commands?,
            disabled_devices: self.disabled,
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
}
