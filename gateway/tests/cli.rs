//! The `edge-gateway` command as an operator runs it.

use std::process::Command;

fn gateway() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edge-gateway"))
}

#[test]
fn check_accepts_the_shipped_example_config_with_exit_0() {
    // The example's data_dir is the installed service's state directory,
    // /var/lib/edge-gateway, which `check` would create; here it is a temporary directory, so
    // that the test needs no root (deploy/test-deb.sh checks the installed file as it is).
    let dir = tempfile::tempdir().unwrap();
    let example = example_config();
    let installed = "data_dir = \"/var/lib/edge-gateway\"";
    assert!(example.contains(installed), "the example's data_dir moved");
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        example.replace(
            installed,
            &format!("data_dir = {:?}", dir.path().join("data")),
        ),
    )
    .unwrap();
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

// ---- Modbus RTU lines and the `read` command ----------------------------------------------

// A module of its own, under `cfg(test)` so its helpers may unwrap like the tests do.
#[cfg(test)]
mod rtu {
    use std::path::Path;
    use std::process::{Output, Stdio};
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use protocols::modbus::{Area, DataType, WordOrder};
    use protocols::model::Value;
    use protocols::sim::modbus::SimDevice;
    use protocols::sim::rtu::RtuSim;

    use super::gateway;

    /// A unit holding `value` as an f32 in CDAB order at hr:10, and a hole at hr:100..110.
    fn unit_with_f32(value: f64) -> SimDevice {
        let device = SimDevice::new();
        let mut image = device.image();
        image.set(
            Area::HoldingRegister,
            10,
            DataType::F32,
            WordOrder::CDAB,
            0,
            &Value::Float(value),
        );
        image.holes.push((Area::HoldingRegister, 100..110));
        drop(image);
        device
    }

    /// Units 3 (12.5 at hr:10) and 7 (-3.25 at hr:10); unit 9 exists but never answers.
    fn meter_line() -> RtuSim {
        let silent = SimDevice::new();
        silent.faults().silent.store(true, Ordering::Relaxed);
        RtuSim::new()
            .with_unit(3, unit_with_f32(12.5))
            .with_unit(7, unit_with_f32(-3.25))
            .with_unit(9, silent)
    }

    fn read(args: &[&str]) -> Output {
        gateway().arg("read").args(args).output().unwrap()
    }

