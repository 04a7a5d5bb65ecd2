//! MQTT 5 against a strict broker (Debian's mosquitto, with users and an ACL): records carry
//! content type `application/json` and go out by topic alias; a PUBACK that refuses a record
//! (reason code "not authorized") never deletes it, and it arrives once the broker takes it; the
//! broker's maximum packet size splits records before they get a seq.
//!
//! The gateway reaches mosquitto through a fault-injecting proxy; the subscribers use the
//! broker's second listener as the `collector` user.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_gateway::config::ProtocolVersion;
use edge_gateway::metrics::Metrics;
use edge_gateway::secret::SecretSource;
use gateway_tests::mosquitto::Mosquitto;
use gateway_tests::{contiguous_seqs, drained, eventually, GatewayRig, Received};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

const SCAN: Duration = Duration::from_millis(50);
const USER: &str = "gw";
const PASSWORD: &str = "gw-password";

/// A broker where `gw` may publish to `topics`.
async fn broker(topics: &[&str], max_packet_size: Option<u32>) -> Mosquitto {
    let mut b = Mosquitto::builder().user(USER, PASSWORD);
    for t in topics {
        b = b.allow_write(USER, t);
    }
    if let Some(n) = max_packet_size {
        b = b.max_packet_size(n);
    }
    b.start().await
}

/// A gateway speaking MQTT 5 as `gw` to `broker` (through the rig's proxy).
async fn rig(id: &str, broker: &Mosquitto) -> (GatewayRig, tempfile::TempDir) {
    let mut rig = GatewayRig::new(id, 1, SCAN, Some(broker.addr())).await;
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, PASSWORD).unwrap();
    let m = &mut rig.config.mqtt;
    m.protocol_version = ProtocolVersion::V5;
    m.username = Some(USER.to_owned());
    m.password_file = Some(SecretSource::File(password));
    m.backoff_max = Duration::from_secs(1);
    (rig, dir)
}

/// A message as an MQTT 5 subscriber sees it.
#[derive(Debug, Clone)]
struct Seen {
    topic: String,
    content_type: Option<String>,
    doc: serde_json::Value,
}

/// An MQTT 5 subscriber to `filter` on the broker's collector listener.
async fn v5_subscriber(broker: &Mosquitto, filter: &str) -> Arc<Mutex<Vec<Seen>>> {
    let (user, password) = broker.collector_login();
    let mut o = MqttOptions::new(
        format!("v5-sub-{}", rand::random::<u32>()),
        "127.0.0.1",
        broker.collector_port(),
    );
    o.set_credentials(user, password);
    o.set_max_packet_size(Some(1 << 20));
    let (client, mut el) = AsyncClient::new(o, 64);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (subscribed_tx, mut subscribed) = tokio::sync::watch::channel(false);
    let s = seen.clone();
    let filter = filter.to_owned();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client
                        .subscribe(filter.clone(), rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                        .await;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = subscribed_tx.send(true);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    if topic.ends_with("/status") || topic.ends_with("/meta") {
                        continue;
                    }
                    let content_type = p.properties.and_then(|p| p.content_type);
                    let doc = serde_json::from_slice(&p.payload).unwrap_or_default();
                    s.lock().unwrap().push(Seen {
                        topic,
                        content_type,
                        doc,
                    });
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(10), subscribed.wait_for(|s| *s)).await;
    seen
}

