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
//! - The certificate's application URI (and the server's) is [`APPLICATION_URI`], not the
//!   namespace URI [`NAMESPACE_URI`]: async-opcua gives the application URI its own namespace
//!   (index 1, the diagnostics namespace), so the simulated nodes need a different one.
//! - To trust the server without `trust_server_certs`, a client must store the certificate in its
//!   `pki/trusted/` directory under the name `CertificateStore::cert_file_name(&cert)`, i.e.
//!   `"CN=Edge Gateway OPC UA Simulator [<sha1 thumbprint>].der"`; any other name is ignored.

use std::collections::HashMap;
use std::fs;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use opcua::crypto::{CertificateStore, SecurityPolicy, Thumbprint, X509Data, X509};
use opcua::server::address_space::{AccessLevel, NodeType, ObjectBuilder, VariableBuilder};
use opcua::server::authenticator::{
    user_pass_security_policy_id, user_pass_security_policy_uri, AuthManager, Password, UserToken,
};
use opcua::server::diagnostics::NamespaceMetadata;
use opcua::server::node_manager::memory::{simple_node_manager, SimpleNodeManager};
use opcua::server::{ServerBuilder, ServerEndpoint, ServerHandle, SubscriptionCache};
use opcua::types::{
    ByteString, DataEncoding, DataTypeId, DataValue, DateTime, Error as UaError,
    MessageSecurityMode, NodeId, NumericRange, ObjectId, QualifiedName, StatusCode,
    TimestampsToReturn, UAString, UserTokenPolicy, UserTokenType, VariableId, VariableTypeId,
    Variant, VariantScalarTypeId, VariantTypeId,
};
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// URI of the simulator's namespace, which holds every simulated node.
pub const NAMESPACE_URI: &str = "urn:edge-gateway:sim";

/// Application URI of the simulator (server description and certificate). It must differ from
/// [`NAMESPACE_URI`] because async-opcua reserves the application URI's namespace for diagnostics.
pub const APPLICATION_URI: &str = "urn:edge-gateway:sim:server";

/// All simulated variables: (string id, OPC UA data type name) — used by tests and the demo.
///
/// Node ids are `ns=<namespace>;s=<id>`, browse paths `Objects/Sim/<id without "Sim.">`. Ids
/// ending in `Array` are one-dimensional arrays (ValueRank 1) of the named type, all others are
/// scalars (ValueRank -1). Every variable changes on each tick except `Sim.Setpoint` (written by
/// clients only) and `Sim.String` (every tenth tick); `Sim.Uncertain` carries the status
/// `UncertainLastUsableValue` and `Sim.Bad` the status `BadSensorFailure`.
pub const VARIABLES: &[(&str, &str)] = &[
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
    ("Sim.Uncertain", "Double"),
    ("Sim.Bad", "Double"),
];

const APPLICATION_NAME: &str = "Edge Gateway OPC UA Simulator";
const HOST: &str = "127.0.0.1";
const ENDPOINT_PATH: &str = "/";
/// Where the server's own certificate and key live inside `pki_dir` (async-opcua's defaults).
const OWN_CERT: &str = "own/cert.der";
const OWN_KEY: &str = "private/private.pem";
/// Policy ids async-opcua's server expects for anonymous and X.509 tokens.
const POLICY_ID_ANONYMOUS: &str = "anonymous";
const POLICY_ID_X509: &str = "x509";
/// Server-side subscription timer; also the smallest publishing / sampling interval.
const SUBSCRIPTION_TICK_MS: u64 = 20;
/// How long `stop` waits for clients to be closed before dropping the server task.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long `start` retries binding a fixed port that is still in use (e.g. right after `stop`).
const BIND_RETRIES: u32 = 30;
const BIND_RETRY_DELAY: Duration = Duration::from_millis(100);

const ENDPOINTS: &[(&str, SecurityPolicy, MessageSecurityMode)] = &[
    ("none", SecurityPolicy::None, MessageSecurityMode::None),
    (
        "basic256sha256_sign",
        SecurityPolicy::Basic256Sha256,
        MessageSecurityMode::Sign,
    ),
    (
        "basic256sha256_sign_encrypt",
        SecurityPolicy::Basic256Sha256,
        MessageSecurityMode::SignAndEncrypt,
    ),
    (
        "aes128sha256rsaoaep_sign",
        SecurityPolicy::Aes128Sha256RsaOaep,
        MessageSecurityMode::Sign,
    ),
    (
        "aes128sha256rsaoaep_sign_encrypt",
        SecurityPolicy::Aes128Sha256RsaOaep,
        MessageSecurityMode::SignAndEncrypt,
    ),
    (
        "aes256sha256rsapss_sign",
        SecurityPolicy::Aes256Sha256RsaPss,
        MessageSecurityMode::Sign,
    ),
    (
        "aes256sha256rsapss_sign_encrypt",
        SecurityPolicy::Aes256Sha256RsaPss,
        MessageSecurityMode::SignAndEncrypt,
    ),
];

/// Serializes key generation within the process, so simulators started concurrently with the
/// same `pki_dir` do not write the key pair twice.
static KEYGEN: Mutex<()> = Mutex::new(());

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
    Task(String),
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
            .map_err(|e| SimError::Task(e.to_string()))??;

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

    /// Sets the status code of a variable's value (for quality tests).
    ///
    /// The current value is kept and re-published with the new status right away; later ticks
    /// (if the variable is still simulated) keep using this status.
    pub fn set_status(&self, id: &str, status: StatusCode) -> Result<(), SimError> {
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

/// What kind of value a simulated variable holds and how it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    SByte,
    Byte,
    Int16,
    UInt16,
    Int32,
    UInt32,
    Int64,
    UInt64,
    Float,
    Double,
    String,
    DateTime,
    ByteString,
    DoubleArray,
    Int32Array,
    Counter,
    Setpoint,
    Uncertain,
    Bad,
    Bench(u32),
}

