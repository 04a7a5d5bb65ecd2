//! The OPC UA driver against the in-process simulator (a real async-opcua server on 127.0.0.1).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ::opcua::types::{StatusCode, Variant};
use gateway_tests::{eventually, init_tracing, Proxy};
use protocols::driver::{
    write_channel, DeviceStatus, DriverContext, Emitter, WriteDone, WriteError, WriteRequest,
};
use protocols::model::{Batch, DeviceId, Quality, Reason, Sample, TagId, Value};
use protocols::opcua::{
    self, browse, Identity, Mode, NodeRef, OpcUaSettings, OpcUaTag, SecurityMode, SecurityPolicy,
};
use protocols::sim::opcua::{SimOpcUa, SimOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One simulator PKI for the whole test binary: its key is generated once.
fn sim_pki() -> PathBuf {
    std::env::temp_dir().join(format!("edge-gateway-test-sim-pki-{}", std::process::id()))
}

async fn sim() -> SimOpcUa {
    sim_with(|_| {}).await
}

async fn sim_with(f: impl FnOnce(&mut SimOptions)) -> SimOpcUa {
    let mut opts = SimOptions {
        pki_dir: sim_pki(),
        tick: Duration::from_millis(50),
        ..SimOptions::default()
    };
    f(&mut opts);
    SimOpcUa::start(opts).await.expect("simulator starts")
}

fn node(sim: &SimOpcUa, id: &str) -> NodeRef {
    NodeRef::Id(opcua::parse_node_id(&format!("ns={};s={id}", sim.namespace())).unwrap())
}

/// The simulator's counter as the only tag.
fn counter(sim: &SimOpcUa) -> Vec<OpcUaTag> {
    vec![tag("counter", node(sim, "Sim.Counter"))]
}

/// A cuttable proxy in front of the simulator, and the endpoint that goes through it.
async fn behind_proxy(sim: &SimOpcUa) -> (Proxy, String) {
    let proxy = Proxy::start(([127, 0, 0, 1], sim.port()).into())
        .await
        .unwrap();
    let endpoint = format!("opc.tcp://127.0.0.1:{}/", proxy.addr().port());
    (proxy, endpoint)
}

fn tag(name: &str, node: NodeRef) -> OpcUaTag {
    OpcUaTag {
        meta: Default::default(),
        name: name.into(),
        node,
        sampling_interval: Duration::from_millis(50),
        deadband: None,
        queue_size: 10,
        write: None,
    }
}

fn settings(endpoint: &str, pki: &Path, tags: Vec<OpcUaTag>) -> OpcUaSettings {
    let mut s = OpcUaSettings::new(endpoint, tags);
    s.pki_dir = pki.to_path_buf();
    s.trust_server_cert = true;
    s.publishing_interval = Duration::from_millis(100);
    s.scan_interval = Duration::from_millis(100);
    s.timeout = Duration::from_secs(2);
    s.backoff_min = Duration::from_millis(50);
    s.backoff_max = Duration::from_millis(300);
    s
}

struct Running {
    rx: mpsc::Receiver<Batch>,
    status: Arc<DeviceStatus>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), protocols::driver::DriverError>>,
    writes: mpsc::Sender<WriteRequest>,
}

fn start(s: OpcUaSettings) -> Running {
    let (tx, rx) = mpsc::channel(256);
    start_on(s, tx, rx, DeviceId(0))
}

fn start_on(
    s: OpcUaSettings,
    tx: mpsc::Sender<Batch>,
    rx: mpsc::Receiver<Batch>,
    device: DeviceId,
) -> Running {
    let status = Arc::new(DeviceStatus::default());
    let cancel = CancellationToken::new();
    let (writes, inbox) = write_channel(4);
    let ctx = DriverContext {
        device,
        name: format!("dev{}", device.0).into(),
        emitter: Emitter::new(tx),
        cancel: cancel.clone(),
        status: status.clone(),
        writes: Some(inbox),
    };
    let task = tokio::spawn(opcua::driver::run(s, ctx));
    Running {
        rx,
        status,
        cancel,
        task,
        writes,
    }
}

impl Running {
    /// Asks the driver to write `value` to tag `tag`; panics when no outcome comes in 15 s.
    async fn write(&self, tag: u32, value: Value) -> Result<WriteDone, WriteError> {
        gateway_tests::ask_driver(&self.writes, 0, tag, value, Duration::from_secs(15)).await
    }

