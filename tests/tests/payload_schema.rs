//! The published payload schema (`edge-gateway schema --payload`, `docs/payload.schema.json`)
//! holds for what a running gateway really sends: records with good and bad samples, the meta
//! messages, and the status online and offline.

use std::time::Duration;

use edge_gateway::encode::schema::payload_schema;
use gateway_tests::{GatewayRig, Received};

const WAIT: Duration = Duration::from_secs(20);

fn validator(def: &str) -> jsonschema::Validator {
    let mut schema = payload_schema();
    schema["$ref"] = serde_json::json!(format!("#/$defs/{def}"));
    schema.as_object_mut().unwrap().remove("oneOf");
    jsonschema::validator_for(&schema).unwrap()
}

fn assert_valid(def: &str, messages: &[Received]) {
    let specific = validator(def);
    let any = jsonschema::validator_for(&payload_schema()).unwrap();
    for m in messages {
        let errors: Vec<String> = specific
            .iter_errors(&m.doc)
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "{} on {}: {errors:?}\n{}",
            def,
            m.topic,
            m.doc
        );
        assert!(
            any.is_valid(&m.doc),
            "the whole document accepts it: {}",
            m.doc
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_meta_and_status_of_a_running_gateway_match_the_published_schema() {
    let mut rig = GatewayRig::new("gw-schema", 2, Duration::from_millis(50), None).await;
    let DeviceKindModbus(m) = modbus(&mut rig.config);
    let mut tags = m.units[0].tags.to_vec();
    let meta = std::sync::Arc::make_mut(&mut tags[1].meta);
    meta.unit = Some("bar".into());
    meta.min = Some(-1.5);
    m.units[0].tags = tags.into();
    let (sub, mut gw) = rig.start_live().await;
    // A device that stops answering gives bad samples with a reason.
    rig.stop_sim(1).await;
    sub.wait_for(WAIT, "bad samples", |msgs| {
        msgs.iter().any(|r| r.doc["samples"][0]["quality"] == "bad")
    })
    .await;
    sub.wait_for_meta(WAIT, "both metas", |m| m.len() >= 2)
        .await;
    let _ = &mut gw;
    gw.shutdown().await;
    sub.wait_for_status(WAIT, "offline", |s| {
        s.iter().any(|m| m.doc["state"] == "offline")
    })
    .await;

    let records = sub.messages();
    assert!(records.len() > 10);
    assert_valid("record", &records);
    assert_valid("meta", &sub.metas());
    assert_valid("status", &sub.statuses());

    // The schema is no blank cheque: a record without its seq is refused.
    let mut broken = records[0].doc.clone();
    broken.as_object_mut().unwrap().remove("seq");
    assert!(!validator("record").is_valid(&broken));
}

struct DeviceKindModbus<'a>(&'a mut protocols::modbus::ModbusSettings);

fn modbus(config: &mut edge_gateway::config::Config) -> DeviceKindModbus<'_> {
    match &mut config.devices[0].kind {
        edge_gateway::config::DeviceKind::Modbus(m) => DeviceKindModbus(m),
        edge_gateway::config::DeviceKind::OpcUa(_) => panic!("the demo devices are Modbus"),
    }
}
