//! Listeners and connections.
//!
//! One task per connection reads a request, answers it, and reads the next.
//! When a connection closes, any incoming migration it prepared and did not
//! finish is torn down.

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use protocol::codec::{read_message, write_message, CodecError};
use protocol::envelope::{RequestEnvelope, ResponseEnvelope, ResponseResult};
use protocol::{ApiError, ErrorCode, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;

use crate::config::Config;
use crate::history::History;
use crate::migrate::destination;
use crate::state::{ActiveJob, Agent, Domain};
use crate::store::{Store, StoreError};

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open the state directory")]
    /// The state directory failed.
    Store(#[from] StoreError),
    #[error("cannot open the job history")]
    /// The job history failed.
    History(#[from] crate::history::HistoryError),
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
}

/// Where a request came from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnContext {
    pub id: u64,
    /// Our address on this connection (TCP only): the address a peer
    /// reached us on, hence the one its QEMU can reach ours on.
    pub local_ip: Option<IpAddr>,
}

/// The sockets an agent serves: its unix socket, and TCP when it listens
/// there.
#[derive(Debug)]
pub struct Listeners {
    unix: UnixListener,
    tcp: Option<TcpListener>,
}

impl Listeners {
    /// Binds what `config` names: the unix socket (replacing a stale one,
    /// never a live one) and the TCP address, if any.
    ///
    /// # Errors
    /// [`RunError::SocketInUse`] or [`RunError::Bind`].
    pub async fn bind(config: &Config) -> Result<Listeners, RunError> {
        let unix = bind_unix(&config.socket).await?;
        let tcp = match config.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| RunError::Bind {
                        what: format!("tcp://{addr}"),
                        source,
                    })?,
            ),
            None => None,
        };
        Ok(Listeners { unix, tcp })
    }

    /// The TCP address actually bound (port 0 picks one).
    pub fn tcp_addr(&self) -> Option<std::net::SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }
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
    let Listeners { unix, tcp } = listeners;
    let tcp_addr = tcp.as_ref().and_then(|l| l.local_addr().ok());
    let uri = match tcp_addr {
        Some(addr) => format!("tcp://{addr}"),
        None => format!("unix://{}", config.socket.display()),
    };
    let mut config = config;
    config.listen = tcp_addr;
    let stale = migration::vcpu_throttle::cgroup::release_stale(&config.cgroup_cpu);
    if stale > 0 {
        tracing::warn!(
            count = stale,
            "released vCPU throttles left by a previous agent"
        );
    }
    let history = History::open(&store.root().join("history.db"))?;
    let agent = Arc::new(Agent::new(config, store, history, uri.clone()));
    {
        let defs = agent.store.load_definitions().await;
        let mut domains = agent.domains.lock().expect("domains lock");
        for def in defs {
            domains.insert(def.name.clone(), Domain::new(def, true));
        }
        tracing::info!(count = domains.len(), "definitions loaded");
    }
    crate::reattach::reattach_all(&agent).await;
    tracing::info!(socket = %agent.config.socket.display(), %uri, state_dir = %agent.store.root().display(), "livemigd serving");

    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = unix.accept() => match accepted {
                Ok((stream, _)) => {
                    let (r, w) = stream.into_split();
                    let ctx = ConnContext { id: agent.next_connection_id(), local_ip: None };
                    connections.spawn(serve_connection(agent.clone(), r, w, ctx));
                }
                Err(e) => tracing::warn!(error = %e, "unix accept failed"),
            },
            accepted = accept_tcp(tcp.as_ref()) => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    protocol::keepalive(&stream);

                    let local_ip = stream.local_addr().ok().map(|a| a.ip());
                    tracing::debug!(%peer, "tcp connection");
                    let ctx = ConnContext { id: agent.next_connection_id(), local_ip };
                    connections.spawn(serve_tcp(agent.clone(), stream, ctx));
                }
                Err(e) => tracing::warn!(error = %e, "tcp accept failed"),
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }

    tracing::info!("shutting down");
    drop(unix);
    drop(tcp);
    connections.abort_all();
    stop_everything(&agent).await;
    let _ = std::fs::remove_file(&agent.config.socket);
    Ok(())
}