    async fn next(&mut self) -> Batch {
        tokio::time::timeout(Duration::from_secs(15), self.rx.recv())
            .await
            .expect("a batch within 15 s")
            .expect("driver alive")
    }

    /// Skips batches until one satisfies `pred`.
    async fn until(&mut self, what: &str, pred: impl Fn(&Batch) -> bool) -> Batch {
        for _ in 0..2000 {
            let b = self.next().await;
            if pred(&b) {
                return b;
            }
        }
        panic!("no batch with {what}");
    }

    /// Collects samples until every tag index in `0..n` has one satisfying `pred`.
    async fn every_tag(&mut self, n: usize, pred: impl Fn(&Sample) -> bool) -> Vec<Sample> {
        let mut seen: Vec<Option<Sample>> = vec![None; n];
        while seen.iter().any(Option::is_none) {
            let b = self.next().await;
            for s in b.samples {
                let i = s.tag.0 as usize;
                if i < n && pred(&s) {
                    seen[i] = Some(s);
                }
            }
        }
        seen.into_iter().map(Option::unwrap).collect()
    }

    async fn stop(self) {
        self.cancel.cancel();
        let r = tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("driver stops within 5 s after cancel")
            .expect("driver task did not panic");
        assert!(r.is_ok(), "{r:?}");
    }
}

/// Waits for `n` increasing values of tag 0 (the simulator's counter): the subscription
/// itself delivers, not only the one read after a reconnect.
async fn counter_keeps_counting(run: &mut Running, n: usize) {
    let mut last: Option<u64> = None;
    let mut seen = 0;
    while seen < n {
        let b = run.next().await;
        for s in &b.samples {
            if let (0, Some(Value::UInt(v))) = (s.tag.0, &s.value) {
                if last.is_none_or(|l| *v > l) {
                    last = Some(*v);
                    seen += 1;
                }
            }
        }
    }
}

fn is_good(s: &Sample) -> bool {
    s.quality == Quality::Good
}

fn all_bad(b: &Batch, reason: Reason) -> bool {
    !b.samples.is_empty() && b.samples.iter().all(|s| s.quality == Quality::Bad(reason))
}

fn all_good(b: &Batch) -> bool {
    !b.samples.is_empty() && b.samples.iter().all(is_good)
}

#[tokio::test]
async fn subscriptions_deliver_every_builtin_type_with_source_timestamps() {
    init_tracing();
    let sim = sim().await;
    let pki = tempfile::tempdir().unwrap();
    let ids = [
        "Sim.Bool",
        "Sim.SByte",
        "Sim.Byte",
        "Sim.Int16",
        "Sim.UInt16",
        "Sim.Int32",
        "Sim.UInt32",
        "Sim.Int64",
        "Sim.UInt64",
        "Sim.Float",
        "Sim.Double",
        "Sim.String",
        "Sim.DateTime",
        "Sim.ByteString",
        "Sim.DoubleArray",
        "Sim.Int32Array",
    ];
    let tags = ids.iter().map(|id| tag(id, node(&sim, id))).collect();
    let mut run = start(settings(&sim.endpoint(), pki.path(), tags));
    let samples = run.every_tag(ids.len(), is_good).await;
    let kind = |v: &Option<Value>| match v {
        Some(Value::Bool(_)) => "bool",
        Some(Value::Int(_)) => "int",
        Some(Value::UInt(_)) => "uint",
        Some(Value::Float(_)) => "float",
        Some(Value::Text(_)) => "text",
        Some(Value::Array(_)) => "array",
        None => "none",
    };
    let kinds: Vec<&str> = samples.iter().map(|s| kind(&s.value)).collect();
    assert_eq!(
        kinds,
        vec![
            "bool", "int", "uint", "int", "uint", "int", "uint", "int", "uint", "float", "float",
            "text", "text", "text", "array", "array"
        ]
    );
    for s in &samples {
        assert!(s.source_time.is_some(), "source time on {s:?}");
    }
    let Some(Value::Text(dt)) = &samples[12].value else {
        panic!("DateTime as text")
    };
    assert!(dt.contains('T') && dt.ends_with('Z'), "RFC 3339: {dt}");
    let Some(Value::Array(a)) = &samples[14].value else {
        panic!("DoubleArray")
    };
    assert_eq!(a.len(), 3);
    assert!(run.status.is_connected());
    run.stop().await;
    sim.stop().await;
}

