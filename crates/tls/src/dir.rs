//! A TLS directory (`ca.pem`, `cert.pem`, `key.pem`, and the CA's
//! `crl.pem` once a certificate was revoked) and the rustls configurations
//! built from it: an agent's server side, which requires a client
//! certificate from the same CA that is not revoked, and the client side an
//! agent or a CLI dials with, which refuses a revoked server certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::files;
use crate::identity::Identity;

/// Why TLS could not be set up, or a certificate was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file of the directory is missing or unreadable.
    #[error("cannot read {path} (a TLS directory holds ca.pem, cert.pem and key.pem: create one with `livemig pki issue`)")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A PEM file holds no certificate.
    #[error("{0} holds no certificate")]
    Empty(PathBuf),
    /// rustls refused the certificates or the key.
    #[error("the TLS directory {dir} does not make a working configuration")]
    Config {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The CA (or its CRL) cannot verify certificates.
    #[error("the CA in {dir} cannot verify certificates")]
    Verifier {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// Copying the directory for QEMU failed.
    #[error("cannot copy TLS credentials for QEMU ({path})")]
    Copy {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A certificate that is not a livemig one.
    #[error("certificate {0}")]
    Certificate(String),
}

/// The crypto every livemig endpoint uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A loaded TLS directory.
pub struct TlsDir {
    path: PathBuf,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    crls: Vec<CertificateRevocationListDer<'static>>,
}

impl std::fmt::Debug for TlsDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsDir").field("path", &self.path).finish()
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::Empty(path.to_path_buf()));
    }
    Ok(certs)
}

