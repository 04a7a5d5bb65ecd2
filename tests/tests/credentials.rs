//! Credentials: read again at every connection attempt, from a file or a systemd credential,
//! never written to a log line; an Azure IoT Hub SAS token signed with the device key and
//! renewed before it expires.
//!
//! The broker here is the harness's recording broker: it accepts every CONNECT, keeps what it
//! carried and acknowledges every publish.

use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use edge_gateway::config::SasSettings;
use edge_gateway::secret::SecretSource;
use gateway_tests::{
    child_config, eventually, recording_broker, spawn_child_logging, with_mqtt_keys, ChildPeers,
    GatewayRig, Login,
};
use hmac::{Hmac, Mac};

const SCAN: Duration = Duration::from_millis(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_file_is_read_again_at_each_connection_attempt() {
    let (addr, broker) = recording_broker().await;
    let mut rig = GatewayRig::new("gw-pass", 1, SCAN, Some(addr)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mqtt.password");
    std::fs::write(&file, "first-secret\n").unwrap();
    rig.config.mqtt.username = Some("gw".to_owned());
    rig.config.mqtt.password_file = Some(SecretSource::File(file.clone()));
    let gw = rig.start().await;
    eventually(Duration::from_secs(10), "a login", || {
        !broker.logins().is_empty()
    })
    .await;
    std::fs::write(&file, "second-secret\n").unwrap();
    rig.proxy.cut();
    rig.proxy.restore();
    eventually(Duration::from_secs(20), "a second login", || {
        broker.logins().len() >= 2
    })
    .await;
    let logins = broker.logins();
    assert_eq!(logins[0].username.as_deref(), Some("gw"));
    assert_eq!(logins[0].password.as_deref(), Some("first-secret"));
    assert_eq!(
        logins.last().unwrap().password.as_deref(),
        Some("second-secret")
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_is_read_from_the_credentials_directory_and_never_logged() {
    let (addr, broker) = recording_broker().await;
    let peers = ChildPeers::start().await;
    peers.proxy.repoint(addr);
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    let secret = "s3cr3t-Pa55word-that-must-not-leak";
    std::fs::write(credentials.join("mqtt-password"), secret).unwrap();
    let text = child_config(
        "gw-cred",
        &dir.path().join("data"),
        peers.proxy.addr().port(),
        peers.device.addr(),
        100,
        50,
    );
    let keys = "username = \"gw\"\npassword_file = \"credential:mqtt-password\"";
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, with_mqtt_keys(&text, keys, false)).unwrap();
    let log = dir.path().join("gateway.log");
    let mut child = spawn_child_logging(
        env!("CARGO_BIN_EXE_gateway-child"),
        &config,
        &log,
        "trace",
        &[("CREDENTIALS_DIRECTORY", &credentials)],
    );
    eventually(Duration::from_secs(20), "a login and records", || {
        !broker.logins().is_empty() && broker.publishes() >= 5
    })
    .await;
    // SIGTERM: a clean shutdown, so the log is complete.
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    child.wait().unwrap();
    let login = &broker.logins()[0];
    assert_eq!(login.password.as_deref(), Some(secret));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.len() > 1000,
        "the trace log is suspiciously short:\n{text}"
    );
    assert!(
        !text.contains(secret),
        "the password reached the log:\n{}",
        text.lines()
            .filter(|l| l.contains(secret))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Checks a SAS token as the hub would: `sr` is the device's resource, `sig` the HMAC-SHA256 of
/// `{sr}\n{se}` with the key; returns `se`.
fn verify_sas(token: &str, resource: &str, key: &[u8]) -> u64 {
    let rest = token
        .strip_prefix("SharedAccessSignature ")
        .unwrap_or_else(|| panic!("not a SAS token: {token}"));
    let mut sr = None;
    let mut sig = None;
    let mut se = None;
    for part in rest.split('&') {
        let (k, v) = part.split_once('=').unwrap();
        match k {
            "sr" => sr = Some(v),
            "sig" => sig = Some(v),
            "se" => se = Some(v),
            _ => panic!("unexpected field {k} in {token}"),
        }
    }
    let (sr, sig, se) = (sr.unwrap(), sig.unwrap(), se.unwrap());
    let decoded = percent_encoding::percent_decode_str(sr)
        .decode_utf8()
        .unwrap();
    assert_eq!(decoded, resource);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(format!("{sr}\n{se}").as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let sig = percent_encoding::percent_decode_str(sig)
        .decode_utf8()
        .unwrap();
    assert_eq!(
        sig, expected,
        "the signature does not verify with the device key"
    );
    se.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_azure_sas_password_is_signed_with_the_device_key_and_renewed_before_it_expires() {
    let (addr, broker) = recording_broker().await;
    let mut rig = GatewayRig::new("gw-sas", 1, SCAN, Some(addr)).await;
    let dir = tempfile::tempdir().unwrap();
    let key = b"a device key of thirty-two bytes";
    let key_file = dir.path().join("device.key");
    std::fs::write(
        &key_file,
        base64::engine::general_purpose::STANDARD.encode(key),
    )
    .unwrap();
    rig.config.mqtt.client_id = "press-line-4".to_owned();
    rig.config.mqtt.sas = Some(SasSettings {
        key_file: SecretSource::File(key_file),
        ttl: Duration::from_secs(60),
    });
    let gw = rig.start().await;
    eventually(Duration::from_secs(10), "a login", || {
        !broker.logins().is_empty()
    })
    .await;
    let first: Login = broker.logins()[0].clone();
    assert_eq!(first.client_id, "press-line-4");
    assert_eq!(
        first.username.as_deref(),
        Some("127.0.0.1/press-line-4/?api-version=2021-04-12")
    );
    let resource = "127.0.0.1/devices/press-line-4";
    let first_se = verify_sas(first.password.as_deref().unwrap(), resource, key);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (now + 50..=now + 60).contains(&first_se),
        "se {first_se}, now {now}"
    );
    // Renewed at 80% of its life (48 s): a new connection with a new token, before it expires.
    eventually(Duration::from_secs(58), "a renewed token", || {
        broker.logins().len() >= 2
    })
    .await;
    let second = broker.logins()[1].clone();
    let second_se = verify_sas(second.password.as_deref().unwrap(), resource, key);
    assert!(second_se > first_se, "{second_se} <= {first_se}");
    gw.shutdown().await;
}
