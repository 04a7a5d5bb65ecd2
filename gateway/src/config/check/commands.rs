//! `[commands]`: whether write commands are taken, and how often one tag may be written.
//! Which tags may be written is each tag's `writable` (checked with the tag, `modbus.rs` and
//! `opcua.rs`); the bounds `write_min` / `write_max` of any protocol's tag are checked here.

use std::time::Duration;

use super::Checker;
use crate::config::problem::FieldPath;
use crate::config::raw::RawCommands;
use crate::config::values::{MAX_DURATION, MS};
use crate::config::CommandSettings;
use protocols::model::WriteAccess;

impl Checker<'_> {
    /// Checks the `[commands]` section; its absence is the defaults (off).
    pub(super) fn commands(&mut self, value: Option<toml::Value>) -> Option<CommandSettings> {
        let Some(value) = value else {
            return Some(CommandSettings::default());
        };
        let path = FieldPath::top("commands");
        let table = self.section(Some(value), &path, true)?;
        let (raw, _) = self.unit::<RawCommands>(table, &path, &[], None)?;
        let write_interval = self.duration(
            &path.key("write_interval"),
            raw.write_interval,
            Duration::from_secs(1),
            MS,
            MAX_DURATION,
        );
        Some(CommandSettings {
            enabled: raw.enabled.unwrap_or(false),
            write_interval,
        })
    }
}

impl Checker<'_> {
    /// Checks a tag's `write_min` and `write_max` (only with `writable`, only for numbers:
    /// `not_numeric` names the tag's type when it is no number, finite, min not above max);
    /// the write access when writable.
    pub(super) fn write_bounds(
        &mut self,
        path: &FieldPath,
        writable: bool,
        not_numeric: Option<&str>,
        write_min: Option<f64>,
        write_max: Option<f64>,
    ) -> Option<WriteAccess> {
        let mut bound = |key: &str, value: Option<f64>| -> Option<f64> {
            let value = value?;
            if !writable {
                self.report(&path.key(key), "is only for a tag with writable = true");
            } else if let Some(type_name) = not_numeric {
                let message = format!("is only for numbers, not type \"{type_name}\"");
                self.report(&path.key(key), message);
            } else if !value.is_finite() {
                self.report(&path.key(key), "must be a finite number");
            }
            Some(value)
        };
        let min = bound("write_min", write_min);
        let max = bound("write_max", write_max);
        if let (Some(min), Some(max)) = (min, max) {
            if min > max {
                let message = format!("must not be above write_max ({max})");
                self.report(&path.key("write_min"), message);
            }
        }
        writable.then_some(WriteAccess { min, max })
    }
}
