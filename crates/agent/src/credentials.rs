//! The agent's TLS credentials, read again when the CA's revocation list
//! in its TLS directory (`crl.pem`) appears or changes: a certificate
//! revoked with `livemig pki revoke` is refused on every new connection,
//! served or dialled, within seconds and without a restart.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ClientConfig;
use tls::TlsDir;
use tokio_rustls::TlsAcceptor;

/// How often the CRL's modification time is looked at.
const CHECK_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Clone)]
struct Loaded {
    crl: Option<SystemTime>,
    acceptor: Option<TlsAcceptor>,
    client: Option<Arc<ClientConfig>>,
}

/// The credentials in use.
pub(crate) struct Credentials {
    dir: Option<PathBuf>,
    current: RwLock<Loaded>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// What the listeners were bound with, from `dir`.
    pub fn new(
        dir: Option<PathBuf>,
        acceptor: Option<TlsAcceptor>,
        client: Option<Arc<ClientConfig>>,
    ) -> Arc<Credentials> {
        let crl = dir.as_deref().and_then(TlsDir::crl_modified);
        Arc::new(Credentials {
            dir,
            current: RwLock::new(Loaded {
                crl,
                acceptor,
                client,
            }),
        })
    }

    fn loaded(&self) -> Loaded {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What serves a TLS connection.
    pub fn acceptor(&self) -> Option<TlsAcceptor> {
        self.loaded().acceptor
    }

    /// How this agent dials its peers.
    pub fn client(&self) -> Option<Arc<ClientConfig>> {
        self.loaded().client
    }

    /// Reads the directory again if its CRL changed. A directory that no
    /// longer loads keeps the credentials in use (and says so).
    pub async fn refresh(&self) {
        let Some(dir) = self.dir.clone() else {
            return;
        };
        let seen = tokio::fs::metadata(dir.join(tls::files::CRL))
            .await
            .and_then(|m| m.modified())
            .ok();
        if seen == self.loaded().crl {
            return;
        }
        let load = dir.clone();
        let reloaded = tokio::task::spawn_blocking(move || {
            let tls = TlsDir::load(&load)?;
            Ok::<_, tls::TlsError>((tls.server_config()?, tls.client_config()?))
        })
        .await;
        match reloaded {
            Ok(Ok((server, client))) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Loaded {
                    crl: seen,
                    acceptor: Some(TlsAcceptor::from(server)),
                    client: Some(client),
                };
                tracing::info!(dir = %dir.display(), "revocation list changed: TLS credentials read again");
            }
            Ok(Err(e)) => {
                tracing::error!(dir = %dir.display(), error = %crate::errors::chain(&e), "the TLS directory no longer loads; keeping the credentials in use");
                // Not retried until the CRL changes again.
                self.current.write().unwrap_or_else(|p| p.into_inner()).crl = seen;
            }
            Err(e) => tracing::error!(error = %e, "reading the TLS directory failed"),
        }
    }

    /// Refreshes every [`CHECK_INTERVAL`] until the agent stops.
    pub fn watch(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let credentials = self.clone();
        tokio::spawn(async move {
            if credentials.dir.is_none() {
                return;
            }
            loop {
                tokio::time::sleep(CHECK_INTERVAL).await;
                credentials.refresh().await;
            }
        })
    }
}
