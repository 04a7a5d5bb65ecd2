//! `check`: validate a config file without touching the network.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use crate::config::{self, DeviceKind, DeviceSettings};
use crate::publish::tls::{self, Severity};

/// What `check` prints for the file at `path`, and whether the file is valid: one line with the
/// device (and disabled device) and tag counts, or every problem, one per line, with file, line and field. For an
/// `mqtts://` url the TLS files are read and parsed too (the key must match the certificate,
/// the client certificate must not have expired): their problems are listed without a line,
/// and a warning (a client certificate that expires within 30 days, every device disabled) is
/// a line before the counts of a valid file. What would stop `run` at start is checked too: the
/// data directory must be creatable and writable (see [`probe_data_dir`]).
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
            let mut ok = !findings.iter().any(|f| f.severity == Severity::Problem);
            if let Err(e) = probe_data_dir(&cfg.gateway.data_dir) {
                lines.push(format!("{file}: gateway.data_dir: {e}"));
                ok = false;
            }
            if !ok {
                return (lines.join("\n"), false);
            }
            if let Some(warning) = cfg.api.as_ref().and_then(|api| api.exposure_warning()) {
                lines.push(format!("{file}: warning: {warning}"));
            }
            // The shipped unit stops the gateway with TimeoutStopSec=30: the drain of the
            // window (shutdown_grace) and the final commit must fit in it.
            if cfg.mqtt.shutdown_grace >= std::time::Duration::from_secs(25) {
                lines.push(format!(
                    "{file}: warning: mqtt.shutdown_grace of {:?} leaves no time for the final commit within systemd's TimeoutStopSec=30 (systemd/edge-gateway.service): raise TimeoutStopSec with it",
                    cfg.mqtt.shutdown_grace
                ));
            }
            if !cfg.commands.enabled {
                let writable: usize = cfg
                    .devices
                    .iter()
                    .map(|d| match &d.kind {
                        DeviceKind::Modbus(m) => m
                            .units
                            .iter()
                            .flat_map(|u| &u.tags)
                            .filter(|t| t.write.is_some())
                            .count(),
                        DeviceKind::OpcUa(o) => o.tags.iter().filter(|t| t.write.is_some()).count(),
                    })
                    .sum();
                if writable > 0 {
                    let (n, are) = if writable == 1 {
                        ("1 tag".to_owned(), "is")
                    } else {
                        (format!("{writable} tags"), "are")
                    };
                    lines.push(format!(
                        "{file}: warning: {n} {are} `writable = true` but [commands] is not enabled: no write reaches them"
                    ));
                }
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
            let disabled = std::fs::read_to_string(path).map_or(0, |src| disabled_devices(&src));
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

/// Why the data directory would stop `run`.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// The directory (or one of its parents) cannot be created.
    #[error("cannot create {path}: {source}")]
    Create {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file cannot be written in the directory.
    #[error("cannot write in {path}: {source}")]
    Write {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Creates `dir` as `run` would and writes (and removes) a file in it, leaving nothing behind:
/// the directories it had to create are removed again, deepest first.
pub fn probe_data_dir(dir: &Path) -> Result<(), DataDirError> {
    // The directories that do not exist yet, deepest first.
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    let created = std::fs::create_dir_all(dir).map_err(|source| DataDirError::Create {
        path: dir.to_path_buf(),
        source,
    });
    let written = created.and_then(|()| {
        let probe = dir.join(format!(".edge-gateway-check-{}", std::process::id()));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
            .and_then(|mut f| f.write_all(b"check"));
        let _ = std::fs::remove_file(&probe);
        written.map_err(|source| DataDirError::Write {
            path: dir.to_path_buf(),
            source,
        })
    });
    for d in missing {
        let _ = std::fs::remove_dir(d);
    }
    written
}

/// The published devices (a Modbus line's units each count) of the `[[devices]]` entries with
/// `enabled = false`, which the loaded config leaves out. Counted on the file's own tables:
/// the file was valid, so each entry is a table.
fn disabled_devices(src: &str) -> usize {
    let Ok(doc) = src.parse::<toml::Table>() else {
        return 0;
    };
    let Some(devices) = doc.get("devices").and_then(toml::Value::as_array) else {
        return 0;
    };
    devices
        .iter()
        .filter_map(toml::Value::as_table)
        .filter(|d| d.get("enabled").and_then(toml::Value::as_bool) == Some(false))
        .map(|d| {
            d.get("units")
                .and_then(toml::Value::as_array)
                .map_or(1, |units| units.len().max(1))
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_that_did_not_exist_is_probed_and_removed_again() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/data");
        probe_data_dir(&dir).unwrap();
        assert!(!tmp.path().join("a").exists(), "nothing left behind");
    }

    #[test]
    fn an_existing_data_dir_keeps_its_files_and_gets_no_new_one() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("state"), "1").unwrap();
        probe_data_dir(tmp.path()).unwrap();
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state"]);
    }

    #[test]
    fn a_data_dir_under_a_plain_file_cannot_be_created() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("file"), "x").unwrap();
        let e = probe_data_dir(&tmp.path().join("file/data")).unwrap_err();
        assert!(matches!(e, DataDirError::Create { .. }), "{e}");
    }

    #[test]
    fn disabled_devices_count_each_unit_of_a_disabled_line() {
        let src = r#"
[[devices]]
name = "a"
enabled = false
[[devices]]
name = "b"
[[devices]]
name = "line"
enabled = false
  [[devices.units]]
  name = "u1"
  [[devices.units]]
  name = "u2"
"#;
        assert_eq!(disabled_devices(src), 3);
    }
}
