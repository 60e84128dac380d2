//! A client for one agent connection. Requests go one at a time; a
//! connection can carry any number of them.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Mutex;

use crate::call::Call;
use crate::codec::{read_message, write_message, CodecError};
use crate::envelope::{RequestEnvelope, ResponseEnvelope, ResponseResult, PROTOCOL_VERSION};
use crate::error::{ApiError, ErrorCode};
use crate::reply::Reply;
use crate::request::Request;
use crate::uri::AgentUri;

/// How long to wait for an agent to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an agent gets to answer a request that does no long work
/// (`hello`, a probe, an abort).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing accepted the connection.
    #[error("cannot reach the livemig agent at {uri}")]
    Connect {
        /// The agent.
        uri: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("the livemig agent at {uri} did not answer `{op}` within {timeout:?}")]
    Timeout {
        /// The agent.
        uri: String,
        /// The request's operation.
        op: &'static str,
        /// How long we waited.
        timeout: Duration,
    },
    /// The connection broke or carried garbage.
    #[error("connection to the livemig agent at {uri} failed")]
    Codec {
        /// The agent.
        uri: String,
        /// Why.
        #[source]
        source: CodecError,
    },
    /// The agent hung up.
    #[error("the livemig agent at {uri} closed the connection")]
    Closed {
        /// The agent.
        uri: String,
    },
    /// The agent speaks another protocol.
    #[error("the livemig agent at {uri} answered out of order or with protocol version {version}")]
    Protocol {
        /// The agent.
        uri: String,
        /// The version it answered with.
        version: u32,
    },
    /// The agent answered with an error.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// A `tls://` agent without TLS credentials to dial it with.
    #[error("{uri} needs TLS credentials: pass --tls-dir DIR or set LIVEMIG_TLS_DIR")]
    NoCredentials {
        /// The agent.
        uri: String,
    },
    /// The TLS handshake failed (a certificate was refused, or the host
    /// is not what the agent's certificate names).
    #[error("TLS with the livemig agent at {uri} failed")]
    Tls {
        /// The agent.
        uri: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The agent answered with another request's kind of reply.
    #[error("the livemig agent at {uri} answered `{op}` with {reply:?}")]
    UnexpectedReply {
        /// The agent.
        uri: String,
        /// The request's operation.
        op: &'static str,
        /// What it said.
        reply: Box<Reply>,
    },
}

impl ClientError {
    /// The error as it should cross to another process.
    pub fn to_api(&self) -> ApiError {
        let message = types::error_chain(self);
        match self {
            ClientError::Api(e) => e.clone(),
            ClientError::Connect { .. } | ClientError::Closed { .. } => {
                ApiError::new(ErrorCode::PeerUnreachable, message)
            }
            ClientError::NoCredentials { .. } | ClientError::Tls { .. } => {
                ApiError::new(ErrorCode::PermissionDenied, message)
            }
            ClientError::Protocol { .. } => ApiError::new(ErrorCode::Protocol, message),
            _ => ApiError::new(ErrorCode::PeerFailed, message),
        }
    }
}

/// A TCP connection with keepalive on the scale of `silence`, within
/// [`CONNECT_TIMEOUT`].
async fn tcp(host: &str, port: u16, silence: Duration) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = stream.set_nodelay(true);
    crate::keepalive(&stream, silence);
    Ok(stream)
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

struct Connection {
    stream: BufReader<Box<dyn Stream>>,
    next_id: u64,
}

impl Connection {
    /// `request` under the connection's next id.
    fn envelope(&mut self, request: Request) -> RequestEnvelope {
        let id = self.next_id;
        self.next_id += 1;
        RequestEnvelope {
            version: PROTOCOL_VERSION,
            id,
            request,
        }
    }
}

/// The result a response carries, if it answers request `id` in this
/// protocol's version.
fn answer(response: ResponseEnvelope, id: u64, uri: String) -> Result<ResponseResult, ClientError> {
    if response.version != PROTOCOL_VERSION || response.id != id {
        return Err(ClientError::Protocol {
            uri,
            version: response.version,
        });
    }
    Ok(response.result)
}

/// A connection to an agent.
pub struct Client {
    uri: AgentUri,
    /// The agent's certificate (DER), over TLS: who answered.
    peer_certificate: Option<Vec<u8>>,
    connection: Mutex<Connection>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("uri", &self.uri).finish()
    }
}

impl Client {
    /// Connects to the agent at `uri` (a `tls://` URI needs
    /// [`Client::connect_with`]).
    ///
    /// # Errors
    /// [`ClientError::Connect`] if nothing answers within
    /// [`CONNECT_TIMEOUT`].
    pub async fn connect(uri: &AgentUri) -> Result<Client, ClientError> {
        Self::connect_with(uri, None).await
    }

