//! Azure IoT Hub shared access signature (SAS) tokens: the MQTT password of a device that
//! authenticates with its symmetric key, and when to renew it.
//!
//! A token is `SharedAccessSignature sr={uri}&sig={sig}&se={expiry}` where `{uri}` is the
//! URL-encoded resource URI (`{hub}.azure-devices.net/devices/{device_id}`), `{expiry}` the
//! token's end in seconds since the Unix epoch, and `{sig}` the URL-encoded base64 of
//! HMAC-SHA256(`{uri}\n{expiry}`), keyed with the base64-decoded device key. See Microsoft's
//! "Control access to IoT Hub using Shared Access Signatures"
//! (<https://learn.microsoft.com/en-us/azure/iot-hub/iot-hub-dev-guide-sas>, "Security token
//! structure"). URL-encoding here is `encodeURIComponent`'s, as Microsoft's Node.js device SDK
//! signs: everything but ASCII letters, digits and `-_.!~*'()` is percent-encoded.
//!
//! # Invariants
//! - A token, the key and the decoded key bytes never reach a log line, a `Debug` print or an
//!   error: tokens are [`Secret`]s, decoded keys are zeroed when dropped, and a key that is not
//!   base64 is reported with the position of the bad character, never the character.
//! - [`SasRenewal`] is pure (no clock, no I/O): it holds the token in use, with
//!   `issued <= renew_at <= expiry` and `renew_at - issued` = 80% of the ttl (rounded down), and
//!   hands out that token until `now` reaches `renew_at` (or goes back before `issued`: a clock
//!   stepped back), then signs a fresh one. So the publisher, reconnecting at `renew_at`, never
//!   offers the hub a token in its last fifth of life.

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::secret::Secret;

/// What `encodeURIComponent` percent-encodes: everything but ASCII letters, digits and
/// `-_.!~*'()`.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// Why no token can be signed. Never shows the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SasError {
    /// The key file is empty.
    #[error("the device key is empty: put the device's primary or secondary key (base64, as the Azure portal shows it) in the key file")]
    EmptyKey,
    /// The key is not base64.
    #[error("the device key is not base64 ({0}): use the device's primary or secondary key as the Azure portal shows it")]
    KeyNotBase64(KeyDecodeProblem),
    /// The HMAC refused the key (it takes keys of any length: not expected).
    #[error("the device key cannot key HMAC-SHA256")]
    KeyRejected,
}

/// What is wrong with a key's base64, without any of the key's characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KeyDecodeProblem {
    /// A character that is not in the base64 alphabet, at this byte offset.
    #[error("a character outside the base64 alphabet at offset {0}")]
    Character(usize),
    /// A length no base64 text has.
    #[error("a length of {0} characters, which no base64 text has")]
    Length(usize),
    /// The last character carries bits that do not fit, at this offset.
    #[error("a last character at offset {0} that does not end base64 text")]
    LastCharacter(usize),
    /// Missing or extra `=`.
    #[error("wrong `=` padding")]
    Padding,
}

impl From<base64::DecodeError> for KeyDecodeProblem {
    fn from(e: base64::DecodeError) -> KeyDecodeProblem {
        match e {
            base64::DecodeError::InvalidByte(offset, _) => KeyDecodeProblem::Character(offset),
            base64::DecodeError::InvalidLength(len) => KeyDecodeProblem::Length(len),
            base64::DecodeError::InvalidLastSymbol(offset, _) => {
                KeyDecodeProblem::LastCharacter(offset)
            }
            base64::DecodeError::InvalidPadding => KeyDecodeProblem::Padding,
        }
    }
}

/// The resource URI of a device's token: `{host}/devices/{device_id}` (not yet URL-encoded).
pub(crate) fn device_resource_uri(host: &str, device_id: &str) -> String {
    format!("{host}/devices/{device_id}")
}

/// A SAS token for `resource_uri` valid until `expiry_unix` (seconds since the Unix epoch),
/// signed with `key_base64` (the device key as the Azure portal shows it; surrounding
/// whitespace is ignored).
pub(crate) fn sas_token(
    resource_uri: &str,
    key_base64: &str,
    expiry_unix: u64,
) -> Result<Secret, SasError> {
    let uri = utf8_percent_encode(resource_uri, URI_COMPONENT).to_string();
    let sig = signature(key_base64, format!("{uri}\n{expiry_unix}").as_bytes())?;
    Ok(Secret::new(format!(
        "SharedAccessSignature sr={uri}&sig={sig}&se={expiry_unix}"
    )))
}

