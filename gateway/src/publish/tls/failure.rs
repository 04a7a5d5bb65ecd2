//! The cause of a failed TLS connection, in one log line.
//!
//! How rumqttc 0.25 hands rustls' errors over: the handshake runs in `tls::tls_connect`, and
//! tokio-rustls turns a rustls error into an `io::Error` (kind `InvalidData`) wrapping the
//! `rustls::Error`, so a refused certificate arrives as
//! `ConnectionError::Tls(TlsError::Io(io::Error(rustls::Error)))`; a peer that closes during the
//! handshake as the same with an `UnexpectedEof` and no rustls error. An alert the broker sends
//! after the client's side of the handshake is done (TLS 1.3: the broker checks the client's
//! certificate last) is met reading the CONNACK, as
//! `ConnectionError::MqttState(StateError::Deserialization(Error::Io(io::Error(rustls::Error))))`,
//! or writing the CONNECT, as `MqttState(StateError::Io(..))`. MQTT 5's `ConnectionError` nests
//! them the same way. So the cause is found by walking the error's sources, looking inside
//! each `io::Error`.

use std::error::Error as StdError;
use std::io;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{InvalidDnsNameError, UnixTime};
use rustls::{AlertDescription, CertificateError, Error as RustlsError};

/// One line naming the cause of a connection failure, when TLS failed; `None` for any other
/// failure.
pub(crate) fn describe_failure(err: &rumqttc::ConnectionError) -> Option<String> {
    describe(err)
}

/// [`describe_failure`] for an MQTT 5 connection.
pub(crate) fn describe_failure_v5(err: &rumqttc::v5::ConnectionError) -> Option<String> {
    describe(err)
}

/// The cause of `err`, from the first TLS error among its sources.
fn describe(err: &(dyn StdError + 'static)) -> Option<String> {
    let mut handshake = false;
    let mut next = Some(err);
    while let Some(e) = next {
        if e.is::<rumqttc::TlsError>() {
            handshake = true;
        }
        if let Some(rustls) = e.downcast_ref::<RustlsError>() {
            return Some(rustls_cause(rustls));
        }
        if e.is::<InvalidDnsNameError>() {
            return Some(
                "the broker's host is not a DNS name or IP address a certificate can be checked against"
                    .to_owned(),
            );
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if let Some(rustls) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<RustlsError>())
            {
                return Some(rustls_cause(rustls));
            }
            let closed = matches!(
                io.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            );
            if handshake && closed {
                return Some(
                    "the broker does not speak TLS on this port (it closed the connection during the handshake)"
                        .to_owned(),
                );
            }
        }
        next = e.source();
    }
    None
}

/// What a rustls error means for the operator.
fn rustls_cause(err: &RustlsError) -> String {
    match err {
        RustlsError::InvalidCertificate(cert) => certificate_cause(cert),
        RustlsError::AlertReceived(alert) => alert_cause(*alert),
        RustlsError::InvalidMessage(_) | RustlsError::InappropriateMessage { .. } => {
            format!("the broker does not speak TLS on this port (it answered with something that is not TLS: {err})")
        }
        RustlsError::NoApplicationProtocol => {
            "the broker accepted none of the ALPN protocols offered (mqtt.alpn)".to_owned()
        }
        RustlsError::PeerIncompatible(_) => {
            format!("the broker's TLS and the gateway's have nothing in common: {err}")
        }
        other => format!("TLS failed: {other}"),
    }
}

