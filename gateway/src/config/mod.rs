//! The TOML configuration file: the validated runtime types, and the loader that builds them.
//!
//! # Design
//!
//! The runtime types here hold only checked values; the rest of the gateway codes against
//! them and never sees the file. Loading goes through three stages, and every problem a stage
//! finds is reported at once:
//!
//! 1. **Syntax.** The text is parsed into a `toml::Table`. When that fails, the text is parsed
//!    again with `toml_edit::ImDocument` for its message and byte span (the `toml` crate's
//!    own error is the fallback), and that syntax error is the only problem reported: nothing
//!    else can be checked.
//! 2. **Shape** (`de.rs`, `raw.rs`). Each unit of the table (`[gateway]`, `[buffer]`, `[mqtt]`,
//!    each `[[devices]]` entry without its `units` and `tags`, each `[[devices.units]]` entry
//!    without its `tags`, each `[[devices.tags]]` or `[[devices.units.tags]]` entry) is
//!    deserialized on its own into a plain `#[serde(deny_unknown_fields)]` raw struct. A small
//!    deserializer records which key failed; that key is then dropped and the unit retried,
//!    so every unknown key and every wrongly typed value of a unit is reported and the unit's
//!    other keys are still checked. A device's `protocol` is read first and picks the raw
//!    structs of the device and its tags (the Modbus protocols share theirs, `opcua` has its
//!    own) and the keys allowed: `address` for `modbus_tcp` and `modbus_rtu_over_tcp`, a
//!    serial port instead for `modbus_rtu`; a key that belongs to another protocol is
//!    reported as unknown for this one, saying whose key it is.
//! 3. **Meaning** (`check/`, `values.rs`). Each raw unit is checked and turned into its
//!    runtime type (ranges, names, addresses, durations, sizes, the broker URL); the rules
//!    that span units (unique names, overlapping registers, one device per serial line) run
//!    as the units are collected.
//!
//! A Modbus device describes its units (slave ids) in one of two forms: `unit_id` and
//! `[[devices.tags]]` on the device for one unit, or `[[devices.units]]` entries, each with
//! its own `name`, `unit_id` and `[[devices.units.tags]]`, for several units sharing the line.
//!
//! A problem (`problem.rs`) carries a field path such as `devices[0].tags[2].address` or
//! `devices[0].units[1].tags[2].address`. Its line is found by walking a `toml_edit` document
//! of the text along that path: the key's line, or for a missing key the line of its table's
//! header. That document is parsed only when the first problem needs a line, so a valid
//! file is parsed once.
//!
//! [`parse`] is pure. [`load`] reads the file, resolves relative paths (`data_dir`, the MQTT
//! `password_file`, and an OPC UA device's `pki_dir`, `password_file`, `user_cert_file` and
//! `user_key_file`) against the file's directory and checks that the credential files can be
//! opened; it never reads a secret. Nothing here panics, whatever the input.

mod check;
mod de;
mod problem;
mod raw;
mod schema;
mod split;
mod values;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use protocols::modbus::ModbusSettings;
use protocols::opcua::OpcUaSettings;

use crate::secret::SecretSource;

pub use problem::{ConfigErrors, Problem};
pub use schema::schema_json;
pub use values::{parse_duration, DurationError};

/// A validated configuration, ready to build a topology from.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[gateway]`
    pub gateway: GatewaySettings,
    /// `[buffer]`
    pub buffer: BufferSettings,
    /// `[mqtt]`
    pub mqtt: MqttSettings,
    /// `[[devices]]`, in file order; a device's index is its `DeviceId`.
    pub devices: Vec<DeviceSettings>,
    /// `[api]`: the HTTP API and status page; `None` (no section) serves nothing.
    pub api: Option<ApiSettings>,
    /// `[commands]`: writes from the cloud (off by default).
    pub commands: CommandSettings,
    /// The devices of `[[devices]]` entries with `enabled = false`, left out of `devices`
    /// (each unit of a Modbus line counts, as each is published as a device).
    pub disabled_devices: usize,
}

