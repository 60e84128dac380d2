//! Listeners and connections.
//!
//! One task per connection reads a request, answers it, and reads the next
//! ([`connection`]). Who is asking is settled before the first request is
//! read: on the unix socket, its owner (or root) by `SO_PEERCRED`; on the
//! network, by the client's certificate after a mutual TLS handshake
//! (plaintext TCP only when the agent was started `--insecure`). When a
//! connection closes, any incoming migration it prepared and did not
//! finish is torn down.

mod connection;
mod http;
mod limits;
mod listeners;

use crate::caller::{Caller, ConnContext};

pub use listeners::Listeners;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tls::{Identity, TlsError};
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::history::History;
use crate::migrate::destination;
use crate::state::Agent;
use crate::store::{Store, StoreError};
use connection::{serve_requests, serve_stream};

/// The most network connections served at once; more are closed at once.
/// Local ones (the unix socket's owner) are not counted. Connections in
/// their handshake have a smaller budget of their own (see `limits`).
pub const MAX_CONNECTIONS: usize = 4096;

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open the state directory")]
    /// The state directory failed.
    Store(#[from] StoreError),
    #[error("cannot open the job history")]
    /// The job history failed.
    History(#[from] crate::history::HistoryError),
    #[error("cannot join the cluster")]
    /// The cluster (`--cluster`) could not be joined.
    Cluster(#[from] crate::membership::JoinError),
    #[error("another agent is already serving {0}")]
    /// Another agent serves this socket.
    SocketInUse(PathBuf),
    #[error("cannot listen on {what}")]
    /// A listener could not be bound.
    Bind {
        /// What.
        what: String,
        #[source]
        /// Why.
        source: std::io::Error,
    },
    /// TCP without TLS, and without `--insecure`.
    #[error(
        "refusing to serve plaintext TCP on {0}: anyone who can reach it could control this \
         host's VMs. Listen on tls://HOST:PORT with --tls-dir DIR (create DIR with `livemig pki \
         init PKI && livemig pki issue PKI NAME --role agent --host HOST`), or pass --insecure on \
         a network where everyone is trusted"
    )]
    Plaintext(std::net::SocketAddr),
    /// The TLS directory does not work.
    #[error("cannot set up TLS")]
    Tls(#[from] TlsError),
}

/// Binds the listeners `config` names and serves until `shutdown`
/// resolves (see [`serve`]).
///
/// # Errors
/// [`RunError`] if the state directory or a listener cannot be set up.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let listeners = Listeners::bind(&config).await?;
    serve(config, listeners, shutdown).await
}