fn certificate_cause(err: &CertificateError) -> String {
    match err {
        CertificateError::UnknownIssuer => {
            "the broker's certificate is not signed by a trusted CA (unknown CA)".to_owned()
        }
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => {
            let presented = if presented.is_empty() {
                "no name".to_owned()
            } else {
                presented
                    .iter()
                    .map(|name| presented_name(name))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!(
                "name mismatch: the certificate is for {presented}, not {}",
                expected.to_str()
            )
        }
        CertificateError::NotValidForName => {
            "name mismatch: the broker's certificate is not for the name the gateway checks".to_owned()
        }
        CertificateError::ExpiredContext { not_after, .. } => format!(
            "the broker's certificate expired (on {})",
            super::expiry::date(unix_time(*not_after))
        ),
        CertificateError::Expired => "the broker's certificate expired".to_owned(),
        CertificateError::NotValidYetContext { not_before, .. } => format!(
            "the broker's certificate is not valid yet (from {}): is the gateway's clock right?",
            super::expiry::date(unix_time(*not_before))
        ),
        CertificateError::NotValidYet => {
            "the broker's certificate is not valid yet: is the gateway's clock right?".to_owned()
        }
        CertificateError::BadSignature => {
            "bad signature: the broker's certificate or handshake is not signed by the key it claims"
                .to_owned()
        }
        CertificateError::Revoked => "the broker's certificate is revoked".to_owned(),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "the broker's certificate is not for a TLS server (its extended key usage)".to_owned()
        }
        other => format!("the broker's certificate was refused: {other}"),
    }
}

/// A name as rustls reports it (`DnsName("broker")`, `IpAddress(0::1)`), as the name alone.
fn presented_name(debug: &str) -> String {
    let inner = |prefix: &str| {
        debug
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(')'))
    };
    if let Some(dns) = inner("DnsName(") {
        return dns.trim_matches('"').to_owned();
    }
    if let Some(ip) = inner("IpAddress(") {
        return ip
            .parse::<std::net::IpAddr>()
            .map_or_else(|_| ip.to_owned(), |ip| ip.to_string());
    }
    debug.to_owned()
}

fn unix_time(time: UnixTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(time.as_secs())
}

fn alert_cause(alert: AlertDescription) -> String {
    let name = alert_name(alert);
    match alert {
        AlertDescription::CertificateRequired => format!(
            "the broker rejected the connection without a client certificate (alert: {name}): set mqtt.cert_file and mqtt.key_file"
        ),
        AlertDescription::BadCertificate
        | AlertDescription::UnsupportedCertificate
        | AlertDescription::CertificateRevoked
        | AlertDescription::CertificateExpired
        | AlertDescription::CertificateUnknown
        | AlertDescription::UnknownCA
        | AlertDescription::AccessDenied => {
            format!("the broker rejected the client certificate (alert: {name})")
        }
        _ => format!("the broker refused the handshake (alert: {name})"),
    }
}

/// An alert's name in words: `UnknownCA` is "unknown CA", `HandshakeFailure` "handshake failure".
fn alert_name(alert: AlertDescription) -> String {
    let debug = format!("{alert:?}");
    let mut words: Vec<String> = Vec::new();
    let mut previous_lower = false;
    for c in debug.chars() {
        if c.is_ascii_uppercase() && previous_lower || words.is_empty() {
            words.push(String::new());
        }
        previous_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        if let Some(word) = words.last_mut() {
            word.push(c);
        }
    }
    words
        .iter()
        .map(|word| {
            let acronym = word.len() > 1 && word.chars().all(|c| c.is_ascii_uppercase());
            if acronym {
                word.clone()
            } else {
                word.to_ascii_lowercase()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presented_names_lose_their_rustls_wrapping() {
        assert_eq!(
            presented_name("DnsName(\"broker.example\")"),
            "broker.example"
        );
        assert_eq!(presented_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(presented_name("IpAddress(0::1)"), "::1");
        assert_eq!(presented_name("Uri(x)"), "Uri(x)");
    }

    #[test]
    fn alert_names_read_as_words_with_acronyms_kept() {
        assert_eq!(alert_name(AlertDescription::UnknownCA), "unknown CA");
        assert_eq!(
            alert_name(AlertDescription::HandshakeFailure),
            "handshake failure"
        );
        assert_eq!(
            alert_name(AlertDescription::NoApplicationProtocol),
            "no application protocol"
        );
    }
}