/// `[commands]`: whether the gateway takes write commands, and how often a tag may be written.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandSettings {
    /// Whether `{topic_prefix}/+/cmd` is subscribed to.
    pub enabled: bool,
    /// The shortest time between two writes of one tag.
    pub write_interval: Duration,
}

impl Default for CommandSettings {
    fn default() -> Self {
        CommandSettings {
            enabled: false,
            write_interval: Duration::from_secs(1),
        }
    }
}

/// `[api]`: where the HTTP API (`/metrics`, `/health`, `/ready`, `/api/*`, the status page at
/// `/`) listens, and how it is protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiSettings {
    /// `listen`: the socket address, e.g. `127.0.0.1:9100`.
    pub listen: std::net::SocketAddr,
    /// `username` and `password_file`: HTTP basic auth on every path; `None` serves anyone.
    pub auth: Option<ApiAuth>,
    /// `cert_file` and `key_file`: HTTPS; `None` serves plain HTTP.
    pub tls: Option<ApiTls>,
}

/// `[api] username` and `password_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiAuth {
    /// The user name a client must give.
    pub username: String,
    /// The password's file or credential; read at start, never logged.
    pub password_file: SecretSource,
}

/// `[api] cert_file` and `key_file`: the server's certificate chain and private key (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTls {
    /// The certificate chain (PEM), the server's own first.
    pub cert_file: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1 PEM), a file or a credential.
    pub key_file: SecretSource,
}

impl ApiSettings {
    /// What `check` warns about: an API reachable beyond this host without a password or
    /// without TLS (a password in clear on the plant network).
    pub fn exposure_warning(&self) -> Option<String> {
        if self.listen.ip().is_loopback() {
            return None;
        }
        let missing = match (&self.auth, &self.tls) {
            (None, None) => {
                "without a password (`username`, `password_file`) or TLS (`cert_file`, `key_file`)"
            }
            (None, Some(_)) => "without a password (`username`, `password_file`)",
            (Some(_), None) => {
                "without TLS (`cert_file`, `key_file`): the password crosses the network in clear"
            }
            (Some(_), Some(_)) => return None,
        };
        Some(format!(
            "api.listen: the API listens on {} beyond this host {missing}",
            self.listen
        ))
    }
}

/// `[gateway]`
#[derive(Debug, Clone, PartialEq)]
pub struct GatewaySettings {
    /// `[A-Za-z0-9_-]+`
    pub id: Arc<str>,
    /// Where the disk buffer and the gateway's state file live.
    pub data_dir: PathBuf,
}

/// What to do when the buffer reaches `max_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Evict the oldest records to make room.
    #[default]
    DropOldest,
    /// Refuse new records while full.
    DropNewest,
}

/// `[buffer]`
#[derive(Debug, Clone, PartialEq)]
pub struct BufferSettings {
    /// Hard cap on the buffer's disk use, in bytes.
    pub max_size: u64,
    /// Eviction policy when full.
    pub when_full: WhenFull,
    /// A record not acknowledged within this time is committed to disk.
    pub commit_interval: Duration,
    /// Replayed records per second at most; `None` (the default) replays as fast as the broker
    /// acknowledges, always after live records.
    pub replay_rate: Option<u32>,
}

/// Northbound payload format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON document per device scan.
    #[default]
    Json,
    /// Sparkplug B 3.0 (Eclipse Tahu protobuf): the gateway is an edge node, each device a
    /// Sparkplug device; needs a `[sparkplug]` section.
    SparkplugB,
}

/// `[sparkplug]`, with `[mqtt] format = "sparkplug_b"`: the edge node's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparkplugSettings {
    /// `group_id`: the Sparkplug group.
    pub group_id: String,
    /// `edge_node_id`: the edge node (default: the gateway id).
    pub edge_node_id: String,
    /// `primary_host_id`: data goes out only while this host's STATE is online.
    pub primary_host_id: Option<String>,
}