#[tokio::test]
async fn status_codes_become_quality_with_the_status_name() {
    init_tracing();
    let sim = sim().await;
    let pki = tempfile::tempdir().unwrap();
    let tags = vec![
        tag("uncertain", node(&sim, "Sim.Uncertain")),
        tag("bad", node(&sim, "Sim.Bad")),
        tag("missing", node(&sim, "Sim.DoesNotExist")),
    ];
    let mut run = start(settings(&sim.endpoint(), pki.path(), tags));
    let samples = run.every_tag(3, |_| true).await;
    assert_eq!(samples[0].quality.name(), "uncertain");
    assert_eq!(
        samples[0].quality.reason().unwrap().to_string(),
        "UncertainLastUsableValue"
    );
    assert!(samples[0].value.is_some(), "uncertain keeps its value");
    assert_eq!(
        samples[1].quality,
        Quality::Bad(Reason::Status(StatusCode::BadSensorFailure.bits()))
    );
    assert_eq!(samples[1].value, None);
    assert_eq!(
        samples[2].quality.reason().unwrap().to_string(),
        "BadNodeIdUnknown"
    );
    run.stop().await;
    sim.stop().await;
}

#[tokio::test]
async fn the_server_applies_the_absolute_deadband() {
    init_tracing();
    let sim = sim().await;
    let pki = tempfile::tempdir().unwrap();
    let mut t = tag("setpoint", node(&sim, "Sim.Setpoint"));
    t.deadband = Some(1.0);
    let mut run = start(settings(&sim.endpoint(), pki.path(), vec![t]));
    sim.set("Sim.Setpoint", Variant::Double(10.0)).unwrap();
    run.until("setpoint 10", |b| {
        b.samples
            .iter()
            .any(|s| s.value == Some(Value::Float(10.0)))
    })
    .await;
    sim.set("Sim.Setpoint", Variant::Double(10.5)).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    sim.set("Sim.Setpoint", Variant::Double(12.0)).unwrap();
    let b = run
        .until("setpoint 12", |b| {
            b.samples
                .iter()
                .any(|s| s.value == Some(Value::Float(12.0)) || s.value == Some(Value::Float(10.5)))
        })
        .await;
    assert!(
        b.samples
            .iter()
            .all(|s| s.value != Some(Value::Float(10.5))),
        "a change of 0.5 is inside a deadband of 1.0: {b:?}"
    );
    run.stop().await;
    sim.stop().await;
}

#[tokio::test]
async fn browse_paths_resolve_and_unknown_paths_go_bad() {
    init_tracing();
    let sim = sim().await;
    let pki = tempfile::tempdir().unwrap();
    let tags = vec![
        tag(
            "counter",
            NodeRef::BrowsePath(opcua::parse_browse_path("Objects/Sim/Counter").unwrap()),
        ),
        tag(
            "nothing",
            NodeRef::BrowsePath(opcua::parse_browse_path("Objects/Sim/Nothing").unwrap()),
        ),
    ];
    let mut run = start(settings(&sim.endpoint(), pki.path(), tags));
    let samples = run
        .every_tag(2, |s| s.tag.0 == 1 || s.value.is_some())
        .await;
    assert!(
        matches!(samples[0].value, Some(Value::UInt(_))),
        "{samples:?}"
    );
    assert_eq!(
        samples[1].quality.reason().unwrap().to_string(),
        "BadNoMatch"
    );
    run.stop().await;
    sim.stop().await;
}

#[tokio::test]
async fn poll_mode_reads_every_tag_in_one_request_per_scan() {
    init_tracing();
    let sim = sim().await;
    let pki = tempfile::tempdir().unwrap();
    let ids = ["Sim.Counter", "Sim.Double", "Sim.String", "Sim.Bad"];
    let tags = ids.iter().map(|id| tag(id, node(&sim, id))).collect();
    let mut s = settings(&sim.endpoint(), pki.path(), tags);
    s.mode = Mode::Poll;
    let mut run = start(s);
    let first = run.until("a full scan", |b| b.samples.len() == 4).await;
    let requests = run.status.requests.load(Ordering::Relaxed);
    for _ in 0..5 {
        let b = run.next().await;
        assert_eq!(b.samples.len(), 4, "every scan reports every tag");
        assert_eq!(b.samples[3].quality.name(), "bad");
        assert!(is_good(&b.samples[0]));
    }
    let after = run.status.requests.load(Ordering::Relaxed);
    assert_eq!(after - requests, 5, "one Read per scan");
    assert!(first.samples[0].source_time.is_some());
    run.stop().await;
    sim.stop().await;
}

