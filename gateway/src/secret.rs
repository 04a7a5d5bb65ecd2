//! Where the gateway's secrets come from: a file named in the config, or a systemd credential;
//! and the [`Secret`] they are read into.
//!
//! A secret key in the config (`password_file`, `key_file`, `sas_key_file`) names either a path
//! or `credential:NAME`, which is `$CREDENTIALS_DIRECTORY/NAME` (systemd's `LoadCredential=`),
//! so a secret need not be readable on disk by the service's dynamic user. The config checker
//! resolves relative paths; this module resolves credentials when the file is needed, since
//! `$CREDENTIALS_DIRECTORY` exists only in the service's environment.
//!
//! # Invariants
//! - A secret's value never reaches a log line, a `Debug` or `Display` print or an error
//!   message: [`Secret`] prints `***`, and [`SecretError`] names the source (the path or
//!   `credential:NAME`) and keeps the OS error, never the content. Not even a byte of it: a
//!   file that is not UTF-8 is reported with the position of the bad byte only.
//! - A secret's bytes are overwritten with zeros when the [`Secret`] is dropped (`zeroize`), and
//!   so is the buffer of a file that turned out not to be UTF-8. Copies made with
//!   [`Secret::expose`] are the caller's to keep short.
//! - A file (not a credential) readable by its group or others is warned about once per file
//!   and process, with the fix; credentials are exempt, as systemd makes them private to the
//!   service.

use std::collections::HashSet;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::warn;
use zeroize::Zeroizing;

/// The prefix that names a systemd credential instead of a path.
pub const CREDENTIAL_PREFIX: &str = "credential:";

/// The largest secret file read: passwords, keys and certificate chains are far smaller.
const MAX_SECRET_BYTES: usize = 64 * 1024;

/// The environment variable systemd sets to the service's credentials directory.
const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

/// Where a secret is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file (resolved against the config file's directory when loaded from disk).
    File(PathBuf),
    /// `credential:NAME`: `$CREDENTIALS_DIRECTORY/NAME`.
    Credential(String),
}

/// A secret's text (a password, a key, a token). `Debug` and `Display` print `***`; the value
/// is only had through [`Secret::expose`], and is zeroed when dropped.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a secret value.
    pub(crate) fn new(value: String) -> Secret {
        Secret(Zeroizing::new(value))
    }

    /// The value itself: for the one call that needs it (a CONNECT's password, a signature's
    /// key), never for a log line.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Why a secret cannot be had. Each names the secret's source, never its content.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// `credential:NAME` outside a service that loads credentials.
    #[error("`credential:{0}` needs $CREDENTIALS_DIRECTORY (set by systemd's LoadCredential=), which is not set")]
    NoCredentialsDirectory(String),
    /// The file cannot be read.
    #[error("{source_name}: cannot read the secret: {source}")]
    Read {
        /// The path, or `credential:NAME (path)`.
        source_name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than any secret.
    #[error("{source_name}: larger than 64KiB: not a secret file")]
    TooLarge {
        /// The path, or `credential:NAME (path)`.
        source_name: String,
    },
    /// The file is not UTF-8 text.
    #[error("{source_name}: the secret is not UTF-8 text: {source}")]
    NotUtf8 {
        /// The path, or `credential:NAME (path)`.
        source_name: String,
        /// Where the first bad byte is (never the byte itself).
        #[source]
        source: std::str::Utf8Error,
    },
}

/// A secret file that others than its owner can read: what [`SecretSource::read`] warns about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoosePermissions {
    /// The file.
    pub(crate) path: PathBuf,
    /// Its permission bits.
    pub(crate) mode: u32,
}

impl fmt::Display for LoosePermissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "secret file {} is readable by its group or others (mode {:03o}); make it private to the gateway's user with `chmod 600 {}`, or load it as a systemd credential (`credential:NAME`)",
            self.path.display(),
            self.mode & 0o777,
            self.path.display()
        )
    }
}

impl SecretSource {
    /// The file that holds the secret.
    pub fn path(&self) -> Result<PathBuf, SecretError> {
        self.path_in(credentials_directory().as_deref())
    }

