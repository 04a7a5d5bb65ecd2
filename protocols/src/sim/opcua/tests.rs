use super::space::SIM_KINDS;
use super::*;

use std::fs;
use std::time::Instant;

use opcua::client::{
    Client, ClientBuilder, DataChangeCallback, IdentityToken, MonitoredItem, Session,
};
use opcua::crypto::{CertificateStore, SecurityPolicy, X509Data};
use opcua::types::{
    AttributeId, BrowseDescription, BrowseDirection, BrowseResultMask, DataValue,
    MessageSecurityMode, MonitoredItemCreateRequest, MonitoringMode, MonitoringParameters, NodeId,
    ObjectId, QualifiedName, ReadValueId, ReferenceTypeId, TimestampsToReturn, WriteValue,
};
use tokio::sync::mpsc;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A fixed directory per purpose, so reruns reuse the server's key pair.
fn test_dir(name: &str) -> PathBuf {
    std::env::temp_dir()
        .join("edge-gateway-opcua-sim-tests")
        .join(name)
}

/// Default options with a PKI directory shared by the tests of this run (one keygen).
fn options() -> SimOptions {
    SimOptions {
        pki_dir: test_dir("server-pki"),
        tick: Duration::from_millis(50),
        ..SimOptions::default()
    }
}

fn client(pki_dir: PathBuf, keypair: bool) -> Client {
    ClientBuilder::new()
        .application_name("edge-gateway sim test client")
        .application_uri("urn:edge-gateway:sim-test-client")
        .product_uri("urn:edge-gateway:sim-test-client")
        .pki_dir(pki_dir)
        .create_sample_keypair(keypair)
        .trust_server_certs(false)
        .session_retry_limit(0)
        .session_retry_initial(Duration::from_millis(100))
        .session_retry_max(Duration::from_millis(500))
        .session_timeout(30_000)
        .client()
        .expect("valid client configuration")
}

fn none_client() -> Client {
    client(test_dir("client-pki-none"), false)
}

/// Connects and waits for the session; the error is the status the event loop ended with.
async fn connect(
    sim: &SimOpcUa,
    client: &mut Client,
    policy: SecurityPolicy,
    mode: MessageSecurityMode,
    identity: IdentityToken,
) -> Result<(Arc<Session>, JoinHandle<StatusCode>), StatusCode> {
    let endpoint = sim.endpoint();
    let (session, event_loop) = client
        .connect_to_matching_endpoint((endpoint.as_str(), policy.to_str(), mode), identity)
        .await
        .map_err(|e| e.status())?;
    let mut event_loop = event_loop.spawn();
    tokio::select! {
        connected = session.wait_for_connection() => {
            assert!(connected);
            Ok((session, event_loop))
        }
        ended = &mut event_loop => Err(ended.unwrap_or(StatusCode::BadUnexpectedError)),
        _ = tokio::time::sleep(TIMEOUT) => Err(StatusCode::BadTimeout),
    }
}

async fn connect_anonymous(sim: &SimOpcUa) -> (Arc<Session>, JoinHandle<StatusCode>) {
    let mut client = none_client();
    connect(
        sim,
        &mut client,
        SecurityPolicy::None,
        MessageSecurityMode::None,
        IdentityToken::Anonymous,
    )
    .await
    .expect("anonymous None/None session")
}

fn read_id(ns: u16, id: &str, attribute: AttributeId) -> ReadValueId {
    ReadValueId {
        node_id: NodeId::new(ns, id),
        attribute_id: attribute as u32,
        ..Default::default()
    }
}

async fn read_value(session: &Session, ns: u16, id: &str) -> DataValue {
    let mut values = session
        .read(
            &[read_id(ns, id, AttributeId::Value)],
            TimestampsToReturn::Both,
            0.0,
        )
        .await
        .expect("read");
    values.pop().expect("one result")
}

