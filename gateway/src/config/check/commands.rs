//! `[commands]`: whether write commands are taken, and how often one tag may be written.
//! Which tags may be written is each tag's `writable` (checked with the tag, `modbus.rs`).

use std::time::Duration;

use super::Checker;
use crate::config::problem::FieldPath;
use crate::config::raw::RawCommands;
use crate::config::values::{MAX_DURATION, MS};
use crate::config::CommandSettings;

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
