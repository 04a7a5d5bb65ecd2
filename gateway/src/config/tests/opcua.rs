//! The runtime values of OPC UA devices.

use super::*;

/// A small valid file with one OPC UA device, for the tests to edit.
const OPCUA_BASE: &str = r#"[gateway]
id = "edge-01"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "oven2"
protocol = "opcua"
endpoint = "opc.tcp://127.0.0.1:4840"

  [[devices.tags]]
  name = "temperature"
  node_id = "ns=2;s=Oven.Temp"
"#;

/// The issue's OPC UA example, every key set.
const OPCUA_FULL: &str = r#"[gateway]
id = "edge-01"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "oven2"
protocol = "opcua"
endpoint = "opc.tcp://127.0.0.1:4840"
security_policy = "Basic256Sha256"
security_mode = "SignAndEncrypt"
username = "operator"
password_file = "/path"
pki_dir = "./pki"
trust_server_cert = true
publishing_interval = "250ms"
mode = "poll"
scan_interval = "2s"
timeout = "3s"
backoff_min = "100ms"
backoff_max = "10s"
enabled = true

  [[devices.tags]]
  name = "temperature"
  node_id = "ns=2;s=Oven.Temp"
  sampling_interval = "100ms"
  deadband = 0.1
  queue_size = 20

  [[devices.tags]]
  name = "door"
  browse_path = "Objects/Oven/2:Door"
"#;

fn with_opcua_device(lines: &str) -> String {
    let endpoint = "endpoint = \"opc.tcp://127.0.0.1:4840\"\n";
    OPCUA_BASE.replace(endpoint, &format!("{endpoint}{lines}\n"))
}

fn with_opcua_tag(lines: &str) -> String {
    format!("{OPCUA_BASE}\n  [[devices.tags]]\n{lines}\n")
}