/// `[mqtt]`
#[derive(Debug, Clone, PartialEq)]
pub struct MqttSettings {
    /// Broker host name or IP address.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// TLS, for an `mqtts://` (or `ssl://`) url; `None` for plain TCP.
    pub tls: Option<TlsSettings>,
    /// MQTT 3.1.1 (the default) or 5.
    pub protocol_version: ProtocolVersion,
    /// MQTT client id.
    pub client_id: String,
    /// Topic prefix; records go to `{topic_prefix}/{device}` unless `topic` says otherwise.
    pub topic_prefix: String,
    /// Where a device's records go.
    pub topic: TopicTemplate,
    /// Whether the gateway publishes its own status (`{topic_prefix}/status`, retained, with
    /// the same document as its last will) and, in JSON mode, each device's meta message.
    pub status: bool,
    /// Payload format.
    pub format: Format,
    /// `[sparkplug]`: set exactly when `format` is Sparkplug B.
    pub sparkplug: Option<SparkplugSettings>,
    /// User name, if the broker wants one.
    pub username: Option<String>,
    /// File holding the password; read at each connect, never logged.
    pub password_file: Option<SecretSource>,
    /// An Azure IoT Hub device key: the password is a SAS token computed from it.
    pub sas: Option<SasSettings>,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Publishes in flight (sent, not yet acknowledged) at most.
    pub max_inflight: u16,
    /// Largest MQTT packet the gateway sends.
    pub max_packet_size: usize,
    /// At shutdown, how long to wait for outstanding acknowledgements.
    pub shutdown_grace: Duration,
    /// Unacknowledged publishes and no PUBACK for this long (or one publish skipped this long
    /// while later ones are acknowledged) is taken as a dead link: reconnect.
    pub ack_timeout: Duration,
    /// The first wait between failed connection attempts (doubling, jittered).
    pub backoff_min: Duration,
    /// The longest wait between connection attempts.
    pub backoff_max: Duration,
}

/// The MQTT protocol version spoken to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProtocolVersion {
    /// MQTT 3.1.1 (`protocol_version = 4`, the protocol level it sends).
    #[default]
    V311,
    /// MQTT 5 (`protocol_version = 5`).
    V5,
}

/// `[mqtt]` keys for TLS. Files are read again at each connection attempt.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// CA certificates (PEM) the broker's certificate must chain to; the system's roots when
    /// absent.
    pub ca_file: Option<PathBuf>,
    /// The name the broker's certificate must carry, when it differs from the url's host (a
    /// broker reached by IP address).
    pub server_name: Option<String>,
    /// The client certificate chain (PEM), for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PKCS#8, PKCS#1 or SEC1 PEM).
    pub key_file: Option<SecretSource>,
    /// ALPN protocols to offer (AWS IoT Core on port 443 wants `x-amzn-mqtt-ca`).
    pub alpn: Vec<String>,
    /// Accept any server certificate. For commissioning only: warned about at every connect.
    pub insecure_skip_verify: bool,
}

/// `[mqtt] sas_key_file` and `sas_ttl`: the password is an Azure IoT Hub SAS token signed with
/// the device key, for the resource `{host}/devices/{client_id}`, renewed before it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasSettings {
    /// The device's shared access key (base64, as the portal shows it).
    pub key_file: SecretSource,
    /// How long each token is valid.
    pub ttl: Duration,
}

/// The Azure IoT Hub API version of the username the gateway gives with a SAS token.
pub const AZURE_API_VERSION: &str = "2021-04-12";

/// `[mqtt] topic`: where a device's records go, with the placeholders `{topic_prefix}`,
/// `{device}`, `{client_id}` and `{gateway}`. The default is `{topic_prefix}/{device}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate(pub(crate) String);

impl TopicTemplate {
    /// The placeholders a template may use.
    pub const PLACEHOLDERS: [&'static str; 4] =
        ["{topic_prefix}", "{device}", "{client_id}", "{gateway}"];

    /// The template's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The topic of `device`'s records. One pass over the template: a value that itself looks
    /// like a placeholder is not expanded again.
    pub fn render(&self, mqtt: &MqttSettings, gateway: &str, device: &str) -> String {
        let mut out = String::with_capacity(self.0.len() + 32);
        let mut rest = self.0.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            rest = &rest[open..];
            let value = [
                ("{topic_prefix}", mqtt.topic_prefix.as_str()),
                ("{client_id}", mqtt.client_id.as_str()),
                ("{gateway}", gateway),
                ("{device}", device),
            ]
            .into_iter()
            .find(|(name, _)| rest.starts_with(name));
            match value {
                Some((name, value)) => {
                    out.push_str(value);
                    rest = &rest[name.len()..];
                }
                None => {
                    out.push('{');
                    rest = &rest[1..];
                }
            }
        }
        out.push_str(rest);
        out
    }
}

