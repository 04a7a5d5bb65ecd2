//! `[api]`: the listen address, basic auth and HTTPS of the HTTP API. An address beyond
//! loopback without them is allowed (a closed plant network) but warned about by `check`
//! ([`ApiSettings::exposure_warning`](crate::config::ApiSettings::exposure_warning)).
//! Here `cert_file` and `key_file` need only exist and be readable; `check` (and a reload)
//! then parses them and builds the API's TLS configuration as `run` does (`preflight.rs`).

use std::net::SocketAddr;

use super::Checker;
use crate::config::problem::FieldPath;
use crate::config::raw::RawApi;
use crate::config::{ApiAuth, ApiSettings, ApiTls};

impl Checker<'_> {
    /// Checks the `[api]` section.
    pub(super) fn api(&mut self, value: toml::Value) -> Option<ApiSettings> {
        let path = FieldPath::top("api");
        let table = self.section(Some(value), &path, true)?;
        let (raw, _) = self.unit::<RawApi>(table, &path, &[], None)?;
        let listen = match raw.listen.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                let message = format!(
                    "expected an IP address and port such as \"127.0.0.1:9100\" (or \"[::1]:9100\"), not {:?}",
                    raw.listen
                );
                self.report(&path.key("listen"), message);
                None
            }
        };
        let password_file = raw
            .password_file
            .as_deref()
            .map(|file| self.secret_file(&path.key("password_file"), file));
        let auth = match (raw.username, password_file) {
            (Some(username), Some(password_file)) => {
                if username.is_empty() || username.contains(':') {
                    let message = "must not be empty nor contain `:` (basic auth separates the user name from the password with it)";
                    self.report(&path.key("username"), message);
                }
                Some(ApiAuth {
                    username,
                    password_file,
                })
            }
            (Some(_), None) => {
                self.report(
                    &path.key("password_file"),
                    "`username` needs a `password_file`",
                );
                None
            }
            (None, Some(_)) => {
                self.report(&path.key("username"), "`password_file` needs a `username`");
                None
            }
            (None, None) => None,
        };
        let cert_file = raw
            .cert_file
            .as_deref()
            .map(|file| self.credential_file(&path.key("cert_file"), file));
        let key_file = raw
            .key_file
            .as_deref()
            .map(|file| self.secret_file(&path.key("key_file"), file));
        let tls = match (cert_file, key_file) {
            (Some(cert_file), Some(key_file)) => Some(ApiTls {
                cert_file,
                key_file,
            }),
            (Some(_), None) => {
                self.report(&path.key("key_file"), "`cert_file` needs a `key_file`");
                None
            }
            (None, Some(_)) => {
                self.report(&path.key("cert_file"), "`key_file` needs a `cert_file`");
                None
            }
            (None, None) => None,
        };
        Some(ApiSettings {
            listen: listen?,
            auth,
            tls,
        })
    }
}
