//! An embedded MQTT broker (rumqttd) on loopback, for the demo, benchmarks and tests.
//!
//! rumqttd binds its own listener and cannot report the port it got for port 0, so a free port
//! is found first by binding port 0 and releasing it; the broker is then probed until it
//! accepts connections, and another port is tried if something else took it meanwhile.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No loopback port could be had.
    #[error("no free loopback port: {0}")]
    Port(std::io::Error),
    /// The broker never accepted connections.
    #[error("the embedded MQTT broker did not start")]
    NotListening,
}

/// A running embedded broker. It lives until the process ends (rumqttd has no stop).
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
}

impl EmbeddedBroker {
    /// The address it listens on (127.0.0.1).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

fn config(listen: SocketAddr, max_payload: usize, segments: usize) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 5000,
        max_payload_size: max_payload,
        max_inflight_count: 1024,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "v4-loopback".to_string(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 1024,
            max_outgoing_packet_count: 2000,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: segments,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    }
}

/// Starts a broker on 127.0.0.1 that accepts payloads up to `max_payload` bytes.
pub fn start(max_payload: usize) -> Result<EmbeddedBroker, BrokerError> {
    start_keeping(max_payload, 4)
}

/// [`start`], keeping up to `segments` x 16 MiB of messages for a subscriber that lags
/// behind (rumqttd skips a subscriber past what it no longer keeps: messages it never gets).
pub fn start_keeping(max_payload: usize, segments: usize) -> Result<EmbeddedBroker, BrokerError> {
    for _ in 0..5 {
        let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(BrokerError::Port)?;
        let addr = probe.local_addr().map_err(BrokerError::Port)?;
        drop(probe);
        let mut broker = Broker::new(config(addr, max_payload, segments));
        let spawned = std::thread::Builder::new()
            .name("mqtt-broker".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded MQTT broker stopped");
                }
            });
        if spawned.is_err() {
            continue;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(EmbeddedBroker { addr });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Err(BrokerError::NotListening)
}

/// A Sparkplug DDATA payload as the JSON record's shape the viewers read: `samples` with their
/// `ts`, and `historical`.
fn sparkplug_doc(payload: &[u8]) -> Option<serde_json::Value> {
    use prost::Message;
    let p = crate::encode::sparkplug::proto::Payload::decode(payload).ok()?;
    let samples: Vec<serde_json::Value> = p
        .metrics
        .iter()
        .map(|m| serde_json::json!({ "ts": m.timestamp }))
        .collect();
    let historical = p.metrics.iter().any(|m| m.is_historical == Some(true));
    Some(serde_json::json!({ "samples": samples, "historical": historical }))
}

/// Subscribes to `filter` on the loopback broker at `port` (re-subscribing after reconnects) and
/// hands every message's parsed JSON payload to `on_message`, until `cancel`. Used by the demo's
/// view and the bench's counter.
pub fn subscribe_json(
    port: u16,
    client_id: &str,
    filter: String,
    cancel: tokio_util::sync::CancellationToken,
    mut on_message: impl FnMut(serde_json::Value) + Send + 'static,
) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_max_packet_size(16 << 20, 64 << 10);
    let (client, mut el) = AsyncClient::new(o, 16);
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = cancel.cancelled() => return,
                ev = el.poll() => ev,
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.subscribe(filter.clone(), QoS::AtMostOnce).await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Ok(doc) = serde_json::from_slice(&p.payload) {
                        on_message(doc);
                    } else if let Some(doc) = sparkplug_doc(&p.payload) {
                        on_message(doc);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
}
