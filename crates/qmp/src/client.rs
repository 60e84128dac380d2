//! The QMP connection: greeting, negotiation, multiplexed commands, events.
//!
//! One reader task owns the read half. Each command gets a numeric `id`; the
//! reader routes the reply with that id to the caller's oneshot channel and
//! broadcasts events. When the connection ends (EOF, I/O error, malformed
//! JSON), every pending call fails and later calls fail at once.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

use crate::command::Command;
use crate::error::{Error, ErrorClass, Result};
use crate::event::Event;
use crate::greeting::{Greeting, GreetingEnvelope};

/// Timeout of a call unless the caller picks another.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest line we accept; `query-qmp-schema` replies are ~200 KiB.
const MAX_LINE: usize = 16 << 20;

const EVENT_BUFFER: usize = 1024;

type Reply = std::result::Result<Value, Error>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

#[derive(Default)]
struct Pending {
    calls: HashMap<u64, oneshot::Sender<Reply>>,
    /// Set once the reader stopped; why, for later callers.
    closed: Option<String>,
}

struct Shared {
    pending: Mutex<Pending>,
    events: broadcast::Sender<Event>,
}

impl Shared {
    fn close(&self, why: String) {
        let calls = {
            let mut pending = self.pending.lock().expect("pending lock");
            pending.closed.get_or_insert(why);
            std::mem::take(&mut pending.calls)
        };
        for (_, tx) in calls {
            let _ = tx.send(Err(Error::Disconnected));
        }
    }
}

struct Inner {
    writer: tokio::sync::Mutex<Writer>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    greeting: Greeting,
    timeout: Duration,
    reader: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A negotiated QMP connection. Cheap to clone; the connection closes when
/// the last clone is dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("qemu", &self.inner.greeting.version.qemu)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct RawError {
    class: ErrorClass,
    #[serde(default)]
    desc: String,
}

#[derive(Deserialize)]
struct RawMessage {
    #[serde(default)]
    id: Option<Value>,
    #[serde(rename = "return")]
    ret: Option<Value>,
    error: Option<RawError>,
    event: Option<String>,
}

impl Client {
    /// Connects to a QMP unix socket and negotiates capabilities.
    ///
    /// # Errors
    /// [`Error::Connect`] if the socket cannot be reached, [`Error::Greeting`]
    /// or [`Error::Timeout`] if the peer does not speak QMP.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Client> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| Error::Timeout {
                command: "connect".into(),
                timeout,
            })?
            .map_err(|source| Error::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (read, write) = stream.into_split();
        Self::handshake(read, write, timeout).await
    }

    /// Runs the protocol over any byte stream (tests use a fake peer).
    ///
    /// # Errors
    /// As [`Client::connect`], minus the connect step.
    pub async fn handshake<R, W>(read: R, write: W, timeout: Duration) -> Result<Client>
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let mut reader = BufReader::new(read);
        let line = tokio::time::timeout(timeout, read_line(&mut reader))
            .await
            .map_err(|_| Error::Timeout {
                command: "greeting".into(),
                timeout,
            })??
            .ok_or(Error::Disconnected)?;
        let greeting: GreetingEnvelope =
            serde_json::from_str(&line).map_err(|_| Error::Greeting(line.clone()))?;

        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            events: broadcast::channel(EVENT_BUFFER).0,
        });
        let reader_task = tokio::spawn(read_loop(reader, shared.clone()));
        let client = Client {
            inner: Arc::new(Inner {
                writer: tokio::sync::Mutex::new(Box::new(write)),
                shared,
                next_id: AtomicU64::new(1),
                greeting: greeting.qmp,
                timeout,
                reader: reader_task,
            }),
        };
        client
            .execute_raw("qmp_capabilities", None, timeout)
            .await?;
        Ok(client)
    }

    /// What QEMU announced when we connected.
    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    /// Events from now on. A receiver that falls more than
    /// 1024 events behind skips the oldest ones.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.shared.events.subscribe()
    }

    /// True once the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner
            .shared
            .pending
            .lock()
            .expect("pending lock")
            .closed
            .is_some()
    }

    /// Runs a typed command with the client's default timeout.
    ///
    /// # Errors
    /// [`Error::Command`] when QEMU refuses it, [`Error::Timeout`],
    /// [`Error::Disconnected`], or [`Error::Decode`] for an unexpected reply.
    pub async fn execute<C: Command>(&self, command: &C) -> Result<C::Reply> {
        self.execute_with_timeout(command, self.inner.timeout).await
    }

    /// Runs a typed command with an explicit timeout.
    ///
    /// # Errors
    /// As [`Client::execute`].
    pub async fn execute_with_timeout<C: Command>(
        &self,
        command: &C,
        timeout: Duration,
    ) -> Result<C::Reply> {
        let args = serde_json::to_value(command).map_err(|source| Error::Decode {
            command: C::NAME.into(),
            source,
        })?;
        let args = (!args.is_null()).then_some(args);
        let value = self.execute_raw(C::NAME, args, timeout).await?;
        serde_json::from_value(value).map_err(|source| Error::Decode {
            command: C::NAME.into(),
            source,
        })
    }

    /// Runs a command given by name and JSON arguments; returns the raw
    /// `return` value.
    ///
    /// # Errors
    /// As [`Client::execute`].
    pub async fn execute_raw(
        &self,
        name: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.inner.shared.pending.lock().expect("pending lock");
            if pending.closed.is_some() {
                return Err(Error::Disconnected);
            }
            pending.calls.insert(id, tx);
        }
        let mut message = serde_json::json!({ "execute": name, "id": id });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let mut line = message.to_string();
        line.push('\n');
        tracing::trace!(%line, "qmp send");

        let sent = tokio::time::timeout(timeout, async {
            let mut writer = self.inner.writer.lock().await;
            writer.write_all(line.as_bytes()).await?;
            writer.flush().await
        })
        .await;
        let forget = || {
            self.inner
                .shared
                .pending
                .lock()
                .expect("pending lock")
                .calls
                .remove(&id);
        };
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                forget();
                return Err(Error::Io(e));
            }
            Err(_) => {
                forget();
                return Err(Error::Timeout {
                    command: name.into(),
                    timeout,
                });
            }
        }

        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(Error::Command { class, desc, .. }))) => Err(Error::Command {
                command: name.into(),
                class,
                desc,
            }),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(Error::Disconnected),
            Err(_) => {
                forget();
                Err(Error::Timeout {
                    command: name.into(),
                    timeout,
                })
            }
        }
    }
}

