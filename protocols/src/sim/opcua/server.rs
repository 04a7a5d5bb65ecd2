//! Setting up the server: endpoints and limits, the listening socket, the server's key pair
//! and certificate, and which user identities may open sessions.

use std::fs;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use opcua::crypto::{CertificateStore, SecurityPolicy, Thumbprint, X509Data, X509};
use opcua::server::authenticator::{
    user_pass_security_policy_id, user_pass_security_policy_uri, AuthManager, Password, UserToken,
};
use opcua::server::diagnostics::NamespaceMetadata;
use opcua::server::node_manager::memory::simple_node_manager;
use opcua::server::{ServerBuilder, ServerEndpoint};
use opcua::types::{
    DateTime, Error as UaError, MessageSecurityMode, StatusCode, UAString, UserTokenPolicy,
    UserTokenType,
};
use tokio::net::{TcpListener, TcpSocket};
use tracing::info;

use super::{SimError, SimOptions, APPLICATION_URI, HOST, NAMESPACE_URI, OWN_CERT};

const APPLICATION_NAME: &str = "Edge Gateway OPC UA Simulator";
const ENDPOINT_PATH: &str = "/";
/// Where the server's own private key lives inside `pki_dir` (async-opcua's default).
const OWN_KEY: &str = "private/private.pem";
/// Policy ids async-opcua's server expects for anonymous and X.509 tokens.
const POLICY_ID_ANONYMOUS: &str = "anonymous";
const POLICY_ID_X509: &str = "x509";
/// Server-side subscription timer; also the smallest publishing / sampling interval.
const SUBSCRIPTION_TICK_MS: u64 = 20;
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

pub(super) fn server_builder(
    opts: &SimOptions,
    port: u16,
    authenticator: SimAuthenticator,
) -> ServerBuilder {
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
pub(super) async fn bind(port: u16) -> Result<TcpListener, SimError> {
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
pub(super) fn ensure_keypair(pki_dir: &Path) -> Result<(), SimError> {
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
    let file_error = |source| SimError::CertificateFile {
        pki_dir: pki_dir.to_path_buf(),
        source,
    };
    fs::rename(&tmp_key, &key_path).map_err(file_error)?;
    fs::rename(&tmp_cert, &cert_path).map_err(file_error)?;
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
pub(super) struct SimAuthenticator {
    pub(super) users: Vec<(String, String)>,
    pub(super) allow_anonymous: bool,
    pub(super) accept_x509_users: bool,
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