async fn wait_until<F: FnMut() -> bool>(mut done: F) -> bool {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

#[test]
fn the_variable_table_matches_the_simulated_variables() {
    assert_eq!(VARIABLES.len(), SIM_KINDS.len());
    for ((id, type_name), (name, kind)) in VARIABLES.iter().zip(SIM_KINDS) {
        assert_eq!(*id, format!("Sim.{name}"));
        assert_eq!(*type_name, kind.type_name(), "{id}");
        let value = kind.value(7, DateTime::now());
        assert!(kind.accepts(&value), "{id} does not accept its own value");
        assert_eq!(value.is_array(), kind.array_len().is_some(), "{id}");
    }
}

#[tokio::test]
async fn starts_on_a_free_loopback_port_and_serves_every_variable_type() {
    let sim = SimOpcUa::start(options()).await.unwrap();
    assert_ne!(sim.port(), 0);
    assert_eq!(
        sim.endpoint(),
        format!("opc.tcp://127.0.0.1:{}/", sim.port())
    );
    assert!(sim.server_cert_path().is_file());
    let (session, _event_loop) = connect_anonymous(&sim).await;
    let ns = sim.namespace();
    assert_eq!(
        session.get_namespace_index(NAMESPACE_URI).await.unwrap(),
        ns
    );

    let mut to_read = Vec::new();
    for (id, _) in VARIABLES {
        for attribute in [
            AttributeId::Value,
            AttributeId::DataType,
            AttributeId::ValueRank,
            AttributeId::BrowseName,
        ] {
            to_read.push(read_id(ns, id, attribute));
        }
    }
    let results = session
        .read(&to_read, TimestampsToReturn::Both, 0.0)
        .await
        .unwrap();
    assert_eq!(results.len(), to_read.len());

    for ((id, type_name), attrs) in VARIABLES.iter().zip(results.chunks(4)) {
        let kind = SIM_KINDS
            .iter()
            .find(|(name, _)| format!("Sim.{name}") == *id)
            .unwrap()
            .1;
        let value = &attrs[0];
        let expected_status = match *id {
            "Sim.Uncertain" => StatusCode::UncertainLastUsableValue,
            "Sim.Bad" => StatusCode::BadSensorFailure,
            _ => StatusCode::Good,
        };
        assert_eq!(value.status(), expected_status, "{id} status");
        assert!(value.source_timestamp.is_some(), "{id} source timestamp");
        let variant = value.value.as_ref().expect("value");
        assert_eq!(
            variant.scalar_type_id(),
            Some(kind.scalar_type()),
            "{id} value type ({type_name})"
        );
        assert_eq!(variant.is_array(), kind.array_len().is_some(), "{id}");
        let data_type: NodeId = kind.data_type().into();
        assert_eq!(
            attrs[1].value,
            Some(Variant::from(data_type)),
            "{id} DataType attribute"
        );
        let rank = if id.ends_with("Array") { 1 } else { -1 };
        assert_eq!(attrs[2].value, Some(Variant::Int32(rank)), "{id} ValueRank");
        let name = id.trim_start_matches("Sim.");
        assert_eq!(
            attrs[3].value,
            Some(Variant::from(QualifiedName::new(ns, name))),
            "{id} BrowseName"
        );
    }

    // The folder is reachable from Objects, so a browser finds the variables.
    let browse = |node_id: NodeId| BrowseDescription {
        node_id,
        browse_direction: BrowseDirection::Forward,
        reference_type_id: ReferenceTypeId::Organizes.into(),
        include_subtypes: true,
        node_class_mask: 0,
        result_mask: BrowseResultMask::All as u32,
    };
    let objects = session
        .browse(&[browse(ObjectId::ObjectsFolder.into())], 1000, None)
        .await
        .unwrap();
    let refs = objects[0].references.clone().unwrap_or_default();
    assert!(refs
        .iter()
        .any(|r| r.browse_name == QualifiedName::new(ns, "Sim")));
    let sim_folder = session
        .browse(&[browse(NodeId::new(ns, "Sim"))], 1000, None)
        .await
        .unwrap();
    assert_eq!(
        sim_folder[0].references.as_ref().map(Vec::len),
        Some(VARIABLES.len())
    );
    sim.stop().await;
}

#[tokio::test]
async fn subscribers_receive_changing_values() {
    let sim = SimOpcUa::start(options()).await.unwrap();
    let (session, _event_loop) = connect_anonymous(&sim).await;
    let ns = sim.namespace();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let subscription = session
        .create_subscription(
            Duration::from_millis(50),
            100,
            20,
            0,
            0,
            true,
            DataChangeCallback::new(move |dv: DataValue, item: &MonitoredItem| {
                let _ = tx.send((item.item_to_monitor().node_id.clone(), dv));
            }),
        )
        .await
        .unwrap();
    let items = ["Sim.Counter", "Sim.Double", "Sim.Bad"]
        .iter()
        .map(|id| MonitoredItemCreateRequest {
            item_to_monitor: read_id(ns, id, AttributeId::Value),
            monitoring_mode: MonitoringMode::Reporting,
            requested_parameters: MonitoringParameters {
                sampling_interval: 0.0,
                queue_size: 10,
                discard_oldest: true,
                ..Default::default()
            },
        })
        .collect();
    let created = session
        .create_monitored_items(subscription, TimestampsToReturn::Both, items)
        .await
        .unwrap();
    assert!(created.iter().all(|c| c.result.status_code.is_good()));

    let counter_id = NodeId::new(ns, "Sim.Counter");
    let bad_id = NodeId::new(ns, "Sim.Bad");
    let mut counters = Vec::new();
    let mut bad_statuses = Vec::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while counters.len() < 4 {
        let (node_id, dv) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("notifications within the timeout")
            .unwrap();
        assert!(dv.source_timestamp.is_some());
        if node_id == counter_id {
            counters.push((dv.value.clone(), dv.source_timestamp));
        } else if node_id == bad_id {
            bad_statuses.push(dv.status());
        }
    }
    // Counter goes up by one per tick, each with a newer source timestamp.
    let numbers: Vec<u32> = counters
        .iter()
        .map(|(v, _)| match v {
            Some(Variant::UInt32(n)) => *n,
            other => panic!("Counter is {other:?}"),
        })
        .collect();
    assert!(numbers.windows(2).all(|w| w[1] > w[0]), "{numbers:?}");
    assert!(counters.windows(2).all(|w| w[1].1 > w[0].1));
    assert!(bad_statuses
        .iter()
        .all(|s| *s == StatusCode::BadSensorFailure));

    // `set` reaches subscribers right away and sticks.
    sim.set("Sim.Counter", Variant::UInt32(4_000_000)).unwrap();
    loop {
        let (node_id, dv) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("the set value within the timeout")
            .unwrap();
        if node_id == counter_id && dv.value == Some(Variant::UInt32(4_000_000)) {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        read_value(&session, ns, "Sim.Counter").await.value,
        Some(Variant::UInt32(4_000_000))
    );
    sim.stop().await;
}

#[tokio::test]
async fn set_and_set_status_reject_unknown_ids_and_wrong_types() {
    let sim = SimOpcUa::start(options()).await.unwrap();
    assert!(matches!(
        sim.set("Sim.Nope", Variant::Double(1.0)),
        Err(SimError::UnknownVariable(_))
    ));
    assert!(matches!(
        sim.set_status("Nope", StatusCode::Good),
        Err(SimError::UnknownVariable(_))
    ));
    assert!(matches!(
        sim.set("Sim.Double", Variant::Int32(1)),
        Err(SimError::TypeMismatch { .. })
    ));
    assert!(matches!(
        sim.set("Sim.DoubleArray", Variant::Double(1.0)),
        Err(SimError::TypeMismatch { .. })
    ));
    sim.set("Sim.DoubleArray", Variant::from(vec![1.0, 2.0]))
        .unwrap();
    sim.set("Sim.String", Variant::from("hello")).unwrap();

    let (session, _event_loop) = connect_anonymous(&sim).await;
    let ns = sim.namespace();
    sim.set_status("Sim.Double", StatusCode::BadCommunicationError)
        .unwrap();
    let double = read_value(&session, ns, "Sim.Double").await;
    assert_eq!(double.status(), StatusCode::BadCommunicationError);
    // Still simulated: the value keeps changing under the new status.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let later = read_value(&session, ns, "Sim.Double").await;
    assert_eq!(later.status(), StatusCode::BadCommunicationError);
    assert_ne!(later.value, double.value);
    assert_eq!(
        read_value(&session, ns, "Sim.String").await.value,
        Some(Variant::from("hello"))
    );
    sim.stop().await;
}

#[tokio::test]
async fn clients_may_write_the_setpoint_and_the_limit_and_nothing_else() {
    let sim = SimOpcUa::start(options()).await.unwrap();
    let (session, _event_loop) = connect_anonymous(&sim).await;
    let ns = sim.namespace();
    let write = |id: &str, value: Variant| WriteValue {
        node_id: NodeId::new(ns, id),
        attribute_id: AttributeId::Value as u32,
        index_range: Default::default(),
        value: DataValue::new_now(value),
    };
    let results = session
        .write(&[
            write("Sim.Setpoint", Variant::Double(42.5)),
            write("Sim.Double", Variant::Double(1.0)),
            write("Sim.Limit", Variant::Int16(-7)),
        ])
        .await
        .unwrap();
    assert_eq!(results[0], StatusCode::Good);
    // async-opcua answers a Value write to a variable without CurrentWrite this way.
    assert_eq!(results[1], StatusCode::BadUserAccessDenied);
    assert_eq!(results[2], StatusCode::Good);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        read_value(&session, ns, "Sim.Setpoint").await.value,
        Some(Variant::Double(42.5))
    );
    assert_eq!(
        read_value(&session, ns, "Sim.Limit").await.value,
        Some(Variant::Int16(-7)),
        "ticks leave a written variable alone"
    );
    assert_eq!(sim.value("Sim.Limit").unwrap(), Variant::Int16(-7));
    sim.stop().await;
}

#[tokio::test]
async fn restarts_on_the_same_port() {
    let opts = options();
    let sim = SimOpcUa::start(opts.clone()).await.unwrap();
    let port = sim.port();
    let ns = sim.namespace();
    let (session, event_loop) = {
        let mut client = ClientBuilder::new()
            .application_name("edge-gateway sim test client")
            .application_uri("urn:edge-gateway:sim-test-client")
            .pki_dir(test_dir("client-pki-none"))
            .create_sample_keypair(false)
            .session_retry_limit(-1)
            .session_retry_initial(Duration::from_millis(50))
            .session_retry_max(Duration::from_millis(200))
            .client()
            .unwrap();
        connect(
            &sim,
            &mut client,
            SecurityPolicy::None,
            MessageSecurityMode::None,
            IdentityToken::Anonymous,
        )
        .await
        .unwrap()
    };
    assert!(read_value(&session, ns, "Sim.Counter")
        .await
        .status()
        .is_good());
    assert_eq!(sim.sessions_created(), 1);

    sim.stop().await;
    let refused = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
    assert!(refused.is_err(), "port {port} still open after stop");

    let restarted = SimOpcUa::start(SimOptions { port, ..opts }).await.unwrap();
    assert_eq!(restarted.port(), port);
    // The same client session reconnects on its own and reads again.
    let reconnected = wait_until(|| restarted.sessions_created() >= 1).await;
    assert!(reconnected, "client did not reconnect");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let read = session
            .read(
                &[read_id(ns, "Sim.Counter", AttributeId::Value)],
                TimestampsToReturn::Both,
                0.0,
            )
            .await;
        if matches!(&read, Ok(values) if values[0].status().is_good()) {
            break;
        }
        assert!(Instant::now() < deadline, "no read after restart: {read:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    session.disconnect().await.unwrap();
    let _ = event_loop.await;
    restarted.stop().await;
}

#[tokio::test]
async fn rejects_an_unknown_user() {
    let sim = SimOpcUa::start(SimOptions {
        allow_anonymous: false,
        ..options()
    })
    .await
    .unwrap();
    let mut client = none_client();
    let unknown = connect(
        &sim,
        &mut client,
        SecurityPolicy::None,
        MessageSecurityMode::None,
        IdentityToken::new_user_name("intruder", "secret"),
    )
    .await;
    assert_eq!(unknown.err(), Some(StatusCode::BadUserAccessDenied));
    let wrong_password = connect(
        &sim,
        &mut client,
        SecurityPolicy::None,
        MessageSecurityMode::None,
        IdentityToken::new_user_name("operator", "guess"),
    )
    .await;
    assert_eq!(wrong_password.err(), Some(StatusCode::BadUserAccessDenied));
    let anonymous = connect(
        &sim,
        &mut client,
        SecurityPolicy::None,
        MessageSecurityMode::None,
        IdentityToken::Anonymous,
    )
    .await;
    assert!(anonymous.is_err());

    let (session, _event_loop) = connect(
        &sim,
        &mut client,
        SecurityPolicy::None,
        MessageSecurityMode::None,
        IdentityToken::new_user_name("operator", "secret"),
    )
    .await
    .expect("the configured user is accepted");
    assert!(read_value(&session, sim.namespace(), "Sim.Bool")
        .await
        .status()
        .is_good());
    sim.stop().await;
}

#[tokio::test]
async fn secure_endpoints_accept_any_client_certificate_and_x509_users() {
    let sim = SimOpcUa::start(options()).await.unwrap();
    // Fresh client and user key pairs each run, so they never expire between runs.
    let pki = test_dir("client-pki-secure");
    let user_dir = test_dir("x509-user");
    let _ = fs::remove_dir_all(&pki);
    let _ = fs::remove_dir_all(&user_dir);
    // Trust the server the way a gateway operator would: its certificate in trusted/.
    let server_cert = CertificateStore::read_cert(&sim.server_cert_path()).unwrap();
    let trusted = pki.join("trusted");
    fs::create_dir_all(&trusted).unwrap();
    fs::copy(
        sim.server_cert_path(),
        trusted.join(CertificateStore::cert_file_name(&server_cert)),
    )
    .unwrap();
    let mut client = client(pki.clone(), true);

    let (user_cert, user_key) = {
        let mut alt_host_names =
            X509Data::alt_host_names("urn:edge-gateway:sim-test-user", None, false, false, false);
        alt_host_names.add_dns("user");
        let data = X509Data {
            key_size: 2048,
            common_name: "sim test user".to_owned(),
            organization: "edge-gateway".to_owned(),
            organizational_unit: "tests".to_owned(),
            country: "DE".to_owned(),
            state: "BY".to_owned(),
            alt_host_names,
            certificate_duration_days: 30,
        };
        let cert_path = user_dir.join("user.der");
        let key_path = user_dir.join("user.pem");
        CertificateStore::create_certificate_and_key(&data, true, &cert_path, &key_path).unwrap();
        (cert_path, key_path)
    };

    let cases = [
        (
            SecurityPolicy::Basic256Sha256,
            MessageSecurityMode::SignAndEncrypt,
            IdentityToken::new_user_name("operator", "secret"),
        ),
        (
            SecurityPolicy::Aes128Sha256RsaOaep,
            MessageSecurityMode::Sign,
            IdentityToken::Anonymous,
        ),
        (
            SecurityPolicy::Aes256Sha256RsaPss,
            MessageSecurityMode::SignAndEncrypt,
            IdentityToken::new_x509_path(&user_cert, &user_key).unwrap(),
        ),
        (
            SecurityPolicy::None,
            MessageSecurityMode::None,
            IdentityToken::new_x509_path(&user_cert, &user_key).unwrap(),
        ),
    ];
    for (policy, mode, identity) in cases {
        let (session, event_loop) = connect(&sim, &mut client, policy, mode, identity)
            .await
            .unwrap_or_else(|s| panic!("{policy} {mode}: {s}"));
        let value = read_value(&session, sim.namespace(), "Sim.Double").await;
        assert!(value.status().is_good(), "{policy} {mode}");
        session.disconnect().await.unwrap();
        let _ = event_loop.await;
    }
    sim.stop().await;
}

#[tokio::test]
async fn bench_variables_all_change_every_tick() {
    let sim = SimOpcUa::start(SimOptions {
        bench_variables: 10_000,
        tick: Duration::from_millis(100),
        ..options()
    })
    .await
    .unwrap();
    let mut client = ClientBuilder::new()
        .application_name("edge-gateway sim test client")
        .application_uri("urn:edge-gateway:sim-test-client")
        .pki_dir(test_dir("client-pki-none"))
        .create_sample_keypair(false)
        .session_retry_limit(0)
        .max_array_length(1_000_000)
        .max_message_size(64 << 20)
        .max_chunk_count(2000)
        .client()
        .unwrap();
    let (session, _event_loop) = connect(
        &sim,
        &mut client,
        SecurityPolicy::None,
        MessageSecurityMode::None,
        IdentityToken::Anonymous,
    )
    .await
    .unwrap();
    let ns = sim.namespace();
    let ids: Vec<ReadValueId> = (0..10_000)
        .map(|i| read_id(ns, &format!("Bench.{i}"), AttributeId::Value))
        .collect();
    let first = session
        .read(&ids, TimestampsToReturn::Both, 0.0)
        .await
        .unwrap();
    assert_eq!(first.len(), 10_000);
    assert!(first.iter().all(|v| v.status().is_good()));
    tokio::time::sleep(Duration::from_millis(250)).await;
    let second = session
        .read(&ids, TimestampsToReturn::Both, 0.0)
        .await
        .unwrap();
    assert!(first
        .iter()
        .zip(&second)
        .all(|(a, b)| a.value != b.value && b.source_timestamp > a.source_timestamp));

    // One tick over 10k variables without subscribers is cheap.
    let started = Instant::now();
    sim.shared.tick(1_000_000);
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(100),
        "tick took {elapsed:?}"
    );
    sim.stop().await;
}
