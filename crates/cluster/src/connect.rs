//! A connection to the cluster's etcd.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

/// How long connecting, and each request, may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A request to etcd, given [`TIMEOUT`] whatever the transport does with
/// a server that holds the connection and answers nothing.
pub(crate) async fn bounded<T>(
    request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, etcd_client::Error> {
    match tokio::time::timeout(TIMEOUT, request).await {
        Ok(result) => result,
        Err(_) => Err(etcd_client::Error::IoError(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("etcd did not answer within {TIMEOUT:?}"),
        ))),
    }
}

/// Why the cluster could not be reached or asked.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No endpoint given, or one that is not `https://HOST:PORT` (or
    /// `http://` with `insecure`).
    #[error("bad cluster endpoint {0:?}: expected https://HOST:PORT[,https://HOST:PORT...]")]
    Endpoint(String),
    /// `http://` without asking for plaintext.
    #[error(
        "cluster endpoint {0} is plaintext: etcd holds who runs what; use https:// with the \
         cluster's certificates, or --insecure on a network where everyone is trusted"
    )]
    Plaintext(String),
    /// A certificate file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// etcd did not answer or refused.
    #[error("etcd at {endpoints}: {source}")]
    Etcd {
        /// The endpoints asked.
        endpoints: String,
        /// Why (boxed: the client's error is large).
        #[source]
        source: Box<etcd_client::Error>,
    },
    /// A record in etcd that does not parse.
    #[error("malformed record at {key}")]
    Record {
        /// Its key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// The etcd endpoints, parsed from `URL[,URL...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    urls: Vec<String>,
    secure: bool,
}

impl Endpoints {
    /// Parses `https://HOST:PORT[,...]`; `http://` only with `insecure`.
    ///
    /// # Errors
    /// [`ClusterError::Endpoint`] or [`ClusterError::Plaintext`].
    pub fn parse(text: &str, insecure: bool) -> Result<Endpoints, ClusterError> {
        let urls: Vec<String> = text
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect();
        if urls.is_empty() {
            return Err(ClusterError::Endpoint(text.to_string()));
        }
        let mut secure = None;
        for url in &urls {
            let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
                (true, rest)
            } else if let Some(rest) = url.strip_prefix("http://") {
                (false, rest)
            } else {
                return Err(ClusterError::Endpoint(url.clone()));
            };
            let port_ok = rest
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok || rest.contains('/') {
                return Err(ClusterError::Endpoint(url.clone()));
            }
            if !tls && !insecure {
                return Err(ClusterError::Plaintext(url.clone()));
            }
            if secure.is_some_and(|s| s != tls) {
                return Err(ClusterError::Endpoint(text.to_string()));
            }
            secure = Some(tls);
        }
        Ok(Endpoints {
            urls,
            secure: secure.unwrap_or(true),
        })
    }

    /// Over TLS.
    pub fn secure(&self) -> bool {
        self.secure
    }
}

impl std::fmt::Display for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.urls.join(","))
    }
}

/// The PEM files a client presents to etcd: a livemig TLS directory
/// (`ca.pem`, `cert.pem`, `key.pem`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The directory.
    pub dir: PathBuf,
}

impl TlsFiles {
    fn read(dir: &Path, name: &str) -> Result<Vec<u8>, ClusterError> {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| ClusterError::Read { path, source })
    }

    fn options(&self) -> Result<TlsOptions, ClusterError> {
        let ca = Self::read(&self.dir, "ca.pem")?;
        let cert = Self::read(&self.dir, "cert.pem")?;
        let key = Self::read(&self.dir, "key.pem")?;
        Ok(TlsOptions::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key)))
    }
}

/// A connection to the cluster.
#[derive(Clone)]
pub struct Cluster {
    pub(crate) client: Client,
    pub(crate) endpoints: Endpoints,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl Cluster {
    /// Connects to `endpoints`, presenting `tls` (required for `https://`).
    ///
    /// # Errors
    /// [`ClusterError`] if a file is missing or etcd does not answer.
    pub async fn connect(
        endpoints: &Endpoints,
        tls: Option<&TlsFiles>,
    ) -> Result<Cluster, ClusterError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(TIMEOUT)
            .with_timeout(TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), TIMEOUT);
        if endpoints.secure {
            let Some(tls) = tls else {
                return Err(ClusterError::Read {
                    path: PathBuf::from("(no TLS directory)"),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "an https:// cluster needs a TLS directory (--tls-dir)",
                    ),
                });
            };
            options = options.with_tls(tls.options()?);
        }
        let mut client = bounded(Client::connect(&endpoints.urls, Some(options)))
            .await
            .map_err(|source| ClusterError::Etcd {
                endpoints: endpoints.to_string(),
                source: Box::new(source),
            })?;
        // A first request: the connection is lazy, and a refused
        // certificate shows only here.
        bounded(client.get(crate::PREFIX, None))
            .await
            .map_err(|source| ClusterError::Etcd {
                endpoints: endpoints.to_string(),
                source: Box::new(source),
            })?;
        Ok(Cluster {
            client,
            endpoints: endpoints.clone(),
        })
    }

    pub(crate) fn etcd_error(&self) -> impl FnOnce(etcd_client::Error) -> ClusterError + '_ {
        move |source| ClusterError::Etcd {
            endpoints: self.endpoints.to_string(),
            source: Box::new(source),
        }
    }

    /// Every key under `prefix`, in one read (so at one revision), within
    /// [`TIMEOUT`] as every request.
    pub(crate) async fn get_prefix(
        &self,
        prefix: &str,
    ) -> Result<etcd_client::GetResponse, ClusterError> {
        bounded(
            self.client
                .clone()
                .get(prefix, Some(etcd_client::GetOptions::new().with_prefix())),
        )
        .await
        .map_err(self.etcd_error())
    }
}

/// A record stored as JSON under `key`.
///
/// # Errors
/// [`ClusterError::Record`] when it does not parse.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    key: &[u8],
    value: &[u8],
) -> Result<T, ClusterError> {
    serde_json::from_slice(value).map_err(|source| ClusterError::Record {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_https_unless_plaintext_is_asked_for() {
        let e = Endpoints::parse("https://10.0.0.1:2379,https://10.0.0.2:2379", false).unwrap();
        assert!(e.secure());
        assert_eq!(e.to_string(), "https://10.0.0.1:2379,https://10.0.0.2:2379");
        assert!(matches!(
            Endpoints::parse("http://10.0.0.1:2379", false),
            Err(ClusterError::Plaintext(_))
        ));
        assert!(!Endpoints::parse("http://10.0.0.1:2379", true)
            .unwrap()
            .secure());
        for bad in [
            "",
            "10.0.0.1:2379",
            "https://10.0.0.1",
            "https://:2379",
            "https://h:1/x",
            "https://a:1,http://b:2",
        ] {
            assert!(Endpoints::parse(bad, true).is_err(), "{bad}");
        }
    }
}
