//! The HTTP API: `/metrics` (Prometheus), `/health`, `/ready`, `/api/tags`, `/api/devices`,
//! `/api/history`, `POST /api/reload` and the status page at `/`, on the `[api] listen`
//! address, with optional basic auth and HTTPS.
//!
//! An HTTP/1.1 server (hyper) in a thin async shell: one task accepts, each connection is a
//! task of its own, at most [`MAX_CONNECTIONS`] at a time (one more is closed at once), each
//! with a deadline for its request head and its TLS handshake. Every answer is computed from
//! what the pipeline keeps anyway (the [`Metrics`] and [`DeviceStatus`] atomics, the
//! [`Latest`] table), so the API adds nothing to the hot path but the writer's fold into
//! [`Latest`]. The server stops when its cancellation token is cancelled (at shutdown).
//!
//! The password is read once at start, kept only as the expected `Authorization` header
//! (zeroed when dropped) and compared without an early exit; it never reaches a log line.
//!
//! [`DeviceStatus`]: protocols::driver::DeviceStatus

pub mod health;
mod history;
mod latest;
mod prom;
mod views;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use protocols::model::{Catalog, DeviceId, Timestamp};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use crate::config::ApiSettings;
use crate::metrics::Metrics;
use crate::pipeline::DeviceHandle;
pub use latest::Latest;

/// Connections served at once; one more is closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client has for its TLS handshake and for each request's head.
const CLIENT_DEADLINE: Duration = Duration::from_secs(10);
/// The status page, with its style and script: no external asset.
const PAGE: &str = include_str!("page.html");

