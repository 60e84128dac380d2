//! The source's side: NBD client nodes and the mirror jobs that copy a
//! disk through them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::wire::{self, Frame, Hello, WireError, MAX_WRITE};
use super::{JobStatus, MirrorJob};
use crate::machine::{lock, Machine, Shared};

/// How long connecting to an NBD server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write may wait for the server's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// The pace of a job without a `speed`: the simulated link's.
const LINK_BYTES_PER_SEC: u64 = 1 << 30;
/// QEMU's default mirror buffer.
pub const DEFAULT_BUF_SIZE: u64 = 16 << 20;
/// What QEMU reports when a write to the target fails.
const IO_ERROR: &str = "Input/output error";

/// An I/O error as QEMU words it (`strerror`, without Rust's errno).
pub fn io_message(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// Connects to `export` at `host:port` (what `blockdev-add` of an `nbd`
/// node does before it returns): the connection and the export's size.
///
/// # Errors
/// QEMU's message when the server is unreachable or refuses.
pub async fn connect(
    host: &str,
    port: &str,
    export: &str,
    tls: bool,
) -> Result<(TcpStream, u64), String> {
    let addr = format!("{host}:{port}");
    let mut stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(format!("Failed to connect to '{addr}': {}", io_message(&e))),
        Err(_) => {
            return Err(format!(
                "Failed to connect to '{addr}': Connection timed out"
            ))
        }
    };
    let _ = stream.set_nodelay(true);
    let hello = Frame::Hello(Hello {
        export: export.to_string(),
        tls,
    });
    let opened = tokio::time::timeout(CONNECT_TIMEOUT, async {
        wire::write(&mut stream, &hello).await?;
        wire::read(&mut stream).await
    })
    .await;
    match opened {
        Ok(Ok(Frame::Opened(Ok(size)))) => Ok((stream, size)),
        Ok(Ok(Frame::Opened(Err(why)))) => Err(why),
        Ok(Ok(other)) => Err(format!("unexpected reply from the NBD server: {other:?}")),
        Ok(Err(e)) => Err(format!("Failed to read initial magic: {e}")),
        Err(_) => Err("Failed to read initial magic: timed out".into()),
    }
}

/// What a mirror copies from.
#[derive(Debug, Clone)]
pub struct Source {
    /// The image file.
    pub file: PathBuf,
    /// Its bytes are the guest's (a raw image): they are carried.
    pub raw: bool,
}

/// Copies `len` bytes of `source` through `stream` for the job `id`, paced
/// at the job's speed, and marks it ready when done; fails it if a write
/// is not acknowledged.
pub async fn run(
    shared: Shared,
    id: String,
    source: Source,
    buf_size: u64,
    stream: Arc<tokio::sync::Mutex<TcpStream>>,
) {
    let mut file = if source.raw {
        tokio::fs::File::open(&source.file).await.ok()
    } else {
        None
    };
    loop {
        let (offset, len, speed) = {
            let mut m = lock(&shared);
            let Some(job) = m.block.jobs.iter_mut().find(|j| j.id == id) else {
                return;
            };
            if job.status != JobStatus::Running {
                return;
            }
            if job.offset >= job.len {
                job.status = JobStatus::Ready;
                job.task = None;
                let data = job.event_data();
                m.emit("BLOCK_JOB_READY", Some(data));
                return;
            }
            (job.offset, job.len, job.speed)
        };
        let chunk = buf_size.min(MAX_WRITE as u64).min(len - offset).max(1);
        let frame = match &mut file {
            Some(file) => Frame::Write {
                offset,
                data: read_at(file, offset, chunk).await,
            },
            None => Frame::Skip { offset, len: chunk },
        };
        let started = Instant::now();
        let written = tokio::time::timeout(ACK_TIMEOUT, async {
            let mut stream = stream.lock().await;
            wire::write(&mut *stream, &frame).await?;
            match wire::read(&mut *stream).await? {
                Frame::Ack => Ok(()),
                other => Err(WireError::Body(format!("unexpected {other:?}"))),
            }
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            fail(&mut lock(&shared), &id);
            return;
        }
        let rate = if speed == 0 {
            LINK_BYTES_PER_SEC
        } else {
            speed
        };
        let due = started + Duration::from_secs_f64(chunk as f64 / rate as f64);
        tokio::time::sleep_until(due).await;
        let mut m = lock(&shared);
        match m.block.jobs.iter_mut().find(|j| j.id == id) {
            Some(job) if job.status == JobStatus::Running => job.offset += chunk,
            _ => return,
        }
    }
}

/// `chunk` bytes of `file` at `offset`; zeros past its end (a sparse raw
/// image reads as zeros there too).
async fn read_at(file: &mut tokio::fs::File, offset: u64, chunk: u64) -> Vec<u8> {
    let mut data = vec![0u8; chunk as usize];
    if file.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
        let mut filled = 0;
        while filled < data.len() {
            match file.read(&mut data[filled..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => filled += n,
            }
        }
    }
    data
}

/// The target stopped answering: QEMU's mirror reports the write error
/// and concludes with it (`on-target-error=report`).
fn fail(m: &mut Machine, id: &str) {
    let Some(job) = m.block.jobs.iter_mut().find(|j| j.id == id) else {
        return;
    };
    if job.status == JobStatus::Concluded {
        return;
    }
    job.status = JobStatus::Concluded;
    job.error = Some(IO_ERROR.into());
    job.task = None;
    let mut data = job.event_data();
    data["error"] = serde_json::json!(IO_ERROR);
    let id = job.id.clone();
    m.emit(
        "BLOCK_JOB_ERROR",
        Some(serde_json::json!({"device": id, "operation": "write", "action": "report"})),
    );
    m.emit("BLOCK_JOB_COMPLETED", Some(data));
    dismiss_if_auto(m, &id);
}

/// Ends a job (`block-job-cancel`): a ready mirror asked without `force`
/// completes, leaving the target a copy; anything else is abandoned.
pub fn cancel(m: &mut Machine, job: &str, force: bool) -> Result<(), crate::commands::QmpError> {
    let Some(j) = m.block.jobs.iter_mut().find(|j| j.id == job) else {
        return Err(("DeviceNotActive", format!("Block job '{job}' not found")));
    };
    if j.status == JobStatus::Concluded {
        return Err(crate::commands::generic(format!(
            "Job '{job}' in state 'concluded' cannot accept command verb 'cancel'"
        )));
    }
    let completes = j.status == JobStatus::Ready && !force;
    if let Some(task) = j.task.take() {
        task.abort();
    }
    j.status = JobStatus::Concluded;
    let data = j.event_data();
    m.emit(
        if completes {
            "BLOCK_JOB_COMPLETED"
        } else {
            "BLOCK_JOB_CANCELLED"
        },
        Some(data),
    );
    dismiss_if_auto(m, job);
    Ok(())
}

fn dismiss_if_auto(m: &mut Machine, id: &str) {
    m.block
        .jobs
        .retain(|j| !(j.id == id && j.auto_dismiss && j.status == JobStatus::Concluded));
}

/// A new job's entry, before its task runs.
pub fn job(id: &str, target: &str, len: u64, speed: u64, auto_dismiss: bool) -> MirrorJob {
    MirrorJob {
        id: id.to_string(),
        target: target.to_string(),
        len,
        offset: 0,
        speed,
        status: JobStatus::Running,
        error: None,
        auto_dismiss,
        task: None,
    }
}
