//! Test harness: real protocol peers on loopback (the Modbus simulator, the embedded rumqttd
//! broker), a fault-injecting TCP proxy to cut links, a fault-injecting Modbus proxy that spoils
//! answers ([`faulty`]), and an MQTT subscriber that records what arrives.

pub mod faulty;
pub mod fixtures;
pub mod mosquitto;
pub mod pki;
pub mod powercut;
pub mod sparkplug;
pub mod tls_front;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A TCP proxy on 127.0.0.1 that can cut every connection through it and refuse new ones.
pub struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    silent: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    cancel: CancellationToken,
    faults: Arc<Faults>,
}

impl Proxy {
    /// Starts a proxy to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let up = Arc::new(AtomicBool::new(true));
        let silent = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let cancel = CancellationToken::new();
        let (u, g, c) = (up.clone(), generation.clone(), cancel.clone());
        let quiet = silent.clone();
        let faults = Arc::new(Faults::new(upstream));
        let f = faults.clone();
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = c.cancelled() => return,
                    a = listener.accept() => match a { Ok(x) => x, Err(_) => continue },
                };
                if quiet.load(Ordering::SeqCst) {
                    // Accepted, then never a byte either way, for as long as the proxy lives.
                    let c = c.clone();
                    tokio::spawn(async move {
                        c.cancelled().await;
                        drop(client);
                    });
                    continue;
                }
                if !u.load(Ordering::SeqCst) {
                    drop(client); // refused while cut
                    continue;
                }
                f.accepted.fetch_add(1, Ordering::SeqCst);
                let mut cut = g.subscribe();
                let c = c.clone();
                let f = f.clone();
                tokio::spawn(async move {
                    let upstream = *f.upstream.lock().unwrap();
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = pump_up(cr, sw, f.clone()) => {}
                        _ = pump_down(sr, cw, f) => {}
                        _ = cut.changed() => {}
                        _ = c.cancelled() => {}
                    }
                });
            }
        });
        Ok(Proxy {
            addr,
            up,
            silent,
            generation,
            cancel,
            faults,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts every connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Cuts every connection; new ones are accepted but nothing ever passes on them, in either
    /// direction, even after [`Proxy::restore`]: a peer that hangs instead of refusing.
    pub fn blackhole(&self) {
        self.silent.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Lets connections through again and ends the fault modes below (the upstream stays).
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
        self.silent.store(false, Ordering::SeqCst);
        let f = &self.faults;
        f.frozen.store(false, Ordering::SeqCst);
        f.drop_downstream.store(false, Ordering::SeqCst);
        f.cut_after.store(NO_CUT, Ordering::SeqCst);
        f.throttle.store(0, Ordering::SeqCst);
    }

    /// Swallows every upstream→client MQTT packet but CONNACK, whole packets only, on live and
    /// new connections: publishes reach the broker, PUBACKs never come back, TCP stays up.
    pub fn drop_downstream(&self) {
        self.faults.drop_downstream.store(true, Ordering::SeqCst);
    }

    /// Cuts each connection, live or new, once it has carried `n` more client→upstream bytes
    /// (the first `n` are delivered, then both sides are closed), until [`Proxy::restore`].
    pub fn cut_after_bytes(&self, n: u64) {
        self.faults
            .cut_after
            .store(n.min(NO_CUT - 1), Ordering::SeqCst);
        self.faults.cut_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Live and new connections stay open but carry nothing either way (bytes are read and
    /// dropped), until [`Proxy::restore`]: a pulled cable, without the FIN of a closed socket.
    pub fn freeze(&self) {
        self.faults.frozen.store(true, Ordering::SeqCst);
    }

    /// Connections let through so far (a connection attempt, whatever the upstream then does).
    pub fn accepted(&self) -> u64 {
        self.faults.accepted.load(Ordering::SeqCst)
    }

    /// Connections cut by [`Proxy::cut_after_bytes`] so far.
    pub fn cuts(&self) -> u64 {
        self.faults.cuts.load(Ordering::SeqCst)
    }

    /// Of those, the ones cut inside an MQTT packet (the upstream got part of it).
    pub fn cuts_mid_packet(&self) -> u64 {
        self.faults.cuts_mid_packet.load(Ordering::SeqCst)
    }

    /// Passes at most `bytes_per_sec` client→upstream per connection (a slow link or a slow
    /// broker: PUBACKs come back as slowly), until [`Proxy::restore`]; 0 lifts the limit.
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.faults.throttle.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Sends new connections to `upstream` from now on; live ones keep their upstream.
    pub fn repoint(&self, upstream: SocketAddr) {
        *self.faults.upstream.lock().unwrap() = upstream;
    }
}

/// `Faults::cut_after` when connections are not cut.
const NO_CUT: u64 = u64::MAX;

/// The fault modes a proxy's connections read as they pass bytes.
struct Faults {
    upstream: Mutex<SocketAddr>,
    drop_downstream: AtomicBool,
    frozen: AtomicBool,
    cut_after: AtomicU64,
    cut_epoch: AtomicU64,
    accepted: AtomicU64,
    cuts: AtomicU64,
    cuts_mid_packet: AtomicU64,
    throttle: AtomicU64,
}

impl Faults {
    fn new(upstream: SocketAddr) -> Faults {
        Faults {
            upstream: Mutex::new(upstream),
            drop_downstream: AtomicBool::new(false),
            frozen: AtomicBool::new(false),
            cut_after: AtomicU64::new(NO_CUT),
            cut_epoch: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
            cuts_mid_packet: AtomicU64::new(0),
            throttle: AtomicU64::new(0),
        }
    }
}

/// Follows MQTT packet boundaries in a byte stream without buffering it: fixed header byte,
/// remaining length (1 to 4 bytes), body. Meaningless, and unused, on other protocols.
#[derive(Debug, Default)]
struct Framer {
    /// Bytes of the current packet still to come after its header, once the length is known.
    body: u64,
    /// The current packet's length field so far, and its bytes read.
    len: Option<(u64, u32)>,
    /// Whether the current packet is forwarded (decided on its first byte).
    pass: bool,
}

impl Framer {
    /// Whether the stream is between two packets.
    fn at_boundary(&self) -> bool {
        self.len.is_none() && self.body == 0
    }

    /// Splits `data` into runs forwarded or swallowed; `pass(first_byte)` decides per packet.
    fn feed(&mut self, data: &[u8], pass: impl Fn(u8) -> bool, out: &mut Vec<u8>) {
        let mut i = 0;
        while i < data.len() {
            if self.body > 0 {
                let n = (self.body.min((data.len() - i) as u64)) as usize;
                if self.pass {
                    out.extend_from_slice(&data[i..i + n]);
                }
                self.body -= n as u64;
                i += n;
                continue;
            }
            let b = data[i];
            i += 1;
            match self.len {
                None => {
                    self.pass = pass(b);
                    self.len = Some((0, 0));
                }
                Some((value, count)) => {
                    let value = value | (u64::from(b & 0x7f) << (7 * count));
                    if b & 0x80 != 0 && count < 3 {
                        self.len = Some((value, count + 1));
                    } else {
                        self.len = None;
                        self.body = value;
                    }
                }
            }
            if self.pass {
                out.push(b);
            }
        }
    }
}

/// Client→upstream bytes, cut after the `cut_after` budget and paced by `throttle`.
async fn pump_up(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, f: Arc<Faults>) {
    let mut buf = vec![0u8; 16 << 10];
    let mut framer = Framer::default();
    let mut out = Vec::new();
    let mut epoch = f.cut_epoch.load(Ordering::SeqCst);
    let mut carried = 0u64;
    loop {
        let rate = f.throttle.load(Ordering::SeqCst);
        // Throttled: small reads, each followed by the pause its size costs at the rate.
        let max = if rate == 0 {
            buf.len()
        } else {
            ((rate / 20) as usize).clamp(1, buf.len())
        };
        let n = match from.read(&mut buf[..max]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if f.frozen.load(Ordering::SeqCst) {
            continue;
        }
        let e = f.cut_epoch.load(Ordering::SeqCst);
        if e != epoch {
            epoch = e;
            carried = 0;
        }
        let limit = f.cut_after.load(Ordering::SeqCst);
        let left = limit.saturating_sub(carried);
        let (take, cut) = if limit != NO_CUT && n as u64 >= left {
            (left as usize, true)
        } else {
            (n, false)
        };
        out.clear();
        framer.feed(&buf[..take], |_| true, &mut out);
        if to.write_all(&out).await.is_err() {
            return;
        }
        carried += take as u64;
        if cut {
            let _ = to.flush().await;
            f.cuts.fetch_add(1, Ordering::SeqCst);
            if !framer.at_boundary() {
                f.cuts_mid_packet.fetch_add(1, Ordering::SeqCst);
            }
            return;
        }
        let rate = f.throttle.load(Ordering::SeqCst);
        if rate > 0 {
            let pause = Duration::from_secs_f64(take as f64 / rate as f64);
            tokio::time::sleep(pause).await;
        }
    }
}

/// Upstream→client bytes; with `drop_downstream`, only CONNACK packets get through.
async fn pump_down(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, f: Arc<Faults>) {
    const CONNACK: u8 = 2;
    let mut buf = vec![0u8; 16 << 10];
    let mut framer = Framer::default();
    let mut out = Vec::new();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if f.frozen.load(Ordering::SeqCst) {
            continue;
        }
        out.clear();
        let drop = |first: u8| f.drop_downstream.load(Ordering::SeqCst) && first >> 4 != CONNACK;
        framer.feed(&buf[..n], |b| !drop(b), &mut out);
        if !out.is_empty() && to.write_all(&out).await.is_err() {
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// One received MQTT message, parsed.
#[derive(Debug, Clone)]
pub struct Received {
    /// The topic.
    pub topic: String,
    /// The JSON payload.
    pub doc: serde_json::Value,
}

impl Received {
    /// The record's `seq`.
    pub fn seq(&self) -> u64 {
        self.doc["seq"].as_u64().unwrap_or(u64::MAX)
    }
    /// The record's `boot`.
    pub fn boot(&self) -> u64 {
        self.doc["boot"].as_u64().unwrap_or(0)
    }
    /// Whether the record came from disk.
    pub fn historical(&self) -> bool {
        self.doc["historical"] == serde_json::Value::Bool(true)
    }
}

/// An MQTT subscriber (QoS 1) that keeps every message it receives: records, and apart from
/// them the gateway's status messages (topics ending in `/status`) and meta messages (topics
/// ending in `/meta`; an empty one, which clears a retained meta, has a `null` document).
pub struct Collector {
    messages: Arc<Mutex<Vec<Received>>>,
    statuses: Arc<Mutex<Vec<Received>>>,
    metas: Arc<Mutex<Vec<Received>>>,
    garbled: Arc<AtomicU64>,
    cancel: CancellationToken,
}

impl Collector {
    /// Subscribes to `filter` on the broker at `port` and waits until the subscription holds.
    pub async fn start(port: u16, filter: &str) -> Collector {
        Collector::start_as(port, filter, None).await
    }

    /// [`Collector::start`], logging in with `login` (user name, password) when given.
    pub async fn start_as(port: u16, filter: &str, login: Option<(&str, &str)>) -> Collector {
        let mut o = MqttOptions::new(format!("collector-{}", rand_id()), "127.0.0.1", port);
        o.set_max_packet_size(16 << 20, 64 << 10);
        if let Some((user, password)) = login {
            o.set_credentials(user, password);
        }
        let (client, mut el) = AsyncClient::new(o, 64);
        let messages = Arc::new(Mutex::new(Vec::new()));
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let metas = Arc::new(Mutex::new(Vec::new()));
        let garbled = Arc::new(AtomicU64::new(0));
        let cancel = CancellationToken::new();
        let (m, c) = (messages.clone(), cancel.clone());
        let st = statuses.clone();
        let mt = metas.clone();
        let bad = garbled.clone();
        let (subscribed_tx, mut subscribed) = watch::channel(false);
        let filter = filter.to_string();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = c.cancelled() => return,
                    ev = el.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(true);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic.ends_with("/meta") => {
                        let doc =
                            serde_json::from_slice(&p.payload).unwrap_or(serde_json::Value::Null);
                        mt.lock().unwrap().push(Received {
                            topic: p.topic.clone(),
                            doc,
                        });
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(doc) = serde_json::from_slice(&p.payload) {
                            let list = if p.topic.ends_with("/status") {
                                &st
                            } else {
                                &m
                            };
                            list.lock().unwrap().push(Received {
                                topic: p.topic.clone(),
                                doc,
                            });
                        } else {
                            bad.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(10), subscribed.wait_for(|s| *s)).await;
        Collector {
            messages,
            statuses,
            metas,
            garbled,
            cancel,
        }
    }

    /// Every meta message received so far (retained ones first, when the broker had them).
    pub fn metas(&self) -> Vec<Received> {
        self.metas.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for the received meta messages, or panics after `timeout`.
    pub async fn wait_for_meta(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[Received]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !pred(&self.metas.lock().unwrap()) {
            if Instant::now() > deadline {
                let seen: Vec<_> = self.metas().into_iter().map(|s| s.topic).collect();
                panic!("timed out waiting for {what}; meta messages on: {seen:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every record received so far.
    pub fn messages(&self) -> Vec<Received> {
        self.messages.lock().unwrap().clone()
    }

    /// Every status message received so far (a retained one first, when the broker had one).
    pub fn statuses(&self) -> Vec<Received> {
        self.statuses.lock().unwrap().clone()
    }

    /// Messages received whose payload is not JSON (they are not in [`Collector::messages`]).
    pub fn garbled(&self) -> u64 {
        self.garbled.load(Ordering::SeqCst)
    }

    /// Waits until `pred` holds for the received status messages, or panics after `timeout`.
    pub async fn wait_for_status(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[Received]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !pred(&self.statuses.lock().unwrap()) {
            if Instant::now() > deadline {
                let seen: Vec<_> = self.statuses().into_iter().map(|s| s.doc).collect();
                panic!("timed out waiting for {what}; status messages: {seen:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `pred` holds for the received messages, or panics after `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[Received]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.messages.lock().unwrap()) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; received {} messages",
                    self.messages.lock().unwrap().len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Polls `cond` every 20 ms until it holds, or panics after `timeout`.
pub async fn eventually(timeout: Duration, what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

/// Whether the suite runs in its long mode (`GATEWAY_LONG_TESTS` set): more kills, cuts and
/// soak time than the default run affords.
pub fn long_mode() -> bool {
    std::env::var_os("GATEWAY_LONG_TESTS").is_some()
}

/// How many seqs of boot `boot`, from 0 on, arrived without a gap.
pub fn contiguous_len(messages: &[Received], boot: u64) -> u64 {
    let seqs: std::collections::BTreeSet<u64> = messages
        .iter()
        .filter(|m| m.boot() == boot)
        .map(Received::seq)
        .collect();
    seqs.iter()
        .enumerate()
        .take_while(|(i, s)| *i as u64 == **s)
        .count() as u64
}

/// Waits, up to `within`, until the gateway's disk buffer is drained; returns the records the
/// gateway has made by then, which a subscriber holds from seq 0 on once all is delivered.
pub async fn drained(gw: &edge_gateway::pipeline::Running, within: Duration) -> u64 {
    eventually(within, "the backlog drains", || gw.buffer.is_empty()).await;
    edge_gateway::metrics::Metrics::get(&gw.metrics.records)
}

/// Checks that the seqs of one boot have no hole; returns them sorted and de-duplicated.
pub fn contiguous_seqs(messages: &[Received], boot: u64) -> Vec<u64> {
    let mut seqs: Vec<u64> = messages
        .iter()
        .filter(|m| m.boot() == boot)
        .map(Received::seq)
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    for w in seqs.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "hole in seq within boot {boot}: {} -> {}",
            w[0],
            w[1]
        );
    }
    seqs
}

/// A broker on 127.0.0.1 that answers every CONNECT with the same CONNACK: a refusing one (then
/// it closes), or an accepting one (then it acknowledges every QoS 1 PUBLISH and answers pings,
/// and keeps nothing).
pub struct FakeBroker {
    attempts: Arc<Mutex<Vec<Instant>>>,
    logins: Arc<Mutex<Vec<Login>>>,
    publishes: Arc<AtomicU64>,
    cancel: CancellationToken,
}

impl FakeBroker {
    /// CONNECT packets answered so far.
    pub fn attempts(&self) -> usize {
        self.attempts.lock().unwrap().len()
    }

    /// When each CONNECT arrived, oldest first.
    pub fn attempt_times(&self) -> Vec<Instant> {
        self.attempts.lock().unwrap().clone()
    }

    /// PUBLISH packets received (and acknowledged) so far.
    pub fn publishes(&self) -> u64 {
        self.publishes.load(Ordering::Relaxed)
    }

    /// What each CONNECT carried, oldest first.
    pub fn logins(&self) -> Vec<Login> {
        self.logins.lock().unwrap().clone()
    }
}

/// The identity a CONNECT carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    /// The client id.
    pub client_id: String,
    /// The user name, if any.
    pub username: Option<String>,
    /// The password, if any.
    pub password: Option<String>,
}

/// Starts a broker that accepts every CONNECT and acknowledges every publish, keeping what
/// each CONNECT carried ([`FakeBroker::logins`]).
pub async fn recording_broker() -> (SocketAddr, FakeBroker) {
    fake_broker(Answer::AcceptAndAckAll).await
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Starts a broker that refuses every CONNECT with return `code` (MQTT 3.1.1: 1 to 5, 5 = not
/// authorized); it stops when the handle is dropped.
pub async fn refusing_broker(code: u8) -> (SocketAddr, FakeBroker) {
    fake_broker(Answer::Refuse(code)).await
}

/// Starts a broker that answers every clean-session CONNECT with "session present", which MQTT
/// forbids, and then acknowledges whatever it is sent: a client that believed it would hand it
/// publishes an old session left behind, and take their acknowledgements for its new ones.
pub async fn session_present_broker() -> (SocketAddr, FakeBroker) {
    fake_broker(Answer::ClaimSessionAndAckAll).await
}

/// How a [`rule_breaking_broker`] answers once it has accepted a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Acknowledges each PUBLISH with a packet id the client never used.
    AcksUnknownPacketIds,
    /// Sends bytes that are no MQTT packet.
    SendsGarbage,
    /// Announces a packet of 256 MiB (the largest remaining length MQTT can encode) and sends
    /// no more.
    AnnouncesAHugePacket,
}

/// Starts a broker that accepts every CONNECT (a sound CONNACK) and then breaks the protocol
/// as `how` says; it stops when the handle is dropped.
pub async fn rule_breaking_broker(how: Misbehaviour) -> (SocketAddr, FakeBroker) {
    fake_broker(Answer::Accept(how)).await
}

/// How a [`fake_broker`] answers each CONNECT, and what it does after.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// A CONNACK refusing with this return code, then it closes.
    Refuse(u8),
    /// A CONNACK saying "session present", then it acknowledges every publish.
    ClaimSessionAndAckAll,
    /// A sound CONNACK, then the misbehaviour.
    Accept(Misbehaviour),
    /// A sound CONNACK, then it acknowledges every publish.
    AcceptAndAckAll,
}

impl Answer {
    /// The CONNACK packet.
    fn connack(self) -> [u8; 4] {
        match self {
            Answer::Refuse(code) => [0x20, 0x02, 0x00, code],
            Answer::ClaimSessionAndAckAll => [0x20, 0x02, 0x01, 0x00],
            Answer::Accept(_) | Answer::AcceptAndAckAll => [0x20, 0x02, 0x00, 0x00],
        }
    }
}

async fn fake_broker(answer: Answer) -> (SocketAddr, FakeBroker) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let logins = Arc::new(Mutex::new(Vec::new()));
    let publishes = Arc::new(AtomicU64::new(0));
    let cancel = CancellationToken::new();
    let (a, n, c) = (attempts.clone(), publishes.clone(), cancel.clone());
    let l = logins.clone();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = tokio::select! {
                _ = c.cancelled() => return,
                r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            };
            let (a, n, c) = (a.clone(), n.clone(), c.clone());
            let l = l.clone();
            tokio::spawn(async move {
                let answer = async {
                    let Some(login) = read_connect(&mut conn).await else {
                        return;
                    };
                    a.lock().unwrap().push(Instant::now());
                    l.lock().unwrap().push(login);
                    let _ = conn.write_all(&answer.connack()).await;
                    match answer {
                        Answer::Refuse(_) => {
                            let _ = conn.shutdown().await;
                        }
                        Answer::ClaimSessionAndAckAll | Answer::AcceptAndAckAll => {
                            serve_acking(&mut conn, &n, 0).await
                        }
                        Answer::Accept(Misbehaviour::AcksUnknownPacketIds) => {
                            serve_acking(&mut conn, &n, 0x4000).await
                        }
                        Answer::Accept(Misbehaviour::SendsGarbage) => {
                            let _ = conn.write_all(&[0xFF; 64]).await;
                            let _ = read_packet(&mut conn).await;
                        }
                        Answer::Accept(Misbehaviour::AnnouncesAHugePacket) => {
                            let _ = conn.write_all(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]).await;
                            let _ = read_packet(&mut conn).await;
                        }
                    }
                };
                tokio::select! {
                    _ = answer => {}
                    _ = c.cancelled() => {}
                }
            });
        }
    });
    let broker = FakeBroker {
        attempts,
        logins,
        publishes,
        cancel,
    };
    (addr, broker)
}

/// Acknowledges every QoS 1 PUBLISH on `conn` (with its packet id shifted by `shift`, which
/// 0 leaves as it is) and answers pings, until the stream ends.
async fn serve_acking(conn: &mut TcpStream, publishes: &AtomicU64, shift: u16) {
    const PUBLISH: u8 = 3;
    const PINGREQ: u8 = 12;
    while let Some((first, body)) = read_packet(conn).await {
        let reply = match first >> 4 {
            PUBLISH if (first >> 1) & 3 == 1 && body.len() >= 2 => {
                publishes.fetch_add(1, Ordering::Relaxed);
                let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                match body.get(2 + topic_len..4 + topic_len) {
                    Some(pkid) => {
                        let pkid = u16::from_be_bytes([pkid[0], pkid[1]]) ^ shift;
                        let [hi, lo] = pkid.to_be_bytes();
                        vec![0x40, 0x02, hi, lo]
                    }
                    None => return,
                }
            }
            PINGREQ => vec![0xD0, 0x00],
            _ => continue,
        };
        if conn.write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// Reads one MQTT packet: its first byte and its body; `None` when the stream ends.
async fn read_packet(conn: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let first = conn.read_u8().await.ok()?;
    let mut len = 0u64;
    for i in 0..4 {
        let b = conn.read_u8().await.ok()?;
        len |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; usize::try_from(len).ok()?.min(1 << 24)];
    conn.read_exact(&mut body).await.ok()?;
    Some((first, body))
}

/// Reads one MQTT 3.1.1 CONNECT packet; `None` if the stream ends first or sends something
/// else.
async fn read_connect(conn: &mut TcpStream) -> Option<Login> {
    const CONNECT: u8 = 1;
    let (first, body) = read_packet(conn).await?;
    if first >> 4 != CONNECT {
        return None;
    }
    parse_connect(&body)
}

/// The client id, user name and password of a CONNECT body (MQTT 3.1.1).
fn parse_connect(body: &[u8]) -> Option<Login> {
    fn field<'a>(body: &'a [u8], at: &mut usize) -> Option<&'a [u8]> {
        let len = usize::from(u16::from_be_bytes([*body.get(*at)?, *body.get(*at + 1)?]));
        let value = body.get(*at + 2..*at + 2 + len)?;
        *at += 2 + len;
        Some(value)
    }
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut at = 0;
    field(body, &mut at)?; // protocol name
    let flags = *body.get(at + 1)?;
    at += 4; // level, flags, keep-alive
    let client_id = text(field(body, &mut at)?);
    if flags & 0x04 != 0 {
        field(body, &mut at)?; // will topic
        field(body, &mut at)?; // will message
    }
    let username = if flags & 0x80 != 0 {
        Some(text(field(body, &mut at)?))
    } else {
        None
    };
    let password = if flags & 0x40 != 0 {
        Some(text(field(body, &mut at)?))
    } else {
        None
    };
    Some(Login {
        client_id,
        username,
        password,
    })
}

/// `config` (from [`child_config`]) with more `[mqtt]` keys (TOML lines), and `mqtts://` when
/// `tls`.
pub fn with_mqtt_keys(config: &str, keys: &str, tls: bool) -> String {
    let config = if tls {
        config.replacen("url = \"mqtt://", "url = \"mqtts://", 1)
    } else {
        config.to_owned()
    };
    config.replacen(
        "shutdown_grace = \"200ms\"\n",
        &format!("shutdown_grace = \"200ms\"\n{keys}\n"),
        1,
    )
}

/// Starts the gateway child (`exe`: a test's `env!("CARGO_BIN_EXE_gateway-child")`) on `config`
/// with its log (stderr, no colours) in `log`, at the level `rust_log`, with `env` set too.
pub fn spawn_child_logging(
    exe: &str,
    config: &std::path::Path,
    log: &std::path::Path,
    rust_log: &str,
    env: &[(&str, &std::path::Path)],
) -> std::process::Child {
    let stderr = std::fs::File::create(log).expect("the child's log file");
    std::process::Command::new(exe)
        .arg(config)
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .env("RUST_LOG", rust_log)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start the gateway child")
}

/// The TOML config of a gateway child for the crash and disk tests: gateway `id`, one Modbus
/// TCP device at `device` with two tags scanned every `scan_ms`, the broker on `mqtt_port`.
pub fn child_config(
    id: &str,
    data_dir: &std::path::Path,
    mqtt_port: u16,
    device: SocketAddr,
    commit_interval_ms: u64,
    scan_ms: u64,
) -> String {
    format!(
        r#"
[gateway]
id = "{id}"
data_dir = "{data}"

[buffer]
commit_interval = "{commit_interval_ms}ms"

[mqtt]
url = "mqtt://127.0.0.1:{mqtt_port}"
shutdown_grace = "200ms"

[[devices]]
name = "press"
protocol = "modbus_tcp"
address = "{device}"
scan_interval = "{scan_ms}ms"

  [[devices.tags]]
  name = "counter"
  address = "hr:0"

  [[devices.tags]]
  name = "sine"
  address = "hr:1"
  type = "f32"
"#,
        data = data_dir.display()
    )
}

/// `quarantine-*` directories anywhere under `data`: a generation sled could not open.
pub fn quarantined(data: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![data.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with("quarantine-")
                {
                    found.push(entry.path());
                }
                dirs.push(entry.path());
            }
        }
    }
    found
}

/// Re-sends carry the first copy's topic and content (`historical` aside), per boot and `seq`.
pub fn assert_resends_identical(msgs: &[Received]) {
    let mut first: std::collections::HashMap<(u64, u64), (&str, serde_json::Value)> =
        std::collections::HashMap::new();
    for m in msgs {
        let mut doc = m.doc.clone();
        doc["historical"] = serde_json::Value::Bool(false);
        match first.get(&(m.boot(), m.seq())) {
            None => {
                first.insert((m.boot(), m.seq()), (&m.topic, doc));
            }
            Some((topic, seen)) => {
                let (boot, seq) = (m.boot(), m.seq());
                assert_eq!(
                    *topic, m.topic,
                    "boot {boot}, seq {seq} re-sent to another topic"
                );
                assert_eq!(
                    *seen, doc,
                    "a duplicate (boot {boot}, seq {seq}) differs in content"
                );
            }
        }
    }
}

/// What a gateway child talks to: the embedded broker, a proxy in front of it that can cut the
/// link, and the animated demo Modbus device (its animation stops when this is dropped).
pub struct ChildPeers {
    /// The broker.
    pub broker: edge_gateway::demo::broker::EmbeddedBroker,
    /// The proxy the gateway reaches the broker through.
    pub proxy: Proxy,
    /// The device's server.
    pub device: protocols::sim::modbus::SimServer,
    animation: CancellationToken,
}

impl ChildPeers {
    /// Starts the broker, the proxy and the device on 127.0.0.1.
    pub async fn start() -> ChildPeers {
        let broker = edge_gateway::demo::broker::start(16 << 20).unwrap();
        let proxy = Proxy::start(broker.addr()).await.unwrap();
        let animation = CancellationToken::new();
        let dev = protocols::sim::modbus::SimDevice::demo();
        dev.animate(Duration::from_millis(20), animation.clone());
        let device = dev.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
        ChildPeers {
            broker,
            proxy,
            device,
            animation,
        }
    }
}

impl Drop for ChildPeers {
    fn drop(&mut self) {
        self.animation.cancel();
    }
}

/// What an in-process gateway talks to: the embedded broker, a proxy in front of it (or in
/// front of another upstream) that can inject faults, animated demo devices, and a config that
/// points the gateway at the proxy. The devices stop when this is dropped.
pub struct GatewayRig {
    /// The broker the subscriber reads from.
    pub broker: edge_gateway::demo::broker::EmbeddedBroker,
    /// The proxy the gateway reaches its broker through.
    pub proxy: Proxy,
    /// The gateway's config, for the test to adjust before `start`.
    pub config: edge_gateway::config::Config,
    sims: Vec<Option<protocols::sim::modbus::SimServer>>,
    stopped: std::collections::HashMap<usize, SocketAddr>,
    sims_cancel: CancellationToken,
    _dir: tempfile::TempDir,
}

impl GatewayRig {
    /// Gateway `id` with `devices` demo devices scanned every `scan`; the proxy forwards to
    /// `upstream`, or to the broker if `None`.
    pub async fn new(
        id: &str,
        devices: usize,
        scan: Duration,
        upstream: Option<SocketAddr>,
    ) -> GatewayRig {
        use crate::fixtures::{demo_devices, local_config};
        use edge_gateway::demo::start_demo_devices;
        init_tracing();
        let broker = edge_gateway::demo::broker::start(16 << 20).unwrap();
        let proxy = Proxy::start(upstream.unwrap_or(broker.addr()))
            .await
            .unwrap();
        let sims_cancel = CancellationToken::new();
        let sims = start_demo_devices(devices, &sims_cancel).await.unwrap();
        let addrs: Vec<_> = sims.iter().map(|s| s.addr()).collect();
        let dir = tempfile::tempdir().unwrap();
        let mut config = local_config(
            id,
            dir.path().join("data"),
            proxy.addr().port(),
            demo_devices(&addrs, scan),
        );
        config.mqtt.client_id = format!("gw-{}", dir.path().display()).replace('/', "-");
        config.mqtt.shutdown_grace = Duration::from_millis(500);
        GatewayRig {
            broker,
            proxy,
            config,
            sims: sims.into_iter().map(Some).collect(),
            stopped: Default::default(),
            sims_cancel,
            _dir: dir,
        }
    }

    /// Stops simulator `i` (its device stops answering; the others go on).
    pub async fn stop_sim(&mut self, i: usize) {
        if let Some(sim) = self.sims.get_mut(i).and_then(Option::take) {
            let addr = sim.addr();
            sim.stop().await;
            self.stopped.insert(i, addr);
        }
    }

    /// Starts simulator `i` again on its old address, after [`GatewayRig::stop_sim`].
    pub async fn restart_sim(&mut self, i: usize) {
        if let Some(addr) = self.stopped.remove(&i) {
            let dev = protocols::sim::modbus::SimDevice::demo();
            dev.animate(Duration::from_millis(100), self.sims_cancel.clone());
            // The old listener may linger for a moment.
            for _ in 0..50 {
                if let Ok(server) = dev.serve(addr).await {
                    self.sims[i] = Some(server);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("cannot serve simulator {i} again on {addr}");
        }
    }

    /// The topic filter of everything the gateway publishes.
    pub fn filter(&self) -> String {
        format!("{}/#", self.config.mqtt.topic_prefix)
    }

    /// A subscriber to everything the gateway publishes.
    pub async fn collector(&self) -> Collector {
        Collector::start(self.broker.port(), &self.filter()).await
    }

    /// Starts the gateway with the config as it is now.
    pub async fn start(&self) -> edge_gateway::pipeline::Running {
        edge_gateway::pipeline::start(self.config.clone())
            .await
            .unwrap()
    }

    /// Cuts the link to the broker and waits until `records` more records are committed to
    /// disk (the link stays cut).
    pub async fn cut_until_committed(
        &self,
        gw: &edge_gateway::pipeline::Running,
        records: u64,
        what: &str,
    ) {
        self.proxy.cut();
        let committed = edge_gateway::metrics::Metrics::get(&gw.metrics.committed);
        eventually(Duration::from_secs(20), what, || {
            edge_gateway::metrics::Metrics::get(&gw.metrics.committed) >= committed + records
        })
        .await;
    }

    /// A subscriber, then the gateway, once the subscriber has received live records from it.
    pub async fn start_live(&self) -> (Collector, edge_gateway::pipeline::Running) {
        let sub = self.collector().await;
        let gw = self.start().await;
        sub.wait_for(Duration::from_secs(10), "live records", |m| m.len() >= 10)
            .await;
        (sub, gw)
    }
}

impl Drop for GatewayRig {
    fn drop(&mut self) {
        self.sims_cancel.cancel();
    }
}

/// Asks a driver, through its write channel, to write `value` to tag `tag` of device (unit)
/// `device`, and waits for the outcome; panics when none comes within `within`.
pub async fn ask_driver(
    writes: &tokio::sync::mpsc::Sender<protocols::driver::WriteRequest>,
    device: u32,
    tag: u32,
    value: protocols::model::Value,
    within: Duration,
) -> Result<protocols::driver::WriteDone, protocols::driver::WriteError> {
    let (reply, outcome) = tokio::sync::oneshot::channel();
    let request = protocols::driver::WriteRequest {
        device: protocols::model::DeviceId(device),
        tag: protocols::model::TagId(tag),
        value,
        reply,
    };
    writes.send(request).await.expect("the driver takes writes");
    tokio::time::timeout(within, outcome)
        .await
        .unwrap_or_else(|_| panic!("a write outcome within {within:?}"))
        .expect("the driver answers every write")
}

/// A Modbus line driver, run as the gateway runs it: its batches and status. Unit `i` of the
/// line reports as device `i`. Dropping it cancels the driver.
pub struct ModbusDriverRun {
    /// The driver's batches (of every unit).
    pub rx: tokio::sync::mpsc::Receiver<protocols::model::Batch>,
    /// The status of device 0 (the first unit) as the driver reports it.
    pub status: Arc<protocols::driver::DeviceStatus>,
    /// The status of each unit, in line order.
    pub statuses: Vec<Arc<protocols::driver::DeviceStatus>>,
    /// Write requests to the driver (one inbox for the line).
    pub writes: tokio::sync::mpsc::Sender<protocols::driver::WriteRequest>,
    cancel: CancellationToken,
    driver: Option<tokio::task::JoinHandle<Result<(), protocols::driver::DriverError>>>,
}

impl ModbusDriverRun {
    /// Starts the driver of one line with `settings`, unit `i` reporting as device `i`.
    pub fn start(settings: protocols::modbus::ModbusSettings) -> ModbusDriverRun {
        use protocols::driver::{write_channel, DeviceStatus, DriverContext, Emitter};
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let (writes, inbox) = write_channel(4);
        let cancel = CancellationToken::new();
        let statuses: Vec<Arc<DeviceStatus>> = settings
            .units
            .iter()
            .map(|_| Arc::new(DeviceStatus::default()))
            .collect();
        let contexts = statuses
            .iter()
            .enumerate()
            .map(|(i, status)| DriverContext {
                device: protocols::model::DeviceId(i as u32),
                name: if i == 0 {
                    "dev".into()
                } else {
                    format!("dev{i}").into()
                },
                emitter: Emitter::new(tx.clone()),
                cancel: cancel.clone(),
                status: status.clone(),
                writes: Some(inbox.clone()),
            })
            .collect();
        let status = statuses.first().cloned().unwrap_or_default();
        let driver = tokio::spawn(protocols::modbus::driver::run(settings, contexts));
        ModbusDriverRun {
            rx,
            status,
            statuses,
            writes,
            cancel,
            driver: Some(driver),
        }
    }

    /// The next batch; panics when none comes within 5 s (a stuck driver) or the driver ended.
    pub async fn next(&mut self) -> protocols::model::Batch {
        tokio::time::timeout(Duration::from_secs(5), self.rx.recv())
            .await
            .expect("a batch within 5 s: the driver is stuck")
            .expect("the driver ended (did it panic?)")
    }

    /// Asks the driver to write `value` to tag `tag` of device 0 and waits for the outcome
    /// (panics when none comes within 5 s).
    pub async fn write(
        &self,
        tag: u32,
        value: protocols::model::Value,
    ) -> Result<protocols::driver::WriteDone, protocols::driver::WriteError> {
        self.write_to(0, tag, value).await
    }

    /// Asks the driver to write `value` to tag `tag` of device (unit) `device` and waits for
    /// the outcome (panics when none comes within 5 s).
    pub async fn write_to(
        &self,
        device: u32,
        tag: u32,
        value: protocols::model::Value,
    ) -> Result<protocols::driver::WriteDone, protocols::driver::WriteError> {
        ask_driver(&self.writes, device, tag, value, Duration::from_secs(5)).await
    }

    /// Stops the driver, which must end cleanly and at once.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        let Some(driver) = self.driver.take() else {
            return;
        };
        let ended = tokio::time::timeout(Duration::from_secs(2), driver)
            .await
            .expect("the driver stops when cancelled");
        assert!(
            matches!(ended, Ok(Ok(()))),
            "the driver ends without error: {ended:?}"
        );
    }
}

impl Drop for ModbusDriverRun {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Whether every sample of a batch is good.
pub fn all_good(b: &protocols::model::Batch) -> bool {
    b.samples
        .iter()
        .all(|s| s.quality == protocols::model::Quality::Good)
}
