//! The source's side: `migrate` as QEMU 7.2 runs it.
//!
//! The first pass sends every page; each later pass sends what the guest
//! dirtied during the one before. Sending is paced in 100 ms windows of
//! `max-bandwidth` (QEMU's rate limit), counting 4 KiB per page written
//! and a header per zero page. When what is left of a pass fits in
//! `bandwidth × downtime-limit`, the bitmap is synced (`MIGRATION_PASS`,
//! QEMU's auto-converge check); if what the sync found still fits, the
//! guest stops and the rest goes at the link's speed. A cancel, a broken
//! socket or a destination that never acknowledges ends it as QEMU would:
//! `cancelled` or `failed`, the guest running again if the migration had
//! stopped it; in post-copy, `postcopy-paused`.

use std::time::Duration;

use qmp::commands::migration::MigrationStatus;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, BufWriter};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::passes::{
    bandwidth, sync, take_pages, Phase, Trigger, LINK_BYTES_PER_SEC, NORMAL_PAGE_BYTES, WINDOW,
};
use super::wire::{self, Frame, Hello};
use super::{Control, RamCounters};
use crate::machine::{lock, Machine, RunState, Shared};
use crate::ram::{PageSet, PAGE_SIZE};

pub(super) const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Where to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `tcp:HOST:PORT`.
    Tcp(String),
    /// `unix:PATH`.
    Unix(String),
}

impl Target {
    /// Reads a migration URI.
    ///
    /// # Errors
    /// QEMU's message for a URI it does not take.
    pub fn parse(uri: &str) -> Result<Target, String> {
        if let Some(rest) = uri.strip_prefix("tcp:") {
            return Ok(Target::Tcp(rest.to_string()));
        }
        if let Some(rest) = uri.strip_prefix("unix:") {
            return Ok(Target::Unix(rest.to_string()));
        }
        Err(format!(
            "Invalid parameter 'uri': unknown migration protocol: {uri}"
        ))
    }
}

/// How the migration ended.
pub(super) enum Outcome {
    Completed,
    Cancelled,
    Failed(String),
    PostcopyPaused,
}

pub(super) type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub(super) type Writer = BufWriter<Box<dyn AsyncWrite + Send + Unpin>>;

