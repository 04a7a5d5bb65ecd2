//! Builds the power-cut shim (`powercut/shim.rs`, std only) into an `LD_PRELOAD` library with the
//! same `rustc` cargo uses, and hands its path to the tests as `POWERCUT_SHIM`. Linux on x86_64
//! or aarch64 only (the shim declares libc's types and constants for those): elsewhere nothing is
//! built and the power-cut tests skip themselves.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=powercut/shim.rs");
    let cfg = |key: &str| std::env::var(key).unwrap_or_default();
    if cfg("CARGO_CFG_TARGET_OS") != "linux"
        || !matches!(cfg("CARGO_CFG_TARGET_ARCH").as_str(), "x86_64" | "aarch64")
    {
        return;
    }
    let manifest =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let lib = out.join("libpowercut.so");
    let mut cmd = Command::new(rustc);
    cmd.args([
        "--edition",
        "2021",
        "--crate-type",
        "cdylib",
        "-C",
        "opt-level=2",
    ])
    .arg("-o")
    .arg(&lib)
    .arg(manifest.join("powercut").join("shim.rs"));
    if let Ok(target) = std::env::var("TARGET") {
        cmd.args(["--target", &target]);
    }
    let output = cmd.output().expect("run rustc for the power-cut shim");
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!("building the power-cut shim failed:\n{stderr}");
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=powercut shim: {line}");
    }
    println!("cargo:rustc-env=POWERCUT_SHIM={}", lib.display());
}