fn as_received(seen: &[Seen]) -> Vec<Received> {
    seen.iter()
        .map(|s| Received {
            topic: s.topic.clone(),
            doc: s.doc.clone(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mqtt5_records_arrive_complete_as_json_by_topic_alias() {
    let broker = broker(&["edge/gw-v5/#"], None).await;
    let (rig, _dir) = rig("gw-v5", &broker).await;
    let seen = v5_subscriber(&broker, "edge/gw-v5/#").await;
    let gw = rig.start().await;
    eventually(Duration::from_secs(20), "50 records", || {
        seen.lock().unwrap().len() >= 50
    })
    .await;
    let created = drained(&gw, Duration::from_secs(10)).await;
    gw.shutdown().await;
    let seen = seen.lock().unwrap().clone();
    for s in &seen {
        // The first record set the alias with the topic, the later ones used the alias alone:
        // the broker gave every one its full topic back.
        assert_eq!(s.topic, "edge/gw-v5/press1");
        assert_eq!(s.content_type.as_deref(), Some("application/json"));
    }
    let seqs = contiguous_seqs(&as_received(&seen), 1);
    assert_eq!(seqs.first(), Some(&0));
    assert!(seqs.len() as u64 >= created, "{} of {created}", seqs.len());
    assert!(
        broker.log().contains("gw-v5"),
        "the broker saw the gateway connect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_puback_keeps_the_record_buffered_until_the_broker_takes_it() {
    // The gateway may publish its status, not its records.
    let mut broker = broker(&["edge/gw-deny/status"], None).await;
    let (rig, _dir) = rig("gw-deny", &broker).await;
    let sub = broker.collector("edge/gw-deny/#").await;
    let gw = rig.start().await;
    let m = gw.metrics.clone();
    eventually(
        Duration::from_secs(20),
        "records refused as not authorized",
        || m.puback_refusals_with(0x87) >= 3,
    )
    .await;
    assert_eq!(Metrics::get(&m.acked), 0, "a refused record was credited");
    assert!(
        sub.messages().is_empty(),
        "the broker forwarded a refused record"
    );
    // Refused records wait on disk, not only in memory.
    eventually(Duration::from_secs(20), "refused records committed", || {
        Metrics::get(&m.committed) > 0
    })
    .await;

    broker
        .reload_with(|b| b.allow_write(USER, "edge/gw-deny/#"))
        .await;
    let created_before = Metrics::get(&m.records);
    sub.wait_for(
        Duration::from_secs(30),
        "every record refused before",
        |msgs| contiguous_seqs(msgs, 1).len() as u64 >= created_before,
    )
    .await;
    let created = drained(&gw, Duration::from_secs(20)).await;
    gw.shutdown().await;
    let seqs = contiguous_seqs(&sub.messages(), 1);
    assert_eq!(seqs.first(), Some(&0));
    assert!(seqs.len() as u64 >= created, "{} of {created}", seqs.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_maximum_packet_size_splits_records_before_they_get_a_seq() {
    const LIMIT: usize = 512;
    let broker = broker(&["edge/gw-small/#"], Some(LIMIT as u32)).await;
    let (rig, _dir) = rig("gw-small", &broker).await;
    let seen = v5_subscriber(&broker, "edge/gw-small/#").await;
    let gw = rig.start().await;
    eventually(Duration::from_secs(20), "records", || {
        seen.lock().unwrap().len() >= 40
    })
    .await;
    let created = drained(&gw, Duration::from_secs(10)).await;
    gw.shutdown().await;
    let seen = seen.lock().unwrap().clone();
    let tags = edge_gateway::demo::DEMO_TAGS.len();
    let mut split = false;
    for s in &seen {
        let payload = serde_json::to_vec(&s.doc).unwrap();
        assert!(
            s.topic.len() + payload.len() < LIMIT,
            "a record of {} bytes for a broker taking {LIMIT}",
            payload.len()
        );
        split |= s.doc["samples"].as_array().unwrap().len() < tags;
    }
    assert!(split, "no record was split: the limit did not bite");
    let seqs = contiguous_seqs(&as_received(&seen), 1);
    assert_eq!(seqs.first(), Some(&0));
    assert!(seqs.len() as u64 >= created, "{} of {created}", seqs.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_retained_messages_gets_its_will_and_status_without_retain() {
    let broker = Mosquitto::builder()
        .user(USER, PASSWORD)
        .allow_write(USER, "edge/gw-noretain/#")
        .without_retain()
        .start()
        .await;
    let (rig, _dir) = rig("gw-noretain", &broker).await;
    let sub = broker.collector("edge/gw-noretain/#").await;
    let gw = rig.start().await;
    sub.wait_for(Duration::from_secs(20), "records", |m| m.len() >= 20)
        .await;
    sub.wait_for_status(Duration::from_secs(10), "online", |s| {
        s.iter().any(|s| s.doc["state"] == "online")
    })
    .await;
    let created = drained(&gw, Duration::from_secs(10)).await;
    gw.shutdown().await;
    let seqs = contiguous_seqs(&sub.messages(), 1);
    assert!(seqs.len() as u64 >= created, "{} of {created}", seqs.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_too_large_for_a_new_brokers_limit_wait_on_disk_while_live_records_flow() {
    // A first run buffers records of a full scan (about 700 bytes) while its broker is away.
    let roomy = broker(&["edge/gw-shrink/#"], None).await;
    let (mut rig, _dir) = rig("gw-shrink", &roomy).await;
    rig.proxy.cut();
    let gw = rig.start().await;
    eventually(Duration::from_secs(20), "records on disk", || {
        Metrics::get(&gw.metrics.committed) >= 20
    })
    .await;
    gw.shutdown().await;

    // The next run meets a broker that takes 512 bytes at most.
    let small = broker(&["edge/gw-shrink/#"], Some(512)).await;
    rig.proxy.repoint(small.addr());
    rig.proxy.restore();
    rig.config.mqtt.backoff_max = Duration::from_millis(500);
    let seen = v5_subscriber(&small, "edge/gw-shrink/#").await;
    let gw = rig.start().await;
    eventually(
        Duration::from_secs(20),
        "the old records passed over",
        || Metrics::get(&gw.metrics.too_large_for_broker) > 0,
    )
    .await;
    // Live records of this boot keep flowing, split to fit: the publisher did not stall.
    let boot = gw.boot;
    eventually(
        Duration::from_secs(20),
        "live records of the new boot",
        || {
            let seen = seen.lock().unwrap();
            contiguous_seqs(&as_received(&seen), boot).len() >= 40
        },
    )
    .await;
    assert!(!gw.buffer.is_empty(), "the records too large stay on disk");
    gw.shutdown().await;
}
