//! A raw TLS connection to an agent, for tests that speak something other
//! than the agent protocol on its port (HTTP `GET /metrics`) or that probe
//! its TLS itself.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Connects to the agent at `uri` (`tls://HOST:PORT`) with the TLS
/// directory `dir`, checking the agent's certificate against `HOST`.
///
/// # Errors
/// The connection or the handshake failed.
pub async fn connect(uri: &str, dir: &Path) -> std::io::Result<TlsStream<TcpStream>> {
    let rest = uri.strip_prefix("tls://").expect("a tls:// URI");
    let (host, _) = rest.rsplit_once(':').expect("HOST:PORT");
    let config = tls::TlsDir::load(dir)
        .and_then(|d| d.client_config())
        .expect("a usable TLS directory");
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).expect("a host");
    let tcp = TcpStream::connect(rest).await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// `GET /metrics` from the agent at `uri`, over TLS with `dir`: the whole
/// HTTP response.
///
/// # Errors
/// The connection or the handshake failed.
pub async fn get_metrics(uri: &str, dir: &Path) -> std::io::Result<String> {
    let mut stream = connect(uri, dir).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let mut response = String::new();
    // The agent closes after one response; a TLS close without
    // close_notify reads as an error once everything arrived.
    let _ = stream.read_to_string(&mut response).await;
    Ok(response)
}
