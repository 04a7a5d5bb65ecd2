//! OPC UA southbound adapter: validated settings, the mapping from OPC UA values and status codes
//! onto the tag model, the session driver (subscribe or poll) and browsing.
//!
//! The settings here are runtime types, built by the gateway's config loader; nothing in this file
//! touches the network, so `edge-gateway check` can validate node ids and security combinations
//! offline.

pub mod browse;
mod client;
mod convert;
pub mod driver;
mod write;

pub use client::{is_certificate_problem, trust_server_certificate, OpcUaError};

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

pub use opcua::types::NodeId;

/// Message security policy of the secure channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecurityPolicy {
    /// No signing, no encryption.
    None,
    /// Basic256Sha256.
    Basic256Sha256,
    /// Aes128_Sha256_RsaOaep.
    Aes128Sha256RsaOaep,
    /// Aes256_Sha256_RsaPss.
    Aes256Sha256RsaPss,
}

impl SecurityPolicy {
    /// Every policy, in config spelling order.
    pub const ALL: [SecurityPolicy; 4] = [
        SecurityPolicy::None,
        SecurityPolicy::Basic256Sha256,
        SecurityPolicy::Aes128Sha256RsaOaep,
        SecurityPolicy::Aes256Sha256RsaPss,
    ];

    /// The name used in config files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            SecurityPolicy::None => "None",
            SecurityPolicy::Basic256Sha256 => "Basic256Sha256",
            SecurityPolicy::Aes128Sha256RsaOaep => "Aes128_Sha256_RsaOaep",
            SecurityPolicy::Aes256Sha256RsaPss => "Aes256_Sha256_RsaPss",
        }
    }

    /// The policy as async-opcua knows it.
    pub(crate) fn to_opcua(self) -> opcua::crypto::SecurityPolicy {
        match self {
            SecurityPolicy::None => opcua::crypto::SecurityPolicy::None,
            SecurityPolicy::Basic256Sha256 => opcua::crypto::SecurityPolicy::Basic256Sha256,
            SecurityPolicy::Aes128Sha256RsaOaep => {
                opcua::crypto::SecurityPolicy::Aes128Sha256RsaOaep
            }
            SecurityPolicy::Aes256Sha256RsaPss => opcua::crypto::SecurityPolicy::Aes256Sha256RsaPss,
        }
    }
}

impl fmt::Display for SecurityPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SecurityPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SecurityPolicy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown security policy {s:?}; expected one of {}",
                    names(SecurityPolicy::ALL.iter().map(|p| p.name()))
                )
            })
    }
}

/// Message security mode of the secure channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecurityMode {
    /// Neither signed nor encrypted.
    None,
    /// Signed.
    Sign,
    /// Signed and encrypted.
    SignAndEncrypt,
}

impl SecurityMode {
    /// Every mode, in config spelling order.
    pub const ALL: [SecurityMode; 3] = [
        SecurityMode::None,
        SecurityMode::Sign,
        SecurityMode::SignAndEncrypt,
    ];

    /// The name used in config files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            SecurityMode::None => "None",
            SecurityMode::Sign => "Sign",
            SecurityMode::SignAndEncrypt => "SignAndEncrypt",
        }
    }

    /// The mode as async-opcua knows it.
    pub(crate) fn to_opcua(self) -> opcua::types::MessageSecurityMode {
        match self {
            SecurityMode::None => opcua::types::MessageSecurityMode::None,
            SecurityMode::Sign => opcua::types::MessageSecurityMode::Sign,
            SecurityMode::SignAndEncrypt => opcua::types::MessageSecurityMode::SignAndEncrypt,
        }
    }
}

impl fmt::Display for SecurityMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SecurityMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SecurityMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown security mode {s:?}; expected one of {}",
                    names(SecurityMode::ALL.iter().map(|m| m.name()))
                )
            })
    }
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks that a policy and a mode can be combined: `None` goes only with `None`.
pub fn check_security(policy: SecurityPolicy, mode: SecurityMode) -> Result<(), String> {
    match (policy, mode) {
        (SecurityPolicy::None, SecurityMode::None) => Ok(()),
        (SecurityPolicy::None, m) => Err(format!(
            "security_mode \"{m}\" needs a security_policy other than \"None\""
        )),
        (p, SecurityMode::None) => Err(format!(
            "security_policy \"{p}\" needs security_mode \"Sign\" or \"SignAndEncrypt\""
        )),
        _ => Ok(()),
    }
}