    /// The file that holds the secret, with `$CREDENTIALS_DIRECTORY` given as `credentials`.
    pub(crate) fn path_in(&self, credentials: Option<&Path>) -> Result<PathBuf, SecretError> {
        match self {
            SecretSource::File(path) => Ok(path.clone()),
            SecretSource::Credential(name) => credentials
                .map(|dir| dir.join(name))
                .ok_or_else(|| SecretError::NoCredentialsDirectory(name.clone())),
        }
    }

    /// Reads the secret: the file's text without its trailing CR and LF. A file readable by
    /// others is warned about (once per file and process).
    pub fn read(&self) -> Result<Secret, SecretError> {
        let (secret, loose) = self.read_in(credentials_directory().as_deref())?;
        if let Some(loose) = loose {
            warn_once(&loose);
        }
        Ok(secret)
    }

    /// [`SecretSource::read`] with `$CREDENTIALS_DIRECTORY` given as `credentials`, returning
    /// the permission problem instead of logging it.
    pub(crate) fn read_in(
        &self,
        credentials: Option<&Path>,
    ) -> Result<(Secret, Option<LoosePermissions>), SecretError> {
        let path = self.path_in(credentials)?;
        let read_error = |source| SecretError::Read {
            source_name: self.describe(&path),
            source,
        };
        let mut file = std::fs::File::open(&path).map_err(read_error)?;
        let meta = file.metadata().map_err(read_error)?;
        let loose = match self {
            SecretSource::File(_) => loose_permissions(&path, &meta),
            SecretSource::Credential(_) => None,
        };
        // Sized from the start, so the buffer is not reallocated (leaving copies behind) for
        // a file that does not grow while it is read.
        let capacity = usize::try_from(meta.len())
            .unwrap_or(0)
            .min(MAX_SECRET_BYTES)
            .saturating_add(1);
        let mut bytes = Zeroizing::new(Vec::with_capacity(capacity));
        // At most MAX_SECRET_BYTES are read: a secret named by mistake as /dev/zero or a log
        // file must not fill the memory.
        (&mut file)
            .take(MAX_SECRET_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(read_error)?;
        if bytes.len() > MAX_SECRET_BYTES {
            return Err(SecretError::TooLarge {
                source_name: self.describe(&path),
            });
        }
        let text = match std::str::from_utf8(&bytes) {
            Ok(text) => text.trim_end_matches(['\r', '\n']),
            Err(source) => {
                return Err(SecretError::NotUtf8 {
                    source_name: self.describe(&path),
                    source,
                })
            }
        };
        Ok((Secret::new(text.to_owned()), loose))
    }

    /// How errors name this secret: the path, or `credential:NAME (path)`.
    fn describe(&self, path: &Path) -> String {
        match self {
            SecretSource::File(_) => path.display().to_string(),
            SecretSource::Credential(_) => format!("{self} ({})", path.display()),
        }
    }
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::File(path) => write!(f, "{}", path.display()),
            SecretSource::Credential(name) => write!(f, "{CREDENTIAL_PREFIX}{name}"),
        }
    }
}

/// `$CREDENTIALS_DIRECTORY`, when set.
fn credentials_directory() -> Option<PathBuf> {
    std::env::var_os(CREDENTIALS_DIRECTORY).map(PathBuf::from)
}

/// The file's permission problem, if its group or others may read or write it.
#[cfg(unix)]
fn loose_permissions(path: &Path, meta: &std::fs::Metadata) -> Option<LoosePermissions> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode();
    (mode & 0o077 != 0).then(|| LoosePermissions {
        path: path.to_path_buf(),
        mode,
    })
}

/// Permission bits are a Unix notion.
#[cfg(not(unix))]
fn loose_permissions(_: &Path, _: &std::fs::Metadata) -> Option<LoosePermissions> {
    None
}

