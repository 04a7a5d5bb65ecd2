//! One MQTT client and its event loop, in MQTT 3.1.1 or MQTT 5: the publisher codes against
//! [`Sender`], [`Link`] and [`Happening`], and never against either rumqttc flavour.
//!
//! What the publisher relies on, in both versions:
//! - [`Happening::Sent`] comes in the order publishes were handed to [`Sender::publish`], with
//!   the packet id the broker will acknowledge ([`window`](super::window) pairs them).
//! - [`Happening::Connected`] is the first happening of each connection, before anything is
//!   sent on it; [`Link::forget_old_connection`] then drops whatever rumqttc kept of the previous
//!   one (its queued events, a collision, the publishes it would send again), so nothing but
//!   what the publisher submits after the CONNACK goes out on a connection.
//! - Connection settings that change over time (the TLS configuration with its re-read
//!   certificate files, a renewed password or SAS token, the last will) are set with
//!   [`Link::prepare`] before each connection attempt.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck as ConnAck5, LastWill as LastWill5, Packet as Packet5, PubAckReason, PublishProperties,
};
use rumqttc::{Event, Outgoing, Packet, QoS, Transport};

use crate::config::{MqttSettings, ProtocolVersion};
use crate::metrics::PUBACK_REFUSALS;

/// What the broker allows, from its CONNACK (MQTT 5; MQTT 3.1.1 tells nothing and allows all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BrokerLimits {
    /// Publishes in flight at most (`Receive Maximum`).
    pub(crate) receive_maximum: Option<u16>,
    /// Largest packet the broker takes (`Maximum Packet Size`).
    pub(crate) maximum_packet_size: Option<u32>,
    /// Topic aliases the broker keeps (`Topic Alias Maximum`; 0: none).
    pub(crate) topic_alias_maximum: u16,
    /// Whether retained messages are available.
    pub(crate) retain_available: bool,
}

impl BrokerLimits {
    pub(crate) const NONE: BrokerLimits = BrokerLimits {
        receive_maximum: None,
        maximum_packet_size: None,
        topic_alias_maximum: 0,
        retain_available: true,
    };

    fn from_v5(ack: &ConnAck5) -> BrokerLimits {
        let Some(p) = &ack.properties else {
            return BrokerLimits::NONE;
        };
        BrokerLimits {
            receive_maximum: p.receive_max,
            maximum_packet_size: p.max_packet_size,
            topic_alias_maximum: p.topic_alias_max.unwrap_or(0),
            retain_available: p.retain_available != Some(0),
        }
    }
}

/// A PUBACK that refuses the publish (MQTT 5 reason code 0x80 or above).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The reason code.
    pub(crate) code: u8,
    /// Its name in the specification.
    pub(crate) name: &'static str,
    /// The broker's reason string, if it sent one.
    pub(crate) reason: Option<String>,
}

/// What one poll of the event loop brought.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Happening {
    /// A CONNACK accepting the connection.
    Connected {
        session_present: bool,
        limits: BrokerLimits,
    },
    /// A publish was written with this packet id.
    Sent(u16),
    /// rumqttc's packet ids collided (the broker acknowledges out of order).
    Collision(u16),
    /// A PUBACK; `refused` when its reason code is a failure.
    Acked { pkid: u16, refused: Option<Refusal> },
    /// A message on a subscribed topic (Sparkplug's NCMD, DCMD and STATE, or a command);
    /// `retain`: the broker kept it from before (a retained command is never executed).
    Message {
        topic: String,
        payload: Bytes,
        retain: bool,
    },
    /// The DISCONNECT went out.
    DisconnectSent,
    /// A QoS 0 publish (a command reply) was written.
    Qos0Written,
    /// The broker refused `refused` of the filters of one SUBSCRIBE (an ACL, most often):
    /// nothing will arrive on them.
    SubscriptionRefused { refused: usize },
    /// Anything else (pings, the client's own bookkeeping).
    Other,
}

/// How one publish goes out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outbound {
    /// The topic; empty when `alias` stands for it.
    pub(crate) topic: String,
    /// A topic alias (MQTT 5), set with the topic the first time and alone afterwards.
    pub(crate) alias: Option<u16>,
    /// Retained.
    pub(crate) retain: bool,
}

