//! Helpers shared by the integration tests that run the real `edge-gateway` binary.

use std::process::{Child, Command};

/// Sends signal `sig` (`HUP`, `TERM`, ...) to the child.
pub fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}
