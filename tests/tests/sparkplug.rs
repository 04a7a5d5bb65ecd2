//! Sparkplug B end to end: the gateway as an edge node on the embedded broker (reached through
//! a fault-injecting proxy), with a host's subscriber that decodes every message and checks the
//! Sparkplug 3.0 rules message by message (`gateway_tests::sparkplug::check_session`), and that
//! the gateway's own (boot, seq), carried in each DDATA's `uuid`, has no hole.

use std::time::Duration;

use edge_gateway::config::{Format, SparkplugSettings};
use edge_gateway::metrics::Metrics;
use edge_gateway::pipeline::Running;
use gateway_tests::sparkplug::{check_session, SpCollector, SpMessage};
use gateway_tests::{drained, GatewayRig};

const GROUP: &str = "plant";
const SCAN: Duration = Duration::from_millis(50);
const WAIT: Duration = Duration::from_secs(20);

async fn rig(node: &str, primary_host: Option<&str>) -> GatewayRig {
    rig_of(node, 2, primary_host).await
}

/// An edge node of `devices` simulated devices.
async fn rig_of(node: &str, devices: usize, primary_host: Option<&str>) -> GatewayRig {
    let mut rig = GatewayRig::new(node, devices, SCAN, None).await;
    rig.config.mqtt.format = Format::SparkplugB;
    rig.config.mqtt.sparkplug = Some(SparkplugSettings {
        group_id: GROUP.into(),
        edge_node_id: node.into(),
        primary_host_id: primary_host.map(Into::into),
    });
    rig
}

fn count(msgs: &[SpMessage], kind: &str) -> usize {
    msgs.iter().filter(|m| m.kind == kind).count()
}

/// Waits until every record made so far arrived, shuts the gateway down, waits for its NDEATH
/// and checks the whole session; returns the report and the records made.
/// The distinct gateway seqs of `boot` among the DDATA received.
fn seqs_of(msgs: &[SpMessage], boot: u64) -> std::collections::BTreeSet<u64> {
    msgs.iter()
        .filter_map(SpMessage::record_id)
        .filter(|(b, _)| *b == boot)
        .map(|(_, s)| s)
        .collect()
}