    /// Connects to the agent at `uri`, over TLS with `tls` (its CA, and
    /// the certificate this side presents) when the URI says `tls://`; the
    /// agent's certificate must name the host dialled.
    ///
    /// # Errors
    /// [`ClientError::Connect`] if nothing answers within
    /// [`CONNECT_TIMEOUT`], [`ClientError::NoCredentials`] for a `tls://`
    /// URI without `tls`, [`ClientError::Tls`] if the handshake fails.
    pub async fn connect_with(
        uri: &AgentUri,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<Client, ClientError> {
        Self::connect_watching(uri, tls, crate::PEER_SILENCE_LIMIT).await
    }

    /// As [`Client::connect_with`], with TCP keepalive noticing a dead
    /// link within `silence` (an agent's configured peer silence).
    ///
    /// # Errors
    /// As [`Client::connect_with`].
    pub async fn connect_watching(
        uri: &AgentUri,
        tls: Option<&Arc<rustls::ClientConfig>>,
        silence: Duration,
    ) -> Result<Client, ClientError> {
        let connect_error = |source| ClientError::Connect {
            uri: uri.to_string(),
            source,
        };
        let mut peer_certificate = None;
        let stream: Box<dyn Stream> = match uri {
            AgentUri::Unix(path) => Box::new(
                tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path))
                    .await
                    .map_err(|_| connect_error(std::io::ErrorKind::TimedOut.into()))?
                    .map_err(connect_error)?,
            ),
            AgentUri::Tcp { host, port } => {
                Box::new(tcp(host, *port, silence).await.map_err(connect_error)?)
            }
            AgentUri::Tls { host, port } => {
                let config = tls.ok_or_else(|| ClientError::NoCredentials {
                    uri: uri.to_string(),
                })?;
                let tls_error = |source| ClientError::Tls {
                    uri: uri.to_string(),
                    source,
                };
                let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
                    tls_error(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
                })?;
                let stream = tcp(host, *port, silence).await.map_err(connect_error)?;
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, stream))
                    .await
                    .map_err(|_| tls_error(std::io::ErrorKind::TimedOut.into()))?
                    .map_err(tls_error)?;
                peer_certificate = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(|cert| cert.as_ref().to_vec());
                Box::new(stream)
            }
        };
        Ok(Client {
            uri: uri.clone(),
            peer_certificate,
            connection: Mutex::new(Connection {
                stream: BufReader::new(stream),
                next_id: 1,
            }),
        })
    }

    /// The agent's address.
    pub fn uri(&self) -> &AgentUri {
        &self.uri
    }

    /// The certificate (DER) the agent presented, over TLS: which host of
    /// the cluster answered.
    pub fn peer_certificate(&self) -> Option<&[u8]> {
        self.peer_certificate.as_deref()
    }

    /// Sends a typed call and waits up to `timeout` for its reply.
    ///
    /// # Errors
    /// As [`Client::request`], and [`ClientError::UnexpectedReply`] when
    /// the agent answers with another request's kind of reply.
    pub async fn call<C: Call>(
        &self,
        call: C,
        timeout: Duration,
    ) -> Result<C::Output, ClientError> {
        let request = call.request();
        let op = request.op();
        let reply = self.request(request, timeout).await?;
        C::output(reply).map_err(|reply| ClientError::UnexpectedReply {
            uri: self.uri.to_string(),
            op,
            reply: Box::new(reply),
        })
    }

    /// Watches the agent's jobs (or `domain`'s): hands each event to
    /// `each` until it returns false, or the agent closes the connection.
    /// Every event arrives within a second or so of the last while a job
    /// runs; there is no overall time limit, so wrap the call in one if
    /// needed. The connection serves nothing else meanwhile.
    ///
    /// # Errors
    /// [`ClientError::Api`] when the agent refuses (a role that may not
    /// read); the other variants when the conversation fails.
    pub async fn watch(
        &self,
        domain: Option<types::DomainName>,
        mut each: impl FnMut(crate::WatchEvent) -> bool,
    ) -> Result<(), ClientError> {
        let uri = self.uri.to_string();
        let mut conn = self.connection.lock().await;
        let envelope = conn.envelope(Request::Watch { domain });
        let id = envelope.id;
        write_message(conn.stream.get_mut(), &envelope)
            .await
            .map_err(|source| ClientError::Codec {
                uri: uri.clone(),
                source,
            })?;
        loop {
            let response = match read_message::<_, ResponseEnvelope>(&mut conn.stream).await {
                Err(source) => return Err(ClientError::Codec { uri, source }),
                Ok(None) => return Ok(()),
                Ok(Some(response)) => response,
            };
            match answer(response, id, uri.clone())? {
                ResponseResult::Ok(Reply::Watch(event)) => {
                    if !each(*event) {
                        // Ending the watch leaves the connection unusable
                        // for requests: the agent may have more in flight.
                        return Ok(());
                    }
                }
                ResponseResult::Ok(reply) => {
                    return Err(ClientError::UnexpectedReply {
                        uri,
                        op: "watch",
                        reply: Box::new(reply),
                    })
                }
                ResponseResult::Error(e) => return Err(ClientError::Api(e)),
            }
        }
    }

    /// Sends a request and waits up to `timeout` for its reply.
    ///
    /// # Errors
    /// [`ClientError::Api`] when the agent refuses; the other variants when
    /// the conversation itself fails.
    pub async fn request(&self, request: Request, timeout: Duration) -> Result<Reply, ClientError> {
        let op = request.op();
        let uri = self.uri.to_string();
        let mut conn = self.connection.lock().await;
        let envelope = conn.envelope(request);
        let id = envelope.id;
        let exchange = async {
            write_message(conn.stream.get_mut(), &envelope).await?;
            read_message::<_, ResponseEnvelope>(&mut conn.stream).await
        };
        let response = match tokio::time::timeout(timeout, exchange).await {
            Err(_) => return Err(ClientError::Timeout { uri, op, timeout }),
            Ok(Err(source)) => return Err(ClientError::Codec { uri, source }),
            Ok(Ok(None)) => return Err(ClientError::Closed { uri }),
            Ok(Ok(Some(response))) => response,
        };
        match answer(response, id, uri)? {
            ResponseResult::Ok(reply) => Ok(reply),
            ResponseResult::Error(e) => Err(ClientError::Api(e)),
        }
    }
}
