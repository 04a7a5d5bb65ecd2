//! Test certificates, generated at test time with rcgen and written as PEM files to a temporary
//! directory that lives as long as the [`Pki`].
//!
//! What it holds:
//! - a CA ([`Pki::ca`]), and a second one the tests' brokers and clients do not trust
//!   ([`Pki::other_ca`]);
//! - server certificates signed by the CA: a good one for `localhost`, `127.0.0.1` and `::1`, an
//!   expired one, one for [`WRONG_NAME`] only; and one for the good names signed by the other CA;
//! - client certificates signed by the CA, with their name as common name and only SAN (so a
//!   broker that takes the certificate's name as the user name sees it): a good one for
//!   [`CLIENT_NAME`], an expired one, one that expires in [`EXPIRING_IN_DAYS`] days, one signed by
//!   the other CA, and any other name on demand ([`Pki::client_for`]).
//!
//! Keys are ECDSA P-256, written as PKCS#8 (`-----BEGIN PRIVATE KEY-----`); the good client's
//! key is also written as SEC1 (`-----BEGIN EC PRIVATE KEY-----`, [`Pki::client_sec1_key`]).
//! rcgen cannot generate RSA keys with the ring provider: a test that wants one (for a PKCS#1
//! key) brings its own ([`Pki::client_with_key`]). Key files are written readable by their
//! owner only, as a deployment would hold them.
//!
//! This file is also compiled into the gateway's own unit tests (by path), so it uses nothing
//! but rcgen, base64, tempfile and anyhow.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// The name the good client certificate is issued to.
pub const CLIENT_NAME: &str = "gateway";
/// The only name the wrong-name server certificate carries.
pub const WRONG_NAME: &str = "wrong.example.com";
/// Days until the expiring client certificate expires (from the time the [`Pki`] is generated).
pub const EXPIRING_IN_DAYS: u32 = 10;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate (PEM, the leaf only).
    pub cert: PathBuf,
    /// Its private key (PKCS#8 PEM).
    pub key: PathBuf,
}

/// A directory of test certificates; see the module documentation for what it holds.
pub struct Pki {
    dir: tempfile::TempDir,
    ca_cert: PathBuf,
    other_ca_cert: PathBuf,
    ca: Issuer<'static, KeyPair>,
    server: CertFiles,
    server_expired: CertFiles,
    server_wrong_name: CertFiles,
    server_unknown_ca: CertFiles,
    client: CertFiles,
    client_sec1_key: PathBuf,
    client_expired: CertFiles,
    client_expiring: CertFiles,
    client_unknown_ca: CertFiles,
}

/// When a certificate is valid.
#[derive(Clone, Copy)]
enum Validity {
    /// From 1975 to 4096 (rcgen's defaults).
    Long,
    /// From 2020-01-01 to 2021-01-01.
    Expired,
    /// Until this time.
    Until(SystemTime),
}

/// Who a certificate is for.
#[derive(Clone, Copy)]
enum Role<'a> {
    Server(&'a [&'a str]),
    Client(&'a str),
}

impl Pki {
    /// Generates every certificate and writes them to a new temporary directory.
    pub fn generate() -> anyhow::Result<Pki> {
        let dir = tempfile::Builder::new().prefix("pki-").tempdir()?;
        let (ca_cert, ca) = write_ca(dir.path(), "ca", "Test CA")?;
        let (other_ca_cert, other_ca) = write_ca(dir.path(), "other-ca", "Unknown Test CA")?;
        let good_names: &[&str] = &["localhost", "127.0.0.1", "::1"];
        let soon = SystemTime::now() + DAY * EXPIRING_IN_DAYS;
        let path = dir.path();
        let server = issue(
            path,
            "server",
            &ca,
            Role::Server(good_names),
            Validity::Long,
        )?;
        let server_expired = issue(
            path,
            "server-expired",
            &ca,
            Role::Server(good_names),
            Validity::Expired,
        )?;
        let server_wrong_name = issue(
            path,
            "server-wrong-name",
            &ca,
            Role::Server(&[WRONG_NAME]),
            Validity::Long,
        )?;
        let server_unknown_ca = issue(
            path,
            "server-unknown-ca",
            &other_ca,
            Role::Server(good_names),
            Validity::Long,
        )?;
        let client = issue(
            path,
            "client",
            &ca,
            Role::Client(CLIENT_NAME),
            Validity::Long,
        )?;
        let client_sec1_key = path.join("client.sec1.key");
        let pkcs8 = std::fs::read(&client.key)?;
        write_key(&client_sec1_key, &sec1_pem_from_pkcs8_pem(&pkcs8)?)?;
        let client_expired = issue(
            path,
            "client-expired",
            &ca,
            Role::Client(CLIENT_NAME),
            Validity::Expired,
        )?;
        let client_expiring = issue(
            path,
            "client-expiring",
            &ca,
            Role::Client(CLIENT_NAME),
            Validity::Until(soon),
        )?;
        let client_unknown_ca = issue(
            path,
            "client-unknown-ca",
            &other_ca,
            Role::Client(CLIENT_NAME),
            Validity::Long,
        )?;
        Ok(Pki {
            dir,
            ca_cert,
            other_ca_cert,
            ca,
            server,
            server_expired,
            server_wrong_name,
            server_unknown_ca,
            client,
            client_sec1_key,
            client_expired,
            client_expiring,
            client_unknown_ca,
        })
    }

