//! An OPC UA server simulator built on async-opcua's server.
//!
//! It listens on loopback only, offers the usual security policies (None, Basic256Sha256,
//! Aes128_Sha256_RsaOaep and Aes256_Sha256_RsaPss, each signed and encrypted), accepts anonymous,
//! user name and X.509 identities as configured, trusts every client certificate, and serves a
//! folder `Objects/Sim` with one variable per built-in scalar type plus arrays, a counter, a
//! writable set-point and two variables with non-good quality. Values change on every tick and
//! reach subscribers through the library's own notification path, with the tick time as source
//! timestamp. For benchmarks it can add thousands of `Double` variables under `Objects/Bench`,
//! all updated under one address-space lock per tick.
//!
//! Things a client author has to know about this server (and async-opcua in general):
//! - Every endpoint description advertises `opc.tcp://127.0.0.1:<port>/`. The client's
//!   `connect_to_matching_endpoint` keeps that advertised *port* and only swaps in the host the
//!   caller used, then checks the server certificate's host names against that host (the
//!   certificate lists `127.0.0.1`, `localhost` and the machine's host name). A client reaching
//!   the server through a proxy on another port must rewrite the endpoint URL itself (and use
//!   `connect_to_endpoint_directly`), or it silently bypasses the proxy after discovery.
//! - The certificate's application URI (and the server's) is `urn:edge-gateway:sim:server`, not
//!   the namespace URI `urn:edge-gateway:sim`: async-opcua gives the application URI its own
//!   namespace (index 1, the diagnostics namespace), so the simulated nodes need a different one.
//! - async-opcua checks the type of a written value only for arrays: a scalar of another type
//!   than the variable's (an Int64 for an Int16) is stored as it came, where a stricter server
//!   answers `BadTypeMismatch`. [`SimOpcUa::value`] shows the variant as stored, so a test can
//!   check that a client wrote the variable's own type.
//! - To trust the server without `trust_server_certs`, a client must store the certificate in its
//!   `pki/trusted/` directory under the name `CertificateStore::cert_file_name(&cert)`, i.e.
//!   `"CN=Edge Gateway OPC UA Simulator [<sha1 thumbprint>].der"`; any other name is ignored.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opcua::server::node_manager::memory::SimpleNodeManager;
use opcua::server::ServerHandle;
use opcua::types::{DateTime, StatusCode, VariableId, Variant};
use tokio::task::JoinHandle;
use tracing::{info, warn};

mod server;
mod space;
#[cfg(test)]
mod tests;

use self::server::{bind, ensure_keypair, server_builder, SimAuthenticator};
use self::space::{data_value, populate, run_ticks, Shared};

/// URI of the simulator's namespace, which holds every simulated node.
pub(crate) const NAMESPACE_URI: &str = "urn:edge-gateway:sim";

/// Application URI of the simulator (server description and certificate). It must differ from
/// [`NAMESPACE_URI`] because async-opcua reserves the application URI's namespace for diagnostics.
pub(crate) const APPLICATION_URI: &str = "urn:edge-gateway:sim:server";

/// All simulated variables: (string id, OPC UA data type name); the tests check the address
/// space against it.
///
/// Node ids are `ns=<namespace>;s=<id>`, browse paths `Objects/Sim/<id without "Sim.">`. Ids
/// ending in `Array` are one-dimensional arrays (ValueRank 1) of the named type, all others are
/// scalars (ValueRank -1). Every variable changes on each tick except `Sim.Setpoint` and
/// `Sim.Limit` (written by clients only; the only writable ones) and `Sim.String` (every tenth
/// tick); `Sim.Uncertain` carries the status
/// `UncertainLastUsableValue` and `Sim.Bad` the status `BadSensorFailure`.
#[cfg(test)]
const VARIABLES: &[(&str, &str)] = &[
    ("Sim.Bool", "Boolean"),
    ("Sim.SByte", "SByte"),
    ("Sim.Byte", "Byte"),
    ("Sim.Int16", "Int16"),
    ("Sim.UInt16", "UInt16"),
    ("Sim.Int32", "Int32"),
    ("Sim.UInt32", "UInt32"),
    ("Sim.Int64", "Int64"),
    ("Sim.UInt64", "UInt64"),
    ("Sim.Float", "Float"),
    ("Sim.Double", "Double"),
    ("Sim.String", "String"),
    ("Sim.DateTime", "DateTime"),
    ("Sim.ByteString", "ByteString"),
    ("Sim.DoubleArray", "Double"),
    ("Sim.Int32Array", "Int32"),
    ("Sim.Counter", "UInt32"),
    ("Sim.Setpoint", "Double"),
    ("Sim.Limit", "Int16"),
    ("Sim.Uncertain", "Double"),
    ("Sim.Bad", "Double"),
];