/// What a connection attempt is made with, rebuilt before each one.
pub(crate) struct Prepared {
    /// Plain TCP or TLS (with a freshly read configuration).
    pub(crate) transport: Transport,
    /// User name and password (or SAS token).
    pub(crate) credentials: Option<(String, String)>,
    /// The last will: topic and payload, retained, QoS 1.
    pub(crate) will: Option<(String, Bytes)>,
    /// Whether the will may be retained (a broker refused retain before).
    pub(crate) will_retained: bool,
}

/// The client half: hands publishes to the event loop.
pub(crate) enum Sender {
    V4(rumqttc::AsyncClient),
    /// With whether payloads are protobuf (Sparkplug B) rather than JSON.
    V5(v5::AsyncClient, bool),
}

/// The event-loop half: owns the connection, and rumqttc's in-flight limit (`inflight`), with
/// which its state is made new for each connection.
pub(crate) enum Link {
    V4(Box<rumqttc::EventLoop>, u16),
    V5(Box<v5::EventLoop>, u16),
}

/// A failed poll: the connection is gone.
#[derive(Debug)]
pub(crate) enum LinkError {
    V4(rumqttc::ConnectionError),
    V5(v5::ConnectionError),
}

impl LinkError {
    /// An MQTT 5 broker refused the CONNECT because it keeps no retained messages (the will is
    /// retained).
    pub(crate) fn retain_not_supported(&self) -> bool {
        matches!(
            self,
            LinkError::V5(v5::ConnectionError::ConnectionRefused(
                v5::mqttbytes::v5::ConnectReturnCode::RetainNotSupported
            ))
        )
    }
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::V4(e) => write!(f, "{e}"),
            LinkError::V5(e) => write!(f, "{e}"),
        }
    }
}

/// The client and its event loop for `settings`.
pub(crate) fn open(settings: &MqttSettings) -> (Sender, Link) {
    // The request channel, drained only by the publisher's own loop, must never fill while
    // that loop hands over a publish: it holds the window's records (at most `max_inflight`
    // unwritten) and the gateway's own messages, each paced by a budget: births and deaths
    // and meta together at most `sparkplug::SESSION_UNWRITTEN`, the status and the NDEATH of
    // a shutdown, up to 4 subscriptions after a CONNACK, and `commands::MAX_REPLIES_UNWRITTEN`
    // replies.
    let cap = usize::from(settings.max_inflight) + 24;
    // rumqttc's own limit stays far above the window so packet ids are not reused while a
    // broker acknowledges out of order.
    let inflight = settings.max_inflight.saturating_mul(4).max(16);
    let keep_alive = settings.keep_alive.max(Duration::from_secs(1));
    // Nagle's algorithm holds a small publish until TCP has acknowledged the previous one,
    // and the broker's delayed ACK makes that about 40 ms: records go out as they come.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    match settings.protocol_version {
        ProtocolVersion::V311 => {
            let mut o =
                rumqttc::MqttOptions::new(&settings.client_id, &settings.host, settings.port);
            o.set_keep_alive(keep_alive);
            o.set_clean_session(true);
            o.set_inflight(inflight);
            o.set_max_packet_size(64 * 1024, settings.max_packet_size);
            o.set_request_channel_capacity(cap);
            let (client, mut el) = rumqttc::AsyncClient::new(o, cap);
            el.set_network_options(network);
            (Sender::V4(client), Link::V4(Box::new(el), inflight))
        }
        ProtocolVersion::V5 => {
            let mut o = v5::MqttOptions::new(&settings.client_id, &settings.host, settings.port);
            o.set_keep_alive(keep_alive);
            o.set_clean_start(true);
            o.set_outgoing_inflight_upper_limit(inflight);
            // What the gateway accepts from the broker: acknowledgements, small.
            o.set_max_packet_size(Some(64 * 1024));
            o.set_request_channel_capacity(cap);
            o.set_network_options(network);
            let (client, el) = v5::AsyncClient::new(o, cap);
            let protobuf = settings.format == crate::config::Format::SparkplugB;
            (
                Sender::V5(client, protobuf),
                Link::V5(Box::new(el), inflight),
            )
        }
    }
}

impl Sender {
    /// Hands a QoS 1 publish to the event loop; records carry content type `application/json`
    /// in MQTT 5. An error only when the event loop is gone.
    pub(crate) async fn publish(&self, out: Outbound, payload: Bytes) -> Result<(), String> {
        match self {
            Sender::V4(c) => c
                .publish_bytes(out.topic, QoS::AtLeastOnce, out.retain, payload)
                .await
                .map_err(|e| e.to_string()),
            Sender::V5(c, protobuf) => {
                let properties = PublishProperties {
                    payload_format_indicator: Some(u8::from(!*protobuf)),
                    topic_alias: out.alias,
                    content_type: Some(
                        if *protobuf {
                            "application/x-protobuf"
                        } else {
                            "application/json"
                        }
                        .to_owned(),
                    ),
                    ..PublishProperties::default()
                };
                c.publish_bytes_with_properties(
                    out.topic,
                    v5::mqttbytes::QoS::AtLeastOnce,
                    out.retain,
                    payload,
                    properties,
                )
                .await
                .map_err(|e| e.to_string())
            }
        }
    }

