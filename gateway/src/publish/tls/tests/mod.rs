//! TLS with real handshakes: rumqttc connects with [`client_config`]'s configuration through a
//! TLS front (tokio-rustls, on 127.0.0.1:0) to a fake broker that answers the CONNECT, and each
//! failure is named by [`describe_failure`] from the error rumqttc returns.
//!
//! The test certificates and the TLS front are the tests crate's own (compiled in by path).

#[path = "../../../../../tests/src/pki.rs"]
#[allow(dead_code)]
mod pki;
#[path = "../../../../../tests/src/tls_front.rs"]
#[allow(dead_code)]
mod tls_front;

mod client;
mod handshake;
mod inspect;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, MqttOptions, Packet, TlsConfiguration, Transport,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::client_config;
use crate::config::TlsSettings;
use crate::secret::SecretSource;
use pki::{CertFiles, Pki};
use tls_front::{FrontConfig, TlsFront};

/// How long a connection attempt may take before the test gives up on it (a hang, not a
/// timing goal).
const ATTEMPT: Duration = Duration::from_secs(20);

/// TLS settings trusting `ca` only.
fn trusting(ca: &Path) -> TlsSettings {
    TlsSettings {
        ca_file: Some(ca.to_owned()),
        ..TlsSettings::default()
    }
}

/// `tls` with the client certificate `files`.
fn with_client(tls: TlsSettings, files: &CertFiles) -> TlsSettings {
    TlsSettings {
        cert_file: Some(files.cert.clone()),
        key_file: Some(SecretSource::File(files.key.clone())),
        ..tls
    }
}

/// A fake MQTT broker on 127.0.0.1:0 that answers each CONNECT with an accepting CONNACK (for
/// MQTT 3.1.1 or 5, as the CONNECT asks) and then keeps the connection open, reading.
async fn fake_broker() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(connect) = read_packet(&mut stream).await else {
                    return;
                };
                // The protocol level follows the protocol name "MQTT" (2 + 4 bytes).
                let connack: &[u8] = match connect.get(6) {
                    Some(5) => &[0x20, 0x03, 0x00, 0x00, 0x00],
                    _ => &[0x20, 0x02, 0x00, 0x00],
                };
                if stream.write_all(connack).await.is_err() {
                    return;
                }
                let mut sink = [0u8; 1024];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

/// One MQTT packet's variable header and payload.
async fn read_packet(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let _kind = stream.read_u8().await.ok()?;
    let mut len = 0usize;
    for shift in [0, 7, 14, 21] {
        let byte = stream.read_u8().await.ok()?;
        len |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.ok()?;
    Some(body)
}

/// A fake broker behind a TLS front configured by `config`.
async fn tls_broker(config: FrontConfig) -> TlsFront {
    TlsFront::start(fake_broker().await, config).await.unwrap()
}

/// A TLS front presenting `files`, asking for no client certificate.
async fn presenting(files: &CertFiles) -> TlsFront {
    tls_broker(FrontConfig::new(&files.cert, &files.key)).await
}

/// Connects to `host`:`port` over TLS as `tls` says, with MQTT 3.1.1, until the CONNACK or an
/// error.
async fn connect(tls: &TlsSettings, host: &str, port: u16) -> Result<(), ConnectionError> {
    let config = client_config(tls, host).unwrap();
    let mut options = MqttOptions::new("gw", host, port);
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    let (_client, mut events) = AsyncClient::new(options, 10);
    let attempt = async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    };
    tokio::time::timeout(ATTEMPT, attempt)
        .await
        .expect("the attempt ends")
}

/// [`connect`], expecting a failure, and what [`super::describe_failure`] says of it.
async fn failure(tls: &TlsSettings, host: &str, port: u16) -> String {
    match connect(tls, host, port).await {
        Ok(()) => panic!("connected"),
        Err(e) => {
            super::describe_failure(&e).unwrap_or_else(|| panic!("no TLS cause found in {e:?}"))
        }
    }
}

/// Waits until `front` has counted `n` failed handshakes: it counts one when its side of the
/// handshake ends, which may be just after the client's.
async fn failed_handshakes_reach(front: &TlsFront, n: usize) {
    let wait = async {
        while front.failed_handshakes() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(ATTEMPT, wait)
        .await
        .unwrap_or_else(|_| panic!("{} failed handshakes, not {n}", front.failed_handshakes()));
    assert_eq!(front.failed_handshakes(), n);
}

/// The PKI of a test.
fn pki() -> Pki {
    Pki::generate().unwrap()
}

/// The files of `pki` copied where a test may change them.
fn copy_to(dir: &Path, from: &Path, name: &str) -> std::path::PathBuf {
    let to = dir.join(name);
    std::fs::copy(from, &to).unwrap();
    to
}

/// rustls' ring provider, for the tests' own servers.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    super::provider()
}