#[tokio::test]
async fn calls_are_split_to_the_servers_operation_limits() {
    init_tracing();
    let sim = sim_with(|o| o.max_nodes_per_call = 2).await;
    let pki = tempfile::tempdir().unwrap();
    let ids = [
        "Sim.Counter",
        "Sim.Double",
        "Sim.String",
        "Sim.Bool",
        "Sim.Int32",
    ];
    let tags: Vec<OpcUaTag> = ids.iter().map(|id| tag(id, node(&sim, id))).collect();

    // Subscribe: five monitored items created two at a time all report.
    let mut run = start(settings(&sim.endpoint(), pki.path(), tags.clone()));
    run.every_tag(ids.len(), is_good).await;
    run.stop().await;

    // Poll: every scan still reports all five, in three Read calls.
    let mut s = settings(&sim.endpoint(), pki.path(), tags);
    s.mode = Mode::Poll;
    let mut run = start(s);
    run.until("a full scan", |b| b.samples.len() == 5 && all_good(b))
        .await;
    let requests = run.status.requests.load(Ordering::Relaxed);
    for _ in 0..3 {
        let b = run.next().await;
        assert!(all_good(&b) && b.samples.len() == 5, "{b:?}");
    }
    assert_eq!(run.status.requests.load(Ordering::Relaxed) - requests, 9);
    run.stop().await;
    sim.stop().await;
}

#[tokio::test]
async fn a_cut_link_makes_tags_bad_then_values_flow_again() {
    init_tracing();
    let sim = sim().await;
    let (proxy, endpoint) = behind_proxy(&sim).await;
    let pki = tempfile::tempdir().unwrap();
    let tags = vec![
        tag("counter", node(&sim, "Sim.Counter")),
        tag("setpoint", node(&sim, "Sim.Setpoint")),
    ];
    let mut run = start(settings(&endpoint, pki.path(), tags));
    run.every_tag(2, is_good).await;
    let sessions = sim.sessions_created();

    proxy.cut();
    run.until("tags bad with reason disconnected", |b| {
        all_bad(b, Reason::Disconnected) && b.samples.len() == 2
    })
    .await;
    assert!(!run.status.is_connected());

    proxy.restore();
    // Both come back, including the setpoint that never changes on its own...
    run.every_tag(2, is_good).await;
    assert!(run.status.is_connected());
    assert!(run.status.reconnects.load(Ordering::Relaxed) >= 1);
    // ...and the subscription keeps delivering: the counter counts on, and a change made
    // after the reconnect arrives.
    counter_keeps_counting(&mut run, 5).await;
    sim.set("Sim.Setpoint", Variant::Double(42.5)).unwrap();
    run.until("the new setpoint", |b| {
        b.samples
            .iter()
            .any(|s| s.tag.0 == 1 && s.value == Some(Value::Float(42.5)))
    })
    .await;
    assert_eq!(
        sim.sessions_created(),
        sessions,
        "the server kept the session through the cut: it is reactivated, not replaced"
    );
    run.stop().await;
    sim.stop().await;
}

#[tokio::test]
async fn poll_mode_keeps_its_session_through_a_cut_link() {
    init_tracing();
    let sim = sim().await;
    let (proxy, endpoint) = behind_proxy(&sim).await;
    let pki = tempfile::tempdir().unwrap();
    let mut s = settings(&endpoint, pki.path(), counter(&sim));
    s.mode = Mode::Poll;
    let mut run = start(s);
    run.until("a good value", all_good).await;
    let sessions = sim.sessions_created();
    proxy.cut();
    run.until("disconnected", |b| all_bad(b, Reason::Disconnected))
        .await;
    proxy.restore();
    counter_keeps_counting(&mut run, 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sim.sessions_created(),
        sessions,
        "the session is reactivated, not replaced"
    );
    // No second outage report after the reconnect.
    while let Ok(b) = run.rx.try_recv() {
        assert!(all_good(&b), "{b:?}");
    }
    run.stop().await;
    sim.stop().await;
}

