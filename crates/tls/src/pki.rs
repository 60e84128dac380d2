//! A small PKI: one CA per cluster, and a certificate per agent and per
//! user, each in a directory a daemon or a client uses as is.
//!
//! ```text
//! livemig pki init DIR                      DIR/ca.pem, DIR/ca-key.pem
//! livemig pki issue DIR NAME --role ROLE    DIR/NAME/{ca.pem, cert.pem, key.pem}
//!     [--host HOST]...                      (the hosts an agent is dialled by)
//! livemig pki revoke DIR NAME               DIR/crl.pem (copy it into every
//!                                           TLS directory), DIR/revoked.txt
//! ```
//!
//! Each CA's subject is its own (`livemig CA` and a fingerprint of its
//! key), so two clusters' CAs are never taken for one another.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use protocol::Role;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::files;
use crate::identity::ORGANIZATION;

/// How long the CA is valid.
const CA_DAYS: i64 = 3650;
/// How long an issued certificate is valid.
const CERT_DAYS: i64 = 825;

/// Why the PKI could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file or directory could not be written or read.
    #[error("cannot {what} {path}")]
    Io {
        /// What was tried.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The CA already exists; it is never overwritten.
    #[error("{0} already holds a CA; remove it first to start a new one")]
    Exists(PathBuf),
    /// The certificate already exists; it is never overwritten.
    #[error("{0} already exists; remove it first to issue a new certificate")]
    Issued(PathBuf),
    /// A name that cannot be a directory.
    #[error(transparent)]
    Name(#[from] types::InvalidName),
    /// A host that is neither an address nor a DNS name.
    #[error("{0:?} is neither an IP address nor a host name")]
    Host(String),
    /// Generating or signing failed.
    #[error("cannot generate the certificate")]
    Generate(#[from] rcgen::Error),
    /// No certificate of that name was issued here.
    #[error("{0} holds no certificate issued by this PKI")]
    NotIssued(PathBuf),
    /// A certificate that does not parse.
    #[error("cannot read the certificate {0}")]
    Unreadable(PathBuf),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PkiError {
    let path = path.to_path_buf();
    move |source| PkiError::Io { what, path, source }
}

/// Writes `contents` to a new file `path` with `mode`; never replaces one.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io("create", path))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io("write", path))
}

fn subject(common_name: &str, role: Option<Role>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    if let Some(role) = role {
        dn.push(DnType::OrganizationalUnitName, role.name());
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // A little slack for clocks that are not quite in step.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
}

/// Creates a CA in `dir` (`ca.pem`, and `ca-key.pem` readable by the
/// owner only).
///
/// # Errors
/// [`PkiError::Exists`] if `dir` already holds one.
pub fn init(dir: &Path) -> Result<(), PkiError> {
    let cert_path = dir.join(files::CA);
    let key_path = dir.join(files::CA_KEY);
    if cert_path.exists() || key_path.exists() {
        return Err(PkiError::Exists(dir.to_path_buf()));
    }
    fs::create_dir_all(dir).map_err(io("create", dir))?;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let fingerprint: String = key
        .public_key_raw()
        .iter()
        .rev()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    params.distinguished_name = subject(&format!("livemig CA {fingerprint}"), None);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, CA_DAYS);
    let cert = params.self_signed(&key)?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)
}

/// A DNS name as certificates carry it: labels of letters, digits and
/// hyphens, separated by dots.
fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Creates a CA in `dir` unless it already holds one: for throwaway
/// PKIs (the demo, the tests, the benchmarks).
///
/// # Errors
/// As [`init`], but never [`PkiError::Exists`].
pub fn init_if_missing(dir: &Path) -> Result<(), PkiError> {
    match init(dir) {
        Err(PkiError::Exists(_)) => Ok(()),
        other => other,
    }
}

/// Issues a certificate for `name` with `role`, valid for connections to
/// `hosts` (an agent's addresses and names; none for a client), into
/// `pki/NAME/`, which a daemon (`--tls-dir`) or a client uses as is.
///
/// # Errors
/// [`PkiError`] if the CA cannot be read, the name or a host is bad, or
/// the directory exists.
pub fn issue(pki: &Path, name: &str, role: Role, hosts: &[String]) -> Result<PathBuf, PkiError> {
    let name: types::DomainName = name.parse()?;
    let out = pki.join(name.as_str());
    if out.exists() {
        return Err(PkiError::Issued(out));
    }
    let (ca_pem, ca, ca_key) = load_ca(pki)?;

    let mut params = CertificateParams::default();
    params.distinguished_name = subject(name.as_str(), Some(role));
    params.subject_alt_names = hosts
        .iter()
        .map(|h| match h.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) if is_dns_name(h) => h
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|_| PkiError::Host(h.clone())),
            Err(_) => Err(PkiError::Host(h.clone())),
        })
        .collect::<Result<_, _>>()?;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // Agents are dialled (server) and dial their peers (client); users only
    // dial.
    params.extended_key_usages = match role {
        Role::Agent => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Role::Admin | Role::Monitor => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    validity(&mut params, CERT_DAYS);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;

    fs::create_dir_all(&out).map_err(io("create", &out))?;
    let _ = fs::set_permissions(&out, fs::Permissions::from_mode(0o700));
    write_new(&out.join(files::KEY), &key.serialize_pem(), 0o600)?;
    write_new(&out.join(files::CERT), &cert.pem(), 0o644)?;
    write_new(&out.join(files::CA), &ca_pem, 0o644)?;
    Ok(out)
}

