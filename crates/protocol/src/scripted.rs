//! A scripted agent, for fast tests of the code that talks to a peer agent:
//! it listens on a unix socket, answers each request as the test's script
//! says (a reply, an error, or hanging up without answering), and logs what
//! it was asked. It can stop listening and come back, as an agent that
//! restarts would.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::BufReader;
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

use crate::codec::{read_message, write_message};
use crate::envelope::{RequestEnvelope, ResponseEnvelope, ResponseResult, PROTOCOL_VERSION};
use crate::error::ApiError;
use crate::reply::Reply;
use crate::request::Request;
use crate::uri::AgentUri;

/// What the scripted agent does with one request.
#[derive(Debug, Clone)]
pub enum Answer {
    /// Answer with this reply.
    Reply(Reply),
    /// Answer with this error.
    Error(ApiError),
    /// Close the connection without answering (the request may or may not
    /// have been acted on: the caller cannot tell).
    HangUp,
    /// Close the connection without answering and stop listening, as an
    /// agent that dies would.
    Die,
}

/// The script: an answer for each request.
pub type Script = Box<dyn FnMut(&Request) -> Answer + Send>;

struct Shared {
    script: Mutex<Script>,
    log: Mutex<Vec<Request>>,
}

/// A scripted agent on a unix socket.
pub struct ScriptedAgent {
    path: PathBuf,
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for ScriptedAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedAgent")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Drop for ScriptedAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

impl ScriptedAgent {
    /// Listens on `dir/agent.sock`, answering with `script`.
    ///
    /// # Panics
    /// If the socket cannot be bound.
    pub fn start(dir: &Path, script: impl FnMut(&Request) -> Answer + Send + 'static) -> Self {
        let agent = ScriptedAgent {
            path: dir.join("agent.sock"),
            shared: Arc::new(Shared {
                script: Mutex::new(Box::new(script)),
                log: Mutex::new(Vec::new()),
            }),
            task: Mutex::new(None),
        };
        agent.listen();
        agent
    }

    /// The URI to dial.
    pub fn uri(&self) -> AgentUri {
        AgentUri::Unix(self.path.clone())
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.log.lock().expect("log lock").clone()
    }

    /// The operations received, in order.
    pub fn ops(&self) -> Vec<&'static str> {
        self.requests().iter().map(Request::op).collect()
    }

    /// Stops listening and drops every connection.
    pub fn stop(&self) {
        if let Some(task) = self.task.lock().expect("task lock").take() {
            task.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }

    /// Listens again (after [`ScriptedAgent::stop`] or [`Answer::Die`]).
    ///
    /// # Panics
    /// If the socket cannot be bound.
    pub fn listen(&self) {
        self.stop();
        let listener = UnixListener::bind(&self.path).expect("bind the scripted agent's socket");
        let shared = self.shared.clone();
        let path = self.path.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { return };
                        connections.spawn(serve(shared.clone(), stream));
                    }
                    Some(done) = connections.join_next(), if !connections.is_empty() => {
                        if matches!(done, Ok(Ended::Died)) {
                            // Dying takes every connection and the socket.
                            let _ = std::fs::remove_file(&path);
                            return;
                        }
                    }
                }
            }
        });
        *self.task.lock().expect("task lock") = Some(task);
    }
}

enum Ended {
    Closed,
    Died,
}

async fn serve(shared: Arc<Shared>, stream: tokio::net::UnixStream) -> Ended {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let Ok(Some(envelope)) = read_message::<_, RequestEnvelope>(&mut reader).await else {
            return Ended::Closed;
        };
        shared
            .log
            .lock()
            .expect("log lock")
            .push(envelope.request.clone());
        let answer = (shared.script.lock().expect("script lock"))(&envelope.request);
        let result = match answer {
            Answer::Reply(reply) => ResponseResult::Ok(reply),
            Answer::Error(error) => ResponseResult::Error(error),
            Answer::HangUp => return Ended::Closed,
            Answer::Die => return Ended::Died,
        };
        let response = ResponseEnvelope {
            version: PROTOCOL_VERSION,
            id: envelope.id,
            result,
        };
        if write_message(&mut write, &response).await.is_err() {
            return Ended::Closed;
        }
    }
}
