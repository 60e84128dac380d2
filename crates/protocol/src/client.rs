//! A client for one agent connection. Requests go one at a time; a
//! connection can carry any number of them.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Mutex;

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
            ClientError::Protocol { .. } => ApiError::new(ErrorCode::Protocol, message),
            _ => ApiError::new(ErrorCode::PeerFailed, message),
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

struct Connection {
    stream: BufReader<Box<dyn Stream>>,
    next_id: u64,
}

/// A connection to an agent.
pub struct Client {
    uri: AgentUri,
    connection: Mutex<Connection>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("uri", &self.uri).finish()
    }
}

impl Client {
    /// Connects to the agent at `uri`.
    ///
    /// # Errors
    /// [`ClientError::Connect`] if nothing answers within
    /// [`CONNECT_TIMEOUT`].
    pub async fn connect(uri: &AgentUri) -> Result<Client, ClientError> {
        let connect_error = |source| ClientError::Connect {
            uri: uri.to_string(),
            source,
        };
        let stream: Box<dyn Stream> = match uri {
            AgentUri::Unix(path) => Box::new(
                tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path))
                    .await
                    .map_err(|_| connect_error(std::io::ErrorKind::TimedOut.into()))?
                    .map_err(connect_error)?,
            ),
            AgentUri::Tcp { host, port } => {
                let stream = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    TcpStream::connect((host.as_str(), *port)),
                )
                .await
                .map_err(|_| connect_error(std::io::ErrorKind::TimedOut.into()))?
                .map_err(connect_error)?;
                let _ = stream.set_nodelay(true);
                crate::keepalive(&stream);
                Box::new(stream)
            }
        };
        Ok(Client {
            uri: uri.clone(),
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

    /// Sends a request and waits up to `timeout` for its reply.
    ///
    /// # Errors
    /// [`ClientError::Api`] when the agent refuses; the other variants when
    /// the conversation itself fails.
    pub async fn request(&self, request: Request, timeout: Duration) -> Result<Reply, ClientError> {
        let op = request.op();
        let uri = self.uri.to_string();
        let mut conn = self.connection.lock().await;
        let id = conn.next_id;
        conn.next_id += 1;
        let envelope = RequestEnvelope {
            version: PROTOCOL_VERSION,
            id,
            request,
        };
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
        if response.version != PROTOCOL_VERSION || response.id != id {
            return Err(ClientError::Protocol {
                uri,
                version: response.version,
            });
        }
        match response.result {
            ResponseResult::Ok(reply) => Ok(reply),
            ResponseResult::Error(e) => Err(ClientError::Api(e)),
        }
    }
}