    fn stdout(out: &Output) -> String {
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn stderr(out: &Output) -> String {
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// The cells of the `type` row of the decoded table: type, ABCD, CDAB, BADC, DCBA.
    fn decoded_row(text: &str, data_type: &str) -> Vec<String> {
        text.lines()
            .map(str::split_whitespace)
            .map(|cells| cells.map(str::to_owned).collect::<Vec<_>>())
            .find(|cells| cells.first().map(String::as_str) == Some(data_type))
            .unwrap_or_else(|| panic!("no {data_type} row in:\n{text}"))
    }

    /// A successful read of hr:10..12 shows both raw registers and the f32 in the CDAB column.
    fn assert_shows_f32_in_cdab(out: &Output, raw: [&str; 2], value: &str) {
        assert!(out.status.success(), "{}", stderr(out));
        let text = stdout(out);
        assert!(text.contains(&format!("hr:10      {}", raw[0])), "{text}");
        assert!(text.contains(&format!("hr:11      {}", raw[1])), "{text}");
        let f32_row = decoded_row(&text, "f32");
        assert_eq!(f32_row[2], value, "CDAB column of {f32_row:?}");
    }

    const LINE_CONFIG: &str = r#"[gateway]
id = "gw"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "meters"
protocol = "modbus_rtu"
port = "PORT"
baud_rate = 19200
parity = "even"
timeout = "300ms"
inter_request_delay = "5ms"

  [[devices.units]]
  name = "meter3"
  unit_id = 3

    [[devices.units.tags]]
    name = "active_power"
    address = "hr:10"
    type = "f32"
    order = "CDAB"

    [[devices.units.tags]]
    name = "voltage"
    address = "hr:0"
    scale = 0.1

  [[devices.units]]
  name = "meter7"
  unit_id = 7

    [[devices.units.tags]]
    name = "active_power"
    address = "hr:10"
    type = "f32"
    order = "CDAB"
"#;

    fn write_config(dir: &Path, port: &Path) -> std::path::PathBuf {
        let path = dir.join("meters.toml");
        std::fs::write(
            &path,
            LINE_CONFIG.replace("PORT", &port.display().to_string()),
        )
        .unwrap();
        path
    }

    #[test]
    fn read_over_rtu_over_tcp_prints_the_raw_registers_and_the_f32_in_cdab_order() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let server = runtime
            .block_on(meter_line().serve_tcp("127.0.0.1:0".parse().unwrap()))
            .unwrap();
        let address = server.addr().to_string();
        let out = read(&[
            "--rtu-over-tcp",
            &address,
            "--unit-id",
            "3",
            "--address",
            "hr:10",
            "--count",
            "2",
        ]);
        // 12.5f32 is 0x4148_0000; in CDAB order the low word comes first.
        assert_shows_f32_in_cdab(&out, ["0x0000", "0x4148"], "12.5");
        assert!(stdout(&out).contains("unit 3"), "{}", stdout(&out));
    }

    #[test]
    fn read_a_unit_of_a_configured_rtu_line_by_unit_name_or_as_line_slash_unit() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pty = {
            let _runtime = runtime.enter();
            meter_line().serve_pty(&dir.path().join("ttyUSB0")).unwrap()
        };
        let config = write_config(dir.path(), pty.path());
        let config = config.to_str().unwrap();

        let out = read(&[
            "--device",
            "meters",
            "--unit",
            "meter3",
            "--config",
            config,
            "--address",
            "hr:10",
            "--count",
            "2",
        ]);
        assert_shows_f32_in_cdab(&out, ["0x0000", "0x4148"], "12.5");
        assert!(
            stdout(&out).contains("meters/meter3 (unit 3)"),
            "{}",
            stdout(&out)
        );

        // -3.25f32 is 0xC050_0000.
        let out = read(&[
            "--device",
            "meters/meter7",
            "--config",
            config,
            "--address",
            "hr:10",
            "--count",
            "2",
        ]);
        assert_shows_f32_in_cdab(&out, ["0x0000", "0xC050"], "-3.25");
        assert!(
            stdout(&out).contains("meters/meter7 (unit 7)"),
            "{}",
            stdout(&out)
        );

        // A unit may also be named by its unit id.
        let out = read(&[
            "--device",
            "meters",
            "--unit",
            "7",
            "--config",
            config,
            "--address",
            "hr:10",
            "--count",
            "2",
        ]);
        assert_shows_f32_in_cdab(&out, ["0x0000", "0xC050"], "-3.25");
        drop(pty);
    }

    #[test]
    fn read_names_the_units_of_a_line_when_the_unit_is_missing_or_unknown() {
        let dir = tempfile::tempdir().unwrap();
        // Nothing is opened: the unit is looked up before the line.
        let config = write_config(dir.path(), &dir.path().join("ttyUSB0"));
        let config = config.to_str().unwrap();
        for device in ["meters", "meters/meter4"] {
            let out = read(&["--device", device, "--config", config, "--address", "hr:10"]);
            assert_eq!(out.status.code(), Some(1), "{device}");
            let err = stderr(&out);
            assert!(err.contains("meter3 = 3, meter7 = 7"), "{device}: {err}");
        }
    }

    #[test]
    fn read_reports_an_exception_by_its_name_and_exits_non_zero() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let server = runtime
            .block_on(meter_line().serve_tcp("127.0.0.1:0".parse().unwrap()))
            .unwrap();
        let address = server.addr().to_string();
        let out = read(&[
            "--rtu-over-tcp",
            &address,
            "--unit-id",
            "3",
            "--address",
            "hr:104",
            "--count",
            "2",
        ]);
        assert_eq!(out.status.code(), Some(1));
        let err = stderr(&out);
        assert!(err.contains("exception 2"), "{err}");
        assert!(err.contains("illegal data address"), "{err}");
        assert!(stdout(&out).is_empty(), "{}", stdout(&out));
    }

    #[test]
    fn read_reports_a_silent_unit_as_no_answer_and_exits_non_zero() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pty = {
            let _runtime = runtime.enter();
            meter_line().serve_pty(&dir.path().join("ttyUSB0")).unwrap()
        };
        let port = pty.path().to_str().unwrap();
        let mut child = gateway()
            .args([
                "read",
                "--serial",
                port,
                "--unit-id",
                "9",
                "--address",
                "hr:10",
            ])
            .args(["--timeout", "300ms"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The command gives up on its own; the deadline only keeps a hang from stalling the suite.
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                child.kill().unwrap();
                panic!("`read` of a silent unit never gave up");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = stderr(&out);
        assert!(err.contains("no answer"), "{err}");
        assert!(err.contains(port), "names the line: {err}");
        drop(pty);
    }

    #[test]
    fn read_without_a_target_is_a_usage_error_with_exit_2() {
        let out = read(&["--address", "hr:10"]);
        assert_eq!(out.status.code(), Some(2));
        let err = stderr(&out);
        assert!(err.contains("--device"), "{err}");
        assert!(err.contains("Usage"), "{err}");
    }

    #[test]
    fn check_accepts_an_rtu_line_with_units_and_counts_its_tags() {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), Path::new("/dev/ttyUSB0"));
        let out = gateway()
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(
            text.contains("OK (2 devices, 3 tags)"),
            "each unit is a device: {text}"
        );
    }
}

