//! The HTTP API end to end: a gateway with demo devices and a broker behind the rig's proxy,
//! asked over real HTTP (and HTTPS) on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_gateway::config::{ApiAuth, ApiSettings, ApiTls};
use edge_gateway::secret::SecretSource;
use gateway_tests::GatewayRig;
use serde_json::Value as Json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(20);

/// The API on an OS-chosen loopback port, without auth or TLS.
fn plain_api() -> ApiSettings {
    ApiSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        auth: None,
        tls: None,
    }
}

/// An HTTP answer: status, headers (lower-case names) and body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn json(&self) -> Json {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request over `stream` (`Connection: close`), read to the end.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    method: &str,
    path: &str,
    auth: Option<&str>,
) -> Answer {
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(auth) = auth {
        request.push_str(&format!("Authorization: {auth}\r\n"));
    }
    request.push_str("Content-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    // A TLS peer may close without close_notify once the answer is read: keep what came.
    let _ = stream.read_to_end(&mut raw).await;
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Answer {
    get_as(addr, path, None).await
}

async fn get_as(addr: SocketAddr, path: &str, auth: Option<&str>) -> Answer {
    let stream = TcpStream::connect(addr).await.unwrap();
    exchange(stream, "GET", path, auth).await
}

/// Asks `path` until `done` says yes about the answer; panics after [`WAIT`].
async fn until(addr: SocketAddr, path: &str, what: &str, done: impl Fn(&Answer) -> bool) -> Answer {
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = get(addr, path).await;
        if done(&answer) {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last answer: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Parses the text format into (series with its labels, value), skipping comments.
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value = if value == "NaN" {
                f64::NAN
            } else {
                value.parse().ok()?
            };
            Some((series.to_owned(), value))
        })
        .collect()
}

fn value_of(text: &str, series: &str) -> f64 {
    samples(text)
        .into_iter()
        .find(|(s, _)| s == series)
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_in_the_prometheus_text_format_with_every_family_and_moving_counters() {
    let mut rig = GatewayRig::new("api-metrics", 2, Duration::from_millis(100), None).await;
    rig.config.api = Some(plain_api());
    // A small window, so the publisher's live queue holds less than the outage below makes:
    // the rest comes back from disk (replayed), not from memory.
    rig.config.mqtt.max_inflight = 4;
    let (_sub, gw) = rig.start_live().await;
    let addr = gw.api_addr().expect("the API listens");

    let first = get(addr, "/metrics").await;
    assert_eq!(first.status, 200);
    assert!(
        first
            .header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{:?}",
        first.headers
    );
    assert!(first.body.ends_with("# EOF\n"));
    let families = [
        ("edge_gateway_device_connected", "gauge"),
        ("edge_gateway_device_scans", "counter"),
        ("edge_gateway_device_requests", "counter"),
        ("edge_gateway_device_errors", "counter"),
        ("edge_gateway_device_reconnects", "counter"),
        ("edge_gateway_device_overruns", "counter"),
        ("edge_gateway_device_samples", "counter"),
        ("edge_gateway_device_scan_duration_seconds", "histogram"),
        ("edge_gateway_device_last_answer_age_seconds", "gauge"),
        ("edge_gateway_buffer_records", "gauge"),
        ("edge_gateway_buffer_size_bytes", "gauge"),
        ("edge_gateway_buffer_memory_bytes", "gauge"),
        ("edge_gateway_buffer_oldest_record_age_seconds", "gauge"),
        ("edge_gateway_buffer_failing", "gauge"),
        ("edge_gateway_records", "counter"),
        ("edge_gateway_samples", "counter"),
        ("edge_gateway_buffer_committed_records", "counter"),
        ("edge_gateway_buffer_commits", "counter"),
        ("edge_gateway_buffer_written_bytes", "counter"),
        ("edge_gateway_buffer_replayed_records", "counter"),
        ("edge_gateway_buffer_evicted_records", "counter"),
        ("edge_gateway_buffer_io_errors", "counter"),
        ("edge_gateway_buffer_quarantined_generations", "counter"),
        ("edge_gateway_lost_commits", "counter"),
        ("edge_gateway_oversized_samples", "counter"),
        ("edge_gateway_buffer_commit_duration_seconds", "histogram"),
        ("edge_gateway_mqtt_connected", "gauge"),
        ("edge_gateway_mqtt_connections", "counter"),
        ("edge_gateway_mqtt_reconnects", "counter"),
        ("edge_gateway_mqtt_published_records", "counter"),
        ("edge_gateway_mqtt_acknowledged_records", "counter"),
        ("edge_gateway_mqtt_acknowledged_samples", "counter"),
        ("edge_gateway_mqtt_in_flight_records", "gauge"),
        ("edge_gateway_mqtt_published_bytes", "counter"),
        ("edge_gateway_mqtt_puback_refusals", "counter"),
        ("edge_gateway_mqtt_too_large_records", "counter"),
        (
            "edge_gateway_mqtt_tls_client_cert_expiry_timestamp_seconds",
            "gauge",
        ),
        ("edge_gateway_config_reloads", "counter"),
        ("edge_gateway_config_reloads_refused", "counter"),
    ];
    for (name, kind) in families {
        let line = format!("# TYPE {name} {kind}\n");
        assert!(
            first.body.contains(&line),
            "missing `{}` in\n{}",
            line.trim(),
            first.body
        );
    }
    let scans = "edge_gateway_device_scans_total{device=\"press1\"}";
    let acked = "edge_gateway_mqtt_acknowledged_records_total";
    let connected = "edge_gateway_device_connected{device=\"press2\"}";
    assert_eq!(value_of(&first.body, connected), 1.0);
    assert_eq!(value_of(&first.body, "edge_gateway_mqtt_connected"), 1.0);
    let (scans0, acked0) = (value_of(&first.body, scans), value_of(&first.body, acked));
    let bytes = "edge_gateway_mqtt_published_bytes_total";
    let bytes0 = value_of(&first.body, bytes);
    let refused =
        "edge_gateway_mqtt_puback_refusals_total{code=\"0x87\",reason=\"not authorized\"}";
    assert_eq!(value_of(&first.body, refused), 0.0, "{refused}");
    for reason in ["timeout", "exception", "link", "protocol", "other"] {
        let series =
            format!("edge_gateway_device_errors_total{{device=\"press1\",reason=\"{reason}\"}}");
        assert_eq!(value_of(&first.body, &series), 0.0, "{series}");
    }
    let later = until(addr, "/metrics", "counters to move", |a| {
        value_of(&a.body, scans) > scans0
            && value_of(&a.body, acked) > acked0
            && value_of(&a.body, bytes) > bytes0
    })
    .await;
    let buckets = "edge_gateway_device_scan_duration_seconds_bucket{le=\"+Inf\",device=\"press1\"}";
    let count = "edge_gateway_device_scan_duration_seconds_count{device=\"press1\"}";
    assert!(value_of(&later.body, buckets) > 0.0);
    assert_eq!(value_of(&later.body, buckets), value_of(&later.body, count));

    // A short outage: records are committed to disk while the broker is away, and replayed
    // from it over a second connection once it is back.
    let connections = "edge_gateway_mqtt_connections_total";
    let reconnects = "edge_gateway_mqtt_reconnects_total";
    let committed = "edge_gateway_buffer_committed_records_total";
    let replayed = "edge_gateway_buffer_replayed_records_total";
    assert_eq!(value_of(&later.body, connections), 1.0);
    assert_eq!(
        value_of(&later.body, reconnects),
        0.0,
        "the first is no reconnect"
    );
    assert_eq!(value_of(&later.body, replayed), 0.0);
    rig.cut_until_committed(&gw, 40, "records committed while the broker is away")
        .await;
    rig.proxy.restore();
    let after = until(addr, "/metrics", "a reconnect and a replay", |a| {
        value_of(&a.body, reconnects) >= 1.0 && value_of(&a.body, replayed) > 0.0
    })
    .await;
    assert!(value_of(&after.body, committed) >= 40.0);
    assert_eq!(
        value_of(&later.body, reconnects),
        0.0,
        "no reconnect before the outage"
    );
    assert!(
        value_of(&after.body, reconnects) <= rig.proxy.accepted() as f64 - 1.0,
        "a reconnect is a connection the broker's side saw after the first"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_503_with_the_reason_while_the_broker_is_away_and_200_when_it_is_back() {
    let mut rig = GatewayRig::new("api-health", 1, Duration::from_millis(100), None).await;
    rig.config.api = Some(plain_api());
    let (_sub, gw) = rig.start_live().await;
    let addr = gw.api_addr().unwrap();
    let ok = until(addr, "/health", "a healthy gateway", |a| a.status == 200).await;
    assert_eq!(ok.json()["status"], "ok");
    assert_eq!(get(addr, "/ready").await.status, 200);

    rig.proxy.cut();
    let failing = until(addr, "/health", "503 without the broker", |a| {
        a.status == 503
    })
    .await;
    let body = failing.json();
    assert_eq!(body["status"], "failing");
    assert_eq!(body["broker_connected"], false);
    let reasons = body["reasons"].to_string();
    assert!(reasons.contains("broker"), "{reasons}");

    rig.proxy.restore();
    let back = until(addr, "/health", "200 with the broker back", |a| {
        a.status == 200
    })
    .await;
    assert_eq!(back.json()["broker_connected"], true);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_device_is_named_by_health_and_shown_bad_while_the_others_keep_their_values() {
    let mut rig = GatewayRig::new("api-devices", 2, Duration::from_millis(100), None).await;
    rig.config.api = Some(plain_api());
    let (_sub, gw) = rig.start_live().await;
    let addr = gw.api_addr().unwrap();

    let tags = until(addr, "/api/tags", "every tag's value", |a| {
        a.json()["tags"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["quality"] == "good")
    })
    .await
    .json();
    let tags = tags["tags"].as_array().unwrap();
    assert_eq!(tags.len(), 18, "9 tags of each of 2 presses");
    let counter = |body: &Json, device: &str| {
        body["tags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["device"] == device && t["tag"] == "counter")
            .map(|t| t["value"].clone())
            .unwrap()
    };
    let first = counter(&get(addr, "/api/tags").await.json(), "press1");
    until(addr, "/api/tags", "the counter to move", |a| {
        counter(&a.json(), "press1") != first
    })
    .await;
    // The last minutes of each numeric tag: a fixed number of steps, the newest last.
    let history = get(addr, "/api/history").await.json();
    let points = history["points"].as_u64().unwrap() as usize;
    assert!(history["step_s"].as_u64().unwrap() > 0);
    let series = history["tags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["device"] == "press1" && t["tag"] == "counter")
        .expect("press1's counter has a history")["points"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(series.len(), points);
    assert!(
        series.iter().rev().take(2).any(|p| p.is_number()),
        "a point in the step now or the one before: {series:?}"
    );

    rig.stop_sim(1).await;
    let failing = until(addr, "/health", "press2 failing", |a| a.status == 503).await;
    assert_eq!(
        failing.json()["devices_failing"],
        serde_json::json!(["press2"])
    );
    let devices = get(addr, "/api/devices").await.json();
    let ok: Vec<(String, bool)> = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_owned(),
                d["ok"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ok,
        vec![("press1".to_owned(), true), ("press2".to_owned(), false)]
    );
    let metrics = get(addr, "/metrics").await.body;
    let classified: f64 = ["timeout", "exception", "link", "protocol"]
        .iter()
        .map(|r| {
            let series =
                format!("edge_gateway_device_errors_total{{device=\"press2\",reason=\"{r}\"}}");
            value_of(&metrics, &series)
        })
        .sum();
    assert!(
        classified > 0.0,
        "press2's failures are counted by reason:\n{metrics}"
    );
    let tags = until(addr, "/api/tags", "press2's tags bad", |a| {
        a.json()["tags"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["device"] == "press2")
            .all(|t| t["quality"] == "bad")
    })
    .await
    .json();
    let press1_good = tags["tags"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["device"] == "press1")
        .all(|t| t["quality"] == "good");
    assert!(press1_good, "{tags}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_password_every_path_answers_401_without_it_or_with_a_wrong_one_and_200_with_it() {
    use base64::Engine as _;
    let mut rig = GatewayRig::new("api-auth", 1, Duration::from_millis(100), None).await;
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("api-password");
    std::fs::write(&password, "s3cret pass\n").unwrap();
    rig.config.api = Some(ApiSettings {
        auth: Some(ApiAuth {
            username: "operator".into(),
            password_file: SecretSource::File(password),
        }),
        ..plain_api()
    });
    let gw = rig.start().await;
    let addr = gw.api_addr().unwrap();
    let basic = |pair: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    };
    for path in ["/", "/metrics", "/health", "/api/tags", "/api/devices"] {
        let none = get(addr, path).await;
        assert_eq!(none.status, 401, "{path} without a password");
        assert!(none
            .header("www-authenticate")
            .unwrap()
            .starts_with("Basic "));
        let wrong = get_as(addr, path, Some(&basic("operator:s3cret"))).await;
        assert_eq!(wrong.status, 401, "{path} with a wrong password");
        let right = get_as(addr, path, Some(&basic("operator:s3cret pass"))).await;
        assert_ne!(right.status, 401, "{path} with the password");
    }
    let right = get_as(addr, "/api/devices", Some(&basic("operator:s3cret pass"))).await;
    assert_eq!(right.status, 200);
    assert_eq!(right.json()["gateway"], "api-auth");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_certificate_the_api_speaks_https_only() {
    let pki = gateway_tests::pki::Pki::generate().unwrap();
    let mut rig = GatewayRig::new("api-tls", 1, Duration::from_millis(100), None).await;
    rig.config.api = Some(ApiSettings {
        tls: Some(ApiTls {
            cert_file: pki.server().cert.clone(),
            key_file: SecretSource::File(pki.server().key.clone()),
        }),
        ..plain_api()
    });
    let gw = rig.start().await;
    let addr = gw.api_addr().unwrap();

    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(pki.ca()).unwrap();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&ca) {
        let cert: rustls_pki_types::CertificateDer<'static> = cert.unwrap();
        roots.add(cert).unwrap();
    }
    // The gateway's own choice of provider (see publish/tls).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let answer = exchange(tls, "GET", "/ready", None).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["ready"], true);

    // Plain HTTP on the same port gets no answer: the handshake fails.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut stream = tcp;
    stream
        .write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    assert!(
        !String::from_utf8_lossy(&raw).contains("200 OK"),
        "plain HTTP answered"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_is_served_from_the_binary_and_asks_nothing_from_elsewhere() {
    let mut rig = GatewayRig::new("api-page", 1, Duration::from_millis(100), None).await;
    rig.config.api = Some(plain_api());
    let gw = rig.start().await;
    let addr = gw.api_addr().unwrap();
    let page = get(addr, "/").await;
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.body.contains("api/tags") && page.body.contains("api/devices"));
    for external in [
        "src=\"http",
        "href=\"http",
        "<link",
        "<script src",
        "@import",
    ] {
        assert!(
            !page.body.contains(external),
            "the page loads an external asset ({external})"
        );
    }
    assert_eq!(get(addr, "/nothing-here").await.status, 404);
    let reload = {
        let stream = TcpStream::connect(addr).await.unwrap();
        exchange(stream, "POST", "/api/reload", None).await
    };
    assert_eq!(reload.status, 501, "no reload hook is set: {reload:?}");
    gw.shutdown().await;
}
