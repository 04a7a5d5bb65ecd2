//! A TLS-terminating front for a plain TCP upstream (the embedded rumqttd broker, or a fake
//! broker): it listens on 127.0.0.1:0, completes each TLS handshake with rustls (ring provider)
//! and the server certificate it is given, optionally requiring a client certificate signed by
//! a CA, and pipes the plaintext to the upstream. It counts the handshakes that completed and
//! failed and keeps what rustls said of each failure, so a test can tell that a client was
//! refused at the TLS layer and never reached the broker. This gives rumqttd a TLS listener
//! without rumqttd's own TLS feature (which would bring aws-lc-rs).
//!
//! This file is also compiled into the gateway's own unit tests (by path), so it uses nothing
//! but tokio, tokio-util, rustls, tokio-rustls and anyhow.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How long a client may take over its side of the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How the front speaks TLS.
#[derive(Debug, Clone)]
pub struct FrontConfig {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    alpn: Vec<Vec<u8>>,
    tls12_only: bool,
}

impl FrontConfig {
    /// Presents the certificate (chain) in the PEM file `cert`, with the key in `key`; asks for
    /// no client certificate.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        FrontConfig {
            cert: cert.into(),
            key: key.into(),
            client_ca: None,
            alpn: Vec::new(),
            tls12_only: false,
        }
    }

    /// Requires a client certificate signed by the CA in the PEM file `ca`.
    pub fn require_client_cert(mut self, ca: impl Into<PathBuf>) -> Self {
        self.client_ca = Some(ca.into());
        self
    }

    /// Accepts only clients that offer the ALPN protocol `protocol` (or offer none).
    pub fn alpn(mut self, protocol: &str) -> Self {
        self.alpn.push(protocol.as_bytes().to_vec());
        self
    }

    /// Speaks TLS 1.2 only (where a refused client certificate fails the client's handshake
    /// itself, not its first read after it).
    pub fn tls12_only(mut self) -> Self {
        self.tls12_only = true;
        self
    }

    fn server_config(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone());
        let builder = if self.tls12_only {
            builder.with_protocol_versions(&[&rustls::version::TLS12])?
        } else {
            builder.with_safe_default_protocol_versions()?
        };
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs(ca)? {
                    roots.add(cert)?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .with_context(|| format!("reading {}", self.key.display()))?;
        let mut config = builder.with_single_cert(read_certs(&self.cert)?, key)?;
        config.alpn_protocols = self.alpn.clone();
        Ok(Arc::new(config))
    }
}

fn read_certs(path: &std::path::Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)
        .with_context(|| format!("opening {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {}", path.display()))
}

/// rustls' ring provider (deprecated in rustls 0.23.48 for lacking post-quantum key exchange;
/// the gateway uses it to keep its build free of cmake and a large C build).
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a completed handshake agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The ALPN protocol agreed on.
    pub alpn: Option<Vec<u8>>,
    /// The server name the client sent (SNI; rustls sends none for an IP address).
    pub sni: Option<String>,
    /// Whether the client presented a certificate.
    pub client_cert: bool,
}

struct Shared {
    config: Mutex<Arc<ServerConfig>>,
    upstream: Mutex<SocketAddr>,
    handshakes: AtomicUsize,
    failed: AtomicUsize,
    failures: Mutex<Vec<String>>,
    sessions: Mutex<Vec<Session>>,
}

/// The front; it stops (and cuts every connection through it) when dropped.
pub struct TlsFront {
    addr: SocketAddr,
    shared: Arc<Shared>,
    generation: watch::Sender<u64>,
    cancel: CancellationToken,
}

impl TlsFront {
    /// Starts a front on 127.0.0.1 (an ephemeral port) for `upstream`.
    pub async fn start(upstream: SocketAddr, config: FrontConfig) -> anyhow::Result<TlsFront> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config: Mutex::new(config.server_config()?),
            upstream: Mutex::new(upstream),
            handshakes: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            failures: Mutex::new(Vec::new()),
            sessions: Mutex::new(Vec::new()),
        });
        let (generation, _) = watch::channel(0u64);
        let cancel = CancellationToken::new();
        let (s, g, c) = (shared.clone(), generation.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = c.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                let (s, cut, c) = (s.clone(), g.subscribe(), c.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = serve(client, &s, cut) => {}
                        _ = c.cancelled() => {}
                    }
                });
            }
        });
        Ok(TlsFront {
            addr,
            shared,
            generation,
            cancel,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Speaks TLS as `config` says from the next connection on (live ones keep theirs).
    pub fn reconfigure(&self, config: FrontConfig) -> anyhow::Result<()> {
        let config = config.server_config()?;
        *lock(&self.shared.config) = config;
        Ok(())
    }

    /// Pipes new connections to `upstream`.
    pub fn repoint(&self, upstream: SocketAddr) {
        *lock(&self.shared.upstream) = upstream;
    }

    /// Cuts every live connection (new ones are accepted as before).
    pub fn cut(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Handshakes completed.
    pub fn handshakes(&self) -> usize {
        self.shared.handshakes.load(Ordering::SeqCst)
    }

    /// Handshakes that failed (including clients that left or stalled in the middle).
    pub fn failed_handshakes(&self) -> usize {
        self.shared.failed.load(Ordering::SeqCst)
    }

    /// What rustls said of each failed handshake, in order.
    pub fn failures(&self) -> Vec<String> {
        lock(&self.shared.failures).clone()
    }

    /// What each completed handshake agreed on, in order.
    pub fn sessions(&self) -> Vec<Session> {
        lock(&self.shared.sessions).clone()
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One client: the handshake, then the pipe to the upstream until either side closes or the
/// front cuts it.
async fn serve(client: TcpStream, shared: &Shared, mut cut: watch::Receiver<u64>) {
    let config = lock(&shared.config).clone();
    let failed = |what: String| {
        shared.failed.fetch_add(1, Ordering::SeqCst);
        lock(&shared.failures).push(what);
    };
    let handshake =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(client));
    let mut tls = match handshake.await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return failed(e.to_string()),
        Err(_) => return failed(format!("no handshake within {HANDSHAKE_TIMEOUT:?}")),
    };
    shared.handshakes.fetch_add(1, Ordering::SeqCst);
    let (_, session) = tls.get_ref();
    lock(&shared.sessions).push(Session {
        alpn: session.alpn_protocol().map(<[u8]>::to_vec),
        sni: session.server_name().map(str::to_owned),
        client_cert: session.peer_certificates().is_some_and(|c| !c.is_empty()),
    });
    let upstream = *lock(&shared.upstream);
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut tls, &mut server) => {}
        _ = cut.changed() => {}
    }
}