#[tokio::test]
async fn a_reconnect_that_hangs_without_an_answer_is_abandoned_and_retried() {
    init_tracing();
    let sim = sim().await;
    let (proxy, endpoint) = behind_proxy(&sim).await;
    let pki = tempfile::tempdir().unwrap();
    let mut s = settings(&endpoint, pki.path(), counter(&sim));
    s.timeout = Duration::from_millis(500);
    let mut run = start(s);
    run.until("a good value", all_good).await;

    // The link dies and every new connection is swallowed without an answer.
    proxy.blackhole();
    run.until("disconnected", |b| all_bad(b, Reason::Disconnected))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The path comes back, but the reconnect in progress is stuck on a silent socket; only a
    // driver that abandons it connects again.
    let reconnects = run.status.reconnects.load(Ordering::Relaxed);
    proxy.restore();
    counter_keeps_counting(&mut run, 3).await;
    assert!(run.status.reconnects.load(Ordering::Relaxed) > reconnects);
    run.stop().await;
    sim.stop().await;
}

#[tokio::test]
async fn a_restarted_server_is_picked_up_without_restarting_the_driver() {
    init_tracing();
    let sim = sim().await;
    let port = sim.port();
    let pki = tempfile::tempdir().unwrap();
    let tags = counter(&sim);
    let mut run = start(settings(&sim.endpoint(), pki.path(), tags));
    run.until("a good value", all_good).await;
    let sessions = sim.sessions_created();
    sim.stop().await;
    run.until("disconnected", |b| all_bad(b, Reason::Disconnected))
        .await;

    let sim = sim_with(|o| o.port = port).await;
    run.until("values again", all_good).await;
    assert!(
        sim.sessions_created() >= 1,
        "a new session on the new server"
    );
    let _ = sessions;
    run.stop().await;
    sim.stop().await;
}

#[tokio::test]
async fn a_server_that_never_answers_does_not_block_other_devices() {
    init_tracing();
    // Accepts connections and never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c);
        }
    });
    let sim = sim().await;
    let pki = tempfile::tempdir().unwrap();
    let (tx, rx) = mpsc::channel(256);
    let mut dead_settings = settings(
        &format!("opc.tcp://127.0.0.1:{silent_port}/"),
        pki.path(),
        vec![tag("x", node(&sim, "Sim.Counter"))],
    );
    dead_settings.timeout = Duration::from_millis(500);
    let (dead_rx_unused_tx, dead_rx_unused) = mpsc::channel(1);
    drop(dead_rx_unused_tx);
    let dead = start_on(dead_settings, tx.clone(), dead_rx_unused, DeviceId(1));
    let mut live = start_on(
        settings(&sim.endpoint(), pki.path(), counter(&sim)),
        tx,
        rx,
        DeviceId(0),
    );
    let mut good_live = 0;
    let mut dead_bad = false;
    while good_live < 5 || !dead_bad {
        let b = live.next().await;
        match b.device {
            DeviceId(0) if all_good(&b) => good_live += 1,
            DeviceId(1) if all_bad(&b, Reason::Disconnected) => dead_bad = true,
            _ => {}
        }
    }
    assert!(!dead.status.is_connected());
    dead.stop().await;
    live.stop().await;
    hold.abort();
    sim.stop().await;
}

/// Writes a user certificate and key for X.509 identity tests.
fn user_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    use ::opcua::crypto::{CertificateStore, X509Data};
    let data = X509Data {
        key_size: 2048,
        common_name: "operator".into(),
        organization: "edge-gateway tests".into(),
        organizational_unit: "tests".into(),
        country: "DE".into(),
        state: "BW".into(),
        alt_host_names: vec!["urn:edge-gateway:test-user".into()].into(),
        certificate_duration_days: 30,
    };
    let cert_file = dir.join("user.der");
    let key_file = dir.join("user.pem");
    CertificateStore::create_certificate_and_key(&data, true, &cert_file, &key_file).unwrap();
    (cert_file, key_file)
}