    /// Hands a QoS 0 publish (a command reply) to the event loop: it takes no packet id and
    /// no place in the window.
    pub(crate) fn try_publish_qos0(&self, topic: String, payload: Bytes) -> Result<(), String> {
        match self {
            Sender::V4(c) => c
                .try_publish(topic, QoS::AtMostOnce, false, payload)
                .map_err(|e| e.to_string()),
            Sender::V5(c, _) => c
                .try_publish(topic, v5::mqttbytes::QoS::AtMostOnce, false, payload)
                .map_err(|e| e.to_string()),
        }
    }

    /// Asks the event loop to send DISCONNECT.
    pub(crate) fn try_disconnect(&self) {
        let _ = match self {
            Sender::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Sender::V5(c, _) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }

    /// Hands a QoS 1 SUBSCRIBE to the event loop; it goes out before any publish handed over
    /// after it. An error only when the event loop is gone.
    pub(crate) async fn subscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            Sender::V4(c) => c
                .subscribe(filter, QoS::AtLeastOnce)
                .await
                .map_err(|e| e.to_string()),
            Sender::V5(c, _) => c
                .subscribe(filter, v5::mqttbytes::QoS::AtLeastOnce)
                .await
                .map_err(|e| e.to_string()),
        }
    }
}

impl Link {
    /// Polls once: connects first when not connected.
    pub(crate) async fn poll(&mut self) -> Result<Happening, LinkError> {
        match self {
            Link::V4(el, _) => el.poll().await.map(happening_v4).map_err(LinkError::V4),
            Link::V5(el, _) => el.poll().await.map(happening_v5).map_err(LinkError::V5),
        }
    }

    /// Drops the network connection, so the next poll makes a new one.
    pub(crate) fn drop_connection(&mut self) {
        match self {
            Link::V4(el, _) => el.clean(),
            Link::V5(el, _) => el.clean(),
        }
        self.forget_old_connection();
    }

    /// Drops what rumqttc remembers of a finished connection beyond its own `clean()`: its
    /// events, a packet-id collision, and the publishes it would send again before anything
    /// new (it keeps them when a broker answers "session present"). The gateway re-sends from
    /// its ledger and the disk; a publish rumqttc re-sent on its own would shift the window's
    /// pkid-to-record mapping.
    pub(crate) fn forget_old_connection(&mut self) {
        match self {
            Link::V4(el, _) => {
                el.state.events.clear();
                el.state.collision = None;
                el.pending.clear();
            }
            Link::V5(el, _) => {
                el.state.events.clear();
                el.state.collision = None;
                el.pending.clear();
            }
        }
    }

    /// Sets what the next connection attempt is made with, on a state made new: rumqttc keeps
    /// its packet-id counter and the last broker's receive maximum across connections, and a
    /// counter left above a smaller new maximum would run past its table.
    pub(crate) fn prepare(&mut self, p: Prepared) {
        match self {
            Link::V4(el, inflight) => {
                el.state = rumqttc::MqttState::new(*inflight, false);
                let o = &mut el.mqtt_options;
                o.set_transport(p.transport);
                if let Some((user, password)) = p.credentials {
                    o.set_credentials(user, password);
                }
                if let Some((topic, payload)) = p.will {
                    let will = rumqttc::LastWill {
                        topic,
                        message: payload,
                        qos: QoS::AtLeastOnce,
                        retain: p.will_retained,
                    };
                    o.set_last_will(will);
                }
            }
            Link::V5(el, inflight) => {
                el.state = v5::MqttState::new(*inflight, false);
                let o = &mut el.options;
                o.set_transport(p.transport);
                if let Some((user, password)) = p.credentials {
                    o.set_credentials(user, password);
                }
                if let Some((topic, payload)) = p.will {
                    let will = LastWill5 {
                        topic: Bytes::from(topic),
                        message: payload,
                        qos: v5::mqttbytes::QoS::AtLeastOnce,
                        retain: p.will_retained,
                        properties: None,
                    };
                    o.set_last_will(will);
                }
            }
        }
    }
}