/// Serves on `listeners` until `shutdown` resolves. Logs the addresses it
/// serves.
///
/// At start, QEMU processes an earlier agent left running are adopted (see
/// `reattach`). On shutdown, active outgoing migrations are cancelled (the
/// guest stays on this host), incoming ones are torn down, and running
/// guests are left running for the next agent to adopt.
///
/// # Errors
/// [`RunError`] if the state directory or the job history cannot be
/// opened.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let store = Store::open(&config.state_dir)?;
    let uri = listeners.uri(&config.socket);
    let mut config = config;
    config.listen = listeners.tcp_addr();
    if config.listen.is_some() && config.tls_dir.is_none() {
        tracing::warn!(
            "serving plaintext TCP (--insecure): anyone who can reach {uri} can control this \
             host's VMs"
        );
    }
    let metrics_addr = listeners.metrics_addr();
    let Listeners {
        unix,
        tcp,
        metrics,
        tls,
        peer_tls,
    } = listeners;
    let stale = crate::release_stale_throttles(&config);
    if stale > 0 {
        tracing::warn!(
            count = stale,
            "released vCPU throttles left by a previous agent"
        );
    }
    let history = History::open(&store.root().join("history.db"))?;
    let qemu_credentials = match &config.tls_dir {
        Some(dir) => {
            let out = store.root().join("qemu-tls");
            tls::qemu::write_credentials(dir, &out)?;
            Some(out)
        }
        None => None,
    };
    let credentials = crate::credentials::Credentials::new(config.tls_dir.clone(), tls, peer_tls);
    let watching = credentials.watch();
    let agent = Arc::new(Agent::new(
        config,
        store,
        history,
        uri.clone(),
        credentials,
        qemu_credentials,
    ));
    // A host that cannot join the cluster it was told to says so now.
    let leave = tokio_util::sync::CancellationToken::new();
    let membership = match agent.config.cluster.clone() {
        Some(settings) => Some(crate::membership::join(&agent, &settings, leave.clone()).await?),
        None => None,
    };
    domain::qemu::clear_stale_probes(agent.store.root(), agent.config.qemu_timeout).await;
    // The QEMU probe (or its cached copy) now, not while the first
    // migration waits for it.
    let warm = agent.clone();
    tokio::spawn(async move {
        if let Err(e) = warm.binary().await {
            tracing::warn!(error = %e.message, "QEMU not probed at start");
        }
    });
    let definitions = agent.store.load_definitions().await;
    let names: Vec<_> = definitions.iter().map(|d| d.name.clone()).collect();
    agent.table.load(definitions);
    for name in names {
        if let Some(peer) = agent.store.load_binding(&name).await {
            agent.table.bind(&name, Some(peer));
        }
    }
    tracing::info!(count = agent.table.len(), "definitions loaded");
    crate::reattach::reattach_all(&agent).await;
    crate::membership::release_unknown(&agent).await;
    tracing::info!(socket = %agent.config.socket.display(), %uri, state_dir = %agent.store.root().display(), "livemigd serving");
    if let Some(addr) = metrics_addr {
        let scheme = if agent.credentials.acceptor().is_some() {
            "https"
        } else {
            "http"
        };
        tracing::info!(metrics = %format!("{scheme}://{addr}/metrics"), "serving metrics");
    }

    let measuring = agent
        .config
        .measure_every
        .map(|every| crate::measurements::keep_fresh(agent.clone(), every, leave.clone()));

    let mut connections = JoinSet::new();
    let limits = limits::Limits::new(limits::Budget::default());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = unix.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_unix(agent.clone(), stream));
                }
                Err(e) => tracing::warn!(error = %e, "unix accept failed"),
            },
            accepted = accept_tcp(tcp.as_ref()) => {
                accept_network(&agent, &limits, &mut connections, accepted, false);
            }
            accepted = accept_tcp(metrics.as_ref()) => {
                accept_network(&agent, &limits, &mut connections, accepted, true);
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }

    tracing::info!("shutting down");
    watching.abort();
    leave.cancel();
    if let Some(measuring) = measuring {
        measuring.abort();
    }
    if let Some(membership) = membership {
        let _ = tokio::time::timeout(Duration::from_secs(5), membership).await;
    }
    drop(unix);
    drop(tcp);
    connections.abort_all();
    stop_everything(&agent).await;
    let _ = std::fs::remove_file(&agent.config.socket);
    Ok(())
}

/// Serves a network connection in `connections`, within the limit.
fn accept_network(
    agent: &Arc<Agent>,
    limits: &Arc<limits::Limits>,
    connections: &mut JoinSet<()>,
    accepted: std::io::Result<(TcpStream, std::net::SocketAddr)>,
    http_only: bool,
) {
    match accepted {
        Ok((stream, peer)) => match limits.pending(peer.ip()) {
            Some(pending) => {
                tracing::debug!(%peer, http_only, "tcp connection");
                // The credentials as they are now: a revocation list read
                // since applies to this connection.
                let tls = agent.credentials.acceptor();
                let (agent, limits) = (agent.clone(), limits.clone());
                connections.spawn(async move {
                    serve_tcp(agent, stream, tls, http_only, (pending, &limits)).await;
                });
            }
            None => {
                tracing::warn!(%peer, "too many connections in their handshake; closed");
            }
        },
        Err(e) => tracing::warn!(error = %e, "tcp accept failed"),
    }
}

async fn accept_tcp(
    listener: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Whether a local process belongs to `group`: its primary group, or one
/// of its supplementary groups (which `SO_PEERCRED` does not carry, so they
/// are read from `/proc`).
fn in_group(cred: &tokio::net::unix::UCred, group: u32) -> bool {
    if cred.gid() == group {
        return true;
    }
    let Some(pid) = cred.pid() else {
        return false;
    };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .map(|groups| groups.split_whitespace().any(|g| g.parse() == Ok(group)))
        })
        .unwrap_or(false)
}

