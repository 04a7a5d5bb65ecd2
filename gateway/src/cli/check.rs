//! `check`: validate a config file without touching the network.

use std::path::Path;

use crate::config::{self, DeviceKind, DeviceSettings};
pub use crate::preflight::{probe_data_dir, DataDirError};
use crate::publish::tls::{self, Severity};

/// What `check` prints for the file at `path`, and whether the file is valid: one line with the
/// device (and disabled device) and tag counts, or every problem, one per line, with file,
/// line and field. Beyond the file's own checks, what [`crate::preflight::inspect`] finds (the same a reload
/// refuses a file for): for an `mqtts://` url the TLS files are read and parsed (the key must
/// match the certificate, the client certificate must not have expired), and the `[api]`
/// certificate and key are built into the API's TLS configuration as `run` builds it; their
/// problems are listed without a line, after the file's own problems, and a warning (a client
/// certificate that expires within 30 days, an API beyond loopback without a password or TLS,
/// every device disabled) is a line of its own, printed for an invalid file too. What would stop `run` at start is checked too: the data
/// directory must be creatable and writable (see [`probe_data_dir`]).
pub fn run(path: &Path) -> (String, bool) {
    match config::load(path) {
        Ok(cfg) => {
            let findings = crate::preflight::inspect(&cfg);
            let file = path.display();
            let line = |f: &tls::Finding| match f.severity {
                Severity::Problem => format!("{file}: {f}"),
                Severity::Warning => format!("{file}: warning: {f}"),
            };
            let mut ok = !crate::preflight::any_problem(&findings);
            // Problems first, then the warnings, each in the order found.
            let (problems, warnings): (Vec<_>, Vec<_>) = findings
                .iter()
                .partition(|f| f.severity == Severity::Problem);
            let mut lines: Vec<String> = problems.into_iter().map(line).collect();
            if let Err(e) = probe_data_dir(&cfg.gateway.data_dir) {
                lines.push(format!("{file}: gateway.data_dir: {e}"));
                ok = false;
            }
            lines.extend(warnings.into_iter().map(line));
            if !ok {
                return (lines.join("\n"), false);
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
            let disabled = cfg.disabled_devices;
            if devices == 0 && disabled > 0 {
                lines.push(format!(
                    "{file}: warning: every device is disabled (enabled = false): `run` would read nothing"
                ));
            }
            lines.push(if disabled == 0 {
                format!("{file}: OK ({devices} devices, {tags} tags)")
            } else {
                format!(
                    "{file}: OK ({} devices, {disabled} disabled, {tags} tags)",
                    devices + disabled
                )
            });
            (lines.join("\n"), true)
        }
        Err(e) => (e.to_string(), false),
    }
}
