use std::time::Instant;

use protocols::model::{DeviceId, Reason, TagId, TagMeta, Timestamp};

use super::*;

fn catalog() -> Catalog {
    let mut c = Catalog::default();
    c.add_device(
        "press7".into(),
        vec!["sine".into(), "count".into(), "txt".into()],
    );
    c.add_device("meters/meter1".into(), vec!["power".into()]);
    c
}

fn encoder() -> SparkplugEncoder {
    SparkplugEncoder::new(&Topics::new("plant", "edge-01"), 3, &catalog())
}

fn batch(device: u32, samples: Vec<Sample>) -> Batch {
    Batch {
        device: DeviceId(device),
        samples,
        read_at: Instant::now(),
    }
}

fn good(tag: u32, v: Value) -> Sample {
    Sample::good(TagId(tag), v, Timestamp(1_764_190_000_000 + i64::from(tag)))
}

#[test]
fn a_scan_becomes_ddata_on_the_device_topic_with_metrics_by_alias_and_no_seq() {
    let mut e = encoder();
    let r = e.encode(
        17,
        &batch(0, vec![good(0, Value::Float(0.5)), good(1, Value::Int(-2))]),
    );
    assert_eq!(&*r.topic, "spBv1.0/plant/DDATA/edge-01/press7");
    assert_eq!(r.flag_offset, SPARKPLUG_FLAG);
    let p = Payload::decode(&r.payload[..]).unwrap();
    assert_eq!(p.seq, None, "the session appends seq at send time");
    assert_eq!(
        p.uuid.as_deref(),
        Some("3:17"),
        "the gateway's boot and seq"
    );
    assert_eq!(p.timestamp, Some(1_764_190_000_001));
    assert_eq!(p.metrics.len(), 2);
    assert_eq!(p.metrics[0].name, None);
    assert_eq!(p.metrics[0].alias, Some(alias(0, 0)));
    assert_eq!(p.metrics[0].timestamp, Some(1_764_190_000_000));
    assert_eq!(p.metrics[0].value, Some(MetricValue::DoubleValue(0.5)));
    assert_eq!(
        p.metrics[1].value,
        Some(MetricValue::LongValue(-2i64 as u64))
    );
    assert_eq!(p.metrics[0].is_historical, None);
}

#[test]
fn a_unit_of_a_modbus_line_is_a_device_whose_id_has_no_slash() {
    let mut e = encoder();
    let r = e.encode(1, &batch(1, vec![good(0, Value::Float(1.0))]));
    assert_eq!(&*r.topic, "spBv1.0/plant/DDATA/edge-01/meters:meter1");
}

#[test]
fn aliases_are_unique_across_devices_and_apart_from_the_node_metrics() {
    assert_ne!(alias(0, 1), alias(1, 0));
    assert!(alias(0, 0) > 3);
}