const HOST: &str = "127.0.0.1";
/// Where the server's own certificate lives inside `pki_dir` (async-opcua's default).
const OWN_CERT: &str = "own/cert.der";
/// How long `stop` waits for clients to be closed before dropping the server task.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Errors of the OPC UA simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The listening socket could not be opened.
    #[error("cannot listen on 127.0.0.1:{port}: {source}")]
    Bind {
        /// The requested port (0 = any).
        port: u16,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The server's certificate or private key could not be read or created.
    #[error("server certificate in {}: {reason}", .pki_dir.display())]
    Certificate {
        /// The PKI directory.
        pki_dir: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A freshly generated certificate or key could not be moved into place.
    #[error("server certificate in {}: {source}", .pki_dir.display())]
    CertificateFile {
        /// The PKI directory.
        pki_dir: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// async-opcua rejected the server configuration.
    #[error("invalid OPC UA server configuration: {0}")]
    Config(String),
    /// No simulated variable has this string id.
    #[error("unknown simulated variable {0:?}")]
    UnknownVariable(String),
    /// The value's type does not match the variable's data type.
    #[error("variable {id:?} holds {expected}, cannot set it to {got}")]
    TypeMismatch {
        /// The variable's string id.
        id: String,
        /// The variable's data type (with `[]` for arrays).
        expected: String,
        /// The rejected value.
        got: String,
    },
    /// The address space refused the update.
    #[error("address space update failed: {0}")]
    Update(StatusCode),
    /// A background task of `start` failed.
    #[error("simulator start-up task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// Options for the OPC UA simulator.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// The server's own PKI directory (own cert + key generated on first start and reused on later starts with the same dir).
    pub pki_dir: PathBuf,
    /// TCP port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// Accepted user name / password pairs.
    pub users: Vec<(String, String)>,
    /// Whether anonymous sessions are accepted.
    pub allow_anonymous: bool,
    /// Accept any X.509 user identity certificate (signed proof is still checked by the library).
    pub accept_x509_users: bool,
    /// Extra Double variables ns=<sim ns>;s=Bench.<i> (i = 0..n) under Objects/Bench, for benchmarks.
    pub bench_variables: usize,
    /// How often values change.
    pub tick: Duration,
    /// The server's MaxNodesPerRead and MaxMonitoredItemsPerCall operation limits.
    pub max_nodes_per_call: u32,
}

impl Default for SimOptions {
    /// A shared PKI directory in the system temp dir, any free port, user `operator` with
    /// password `secret`, anonymous and X.509 users accepted, no bench variables, 100 ms tick.
    fn default() -> Self {
        SimOptions {
            pki_dir: std::env::temp_dir().join("edge-gateway-opcua-sim-pki"),
            port: 0,
            users: vec![("operator".to_owned(), "secret".to_owned())],
            allow_anonymous: true,
            accept_x509_users: true,
            bench_variables: 0,
            tick: Duration::from_millis(100),
            max_nodes_per_call: 100_000,
        }
    }
}

/// A running simulator.
pub struct SimOpcUa {
    port: u16,
    namespace: u16,
    cert_path: PathBuf,
    handle: ServerHandle,
    shared: Arc<Shared>,
    server_task: Option<JoinHandle<Result<(), String>>>,
    tick_task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SimOpcUa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimOpcUa")
            .field("port", &self.port)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl SimOpcUa {
    /// Starts the simulator and returns once it accepts connections; also how the demo runs it
    /// standalone (it keeps the handle for as long as the simulator should run).
    ///
    /// On the first start with a given `pki_dir` this generates the server's 2048-bit RSA key
    /// pair and certificate (about a second); later starts reuse them unless they no longer fit
    /// (expired, other application URI, no `127.0.0.1` host name).
    pub async fn start(opts: SimOptions) -> Result<SimOpcUa, SimError> {
        let pki_dir = opts.pki_dir.clone();
        tokio::task::spawn_blocking(move || ensure_keypair(&pki_dir))
            .await
            .map_err(SimError::Task)??;

        let listener = bind(opts.port).await?;
        let port = listener
            .local_addr()
            .map_err(|source| SimError::Bind {
                port: opts.port,
                source,
            })?
            .port();

        let authenticator = SimAuthenticator {
            users: opts.users.clone(),
            allow_anonymous: opts.allow_anonymous,
            accept_x509_users: opts.accept_x509_users,
        };
        let (server, handle) = server_builder(&opts, port, authenticator)
            .build()
            .map_err(SimError::Config)?;
        let namespace = handle
            .get_namespace_index(NAMESPACE_URI)
            .ok_or_else(|| SimError::Config(format!("namespace {NAMESPACE_URI} not registered")))?;
        let node_manager = handle
            .node_managers()
            .get_of_type::<SimpleNodeManager>()
            .ok_or_else(|| SimError::Config("simulator node manager missing".to_owned()))?;

        let vars = populate(&node_manager, namespace, opts.bench_variables);
        let index = vars
            .iter()
            .enumerate()
            .map(|(i, v)| (v.id.clone(), i))
            .collect();
        let shared = Arc::new(Shared {
            node_manager,
            subscriptions: handle.subscriptions().clone(),
            index,
            vars: Mutex::new(vars),
        });
        shared.tick(0);

        let server_task = tokio::spawn(server.run_with(listener));
        let tick_task = tokio::spawn(run_ticks(
            shared.clone(),
            opts.tick,
            handle.token().child_token(),
        ));
        info!("OPC UA simulator listening on opc.tcp://{HOST}:{port}/ (namespace {namespace})");

        Ok(SimOpcUa {
            port,
            namespace,
            cert_path: opts.pki_dir.join(OWN_CERT),
            handle,
            shared,
            server_task: Some(server_task),
            tick_task: Some(tick_task),
        })
    }

    /// `opc.tcp://127.0.0.1:<port>/`
    pub fn endpoint(&self) -> String {
        format!("opc.tcp://{HOST}:{}/", self.port)
    }

    /// The TCP port the simulator listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The namespace index of the simulator's namespace ("urn:edge-gateway:sim").
    pub fn namespace(&self) -> u16 {
        self.namespace
    }

    /// Path of the server's certificate (DER), so a test can copy it into a client's pki `trusted/` dir.
    ///
    /// async-opcua only finds it there under the name `CertificateStore::cert_file_name(&cert)`.
    pub fn server_cert_path(&self) -> PathBuf {
        self.cert_path.clone()
    }

    /// Sets the value of a simulated variable by its string id (e.g. "Sim.Double") right now, notifying subscribers; error if unknown.
    ///
    /// The value keeps the variable's current status and gets the current time as source and
    /// server timestamp. From then on the simulator no longer changes this variable's value, so a
    /// test can rely on it; `Variant::Empty` is accepted, any other type must match the variable.
    pub fn set(&self, id: &str, value: Variant) -> Result<(), SimError> {
        let i = self.shared.lookup(id)?;
        let mut vars = self.shared.lock_vars();
        let var = &mut vars[i];
        if !var.kind.accepts(&value) {
            return Err(SimError::TypeMismatch {
                id: id.to_owned(),
                expected: var.kind.type_label(),
                got: format!("{value:?}"),
            });
        }
        var.driven = false;
        let now = DateTime::now();
        let dv = data_value(value, var.status, now);
        self.shared.write(&var.node_id, dv)
    }

    /// The value a simulated variable holds now, as stored (its variant type included).
    pub fn value(&self, id: &str) -> Result<Variant, SimError> {
        let i = self.shared.lookup(id)?;
        let vars = self.shared.lock_vars();
        self.shared.current_value(&vars[i].node_id)
    }

    /// Sets the status code of a variable's value (for quality tests).
    ///
    /// The current value is kept and re-published with the new status right away; later ticks
    /// (if the variable is still simulated) keep using this status.
    #[cfg(test)]
    fn set_status(&self, id: &str, status: StatusCode) -> Result<(), SimError> {
        let i = self.shared.lookup(id)?;
        let mut vars = self.shared.lock_vars();
        let var = &mut vars[i];
        var.status = status;
        let current = self.shared.current_value(&var.node_id)?;
        let dv = data_value(current, status, DateTime::now());
        self.shared.write(&var.node_id, dv)
    }

    /// Number of sessions created so far (counts reconnects).
    ///
    /// Counts every successful CreateSession on this simulator instance; a client that loses
    /// its connection and comes back with a new session counts again.
    pub fn sessions_created(&self) -> u64 {
        self.handle
            .info()
            .diagnostics
            .get(
                VariableId::Server_ServerDiagnostics_ServerDiagnosticsSummary_CumulatedSessionCount,
            )
            .and_then(|dv| dv.value)
            .and_then(|v| match v {
                Variant::UInt32(n) => Some(u64::from(n)),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// Stops the server and waits until the port is closed.
    ///
    /// Open sessions are closed first (clients see the connection drop); if that takes longer
    /// than a few seconds the server task is aborted, which closes the listener as well.
    pub async fn stop(mut self) {
        self.handle.cancel();
        if let Some(mut task) = self.server_task.take() {
            match tokio::time::timeout(STOP_GRACE, &mut task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => warn!("OPC UA simulator server ended with an error: {e}"),
                Ok(Err(e)) => warn!("OPC UA simulator server task failed: {e}"),
                Err(_) => {
                    warn!("OPC UA simulator did not stop within {STOP_GRACE:?}, aborting it");
                    task.abort();
                    let _ = task.await;
                }
            }
        }
        if let Some(task) = self.tick_task.take() {
            let _ = task.await;
        }
        info!(port = self.port, "OPC UA simulator stopped");
    }
}

impl Drop for SimOpcUa {
    fn drop(&mut self) {
        // Without `stop` the tasks end on their own once cancelled; nobody waits for them.
        self.handle.cancel();
    }
}