#[tokio::test]
async fn every_policy_and_mode_works_with_every_identity() {
    init_tracing();
    let sim = sim().await;
    let pki = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("password");
    std::fs::write(&password_file, "secret\n").unwrap();
    let (cert_file, key_file) = user_certificate(secrets.path());
    let identities = [
        Identity::Anonymous,
        Identity::UserName {
            user: "operator".into(),
            password_file: password_file.clone(),
        },
        Identity::X509 {
            cert_file,
            key_file,
        },
    ];
    let mut combos = vec![(SecurityPolicy::None, SecurityMode::None)];
    for p in &SecurityPolicy::ALL[1..] {
        for m in [SecurityMode::Sign, SecurityMode::SignAndEncrypt] {
            combos.push((*p, m));
        }
    }
    for (policy, mode) in combos {
        for identity in &identities {
            let mut s = settings(&sim.endpoint(), pki.path(), counter(&sim));
            s.security_policy = policy;
            s.security_mode = mode;
            s.identity = identity.clone();
            s.mode = Mode::Poll;
            let mut run = start(s);
            let b = run.next().await;
            assert!(
                all_good(&b),
                "{policy}/{mode} with {identity:?}: {:?}",
                b.samples
            );
            run.stop().await;
        }
    }
    sim.stop().await;
}

/// The counter over Aes256_Sha256_RsaPss with SignAndEncrypt as user `operator` with
/// `password` (written to a file in `secrets`).
fn encrypted_as_operator(
    sim: &SimOpcUa,
    pki: &Path,
    secrets: &Path,
    password: &str,
) -> OpcUaSettings {
    let password_file = secrets.join("password");
    std::fs::write(&password_file, password).unwrap();
    let mut s = settings(&sim.endpoint(), pki, counter(sim));
    s.security_policy = SecurityPolicy::Aes256Sha256RsaPss;
    s.security_mode = SecurityMode::SignAndEncrypt;
    s.identity = Identity::UserName {
        user: "operator".into(),
        password_file,
    };
    s
}

#[tokio::test]
async fn a_wrong_password_is_refused() {
    init_tracing();
    let sim = sim().await;
    let pki = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let s = encrypted_as_operator(&sim, pki.path(), secrets.path(), "wrong");
    let mut run = start(s);
    let denied = Reason::Status(StatusCode::BadUserAccessDenied.bits());
    run.until("tags bad with the server's refusal", |b| all_bad(b, denied))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!run.status.is_connected());
    run.stop().await;
    sim.stop().await;
}

#[tokio::test]
async fn an_untrusted_server_is_rejected_until_its_certificate_is_moved_into_trusted() {
    init_tracing();
    let sim = sim().await;
    let pki = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let mut s = encrypted_as_operator(&sim, pki.path(), secrets.path(), "secret");
    s.trust_server_cert = false;
    let mut run = start(s);
    run.until("tags bad with a certificate status", |b| {
        !b.samples.is_empty()
            && b.samples.iter().all(|s| {
                matches!(s.quality, Quality::Bad(Reason::Status(code))
                    if opcua::is_certificate_problem(StatusCode::from(code)))
            })
    })
    .await;
    let rejected = pki.path().join("rejected");
    eventually(
        Duration::from_secs(10),
        "the server certificate in rejected/",
        || {
            std::fs::read_dir(&rejected)
                .map(|d| d.count() > 0)
                .unwrap_or(false)
        },
    )
    .await;
    assert!(!run.status.is_connected());

    // The operator checks it and moves it; no restart needed.
    for entry in std::fs::read_dir(&rejected).unwrap() {
        let entry = entry.unwrap();
        std::fs::rename(
            entry.path(),
            pki.path().join("trusted").join(entry.file_name()),
        )
        .unwrap();
    }
    run.until("values after trusting", all_good).await;
    run.stop().await;
    sim.stop().await;
}

