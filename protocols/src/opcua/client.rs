//! Building an async-opcua client from [`OpcUaSettings`] and opening a session: endpoint
//! discovery, security matching, user identity, and the helpers that walk the address space.
//! Shared by the driver and the `browse` command.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use opcua::client::transport::TcpConnector;
use opcua::client::{Client, ClientBuilder, IdentityToken, Session, SessionEventLoop};
use opcua::crypto::{CertificateStore, X509};
use opcua::types::{
    BrowseDescription, BrowseDirection, BrowseResultMask, ByteString, DataValue,
    EndpointDescription, NodeClassMask, NodeId, ObjectId, ReadValueId, ReferenceDescription,
    ReferenceTypeId, StatusCode, TimestampsToReturn,
};

use super::{Identity, OpcUaSettings, SecurityMode, SecurityPolicy};

/// Publishing cycles without a notification before the server sends a keep-alive.
pub(crate) const KEEP_ALIVE_COUNT: u32 = 10;
/// How long the server keeps a session without a connection (the session timeout requested).
pub(crate) const SESSION_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a session could not be opened or a service failed.
#[derive(Debug, thiserror::Error)]
pub enum OpcUaError {
    /// The client could not be set up (PKI directory, own certificate).
    #[error("cannot set up the OPC UA client: {0}")]
    Setup(String),
    /// A file of the client's PKI directory could not be written.
    #[error("cannot set up the OPC UA client: {}: {source}", .path.display())]
    PkiFile {
        /// The file or directory.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// The user identity could not be loaded.
    #[error("cannot load the user identity: {0}")]
    Identity(String),
    /// The user's password file could not be read.
    #[error("cannot load the user identity: password_file {}: {source}", .path.display())]
    PasswordFile {
        /// The configured `password_file`.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// The server could not be reached or did not answer (the link failed).
    #[error("cannot reach {endpoint}: {status}")]
    Unreachable {
        /// The configured endpoint.
        endpoint: String,
        /// What the transport said.
        status: String,
    },
    /// The server offers no endpoint with the configured security.
    #[error(
        "the server offers no endpoint with security_policy \"{policy}\" and security_mode \
         \"{mode}\"; it offers: {offered}"
    )]
    NoMatchingEndpoint {
        /// The configured policy.
        policy: SecurityPolicy,
        /// The configured mode.
        mode: SecurityMode,
        /// What the server offers, `policy/mode` pairs.
        offered: String,
    },
    /// The server answered a service call with a bad status for the node (the server said no).
    #[error("the server answered {0}")]
    Service(StatusCode),
    /// A service call failed as a whole: the link dropped, it timed out, or the session is gone.
    #[error("the request failed: {0}")]
    Call(StatusCode),
}

/// The session type the adapter uses.
pub(crate) type EventLoop = SessionEventLoop<TcpConnector>;

/// The application URI the gateway presents (and writes into its own certificate).
pub(crate) fn application_uri() -> String {
    let host = gethostname();
    format!("urn:edge-gateway:{host}")
}