async fn finish(gw: Running, sub: &SpCollector) -> (gateway_tests::sparkplug::SessionReport, u64) {
    let created = drained(&gw, WAIT).await;
    let boot = gw.boot;
    sub.wait_for(WAIT, "every record", |m| {
        seqs_of(m, boot).len() as u64 >= created
    })
    .await;
    let deaths = count(&sub.messages(), "NDEATH");
    gw.shutdown().await;
    sub.wait_for(WAIT, "the NDEATH of the shutdown", |m| {
        count(m, "NDEATH") > deaths
    })
    .await;
    let report = check_session(&sub.messages()).unwrap_or_else(|e| panic!("{e}"));
    let seqs = report.contiguous(boot);
    assert_eq!(seqs.first(), Some(&0), "the boot's records from seq 0");
    assert!(
        seqs.len() as u64 >= created,
        "{} of {created} records arrived",
        seqs.len()
    );
    (report, created)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_nbirth_then_a_dbirth_per_device_then_ddata_by_alias_and_a_clean_shutdown_ends_it_with_ndeath(
) {
    let rig = rig("sp-normal", None).await;
    let sub = SpCollector::start(rig.broker.port()).await;
    let gw = rig.start().await;
    sub.wait_for(WAIT, "data from both devices", |m| count(m, "DDATA") >= 20)
        .await;
    let msgs = sub.messages();
    assert_eq!(msgs[0].kind, "NBIRTH", "the NBIRTH comes first");
    let dbirths: Vec<&SpMessage> = msgs.iter().filter(|m| m.kind == "DBIRTH").collect();
    assert_eq!(dbirths.len(), 2, "one DBIRTH per device");
    let tags = rig.config.devices[0].tag_count();
    assert_eq!(
        dbirths[0].payload.metrics.len(),
        tags,
        "every tag in the DBIRTH"
    );
    assert_eq!(dbirths[0].topic, "spBv1.0/plant/DBIRTH/sp-normal/press1");
    let (report, _) = finish(gw, &sub).await;
    assert_eq!(report.nbirths.len(), 1);
    assert_eq!(
        report.ndeaths, report.nbirths,
        "the NDEATH names the session's bdSeq"
    );
    // The gateway's own NDEATH, not the will made at connect time: it is younger than the data.
    let msgs = sub.messages();
    let last_data = msgs
        .iter()
        .filter(|m| m.kind == "DDATA")
        .filter_map(|m| m.payload.timestamp)
        .max();
    let death = msgs
        .iter()
        .find(|m| m.kind == "NDEATH")
        .and_then(|m| m.payload.timestamp);
    assert!(
        death >= last_data,
        "NDEATH published at shutdown ({death:?}), after the data ({last_data:?})"
    );
    assert_eq!(report.historical, 0, "nothing historical without an outage");
    assert!(
        rig.config.gateway.data_dir.join("sparkplug_bdseq").exists(),
        "bdSeq is kept in the data directory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebirth_request_is_answered_with_an_nbirth_with_seq_0_and_every_dbirth_again() {
    let rig = rig("sp-rebirth", None).await;
    let sub = SpCollector::start(rig.broker.port()).await;
    let gw = rig.start().await;
    sub.wait_for(WAIT, "data", |m| count(m, "DDATA") >= 10)
        .await;
    sub.request_rebirth(GROUP, "sp-rebirth").await;
    sub.wait_for(WAIT, "the rebirth and data after it", |m| {
        count(m, "NBIRTH") == 2
            && count(m, "DBIRTH") == 4
            && m.iter()
                .rev()
                .take_while(|x| x.kind != "NBIRTH")
                .any(|x| x.kind == "DDATA")
    })
    .await;
    let (report, _) = finish(gw, &sub).await;
    assert_eq!(
        report.nbirths[0], report.nbirths[1],
        "a rebirth keeps the connection's bdSeq"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_is_announced_by_the_will_and_the_next_session_steps_bd_seq_with_nothing_lost(
) {
    let rig = rig("sp-cut", None).await;
    let sub = SpCollector::start(rig.broker.port()).await;
    let gw = rig.start().await;
    sub.wait_for(WAIT, "data", |m| count(m, "DDATA") >= 10)
        .await;
    rig.proxy.cut();
    sub.wait_for(WAIT, "the will (NDEATH)", |m| count(m, "NDEATH") == 1)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    rig.proxy.restore();
    sub.wait_for(WAIT, "a new session with data", |m| {
        count(m, "NBIRTH") == 2
            && m.iter()
                .rev()
                .take_while(|x| x.kind != "NBIRTH")
                .any(|x| x.kind == "DDATA")
    })
    .await;
    let (report, _) = finish(gw, &sub).await;
    assert_eq!(report.nbirths.len(), 2);
    assert_eq!(
        report.ndeaths[0], report.nbirths[0],
        "the will names the first session"
    );
    // One step per CONNECT: the attempts the proxy refused took theirs too.
    assert!(
        report.nbirths[1] > report.nbirths[0],
        "bdSeq steps on a new connection: {:?}",
        report.nbirths
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stops_answering_gets_a_ddeath_and_a_dbirth_when_it_answers_again() {
    let mut rig = rig("sp-device", None).await;
    let sub = SpCollector::start(rig.broker.port()).await;
    let gw = rig.start().await;
    sub.wait_for(WAIT, "data", |m| count(m, "DDATA") >= 10)
        .await;
    rig.stop_sim(1).await;
    sub.wait_for(WAIT, "the DDEATH of press2", |m| {
        m.iter()
            .any(|x| x.kind == "DDEATH" && x.device.as_deref() == Some("press2"))
    })
    .await;
    rig.restart_sim(1).await;
    sub.wait_for(WAIT, "press2 born again, with data", |m| {
        let after: Vec<_> = m
            .iter()
            .skip_while(|x| x.kind != "DDEATH")
            .filter(|x| x.device.as_deref() == Some("press2"))
            .collect();
        after.iter().any(|x| x.kind == "DBIRTH") && after.iter().any(|x| x.kind == "DDATA")
    })
    .await;
    let (report, _) = finish(gw, &sub).await;
    assert_eq!(report.ddeaths, 1);
    assert_eq!(report.dbirths, 3, "press1 once, press2 twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_primary_host_data_goes_out_only_while_its_state_is_online_and_waits_in_the_buffer_meanwhile(
) {
    let rig = rig("sp-host", Some("scada")).await;
    let sub = SpCollector::start(rig.broker.port()).await;
    sub.host_state("scada", false).await;
    let gw = rig.start().await;
    // Records are made, and wait.
    gateway_tests::eventually(WAIT, "records on disk", || {
        Metrics::get(&gw.metrics.committed) >= 10
    })
    .await;
    assert!(
        sub.messages().is_empty(),
        "nothing before the host is online: {:?}",
        sub.messages()
    );
    sub.host_state("scada", true).await;
    sub.wait_for(WAIT, "births and historical data", |m| {
        count(m, "NBIRTH") == 1 && m.iter().any(SpMessage::historical)
    })
    .await;
    // A late will of the host's earlier session (older timestamp) ends nothing.
    let an_hour_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        - 3_600_000;
    sub.host_state_at("scada", false, an_hour_ago).await;
    let data = count(&sub.messages(), "DDATA");
    sub.wait_for(WAIT, "data going on after the stale offline STATE", |m| {
        count(m, "DDATA") >= data + 20
    })
    .await;
    assert_eq!(
        count(&sub.messages(), "NDEATH"),
        0,
        "the stale STATE ended the session"
    );
    sub.host_state("scada", false).await;
    sub.wait_for(WAIT, "the NDEATH when the host went offline", |m| {
        count(m, "NDEATH") == 1
    })
    .await;
    let committed = Metrics::get(&gw.metrics.committed);
    gateway_tests::eventually(WAIT, "records on disk while the host is offline", || {
        Metrics::get(&gw.metrics.committed) >= committed + 10
    })
    .await;
    assert_eq!(
        count(&sub.messages(), "NBIRTH"),
        1,
        "no new session while the host is offline"
    );
    sub.host_state("scada", true).await;
    sub.wait_for(WAIT, "a new session", |m| count(m, "NBIRTH") == 2)
        .await;
    let (report, _) = finish(gw, &sub).await;
    assert!(
        report.nbirths[1] > report.nbirths[0],
        "a new connection, a new bdSeq"
    );
    assert!(report.historical > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_replayed_after_the_new_births_as_historical_ddata_oldest_first_with_nothing_lost(
) {
    let rig = rig("sp-outage", None).await;
    let sub = SpCollector::start(rig.broker.port()).await;
    let gw = rig.start().await;
    sub.wait_for(WAIT, "data", |m| count(m, "DDATA") >= 10)
        .await;
    rig.cut_until_committed(&gw, 20, "the outage's records on disk")
        .await;
    let before = sub.messages().len();
    rig.proxy.restore();
    sub.wait_for(WAIT, "historical data after the new births", |m| {
        m[before..].iter().any(SpMessage::historical)
    })
    .await;
    let msgs = sub.messages();
    let second = &msgs[before..];
    let nbirth = second
        .iter()
        .position(|m| m.kind == "NBIRTH")
        .expect("a new NBIRTH");
    let first_data = second.iter().position(|m| m.kind == "DDATA").expect("data");
    assert!(nbirth < first_data, "the births go before the backlog");
    // The replay runs oldest first: the historical records of one device come in seq order.
    let replayed: Vec<u64> = second
        .iter()
        .filter(|m| m.historical() && m.device.as_deref() == Some("press1"))
        .filter_map(|m| m.record_id().map(|(_, s)| s))
        .collect();
    let mut sorted = replayed.clone();
    sorted.sort_unstable();
    assert_eq!(replayed, sorted, "historical records oldest first");
    let h = second.iter().find(|m| m.historical()).unwrap();
    assert!(
        h.payload
            .metrics
            .iter()
            .all(|m| m
                .timestamp
                .is_some_and(|t| t < h.payload.timestamp.unwrap_or(0) + 1)),
        "original timestamps"
    );
    // Every record of the outage arrived (no hole in the gateway's seqs), some historical.
    let (report, _) = finish(gw, &sub).await;
    assert!(report.historical > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_died_during_an_outage_is_born_for_its_historical_data_and_dies_again_after_it(
) {
    let mut rig = rig("sp-dead", None).await;
    let sub = SpCollector::start(rig.broker.port()).await;
    let gw = rig.start().await;
    sub.wait_for(WAIT, "data of both devices", |m| {
        ["press1", "press2"].iter().all(|d| {
            m.iter()
                .any(|x| x.kind == "DDATA" && x.device.as_deref() == Some(*d))
        })
    })
    .await;
    rig.cut_until_committed(&gw, 20, "press2's outage records on disk")
        .await;
    rig.stop_sim(1).await;
    let press2 = gw.devices[1].status.clone();
    gateway_tests::eventually(WAIT, "press2 gone", || !press2.is_connected()).await;
    let before = sub.messages().len();
    rig.proxy.restore();
    sub.wait_for(WAIT, "press2's history, then its DDEATH", |m| {
        let second = &m[before.min(m.len())..];
        second
            .iter()
            .any(|x| x.historical() && x.device.as_deref() == Some("press2"))
            && second
                .iter()
                .any(|x| x.kind == "DDEATH" && x.device.as_deref() == Some("press2"))
    })
    .await;
    let msgs = sub.messages();
    let second: Vec<_> = msgs[before..]
        .iter()
        .filter(|x| x.device.as_deref() == Some("press2"))
        .collect();
    let kinds: Vec<&str> = second.iter().map(|x| x.kind.as_str()).collect();
    let position = |kind: &str| kinds.iter().position(|k| *k == kind);
    let birth = position("DBIRTH").expect("a DBIRTH of press2 in the new session");
    let first_data = position("DDATA").expect("press2's history");
    let death = kinds
        .iter()
        .rposition(|k| *k == "DDEATH")
        .expect("a DDEATH");
    assert!(
        birth < first_data && first_data < death,
        "press2 in the new session: DBIRTH, its historical DDATA, DDEATH; got {kinds:?}"
    );
    // Between them: its history, then the scan with which it stopped (every tag bad). The
    // last scans before the stop may be live rather than historical: made during the outage,
    // they were still in memory (not yet committed) when the connection came back. Nothing
    // with values may follow the stopping scan.
    let stopped = |x: &SpMessage| x.payload.metrics.iter().all(|m| m.is_null == Some(true));
    let between = &second[first_data..death];
    let stop = between
        .iter()
        .position(|x| x.kind == "DDATA" && stopped(x))
        .expect("the scan with which press2 stopped");
    let after: Vec<_> = between[stop..]
        .iter()
        .filter(|x| x.kind == "DDATA" && !stopped(x))
        .map(|x| (x.record_id(), x.payload.metrics.clone()))
        .collect();
    assert!(
        after.is_empty(),
        "no values of press2 after the scan with which it stopped: {after:?}"
    );
    // The whole run by the Sparkplug rules, with no hole in the gateway's seqs.
    let (report, _) = finish(gw, &sub).await;
    assert!(report.historical > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn births_of_more_devices_than_the_client_has_spare_places_never_stall_the_backlog_behind_them(
) {
    // 12 births after the CONNACK, a backlog of far more than a small window: the births and
    // the records together overflow what the MQTT client's request channel holds beyond the
    // window, so the publisher must pace its own messages rather than wait on the channel
    // (which only its own loop drains).
    let mut rig = rig_of("sp-many", 12, None).await;
    rig.config.mqtt.max_inflight = 16;
    let sub = SpCollector::start(rig.broker.port()).await;
    let gw = rig.start().await;
    sub.wait_for(WAIT, "data", |m| count(m, "DDATA") >= 20)
        .await;
    rig.cut_until_committed(&gw, 200, "a backlog on disk").await;
    rig.proxy.restore();
    let (report, _) = finish(gw, &sub).await;
    assert!(report.historical > 0);
    assert!(report.dbirths >= 24, "every device born in both sessions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_ends_the_session_and_the_next_one_is_born_with_the_next_bd_seq_with_nothing_lost(
) {
    use gateway_tests::mosquitto::Mosquitto;
    let mut broker = Mosquitto::builder().allow_anonymous(true).start().await;
    let mut rig = GatewayRig::new("sp-restart", 2, SCAN, Some(broker.addr())).await;
    rig.config.mqtt.format = Format::SparkplugB;
    rig.config.mqtt.sparkplug = Some(SparkplugSettings {
        group_id: GROUP.into(),
        edge_node_id: "sp-restart".into(),
        primary_host_id: None,
    });
    rig.config.mqtt.backoff_max = Duration::from_secs(1);
    let before = SpCollector::start(broker.port()).await;
    let gw = rig.start().await;
    before
        .wait_for(WAIT, "data", |m| count(m, "DDATA") >= 10)
        .await;

    // The broker restarts without persistence: it forgets every session and subscription.
    // The gateway is kept away until the new host listens, so the host sees the whole new
    // session from its NBIRTH.
    rig.proxy.cut();
    broker.restart().await;
    let after = SpCollector::start(broker.port()).await;
    rig.proxy.restore();
    after
        .wait_for(WAIT, "a new session's data", |m| count(m, "DDATA") >= 10)
        .await;
    let created = drained(&gw, WAIT).await;
    let boot = gw.boot;
    after
        .wait_for(WAIT, "every record", |m| {
            let mut all = before.messages();
            all.extend_from_slice(m);
            seqs_of(&all, boot).len() as u64 >= created
        })
        .await;
    gw.shutdown().await;

    let first = check_session(&before.messages()).unwrap_or_else(|e| panic!("{e}"));
    let second = check_session(&after.messages()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(second.nbirths.len(), 1, "one new session");
    assert!(
        second.nbirths[0] > first.nbirths[0],
        "bdSeq steps: {:?} then {:?}",
        first.nbirths,
        second.nbirths
    );
    assert!(second.dbirths >= 2, "every device born again");
    let mut records = first.records;
    records.extend(second.records);
    let report = gateway_tests::sparkplug::SessionReport {
        records,
        ..Default::default()
    };
    let seqs = report.contiguous(boot);
    assert_eq!(seqs.first(), Some(&0));
    assert!(seqs.len() as u64 >= created, "{} of {created}", seqs.len());
}
