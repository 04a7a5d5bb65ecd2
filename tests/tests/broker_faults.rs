//! Broker faults between the gateway and its broker: a refused CONNECT, PUBACKs that never come,
//! connections cut mid-packet, a broker restart, a slow broker. Each test checks that nothing is
//! lost (every seq of the boot arrives, no hole, a duplicate only ever as an identical re-send)
//! and, where records wait, that they wait on disk rather than in memory.
//!
//! The gateway reaches the embedded rumqttd broker through a fault-injecting [`Proxy`]; the
//! subscriber that audits what arrived connects to the broker directly.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use edge_gateway::config::Config;
use edge_gateway::demo::broker;
use edge_gateway::metrics::Metrics;
use edge_gateway::pipeline::Running;
use gateway_tests::{
    assert_resends_identical, contiguous_len, contiguous_seqs, drained, eventually,
    refusing_broker, rule_breaking_broker, session_present_broker, Collector, GatewayRig,
    Misbehaviour, Received,
};

/// Simulated devices, each scanned every `SCAN`: one record per device and scan.
const DEVICES: usize = 2;
const SCAN: Duration = Duration::from_millis(50);

/// Records the writer makes per commit interval.
fn records_per_commit_interval(config: &Config) -> u64 {
    DEVICES as u64 * (config.buffer.commit_interval.as_millis() / SCAN.as_millis()).max(1) as u64
}

/// Records created and not committed may grow by at most this many while nothing is
/// acknowledged in time: ten commit intervals' worth (slack for a loaded machine's fsyncs).
fn memory_bound(config: &Config) -> u64 {
    10 * records_per_commit_interval(config)
}

/// Records created but not committed: those held in memory only, plus those acknowledged before
/// they had to be committed. Its growth while PUBACKs are late bounds what piles up in memory.
fn not_committed(m: &Metrics) -> u64 {
    Metrics::get(&m.records).saturating_sub(Metrics::get(&m.committed))
}

/// The gateway's peers: `DEVICES` demo devices, and a proxy to `upstream` (the broker if `None`).
async fn rig(upstream: Option<SocketAddr>) -> GatewayRig {
    GatewayRig::new("gw-faults", DEVICES, SCAN, upstream).await
}

fn all_messages(subs: &[&Collector]) -> Vec<Received> {
    subs.iter().flat_map(|s| s.messages()).collect()
}

/// No loss and no corruption: boot 1's seqs from 0 cover at least `created` with no hole, every
/// payload parsed, and each duplicate is the same record again (only `historical` may differ).
fn assert_no_loss(msgs: &[Received], created: u64) {
    let seqs = contiguous_seqs(msgs, 1);
    assert_eq!(seqs.first(), Some(&0), "boot 1 starts at seq 0");
    assert!(
        seqs.len() as u64 >= created,
        "{} distinct seqs arrived, {created} were created",
        seqs.len()
    );
    assert_resends_identical(msgs);
}