fn gethostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Builds a client: own certificate in `pki_dir` (created on first use), trust settings,
/// timeouts, and reconnect backoff (the session retries for ever; the driver decides when to
/// give up on a session).
pub(crate) fn build_client(settings: &OpcUaSettings) -> Result<Client, OpcUaError> {
    // Devices sharing a pki_dir would otherwise race to create the same key pair (the library
    // checks for the files, then writes them).
    static KEYPAIR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = KEYPAIR.lock().unwrap_or_else(|e| e.into_inner());
    // A publish request waits up to a keep-alive period for its answer; the client must wait
    // longer than that, or a late keep-alive is discarded.
    let publish_timeout = (settings.publishing_interval * (KEEP_ALIVE_COUNT + 2)
        + settings.timeout)
        .max(Duration::from_secs(60));
    let builder = ClientBuilder::new()
        .application_name("edge-gateway")
        .application_uri(application_uri())
        .product_uri("urn:edge-gateway")
        .pki_dir(settings.pki_dir.clone())
        .create_sample_keypair(true)
        .trust_server_certs(settings.trust_server_cert)
        .verify_server_certs(true)
        .session_retry_limit(-1)
        .session_retry_initial(settings.backoff_min)
        .session_retry_max(settings.backoff_max)
        .request_timeout(settings.timeout)
        .keep_alive_interval(keep_alive_interval(settings))
        .max_failed_keep_alive_count(2)
        .session_timeout(SESSION_TIMEOUT.as_millis() as u32)
        .publish_timeout(publish_timeout)
        // 10k monitored items with queued values make big publish responses.
        .max_message_size(64 * 1024 * 1024)
        .max_chunk_count(4096)
        .max_array_length(1_000_000)
        .session_name("edge-gateway")
        .certificate_path(PathBuf::from("own/cert.der"))
        .private_key_path(PathBuf::from("private/private.pem"));
    let client = builder.client().map_err(|errors| {
        OpcUaError::Setup(format!(
            "pki_dir {}: {}",
            settings.pki_dir.display(),
            errors.join("; ")
        ))
    })?;
    // async-opcua logs a failed key pair creation and carries on; a secure channel or an X.509
    // user needs the pair, so say so now rather than at every connect.
    let needs_pair = settings.security_policy != super::SecurityPolicy::None
        || matches!(settings.identity, Identity::X509 { .. });
    if needs_pair {
        for file in ["own/cert.der", "private/private.pem"] {
            let path = settings.pki_dir.join(file);
            if !path.is_file() {
                return Err(OpcUaError::Setup(format!(
                    "no {} (could not create the gateway's key pair in pki_dir {})",
                    path.display(),
                    settings.pki_dir.display()
                )));
            }
        }
    }
    Ok(client)
}

/// How often the session checks that the server is alive: often enough that a dead link is
/// noticed within a few seconds, never more often than the request timeout allows.
fn keep_alive_interval(settings: &OpcUaSettings) -> Duration {
    settings
        .timeout
        .clamp(Duration::from_millis(500), Duration::from_secs(5))
}

/// Reads a password file; a single trailing newline is not part of the password.
pub(crate) fn read_password(path: &Path) -> Result<String, OpcUaError> {
    let text = std::fs::read_to_string(path).map_err(|source| OpcUaError::PasswordFile {
        path: path.to_path_buf(),
        source,
    })?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    Ok(text.strip_suffix('\r').unwrap_or(text).to_owned())
}

/// The identity token for the configured identity.
pub(crate) fn identity_token(identity: &Identity) -> Result<IdentityToken, OpcUaError> {
    Ok(match identity {
        Identity::Anonymous => IdentityToken::new_anonymous(),
        Identity::UserName {
            user,
            password_file,
        } => IdentityToken::new_user_name(user.clone(), read_password(password_file)?),
        Identity::X509 {
            cert_file,
            key_file,
        } => IdentityToken::new_x509_path(cert_file, key_file).map_err(|e| {
            OpcUaError::Identity(format!(
                "user_cert_file {} / user_key_file {}: {e}",
                cert_file.display(),
                key_file.display()
            ))
        })?,
    })
}

/// Asks the server for its endpoints and picks the one with the configured security. The
/// endpoint URL is replaced by the configured one: servers behind NAT or a proxy advertise
/// addresses the gateway cannot reach.
pub(crate) async fn discover_endpoint(
    client: &Client,
    settings: &OpcUaSettings,
) -> Result<EndpointDescription, OpcUaError> {
    let request = client.get_server_endpoints_from_url(settings.endpoint.as_str());
    let endpoints = match tokio::time::timeout(settings.timeout, request).await {
        Ok(Ok(endpoints)) => endpoints,
        Ok(Err(e)) => {
            return Err(OpcUaError::Unreachable {
                endpoint: settings.endpoint.clone(),
                status: e.to_string(),
            })
        }
        Err(_) => {
            return Err(OpcUaError::Unreachable {
                endpoint: settings.endpoint.clone(),
                status: format!("no answer within {:?}", settings.timeout),
            })
        }
    };
    let policy_uri = settings.security_policy.to_opcua().to_uri();
    let mode = settings.security_mode.to_opcua();
    let found = endpoints
        .iter()
        .find(|e| e.security_policy_uri.as_ref() == policy_uri && e.security_mode == mode);
    match found {
        Some(e) => {
            let mut e = e.clone();
            e.endpoint_url = settings.endpoint.as_str().into();
            Ok(e)
        }
        None => {
            let mut offered: Vec<String> = endpoints
                .iter()
                .map(|e| {
                    let policy = e
                        .security_policy_uri
                        .as_ref()
                        .rsplit('#')
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    format!("{policy}/{:?}", e.security_mode)
                })
                .collect();
            offered.sort();
            offered.dedup();
            Err(OpcUaError::NoMatchingEndpoint {
                policy: settings.security_policy,
                mode: settings.security_mode,
                offered: offered.join(", "),
            })
        }
    }
}