    /// The directory holding every file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA's certificate (PEM): what the brokers and the gateway trust.
    pub fn ca(&self) -> &Path {
        &self.ca_cert
    }

    /// The certificate (PEM) of a CA nobody trusts unless a test says so.
    pub fn other_ca(&self) -> &Path {
        &self.other_ca_cert
    }

    /// A server certificate for `localhost`, `127.0.0.1` and `::1`, signed by the CA.
    pub fn server(&self) -> &CertFiles {
        &self.server
    }

    /// A server certificate for the good names, signed by the CA, that expired on 2021-01-01.
    pub fn server_expired(&self) -> &CertFiles {
        &self.server_expired
    }

    /// A server certificate for [`WRONG_NAME`] only, signed by the CA.
    pub fn server_wrong_name(&self) -> &CertFiles {
        &self.server_wrong_name
    }

    /// A server certificate for the good names, signed by the other CA.
    pub fn server_unknown_ca(&self) -> &CertFiles {
        &self.server_unknown_ca
    }

    /// A client certificate for [`CLIENT_NAME`], signed by the CA.
    pub fn client(&self) -> &CertFiles {
        &self.client
    }

    /// The good client certificate's key again, as SEC1 (`EC PRIVATE KEY`) PEM.
    pub fn client_sec1_key(&self) -> &Path {
        &self.client_sec1_key
    }

    /// A client certificate for [`CLIENT_NAME`], signed by the CA, that expired on 2021-01-01.
    pub fn client_expired(&self) -> &CertFiles {
        &self.client_expired
    }

    /// A client certificate for [`CLIENT_NAME`], signed by the CA, that expires
    /// [`EXPIRING_IN_DAYS`] days after the [`Pki`] was generated.
    pub fn client_expiring(&self) -> &CertFiles {
        &self.client_expiring
    }

    /// A client certificate for [`CLIENT_NAME`], signed by the other CA.
    pub fn client_unknown_ca(&self) -> &CertFiles {
        &self.client_unknown_ca
    }

    /// A new client certificate for `name` (its common name and SAN), signed by the CA, written
    /// as `client-{name}.pem` and `client-{name}.key`.
    pub fn client_for(&self, name: &str) -> anyhow::Result<CertFiles> {
        let stem = format!("client-{name}");
        issue(
            self.dir(),
            &stem,
            &self.ca,
            Role::Client(name),
            Validity::Long,
        )
    }

    /// A new client certificate for `name`, signed by the CA, for the key given as PKCS#8 PEM
    /// (an RSA key, which rcgen cannot generate with ring), written as `client-{name}.pem` and
    /// `client-{name}.key`.
    pub fn client_with_key(&self, name: &str, pkcs8_pem: &str) -> anyhow::Result<CertFiles> {
        let key = KeyPair::from_pem(pkcs8_pem)?;
        let stem = format!("client-{name}");
        issue_for(
            self.dir(),
            &stem,
            &self.ca,
            Role::Client(name),
            Validity::Long,
            key,
        )
    }

