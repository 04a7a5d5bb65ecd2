//! The `edge-gateway` command as an operator runs it.

use std::process::Command;

fn gateway() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edge-gateway"))
}

#[test]
fn check_accepts_the_shipped_example_config_with_exit_0() {
    let out = gateway()
        .args(["check", "--config"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/gateway.example.toml"
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
}

#[test]
fn check_lists_every_problem_with_line_and_field_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"[gateway]
id = "gw"
colour = "blue"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "press"
protocol = "modbus_tcp"
address = "127.0.0.1:502"
scan_interval = "fast"

  [[devices.tags]]
  name = "a"
  address = "xr:1"

  [[devices.tags]]
  name = "a"
  address = "hr:65535"
  type = "u32"
"#,
    )
    .unwrap();
    let out = gateway()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "bad.toml:3: gateway.colour",
        "bad.toml:12: devices[0].scan_interval",
        "bad.toml:16: devices[0].tags[0].address",
        "bad.toml:19: devices[0].tags[1].name",
        "bad.toml:20: devices[0].tags[1].address",
    ] {
        assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
    }
}

#[test]
fn check_reports_a_missing_file_without_panicking() {
    let out = gateway()
        .args(["check", "--config", "/nonexistent/gw.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("gw.toml"));
}

const OPCUA_CONFIG: &str = r#"[gateway]
id = "gw"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "oven2"
protocol = "opcua"
endpoint = "opc.tcp://127.0.0.1:4840"
security_policy = "Basic256Sha256"
security_mode = "SignAndEncrypt"
username = "operator"
password_file = "oven2.password"
mode = "subscribe"

  [[devices.tags]]
  name = "temperature"
  node_id = "ns=2;s=Oven.Temp"
  deadband = 0.1

  [[devices.tags]]
  name = "door"
  browse_path = "Objects/Oven/Door"
"#;

#[test]
fn check_accepts_an_opcua_device_with_exit_0_and_counts_its_tags() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opcua.toml");
    std::fs::write(&path, OPCUA_CONFIG).unwrap();
    // The password file is resolved against the config's directory and must be readable.
    std::fs::write(dir.path().join("oven2.password"), "secret\n").unwrap();
    let out = gateway()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("OK (1 devices, 2 tags)"), "{stdout}");
}

#[test]
fn check_refuses_an_opcua_security_mode_without_a_policy_with_file_and_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opcua.toml");
    std::fs::write(
        &path,
        OPCUA_CONFIG.replace("\"Basic256Sha256\"", "\"None\""),
    )
    .unwrap();
    let out = gateway()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let expected = "opcua.toml:12: devices[0].security_mode: security_mode \"SignAndEncrypt\" \
                    needs a security_policy other than \"None\"";
    assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
    // The missing password file is reported in the same run, on its own line.
    assert!(
        err.contains("opcua.toml:14: devices[0].password_file: cannot read"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 2, "{err}");
}

#[test]
fn browse_prints_a_tree_and_pasteable_tags_from_a_live_server() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let sim = runtime
        .block_on(protocols::sim::opcua::SimOpcUa::start(
            protocols::sim::opcua::SimOptions {
                pki_dir: pki.path().join("sim"),
                ..Default::default()
            },
        ))
        .unwrap();
    let client_pki = pki.path().join("gateway");
    let run = |format: &str| {
        let out = gateway()
            .args(["browse", "--endpoint", &sim.endpoint(), "--format", format])
            .args([
                "--security-policy",
                "Basic256Sha256",
                "--security-mode",
                "Sign",
            ])
            .arg("--trust-server-cert")
            .arg("--pki-dir")
            .arg(&client_pki)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tree = run("tree");
    assert!(
        tree.contains("Setpoint") && tree.contains("read/write"),
        "{tree}"
    );
    let tags = run("toml");
    let ns = sim.namespace();
    assert!(
        tags.contains(&format!("node_id = \"ns={ns};s=Sim.Double\"")),
        "{tags}"
    );

    // An unreachable endpoint fails with exit 1 and says which.
    let out = gateway()
        .args([
            "browse",
            "--endpoint",
            "opc.tcp://127.0.0.1:1/",
            "--timeout",
            "2",
        ])
        .arg("--pki-dir")
        .arg(&client_pki)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("opc.tcp://127.0.0.1:1/"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    runtime.block_on(sim.stop());
}