#[tokio::test]
async fn browse_lists_variables_with_type_and_access_and_emits_loadable_tags() {
    init_tracing();
    let sim = sim().await;
    let pki = tempfile::tempdir().unwrap();
    let s = settings(&sim.endpoint(), pki.path(), Vec::new());
    let objects = opcua::parse_node_id("i=85").unwrap();
    let nodes = browse::browse(&s, &objects, 3).await.unwrap();
    let find = |name: &str| {
        nodes
            .iter()
            .find(|n| n.browse_name.ends_with(&format!(":{name}")))
            .unwrap_or_else(|| panic!("{name} in {nodes:#?}"))
    };
    assert_eq!(find("Double").data_type.as_deref(), Some("Double"));
    assert_eq!(find("DoubleArray").data_type.as_deref(), Some("Double[]"));
    assert!(find("Setpoint").writable);
    assert!(!find("Double").writable);
    let tree = browse::render_tree(&nodes);
    assert!(tree.contains("Sim.Double"), "{tree}");

    let toml = browse::render_toml(&nodes);
    let config = format!(
        "[gateway]\nid = \"gw\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n\
         [[devices]]\nname = \"sim\"\nprotocol = \"opcua\"\nendpoint = \"{}\"\n\n{toml}",
        sim.endpoint()
    );
    let parsed = edge_gateway::config::parse(&config, "browsed.toml");
    assert!(parsed.is_ok(), "{}\n{config}", parsed.err().unwrap());
    sim.stop().await;
}

#[tokio::test]
async fn an_unusable_pki_directory_marks_the_tags_bad_and_stops_the_driver() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, "x").unwrap();
    let mut s = settings(
        "opc.tcp://127.0.0.1:4840/",
        &file.join("pki"),
        vec![tag(
            "x",
            NodeRef::Id(opcua::parse_node_id("i=2258").unwrap()),
        )],
    );
    s.security_policy = SecurityPolicy::Basic256Sha256;
    s.security_mode = SecurityMode::Sign;
    let mut run = start(s);
    let b = run.next().await;
    assert!(
        all_bad(&b, Reason::Status(StatusCode::BadConfigurationError.bits())),
        "{b:?}"
    );
    let r = tokio::time::timeout(Duration::from_secs(5), &mut run.task)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_err(), "the driver stops with the reason");
}

#[tokio::test]
async fn in_poll_mode_a_write_lands_between_two_reads_in_the_node_s_type_and_is_read_back() {
    init_tracing();
    let sim = sim().await;
    let pki = tempfile::tempdir().unwrap();
    let tags = vec![
        tag("limit", node(&sim, "Sim.Limit")),
        tag("wave", node(&sim, "Sim.Double")),
    ];
    let mut s = settings(&sim.endpoint(), pki.path(), tags);
    s.mode = Mode::Poll;
    let mut run = start(s);
    run.until("a good read", |b| {
        b.samples.iter().all(|s| s.quality == Quality::Good)
    })
    .await;

    let done = run.write(0, Value::Int(-300)).await.unwrap();
    assert_eq!(done.previous, Some(Value::Int(0)));
    assert_eq!(done.read_back, Some(Value::Int(-300)));
    assert_eq!(sim.value("Sim.Limit").unwrap(), Variant::Int16(-300));
    run.until("the written value read", |b| {
        b.samples
            .iter()
            .any(|s| s.tag == TagId(0) && s.value == Some(Value::Int(-300)))
    })
    .await;

    // Refused before the Write service: not an Int16. Refused by the server: read-only.
    let refused = run.write(0, Value::Int(40_000)).await.unwrap_err();
    assert!(matches!(refused, WriteError::Refused(_)), "{refused}");
    let failed = run.write(1, Value::Float(1.0)).await.unwrap_err();
    assert!(
        matches!(&failed, WriteError::Status(name) if name == "BadUserAccessDenied"),
        "{failed}"
    );
    assert_eq!(sim.value("Sim.Limit").unwrap(), Variant::Int16(-300));
    run.stop().await;
    sim.stop().await;
}

#[tokio::test]
async fn a_write_while_the_server_cannot_be_reached_is_refused_as_not_connected() {
    init_tracing();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pki = tempfile::tempdir().unwrap();
    let node = NodeRef::Id(opcua::parse_node_id("ns=2;s=Sim.Limit").unwrap());
    let endpoint = format!("opc.tcp://127.0.0.1:{port}/");
    let mut run = start(settings(&endpoint, pki.path(), vec![tag("limit", node)]));
    run.until("the tags bad", |b| {
        b.samples.iter().all(|s| s.quality != Quality::Good)
    })
    .await;
    let refused = run.write(0, Value::Int(1)).await.unwrap_err();
    assert!(matches!(refused, WriteError::NotConnected), "{refused}");
    run.stop().await;
}
