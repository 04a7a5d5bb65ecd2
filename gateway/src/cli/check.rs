//! `check`: validate a config file without touching the network.

use std::path::Path;

use crate::config::{self, DeviceKind, DeviceSettings};

/// What `check` prints for the file at `path`, and whether the file is valid: one line with the
/// device and tag counts, or every problem, one per line, with file, line and field.
pub fn run(path: &Path) -> (String, bool) {
    match config::load(path) {
        Ok(cfg) => {
            let tags: usize = cfg.devices.iter().map(DeviceSettings::tag_count).sum();
            // Each unit of a Modbus line is published as a device of its own.
            let devices: usize = cfg
                .devices
                .iter()
                .map(|d| match &d.kind {
                    DeviceKind::Modbus(m) => m.units.len(),
                    DeviceKind::OpcUa(_) => 1,
                })
                .sum();
            let text = format!("{}: OK ({devices} devices, {tags} tags)", path.display());
            (text, true)
        }
        Err(e) => (e.to_string(), false),
    }
}