/// The CA of `pki`, to sign with.
fn load_ca(pki: &Path) -> Result<(String, rcgen::Certificate, KeyPair), PkiError> {
    let ca_pem =
        fs::read_to_string(pki.join(files::CA)).map_err(io("read", &pki.join(files::CA)))?;
    let ca_key_path = pki.join(files::CA_KEY);
    let ca_key =
        KeyPair::from_pem(&fs::read_to_string(&ca_key_path).map_err(io("read", &ca_key_path))?)?;
    let ca = CertificateParams::from_ca_cert_pem(&ca_pem)?.self_signed(&ca_key)?;
    Ok((ca_pem, ca, ca_key))
}

/// Revokes the certificate issued to `name`: records its serial in
/// `pki/revoked.txt` and writes a new `pki/crl.pem`, signed by the CA, that
/// lists every certificate revoked so far. Agents refuse a revoked
/// certificate, from clients and from the peers they dial, once the CRL is
/// in their TLS directory (`crl.pem`; they read it again when it changes).
/// Returns the CRL's path.
///
/// # Errors
/// [`PkiError::NotIssued`] if `pki/NAME/cert.pem` does not exist, or what
/// reading the CA or writing the files fails with.
pub fn revoke(pki: &Path, name: &str) -> Result<PathBuf, PkiError> {
    let name: types::DomainName = name.parse()?;
    let cert_path = pki.join(name.as_str()).join(files::CERT);
    if !cert_path.exists() {
        return Err(PkiError::NotIssued(cert_path));
    }
    let serial = serial_of(&cert_path)?;
    let (_, ca, ca_key) = load_ca(pki)?;
    let revoked_path = pki.join(files::REVOKED);
    let mut listed = match fs::read_to_string(&revoked_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io("read", &revoked_path)(e)),
    };
    let now = OffsetDateTime::now_utc();
    if !listed
        .lines()
        .any(|l| l.split_whitespace().next() == Some(serial.as_str()))
    {
        listed.push_str(&format!("{serial} {name} {}\n", now.unix_timestamp()));
    }
    let mut revoked_certs = Vec::new();
    for line in listed.lines() {
        let mut fields = line.split_whitespace();
        let (Some(hex), Some(_), Some(at)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let bytes: Option<Vec<u8>> = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|b| u8::from_str_radix(b, 16).ok())
            })
            .collect();
        let (Some(bytes), Ok(at)) = (bytes, at.parse::<i64>()) else {
            continue;
        };
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&bytes),
            revocation_time: OffsetDateTime::from_unix_timestamp(at).unwrap_or(now),
            reason_code: Some(RevocationReason::Unspecified),
            invalidity_date: None,
        });
    }
    let crl = CertificateRevocationListParams {
        this_update: now - Duration::hours(1),
        next_update: now + Duration::days(CERT_DAYS),
        crl_number: SerialNumber::from(now.unix_timestamp().max(1) as u64),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&ca, &ca_key)?;
    write_replacing(&revoked_path, &listed)?;
    let crl_path = pki.join(files::CRL);
    write_replacing(&crl_path, &crl.pem()?)?;
    Ok(crl_path)
}

/// A certificate's serial number, in hex.
fn serial_of(path: &Path) -> Result<String, PkiError> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_file(path)
        .map_err(|_| PkiError::Unreadable(path.to_path_buf()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|_| PkiError::Unreadable(path.to_path_buf()))?;
    Ok(cert
        .tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Replaces `path` atomically (a new file renamed over it).
fn write_replacing(path: &Path, contents: &str) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, contents, 0o644)?;
    fs::rename(&tmp, path).map_err(io("replace", path))
}