/// Why the API cannot start. None carries the password or a key.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The listen address cannot be bound (in use, not an address of this host, privileged).
    #[error("api.listen: cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The password cannot be read.
    #[error("api.password_file: {0}")]
    Password(#[source] crate::secret::SecretError),
    /// The certificate or key cannot be loaded.
    #[error("api TLS: {0}")]
    Tls(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A reload asked for with `POST /api/reload`: the future says what was done (`Ok`) or why
/// the configuration was refused (`Err`), in one line each.
pub type ReloadHook =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + Send + Sync>;

/// What the API knows of a device beyond its counters.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// How often the device is scanned (its fastest tag); `None` when it reports on change
    /// only (an OPC UA subscription).
    pub scan_interval: Option<Duration>,
}

/// The devices as the API sees them: `devices[i]` and `infos[i]` are the catalog's device `i`.
/// Replaced whole at a reload ([`ApiState::set_devices`]).
#[derive(Debug)]
pub struct DeviceView {
    pub(crate) devices: Vec<DeviceHandle>,
    pub(crate) infos: Vec<DeviceInfo>,
    /// The catalog ids of `devices` (a reload leaves old ids in the catalog).
    pub(crate) ids: Vec<DeviceId>,
    pub(crate) catalog: Arc<Catalog>,
}

/// The current [`DeviceView`], shared by the API's handlers and its metrics collector.
pub(crate) type SharedView = Arc<std::sync::RwLock<Arc<DeviceView>>>;

/// The view in force (a poisoned lock still holds a whole view).
pub(crate) fn current(view: &SharedView) -> Arc<DeviceView> {
    match view.read() {
        Ok(v) => v.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

/// Everything the API reads, shared with the pipeline.
pub struct ApiState {
    gateway: Arc<str>,
    boot: u64,
    metrics: Arc<Metrics>,
    view: SharedView,
    latest: Arc<Latest>,
    registry: Registry,
    ready: AtomicBool,
    reload: OnceLock<ReloadHook>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("gateway", &self.gateway)
            .field("devices", &current(&self.view).devices.len())
            .finish_non_exhaustive()
    }
}

impl ApiState {
    /// The API's view of a gateway: `devices[i]` and `infos[i]` are the catalog's device `i`.
    pub fn new(
        (gateway, boot): (Arc<str>, u64),
        metrics: Arc<Metrics>,
        devices: Vec<DeviceHandle>,
        infos: Vec<DeviceInfo>,
        ids: Vec<DeviceId>,
        catalog: Arc<Catalog>,
        latest: Arc<Latest>,
    ) -> ApiState {
        let view: SharedView = Arc::new(std::sync::RwLock::new(Arc::new(DeviceView {
            devices,
            infos,
            ids,
            catalog,
        })));
        let registry = prom::registry(prom::GatewayCollector {
            metrics: metrics.clone(),
            view: view.clone(),
        });
        ApiState {
            gateway,
            boot,
            metrics,
            view,
            latest,
            registry,
            ready: AtomicBool::new(false),
            reload: OnceLock::new(),
        }
    }

    /// The devices after a reload.
    pub fn set_devices(
        &self,
        devices: Vec<DeviceHandle>,
        infos: Vec<DeviceInfo>,
        ids: Vec<DeviceId>,
        catalog: Arc<Catalog>,
    ) {
        self.latest.keep_only(&ids);
        let view = Arc::new(DeviceView {
            devices,
            infos,
            ids,
            catalog,
        });
        match self.view.write() {
            Ok(mut v) => *v = view,
            Err(poisoned) => *poisoned.into_inner() = view,
        }
    }

    /// Says whether the pipeline runs (`/ready`).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// RELOAD HOOK: what `POST /api/reload` runs. Set once; without it the API answers 501.
    /// Returns `false` when a hook was set already.
    pub fn set_reload_hook(&self, hook: ReloadHook) -> bool {
        self.reload.set(hook).is_ok()
    }

    fn health(&self) -> health::Health {
        let view = current(&self.view);
        let probes: Vec<health::DeviceProbe<'_>> = view
            .devices
            .iter()
            .zip(&view.infos)
            .map(|(d, info)| health::DeviceProbe {
                name: &d.name,
                connected: d.status.is_connected(),
                last_answer_ms: d.status.last_answer_ms.load(Ordering::Relaxed),
                scan_interval: info.scan_interval,
            })
            .collect();
        health::evaluate(
            self.metrics.mqtt_connected.load(Ordering::Relaxed),
            self.metrics.buffer_failing.load(Ordering::Relaxed),
            &probes,
            Timestamp::now().unix_ms(),
        )
    }

    fn tags_json(&self) -> Vec<u8> {
        let rows = self.latest.snapshot();
        let now = Timestamp::now().unix_ms();
        let view = current(&self.view);
        let mut tags = Vec::with_capacity(view.catalog.tag_count());
        let entries = view
            .ids
            .iter()
            .filter_map(|&id| view.catalog.device(id).map(|e| (id, e)));
        for (id, entry) in entries {
            let row = rows.get(id.0 as usize);
            for (i, name) in entry.tags.iter().enumerate() {
                let sample = row.and_then(|r| r.get(i)).and_then(Option::as_ref);
                tags.push(views::TagView::new(&entry.name, name, sample, now));
            }
        }
        to_body(&views::TagsView { tags })
    }

    /// The last minutes of every numeric tag that has a history, for the sparklines: one point
    /// per step (`null` for a step without a value), oldest first, the last for the step now.
    fn history_json(&self) -> Vec<u8> {
        let now = Timestamp::now();
        let view = current(&self.view);
        let tags: Vec<(usize, usize, &str, &str)> = view
            .ids
            .iter()
            .filter_map(|&id| view.catalog.device(id).map(|e| (id, e)))
            .flat_map(|(id, entry)| {
                entry
                    .tags
                    .iter()
                    .enumerate()
                    .map(move |(i, name)| (id.0 as usize, i, &*entry.name, &**name))
            })
            .collect();
        let points = self
            .latest
            .history(tags.iter().map(|t| (t.0, t.1)), history::step_of(now));
        let tags = tags
            .iter()
            .zip(&points)
            .filter_map(|(t, p)| {
                p.as_ref().map(|p| views::HistoryView {
                    device: t.2,
                    tag: t.3,
                    points: p.as_slice(),
                })
            })
            .collect();
        to_body(&views::HistoriesView {
            step_s: history::STEP_MS / 1000,
            points: history::POINTS,
            tags,
        })
    }

    fn devices_json(&self) -> serde_json::Value {
        let m = &self.metrics;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let now = Timestamp::now().unix_ms();
        let health = self.health();
        let view = current(&self.view);
        let devices: Vec<serde_json::Value> = view
            .devices
            .iter()
            .zip(&view.infos)
            .map(|(d, info)| {
                let s = &d.status;
                let answered = get(&s.last_answer_ms);
                json!({
                    "name": &*d.name,
                    "ok": !health.devices_failing.iter().any(|f| **f == *d.name),
                    "connected": s.is_connected(),
                    "scans": get(&s.scans),
                    "requests": get(&s.requests),
                    "errors": get(&s.errors),
                    "reconnects": get(&s.reconnects),
                    "overruns": get(&s.overruns),
                    "samples": get(&s.samples),
                    "last_scan_s": get(&s.last_scan_us) as f64 / 1e6,
                    "last_answer_age_s": (answered != 0).then(|| now.saturating_sub(answered) as f64 / 1e3),
                    "scan_interval_s": info.scan_interval.map(|i| i.as_secs_f64()),
                })
            })
            .collect();
        json!({
            "gateway": &*self.gateway,
            "boot": self.boot,
            "time_ms": now,
            "status": health.status,
            "reasons": health.reasons,
            "broker": {
                "connected": m.mqtt_connected.load(Ordering::Relaxed),
                "connections": get(&m.mqtt_connects),
                "published": get(&m.published),
                "acknowledged": get(&m.acked),
            },
            "buffer": {
                "records": get(&m.buffer_records),
                "bytes": get(&m.buffer_bytes),
                "oldest_age_s": get(&m.oldest_age_ms) as f64 / 1e3,
                "failing": m.buffer_failing.load(Ordering::Relaxed),
                "evicted": get(&m.evicted),
                "lost_commits": get(&m.lost_commits),
            },
            "samples": get(&m.samples),
            "records": get(&m.records),
            "devices": devices,
        })
    }
}

/// The running API server.
#[derive(Debug)]
pub struct ApiServer {
    /// The address it listens on (the port the OS chose for port 0).
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl ApiServer {
    /// Waits until the server has stopped (after its token was cancelled).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

/// What each connection task needs.
struct Server {
    state: Arc<ApiState>,
    /// The `Authorization` header a client must send; `None`: no auth.
    expected_auth: Option<Zeroizing<String>>,
}

/// The API's listening socket with its password and TLS configuration, made before the
/// pipeline starts so that a bad address or file stops the start before any task runs.
pub struct Bound {
    listener: TcpListener,
    addr: SocketAddr,
    expected_auth: Option<Zeroizing<String>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Reads the password and the TLS files and binds `settings.listen`.
pub async fn bind(settings: &ApiSettings) -> Result<Bound, ApiError> {
    use base64::Engine as _;
    let expected_auth = match &settings.auth {
        Some(auth) => {
            let password = auth.password_file.read().map_err(ApiError::Password)?;
            let pair = Zeroizing::new(format!("{}:{}", auth.username, password.expose()));
            let encoded = base64::engine::general_purpose::STANDARD.encode(pair.as_bytes());
            Some(Zeroizing::new(format!("Basic {encoded}")))
        }
        None => None,
    };
    let tls = match &settings.tls {
        Some(tls) => {
            let config = crate::publish::tls::server_config(&tls.cert_file, &tls.key_file)
                .map_err(|e| ApiError::Tls(Box::new(e)))?;
            Some(tokio_rustls::TlsAcceptor::from(config))
        }
        None => None,
    };
    let bind_error = |source| ApiError::Bind {
        addr: settings.listen,
        source,
    };
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    Ok(Bound {
        listener,
        addr,
        expected_auth,
        tls,
    })
}

/// Serves on `bound` until `cancel` is cancelled.
pub fn serve(bound: Bound, state: Arc<ApiState>, cancel: CancellationToken) -> ApiServer {
    let Bound {
        listener,
        addr,
        expected_auth,
        tls,
    } = bound;
    let scheme = if tls.is_some() { "https" } else { "http" };
    info!(%addr, scheme, auth = expected_auth.is_some(), "HTTP API listening");
    let server = Arc::new(Server {
        state,
        expected_auth,
    });
    let task = tokio::spawn(accept_loop(listener, server, tls, cancel));
    ApiServer { addr, task }
}

async fn accept_loop(
    listener: TcpListener,
    server: Arc<Server>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut warned_full = false;
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                debug!(error = %e, "API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            if !std::mem::replace(&mut warned_full, true) {
                warn!(
                    max = MAX_CONNECTIONS,
                    "API: too many connections; closing new ones"
                );
            }
            continue;
        };
        warned_full = false;
        let server = Arc::clone(&server);
        let tls = tls.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                () = cancel.cancelled() => {}
                () = serve_connection(stream, peer, server, tls) => {}
            }
        });
    }
    debug!("HTTP API stopped");
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    server: Arc<Server>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let service = hyper::service::service_fn(move |req| {
        let server = Arc::clone(&server);
        async move { Ok::<_, Infallible>(server.handle(req).await) }
    });
    let http = {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(CLIENT_DEADLINE);
        b
    };
    let result = match tls {
        None => http.serve_connection(TokioIo::new(stream), service).await,
        Some(acceptor) => {
            let stream = match tokio::time::timeout(CLIENT_DEADLINE, acceptor.accept(stream)).await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "API TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "API TLS handshake timed out");
                    return;
                }
            };
            http.serve_connection(TokioIo::new(stream), service).await
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "API connection ended with an error");
    }
}

