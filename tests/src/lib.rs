//! Test harness: real protocol peers on loopback (the Modbus simulator, the embedded rumqttd
//! broker), a fault-injecting TCP proxy to cut links, and an MQTT subscriber that records what
//! arrives.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
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
                let mut cut = g.subscribe();
                let c = c.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    tokio::select! {
                        _ = tokio::io::copy(&mut cr, &mut sw) => {}
                        _ = tokio::io::copy(&mut sr, &mut cw) => {}
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

    /// Lets connections through again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
        self.silent.store(false, Ordering::SeqCst);
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

/// An MQTT subscriber (QoS 1) that keeps every message it receives.
pub struct Collector {
    messages: Arc<Mutex<Vec<Received>>>,
    cancel: CancellationToken,
}

impl Collector {
    /// Subscribes to `filter` on the broker at `port` and waits until the subscription holds.
    pub async fn start(port: u16, filter: &str) -> Collector {
        let mut o = MqttOptions::new(format!("collector-{}", rand_id()), "127.0.0.1", port);
        o.set_max_packet_size(16 << 20, 64 << 10);
        let (client, mut el) = AsyncClient::new(o, 64);
        let messages = Arc::new(Mutex::new(Vec::new()));
        let cancel = CancellationToken::new();
        let (m, c) = (messages.clone(), cancel.clone());
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
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(doc) = serde_json::from_slice(&p.payload) {
                            m.lock().unwrap().push(Received {
                                topic: p.topic.clone(),
                                doc,
                            });
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(10), subscribed.wait_for(|s| *s)).await;
        Collector { messages, cancel }
    }

    /// Everything received so far.
    pub fn messages(&self) -> Vec<Received> {
        self.messages.lock().unwrap().clone()
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
