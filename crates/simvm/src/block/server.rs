//! The destination's NBD server: exports of its `-drive` nodes that a
//! source's mirror writes into.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncSeekExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};

use super::wire::{self, Frame, WireError};
use crate::machine::{lock, Shared};

/// How long a client has to say which export it wants.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A running NBD server.
#[derive(Debug)]
pub struct NbdServer {
    /// Clients must use TLS (`tls-creds`).
    pub tls: bool,
    /// Its exports.
    pub exports: Vec<Export>,
    /// The listener; its connections end with it.
    listener: AbortHandle,
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// One export (`block-export-add`).
#[derive(Debug, Clone)]
pub struct Export {
    /// `id`.
    pub id: String,
    /// The node exported.
    pub node: String,
    /// The name clients ask for.
    pub name: String,
    /// Clients may write.
    pub writable: bool,
}

/// Listens on `host:port` (`nbd-server-start`).
///
/// # Errors
/// QEMU's message when the address cannot be bound.
pub fn start(
    shared: &Shared,
    host: &str,
    port: &str,
    to: Option<u16>,
    tls: bool,
) -> Result<NbdServer, String> {
    let first: u16 = port
        .parse()
        .map_err(|_| format!("Port '{port}' should be a number"))?;
    // As QEMU's inet listen: the first port of the range that binds.
    let last = to.unwrap_or(first).max(first);
    let mut error = None;
    let mut bound = None;
    for port in first..=last {
        match std::net::TcpListener::bind((host, port)) {
            Ok(listener) => {
                bound = Some(listener);
                break;
            }
            Err(e) => error = Some(e),
        }
    }
    let bound = bound
        .ok_or_else(|| error.unwrap_or_else(|| std::io::Error::other("no port")))
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(TcpListener::from_std)
        .map_err(|e| format!("Failed to bind socket: {}", super::mirror::io_message(&e)))?;
    let listener = tokio::spawn(accept(shared.clone(), bound)).abort_handle();
    Ok(NbdServer {
        tls,
        exports: Vec::new(),
        listener,
    })
}

async fn accept(shared: Shared, listener: TcpListener) {
    // Dropping the set (the server stopped) ends every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve(shared.clone(), stream));
                }
                Err(_) => return,
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

/// Where a client's writes go.
struct Opened {
    size: u64,
    /// The image file, if its bytes are written (a raw image, writable).
    file: Option<PathBuf>,
}

async fn serve(shared: Shared, stream: TcpStream) -> Result<(), WireError> {
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, wire::read(&mut read)).await {
        Ok(Ok(Frame::Hello(hello))) => hello,
        Ok(Ok(_)) => return Err(WireError::Body("no hello".into())),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(WireError::Body("no hello in time".into())),
    };
    let opened = open(&shared, &hello);
    wire::write(
        &mut write,
        &Frame::Opened(opened.as_ref().map(|o| o.size).map_err(Clone::clone)),
    )
    .await?;
    let Ok(opened) = opened else {
        return Ok(());
    };
    let mut file = match &opened.file {
        Some(path) => Some(tokio::fs::OpenOptions::new().write(true).open(path).await?),
        None => None,
    };
    loop {
        match wire::read(&mut read).await? {
            Frame::Write { offset, data } => {
                if let Some(file) = &mut file {
                    file.seek(std::io::SeekFrom::Start(offset)).await?;
                    file.write_all(&data).await?;
                    file.flush().await?;
                }
                wire::write(&mut write, &Frame::Ack).await?;
            }
            Frame::Skip { .. } => wire::write(&mut write, &Frame::Ack).await?,
            other => return Err(WireError::Body(format!("unexpected {other:?}"))),
        }
    }
}

/// Opens the export a client asked for, with QEMU's refusals.
fn open(shared: &Shared, hello: &wire::Hello) -> Result<Opened, String> {
    let m = lock(shared);
    let server = m.block.server.as_ref().ok_or("Server shutting down")?;
    if hello.tls && !server.tls {
        return Err("Server does not support STARTTLS".into());
    }
    if server.tls && !hello.tls {
        return Err("TLS negotiation required before option 7 (go)".into());
    }
    let export = server
        .exports
        .iter()
        .find(|e| e.name == hello.export)
        .ok_or_else(|| format!("Requested export '{}' not available", hello.export))?;
    let drive = m
        .config
        .drives
        .iter()
        .find(|d| d.node_name == export.node)
        .ok_or("Requested export not available")?;
    let size = crate::commands::virtual_size(&drive.file, &drive.format);
    Ok(Opened {
        size,
        file: (export.writable && drive.format == "raw").then(|| drive.file.clone()),
    })
}
