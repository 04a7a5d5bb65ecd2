//! The simulated address space: the variables under `Objects/Sim` (and `Objects/Bench`), their
//! values per tick, and the state the handle shares with the tick task.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use opcua::server::address_space::{AccessLevel, ObjectBuilder, VariableBuilder};
use opcua::server::node_manager::memory::SimpleNodeManager;
use opcua::server::SubscriptionCache;
use opcua::types::{
    ByteString, DataTypeId, DataValue, DateTime, NodeId, ObjectId, QualifiedName, StatusCode,
    UAString, VariableTypeId, Variant, VariantScalarTypeId, VariantTypeId,
};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::SimError;

/// What kind of value a simulated variable holds and how it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
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
    Limit,
    Uncertain,
    Bad,
    Bench(u32),
}

/// The simulated variables in `Objects/Sim`, in the order of `VARIABLES`.
pub(super) const SIM_KINDS: &[(&str, Kind)] = &[
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
    ("Limit", Kind::Limit),
    ("Uncertain", Kind::Uncertain),
    ("Bad", Kind::Bad),
];

impl Kind {
    pub(super) fn scalar_type(self) -> VariantScalarTypeId {
        match self {
            Kind::Bool => VariantScalarTypeId::Boolean,
            Kind::SByte => VariantScalarTypeId::SByte,
            Kind::Byte => VariantScalarTypeId::Byte,
            Kind::Int16 | Kind::Limit => VariantScalarTypeId::Int16,
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

    pub(super) fn data_type(self) -> DataTypeId {
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

    /// The OPC UA name of the data type, as listed in `VARIABLES`.
    pub(super) fn type_name(self) -> &'static str {
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

    pub(super) fn type_label(self) -> String {
        match self.array_len() {
            Some(_) => format!("{}[]", self.type_name()),
            None => self.type_name().to_owned(),
        }
    }

    pub(super) fn array_len(self) -> Option<u32> {
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

    /// Whether the simulator drives this variable at all (not the ones clients write).
    fn simulated(self) -> bool {
        !self.writable()
    }

    /// Whether clients may write this variable.
    pub(super) fn writable(self) -> bool {
        matches!(self, Kind::Setpoint | Kind::Limit)
    }

    /// Whether the value changes on tick `n` (only changed values are written).
    fn changes_at(self, n: u64) -> bool {
        match self {
            Kind::String => n % 10 == 0,
            _ => true,
        }
    }

    /// Whether `set` may store this value in a variable of this kind.
    pub(super) fn accepts(self, value: &Variant) -> bool {
        match value.type_id() {
            VariantTypeId::Empty => true,
            VariantTypeId::Scalar(t) => self.array_len().is_none() && t == self.scalar_type(),
            VariantTypeId::Array(t, _) => self.array_len().is_some() && t == self.scalar_type(),
        }
    }

    /// The value at tick `n`; integer types wrap, `as` truncation is intended.
    pub(super) fn value(self, n: u64, now: DateTime) -> Variant {
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
            Kind::Limit => Variant::Int16(0),
            Kind::Uncertain => Variant::Double(x * 0.5),
            Kind::Bad => Variant::Double(-x),
            Kind::Bench(i) => Variant::Double(x + f64::from(i) * 0.001),
        }
    }
}

/// One simulated variable.
pub(super) struct SimVar {
    pub(super) id: String,
    pub(super) node_id: NodeId,
    pub(super) kind: Kind,
    pub(super) status: StatusCode,
    /// Whether ticks still change the value (false for the writable ones and after `set`).
    pub(super) driven: bool,
}

/// State shared by the handle and the tick task.
pub(super) struct Shared {
    pub(super) node_manager: Arc<SimpleNodeManager>,
    pub(super) subscriptions: Arc<SubscriptionCache>,
    /// String id -> index into `vars`; fixed after start.
    pub(super) index: HashMap<String, usize>,
    /// Lock order: `vars`, then the address space (inside the node manager).
    pub(super) vars: Mutex<Vec<SimVar>>,
}

impl Shared {
    pub(super) fn lock_vars(&self) -> MutexGuard<'_, Vec<SimVar>> {
        self.vars.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn lookup(&self, id: &str) -> Result<usize, SimError> {
        self.index
            .get(id)
            .copied()
            .ok_or_else(|| SimError::UnknownVariable(id.to_owned()))
    }

    /// Writes one value and notifies subscribers.
    pub(super) fn write(&self, node_id: &NodeId, dv: DataValue) -> Result<(), SimError> {
        self.node_manager
            .set_value(&self.subscriptions, node_id, None, dv)
            .map_err(SimError::Update)
    }

    pub(super) fn current_value(&self, node_id: &NodeId) -> Result<Variant, SimError> {
        use opcua::server::address_space::NodeType;
        use opcua::types::{DataEncoding, NumericRange, TimestampsToReturn};
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
    pub(super) fn tick(&self, n: u64) {
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

pub(super) fn data_value(value: Variant, status: StatusCode, at: DateTime) -> DataValue {
    DataValue {
        value: Some(value),
        status: Some(status),
        source_timestamp: Some(at),
        server_timestamp: Some(at),
        ..Default::default()
    }
}

pub(super) async fn run_ticks(shared: Arc<Shared>, tick: Duration, token: CancellationToken) {
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

/// Builds `Objects/Sim` (and `Objects/Bench`) and returns the variables in `VARIABLES` order,
/// followed by the bench variables.
pub(super) fn populate(node_manager: &SimpleNodeManager, ns: u16, bench: usize) -> Vec<SimVar> {
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
        if kind.writable() {
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
