//! The meta message: `{topic_prefix}/{device}/meta`, retained, lists every tag of a device with
//! its type, unit, description, range, source address and scan interval. A consumer that
//! subscribes late learns the whole catalog at once; a reload that changes a tag changes the
//! meta, and a device a reload removes has its retained meta cleared.

use std::time::Duration;

use edge_gateway::config::{Config, DeviceKind};
use gateway_tests::{Collector, GatewayRig, Received};
use protocols::model::TagMeta;

const WAIT: Duration = Duration::from_secs(20);
const SCAN: Duration = Duration::from_millis(50);

/// Sets what the first tag (`counter`, hr:0) of device `i` is.
fn describe_counter(config: &mut Config, i: usize, unit: &str) {
    let DeviceKind::Modbus(m) = &mut config.devices[i].kind else {
        panic!("the demo devices are Modbus devices");
    };
    std::sync::Arc::make_mut(&mut m.units[0].tags)[0].meta = TagMeta {
        unit: Some(unit.into()),
        description: Some("Strokes since the last reset".into()),
        min: Some(0.0),
        max: Some(65535.0),
    }
    .shared();
}

fn meta_of<'a>(metas: &'a [Received], device: &str) -> Option<&'a Received> {
    metas
        .iter()
        .rev()
        .find(|m| m.topic == format!("edge/gw-meta/{device}/meta"))
}

fn has_meta(metas: &[Received], device: &str, pred: impl Fn(&serde_json::Value) -> bool) -> bool {
    meta_of(metas, device).is_some_and(|m| pred(&m.doc))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_subscriber_gets_the_whole_catalog_at_once_from_the_retained_meta() {
    let mut rig = GatewayRig::new("gw-meta", 2, SCAN, None).await;
    describe_counter(&mut rig.config, 0, "strokes");
    let early = rig.collector().await;
    let gw = rig.start().await;
    // Once the early subscriber has both, the broker holds them.
    early
        .wait_for_meta(WAIT, "both devices' meta", |m| {
            meta_of(m, "press1").is_some() && meta_of(m, "press2").is_some()
        })
        .await;

    let late = rig.collector().await;
    late.wait_for_meta(WAIT, "the retained meta", |m| {
        meta_of(m, "press1").is_some() && meta_of(m, "press2").is_some()
    })
    .await;
    let metas = late.metas();
    let doc = &meta_of(&metas, "press1").unwrap().doc;
    assert_eq!(doc["gateway"], "gw-meta");
    assert_eq!(doc["device"], "press1");
    let tags = doc["tags"].as_array().unwrap();
    let names: Vec<&str> = tags.iter().map(|t| t["tag"].as_str().unwrap()).collect();
    let expected: Vec<&str> = edge_gateway::demo::DEMO_TAGS.iter().map(|t| t.0).collect();
    assert_eq!(names, expected, "every tag, in config order");
    assert_eq!(
        tags[0],
        serde_json::json!({
            "tag": "counter", "type": "u16", "unit": "strokes",
            "description": "Strokes since the last reset", "min": 0.0, "max": 65535.0,
            "source": "hr:0", "scan_interval_ms": 50
        })
    );
    assert_eq!(
        tags[1],
        serde_json::json!({"tag": "sine", "type": "f32", "source": "hr:1", "scan_interval_ms": 50}),
        "a tag the config does not describe has no unit, description or range"
    );
    let other = &meta_of(&metas, "press2").unwrap().doc;
    assert!(other["tags"][0].get("unit").is_none());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reload_that_changes_a_tag_the_meta_is_updated_and_a_removed_device_is_cleared() {
    let mut rig = GatewayRig::new("gw-meta", 2, SCAN, None).await;
    describe_counter(&mut rig.config, 0, "strokes");
    let sub = rig.collector().await;
    let mut gw = rig.start().await;
    sub.wait_for_meta(WAIT, "both devices' meta", |m| {
        meta_of(m, "press1").is_some() && meta_of(m, "press2").is_some()
    })
    .await;

    let mut next = rig.config.clone();
    describe_counter(&mut next, 0, "cycles");
    next.devices.truncate(1);
    gw.reload(next).await.unwrap();
    sub.wait_for_meta(WAIT, "press1's new meta", |m| {
        has_meta(m, "press1", |d| d["tags"][0]["unit"] == "cycles")
    })
    .await;
    sub.wait_for_meta(WAIT, "press2's meta cleared", |m| {
        has_meta(m, "press2", serde_json::Value::is_null)
    })
    .await;

    // A consumer that comes now learns the new catalog, and nothing of the removed device.
    let late = Collector::start(rig.broker.port(), &rig.filter()).await;
    late.wait_for_meta(WAIT, "the retained meta", |m| {
        meta_of(m, "press1").is_some()
    })
    .await;
    let metas = late.metas();
    assert_eq!(
        meta_of(&metas, "press1").unwrap().doc["tags"][0]["unit"],
        "cycles"
    );
    assert!(
        meta_of(&metas, "press2").is_none(),
        "the broker keeps no meta of a removed device"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_status_off_no_meta_goes_out_either() {
    // A broker that takes only the records' topic (Azure IoT Hub) is configured so.
    let mut rig = GatewayRig::new("gw-meta", 1, SCAN, None).await;
    rig.config.mqtt.status = false;
    let (sub, gw) = rig.start_live().await;
    // The meta would have gone out before the first record on the connection.
    assert!(sub.metas().is_empty(), "{:?}", sub.metas());
    assert!(sub.statuses().is_empty());
    gw.shutdown().await;
}
