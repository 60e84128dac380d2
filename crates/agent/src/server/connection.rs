//! One connection: the agent protocol, request by request, or (on the
//! network ports) one HTTP request (see `http`).

use std::sync::Arc;

use protocol::codec::{read_message, write_message, CodecError};
use protocol::envelope::{RequestEnvelope, ResponseEnvelope, ResponseResult};
use protocol::{ApiError, ErrorCode, PROTOCOL_VERSION};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader};

use super::ConnContext;
use crate::migrate::destination;
use crate::state::Agent;

/// A network connection speaks the agent protocol, or HTTP (`GET
/// /metrics`): the agent protocol starts with '{', HTTP with a method. On
/// the metrics port (`http_only`) it is HTTP whatever it starts with.
pub(super) async fn serve_stream<S>(agent: Arc<Agent>, stream: S, ctx: ConnContext, http_only: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The first bytes stay in the buffer for whoever serves the rest.
    let mut stream = BufReader::new(stream);
    let is_http = http_only
        || matches!(
            tokio::time::timeout(agent.config.timeouts.handshake, stream.fill_buf()).await,
            Ok(Ok(first)) if first.first().is_some_and(u8::is_ascii_uppercase)
        );
    if is_http {
        super::http::serve(agent, stream).await;
    } else {
        let (read, write) = tokio::io::split(stream);
        serve_requests(agent, BufReader::new(read), write, ctx).await;
    }
}

/// Reads requests and answers them, one at a time, until the client hangs
/// up; then tears down any incoming migration this connection prepared.
pub(super) async fn serve_requests<R, W>(
    agent: Arc<Agent>,
    mut reader: BufReader<R>,
    mut write: W,
    ctx: ConnContext,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        // A migration's peer connection pings every few seconds, so only
        // a client that has gone quiet meets this.
        let idle = agent.config.timeouts.client_idle;
        let next = tokio::time::timeout(idle, read_message(&mut reader)).await;
        let Ok(next) = next else {
            tracing::debug!(conn = ctx.id, "idle connection closed");
            break;
        };
        let envelope: RequestEnvelope = match next {
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
                let _ = tokio::time::timeout(
                    agent.config.timeouts.client_write,
                    write_message(&mut write, &reply),
                )
                .await;
                break;
            }
            Err(e) => {
                tracing::debug!(error = %e, "connection error");
                break;
            }
        };
        // A watch streams on this connection until the client is done.
        if let protocol::Request::Watch { domain } = &envelope.request {
            if envelope.version == PROTOCOL_VERSION && ctx.caller.role().allows(&envelope.request) {
                crate::watch::serve(&agent, domain.clone(), envelope.id, &mut reader, &mut write)
                    .await;
                break;
            }
        }
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
        let written = tokio::time::timeout(
            agent.config.timeouts.client_write,
            write_message(&mut write, &reply),
        )
        .await;
        if !matches!(written, Ok(Ok(()))) {
            if written.is_err() {
                tracing::info!(
                    conn = ctx.id,
                    "a client that does not read its replies; closed"
                );
            }
            break;
        }
    }
    destination::abort_for_connection(&agent, ctx.id).await;
}
