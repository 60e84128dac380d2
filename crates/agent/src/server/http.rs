//! HTTP on the agent's network ports: `GET /metrics` and nothing else,
//! served by hyper with limits on a request's size and time.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::metrics;
use crate::state::Agent;

/// How long a client may take to send its request's head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may last in all.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// The most a request's head may be (hyper's minimum is 8 KiB).
const HEAD_MAX: usize = 16 << 10;

/// Answers one request on `stream`, then closes it.
pub(super) async fn serve<S>(agent: Arc<Agent>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let response = respond(&agent, &request);
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(HEAD_MAX)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
        Ok(Err(e)) => tracing::debug!(error = %e, "HTTP connection ended"),
        Err(_) => tracing::debug!("HTTP connection timed out"),
        Ok(Ok(())) => {}
    }
}

fn respond(agent: &Agent, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *response.status_mut() = status;
        response
    };
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            let mut response =
                Response::new(Full::new(Bytes::from(agent.metrics.render(&agent.table))));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            response
        }
        (_, "/metrics") => {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET"));
            response
        }
        _ => text(StatusCode::NOT_FOUND, "try /metrics\n"),
    }
}