    /// Like [`Pki::client_for`], valid until `not_after`, written as `client-{name}-until.pem`.
    pub fn client_until(&self, name: &str, not_after: SystemTime) -> anyhow::Result<CertFiles> {
        let stem = format!("client-{name}-until");
        let validity = Validity::Until(not_after);
        issue(self.dir(), &stem, &self.ca, Role::Client(name), validity)
    }
}

/// A self-signed CA: writes `{stem}.pem` and `{stem}.key`.
fn write_ca(
    dir: &Path,
    stem: &str,
    name: &str,
) -> anyhow::Result<(PathBuf, Issuer<'static, KeyPair>)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    let cert_path = dir.join(format!("{stem}.pem"));
    std::fs::write(&cert_path, cert.pem())?;
    write_key(&dir.join(format!("{stem}.key")), &key.serialize_pem())?;
    Ok((cert_path, Issuer::new(params, key)))
}

/// A leaf certificate signed by `issuer`: writes `{stem}.pem` and `{stem}.key`.
fn issue(
    dir: &Path,
    stem: &str,
    issuer: &Issuer<'_, KeyPair>,
    role: Role<'_>,
    validity: Validity,
) -> anyhow::Result<CertFiles> {
    issue_for(dir, stem, issuer, role, validity, KeyPair::generate()?)
}

/// A leaf certificate for `key`, signed by `issuer`: writes `{stem}.pem` and `{stem}.key`.
fn issue_for(
    dir: &Path,
    stem: &str,
    issuer: &Issuer<'_, KeyPair>,
    role: Role<'_>,
    validity: Validity,
    key: KeyPair,
) -> anyhow::Result<CertFiles> {
    let (names, name, purpose) = match role {
        Role::Server(names) => (
            names.to_vec(),
            names[0],
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        Role::Client(name) => (vec![name], name, ExtendedKeyUsagePurpose::ClientAuth),
    };
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name = common_name(name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![purpose];
    params.use_authority_key_identifier_extension = true;
    match validity {
        Validity::Long => {}
        Validity::Expired => {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        Validity::Until(not_after) => {
            let since_epoch = not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .context("a certificate cannot end before 1970")?;
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
        }
    }
    let cert = params.signed_by(&key, issuer)?;
    let files = CertFiles {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}.key")),
    };
    std::fs::write(&files.cert, cert.pem())?;
    write_key(&files.key, &key.serialize_pem())?;
    Ok(files)
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

/// Writes a private key readable by its owner only.
fn write_key(path: &Path, pem: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(pem.as_bytes())?;
    Ok(())
}

/// The SEC1 `ECPrivateKey` inside a PKCS#8 `PrivateKeyInfo` (its `privateKey` OCTET STRING), as
/// `EC PRIVATE KEY` PEM.
fn sec1_pem_from_pkcs8_pem(pkcs8_pem: &[u8]) -> anyhow::Result<String> {
    let text = std::str::from_utf8(pkcs8_pem)?;
    let body: String = text
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let der = STANDARD.decode(body)?;
    // PrivateKeyInfo ::= SEQUENCE { version INTEGER, algorithm SEQUENCE, privateKey OCTET STRING, .. }
    let (0x30, info, _) = der_item(&der)? else {
        bail!("PKCS#8 is not a SEQUENCE")
    };
    let (0x02, _, rest) = der_item(info)? else {
        bail!("PKCS#8 has no version")
    };
    let (0x30, _, rest) = der_item(rest)? else {
        bail!("PKCS#8 has no algorithm")
    };
    let (0x04, sec1, _) = der_item(rest)? else {
        bail!("PKCS#8 has no private key")
    };
    Ok(pem("EC PRIVATE KEY", sec1))
}

/// One DER item: its tag, its content and what follows it.
fn der_item(input: &[u8]) -> anyhow::Result<(u8, &[u8], &[u8])> {
    let [tag, first, rest @ ..] = input else {
        bail!("DER item cut short")
    };
    let (len, rest) = if first & 0x80 == 0 {
        (usize::from(*first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            bail!("DER length cut short or too long");
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |len, byte| (len << 8) | usize::from(*byte));
        (len, &rest[n..])
    };
    if rest.len() < len {
        bail!("DER content cut short");
    }
    Ok((*tag, &rest[..len], &rest[len..]))
}

/// `der` as PEM with `label`, 64 base64 characters a line.
fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        text.push_str(&String::from_utf8_lossy(line));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}