/// Starts a migration to `uri` (the `migrate` command).
///
/// # Errors
/// QEMU's message when it would refuse.
pub fn start(shared: &Shared, uri: &str) -> Result<(), String> {
    let target = Target::parse(uri)?;
    let mut m = lock(shared);
    if m.migration.in_progress() {
        return Err("There's a migration process in progress".into());
    }
    if m.run_state == RunState::Inmigrate {
        return Err("Guest is waiting for an incoming migration".into());
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let total = m.ram.len() as u64 * PAGE_SIZE;
    let mig = &mut m.migration;
    mig.status = Some(MigrationStatus::Setup);
    mig.started = Some(Instant::now());
    mig.total_time_ms = None;
    mig.downtime_ms = None;
    mig.error_desc = None;
    mig.throttle_pct = 0;
    mig.ram = RamCounters {
        total,
        remaining: total,
        ..Default::default()
    };
    mig.control = Some(tx);
    set_status(&mut m, MigrationStatus::Setup);
    tokio::spawn(run(shared.clone(), target, rx));
    Ok(())
}

/// Moves to `status`, with its `MIGRATION` event.
pub fn set_status(m: &mut Machine, status: MigrationStatus) {
    m.migration.status = Some(status);
    if m.migration_events() {
        m.emit("MIGRATION", Some(json!({"status": status.as_str()})));
    }
}

async fn run(shared: Shared, target: Target, mut control: mpsc::UnboundedReceiver<Control>) {
    let mut job = Job {
        shared: shared.clone(),
        stopped_running: false,
    };
    let outcome = match connect(&target).await {
        Ok((reader, writer)) => job.transfer(reader, writer, &mut control).await,
        Err(e) => Outcome::Failed(e),
    };
    let mut m = lock(&shared);
    m.ram.dirty_log = None;
    m.migration.throttle_pct = 0;
    m.migration.control = None;
    m.migration.total_time_ms = m.migration.started.map(|s| s.elapsed().as_millis() as u64);
    match outcome {
        Outcome::Completed => {
            m.migration.ram.remaining = 0;
            set_status(&mut m, MigrationStatus::Completed);
            m.run_state = RunState::Postmigrate;
        }
        Outcome::PostcopyPaused => set_status(&mut m, MigrationStatus::PostcopyPaused),
        Outcome::Cancelled | Outcome::Failed(_) => {
            if let Outcome::Failed(e) = &outcome {
                m.migration.error_desc = Some(e.clone());
                set_status(&mut m, MigrationStatus::Failed);
            } else {
                set_status(&mut m, MigrationStatus::Cancelled);
            }
            if job.stopped_running {
                m.resume();
            }
        }
    }
}

async fn connect(target: &Target) -> Result<(Reader, Writer), String> {
    let failed = |e: std::io::Error| format!("Failed to connect socket: {e}");
    let connecting = async {
        match target {
            Target::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr).await.map_err(failed)?;
                let _ = stream.set_nodelay(true);
                let (r, w) = stream.into_split();
                let r: Reader = Box::new(r);
                let w: Box<dyn AsyncWrite + Send + Unpin> = Box::new(w);
                Ok::<(Reader, Writer), String>((r, BufWriter::new(w)))
            }
            Target::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(failed)?;
                let (r, w) = stream.into_split();
                let r: Reader = Box::new(r);
                let w: Box<dyn AsyncWrite + Send + Unpin> = Box::new(w);
                Ok((r, BufWriter::new(w)))
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), connecting)
        .await
        .map_err(|_| "Failed to connect socket: Connection timed out".to_string())?
}

pub(super) struct Job {
    pub(super) shared: Shared,
    /// The migration stopped a running guest: it runs again if it fails.
    pub(super) stopped_running: bool,
}

fn write_error(e: wire::WireError) -> String {
    format!("Unable to write to socket: {e}")
}