/// Discovers the endpoint and builds a session and its event loop. Nothing is connected until
/// the event loop is polled.
pub(crate) async fn open_session(
    client: &mut Client,
    settings: &OpcUaSettings,
) -> Result<(Arc<Session>, EventLoop, EndpointDescription), OpcUaError> {
    let endpoint = discover_endpoint(client, settings).await?;
    let token = identity_token(&settings.identity)?;
    let (session, event_loop) = client
        .connect_to_endpoint_directly(endpoint.clone(), token)
        .map_err(|e| OpcUaError::Setup(e.to_string()))?;
    Ok((session, event_loop, endpoint))
}

/// An operator-facing explanation of a rejected server certificate: which file to move where.
pub(crate) fn untrusted_server_advice(pki_dir: &Path, server_certificate: &ByteString) -> String {
    let name = X509::from_byte_string(server_certificate)
        .map(|cert| CertificateStore::cert_file_name(&cert))
        .unwrap_or_else(|_| "<the server's certificate>.der".to_owned());
    format!(
        "the server's certificate is not trusted; after checking it, move {} into {} \
         (or set trust_server_cert = true while commissioning)",
        pki_dir.join("rejected").join(&name).display(),
        pki_dir.join("trusted").display()
    )
}

/// Puts a server certificate (DER file) into `pki_dir/trusted/` under the name the certificate
/// store looks for, which is what an operator does by moving it out of `rejected/`.
pub fn trust_server_certificate(pki_dir: &Path, cert_file: &Path) -> Result<PathBuf, OpcUaError> {
    let cert = CertificateStore::read_cert(cert_file)
        .map_err(|e| OpcUaError::Setup(format!("{}: {e}", cert_file.display())))?;
    let trusted = pki_dir.join("trusted");
    std::fs::create_dir_all(&trusted).map_err(|source| OpcUaError::PkiFile {
        path: trusted.clone(),
        source,
    })?;
    let target = trusted.join(CertificateStore::cert_file_name(&cert));
    std::fs::copy(cert_file, &target).map_err(|source| OpcUaError::PkiFile {
        path: target.clone(),
        source,
    })?;
    Ok(target)
}

/// Whether a status code means the server's certificate was not accepted.
pub fn is_certificate_problem(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BadCertificateUntrusted
            | StatusCode::BadSecurityChecksFailed
            | StatusCode::BadCertificateHostNameInvalid
            | StatusCode::BadCertificateUriInvalid
            | StatusCode::BadCertificateTimeInvalid
            | StatusCode::BadCertificateInvalid
            | StatusCode::BadNoValidCertificates
            | StatusCode::BadCertificateChainIncomplete
            | StatusCode::BadCertificateIssuerRevocationUnknown
            | StatusCode::BadCertificateRevocationUnknown
            | StatusCode::BadCertificateRevoked
            | StatusCode::BadCertificateIssuerRevoked
            | StatusCode::BadCertificateIssuerTimeInvalid
            | StatusCode::BadCertificateUseNotAllowed
            | StatusCode::BadCertificateIssuerUseNotAllowed
    )
}