/// Logs `loose` unless this process already warned about the same file.
fn warn_once(loose: &LoosePermissions) {
    static WARNED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
    let first = match WARNED.lock() {
        Ok(mut warned) => warned
            .get_or_insert_with(HashSet::new)
            .insert(loose.path.clone()),
        Err(_) => true,
    };
    if first {
        warn!(file = %loose.path.display(), "{loose}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A directory with `name` holding `content` at `mode`.
    fn file_with(name: &str, content: &[u8], mode: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join(name);
        std::fs::write(&path, content).expect("the secret file is written");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .expect("the mode is set");
        (dir, path)
    }

    #[test]
    fn debug_and_display_never_show_the_secret() {
        let secret = Secret::new("hunter2".to_owned());
        assert_eq!(format!("{secret:?}"), "***");
        assert_eq!(format!("{secret}"), "***");
        assert_eq!(format!("{:?}", Some(&secret)), "Some(***)");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn a_file_is_read_without_its_trailing_line_end() {
        let (_dir, path) = file_with("password", b"hunter2\r\n\n", 0o600);
        let (secret, loose) = SecretSource::File(path).read_in(None).expect("readable");
        assert_eq!(secret.expose(), "hunter2");
        assert_eq!(loose, None, "a private file is not warned about");
    }

    #[test]
    fn inner_line_ends_and_spaces_are_part_of_the_secret() {
        let (_dir, path) = file_with("password", b" two\nlines \n", 0o600);
        let (secret, _) = SecretSource::File(path).read_in(None).expect("readable");
        assert_eq!(secret.expose(), " two\nlines ");
    }

    #[test]
    fn credential_name_resolves_under_the_credentials_directory() {
        let (dir, _) = file_with("mqtt-password", b"s3cret\n", 0o600);
        let source = SecretSource::Credential("mqtt-password".to_owned());
        assert_eq!(
            source.path_in(Some(dir.path())).expect("a path"),
            dir.path().join("mqtt-password")
        );
        let (secret, _) = source.read_in(Some(dir.path())).expect("readable");
        assert_eq!(secret.expose(), "s3cret");
    }

    #[test]
    fn a_credential_without_credentials_directory_names_the_fix() {
        let source = SecretSource::Credential("mqtt-password".to_owned());
        let err = source.read_in(None).expect_err("no directory to look in");
        let message = err.to_string();
        assert!(message.contains("credential:mqtt-password"), "{message}");
        assert!(message.contains("$CREDENTIALS_DIRECTORY"), "{message}");
        assert!(message.contains("LoadCredential="), "{message}");
    }

    #[test]
    fn a_missing_file_names_its_path_and_keeps_the_os_error() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("absent");
        let err = SecretSource::File(path.clone())
            .read_in(None)
            .expect_err("nothing to read");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        let source = std::error::Error::source(&err).expect("the OS error is kept");
        let io = source
            .downcast_ref::<std::io::Error>()
            .expect("an io::Error");
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn a_missing_credential_names_both_the_credential_and_its_path() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let err = SecretSource::Credential("absent".to_owned())
            .read_in(Some(dir.path()))
            .expect_err("nothing to read");
        let message = err.to_string();
        assert!(message.contains("credential:absent"), "{message}");
        assert!(
            message.contains(&dir.path().join("absent").display().to_string()),
            "{message}"
        );
    }

    #[test]
    fn a_file_that_is_not_utf8_is_refused_without_showing_its_bytes() {
        let (_dir, path) = file_with("key", b"hunter2\xff\xfe", 0o600);
        let err = SecretSource::File(path)
            .read_in(None)
            .expect_err("not text");
        let shown = format!("{err} {err:?}");
        assert!(shown.contains("not UTF-8"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        let source = std::error::Error::source(&err).expect("the UTF-8 error is kept");
        let utf8 = source
            .downcast_ref::<std::str::Utf8Error>()
            .expect("a Utf8Error");
        assert_eq!(utf8.valid_up_to(), 7, "it says where, not what");
    }

    #[test]
    fn a_file_readable_by_others_is_warned_about_with_the_fix() {
        let (_dir, path) = file_with("password", b"hunter2", 0o644);
        let (_, loose) = SecretSource::File(path.clone())
            .read_in(None)
            .expect("readable");
        let loose = loose.expect("mode 644 is warned about");
        let message = loose.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("chmod 600"), "{message}");
        assert!(message.contains("644"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn a_file_readable_by_its_group_is_warned_about() {
        let (_dir, path) = file_with("password", b"hunter2", 0o640);
        let (_, loose) = SecretSource::File(path).read_in(None).expect("readable");
        assert!(loose.is_some(), "mode 640 is warned about");
    }

    #[test]
    fn a_credential_is_not_warned_about_whatever_its_mode() {
        let (dir, _) = file_with("key", b"hunter2", 0o644);
        let (_, loose) = SecretSource::Credential("key".to_owned())
            .read_in(Some(dir.path()))
            .expect("readable");
        assert_eq!(
            loose, None,
            "systemd makes credentials private to the service"
        );
    }
}