impl std::str::FromStr for TopicTemplate {
    type Err = String;

    /// A template, checked as the config file's `topic` is.
    fn from_str(text: &str) -> Result<Self, String> {
        values::check_topic_template(text)?;
        Ok(TopicTemplate(text.to_owned()))
    }
}

impl Default for TopicTemplate {
    fn default() -> Self {
        TopicTemplate("{topic_prefix}/{device}".to_owned())
    }
}

impl MqttSettings {
    /// The topic of the gateway's status and last will.
    pub fn status_topic(&self) -> String {
        format!("{}/status", self.topic_prefix)
    }
}

/// One `[[devices]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSettings {
    /// Device name, unique; `[A-Za-z0-9_-]+`-ish (no `/ + #` or NUL).
    pub name: Arc<str>,
    /// Scan interval of tags that set none of their own.
    pub scan_interval: Duration,
    /// The protocol and its settings.
    pub kind: DeviceKind,
}

impl DeviceSettings {
    /// Number of tags of the device (over all its units, for a Modbus line).
    pub fn tag_count(&self) -> usize {
        match &self.kind {
            DeviceKind::Modbus(m) => m.tag_count(),
            DeviceKind::OpcUa(o) => o.tags.len(),
        }
    }
}

/// The protocol of a device.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceKind {
    /// `protocol = "modbus_tcp"`, `"modbus_rtu"` or `"modbus_rtu_over_tcp"`
    Modbus(ModbusSettings),
    /// `protocol = "opcua"`
    OpcUa(OpcUaSettings),
}

/// Reads and validates the config file at `path`, resolving relative paths against its directory.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| ConfigErrors::unreadable(&file, e))?;
    let dir = path.parent().unwrap_or_else(|| Path::new(""));
    let config = validate(&src, &file, Some(dir))?;
    tracing::debug!(
        file = %file,
        devices = config.devices.len(),
        "configuration loaded"
    );
    Ok(config)
}

/// Parses and validates config text; `file` names it in problems. Touches no file.
pub fn parse(src: &str, file: &str) -> Result<Config, ConfigErrors> {
    validate(src, file, None)
}

/// Both entry points: `dir` is the config file's directory when loading from disk.
fn validate(src: &str, file: &str, dir: Option<&Path>) -> Result<Config, ConfigErrors> {
    // A file with devices is parsed a device at a time (`split.rs`); the whole text is parsed
    // at once only when it has none or the split cannot be used.
    if let Some(split::Split { rest, pieces }) = split::split(src) {
        let rest = toml::from_str::<toml::Table>(&rest).ok();
        if let Some(rest) = rest.filter(|rest| !split::Split::rest_names_devices(rest)) {
            let pieces = check::Pieces { src, pieces };
            if let Some(result) = check::check(rest, Some(pieces), src, file, dir) {
                return result;
            }
        }
    }
    // toml_edit's document (kept only for the line numbers of problems) is parsed when a
    // problem needs it: holding it next to the table doubled the parse's memory.
    let root: toml::Table = match toml::from_str(src) {
        Ok(root) => root,
        Err(e) => {
            toml_edit::ImDocument::parse(src)
                .map_err(|e| ConfigErrors::syntax(src, file, e.message(), e.span()))?;
            return Err(ConfigErrors::syntax(src, file, e.message(), e.span()));
        }
    };
    check::check(root, None, src, file, dir).unwrap_or_else(|| {
        // Only a split file's pieces can send the check back to the whole text.
        Err(ConfigErrors::whole_file(
            file,
            None,
            "the configuration could not be checked".to_owned(),
        ))
    })
}
