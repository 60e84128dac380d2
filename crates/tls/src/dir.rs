//! A TLS directory (`ca.pem`, `cert.pem`, `key.pem`) and the rustls
//! configurations built from it: an agent's server side, which requires a
//! client certificate from the same CA, and the client side an agent or a
//! CLI dials with.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
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
    /// The CA cannot verify clients.
    #[error("the CA in {dir} cannot verify client certificates")]
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
        Ok(TlsDir {
            path: dir.to_path_buf(),
            roots: Arc::new(roots),
            chain,
            key,
        })
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
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(self.config_error())?
            .with_root_certificates(self.roots.clone())
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
}
