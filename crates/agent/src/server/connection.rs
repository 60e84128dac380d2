//! One connection: the agent protocol, request by request, or (on the
//! network port) one HTTP `GET /metrics`.

use std::sync::Arc;
use std::time::Duration;

use protocol::codec::{read_message, write_message, CodecError};
use protocol::envelope::{RequestEnvelope, ResponseEnvelope, ResponseResult};
use protocol::{ApiError, ErrorCode, PROTOCOL_VERSION};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::ConnContext;
use crate::migrate::destination;
use crate::state::Agent;

/// How long a new connection may take to say what it is.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an HTTP client may take to send its request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// The most an HTTP request (line and headers) may be.
const HTTP_MAX: u64 = 16 << 10;
/// How long a connection may sit without a whole request before it is
/// closed (a migration's peer connection pings every few seconds).
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// A network connection speaks the agent protocol, or HTTP (`GET
/// /metrics`): the agent protocol starts with '{', HTTP with a method.
pub(super) async fn serve_stream<S>(agent: Arc<Agent>, stream: S, ctx: ConnContext)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (read, write) = tokio::io::split(stream);
    let mut reader = BufReader::new(read);
    let is_http = matches!(
        tokio::time::timeout(FIRST_BYTES_TIMEOUT, reader.fill_buf()).await,
        Ok(Ok(first)) if first.starts_with(b"GET ")
    );
    if is_http {
        serve_http(agent, reader, write).await;
    } else {
        serve_requests(agent, reader, write, ctx).await;
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
        let next = tokio::time::timeout(IDLE_TIMEOUT, read_message(&mut reader)).await;
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

/// Answers one HTTP request: `GET /metrics`, or 404.
async fn serve_http<R, W>(agent: Arc<Agent>, reader: BufReader<R>, mut write: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // A request longer than this is cut off and refused.
    let mut reader = reader.take(HTTP_MAX);
    let mut request_line = String::new();
    let read = tokio::time::timeout(HTTP_TIMEOUT, async {
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
    if !matches!(read, Ok(Ok(()))) || !request_line.ends_with('\n') {
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