/// Reads `reads` in calls of at most `per_call` nodes (the server's MaxNodesPerRead, or a
/// safe size when it sets none), calling `on_call` before each; the first failed call fails
/// the whole read with its status.
pub(crate) async fn read_chunked(
    session: &Session,
    reads: &[ReadValueId],
    per_call: usize,
    timestamps: TimestampsToReturn,
    mut on_call: impl FnMut(),
) -> Result<Vec<DataValue>, StatusCode> {
    let mut values = Vec::with_capacity(reads.len());
    for chunk in reads.chunks(per_call.max(1)) {
        on_call();
        let answer = session
            .read(chunk, timestamps, 0.0)
            .await
            .map_err(|e| e.status())?;
        values.extend(answer);
    }
    Ok(values)
}

/// Pages of 1000 references followed for one node: a million children is beyond any tag list.
const MAX_BROWSE_PAGES: usize = 1000;

/// The forward hierarchical children of a node (all pages, following continuation points).
pub(crate) async fn children(
    session: &Session,
    node: &NodeId,
) -> Result<Vec<ReferenceDescription>, OpcUaError> {
    let description = BrowseDescription {
        node_id: node.clone(),
        browse_direction: BrowseDirection::Forward,
        reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
        include_subtypes: true,
        node_class_mask: (NodeClassMask::OBJECT | NodeClassMask::VARIABLE).bits(),
        result_mask: BrowseResultMask::All as u32,
    };
    let mut results = session
        .browse(&[description], 1000, None)
        .await
        .map_err(|e| OpcUaError::Call(e.status()))?;
    let mut out = Vec::new();
    let mut pages = 0;
    while let Some(result) = results.pop() {
        if result.status_code.is_bad() {
            return Err(OpcUaError::Service(result.status_code));
        }
        out.extend(result.references.unwrap_or_default());
        if result.continuation_point.is_null() || result.continuation_point.is_empty() {
            break;
        }
        pages += 1;
        if pages >= MAX_BROWSE_PAGES {
            // Release the server's continuation point rather than walking on for ever.
            let _ = session
                .browse_next(true, &[result.continuation_point])
                .await;
            break;
        }
        results = session
            .browse_next(false, &[result.continuation_point])
            .await
            .map_err(|e| OpcUaError::Call(e.status()))?;
    }
    Ok(out)
}

/// Resolves a browse path (names below the Objects folder) by walking it one level at a time.
/// A name matches a child's browse name; a `2:` prefix also requires that namespace index.
/// Returns the server's status for a path that does not exist (`BadNoMatch`).
pub(crate) async fn resolve_path(session: &Session, path: &[String]) -> Result<NodeId, OpcUaError> {
    let mut node: NodeId = ObjectId::ObjectsFolder.into();
    for segment in path {
        let (ns, name) = split_qualified(segment);
        let found = children(session, &node).await?.into_iter().find(|r| {
            r.browse_name.name.as_ref() == name
                && ns.is_none_or(|ns| ns == r.browse_name.namespace_index)
        });
        match found {
            Some(r) => node = r.node_id.node_id,
            None => return Err(OpcUaError::Service(StatusCode::BadNoMatch)),
        }
    }
    Ok(node)
}

/// Splits `2:Temp` into namespace 2 and `Temp`; a name without a numeric prefix has none.
fn split_qualified(segment: &str) -> (Option<u16>, &str) {
    match segment.split_once(':') {
        Some((ns, name)) => match ns.parse::<u16>() {
            Ok(ns) => (Some(ns), name),
            Err(_) => (None, segment),
        },
        None => (None, segment),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualified_names_split_only_on_a_numeric_prefix() {
        assert_eq!(split_qualified("2:Temp"), (Some(2), "Temp"));
        assert_eq!(split_qualified("Temp"), (None, "Temp"));
        assert_eq!(split_qualified("a:b"), (None, "a:b"));
    }

    #[test]
    fn password_files_lose_one_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("opcua-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "s3cret \n").unwrap();
        assert_eq!(read_password(&file).unwrap(), "s3cret ");
        std::fs::write(&file, "a\r\n").unwrap();
        assert_eq!(read_password(&file).unwrap(), "a");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn untrusted_advice_names_both_directories() {
        let advice = untrusted_server_advice(Path::new("/var/lib/gw/pki"), &ByteString::null());
        assert!(advice.contains("/var/lib/gw/pki/rejected/"), "{advice}");
        assert!(advice.contains("/var/lib/gw/pki/trusted"), "{advice}");
    }
}
