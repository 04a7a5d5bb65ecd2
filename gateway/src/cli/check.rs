//! `check`: validate a config file without touching the network.

use std::path::Path;

use crate::config::{self, DeviceKind, DeviceSettings};
use crate::publish::tls::{self, Severity};

/// What `check` prints for the file at `path`, and whether the file is valid: one line with the
/// device and tag counts, or every problem, one per line, with file, line and field. For an
/// `mqtts://` url the TLS files are read and parsed too (the key must match the certificate,
/// the client certificate must not have expired): their problems are listed without a line,
/// and a warning (a client certificate that expires within 30 days) is a line before the
/// counts of a valid file.
pub fn run(path: &Path) -> (String, bool) {
    match config::load(path) {
        Ok(cfg) => {
            let findings = match &cfg.mqtt.tls {
                Some(settings) => tls::inspect(settings, &cfg.mqtt.host),
                None => Vec::new(),
            };
            let file = path.display();
            let line = |f: &tls::Finding| match f.severity {
                Severity::Problem => format!("{file}: {f}"),
                Severity::Warning => format!("{file}: warning: {f}"),
            };
            let mut lines: Vec<String> = findings.iter().map(line).collect();
            if findings.iter().any(|f| f.severity == Severity::Problem) {
                return (lines.join("\n"), false);
            }
            if let Some(warning) = cfg.api.as_ref().and_then(|api| api.exposure_warning()) {
                lines.push(format!("{file}: warning: {warning}"));
            }
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
            lines.push(format!("{file}: OK ({devices} devices, {tags} tags)"));
            (lines.join("\n"), true)
        }
        Err(e) => (e.to_string(), false),
    }
}