impl TlsDir {
    /// Reads `dir/ca.pem`, `dir/cert.pem` and `dir/key.pem`.
    ///
    /// # Errors
    /// [`TlsError`] naming the file that is missing or bad.
    pub fn load(dir: &Path) -> Result<TlsDir, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in certificates(&dir.join(files::CA))? {
            roots.add(ca).map_err(|source| TlsError::Config {
                dir: dir.to_path_buf(),
                source,
            })?;
        }
        let chain = certificates(&dir.join(files::CERT))?;
        let key_path = dir.join(files::KEY);
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|source| TlsError::Read {
            path: key_path,
            source,
        })?;
        let crl_path = dir.join(files::CRL);
        let crls = if crl_path.exists() {
            let read = |source| TlsError::Read {
                path: crl_path.clone(),
                source,
            };
            CertificateRevocationListDer::pem_file_iter(&crl_path)
                .map_err(read)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(read)?
        } else {
            Vec::new()
        };
        Ok(TlsDir {
            path: dir.to_path_buf(),
            roots: Arc::new(roots),
            chain,
            key,
            crls,
        })
    }

    /// When the directory's CRL last changed (none without one): an agent
    /// builds its configurations again when this moves.
    pub fn crl_modified(dir: &Path) -> Option<std::time::SystemTime> {
        std::fs::metadata(dir.join(files::CRL))
            .and_then(|m| m.modified())
            .ok()
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Who this directory's certificate names.
    ///
    /// # Errors
    /// [`TlsError::Certificate`] if it is not a livemig certificate.
    pub fn identity(&self) -> Result<Identity, TlsError> {
        Identity::from_certificate(&self.chain[0])
    }

    fn config_error(&self) -> impl FnOnce(rustls::Error) -> TlsError + '_ {
        move |source| TlsError::Config {
            dir: self.path.clone(),
            source,
        }
    }

    /// An agent's server side: its certificate, and a client certificate
    /// from the same CA required of every client.
    ///
    /// # Errors
    /// [`TlsError`] if rustls refuses the certificates or the key.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .with_crls(self.crls.clone())
            .build()
            .map_err(|source| TlsError::Verifier {
                dir: self.path.clone(),
                source,
            })?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(self.config_error())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(self.config_error())?;
        Ok(Arc::new(config))
    }

    /// The client side: trusts the CA, presents this directory's
    /// certificate.
    ///
    /// # Errors
    /// [`TlsError`] if rustls refuses the certificates or the key.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let verifier = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .with_crls(self.crls.clone())
            .build()
            .map_err(|source| TlsError::Verifier {
                dir: self.path.clone(),
                source,
            })?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(self.config_error())?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(self.config_error())?;
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use protocol::Role;

    use super::*;
    use crate::pki;

    #[test]
    fn an_issued_directory_loads_and_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path()).unwrap();
        let agent = pki::issue(dir.path(), "host-a", Role::Agent, &["127.0.0.1".into()]).unwrap();
        let tls = TlsDir::load(&agent).unwrap();
        let identity = tls.identity().unwrap();
        assert_eq!(
            (identity.name.as_str(), identity.role),
            ("host-a", Role::Agent)
        );
        // As QEMU's authorization names it (the order GnuTLS 3.7 prints).
        assert_eq!(
            identity.distinguished_names()[0],
            "O=livemig,OU=agent,CN=host-a"
        );
        tls.server_config().unwrap();
        tls.client_config().unwrap();
    }

    #[test]
    fn the_pki_never_overwrites_and_refuses_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path()).unwrap();
        assert!(matches!(
            pki::init(dir.path()),
            Err(pki::PkiError::Exists(_))
        ));
        pki::issue(dir.path(), "ops", Role::Admin, &[]).unwrap();
        assert!(matches!(
            pki::issue(dir.path(), "ops", Role::Admin, &[]),
            Err(pki::PkiError::Issued(_))
        ));
        assert!(pki::issue(dir.path(), "../x", Role::Admin, &[]).is_err());
        assert!(pki::issue(dir.path(), "a", Role::Agent, &["bad host!".into()]).is_err());
        let key = std::fs::metadata(dir.path().join("ops/key.pem")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
            0o600
        );
    }

    #[test]
    fn a_missing_directory_says_how_to_make_one() {
        let err = TlsDir::load(Path::new("/nonexistent")).unwrap_err();
        assert!(err.to_string().contains("livemig pki issue"), "{err}");
    }

    /// A mutual TLS handshake between a server with `server`'s directory
    /// and a client with `client`'s, over a pipe.
    async fn handshake(server: &Path, client: &Path) -> Result<(), String> {
        let acceptor =
            tokio_rustls::TlsAcceptor::from(TlsDir::load(server).unwrap().server_config().unwrap());
        let connector = tokio_rustls::TlsConnector::from(
            TlsDir::load(client).unwrap().client_config().unwrap(),
        );
        let (a, b) = tokio::io::duplex(64 << 10);
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let (served, dialled) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
        match (served, dialled) {
            (Ok(_), Ok(_)) => Ok(()),
            (s, d) => Err(format!("server: {:?}, client: {:?}", s.err(), d.err())),
        }
    }

    #[tokio::test]
    async fn a_revoked_certificate_is_refused_by_both_sides_once_the_crl_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path();
        pki::init(pki).unwrap();
        let hosts = ["127.0.0.1".to_string()];
        let a = pki::issue(pki, "host-a", Role::Agent, &hosts).unwrap();
        let b = pki::issue(pki, "host-b", Role::Agent, &hosts).unwrap();
        let c = pki::issue(pki, "host-c", Role::Agent, &hosts).unwrap();
        handshake(&a, &b).await.unwrap();

        let crl = pki::revoke(pki, "host-b").unwrap();
        // Every host gets the CRL.
        for host in [&a, &b, &c] {
            std::fs::copy(&crl, host.join(files::CRL)).unwrap();
        }
        assert!(TlsDir::crl_modified(&a).is_some());
        // As a client, and as a server dialled by a peer.
        let err = handshake(&a, &b).await.unwrap_err();
        assert!(err.to_lowercase().contains("revoked"), "{err}");
        let err = handshake(&b, &a).await.unwrap_err();
        assert!(err.to_lowercase().contains("revoked"), "{err}");
        // The others still talk.
        handshake(&a, &c).await.unwrap();
        handshake(&c, &a).await.unwrap();
        // Revoking again keeps the list; a name never issued is an error.
        pki::revoke(pki, "host-c").unwrap();
        let listed = std::fs::read_to_string(pki.join(files::REVOKED)).unwrap();
        assert_eq!(listed.lines().count(), 2, "{listed}");
        assert!(matches!(
            pki::revoke(pki, "host-z"),
            Err(pki::PkiError::NotIssued(_))
        ));
    }

    #[test]
    fn every_ca_has_a_subject_of_its_own() {
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        let subject = |dir: &Path| {
            pki::init(dir).unwrap();
            let der = certificates(&dir.join(files::CA)).unwrap().remove(0);
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            cert.subject().to_string()
        };
        let (a, b) = (subject(one.path()), subject(two.path()));
        assert!(a.contains("livemig CA "), "{a}");
        assert_ne!(a, b);
    }
}