type Answer = Response<Full<Bytes>>;

fn answer(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn json_answer(status: StatusCode, body: &serde_json::Value) -> Answer {
    answer(status, "application/json", body.to_string())
}

/// A view serialized into a body; a view of plain data cannot fail to serialize.
fn to_body(view: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(view).unwrap_or_else(|_| b"{\"error\":\"cannot serialize\"}".to_vec())
}

/// Compares without stopping at the first difference, so the time taken says nothing about
/// how much of the password was right.
fn same(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, e) in expected.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ e);
    }
    diff == 0
}

impl Server {
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(expected) = &self.expected_auth else {
            return true;
        };
        req.headers()
            .get(AUTHORIZATION)
            .is_some_and(|given| same(given.as_bytes(), expected.as_bytes()))
    }

    async fn handle(&self, req: Request<Incoming>) -> Answer {
        if !self.authorized(&req) {
            let mut response = answer(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "authentication required\n",
            );
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"edge-gateway\", charset=\"UTF-8\""),
            );
            return response;
        }
        let state = &self.state;
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/" | "/index.html") => {
                answer(StatusCode::OK, "text/html; charset=utf-8", PAGE)
            }
            (&Method::GET, "/metrics") => match prom::render(&state.registry) {
                Ok(text) => answer(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(_) => answer(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "cannot encode the metrics\n",
                ),
            },
            (&Method::GET, "/health") => {
                let health = state.health();
                let status = if health.is_ok() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json_answer(status, &json!(health))
            }
            (&Method::GET, "/ready") => {
                let ready = state.ready.load(Ordering::Relaxed);
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json_answer(status, &json!({ "ready": ready }))
            }
            (&Method::GET, "/api/tags") => {
                answer(StatusCode::OK, "application/json", state.tags_json())
            }
            (&Method::GET, "/api/devices") => json_answer(StatusCode::OK, &state.devices_json()),
            (&Method::GET, "/api/history") => {
                answer(StatusCode::OK, "application/json", state.history_json())
            }
            (&Method::POST, "/api/reload") => match state.reload.get() {
                None => json_answer(
                    StatusCode::NOT_IMPLEMENTED,
                    &json!({ "error": "reload is not available" }),
                ),
                Some(hook) => match hook().await {
                    Ok(done) => json_answer(
                        StatusCode::OK,
                        &json!({ "reloaded": true, "message": done }),
                    ),
                    Err(refused) => json_answer(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        &json!({ "reloaded": false, "error": refused }),
                    ),
                },
            },
            (
                _,
                "/" | "/index.html" | "/metrics" | "/health" | "/ready" | "/api/tags"
                | "/api/devices" | "/api/history" | "/api/reload",
            ) => answer(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "method not allowed\n",
            ),
            _ => answer(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_match_only_when_every_byte_and_the_length_match() {
        assert!(same(b"Basic abc", b"Basic abc"));
        assert!(!same(b"Basic abd", b"Basic abc"));
        assert!(!same(b"Basic ab", b"Basic abc"));
        assert!(!same(b"Basic abcd", b"Basic abc"));
        assert!(!same(b"", b"Basic abc"));
    }
}
