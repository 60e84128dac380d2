//! The sockets an agent serves, bound before it serves them (so tests and
//! `run` share one path, as mini-redis does).

use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tls::TlsDir;
use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::TlsAcceptor;

use super::RunError;
use crate::config::Config;

/// The sockets an agent serves: its unix socket, and TCP (with TLS unless
/// the agent is insecure) when it listens there.
pub struct Listeners {
    pub(super) unix: UnixListener,
    pub(super) tcp: Option<TcpListener>,
    /// `GET /metrics` only (`--metrics-listen`).
    pub(super) metrics: Option<TcpListener>,
    pub(super) tls: Option<TlsAcceptor>,
    /// How the agent dials its peers, from the same TLS directory.
    pub(super) peer_tls: Option<Arc<rustls::ClientConfig>>,
}

impl fmt::Debug for Listeners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listeners")
            .field("tcp", &self.tcp_addr())
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Listeners {
    /// Binds what `config` names: the unix socket (replacing a stale one,
    /// never a live one; readable by its owner only) and the TCP address,
    /// if any, with TLS from `config.tls_dir`.
    ///
    /// # Errors
    /// [`RunError::SocketInUse`], [`RunError::Bind`], [`RunError::Tls`],
    /// or [`RunError::Plaintext`] for TCP without TLS or `--insecure`.
    pub async fn bind(config: &Config) -> Result<Listeners, RunError> {
        let (tls, peer_tls) = match &config.tls_dir {
            Some(dir) => {
                let dir = TlsDir::load(dir)?;
                (
                    Some(TlsAcceptor::from(dir.server_config()?)),
                    Some(dir.client_config()?),
                )
            }
            None => (None, None),
        };
        if tls.is_none() && !config.insecure {
            if let Some(addr) = config.listen.or(config.metrics_listen) {
                return Err(RunError::Plaintext(addr));
            }
        }
        let unix = bind_unix(&config.socket, config.socket_group).await?;
        let tcp = bind_tcp(config.listen, "tcp").await?;
        let metrics = bind_tcp(config.metrics_listen, "metrics").await?;
        Ok(Listeners {
            unix,
            tcp,
            metrics,
            tls,
            peer_tls,
        })
    }

    /// The metrics address actually bound, if any.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The TCP address actually bound (port 0 picks one).
    pub fn tcp_addr(&self) -> Option<std::net::SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The URI peers and remote clients dial.
    pub(super) fn uri(&self, socket: &Path) -> String {
        match (self.tcp_addr(), &self.tls) {
            (Some(addr), Some(_)) => format!("tls://{addr}"),
            (Some(addr), None) => format!("tcp://{addr}"),
            (None, _) => format!("unix://{}", socket.display()),
        }
    }
}

/// Binds `addr`, if given (`what` names it in an error).
async fn bind_tcp(addr: Option<SocketAddr>, what: &str) -> Result<Option<TcpListener>, RunError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    TcpListener::bind(addr)
        .await
        .map(Some)
        .map_err(|source| RunError::Bind {
            what: format!("{what}://{addr}"),
            source,
        })
}

/// Binds the unix socket, replacing a stale one but never a live one.
async fn bind_unix(path: &Path, group: Option<u32>) -> Result<UnixListener, RunError> {
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(RunError::SocketInUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let listener = UnixListener::bind(path).map_err(|source| RunError::Bind {
        what: format!("unix://{}", path.display()),
        source,
    })?;
    // The caller is checked too (SO_PEERCRED), but nobody else even gets
    // to connect.
    let bind_error = |source| RunError::Bind {
        what: format!("unix://{}", path.display()),
        source,
    };
    let mode = match group {
        Some(gid) => {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(bind_error)?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_error)?;
    Ok(listener)
}