async fn accept_tcp(
    listener: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Binds the unix socket, replacing a stale one but never a live one.
async fn bind_unix(path: &Path) -> Result<UnixListener, RunError> {
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(RunError::SocketInUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    UnixListener::bind(path).map_err(|source| RunError::Bind {
        what: format!("unix://{}", path.display()),
        source,
    })
}

async fn serve_connection<R, W>(agent: Arc<Agent>, read: R, mut write: W, ctx: ConnContext)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut reader = BufReader::new(read);
    loop {
        let envelope: RequestEnvelope = match read_message(&mut reader).await {
            Ok(Some(envelope)) => envelope,
            Ok(None) => break,
            Err(CodecError::Malformed(e)) => {
                let reply = ResponseEnvelope {
                    version: PROTOCOL_VERSION,
                    id: 0,
                    result: ResponseResult::Error(ApiError::new(
                        ErrorCode::InvalidArgument,
                        format!("malformed request: {e}"),
                    )),
                };
                let _ = write_message(&mut write, &reply).await;
                break;
            }
            Err(e) => {
                tracing::debug!(error = %e, "connection error");
                break;
            }
        };
        let result = if envelope.version != PROTOCOL_VERSION {
            Err(ApiError::new(
                ErrorCode::Protocol,
                format!(
                    "protocol version {} is not supported (this agent speaks {PROTOCOL_VERSION})",
                    envelope.version
                ),
            ))
        } else {
            let op = envelope.request.op();
            tracing::debug!(%op, conn = ctx.id, "request");
            let result = agent.handle(envelope.request, &ctx).await;
            if let Err(e) = &result {
                tracing::debug!(%op, error = %e, "request refused");
            }
            result
        };
        let reply = ResponseEnvelope {
            version: PROTOCOL_VERSION,
            id: envelope.id,
            result: match result {
                Ok(reply) => ResponseResult::Ok(reply),
                Err(e) => ResponseResult::Error(e),
            },
        };
        if write_message(&mut write, &reply).await.is_err() {
            break;
        }
    }
    destination::abort_for_connection(&agent, ctx.id).await;
}

/// A TCP connection speaks the agent protocol, or HTTP (`GET /metrics`):
/// the agent protocol starts with '{', HTTP with a method.
async fn serve_tcp(agent: Arc<Agent>, stream: tokio::net::TcpStream, ctx: ConnContext) {
    let mut first = [0u8; 4];
    let peeked = tokio::time::timeout(Duration::from_secs(10), stream.peek(&mut first)).await;
    if matches!(peeked, Ok(Ok(4))) && &first == b"GET " {
        serve_http(agent, stream).await;
        return;
    }
    let (r, w) = stream.into_split();
    serve_connection(agent, r, w, ctx).await;
}

/// Answers one HTTP request: `GET /metrics`, or 404.
async fn serve_http(agent: Arc<Agent>, stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut request_line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        reader.read_line(&mut request_line).await?;
        // Skip the headers.
        let mut header = String::new();
        loop {
            header.clear();
            if reader.read_line(&mut header).await? == 0 || header.trim().is_empty() {
                break;
            }
        }
        std::io::Result::Ok(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return;
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let (status, content_type, body) = if path == "/metrics" {
        (
            "200 OK",
            "text/plain; version=0.0.4",
            agent.metrics.render(&agent),
        )
    } else {
        ("404 Not Found", "text/plain", "try /metrics\n".to_string())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = write.write_all(response.as_bytes()).await;
    let _ = write.shutdown().await;
}

/// Shutdown: outgoing jobs are cancelled and given time to resume the
/// source, incoming ones are torn down, running guests are left running.
async fn stop_everything(agent: &Arc<Agent>) {
    let outgoing: Vec<_> = {
        let domains = agent.domains.lock().expect("domains lock");
        domains
            .values()
            .filter_map(|d| match &d.job {
                Some(ActiveJob::Outgoing(job)) => Some(job.clone()),
                _ => None,
            })
            .collect()
    };
    for job in &outgoing {
        job.cancel.cancel();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        let busy = agent
            .domains
            .lock()
            .expect("domains lock")
            .values()
            .any(|d| matches!(d.job, Some(ActiveJob::Outgoing(_))));
        if !busy {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let incoming: Vec<_> = {
        let domains = agent.domains.lock().expect("domains lock");
        domains
            .iter()
            .filter_map(|(name, d)| match &d.job {
                Some(ActiveJob::Incoming(job)) => Some((name.clone(), job.clone())),
                _ => None,
            })
            .collect()
    };
    for (name, job) in incoming {
        destination::teardown(agent, &name, &job, "the destination agent is shutting down").await;
    }
    let domains = agent.domains.lock().expect("domains lock");
    for (name, d) in domains.iter() {
        if let Some(vm) = &d.vm {
            vm.process.detach();
            tracing::info!(domain = %name, pid = vm.process.pid(), "left running for the next agent");
        }
    }
}