/// The simulated variables in `Objects/Sim`, in the order of [`VARIABLES`].
const SIM_KINDS: &[(&str, Kind)] = &[
    ("Bool", Kind::Bool),
    ("SByte", Kind::SByte),
    ("Byte", Kind::Byte),
    ("Int16", Kind::Int16),
    ("UInt16", Kind::UInt16),
    ("Int32", Kind::Int32),
    ("UInt32", Kind::UInt32),
    ("Int64", Kind::Int64),
    ("UInt64", Kind::UInt64),
    ("Float", Kind::Float),
    ("Double", Kind::Double),
    ("String", Kind::String),
    ("DateTime", Kind::DateTime),
    ("ByteString", Kind::ByteString),
    ("DoubleArray", Kind::DoubleArray),
    ("Int32Array", Kind::Int32Array),
    ("Counter", Kind::Counter),
    ("Setpoint", Kind::Setpoint),
    ("Uncertain", Kind::Uncertain),
    ("Bad", Kind::Bad),
];

impl Kind {
    fn scalar_type(self) -> VariantScalarTypeId {
        match self {
            Kind::Bool => VariantScalarTypeId::Boolean,
            Kind::SByte => VariantScalarTypeId::SByte,
            Kind::Byte => VariantScalarTypeId::Byte,
            Kind::Int16 => VariantScalarTypeId::Int16,
            Kind::UInt16 => VariantScalarTypeId::UInt16,
            Kind::Int32 | Kind::Int32Array => VariantScalarTypeId::Int32,
            Kind::UInt32 | Kind::Counter => VariantScalarTypeId::UInt32,
            Kind::Int64 => VariantScalarTypeId::Int64,
            Kind::UInt64 => VariantScalarTypeId::UInt64,
            Kind::Float => VariantScalarTypeId::Float,
            Kind::Double
            | Kind::DoubleArray
            | Kind::Setpoint
            | Kind::Uncertain
            | Kind::Bad
            | Kind::Bench(_) => VariantScalarTypeId::Double,
            Kind::String => VariantScalarTypeId::String,
            Kind::DateTime => VariantScalarTypeId::DateTime,
            Kind::ByteString => VariantScalarTypeId::ByteString,
        }
    }

    fn data_type(self) -> DataTypeId {
        match self.scalar_type() {
            VariantScalarTypeId::Boolean => DataTypeId::Boolean,
            VariantScalarTypeId::SByte => DataTypeId::SByte,
            VariantScalarTypeId::Byte => DataTypeId::Byte,
            VariantScalarTypeId::Int16 => DataTypeId::Int16,
            VariantScalarTypeId::UInt16 => DataTypeId::UInt16,
            VariantScalarTypeId::Int32 => DataTypeId::Int32,
            VariantScalarTypeId::UInt32 => DataTypeId::UInt32,
            VariantScalarTypeId::Int64 => DataTypeId::Int64,
            VariantScalarTypeId::UInt64 => DataTypeId::UInt64,
            VariantScalarTypeId::Float => DataTypeId::Float,
            VariantScalarTypeId::String => DataTypeId::String,
            VariantScalarTypeId::DateTime => DataTypeId::DateTime,
            VariantScalarTypeId::ByteString => DataTypeId::ByteString,
            _ => DataTypeId::Double,
        }
    }

    /// The OPC UA name of the data type, as listed in [`VARIABLES`].
    fn type_name(self) -> &'static str {
        match self.data_type() {
            DataTypeId::Boolean => "Boolean",
            DataTypeId::SByte => "SByte",
            DataTypeId::Byte => "Byte",
            DataTypeId::Int16 => "Int16",
            DataTypeId::UInt16 => "UInt16",
            DataTypeId::Int32 => "Int32",
            DataTypeId::UInt32 => "UInt32",
            DataTypeId::Int64 => "Int64",
            DataTypeId::UInt64 => "UInt64",
            DataTypeId::Float => "Float",
            DataTypeId::String => "String",
            DataTypeId::DateTime => "DateTime",
            DataTypeId::ByteString => "ByteString",
            _ => "Double",
        }
    }

    fn type_label(self) -> String {
        match self.array_len() {
            Some(_) => format!("{}[]", self.type_name()),
            None => self.type_name().to_owned(),
        }
    }

    fn array_len(self) -> Option<u32> {
        match self {
            Kind::DoubleArray => Some(3),
            Kind::Int32Array => Some(4),
            _ => None,
        }
    }

    fn value_rank(self) -> i32 {
        if self.array_len().is_some() {
            1
        } else {
            -1
        }
    }

    fn initial_status(self) -> StatusCode {
        match self {
            Kind::Uncertain => StatusCode::UncertainLastUsableValue,
            Kind::Bad => StatusCode::BadSensorFailure,
            _ => StatusCode::Good,
        }
    }

    /// Whether the simulator drives this variable at all.
    fn simulated(self) -> bool {
        self != Kind::Setpoint
    }

    /// Whether the value changes on tick `n` (only changed values are written).
    fn changes_at(self, n: u64) -> bool {
        match self {
            Kind::String => n % 10 == 0,
            _ => true,
        }
    }

    /// Whether `set` may store this value in a variable of this kind.
    fn accepts(self, value: &Variant) -> bool {
        match value.type_id() {
            VariantTypeId::Empty => true,
            VariantTypeId::Scalar(t) => self.array_len().is_none() && t == self.scalar_type(),
            VariantTypeId::Array(t, _) => self.array_len().is_some() && t == self.scalar_type(),
        }
    }

    /// The value at tick `n`; integer types wrap, `as` truncation is intended.
    fn value(self, n: u64, now: DateTime) -> Variant {
        let x = n as f64;
        match self {
            Kind::Bool => Variant::Boolean(n % 2 == 1),
            Kind::SByte => Variant::SByte(n as i8),
            Kind::Byte => Variant::Byte(n as u8),
            Kind::Int16 => Variant::Int16((n as i16).wrapping_mul(-7)),
            Kind::UInt16 => Variant::UInt16((n as u16).wrapping_mul(3)),
            Kind::Int32 => Variant::Int32((n as i32).wrapping_mul(-1000)),
            Kind::UInt32 => Variant::UInt32((n as u32).wrapping_mul(100_000)),
            Kind::Int64 => Variant::Int64((n as i64).wrapping_mul(-1_000_000_007)),
            Kind::UInt64 => Variant::UInt64(n.wrapping_mul(10_000_000_019)),
            Kind::Float => Variant::Float(n as f32 * 0.25),
            Kind::Double => Variant::Double((x * 0.1).sin() * 100.0),
            Kind::String => Variant::String(UAString::from(format!("tick {}", n / 10))),
            Kind::DateTime => Variant::DateTime(Box::new(now)),
            Kind::ByteString => Variant::ByteString(ByteString::from(n.to_be_bytes().to_vec())),
            Kind::DoubleArray => Variant::from(vec![(x * 0.1).sin(), (x * 0.1).cos(), x]),
            Kind::Int32Array => {
                let base = n as i32;
                Variant::from(vec![
                    base,
                    base.wrapping_add(1),
                    base.wrapping_add(2),
                    base.wrapping_add(3),
                ])
            }
            Kind::Counter => Variant::UInt32(n as u32),
            Kind::Setpoint => Variant::Double(0.0),
            Kind::Uncertain => Variant::Double(x * 0.5),
            Kind::Bad => Variant::Double(-x),
            Kind::Bench(i) => Variant::Double(x + f64::from(i) * 0.001),
        }
    }
}

