//! The `browse` command: an OPC UA server's address space as a tree, or as ready-to-paste
//! `[[devices.tags]]` entries, so integrators build tag lists from what the server offers.

use std::path::PathBuf;
use std::time::Duration;

use protocols::opcua::{self, browse, Identity, OpcUaSettings, SecurityMode, SecurityPolicy};

/// Output of `browse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BrowseFormat {
    /// An indented tree with node id, data type and access level.
    Tree,
    /// `[[devices.tags]]` entries for every readable variable.
    Toml,
}

/// Options of `edge-gateway browse`.
#[derive(Debug, Clone, clap::Args)]
pub struct BrowseArgs {
    /// The server, e.g. opc.tcp://127.0.0.1:4840.
    #[arg(long)]
    pub endpoint: String,
    /// Where to start (a node id); default the Objects folder.
    #[arg(long, default_value = "i=85")]
    pub node: String,
    /// How many levels below the start node.
    #[arg(long, default_value_t = 3)]
    pub depth: usize,
    /// tree or toml.
    #[arg(long, value_enum, default_value_t = BrowseFormat::Tree)]
    pub format: BrowseFormat,
    /// None, Basic256Sha256, Aes128_Sha256_RsaOaep or Aes256_Sha256_RsaPss.
    #[arg(long, default_value = "None")]
    pub security_policy: String,
    /// None, Sign or SignAndEncrypt.
    #[arg(long, default_value = "None")]
    pub security_mode: String,
    /// User name; needs --password-file.
    #[arg(long, requires = "password_file")]
    pub username: Option<String>,
    /// File holding the user's password.
    #[arg(long, requires = "username")]
    pub password_file: Option<PathBuf>,
    /// X.509 user certificate; needs --user-key-file.
    #[arg(long, requires = "user_key_file", conflicts_with = "username")]
    pub user_cert_file: Option<PathBuf>,
    /// Private key of the X.509 user certificate.
    #[arg(long, requires = "user_cert_file")]
    pub user_key_file: Option<PathBuf>,
    /// The gateway's PKI directory (own certificate, trusted/ and rejected/ server certs).
    #[arg(long, default_value = "./pki")]
    pub pki_dir: PathBuf,
    /// Trust the server's certificate without checking it (commissioning only).
    #[arg(long)]
    pub trust_server_cert: bool,
    /// How long to wait for the server (seconds).
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

/// Why browsing failed.
#[derive(Debug, thiserror::Error)]
pub enum BrowseError {
    /// A flag has a bad value.
    #[error("{0}")]
    Usage(String),
    /// The server could not be browsed.
    #[error(transparent)]
    OpcUa(#[from] opcua::OpcUaError),
}

impl BrowseArgs {
    /// The connection settings these flags describe (no tags).
    pub fn settings(&self) -> Result<OpcUaSettings, BrowseError> {
        opcua::check_endpoint(&self.endpoint).map_err(BrowseError::Usage)?;
        let policy: SecurityPolicy = self.security_policy.parse().map_err(BrowseError::Usage)?;
        let mode: SecurityMode = self.security_mode.parse().map_err(BrowseError::Usage)?;
        opcua::check_security(policy, mode).map_err(BrowseError::Usage)?;
        let identity = match (
            &self.username,
            &self.password_file,
            &self.user_cert_file,
            &self.user_key_file,
        ) {
            (Some(user), Some(password_file), _, _) => Identity::UserName {
                user: user.clone(),
                password_file: password_file.clone(),
            },
            (_, _, Some(cert_file), Some(key_file)) => Identity::X509 {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
            },
            _ => Identity::Anonymous,
        };
        let mut s = OpcUaSettings::new(self.endpoint.clone(), Vec::new());
        s.security_policy = policy;
        s.security_mode = mode;
        s.identity = identity;
        s.pki_dir = self.pki_dir.clone();
        s.trust_server_cert = self.trust_server_cert;
        s.timeout = Duration::from_secs(self.timeout.max(1));
        Ok(s)
    }
}

/// Browses and returns the rendered output.
pub async fn run(args: &BrowseArgs) -> Result<String, BrowseError> {
    let settings = args.settings()?;
    let start = opcua::parse_node_id(&args.node).map_err(BrowseError::Usage)?;
    let nodes = browse::browse(&settings, &start, args.depth.max(1)).await?;
    Ok(match args.format {
        BrowseFormat::Tree => browse::render_tree(&nodes),
        BrowseFormat::Toml => browse::render_toml(&nodes),
    })
}