/// A port on 127.0.0.1 that nobody listens on (bound once, then released).
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("local address").port()
}

/// A config with one Modbus TCP device at `device` and a broker at `broker`, its data directory
/// in `dir`.
fn one_device_config(dir: &std::path::Path, device: &str, broker: &str) -> std::path::PathBuf {
    let path = dir.join("gw.toml");
    std::fs::write(
        &path,
        format!(
            r#"[gateway]
id = "gw"
data_dir = "{}"

[mqtt]
url = "mqtt://{broker}"

[[devices]]
name = "press"
protocol = "modbus_tcp"
address = "{device}"
scan_interval = "100ms"
timeout = "200ms"

  [[devices.tags]]
  name = "speed"
  address = "hr:0"
"#,
            dir.join("data").display()
        ),
    )
    .expect("write the config");
    path
}

#[test]
fn run_with_log_format_json_writes_one_json_object_a_line_with_level_message_and_fields() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let config = one_device_config(
        dir.path(),
        &format!("127.0.0.1:{}", dead_port()),
        &format!("127.0.0.1:{}", dead_port()),
    );
    let mut child = gateway()
        .args(["run", "--log-format", "json", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let found = loop {
        // A safety net against a gateway that never logs, not a timing goal.
        let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(60)) else {
            break None;
        };
        let parsed: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        lines.push(line);
        if parsed["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("cannot open the line"))
        {
            break Some(parsed);
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let found = found.unwrap_or_else(|| panic!("no line about the dead device in {lines:#?}"));
    assert_eq!(found["level"], "WARN");
    assert_eq!(
        found["line"], "press",
        "the fields sit beside the message: {found}"
    );
    assert!(found["timestamp"].is_string(), "{found}");
    assert!(
        lines.iter().all(|l| !l.contains('\u{1b}')),
        "no terminal colour codes in {lines:#?}"
    );
}

#[test]
fn run_refuses_a_log_level_that_is_no_filter_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let config = one_device_config(dir.path(), "127.0.0.1:502", "127.0.0.1:1883");
    let out = gateway()
        .args(["run", "--log-level", "info,protocols=loudest", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--log-level"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path().join("data").exists(), "nothing was started");
}

/// A config of Modbus TCP devices (`name`, `address`) with the demo simulator's tags, one of
/// them in a scan class of its own, and a broker nobody listens on; its data directory is
/// `dir/data`.
fn demo_devices_config(dir: &std::path::Path, devices: &[(&str, String)]) -> std::path::PathBuf {
    let mut text = format!(
        "[gateway]\nid = \"gw\"\ndata_dir = \"{}\"\n\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\n",
        dir.join("data").display(),
        dead_port()
    );
    for (name, address) in devices {
        text.push_str(&format!(
            r#"
[[devices]]
name = "{name}"
protocol = "modbus_tcp"
address = "{address}"
scan_interval = "100ms"
timeout = "500ms"

  [[devices.tags]]
  name = "counter"
  address = "hr:0"

  [[devices.tags]]
  name = "sine"
  address = "hr:1"
  type = "f32"

  [[devices.tags]]
  name = "running"
  address = "co:0"
  scan_interval = "300ms"
"#
        ));
    }
    let path = dir.join("gw.toml");
    std::fs::write(&path, text).expect("write the config");
    path
}

async fn dry_run(config: &std::path::Path) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_edge-gateway"))
        .args(["test", "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("run edge-gateway test")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_polls_live_devices_once_prints_their_records_and_exits_0_without_a_data_dir() {
    let cancel = tokio_util::sync::CancellationToken::new();
    let sims = edge_gateway::demo::start_demo_devices(2, &cancel)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = demo_devices_config(
        dir.path(),
        &[
            ("press", sims[0].addr().to_string()),
            ("oven", sims[1].addr().to_string()),
        ],
    );
    let out = dry_run(&config).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each device's two scan classes give a record each: topic, then the JSON payload.
    let mut records = 0;
    let mut tags_seen = std::collections::BTreeSet::new();
    for line in stdout.lines().filter(|l| l.starts_with("edge/gw/")) {
        let (topic, payload) = line.split_once(' ').unwrap();
        let record: serde_json::Value = serde_json::from_str(payload).unwrap();
        assert_eq!(
            topic,
            format!("edge/gw/{}", record["device"].as_str().unwrap())
        );
        assert_eq!(record["gateway"], "gw");
        for s in record["samples"].as_array().unwrap() {
            assert_eq!(s["quality"], "good", "{line}");
            tags_seen.insert(format!(
                "{}/{}",
                record["device"].as_str().unwrap(),
                s["tag"].as_str().unwrap()
            ));
        }
        records += 1;
    }
    assert_eq!(records, 4, "{stdout}");
    assert_eq!(tags_seen.len(), 6, "{stdout}");
    for tag in [
        "press  counter  good",
        "oven  running  good",
        "oven  sine  good",
    ] {
        assert!(stdout.contains(tag), "missing `{tag}` in:\n{stdout}");
    }
    assert!(stdout.contains("6 of 6 tags good"), "{stdout}");
    assert!(
        !dir.path().join("data").exists(),
        "the data directory was not touched"
    );
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_reports_a_dead_device_bad_beside_a_live_one_and_exits_1() {
    let cancel = tokio_util::sync::CancellationToken::new();
    let sims = edge_gateway::demo::start_demo_devices(1, &cancel)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = demo_devices_config(
        dir.path(),
        &[
            ("press", sims[0].addr().to_string()),
            ("dead", format!("127.0.0.1:{}", dead_port())),
        ],
    );
    let out = dry_run(&config).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for tag in [
        "press  counter  good",
        "dead  counter  bad",
        "dead  running  bad",
    ] {
        assert!(stdout.contains(tag), "missing `{tag}` in:\n{stdout}");
    }
    assert!(stdout.contains("3 of 6 tags good"), "{stdout}");
    assert!(!dir.path().join("data").exists());
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_reads_an_opcua_server_once_with_the_subscription_mode_and_reports_each_tags_quality()
{
    let pki = tempfile::tempdir().unwrap();
    let sim = protocols::sim::opcua::SimOpcUa::start(protocols::sim::opcua::SimOptions {
        pki_dir: pki.path().join("sim"),
        ..Default::default()
    })
    .await
    .unwrap();
    let ns = sim.namespace();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    let text = format!(
        r#"[gateway]
id = "gw"
data_dir = "{data}"

[mqtt]
url = "mqtt://127.0.0.1:{broker}"

[[devices]]
name = "oven"
protocol = "opcua"
endpoint = "{endpoint}"
security_policy = "Basic256Sha256"
security_mode = "Sign"
pki_dir = "{pki}"
trust_server_cert = true
mode = "subscribe"
publishing_interval = "100ms"

  [[devices.tags]]
  name = "temperature"
  node_id = "ns={ns};s=Sim.Double"

  [[devices.tags]]
  name = "running"
  browse_path = "Objects/Sim/Bool"

  [[devices.tags]]
  name = "sensor"
  node_id = "ns={ns};s=Sim.Bad"
"#,
        data = dir.path().join("data").display(),
        broker = dead_port(),
        endpoint = sim.endpoint(),
        pki = pki.path().join("gateway").display(),
    );
    std::fs::write(&config, text).unwrap();
    let out = dry_run(&config).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The server's bad sensor is a bad tag: exit 1, the two good tags shown good.
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for tag in [
        "oven  temperature  good",
        "oven  running  good",
        "oven  sensor  bad",
    ] {
        assert!(stdout.contains(tag), "missing `{tag}` in:\n{stdout}");
    }
    assert!(stdout.contains("2 of 3 tags good"), "{stdout}");
    let record = stdout
        .lines()
        .find_map(|l| l.strip_prefix("edge/gw/oven "))
        .expect("a record for the OPC UA device");
    let record: serde_json::Value = serde_json::from_str(record).unwrap();
    assert_eq!(record["device"], "oven");
    assert!(!dir.path().join("data").exists());
    sim.stop().await;
}

#[test]
fn test_refuses_an_invalid_config_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, "[gateway]\nid = \"gw\"\ncolour = \"blue\"\n").unwrap();
    let out = gateway()
        .args(["test", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("gateway.colour"));
}

fn schema() -> serde_json::Value {
    let out = gateway()
        .arg("schema")
        .output()
        .expect("run edge-gateway schema");
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).expect("the schema is JSON")
}

fn example_config() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/gateway.example.toml"
    ))
    .expect("read the example config")
}

/// The TOML text as the JSON document an editor validates.
fn as_json(toml_text: &str) -> serde_json::Value {
    toml::from_str(toml_text).expect("valid TOML")
}

#[test]
fn schema_accepts_the_shipped_example_config() {
    let validator = jsonschema::validator_for(&schema()).unwrap();
    let example = as_json(&example_config());
    let errors: Vec<String> = validator
        .iter_errors(&example)
        .map(|e| format!("{}: {e}", e.instance_path))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn schema_refuses_unknown_keys_in_a_section_a_device_and_a_tag() {
    let validator = jsonschema::validator_for(&schema()).unwrap();
    let example = example_config();
    let cases = [
        example.replacen("[gateway]\n", "[gateway]\ncolour = \"blue\"\n", 1),
        example.replacen(
            "[[devices]]\n",
            "[[devices]]\nadress = \"10.0.0.1:502\"\n",
            1,
        ),
        example.replacen(
            "[[devices.tags]]\n",
            "[[devices.tags]]\nunits = \"bar\"\n",
            1,
        ),
        format!("{example}\n[cloud]\nkind = \"aws\"\n"),
    ];
    for (i, case) in cases.iter().enumerate() {
        assert_ne!(case, &example, "case {i} changed nothing");
        assert!(!validator.is_valid(&as_json(case)), "case {i} was accepted");
    }
}

#[test]
fn schema_refuses_a_value_of_the_wrong_type_and_an_unknown_protocol() {
    let validator = jsonschema::validator_for(&schema()).unwrap();
    let example = example_config();
    let wrong_type = example.replacen("commit_interval = \"100ms\"", "commit_interval = 100", 1);
    let unknown_protocol =
        example.replacen("protocol = \"modbus_tcp\"", "protocol = \"profinet\"", 1);
    for case in [wrong_type, unknown_protocol] {
        assert_ne!(case, example);
        assert!(!validator.is_valid(&as_json(&case)));
    }
}

#[test]
fn schema_payload_prints_the_payload_schema_kept_in_docs() {
    let out = gateway()
        .args(["schema", "--payload"])
        .output()
        .expect("run edge-gateway schema --payload");
    assert!(out.status.success());
    let copy = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/payload.schema.json"
    ))
    .expect("read docs/payload.schema.json");
    assert_eq!(String::from_utf8_lossy(&out.stdout), copy);
    let doc: serde_json::Value = serde_json::from_str(&copy).unwrap();
    for def in ["record", "sample", "meta", "status"] {
        assert!(doc["$defs"].get(def).is_some(), "$defs.{def}");
    }
    jsonschema::validator_for(&doc).expect("a valid JSON Schema");
}

#[test]
fn audit_refuses_a_url_that_is_no_broker_url_with_exit_2() {
    let out = gateway()
        .args([
            "audit",
            "--url",
            "http://127.0.0.1:1883",
            "--topic",
            "edge/#",
        ])
        .output()
        .expect("run edge-gateway audit");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mqtt.url"));
}

#[test]
fn audit_that_receives_nothing_says_so_and_exits_0() {
    // Nothing listens on a port just released: no broker, no record, no hole.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let out = gateway()
        .args(["audit", "--topic", "edge/#", "--seconds", "1", "--url"])
        .arg(format!("mqtt://127.0.0.1:{port}"))
        .output()
        .expect("run edge-gateway audit");
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no records received"));
}