/// A local client: only the socket's owner, root, or a member of the
/// configured socket group, is served (as an administrator).
async fn serve_unix(agent: Arc<Agent>, stream: UnixStream) {
    let ours = nix::unistd::getuid().as_raw();
    let group = agent.config.socket_group;
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == 0 || cred.uid() == ours => {}
        Ok(cred) if group.is_some_and(|g| in_group(&cred, g)) => {}
        Ok(cred) => {
            tracing::warn!(
                uid = cred.uid(),
                "refused a local client that is not the agent's user"
            );
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell who a local client is; refused");
            return;
        }
    }
    let ctx = ConnContext {
        id: agent.next_connection_id(),
        local_ip: None,
        caller: Caller::Local,
    };
    let (read, write) = stream.into_split();
    serve_requests(agent, BufReader::new(read), write, ctx).await;
}

/// A network client: the TLS handshake and its certificate first (no
/// request is read from a client without one), unless the agent is
/// insecure.
async fn serve_tcp(
    agent: Arc<Agent>,
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    http_only: bool,
    (pending, limits): (limits::Pending, &Arc<limits::Limits>),
) {
    let _ = stream.set_nodelay(true);
    protocol::keepalive(&stream, agent.config.timeouts.peer_silence);
    let local_ip = stream.local_addr().ok().map(|a| a.ip());
    let peer = stream.peer_addr().ok();
    let Some(ip) = peer.map(|p| p.ip()) else {
        return;
    };
    let established = |pending: limits::Pending| {
        drop(pending);
        let place = limits.established(ip);
        if place.is_none() {
            tracing::warn!(
                ?peer,
                limit = MAX_CONNECTIONS,
                "too many connections; closed"
            );
        }
        place
    };
    let Some(acceptor) = tls else {
        let Some(_place) = established(pending) else {
            return;
        };
        let ctx = ConnContext {
            id: agent.next_connection_id(),
            local_ip,
            caller: Caller::Insecure,
        };
        serve_stream(agent, stream, ctx, http_only).await;
        return;
    };
    let handshake = tokio::time::timeout(agent.config.timeouts.handshake, acceptor.accept(stream));
    let stream = tokio::select! {
        done = handshake => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                tracing::info!(?peer, error = %e, "TLS handshake refused");
                return;
            }
            Err(_) => {
                tracing::info!(?peer, "TLS handshake timed out");
                return;
            }
        },
        _ = pending.closed.cancelled() => {
            tracing::info!(?peer, "handshake given up for a newer connection");
            return;
        }
    };
    let Some(_place) = established(pending) else {
        return;
    };
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|cert| Identity::from_certificate(cert));
    let identity = match identity {
        Some(Ok(identity)) => identity,
        Some(Err(e)) => {
            tracing::info!(?peer, error = %e, "client certificate refused");
            return;
        }
        None => {
            tracing::info!(?peer, "client without a certificate refused");
            return;
        }
    };
    tracing::debug!(?peer, name = %identity.name, role = %identity.role, "TLS client");
    let ctx = ConnContext {
        id: agent.next_connection_id(),
        local_ip,
        caller: Caller::Certified(identity),
    };
    serve_stream(agent, stream, ctx, http_only).await;
}

/// Shutdown: outgoing jobs are cancelled and given time to resume the
/// source, incoming ones are torn down, running guests are left running.
async fn stop_everything(agent: &Arc<Agent>) {
    let outgoing = agent.table.outgoing();
    for job in &outgoing {
        job.cancel.cancel();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        if agent.table.outgoing().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let incoming = agent.table.incoming(|_| true);
    for (name, job) in incoming {
        destination::teardown(agent, &name, &job, "the destination agent is shutting down").await;
    }
    for d in agent.table.all() {
        if let Some(vm) = &d.vm {
            vm.process.detach();
            tracing::info!(domain = %d.name, pid = vm.process.pid(), "left running for the next agent");
        }
    }
}