/// Who the gateway says it is when it activates a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// No user.
    Anonymous,
    /// User name, with the password read from a file at connect time.
    UserName {
        /// The user name.
        user: String,
        /// File holding the password (trailing newline ignored).
        password_file: PathBuf,
    },
    /// An X.509 user certificate (DER or PEM) and its private key (PEM).
    X509 {
        /// The user certificate.
        cert_file: PathBuf,
        /// The user's private key.
        key_file: PathBuf,
    },
}

/// How values are obtained from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Monitored items in one subscription; the server pushes changes.
    #[default]
    Subscribe,
    /// One Read call for all tags every scan interval.
    Poll,
}

/// Where a tag's value lives in the server's address space.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NodeRef {
    /// A node id (`ns=2;s=Oven.Temp`, `i=2258`, `g=...`, `b=...`).
    Id(NodeId),
    /// Browse names from the Objects folder down, resolved once per session.
    BrowsePath(Vec<String>),
}

impl fmt::Display for NodeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeRef::Id(id) => write!(f, "{id}"),
            NodeRef::BrowsePath(p) => write!(f, "Objects/{}", p.join("/")),
        }
    }
}

/// Parses a node id in the standard text form (`ns=<index>;<i|s|g|b>=<value>`).
pub fn parse_node_id(text: &str) -> Result<NodeId, String> {
    NodeId::from_str(text.trim()).map_err(|_| {
        format!(
            "invalid node id {text:?}; expected ns=<index>;<i|s|g|b>=<value>, \
             e.g. \"ns=2;s=Oven.Temp\" or \"i=2258\""
        )
    })
}

/// Parses a browse path: browse names separated by `/`, starting at (and optionally naming)
/// the Objects folder, e.g. `Objects/Oven/Temp` or `Oven/Temp`. A name may carry a namespace
/// index prefix (`2:Temp`).
pub fn parse_browse_path(text: &str) -> Result<Vec<String>, String> {
    let mut parts: Vec<&str> = text.trim().trim_matches('/').split('/').collect();
    if parts.first() == Some(&"Objects") {
        parts.remove(0);
    }
    if parts.is_empty() || parts.iter().any(|p| p.trim().is_empty()) {
        return Err(format!(
            "invalid browse path {text:?}; expected names separated by '/', e.g. \"Objects/Oven/Temp\""
        ));
    }
    Ok(parts.into_iter().map(|p| p.trim().to_owned()).collect())
}

/// One validated OPC UA tag.
#[derive(Debug, Clone, PartialEq)]
pub struct OpcUaTag {
    /// Tag name, unique within the device.
    pub name: Arc<str>,
    /// The node to read or monitor.
    pub node: NodeRef,
    /// Requested sampling interval on the server (subscribe mode).
    pub sampling_interval: Duration,
    /// Absolute data-change deadband on the server; `None` reports every change.
    pub deadband: Option<f64>,
    /// Server-side queue size of the monitored item.
    pub queue_size: u32,
    /// Unit, description and engineering range, for consumers; the driver never reads it.
    pub meta: Arc<crate::model::TagMeta>,
    /// Whether commands may write the tag, and the range they may write; gateway policy the
    /// driver never reads (it writes whatever request reaches it).
    pub write: Option<crate::model::WriteAccess>,
}

/// A validated OPC UA device (one session).
#[derive(Debug, Clone, PartialEq)]
pub struct OpcUaSettings {
    /// `opc.tcp://host:port[/path]`.
    pub endpoint: String,
    /// Channel security policy.
    pub security_policy: SecurityPolicy,
    /// Channel security mode.
    pub security_mode: SecurityMode,
    /// User identity.
    pub identity: Identity,
    /// Own certificate and key (`own/`, `private/`), `trusted/` and `rejected/` server certs.
    pub pki_dir: PathBuf,
    /// Trust any server certificate (commissioning only).
    pub trust_server_cert: bool,
    /// Publishing interval of the subscription.
    pub publishing_interval: Duration,
    /// Subscribe or poll.
    pub mode: Mode,
    /// Poll interval (poll mode).
    pub scan_interval: Duration,
    /// Timeout for each request and for connecting.
    pub timeout: Duration,
    /// First reconnect delay; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// The tags, in config order; a tag's index is its `TagId`.
    pub tags: Arc<[OpcUaTag]>,
}