/// One simulated variable.
struct SimVar {
    id: String,
    node_id: NodeId,
    kind: Kind,
    status: StatusCode,
    /// Whether ticks still change the value (false for the set-point and after `set`).
    driven: bool,
}

/// State shared by the handle and the tick task.
struct Shared {
    node_manager: Arc<SimpleNodeManager>,
    subscriptions: Arc<SubscriptionCache>,
    /// String id -> index into `vars`; fixed after start.
    index: HashMap<String, usize>,
    /// Lock order: `vars`, then the address space (inside the node manager).
    vars: Mutex<Vec<SimVar>>,
}

impl Shared {
    fn lock_vars(&self) -> MutexGuard<'_, Vec<SimVar>> {
        self.vars.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lookup(&self, id: &str) -> Result<usize, SimError> {
        self.index
            .get(id)
            .copied()
            .ok_or_else(|| SimError::UnknownVariable(id.to_owned()))
    }

    /// Writes one value and notifies subscribers.
    fn write(&self, node_id: &NodeId, dv: DataValue) -> Result<(), SimError> {
        self.node_manager
            .set_value(&self.subscriptions, node_id, None, dv)
            .map_err(SimError::Update)
    }

    fn current_value(&self, node_id: &NodeId) -> Result<Variant, SimError> {
        let space = self.node_manager.address_space().read();
        match space.find(node_id) {
            Some(NodeType::Variable(v)) => Ok(v
                .value(
                    TimestampsToReturn::Neither,
                    &NumericRange::None,
                    &DataEncoding::Binary,
                    0.0,
                )
                .value
                .unwrap_or_default()),
            _ => Err(SimError::Update(StatusCode::BadNodeIdUnknown)),
        }
    }

    /// Advances every simulated variable to tick `n`: one address-space write lock and one
    /// batch of notifications (only for nodes somebody monitors) for all of them.
    fn tick(&self, n: u64) {
        let now = DateTime::now();
        let vars = self.lock_vars();
        let updates = vars
            .iter()
            .filter(|v| v.driven && v.kind.changes_at(n))
            .map(|v| {
                (
                    &v.node_id,
                    None,
                    data_value(v.kind.value(n, now), v.status, now),
                )
            });
        if let Err(status) = self.node_manager.set_values(&self.subscriptions, updates) {
            warn!("OPC UA simulator tick {n} failed: {status}");
        }
    }
}

fn data_value(value: Variant, status: StatusCode, at: DateTime) -> DataValue {
    DataValue {
        value: Some(value),
        status: Some(status),
        source_timestamp: Some(at),
        server_timestamp: Some(at),
        ..Default::default()
    }
}

async fn run_ticks(shared: Arc<Shared>, tick: Duration, token: CancellationToken) {
    let mut interval = tokio::time::interval(tick.max(Duration::from_millis(1)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    interval.tick().await; // the first tick completes at once; tick 0 was written at start
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = token.cancelled() => break,
            _ = interval.tick() => {
                n += 1;
                shared.tick(n);
            }
        }
    }
}

/// Builds `Objects/Sim` (and `Objects/Bench`) and returns the variables in [`VARIABLES`] order,
/// followed by the bench variables.
fn populate(node_manager: &SimpleNodeManager, ns: u16, bench: usize) -> Vec<SimVar> {
    let mut space = node_manager.address_space().write();
    let objects: NodeId = ObjectId::ObjectsFolder.into();
    let now = DateTime::now();
    let mut vars = Vec::with_capacity(SIM_KINDS.len() + bench);

    let sim_folder = NodeId::new(ns, "Sim");
    ObjectBuilder::new(&sim_folder, QualifiedName::new(ns, "Sim"), "Sim")
        .is_folder()
        .organized_by(objects.clone())
        .insert(&mut *space);
    for &(name, kind) in SIM_KINDS {
        let id = format!("Sim.{name}");
        let node_id = NodeId::new(ns, id.as_str());
        let mut builder = VariableBuilder::new(&node_id, QualifiedName::new(ns, name), name)
            .data_type(kind.data_type())
            .value_rank(kind.value_rank())
            .value(kind.value(0, now))
            .access_level(AccessLevel::CURRENT_READ)
            .user_access_level(AccessLevel::CURRENT_READ)
            .organized_by(sim_folder.clone())
            .has_type_definition(VariableTypeId::BaseDataVariableType);
        if let Some(len) = kind.array_len() {
            builder = builder.array_dimensions(&[len]);
        }
        if kind == Kind::Setpoint {
            builder = builder.writable();
        }
        builder.insert(&mut *space);
        vars.push(SimVar {
            id,
            node_id,
            kind,
            status: kind.initial_status(),
            driven: kind.simulated(),
        });
    }

    if bench > 0 {
        let bench_folder = NodeId::new(ns, "Bench");
        ObjectBuilder::new(&bench_folder, QualifiedName::new(ns, "Bench"), "Bench")
            .is_folder()
            .organized_by(objects)
            .insert(&mut *space);
        for i in 0..bench {
            let id = format!("Bench.{i}");
            let node_id = NodeId::new(ns, id.as_str());
            let kind = Kind::Bench(u32::try_from(i).unwrap_or(u32::MAX));
            VariableBuilder::new(&node_id, QualifiedName::new(ns, id.as_str()), id.as_str())
                .data_type(DataTypeId::Double)
                .value_rank(-1)
                .value(kind.value(0, now))
                .access_level(AccessLevel::CURRENT_READ)
                .user_access_level(AccessLevel::CURRENT_READ)
                .organized_by(bench_folder.clone())
                .has_type_definition(VariableTypeId::BaseDataVariableType)
                .insert(&mut *space);
            vars.push(SimVar {
                id,
                node_id,
                kind,
                status: StatusCode::Good,
                driven: true,
            });
        }
    }
    vars
}

