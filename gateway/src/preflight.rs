//! What `check` finds beyond the file's own checks ([`crate::config::load`]): the files the
//! config names read and parsed as `run` reads them (the TLS files of an `mqtts://` url and the
//! HTTP API's certificate and key), and warnings about settings that work but should not stay.
//! One function, [`inspect`], serves `check` (`cli/check.rs`) and a reload
//! (`pipeline::Running::reload_file`), so a file that fails `check` is refused by a reload too.
//!
//! Invariants: [`inspect`] only reads the files the config names; it never writes, never opens
//! a connection, and says the same for the same files on any machine (the system's CA
//! certificates are not looked at; a `credential:NAME` outside the service is left to the
//! service). The data directory's probe ([`probe_data_dir`]) writes (and removes) a file, so
//! it is apart: `check` always probes; a reload probes only when the file names another
//! directory than the running gateway's (see `pipeline::Running::reload_file`).

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Config, DeviceKind};
use crate::publish::tls::{self, Finding, Severity};

/// The shipped unit stops the gateway with `TimeoutStopSec=30`: the drain of the window
/// (`shutdown_grace`) and the final commit must fit in it.
const UNIT_STOP_TIMEOUT_MARGIN: Duration = Duration::from_secs(25);

/// Everything `check` says about `cfg` beyond its file: the `[mqtt]` TLS files, the `[api]`
/// certificate and key, then warnings about the settings (`check` prints the problems first). A
/// [`Severity::Problem`] would stop `run` (or its connection); a warning would not.
pub(crate) fn inspect(cfg: &Config) -> Vec<Finding> {
    let mut findings = match &cfg.mqtt.tls {
        Some(settings) => tls::inspect(settings, &cfg.mqtt.host),
        None => Vec::new(),
    };
    if let Some(api_tls) = cfg.api.as_ref().and_then(|api| api.tls.as_ref()) {
        findings.extend(tls::inspect_server(&api_tls.cert_file, &api_tls.key_file));
    }
    if let Some(warning) = cfg.api.as_ref().and_then(|api| api.exposure_warning()) {
        findings.push(warning_line("api.listen", warning));
    }
    if cfg.mqtt.shutdown_grace >= UNIT_STOP_TIMEOUT_MARGIN {
        let message = format!(
            "mqtt.shutdown_grace of {:?} leaves no time for the final commit within systemd's TimeoutStopSec=30 (systemd/edge-gateway.service): raise TimeoutStopSec with it",
            cfg.mqtt.shutdown_grace
        );
        findings.push(warning_line("mqtt.shutdown_grace", message));
    }
    if !cfg.commands.enabled {
        let writable = writable_tags(cfg);
        if writable > 0 {
            let (n, are) = if writable == 1 {
                ("1 tag".to_owned(), "is")
            } else {
                (format!("{writable} tags"), "are")
            };
            let message = format!(
                "{n} {are} `writable = true` but [commands] is not enabled: no write reaches them"
            );
            findings.push(warning_line("commands.enabled", message));
        }
    }
    findings
}

/// Whether any of `findings` is a problem.
pub(crate) fn any_problem(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity == Severity::Problem)
}

/// A warning whose `message` already says what it is about.
fn warning_line(field: &'static str, message: String) -> Finding {
    Finding {
        severity: Severity::Warning,
        field,
        message,
    }
}

/// The tags with a `write` setting.
fn writable_tags(cfg: &Config) -> usize {
    cfg.devices
        .iter()
        .map(|d| match &d.kind {
            DeviceKind::Modbus(m) => m
                .units
                .iter()
                .flat_map(|u| u.tags.iter())
                .filter(|t| t.write.is_some())
                .count(),
            DeviceKind::OpcUa(o) => o.tags.iter().filter(|t| t.write.is_some()).count(),
        })
        .sum()
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
}