fn happening_v4(event: Event) -> Happening {
    match event {
        Event::Incoming(Packet::ConnAck(ack)) => Happening::Connected {
            session_present: ack.session_present,
            limits: BrokerLimits::NONE,
        },
        Event::Incoming(Packet::PubAck(ack)) => Happening::Acked {
            pkid: ack.pkid,
            refused: None,
        },
        Event::Incoming(Packet::SubAck(ack)) => subscription(
            ack.return_codes
                .iter()
                .filter(|c| matches!(c, rumqttc::mqttbytes::v4::SubscribeReasonCode::Failure))
                .count(),
        ),
        Event::Incoming(Packet::Publish(p)) => Happening::Message {
            topic: p.topic,
            payload: p.payload,
            retain: p.retain,
        },
        Event::Outgoing(out) => happening_outgoing(out),
        Event::Incoming(_) => Happening::Other,
    }
}

fn happening_v5(event: v5::Event) -> Happening {
    match event {
        v5::Event::Incoming(Packet5::ConnAck(ack)) => Happening::Connected {
            session_present: ack.session_present,
            limits: BrokerLimits::from_v5(&ack),
        },
        v5::Event::Incoming(Packet5::PubAck(ack)) => Happening::Acked {
            pkid: ack.pkid,
            refused: refusal(ack.reason).map(|(code, name)| Refusal {
                code,
                name,
                reason: ack.properties.and_then(|p| p.reason_string),
            }),
        },
        v5::Event::Incoming(Packet5::SubAck(ack)) => subscription(
            ack.return_codes
                .iter()
                .filter(|c| !matches!(c, v5::mqttbytes::v5::SubscribeReasonCode::Success(_)))
                .count(),
        ),
        v5::Event::Incoming(Packet5::Publish(p)) => Happening::Message {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
            retain: p.retain,
        },
        v5::Event::Outgoing(out) => happening_outgoing(out),
        v5::Event::Incoming(_) => Happening::Other,
    }
}

fn subscription(refused: usize) -> Happening {
    if refused == 0 {
        Happening::Other
    } else {
        Happening::SubscriptionRefused { refused }
    }
}

fn happening_outgoing(out: Outgoing) -> Happening {
    match out {
        // Packet id 0 is a QoS 0 publish (a command reply): never acknowledged, never in the
        // window.
        Outgoing::Publish(0) => Happening::Qos0Written,
        Outgoing::Publish(pkid) => Happening::Sent(pkid),
        Outgoing::AwaitAck(pkid) => Happening::Collision(pkid),
        Outgoing::Disconnect => Happening::DisconnectSent,
        _ => Happening::Other,
    }
}

/// The code and name of a PUBACK reason that refuses the publish; `None` for success (and
/// "no matching subscribers", which is a success: the broker took the message).
fn refusal(reason: PubAckReason) -> Option<(u8, &'static str)> {
    let code = match reason {
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => return None,
        PubAckReason::UnspecifiedError => 0x80,
        PubAckReason::ImplementationSpecificError => 0x83,
        PubAckReason::NotAuthorized => 0x87,
        PubAckReason::TopicNameInvalid => 0x90,
        PubAckReason::PacketIdentifierInUse => 0x91,
        PubAckReason::QuotaExceeded => 0x97,
        PubAckReason::PayloadFormatInvalid => 0x99,
    };
    let name = PUBACK_REFUSALS
        .iter()
        .find(|(c, _)| *c == code)
        .map_or("unspecified error", |(_, name)| name);
    Some((code, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_matching_subscribers_is_a_success_and_every_other_failure_code_a_refusal() {
        assert_eq!(refusal(PubAckReason::Success), None);
        assert_eq!(refusal(PubAckReason::NoMatchingSubscribers), None);
        assert_eq!(
            refusal(PubAckReason::QuotaExceeded),
            Some((0x97, "quota exceeded"))
        );
        assert_eq!(
            refusal(PubAckReason::NotAuthorized),
            Some((0x87, "not authorized"))
        );
    }

    #[test]
    fn a_v5_connack_without_properties_allows_everything_and_no_aliases() {
        let ack = ConnAck5 {
            session_present: false,
            code: v5::mqttbytes::v5::ConnectReturnCode::Success,
            properties: None,
        };
        assert_eq!(BrokerLimits::from_v5(&ack), BrokerLimits::NONE);
    }
}