/// Waits until the backlog has drained and every record created so far arrived at `subs`, shuts
/// the gateway down and audits everything received.
async fn drain_and_audit(gw: Running, subs: &[&Collector]) {
    let created = drained(&gw, Duration::from_secs(20)).await;
    // A record that never comes fails the audit below, which names the hole.
    let deadline = Instant::now() + Duration::from_secs(20);
    while contiguous_len(&all_messages(subs), 1) < created && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.shutdown().await;
    assert_no_loss(&all_messages(subs), created);
    for s in subs {
        assert_eq!(s.garbled(), 0, "every payload received parses");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_is_retried_with_growing_delays_and_nothing_is_lost_once_accepted() {
    let (refusing_addr, refusing) = refusing_broker(5).await;
    let rig = rig(Some(refusing_addr)).await;
    let sub = rig.collector().await;
    let gw = rig.start().await;
    let m = gw.metrics.clone();

    // Refused (5: not authorized) for a while: the gateway scans into the buffer and retries.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let times = refusing.attempt_times();
    assert!(times.len() >= 3, "refused CONNECTs are retried: {times:?}");
    // Delays of 100 ms doubling up to 15 s make ~6 attempts in 4 s; a hot loop makes thousands.
    assert!(
        times.len() <= 12,
        "{} CONNECTs in 4 s: the retries do not back off",
        times.len()
    );
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let (first, last) = (gaps[0], gaps[gaps.len() - 1]);
    assert!(
        last >= first * 2,
        "the delay between refused attempts grows: {gaps:?}"
    );
    assert_eq!(Metrics::get(&m.mqtt_connects), 0);
    assert!(!m.mqtt_connected.load(Ordering::Relaxed));
    assert!(!gw.buffer.is_empty(), "the backlog is on disk");
    let waiting = not_committed(&m);
    assert!(
        waiting <= memory_bound(&rig.config),
        "{waiting} records wait in memory only, not on disk"
    );

    // The broker accepts again (credentials fixed, say): the next attempt gets through.
    rig.proxy.repoint(rig.broker.addr());
    drain_and_audit(gw, &[&sub]).await;
    assert_eq!(Metrics::get(&m.mqtt_connects), 1);
    assert!(
        sub.messages().iter().any(Received::historical),
        "what waited out the refusal comes flagged historical"
    );
}

/// A broker that answers a clean-session CONNECT with "session present" (MQTT forbids it) may
/// hold anything of an old session; rumqttc then re-sends its own leftovers first, with old
/// packet ids, which shifts the window's mapping of acknowledgements to records. Such a CONNACK
/// is a protocol error: nothing is published on it, so nothing is credited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connack_claiming_a_session_is_refused_and_nothing_is_credited_until_a_sound_broker() {
    let (lying_addr, lying) = session_present_broker().await;
    let rig = rig(Some(lying_addr)).await;
    let sub = rig.collector().await;
    let gw = rig.start().await;
    let m = gw.metrics.clone();

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(lying.attempts() >= 2, "the gateway keeps trying");
    assert_eq!(
        lying.publishes(),
        0,
        "nothing is published on such a connection"
    );
    assert_eq!(Metrics::get(&m.acked), 0, "nothing is taken as delivered");
    assert_eq!(Metrics::get(&m.mqtt_connects), 0);
    assert!(!m.mqtt_connected.load(Ordering::Relaxed));

    // A sound broker again: everything arrives.
    rig.proxy.repoint(rig.broker.addr());
    drain_and_audit(gw, &[&sub]).await;
}

/// A broker that accepts the CONNECT and then breaks the protocol: the gateway keeps running,
/// takes nothing as delivered that a sound broker did not acknowledge, and everything arrives
/// once it talks to a sound broker again.
async fn a_rule_breaking_broker_costs_nothing(how: Misbehaviour) {
    let (bad_addr, bad) = rule_breaking_broker(how).await;
    let rig = rig(Some(bad_addr)).await;
    let sub = rig.collector().await;
    let gw = rig.start().await;
    let m = gw.metrics.clone();

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(bad.attempts() >= 1, "{how:?}: the gateway connected");
    assert_eq!(
        Metrics::get(&m.acked),
        0,
        "{how:?}: nothing taken as delivered"
    );

    // A sound broker from now on; a connection still open to the bad one is cut.
    rig.proxy.repoint(rig.broker.addr());
    rig.proxy.cut();
    rig.proxy.restore();
    drain_and_audit(gw, &[&sub]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubacks_for_packet_ids_never_used_credit_nothing() {
    a_rule_breaking_broker_costs_nothing(Misbehaviour::AcksUnknownPacketIds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_the_connack_costs_a_reconnect_and_nothing_else() {
    a_rule_breaking_broker_costs_nothing(Misbehaviour::SendsGarbage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_announced_packet_costs_a_reconnect_and_nothing_else() {
    a_rule_breaking_broker_costs_nothing(Misbehaviour::AnnouncesAHugePacket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pubacks_the_publisher_times_the_window_out_reconnects_and_resends_everything() {
    let mut rig = rig(None).await;
    let ack_timeout = Duration::from_secs(1);
    rig.config.mqtt.ack_timeout = ack_timeout;
    let (sub, gw) = rig.start_live().await;
    let m = gw.metrics.clone();
    let connects = Metrics::get(&m.mqtt_connects);

    // Publishes reach the broker; its PUBACKs never reach the gateway, TCP stays up.
    rig.proxy.drop_downstream();
    let received_before = sub.messages().len();
    eventually(
        Duration::from_secs(10),
        "a reconnect after the ack timeout",
        || Metrics::get(&m.mqtt_connects) > connects,
    )
    .await;
    let started = Instant::now();
    let acked = Metrics::get(&m.acked);
    let waiting = not_committed(&m);
    eventually(
        Duration::from_secs(10),
        "two more windows timed out",
        || Metrics::get(&m.mqtt_connects) >= connects + 3,
    )
    .await;
    let reconnects = Metrics::get(&m.mqtt_connects) - connects;
    let phase = started.elapsed();
    assert_eq!(
        Metrics::get(&m.acked),
        acked,
        "no PUBACK gets through the proxy"
    );
    // One reconnect per timed-out window (checked every 500 ms), not a hot loop.
    let at_most = 2 + (phase.as_secs_f64() / ack_timeout.as_secs_f64()).ceil() as u64;
    assert!(
        reconnects <= at_most,
        "{reconnects} reconnects in {phase:?} with a {ack_timeout:?} ack timeout"
    );
    let grown = not_committed(&m).saturating_sub(waiting);
    assert!(
        grown <= memory_bound(&rig.config),
        "{grown} more records wait in memory only"
    );
    assert!(!gw.buffer.is_empty(), "unacknowledged records go to disk");
    let during: Vec<u64> = sub.messages()[received_before..]
        .iter()
        .map(Received::seq)
        .collect();
    let distinct: BTreeSet<u64> = during.iter().copied().collect();
    assert!(
        distinct.len() < during.len(),
        "records the broker never acknowledged are sent again"
    );

    rig.proxy.restore();
    drain_and_audit(gw, &[&sub]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_packet_again_and_again_lose_nothing_and_corrupt_nothing() {
    let rig = rig(None).await;
    let (sub, gw) = rig.start_live().await;
    let m = gw.metrics.clone();
    let connects = Metrics::get(&m.mqtt_connects);

    // Every connection carries a CONNECT and a few publishes, then is cut inside the next one.
    rig.proxy.cut_after_bytes(2_000);
    eventually(
        Duration::from_secs(15),
        "connections cut mid-packet",
        || rig.proxy.cuts_mid_packet() >= 6,
    )
    .await;
    assert!(
        Metrics::get(&m.mqtt_connects) >= connects + 5,
        "the gateway reconnects after each cut"
    );
    assert!(
        Metrics::get(&m.acked) > 10,
        "publishes that got through whole are acknowledged"
    );

    rig.proxy.restore();
    drain_and_audit(gw, &[&sub]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_nothing_and_what_it_never_acknowledged_is_sent_again() {
    let rig = rig(None).await;
    let before_restart = rig.collector().await;
    let gw = rig.start().await;
    let m = gw.metrics.clone();
    before_restart
        .wait_for(Duration::from_secs(10), "live records", |m| m.len() >= 10)
        .await;

    // The broker takes publishes but dies before its PUBACKs leave.
    rig.proxy.drop_downstream();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let from = before_restart.messages().len();
    before_restart
        .wait_for(
            Duration::from_secs(10),
            "publishes the broker never acknowledges",
            |m| m.len() >= from + 15,
        )
        .await;
    // rumqttd has no stop: a restart is its connections dropping, the port refusing, and a new
    // broker without the old one's state taking the address (the proxy's upstream).
    rig.proxy.cut();
    let unacknowledged: BTreeSet<u64> = before_restart.messages()[from..]
        .iter()
        .map(Received::seq)
        .collect();
    let restarted = broker::start(16 << 20).unwrap();
    let after_restart = Collector::start(restarted.port(), &rig.filter()).await;
    let connects = Metrics::get(&m.mqtt_connects);
    rig.proxy.repoint(restarted.addr());
    rig.proxy.restore();

    drain_and_audit(gw, &[&before_restart, &after_restart]).await;
    assert!(Metrics::get(&m.mqtt_connects) > connects, "reconnected");
    let resent: BTreeSet<u64> = after_restart.messages().iter().map(Received::seq).collect();
    let missing: Vec<u64> = unacknowledged.difference(&resent).copied().collect();
    assert!(
        missing.is_empty(),
        "published to the old broker, never acknowledged, not sent to the new one: {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_broker_gets_everything_while_the_backlog_waits_on_disk_not_in_memory() {
    let mut rig = rig(None).await;
    // A small window, so the publisher's live queue (four windows) holds less than the backlog.
    rig.config.mqtt.max_inflight = 16;
    let (sub, gw) = rig.start_live().await;
    let m = gw.metrics.clone();
    let connects = Metrics::get(&m.mqtt_connects);

    // About a quarter of what the devices produce gets through.
    rig.proxy.throttle(8_000);
    eventually(Duration::from_secs(10), "a backlog on disk", || {
        gw.buffer.len() >= 20
    })
    .await;
    let acked = Metrics::get(&m.acked);
    let waiting = not_committed(&m);
    let mut grown = 0;
    let mut backlog = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        grown = grown.max(not_committed(&m).saturating_sub(waiting));
        backlog = backlog.max(gw.buffer.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        grown <= memory_bound(&rig.config),
        "{grown} more records wait in memory only while the broker is slow"
    );
    assert!(
        Metrics::get(&m.acked) > acked,
        "the slow broker still acknowledges"
    );
    assert!(
        backlog >= 40,
        "the backlog grows on disk: {backlog} records at most"
    );
    assert_eq!(
        Metrics::get(&m.mqtt_connects),
        connects,
        "a slow broker is not a dead link"
    );

    rig.proxy.restore();
    drain_and_audit(gw, &[&sub]).await;
    assert!(Metrics::get(&m.replayed) > 0, "the backlog came from disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_broker_that_keeps_acknowledging_is_not_taken_for_a_dead_link() {
    let mut rig = rig(None).await;
    // The link drains a full window (256 records) in ~25 s, far beyond the ack timeout, but a
    // PUBACK comes back every ~100 ms: the link is slow, not dead.
    rig.config.mqtt.ack_timeout = Duration::from_secs(2);
    let (sub, gw) = rig.start_live().await;
    let m = gw.metrics.clone();
    let connects = Metrics::get(&m.mqtt_connects);
    rig.proxy.throttle(8_000);
    let started = Instant::now();
    let mut last_ack = (Metrics::get(&m.acked), Instant::now());
    let mut longest_silence = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(6) {
        let a = Metrics::get(&m.acked);
        if a != last_ack.0 {
            last_ack = (a, Instant::now());
        }
        longest_silence = longest_silence.max(last_ack.1.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        longest_silence < Duration::from_secs(1),
        "PUBACKs keep coming: {longest_silence:?}"
    );
    assert_eq!(
        Metrics::get(&m.mqtt_connects),
        connects,
        "a broker that keeps acknowledging is not dropped as a dead link"
    );
    rig.proxy.restore();
    drain_and_audit(gw, &[&sub]).await;
}