fn server_builder(opts: &SimOptions, port: u16, authenticator: SimAuthenticator) -> ServerBuilder {
    let mut builder = ServerBuilder::new()
        .application_name(APPLICATION_NAME)
        .application_uri(APPLICATION_URI)
        .product_uri(APPLICATION_URI)
        .host(HOST)
        .port(port)
        .discovery_urls(vec![format!("opc.tcp://{HOST}:{port}/")])
        .pki_dir(opts.pki_dir.clone())
        // `ensure_keypair` made them; async-opcua would only log an error if they were missing.
        .create_sample_keypair(false)
        .trust_client_certs(true)
        // Needed for the cumulated session count behind `sessions_created`.
        .diagnostics_enabled(true)
        .subscription_poll_interval_ms(SUBSCRIPTION_TICK_MS)
        .with_authenticator(Arc::new(authenticator))
        .with_node_manager(simple_node_manager(
            NamespaceMetadata {
                namespace_uri: NAMESPACE_URI.to_owned(),
                ..Default::default()
            },
            "sim",
        ));
    for &(id, policy, mode) in ENDPOINTS {
        // User tokens are decided by `SimAuthenticator`, so endpoints list no token ids.
        builder = builder.add_endpoint(id, (ENDPOINT_PATH, policy, mode, &[] as &[&str]));
    }
    builder = builder.default_endpoint("none");

    // Large enough for 10k monitored items in one subscription and 10k nodes per service call.
    let limits = builder.limits_mut();
    limits.max_array_length = 1_000_000;
    limits.max_string_length = 1 << 20;
    limits.max_byte_string_length = 1 << 24;
    limits.max_message_size = 64 << 20;
    limits.max_chunk_count = limits.max_message_size / limits.receive_buffer_size.max(8192) + 1;
    limits.max_sessions = 1000;
    limits.max_browse_continuation_points = 10_000;
    let subscriptions = &mut limits.subscriptions;
    subscriptions.max_subscriptions_per_session = 100;
    subscriptions.max_monitored_items_per_sub = 0; // unlimited
    subscriptions.max_monitored_item_queue_size = 1000;
    subscriptions.max_queued_notifications = 200;
    // About 150 kB per publish response, under async-opcua's default client message limit.
    subscriptions.max_notifications_per_publish = 5000;
    subscriptions.min_publishing_interval_ms = SUBSCRIPTION_TICK_MS as f64;
    subscriptions.min_sampling_interval_ms = SUBSCRIPTION_TICK_MS as f64;
    let operational = &mut limits.operational;
    operational.max_nodes_per_read = opts.max_nodes_per_call as usize;
    operational.max_nodes_per_write = 100_000;
    operational.max_nodes_per_browse = 100_000;
    operational.max_references_per_browse_node = 100_000;
    operational.max_nodes_per_register_nodes = 100_000;
    operational.max_nodes_per_translate_browse_paths_to_node_ids = 100_000;
    operational.max_monitored_items_per_call = opts.max_nodes_per_call as usize;
    operational.max_subscriptions_per_call = 100;
    builder
}

/// Opens the listening socket on 127.0.0.1 with SO_REUSEADDR, so a restarted simulator can take
/// over its old port at once. A fixed port still in use is retried for a few seconds.
async fn bind(port: u16) -> Result<TcpListener, SimError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut attempt = 0;
    loop {
        let result = TcpSocket::new_v4().and_then(|socket| {
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(1024)
        });
        match result {
            Ok(listener) => return Ok(listener),
            Err(e)
                if port != 0
                    && e.kind() == std::io::ErrorKind::AddrInUse
                    && attempt < BIND_RETRIES =>
            {
                attempt += 1;
                tokio::time::sleep(BIND_RETRY_DELAY).await;
            }
            Err(source) => return Err(SimError::Bind { port, source }),
        }
    }
}

/// Makes sure `pki_dir` holds a usable certificate and key for the server, generating them if
/// they are missing or do not fit (expired, other application URI, no 127.0.0.1). Blocking.
fn ensure_keypair(pki_dir: &Path) -> Result<(), SimError> {
    let _guard = KEYGEN.lock().unwrap_or_else(PoisonError::into_inner);
    let cert_path = pki_dir.join(OWN_CERT);
    let key_path = pki_dir.join(OWN_KEY);
    let cert_error = |reason: String| SimError::Certificate {
        pki_dir: pki_dir.to_path_buf(),
        reason,
    };

    if let Ok(cert) = CertificateStore::read_cert(&cert_path) {
        if CertificateStore::read_pkey(&key_path).is_ok() && certificate_fits(&cert) {
            return Ok(());
        }
        info!(
            "replacing the OPC UA simulator certificate {}",
            cert_path.display()
        );
    }

    let mut alt_host_names = X509Data::alt_host_names(
        APPLICATION_URI,
        Some(vec![HOST.to_owned()]),
        true,
        true,
        false,
    );
    if alt_host_names.is_empty() {
        alt_host_names.add_uri(APPLICATION_URI);
    }
    let data = X509Data {
        key_size: 2048,
        common_name: APPLICATION_NAME.to_owned(),
        organization: "edge-gateway".to_owned(),
        organizational_unit: "simulator".to_owned(),
        country: "DE".to_owned(),
        state: "BY".to_owned(),
        alt_host_names,
        certificate_duration_days: 3650,
    };
    // Written under temporary names and renamed, so no reader ever sees half a file.
    let suffix = format!("tmp-{}", std::process::id());
    let tmp_cert = cert_path.with_extension(format!("der.{suffix}"));
    let tmp_key = key_path.with_extension(format!("pem.{suffix}"));
    CertificateStore::create_certificate_and_key(&data, true, &tmp_cert, &tmp_key)
        .map_err(cert_error)?;
    fs::rename(&tmp_key, &key_path).map_err(|e| cert_error(e.to_string()))?;
    fs::rename(&tmp_cert, &cert_path).map_err(|e| cert_error(e.to_string()))?;
    info!(
        "generated the OPC UA simulator certificate {}",
        cert_path.display()
    );
    Ok(())
}