impl Job {
    async fn transfer(
        &mut self,
        reader: Reader,
        mut writer: Writer,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Outcome {
        let (hello, mut to_send) = {
            let mut m = lock(&self.shared);
            let pages = m.ram.len();
            m.ram.dirty_log = Some(PageSet::new(pages));
            let hello = Hello {
                pages: pages as u64,
                machine: m.config.machine.clone(),
                tls: !m.migration.parameters["tls-creds"]
                    .as_str()
                    .unwrap_or_default()
                    .is_empty(),
            };
            (hello, PageSet::full(pages))
        };
        if let Err(e) = wire::write(&mut writer, &Frame::Hello(hello)).await {
            return Outcome::Failed(write_error(e));
        }
        let mut trigger = {
            let mut m = lock(&self.shared);
            m.migration.ram.dirty_sync_count = 1;
            if m.migration_events() {
                m.emit("MIGRATION_PASS", Some(json!({"pass": 1})));
            }
            m.migration.setup_time_ms = m
                .migration
                .started
                .map_or(0, |s| s.elapsed().as_millis() as u64);
            set_status(&mut m, MigrationStatus::Active);
            Trigger {
                last_check: Instant::now(),
                dirtied: 0,
                sent_at_check: 0,
                high_periods: 0,
            }
        };
        let mut last_sync = Instant::now();
        let mut scan = 0usize;
        let mut window = tokio::time::interval(WINDOW);
        window.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = window.tick() => {}
                order = control.recv() => match order {
                    Some(Control::Cancel) | None => return Outcome::Cancelled,
                    Some(Control::StartPostcopy) => {
                        return self.postcopy(reader, writer, to_send, control).await;
                    }
                    Some(Control::Continue) => continue,
                },
            }
            let batch = {
                let mut m = lock(&self.shared);
                let budget = bandwidth(&m, "max-bandwidth") / 10;
                take_pages(&mut m, &mut to_send, &mut scan, budget, Phase::Precopy)
            };
            if !batch.is_empty() {
                if let Err(e) = wire::write(&mut writer, &Frame::Pages(batch)).await {
                    return Outcome::Failed(write_error(e));
                }
            }
            let converged = {
                let mut m = lock(&self.shared);
                let bw = bandwidth(&m, "max-bandwidth");
                let threshold = bw * m.migration.number("downtime-limit") / 1000;
                let mut remaining = to_send.count() as u64 * PAGE_SIZE;
                let mut converged = false;
                if remaining <= threshold {
                    sync(&mut m, &mut to_send, &mut trigger, last_sync);
                    last_sync = Instant::now();
                    remaining = to_send.count() as u64 * PAGE_SIZE;
                    converged = remaining <= threshold;
                }
                m.migration.ram.remaining = remaining;
                m.migration.expected_downtime_ms = remaining * 1000 / bw.max(1);
                converged
            };
            if converged {
                return self.switchover(reader, writer, to_send, control).await;
            }
        }
    }

    async fn switchover(
        &mut self,
        mut reader: Reader,
        mut writer: Writer,
        mut to_send: PageSet,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Outcome {
        let stopped_at = Instant::now();
        let pause = {
            let mut m = lock(&self.shared);
            self.stopped_running = m.run_state == RunState::Running;
            m.stop(RunState::FinishMigrate);
            let pause = m.migration.capability("pause-before-switchover");
            if pause {
                set_status(&mut m, MigrationStatus::PreSwitchover);
            }
            pause
        };
        if pause {
            match control.recv().await {
                Some(Control::Continue) => {
                    set_status(&mut lock(&self.shared), MigrationStatus::Device);
                }
                _ => return Outcome::Cancelled,
            }
        }
        let (batch, guest) = {
            let mut m = lock(&self.shared);
            if let Some(log) = m.ram.dirty_log.take() {
                to_send.union_with(&log);
            }
            let mut scan = 0;
            let batch = take_pages(&mut m, &mut to_send, &mut scan, u64::MAX, Phase::Downtime);
            (batch, m.guest.clone())
        };
        let cost = batch.len() as u64 * NORMAL_PAGE_BYTES;
        tokio::time::sleep(Duration::from_secs_f64(
            cost as f64 / LINK_BYTES_PER_SEC as f64,
        ))
        .await;
        let frames = [Frame::Pages(batch)]
            .into_iter()
            .chain(guest.map(|g| Frame::Device(Box::new(g))))
            .chain([Frame::End]);
        for frame in frames {
            if let Err(e) = wire::write(&mut writer, &frame).await {
                return Outcome::Failed(write_error(e));
            }
        }
        if let Err(e) = tokio::io::AsyncWriteExt::flush(&mut writer).await {
            return Outcome::Failed(format!("Unable to write to socket: {e}"));
        }
        match tokio::time::timeout(ACK_TIMEOUT, wire::read(&mut reader)).await {
            Ok(Ok(Frame::Ack)) => {
                lock(&self.shared).migration.downtime_ms =
                    Some(stopped_at.elapsed().as_millis() as u64);
                Outcome::Completed
            }
            Ok(Ok(other)) => {
                Outcome::Failed(format!("unexpected reply from the destination: {other:?}"))
            }
            Ok(Err(e)) => {
                Outcome::Failed(format!("the destination did not load the migration: {e}"))
            }
            Err(_) => Outcome::Failed("the destination did not acknowledge the migration".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_qemus() {
        assert_eq!(
            Target::parse("tcp:127.0.0.1:4444").unwrap(),
            Target::Tcp("127.0.0.1:4444".into())
        );
        assert!(Target::parse("exec:cat").is_err());
    }
}