#[test]
fn a_bad_sample_is_null_with_quality_0_and_an_uncertain_one_keeps_its_value_with_quality_500() {
    let mut e = encoder();
    let mut uncertain = good(1, Value::Int(4));
    uncertain.quality = Quality::Uncertain(Reason::Status(0x4000_0000));
    let r = e.encode(
        1,
        &batch(
            0,
            vec![
                Sample::bad(TagId(0), Reason::Timeout, Timestamp(5)),
                uncertain,
            ],
        ),
    );
    let p = Payload::decode(&r.payload[..]).unwrap();
    let bad = &p.metrics[0];
    assert_eq!(bad.is_null, Some(true));
    assert_eq!(bad.value, None);
    let props = bad.properties.as_ref().unwrap();
    assert_eq!(props.keys, ["Quality", "reason"]);
    assert_eq!(props.values[0].r#type, Some(datatype::INT32));
    assert_eq!(
        props.values[0].value,
        Some(PropertyValueValue::IntValue(QUALITY_BAD))
    );
    assert_eq!(
        props.values[1].value,
        Some(PropertyValueValue::StringValue("timeout".into()))
    );
    let unc = &p.metrics[1];
    assert_eq!(unc.is_null, None);
    assert_eq!(unc.value, Some(MetricValue::LongValue(4)));
    let props = unc.properties.as_ref().unwrap();
    assert_eq!(
        props.values[0].value,
        Some(PropertyValueValue::IntValue(QUALITY_STALE))
    );
}

#[test]
fn the_seq_appended_at_send_time_is_the_payloads_seq() {
    let mut e = encoder();
    let r = e.encode(1, &batch(0, vec![good(0, Value::Bool(true))]));
    for seq in [0u8, 127, 128, 255] {
        let p = Payload::decode(&with_seq(&r.payload, seq)[..]).unwrap();
        assert_eq!(p.seq, Some(u64::from(seq)));
        assert_eq!(p.metrics[0].value, Some(MetricValue::BooleanValue(true)));
    }
}

#[test]
fn a_replayed_record_has_every_metric_historical_with_its_original_timestamps() {
    let mut e = encoder();
    let r = e.encode(
        9,
        &batch(
            0,
            vec![good(0, Value::Float(2.0)), good(2, Value::Text("a".into()))],
        ),
    );
    let h = historical(&r.payload);
    let p = Payload::decode(&with_seq(&h, 4)[..]).unwrap();
    assert!(p.metrics.iter().all(|m| m.is_historical == Some(true)));
    assert_eq!(p.metrics[0].timestamp, Some(1_764_190_000_000));
    assert_eq!(p.metrics[1].timestamp, Some(1_764_190_000_002));
    assert_eq!(p.uuid.as_deref(), Some("3:9"));
    assert_eq!(p.seq, Some(4));
}

#[test]
fn a_device_is_born_at_its_first_answer_dies_after_its_first_silent_scan_and_makes_no_record_while_dead(
) {
    let mut e = encoder();
    let answer = batch(0, vec![good(0, Value::Float(1.0))]);
    let silent = batch(
        0,
        vec![Sample::bad(TagId(0), Reason::Timeout, Timestamp(1))],
    );
    let v = e.verdict(&answer);
    assert!(v.born && v.record && !v.died);
    let v = e.verdict(&answer);
    assert!(!v.born && v.record && !v.died);
    let v = e.verdict(&silent);
    assert!(
        !v.born && v.record && v.died,
        "its last scan goes out, then DDEATH"
    );
    let v = e.verdict(&silent);
    assert!(!v.born && !v.record && !v.died, "nothing while dead");
    let v = e.verdict(&answer);
    assert!(v.born && v.record && !v.died, "born again");
}

#[test]
fn a_device_silent_from_the_start_is_never_born_and_makes_no_record() {
    let mut e = encoder();
    let silent = batch(
        1,
        vec![Sample::bad(TagId(0), Reason::Timeout, Timestamp(1))],
    );
    assert_eq!(
        e.verdict(&silent),
        Verdict {
            born: false,
            record: false,
            died: false
        }
    );
}

#[test]
fn nbirth_carries_bd_seq_the_rebirth_control_and_the_boot_and_ndeath_the_same_bd_seq() {
    let p = Payload::decode(&nbirth(42, 3, 1000)[..]).unwrap();
    let names: Vec<_> = p.metrics.iter().map(|m| m.name.clone().unwrap()).collect();
    assert_eq!(names, [BD_SEQ, REBIRTH, BOOT]);
    assert_eq!(p.metrics[0].value, Some(MetricValue::LongValue(42)));
    assert_eq!(p.metrics[0].datatype, Some(datatype::INT64));
    assert_eq!(p.metrics[1].value, Some(MetricValue::BooleanValue(false)));
    let d = Payload::decode(&ndeath(42, 1000)[..]).unwrap();
    assert_eq!(d.seq, None, "NDEATH has no seq");
    assert_eq!(d.metrics[0].name.as_deref(), Some(BD_SEQ));
    assert_eq!(d.metrics[0].value, Some(MetricValue::LongValue(42)));
}

#[test]
fn dbirth_lists_every_metric_with_name_alias_datatype_value_and_quality() {
    let tags: Vec<Arc<str>> = vec!["sine".into(), "count".into(), "txt".into()];
    let latest = vec![
        Some(good(0, Value::Float(0.5))),
        Some(Sample::bad(TagId(1), Reason::Timeout, Timestamp(7))),
    ];
    let declared = [None, Some(datatype::UINT64), None];
    let meta = [
        TagMeta {
            unit: Some("m/s".into()),
            description: Some("Belt speed".into()),
            min: Some(0.0),
            max: Some(2.5),
        }
        .shared(),
        TagMeta::default().shared(),
    ];
    let p = Payload::decode(&dbirth(0, &tags, &declared, &meta, &latest, 99)[..]).unwrap();
    let props = p.metrics[0].properties.as_ref().unwrap();
    assert_eq!(
        props.keys,
        ["Quality", "engUnit", "engLow", "engHigh", "description"],
        "the configured unit, range and description as Sparkplug's properties"
    );
    assert_eq!(
        props.values[1].value,
        Some(PropertyValueValue::StringValue("m/s".into()))
    );
    assert_eq!(
        props.values[3].value,
        Some(PropertyValueValue::DoubleValue(2.5))
    );
    let keys = &p.metrics[1].properties.as_ref().unwrap().keys;
    assert_eq!(
        keys,
        &["Quality", "reason"],
        "nothing configured, nothing added"
    );
    assert_eq!(p.metrics.len(), 3, "every tag, also one never read");
    for (i, m) in p.metrics.iter().enumerate() {
        assert_eq!(m.name.as_deref(), Some(&*tags[i]));
        assert_eq!(m.alias, Some(alias(0, i as u32)));
        assert!(m.datatype.is_some());
        assert_eq!(m.properties.as_ref().unwrap().keys[0], "Quality");
    }
    assert_eq!(p.metrics[0].datatype, Some(datatype::DOUBLE));
    assert_eq!(p.metrics[0].value, Some(MetricValue::DoubleValue(0.5)));
    assert_eq!(
        p.metrics[0].properties.as_ref().unwrap().values[0].value,
        Some(PropertyValueValue::IntValue(QUALITY_GOOD))
    );
    assert_eq!(p.metrics[1].datatype, Some(datatype::UINT64), "declared");
    assert_eq!(p.metrics[1].is_null, Some(true));
    assert_eq!(p.metrics[2].is_null, Some(true), "never read");
    assert_eq!(
        p.metrics[2].properties.as_ref().unwrap().values[0].value,
        Some(PropertyValueValue::IntValue(QUALITY_BAD))
    );
}

#[test]
fn an_ncmd_asks_for_a_rebirth_only_with_rebirth_true_by_name_or_alias() {
    let ask = |name: Option<&str>, alias: Option<u64>, v: bool| {
        Payload {
            metrics: vec![Metric {
                name: name.map(Into::into),
                alias,
                value: Some(MetricValue::BooleanValue(v)),
                ..Metric::default()
            }],
            ..Payload::default()
        }
        .encode_to_vec()
    };
    assert!(node_command(&ask(Some(REBIRTH), None, true)).rebirth);
    assert!(node_command(&ask(None, Some(REBIRTH_ALIAS), true)).rebirth);
    assert!(!node_command(&ask(Some(REBIRTH), None, false)).rebirth);
    assert_eq!(node_command(b"\xff\xff garbage"), NodeCommand::default());
}

#[test]
fn an_ncmd_writing_any_other_node_metric_names_it_for_a_refusal() {
    let p = Payload {
        metrics: vec![
            Metric {
                name: Some("Node Control/Reboot".into()),
                value: Some(MetricValue::BooleanValue(true)),
                ..Metric::default()
            },
            Metric {
                alias: Some(1),
                value: Some(MetricValue::LongValue(9)),
                ..Metric::default()
            },
        ],
        ..Payload::default()
    }
    .encode_to_vec();
    let c = node_command(&p);
    assert!(!c.rebirth);
    assert_eq!(c.others, ["Node Control/Reboot", "alias 1"]);
}

#[test]
fn a_host_state_is_read_from_the_3_0_json_and_the_older_text() {
    let state = |online, timestamp| Some(HostState { online, timestamp });
    assert_eq!(
        host_state(br#"{"online":true,"timestamp":1}"#),
        state(true, Some(1))
    );
    assert_eq!(
        host_state(br#"{"online":false,"timestamp":1700000000000}"#),
        state(false, Some(1_700_000_000_000))
    );
    assert_eq!(host_state(b"ONLINE"), state(true, None));
    assert_eq!(host_state(b"OFFLINE"), state(false, None));
    assert_eq!(host_state(b"{"), None);
    assert_eq!(host_state(br#"{"online":"yes"}"#), None);
    assert_eq!(host_state(br#"{"timestamp":1}"#), None);
    assert_eq!(host_state(br#"{"online":true,"timestamp":-1}"#), None);
}
