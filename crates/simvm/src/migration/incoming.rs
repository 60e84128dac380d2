//! The destination's side: `migrate-incoming`, then the stream's landing.
//!
//! As with QEMU 7.2: the listener reports its address in `query-migrate`
//! (with no status until the source connects), takes one connection, and
//! the guest runs when the stream ends only if the VM was started without
//! `-S`. A stream that breaks before its end makes the process exit with
//! QEMU's message (a destination never keeps half a guest); one that breaks
//! in post-copy leaves it `postcopy-paused`, since the guest runs here.

use std::time::Duration;

use qmp::commands::migration::MigrationStatus;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use super::outgoing::set_status;
use super::passes::pages_of;
use super::wire::{self, Frame, WireError};
use crate::machine::{lock, RunState, Shared};

/// Binds the listener for `uri` (`tcp:HOST:PORT[,to=LAST]`, `unix:PATH`)
/// and waits for the source in the background.
///
/// # Errors
/// QEMU's message when it would refuse.
pub fn listen(shared: &Shared, uri: &str) -> Result<(), String> {
    {
        let m = lock(shared);
        if m.run_state != RunState::Inmigrate {
            return Err("'-incoming' was not specified on the command line".into());
        }
        if m.migration.listening.is_some() || m.migration.status.is_some() {
            return Err("The incoming migration has already been started".into());
        }
    }
    let (listener, address) = bind(uri)?;
    let mut m = lock(shared);
    m.migration.incoming = true;
    m.migration.listening = Some(address);
    set_status(&mut m, MigrationStatus::Setup);
    tokio::spawn(receive(shared.clone(), listener));
    Ok(())
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

fn bind(uri: &str) -> Result<(Listener, serde_json::Value), String> {
    let failed = |e: std::io::Error| format!("Failed to bind socket: {e}");
    if let Some(path) = uri.strip_prefix("unix:") {
        // QEMU replaces whatever is at the path with its socket.
        let _ = std::fs::remove_file(path);
        let std = std::os::unix::net::UnixListener::bind(path).map_err(failed)?;
        std.set_nonblocking(true).map_err(failed)?;
        let listener = tokio::net::UnixListener::from_std(std).map_err(failed)?;
        return Ok((
            Listener::Unix(listener),
            json!([{"type": "unix", "path": path}]),
        ));
    }
    let rest = uri
        .strip_prefix("tcp:")
        .ok_or_else(|| format!("Invalid parameter 'uri': unknown migration protocol: {uri}"))?;
    let (address, to) = match rest.split_once(",to=") {
        Some((address, last)) => (address, Some(last)),
        None => (rest, None),
    };
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("address resolution failed for {address}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let first: u16 = port
        .parse()
        .map_err(|_| format!("address resolution failed for {address}"))?;
    let last: u16 = match to {
        Some(last) => last
            .parse()
            .map_err(|_| format!("Parameter 'to' expects a port, got {last}"))?,
        None => first,
    };
    let mut error = None;
    for port in first..=last.max(first) {
        match std::net::TcpListener::bind((host, port)) {
            Ok(std) => {
                std.set_nonblocking(true).map_err(failed)?;
                let bound = std.local_addr().map_err(failed)?;
                let listener = tokio::net::TcpListener::from_std(std).map_err(failed)?;
                return Ok((
                    Listener::Tcp(listener),
                    json!([{"type": "inet", "host": host, "port": bound.port().to_string(),
                            "ipv4": bound.is_ipv4()}]),
                ));
            }
            Err(e) => error = Some(e),
        }
    }
    Err(failed(
        error.unwrap_or_else(|| std::io::Error::other("no port")),
    ))
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

async fn receive(shared: Shared, listener: Listener) {
    let (reader, writer): (Reader, Writer) = match listener {
        Listener::Tcp(l) => match l.accept().await {
            Ok((stream, _)) => {
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w))
            }
            Err(e) => return fail(&shared, e.to_string()),
        },
        Listener::Unix(l) => match l.accept().await {
            Ok((stream, _)) => {
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w))
            }
            Err(e) => return fail(&shared, e.to_string()),
        },
    };
    set_status(&mut lock(&shared), MigrationStatus::Active);
    if let Err(e) = land(&shared, BufReader::new(reader), writer).await {
        fail(&shared, e.to_string());
    }
}

async fn land<R: AsyncRead + Unpin>(
    shared: &Shared,
    mut reader: R,
    mut writer: Writer,
) -> Result<(), WireError> {
    loop {
        match wire::read(&mut reader).await? {
            Frame::Hello(hello) => {
                let m = lock(shared);
                let tls = !m.migration.parameters["tls-creds"]
                    .as_str()
                    .unwrap_or_default()
                    .is_empty();
                if hello.pages != m.ram.len() as u64 {
                    return Err(WireError::Body(format!(
                        "Length mismatch: pc.ram: {:#x} in != {:#x}",
                        hello.pages * crate::ram::PAGE_SIZE,
                        m.ram.len() as u64 * crate::ram::PAGE_SIZE
                    )));
                }
                if hello.machine != m.config.machine {
                    return Err(WireError::Body(format!(
                        "machine type {} does not match {}",
                        hello.machine, m.config.machine
                    )));
                }
                if hello.tls != tls {
                    return Err(WireError::Body("TLS handshake failed".into()));
                }
            }
            Frame::Pages(pages) => {
                let mut m = lock(shared);
                let m = &mut *m;
                for (page, value) in pages {
                    let page = page as usize;
                    if page >= m.ram.pages.len() {
                        return Err(WireError::Body(format!("page {page} out of range")));
                    }
                    // In post-copy, a page the guest has since written here
                    // is newer than the copy: only missing pages land.
                    match &mut m.missing {
                        Some(missing) => {
                            if missing.remove(page) {
                                m.ram.pages[page] = value;
                            }
                        }
                        None => m.ram.pages[page] = value,
                    }
                }
            }
            Frame::Postcopy(words) => {
                let mut m = lock(shared);
                let len = m.ram.len();
                m.missing = Some(pages_of(&words, len));
                set_status(&mut m, MigrationStatus::PostcopyActive);
            }
            Frame::Device(guest) => {
                let mut m = lock(shared);
                m.guest = Some(*guest);
                if m.missing.is_some() {
                    start_guest(&mut m);
                }
            }
            Frame::End => {
                {
                    let mut m = lock(shared);
                    let postcopy = m.missing.take().is_some();
                    set_status(&mut m, MigrationStatus::Completed);
                    if !postcopy {
                        start_guest(&mut m);
                    }
                }
                wire::write(&mut writer, &Frame::Ack).await?;
                let _ = writer.flush().await;
                // Let the source read the acknowledgement before the socket goes.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Ok(());
            }
            Frame::Ack => return Err(WireError::Tag(0x81)),
        }
    }
}

/// The guest has arrived: it runs unless the VM was started with `-S`.
fn start_guest(m: &mut crate::machine::Machine) {
    if m.run_state == RunState::Inmigrate {
        if m.autostart {
            m.resume();
        } else {
            m.run_state = RunState::Paused;
        }
    }
}

fn fail(shared: &Shared, why: String) {
    let mut m = lock(shared);
    if m.missing.is_some() {
        set_status(&mut m, MigrationStatus::PostcopyPaused);
        return;
    }
    m.migration.error_desc = Some(why.clone());
    set_status(&mut m, MigrationStatus::Failed);
    eprintln!("qemu-system-x86_64: load of migration failed: {why}");
    std::process::exit(1);
}