impl OpcUaSettings {
    /// Settings with defaults for everything but the endpoint and the tags.
    pub fn new(endpoint: impl Into<String>, tags: Vec<OpcUaTag>) -> Self {
        OpcUaSettings {
            endpoint: endpoint.into(),
            security_policy: SecurityPolicy::None,
            security_mode: SecurityMode::None,
            identity: Identity::Anonymous,
            pki_dir: PathBuf::from("pki"),
            trust_server_cert: false,
            publishing_interval: Duration::from_millis(500),
            mode: Mode::Subscribe,
            scan_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            tags: tags.into(),
        }
    }
}

/// Checks an endpoint URL's shape: `opc.tcp://host:port[/path]`.
pub fn check_endpoint(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("opc.tcp://")
        .ok_or_else(|| format!("endpoint {url:?} must start with \"opc.tcp://\""))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        // [::1]:4840
        match v6.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, p)) => match p.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None => return Err(format!("endpoint {url:?} has an invalid port {p:?}")),
            },
            None => return Err(format!("endpoint {url:?} has an unclosed '['")),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.chars().any(char::is_whitespace) {
        return Err(format!("endpoint {url:?} has a space in its host"));
    }
    if host.is_empty() {
        return Err(format!("endpoint {url:?} has no host"));
    }
    if let Some(p) = port {
        if p.parse::<u16>().map(|p| p == 0).unwrap_or(true) {
            return Err(format!("endpoint {url:?} has an invalid port {p:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_parse_in_every_identifier_form() {
        for text in [
            "ns=2;s=Oven.Temp",
            "i=2258",
            "ns=1;i=5",
            "ns=3;g=72962B91-FA75-4AE6-8D28-B404DC7DAF63",
            "ns=2;b=M/RbKBsRVkePCePcx24oRA==",
        ] {
            assert!(parse_node_id(text).is_ok(), "{text}");
        }
        for text in ["", "ns=x;s=a", "s", "ns=2;q=1", "i=abc", "ns=70000;i=1"] {
            assert!(parse_node_id(text).is_err(), "{text}");
        }
    }

    #[test]
    fn browse_paths_drop_a_leading_objects_folder() {
        assert_eq!(
            parse_browse_path("Objects/Oven/Temp").unwrap(),
            vec!["Oven", "Temp"]
        );
        assert_eq!(
            parse_browse_path("2:Oven/Temp").unwrap(),
            vec!["2:Oven", "Temp"]
        );
        assert!(parse_browse_path("Objects").is_err());
        assert!(parse_browse_path("Oven//Temp").is_err());
    }

    #[test]
    fn security_none_pairs_only_with_none() {
        assert!(check_security(SecurityPolicy::None, SecurityMode::None).is_ok());
        assert!(check_security(SecurityPolicy::None, SecurityMode::Sign).is_err());
        assert!(check_security(SecurityPolicy::Basic256Sha256, SecurityMode::None).is_err());
        assert!(check_security(
            SecurityPolicy::Aes256Sha256RsaPss,
            SecurityMode::SignAndEncrypt
        )
        .is_ok());
    }

    #[test]
    fn policy_and_mode_names_round_trip() {
        for p in SecurityPolicy::ALL {
            assert_eq!(p.name().parse::<SecurityPolicy>(), Ok(p));
        }
        for m in SecurityMode::ALL {
            assert_eq!(m.name().parse::<SecurityMode>(), Ok(m));
        }
        assert!("Basic128Rsa15".parse::<SecurityPolicy>().is_err());
    }

    #[test]
    fn endpoints_must_be_opc_tcp_with_a_host() {
        assert!(check_endpoint("opc.tcp://127.0.0.1:4840").is_ok());
        assert!(check_endpoint("opc.tcp://plc/UA/Server").is_ok());
        assert!(check_endpoint("http://plc:4840").is_err());
        assert!(check_endpoint("opc.tcp://:4840").is_err());
        assert!(check_endpoint("opc.tcp://plc:0").is_err());
        assert!(check_endpoint("opc.tcp://[::1]").is_ok());
        assert!(check_endpoint("opc.tcp://[::1]:4840/x").is_ok());
        assert!(check_endpoint("opc.tcp://[::1]4840").is_err());
        assert!(check_endpoint("opc.tcp://my plc:4840").is_err());
    }
}