fn node_id(text: &str) -> NodeRef {
    match parse_node_id(text) {
        Ok(id) => NodeRef::Id(id),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn an_opcua_device_with_every_key_parses_into_its_settings() {
    let config = config(OPCUA_FULL);
    let [device] = &config.devices[..] else {
        panic!("expected one device, got {:?}", config.devices);
    };
    assert_eq!(&*device.name, "oven2");
    assert_eq!(device.scan_interval, Duration::from_secs(2));
    assert_eq!(device.tag_count(), 2);
    let expected = OpcUaSettings {
        endpoint: "opc.tcp://127.0.0.1:4840".to_owned(),
        security_policy: SecurityPolicy::Basic256Sha256,
        security_mode: SecurityMode::SignAndEncrypt,
        identity: Identity::UserName {
            user: "operator".to_owned(),
            password_file: PathBuf::from("/path"),
        },
        pki_dir: PathBuf::from("./pki"),
        trust_server_cert: true,
        publishing_interval: Duration::from_millis(250),
        mode: Mode::Poll,
        scan_interval: Duration::from_secs(2),
        timeout: Duration::from_secs(3),
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(10),
        tags: vec![
            OpcUaTag {
                meta: Default::default(),
                name: "temperature".into(),
                node: node_id("ns=2;s=Oven.Temp"),
                sampling_interval: Duration::from_millis(100),
                deadband: Some(0.1),
                queue_size: 20,
                write: None,
            },
            OpcUaTag {
                meta: Default::default(),
                name: "door".into(),
                node: NodeRef::BrowsePath(vec!["Oven".to_owned(), "2:Door".to_owned()]),
                sampling_interval: Duration::from_millis(250),
                deadband: None,
                queue_size: 10,
                write: None,
            },
        ]
        .into(),
    };
    assert_eq!(opcua(device), &expected);
}

#[test]
fn an_opcua_device_takes_the_runtime_defaults_and_keeps_its_pki_in_the_data_dir() {
    let config = config(OPCUA_BASE);
    let device = &config.devices[0];
    assert_eq!(device.scan_interval, Duration::from_secs(1));
    let mut expected = OpcUaSettings::new(
        "opc.tcp://127.0.0.1:4840",
        vec![OpcUaTag {
            meta: Default::default(),
            name: "temperature".into(),
            node: node_id("ns=2;s=Oven.Temp"),
            sampling_interval: Duration::from_millis(500),
            deadband: None,
            queue_size: 10,
            write: None,
        }],
    );
    expected.pki_dir = PathBuf::from("./data/pki");
    assert_eq!(opcua(device), &expected);
    let settings = opcua(device);
    assert_eq!(
        (settings.security_policy, settings.security_mode),
        (SecurityPolicy::None, SecurityMode::None)
    );
    assert_eq!(settings.identity, Identity::Anonymous);
    assert!(!settings.trust_server_cert);
    assert_eq!(settings.mode, Mode::Subscribe);
    assert_eq!(settings.timeout, Duration::from_secs(5));

    let src = with_opcua_device("publishing_interval = \"2s\"").replace(
        "id = \"edge-01\"\n",
        "id = \"edge-01\"\ndata_dir = \"/var/lib/gw\"\n",
    );
    let config = self::config(&src);
    let settings = opcua(&config.devices[0]);
    assert_eq!(settings.pki_dir, PathBuf::from("/var/lib/gw/pki"));
    assert_eq!(
        settings.tags[0].sampling_interval,
        Duration::from_secs(2),
        "a tag samples at the publishing interval unless it sets its own"
    );
}

#[test]
fn opcua_security_policies_and_modes_pair_as_written() {
    for (policy, mode) in [
        ("None", "None"),
        ("Basic256Sha256", "Sign"),
        ("Aes128_Sha256_RsaOaep", "SignAndEncrypt"),
        ("Aes256_Sha256_RsaPss", "Sign"),
    ] {
        let config = config(&with_opcua_device(&format!(
            "security_policy = \"{policy}\"\nsecurity_mode = \"{mode}\""
        )));
        let settings = opcua(&config.devices[0]);
        assert_eq!(
            (
                settings.security_policy.name(),
                settings.security_mode.name()
            ),
            (policy, mode)
        );
    }
}

#[test]
fn an_opcua_user_certificate_with_its_key_is_the_devices_identity() {
    let config = config(&with_opcua_device(
        "user_cert_file = \"/etc/gw/user.der\"\nuser_key_file = \"/etc/gw/user.pem\"",
    ));
    assert_eq!(
        opcua(&config.devices[0]).identity,
        Identity::X509 {
            cert_file: PathBuf::from("/etc/gw/user.der"),
            key_file: PathBuf::from("/etc/gw/user.pem"),
        }
    );
}

#[test]
fn an_opcua_tag_may_sample_at_zero_with_any_finite_deadband() {
    // Zero sampling asks for the server's fastest rate; any finite deadband >= 0 is fine.
    let config = config(&with_opcua_tag(
        "  name = \"t\"\n  node_id = \"i=2258\"\n  sampling_interval = \"0ms\"\n  \
         deadband = 0.0\n  queue_size = 10000",
    ));
    let tag = &opcua(&config.devices[0]).tags[1];
    assert_eq!(tag.sampling_interval, Duration::ZERO);
    assert_eq!((tag.deadband, tag.queue_size), (Some(0.0), 10_000));
}

#[test]
fn a_poll_mode_device_accepts_the_subscription_keys_of_its_tags() {
    let src = with_opcua_device("mode = \"poll\"\nscan_interval = \"250ms\"");
    let src = format!(
        "{src}\n  [[devices.tags]]\n  name = \"p\"\n  node_id = \"i=1\"\n  \
             sampling_interval = \"1s\"\n  deadband = 0.5\n  queue_size = 1\n"
    );
    let config = config(&src);
    let settings = opcua(&config.devices[0]);
    assert_eq!(settings.mode, Mode::Poll);
    assert_eq!(settings.scan_interval, Duration::from_millis(250));
}

#[test]
fn modbus_and_opcua_devices_live_side_by_side() {
    let opcua_device = OPCUA_BASE
        .split_once("[[devices]]")
        .map(|(_, device)| device.to_owned())
        .unwrap_or_default();
    let config = config(&format!("{BASE}\n[[devices]]{opcua_device}"));
    let kinds: Vec<(&str, usize)> = config
        .devices
        .iter()
        .map(|d| (&*d.name, d.tag_count()))
        .collect();
    assert_eq!(kinds, [("press7", 1), ("oven2", 1)]);
    assert!(matches!(config.devices[1].kind, DeviceKind::OpcUa(_)));
}

#[test]
fn load_resolves_opcua_paths_against_the_config_directory_and_checks_the_files() {
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => panic!("tempdir: {e}"),
    };
    let file = dir.path().join("gateway.toml");
    let cert = dir.path().join("user.der");
    let key = dir.path().join("user.pem");
    let src = with_opcua_device(
        "pki_dir = \"certs\"\nuser_cert_file = \"user.der\"\nuser_key_file = \"user.pem\"",
    );
    let writes = [
        std::fs::write(&cert, "cert"),
        std::fs::write(&key, "key"),
        std::fs::write(&file, &src),
    ];
    assert!(writes.iter().all(Result::is_ok), "{writes:?}");
    let loaded = match load(&file) {
        Ok(config) => config,
        Err(errors) => panic!("{errors}"),
    };
    let settings = opcua(&loaded.devices[0]);
    assert_eq!(settings.pki_dir, dir.path().join("certs"));
    assert_eq!(
        settings.identity,
        Identity::X509 {
            cert_file: cert,
            key_file: key.clone(),
        }
    );

    // Without pki_dir, the PKI lives in the resolved data directory.
    let plain = dir.path().join("plain.toml");
    assert!(std::fs::write(&plain, OPCUA_BASE).is_ok());
    match load(&plain) {
        Ok(config) => assert_eq!(
            opcua(&config.devices[0]).pki_dir,
            dir.path().join("data").join("pki")
        ),
        Err(errors) => panic!("{errors}"),
    }

    assert!(std::fs::remove_file(&key).is_ok());
    let errors = match load(&file) {
        Ok(_) => panic!("a missing key file is a problem"),
        Err(errors) => errors,
    };
    assert_eq!(errors.problems.len(), 1, "{errors}");
    let problem = &errors.problems[0];
    assert_eq!(problem.field, "devices[0].user_key_file");
    assert_eq!(problem.line, Some(line_containing(&src, "user_key_file")));
    assert!(problem.message.contains("cannot read"), "{problem}");
    // `parse` touches no file.
    config(&src);

    let secret = dir.path().join("oven.password");
    let with_user = with_opcua_device("username = \"op\"\npassword_file = \"oven.password\"");
    assert!(std::fs::write(&file, &with_user).is_ok());
    assert!(load(&file).is_err(), "the password file does not exist yet");
    assert!(std::fs::write(&secret, "hunter2").is_ok());
    match load(&file) {
        Ok(config) => assert_eq!(
            opcua(&config.devices[0]).identity,
            Identity::UserName {
                user: "op".to_owned(),
                password_file: secret,
            }
        ),
        Err(errors) => panic!("{errors}"),
    }
}