fn certificate_fits(cert: &X509) -> bool {
    cert.is_application_uri_valid(APPLICATION_URI).is_ok()
        && cert.is_hostname_valid(HOST).is_ok()
        && cert.is_hostname_valid("localhost").is_ok()
        && cert.is_time_valid(&DateTime::now().as_chrono()).is_ok()
        && cert.key_length().is_ok_and(|bits| bits >= 2048)
}

/// Decides which identities may open sessions; the library has already checked the token's
/// policy id, decrypted the password and verified the X.509 token's signature.
struct SimAuthenticator {
    users: Vec<(String, String)>,
    allow_anonymous: bool,
    accept_x509_users: bool,
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

// `AuthManager` is an `#[async_trait]` trait; these are the signatures that macro produces,
// written out to avoid a dependency on `async-trait` for three synchronous answers.
impl AuthManager for SimAuthenticator {
    fn authenticate_anonymous_token<'life0, 'life1, 'async_trait>(
        &'life0 self,
        _endpoint: &'life1 ServerEndpoint,
    ) -> BoxFuture<'async_trait, Result<(), UaError>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        let result = if self.allow_anonymous {
            Ok(())
        } else {
            Err(UaError::new(
                StatusCode::BadIdentityTokenRejected,
                "anonymous sessions are disabled on this simulator",
            ))
        };
        Box::pin(std::future::ready(result))
    }

    fn authenticate_username_identity_token<'life0, 'life1, 'life2, 'life3, 'async_trait>(
        &'life0 self,
        _endpoint: &'life1 ServerEndpoint,
        username: &'life2 str,
        password: &'life3 Password,
    ) -> BoxFuture<'async_trait, Result<UserToken, UaError>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        'life3: 'async_trait,
        Self: 'async_trait,
    {
        let known = self
            .users
            .iter()
            .any(|(user, pass)| user == username && pass.as_bytes() == password.get().as_bytes());
        let result = if known {
            Ok(UserToken(username.to_owned()))
        } else {
            Err(UaError::new(
                StatusCode::BadUserAccessDenied,
                format!("unknown user or wrong password for {username:?}"),
            ))
        };
        Box::pin(std::future::ready(result))
    }

    fn authenticate_x509_identity_token<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        _endpoint: &'life1 ServerEndpoint,
        signing_thumbprint: &'life2 Thumbprint,
    ) -> BoxFuture<'async_trait, Result<UserToken, UaError>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        let result = if self.accept_x509_users {
            Ok(UserToken(format!(
                "x509:{}",
                signing_thumbprint.as_hex_string()
            )))
        } else {
            Err(UaError::new(
                StatusCode::BadIdentityTokenRejected,
                "X.509 user identities are disabled on this simulator",
            ))
        };
        Box::pin(std::future::ready(result))
    }

    fn user_token_policies(&self, endpoint: &ServerEndpoint) -> Vec<UserTokenPolicy> {
        let mut policies = Vec::with_capacity(3);
        if self.allow_anonymous {
            policies.push(UserTokenPolicy {
                policy_id: UAString::from(POLICY_ID_ANONYMOUS),
                token_type: UserTokenType::Anonymous,
                issued_token_type: UAString::null(),
                issuer_endpoint_url: UAString::null(),
                security_policy_uri: UAString::null(),
            });
        }
        if !self.users.is_empty() {
            policies.push(UserTokenPolicy {
                policy_id: user_pass_security_policy_id(endpoint),
                token_type: UserTokenType::UserName,
                issued_token_type: UAString::null(),
                issuer_endpoint_url: UAString::null(),
                security_policy_uri: user_pass_security_policy_uri(endpoint),
            });
        }
        if self.accept_x509_users {
            // The client signs the token with this policy, the server verifies with the same;
            // None cannot sign, so unsecured endpoints ask for Basic256Sha256 signatures.
            let signing = match endpoint.security_policy() {
                SecurityPolicy::None | SecurityPolicy::Unknown => SecurityPolicy::Basic256Sha256,
                policy => policy,
            };
            policies.push(UserTokenPolicy {
                policy_id: UAString::from(POLICY_ID_X509),
                token_type: UserTokenType::Certificate,
                issued_token_type: UAString::null(),
                issuer_endpoint_url: UAString::null(),
                security_policy_uri: UAString::from(signing.to_uri()),
            });
        }
        policies
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Instant;

    use opcua::client::{
        Client, ClientBuilder, DataChangeCallback, IdentityToken, MonitoredItem, Session,
    };
    use opcua::types::{
        AttributeId, BrowseDescription, BrowseDirection, BrowseResultMask,
        MonitoredItemCreateRequest, MonitoringMode, MonitoringParameters, ReadValueId,
        ReferenceTypeId, WriteValue,
    };
    use tokio::sync::mpsc;

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// A fixed directory per purpose, so reruns reuse the server's key pair.
    fn test_dir(name: &str) -> PathBuf {
        std::env::temp_dir()
            .join("edge-gateway-opcua-sim-tests")
            .join(name)
    }

    /// Default options with a PKI directory shared by the tests of this run (one keygen).
    fn options() -> SimOptions {
        SimOptions {
            pki_dir: test_dir("server-pki"),
            tick: Duration::from_millis(50),
            ..SimOptions::default()
        }
    }

    fn client(pki_dir: PathBuf, keypair: bool) -> Client {
        ClientBuilder::new()
            .application_name("edge-gateway sim test client")
            .application_uri("urn:edge-gateway:sim-test-client")
            .product_uri("urn:edge-gateway:sim-test-client")
            .pki_dir(pki_dir)
            .create_sample_keypair(keypair)
            .trust_server_certs(false)
            .session_retry_limit(0)
            .session_retry_initial(Duration::from_millis(100))
            .session_retry_max(Duration::from_millis(500))
            .session_timeout(30_000)
            .client()
            .expect("valid client configuration")
    }

    fn none_client() -> Client {
        client(test_dir("client-pki-none"), false)
    }

    /// Connects and waits for the session; the error is the status the event loop ended with.
    async fn connect(
        sim: &SimOpcUa,
        client: &mut Client,
        policy: SecurityPolicy,
        mode: MessageSecurityMode,
        identity: IdentityToken,
    ) -> Result<(Arc<Session>, JoinHandle<StatusCode>), StatusCode> {
        let endpoint = sim.endpoint();
        let (session, event_loop) = client
            .connect_to_matching_endpoint((endpoint.as_str(), policy.to_str(), mode), identity)
            .await
            .map_err(|e| e.status())?;
        let mut event_loop = event_loop.spawn();
        tokio::select! {
            connected = session.wait_for_connection() => {
                assert!(connected);
                Ok((session, event_loop))
            }
            ended = &mut event_loop => Err(ended.unwrap_or(StatusCode::BadUnexpectedError)),
            _ = tokio::time::sleep(TIMEOUT) => Err(StatusCode::BadTimeout),
        }
    }

    async fn connect_anonymous(sim: &SimOpcUa) -> (Arc<Session>, JoinHandle<StatusCode>) {
        let mut client = none_client();
        connect(
            sim,
            &mut client,
            SecurityPolicy::None,
            MessageSecurityMode::None,
            IdentityToken::Anonymous,
        )
        .await
        .expect("anonymous None/None session")
    }

    fn read_id(ns: u16, id: &str, attribute: AttributeId) -> ReadValueId {
        ReadValueId {
            node_id: NodeId::new(ns, id),
            attribute_id: attribute as u32,
            ..Default::default()
        }
    }

    async fn read_value(session: &Session, ns: u16, id: &str) -> DataValue {
        let mut values = session
            .read(
                &[read_id(ns, id, AttributeId::Value)],
                TimestampsToReturn::Both,
                0.0,
            )
            .await
            .expect("read");
        values.pop().expect("one result")
    }

    async fn wait_until<F: FnMut() -> bool>(mut done: F) -> bool {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        done()
    }

    #[test]
    fn the_variable_table_matches_the_simulated_variables() {
        assert_eq!(VARIABLES.len(), SIM_KINDS.len());
        for ((id, type_name), (name, kind)) in VARIABLES.iter().zip(SIM_KINDS) {
            assert_eq!(*id, format!("Sim.{name}"));
            assert_eq!(*type_name, kind.type_name(), "{id}");
            let value = kind.value(7, DateTime::now());
            assert!(kind.accepts(&value), "{id} does not accept its own value");
            assert_eq!(value.is_array(), kind.array_len().is_some(), "{id}");
        }
    }

    #[tokio::test]
    async fn starts_on_a_free_loopback_port_and_serves_every_variable_type() {
        let sim = SimOpcUa::start(options()).await.unwrap();
        assert_ne!(sim.port(), 0);
        assert_eq!(
            sim.endpoint(),
            format!("opc.tcp://127.0.0.1:{}/", sim.port())
        );
        assert!(sim.server_cert_path().is_file());
        let (session, _event_loop) = connect_anonymous(&sim).await;
        let ns = sim.namespace();
        assert_eq!(
            session.get_namespace_index(NAMESPACE_URI).await.unwrap(),
            ns
        );

        let mut to_read = Vec::new();
        for (id, _) in VARIABLES {
            for attribute in [
                AttributeId::Value,
                AttributeId::DataType,
                AttributeId::ValueRank,
                AttributeId::BrowseName,
            ] {
                to_read.push(read_id(ns, id, attribute));
            }
        }
        let results = session
            .read(&to_read, TimestampsToReturn::Both, 0.0)
            .await
            .unwrap();
        assert_eq!(results.len(), to_read.len());

        for ((id, type_name), attrs) in VARIABLES.iter().zip(results.chunks(4)) {
            let kind = SIM_KINDS
                .iter()
                .find(|(name, _)| format!("Sim.{name}") == *id)
                .unwrap()
                .1;
            let value = &attrs[0];
            let expected_status = match *id {
                "Sim.Uncertain" => StatusCode::UncertainLastUsableValue,
                "Sim.Bad" => StatusCode::BadSensorFailure,
                _ => StatusCode::Good,
            };
            assert_eq!(value.status(), expected_status, "{id} status");
            assert!(value.source_timestamp.is_some(), "{id} source timestamp");
            let variant = value.value.as_ref().expect("value");
            assert_eq!(
                variant.scalar_type_id(),
                Some(kind.scalar_type()),
                "{id} value type ({type_name})"
            );
            assert_eq!(variant.is_array(), kind.array_len().is_some(), "{id}");
            let data_type: NodeId = kind.data_type().into();
            assert_eq!(
                attrs[1].value,
                Some(Variant::from(data_type)),
                "{id} DataType attribute"
            );
            let rank = if id.ends_with("Array") { 1 } else { -1 };
            assert_eq!(attrs[2].value, Some(Variant::Int32(rank)), "{id} ValueRank");
            let name = id.trim_start_matches("Sim.");
            assert_eq!(
                attrs[3].value,
                Some(Variant::from(QualifiedName::new(ns, name))),
                "{id} BrowseName"
            );
        }

        // The folder is reachable from Objects, so a browser finds the variables.
        let browse = |node_id: NodeId| BrowseDescription {
            node_id,
            browse_direction: BrowseDirection::Forward,
            reference_type_id: ReferenceTypeId::Organizes.into(),
            include_subtypes: true,
            node_class_mask: 0,
            result_mask: BrowseResultMask::All as u32,
        };
        let objects = session
            .browse(&[browse(ObjectId::ObjectsFolder.into())], 1000, None)
            .await
            .unwrap();
        let refs = objects[0].references.clone().unwrap_or_default();
        assert!(refs
            .iter()
            .any(|r| r.browse_name == QualifiedName::new(ns, "Sim")));
        let sim_folder = session
            .browse(&[browse(NodeId::new(ns, "Sim"))], 1000, None)
            .await
            .unwrap();
        assert_eq!(
            sim_folder[0].references.as_ref().map(Vec::len),
            Some(VARIABLES.len())
        );
        sim.stop().await;
    }

    #[tokio::test]
    async fn subscribers_receive_changing_values() {
        let sim = SimOpcUa::start(options()).await.unwrap();
        let (session, _event_loop) = connect_anonymous(&sim).await;
        let ns = sim.namespace();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let subscription = session
            .create_subscription(
                Duration::from_millis(50),
                100,
                20,
                0,
                0,
                true,
                DataChangeCallback::new(move |dv: DataValue, item: &MonitoredItem| {
                    let _ = tx.send((item.item_to_monitor().node_id.clone(), dv));
                }),
            )
            .await
            .unwrap();
        let items = ["Sim.Counter", "Sim.Double", "Sim.Bad"]
            .iter()
            .map(|id| MonitoredItemCreateRequest {
                item_to_monitor: read_id(ns, id, AttributeId::Value),
                monitoring_mode: MonitoringMode::Reporting,
                requested_parameters: MonitoringParameters {
                    sampling_interval: 0.0,
                    queue_size: 10,
                    discard_oldest: true,
                    ..Default::default()
                },
            })
            .collect();
        let created = session
            .create_monitored_items(subscription, TimestampsToReturn::Both, items)
            .await
            .unwrap();
        assert!(created.iter().all(|c| c.result.status_code.is_good()));

        let counter_id = NodeId::new(ns, "Sim.Counter");
        let bad_id = NodeId::new(ns, "Sim.Bad");
        let mut counters = Vec::new();
        let mut bad_statuses = Vec::new();
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while counters.len() < 4 {
            let (node_id, dv) = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .expect("notifications within the timeout")
                .unwrap();
            assert!(dv.source_timestamp.is_some());
            if node_id == counter_id {
                counters.push((dv.value.clone(), dv.source_timestamp));
            } else if node_id == bad_id {
                bad_statuses.push(dv.status());
            }
        }
        // Counter goes up by one per tick, each with a newer source timestamp.
        let numbers: Vec<u32> = counters
            .iter()
            .map(|(v, _)| match v {
                Some(Variant::UInt32(n)) => *n,
                other => panic!("Counter is {other:?}"),
            })
            .collect();
        assert!(numbers.windows(2).all(|w| w[1] > w[0]), "{numbers:?}");
        assert!(counters.windows(2).all(|w| w[1].1 > w[0].1));
        assert!(bad_statuses
            .iter()
            .all(|s| *s == StatusCode::BadSensorFailure));

        // `set` reaches subscribers right away and sticks.
        sim.set("Sim.Counter", Variant::UInt32(4_000_000)).unwrap();
        loop {
            let (node_id, dv) = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .expect("the set value within the timeout")
                .unwrap();
            if node_id == counter_id && dv.value == Some(Variant::UInt32(4_000_000)) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            read_value(&session, ns, "Sim.Counter").await.value,
            Some(Variant::UInt32(4_000_000))
        );
        sim.stop().await;
    }

    #[tokio::test]
    async fn set_and_set_status_reject_unknown_ids_and_wrong_types() {
        let sim = SimOpcUa::start(options()).await.unwrap();
        assert!(matches!(
            sim.set("Sim.Nope", Variant::Double(1.0)),
            Err(SimError::UnknownVariable(_))
        ));
        assert!(matches!(
            sim.set_status("Nope", StatusCode::Good),
            Err(SimError::UnknownVariable(_))
        ));
        assert!(matches!(
            sim.set("Sim.Double", Variant::Int32(1)),
            Err(SimError::TypeMismatch { .. })
        ));
        assert!(matches!(
            sim.set("Sim.DoubleArray", Variant::Double(1.0)),
            Err(SimError::TypeMismatch { .. })
        ));
        sim.set("Sim.DoubleArray", Variant::from(vec![1.0, 2.0]))
            .unwrap();
        sim.set("Sim.String", Variant::from("hello")).unwrap();

        let (session, _event_loop) = connect_anonymous(&sim).await;
        let ns = sim.namespace();
        sim.set_status("Sim.Double", StatusCode::BadCommunicationError)
            .unwrap();
        let double = read_value(&session, ns, "Sim.Double").await;
        assert_eq!(double.status(), StatusCode::BadCommunicationError);
        // Still simulated: the value keeps changing under the new status.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let later = read_value(&session, ns, "Sim.Double").await;
        assert_eq!(later.status(), StatusCode::BadCommunicationError);
        assert_ne!(later.value, double.value);
        assert_eq!(
            read_value(&session, ns, "Sim.String").await.value,
            Some(Variant::from("hello"))
        );
        sim.stop().await;
    }

    #[tokio::test]
    async fn clients_may_write_the_setpoint_and_nothing_else() {
        let sim = SimOpcUa::start(options()).await.unwrap();
        let (session, _event_loop) = connect_anonymous(&sim).await;
        let ns = sim.namespace();
        let write = |id: &str, value: Variant| WriteValue {
            node_id: NodeId::new(ns, id),
            attribute_id: AttributeId::Value as u32,
            index_range: Default::default(),
            value: DataValue::new_now(value),
        };
        let results = session
            .write(&[
                write("Sim.Setpoint", Variant::Double(42.5)),
                write("Sim.Double", Variant::Double(1.0)),
            ])
            .await
            .unwrap();
        assert_eq!(results[0], StatusCode::Good);
        assert!(results[1].is_bad(), "{}", results[1]);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            read_value(&session, ns, "Sim.Setpoint").await.value,
            Some(Variant::Double(42.5))
        );
        sim.stop().await;
    }

    #[tokio::test]
    async fn restarts_on_the_same_port() {
        let opts = options();
        let sim = SimOpcUa::start(opts.clone()).await.unwrap();
        let port = sim.port();
        let ns = sim.namespace();
        let (session, event_loop) = {
            let mut client = ClientBuilder::new()
                .application_name("edge-gateway sim test client")
                .application_uri("urn:edge-gateway:sim-test-client")
                .pki_dir(test_dir("client-pki-none"))
                .create_sample_keypair(false)
                .session_retry_limit(-1)
                .session_retry_initial(Duration::from_millis(50))
                .session_retry_max(Duration::from_millis(200))
                .client()
                .unwrap();
            connect(
                &sim,
                &mut client,
                SecurityPolicy::None,
                MessageSecurityMode::None,
                IdentityToken::Anonymous,
            )
            .await
            .unwrap()
        };
        assert!(read_value(&session, ns, "Sim.Counter")
            .await
            .status()
            .is_good());
        assert_eq!(sim.sessions_created(), 1);

        sim.stop().await;
        let refused = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
        assert!(refused.is_err(), "port {port} still open after stop");

        let restarted = SimOpcUa::start(SimOptions { port, ..opts }).await.unwrap();
        assert_eq!(restarted.port(), port);
        // The same client session reconnects on its own and reads again.
        let reconnected = wait_until(|| restarted.sessions_created() >= 1).await;
        assert!(reconnected, "client did not reconnect");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let read = session
                .read(
                    &[read_id(ns, "Sim.Counter", AttributeId::Value)],
                    TimestampsToReturn::Both,
                    0.0,
                )
                .await;
            if matches!(&read, Ok(values) if values[0].status().is_good()) {
                break;
            }
            assert!(Instant::now() < deadline, "no read after restart: {read:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        session.disconnect().await.unwrap();
        let _ = event_loop.await;
        restarted.stop().await;
    }

    #[tokio::test]
    async fn rejects_an_unknown_user() {
        let sim = SimOpcUa::start(SimOptions {
            allow_anonymous: false,
            ..options()
        })
        .await
        .unwrap();
        let mut client = none_client();
        let unknown = connect(
            &sim,
            &mut client,
            SecurityPolicy::None,
            MessageSecurityMode::None,
            IdentityToken::new_user_name("intruder", "secret"),
        )
        .await;
        assert_eq!(unknown.err(), Some(StatusCode::BadUserAccessDenied));
        let wrong_password = connect(
            &sim,
            &mut client,
            SecurityPolicy::None,
            MessageSecurityMode::None,
            IdentityToken::new_user_name("operator", "guess"),
        )
        .await;
        assert_eq!(wrong_password.err(), Some(StatusCode::BadUserAccessDenied));
        let anonymous = connect(
            &sim,
            &mut client,
            SecurityPolicy::None,
            MessageSecurityMode::None,
            IdentityToken::Anonymous,
        )
        .await;
        assert!(anonymous.is_err());

        let (session, _event_loop) = connect(
            &sim,
            &mut client,
            SecurityPolicy::None,
            MessageSecurityMode::None,
            IdentityToken::new_user_name("operator", "secret"),
        )
        .await
        .expect("the configured user is accepted");
        assert!(read_value(&session, sim.namespace(), "Sim.Bool")
            .await
            .status()
            .is_good());
        sim.stop().await;
    }

    #[tokio::test]
    async fn secure_endpoints_accept_any_client_certificate_and_x509_users() {
        let sim = SimOpcUa::start(options()).await.unwrap();
        // Fresh client and user key pairs each run, so they never expire between runs.
        let pki = test_dir("client-pki-secure");
        let user_dir = test_dir("x509-user");
        let _ = fs::remove_dir_all(&pki);
        let _ = fs::remove_dir_all(&user_dir);
        // Trust the server the way a gateway operator would: its certificate in trusted/.
        let server_cert = CertificateStore::read_cert(&sim.server_cert_path()).unwrap();
        let trusted = pki.join("trusted");
        fs::create_dir_all(&trusted).unwrap();
        fs::copy(
            sim.server_cert_path(),
            trusted.join(CertificateStore::cert_file_name(&server_cert)),
        )
        .unwrap();
        let mut client = client(pki.clone(), true);

        let (user_cert, user_key) = {
            let mut alt_host_names = X509Data::alt_host_names(
                "urn:edge-gateway:sim-test-user",
                None,
                false,
                false,
                false,
            );
            alt_host_names.add_dns("user");
            let data = X509Data {
                key_size: 2048,
                common_name: "sim test user".to_owned(),
                organization: "edge-gateway".to_owned(),
                organizational_unit: "tests".to_owned(),
                country: "DE".to_owned(),
                state: "BY".to_owned(),
                alt_host_names,
                certificate_duration_days: 30,
            };
            let cert_path = user_dir.join("user.der");
            let key_path = user_dir.join("user.pem");
            CertificateStore::create_certificate_and_key(&data, true, &cert_path, &key_path)
                .unwrap();
            (cert_path, key_path)
        };

        let cases = [
            (
                SecurityPolicy::Basic256Sha256,
                MessageSecurityMode::SignAndEncrypt,
                IdentityToken::new_user_name("operator", "secret"),
            ),
            (
                SecurityPolicy::Aes128Sha256RsaOaep,
                MessageSecurityMode::Sign,
                IdentityToken::Anonymous,
            ),
            (
                SecurityPolicy::Aes256Sha256RsaPss,
                MessageSecurityMode::SignAndEncrypt,
                IdentityToken::new_x509_path(&user_cert, &user_key).unwrap(),
            ),
            (
                SecurityPolicy::None,
                MessageSecurityMode::None,
                IdentityToken::new_x509_path(&user_cert, &user_key).unwrap(),
            ),
        ];
        for (policy, mode, identity) in cases {
            let (session, event_loop) = connect(&sim, &mut client, policy, mode, identity)
                .await
                .unwrap_or_else(|s| panic!("{policy} {mode}: {s}"));
            let value = read_value(&session, sim.namespace(), "Sim.Double").await;
            assert!(value.status().is_good(), "{policy} {mode}");
            session.disconnect().await.unwrap();
            let _ = event_loop.await;
        }
        sim.stop().await;
    }

    #[tokio::test]
    async fn bench_variables_all_change_every_tick() {
        let sim = SimOpcUa::start(SimOptions {
            bench_variables: 10_000,
            tick: Duration::from_millis(100),
            ..options()
        })
        .await
        .unwrap();
        let mut client = ClientBuilder::new()
            .application_name("edge-gateway sim test client")
            .application_uri("urn:edge-gateway:sim-test-client")
            .pki_dir(test_dir("client-pki-none"))
            .create_sample_keypair(false)
            .session_retry_limit(0)
            .max_array_length(1_000_000)
            .max_message_size(64 << 20)
            .max_chunk_count(2000)
            .client()
            .unwrap();
        let (session, _event_loop) = connect(
            &sim,
            &mut client,
            SecurityPolicy::None,
            MessageSecurityMode::None,
            IdentityToken::Anonymous,
        )
        .await
        .unwrap();
        let ns = sim.namespace();
        let ids: Vec<ReadValueId> = (0..10_000)
            .map(|i| read_id(ns, &format!("Bench.{i}"), AttributeId::Value))
            .collect();
        let first = session
            .read(&ids, TimestampsToReturn::Both, 0.0)
            .await
            .unwrap();
        assert_eq!(first.len(), 10_000);
        assert!(first.iter().all(|v| v.status().is_good()));
        tokio::time::sleep(Duration::from_millis(250)).await;
        let second = session
            .read(&ids, TimestampsToReturn::Both, 0.0)
            .await
            .unwrap();
        assert!(first
            .iter()
            .zip(&second)
            .all(|(a, b)| a.value != b.value && b.source_timestamp > a.source_timestamp));

        // One tick over 10k variables without subscribers is cheap.
        let started = Instant::now();
        sim.shared.tick(1_000_000);
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_millis(100),
            "tick took {elapsed:?}"
        );
        sim.stop().await;
    }
}