/// Reads one line, bounded by [`MAX_LINE`]; `None` at EOF.
async fn read_line<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> Result<Option<String>> {
    let mut buf = Vec::new();
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(None);
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(end) => {
                buf.extend_from_slice(&chunk[..end]);
                reader.consume(end + 1);
                break;
            }
            None => {
                let n = chunk.len();
                buf.extend_from_slice(chunk);
                reader.consume(n);
            }
        }
        if buf.len() > MAX_LINE {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "QMP line longer than 16 MiB",
            )));
        }
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

async fn read_loop<R: AsyncRead + Unpin>(mut reader: BufReader<R>, shared: Arc<Shared>) {
    let why = loop {
        let line = match read_line(&mut reader).await {
            Ok(Some(line)) => line,
            Ok(None) => break "end of stream".to_string(),
            Err(e) => break e.to_string(),
        };
        if line.trim().is_empty() {
            continue;
        }
        tracing::trace!(%line, "qmp recv");
        let message: RawMessage = match serde_json::from_str(&line) {
            Ok(m) => m,
            Err(source) => {
                // A peer that sends garbage cannot be trusted with the
                // replies still due: fail them all with the reason.
                let error = Error::Malformed { line, source };
                let why = error.to_string();
                let calls = {
                    let mut pending = shared.pending.lock().expect("pending lock");
                    pending.closed.get_or_insert(why.clone());
                    std::mem::take(&mut pending.calls)
                };
                let mut first = Some(error);
                for (_, tx) in calls {
                    let e = first.take().unwrap_or(Error::Disconnected);
                    let _ = tx.send(Err(e));
                }
                break why;
            }
        };
        if let Some(name) = message.event.clone() {
            if let Ok(event) = serde_json::from_str::<Event>(&line) {
                let _ = shared.events.send(event);
            } else {
                tracing::debug!(%name, "undecodable QMP event ignored");
            }
            continue;
        }
        let Some(id) = message.id.as_ref().and_then(Value::as_u64) else {
            tracing::debug!(%line, "QMP reply without our id ignored");
            continue;
        };
        let reply = match (message.ret, message.error) {
            (_, Some(err)) => Err(Error::Command {
                command: String::new(),
                class: err.class,
                desc: err.desc,
            }),
            (Some(ret), None) => Ok(ret),
            (None, None) => Ok(Value::Null),
        };
        let tx = shared
            .pending
            .lock()
            .expect("pending lock")
            .calls
            .remove(&id);
        if let Some(tx) = tx {
            let _ = tx.send(reply);
        }
    };
    tracing::debug!(%why, "QMP connection closed");
    shared.close(why);
}