/// The URL-encoded base64 HMAC-SHA256 of `message`, keyed with the base64-decoded
/// `key_base64` (surrounding whitespace ignored).
fn signature(key_base64: &str, message: &[u8]) -> Result<String, SasError> {
    let key_text = key_base64.trim();
    if key_text.is_empty() {
        return Err(SasError::EmptyKey);
    }
    let key = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(key_text)
            .map_err(|e| SasError::KeyNotBase64(e.into()))?,
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|_| SasError::KeyRejected)?;
    mac.update(message);
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    Ok(utf8_percent_encode(&signature, URI_COMPONENT).to_string())
}

/// The token a device connects with, renewed at 80% of its life. Pure: the caller passes the
/// time and the key.
#[derive(Debug)]
pub(crate) struct SasRenewal {
    resource_uri: String,
    ttl_secs: u64,
    current: Option<Issued>,
}

/// A signed token and its times (seconds since the Unix epoch).
#[derive(Debug)]
struct Issued {
    token: Secret,
    issued: u64,
    renew_at: u64,
    expiry: u64,
}

impl Issued {
    /// Whether it must be replaced at `now`.
    fn due(&self, now: u64) -> bool {
        now >= self.renew_at || now < self.issued
    }
}

/// The token to connect with, and its times (seconds since the Unix epoch).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CurrentToken<'a> {
    /// The token: the MQTT password.
    pub(crate) token: &'a Secret,
    /// When the connection should be renewed with a fresh token.
    pub(crate) renew_at: u64,
    /// When the hub stops accepting this token.
    pub(crate) expiry: u64,
}

impl SasRenewal {
    /// Tokens for `resource_uri` (not yet URL-encoded), each valid for `ttl` (whole seconds;
    /// at least one).
    pub(crate) fn new(resource_uri: String, ttl: Duration) -> SasRenewal {
        SasRenewal {
            resource_uri,
            ttl_secs: ttl.as_secs().max(1),
            current: None,
        }
    }

    /// Whether the token in use (if any) must be replaced at `now`: there is none, `now` has
    /// reached its renewal time, or the clock went back before it was issued.
    pub(crate) fn due(&self, now: u64) -> bool {
        self.current.as_ref().is_none_or(|c| c.due(now))
    }

    /// The token to connect with at `now`: the one in use until it is [due](Self::due), then
    /// a fresh one signed with `key_base64`. On an error the token in use, if any, is kept.
    pub(crate) fn token(
        &mut self,
        key_base64: &Secret,
        now: u64,
    ) -> Result<CurrentToken<'_>, SasError> {
        let current = match self.current.take() {
            Some(c) if !c.due(now) => c,
            previous => match self.issue(key_base64, now) {
                Ok(fresh) => fresh,
                Err(e) => {
                    self.current = previous;
                    return Err(e);
                }
            },
        };
        let c = self.current.insert(current);
        Ok(CurrentToken {
            token: &c.token,
            renew_at: c.renew_at,
            expiry: c.expiry,
        })
    }

    /// A fresh token issued at `now`.
    fn issue(&self, key_base64: &Secret, now: u64) -> Result<Issued, SasError> {
        let expiry = now.saturating_add(self.ttl_secs);
        let token = sas_token(&self.resource_uri, key_base64.expose(), expiry)?;
        // 80% of the ttl, rounded down, without overflow.
        let life = self.ttl_secs / 5 * 4 + self.ttl_secs % 5 * 4 / 5;
        Ok(Issued {
            token,
            issued: now,
            renew_at: now.saturating_add(life),
            expiry,
        })
    }

    /// When the token in use must be renewed (seconds since the Unix epoch); `None` before the
    /// first token.
    #[cfg(test)]
    pub(crate) fn renew_at(&self) -> Option<u64> {
        self.current.as_ref().map(|c| c.renew_at)
    }

    /// How long from `now` until the token in use must be renewed: zero when it is due.
    pub(crate) fn renew_in(&self, now: u64) -> Duration {
        match &self.current {
            Some(c) if !self.due(now) => Duration::from_secs(c.renew_at - now),
            _ => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests;
