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

use super::wire::{self, Frame, Hello};
use super::{Control, RamCounters};
use crate::machine::{lock, Machine, RunState, Shared};
use crate::ram::{PageSet, PAGE_SIZE};

/// The link's speed when `max-bandwidth` is higher: what QEMU reaches on
/// loopback here, about.
pub const LINK_BYTES_PER_SEC: u64 = 1 << 30;
/// QEMU's rate-limiting window.
const WINDOW: Duration = Duration::from_millis(100);
/// Bytes a page whose content is sent costs on the link (page and header).
const NORMAL_PAGE_BYTES: u64 = PAGE_SIZE + 8;
/// Bytes a zero page costs (header and one byte).
const ZERO_PAGE_BYTES: u64 = 9;
/// How long the source waits for the destination's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

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
enum Outcome {
    Completed,
    Cancelled,
    Failed(String),
    PostcopyPaused,
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = BufWriter<Box<dyn AsyncWrite + Send + Unpin>>;

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

/// QEMU's auto-converge state between syncs.
struct Trigger {
    last_check: Instant,
    dirtied: u64,
    sent_at_check: u64,
    high_periods: u32,
}

struct Job {
    shared: Shared,
    /// The migration stopped a running guest: it runs again if it fails.
    stopped_running: bool,
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
            Ok(Err(e)) => Outcome::Failed(format!(
                "Detected IO failure for postcopy. Migration paused: {e}"
            )),
            Err(_) => Outcome::Failed("the destination did not acknowledge the migration".into()),
        }
    }

    async fn postcopy(
        &mut self,
        mut reader: Reader,
        mut writer: Writer,
        mut to_send: PageSet,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Outcome {
        let (words, guest) = {
            let mut m = lock(&self.shared);
            set_status(&mut m, MigrationStatus::PostcopyActive);
            self.stopped_running = m.run_state == RunState::Running;
            m.stop(RunState::FinishMigrate);
            if let Some(log) = m.ram.dirty_log.take() {
                to_send.union_with(&log);
            }
            (page_words(&to_send), m.guest.clone())
        };
        // From here on the destination runs the guest: the source never does
        // again, whatever happens to the stream.
        self.stopped_running = false;
        let mut frames = vec![Frame::Postcopy(words)];
        frames.extend(guest.map(|g| Frame::Device(Box::new(g))));
        for frame in &frames {
            if wire::write(&mut writer, frame).await.is_err() {
                return Outcome::PostcopyPaused;
            }
        }
        let mut scan = 0;
        let mut window = tokio::time::interval(WINDOW);
        while !to_send.is_empty() {
            tokio::select! {
                _ = window.tick() => {}
                order = control.recv() => if order.is_none() { return Outcome::PostcopyPaused },
            }
            let batch = {
                let mut m = lock(&self.shared);
                let budget = bandwidth(&m, "max-postcopy-bandwidth") / 10;
                let batch = take_pages(&mut m, &mut to_send, &mut scan, budget, Phase::Postcopy);
                m.migration.ram.remaining = to_send.count() as u64 * PAGE_SIZE;
                batch
            };
            if wire::write(&mut writer, &Frame::Pages(batch))
                .await
                .is_err()
            {
                return Outcome::PostcopyPaused;
            }
        }
        if wire::write(&mut writer, &Frame::End).await.is_err()
            || tokio::io::AsyncWriteExt::flush(&mut writer).await.is_err()
        {
            return Outcome::PostcopyPaused;
        }
        match tokio::time::timeout(ACK_TIMEOUT, wire::read(&mut reader)).await {
            Ok(Ok(Frame::Ack)) => {
                lock(&self.shared).migration.downtime_ms = Some(0);
                Outcome::Completed
            }
            _ => Outcome::PostcopyPaused,
        }
    }
}

/// Which counter the bytes go to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Precopy,
    Downtime,
    Postcopy,
}

/// The pace: a `max-bandwidth`-like parameter, capped by the link (and 0,
/// "no limit" for post-copy, is the link).
fn bandwidth(m: &Machine, parameter: &str) -> u64 {
    match m.migration.number(parameter) {
        0 => LINK_BYTES_PER_SEC,
        bw => bw.min(LINK_BYTES_PER_SEC),
    }
}

/// Takes up to `budget` bytes' worth of pages from `to_send`, from `scan`
/// on, counting them.
fn take_pages(
    m: &mut Machine,
    to_send: &mut PageSet,
    scan: &mut usize,
    budget: u64,
    phase: Phase,
) -> Vec<(u32, u64)> {
    let mut batch = Vec::new();
    let mut cost = 0u64;
    let mut normal = 0u64;
    while cost < budget {
        let Some(page) = to_send.next_from(*scan) else {
            break;
        };
        to_send.remove(page);
        *scan = page + 1;
        let value = m.ram.pages[page];
        if value == 0 {
            cost += ZERO_PAGE_BYTES;
            m.migration.ram.duplicate += 1;
        } else {
            cost += NORMAL_PAGE_BYTES;
            normal += 1;
        }
        batch.push((page as u32, value));
    }
    let ram = &mut m.migration.ram;
    ram.normal += normal;
    ram.transferred += cost;
    match phase {
        Phase::Precopy => ram.precopy_bytes += cost,
        Phase::Downtime => ram.downtime_bytes += cost,
        Phase::Postcopy => ram.postcopy_bytes += cost,
    }
    if phase != Phase::Downtime {
        let secs = WINDOW.as_secs_f64();
        ram.mbps = cost as f64 * 8.0 / 1e6 / secs;
        ram.pages_per_second = (batch.len() as f64 / secs) as u64;
    }
    batch
}

/// A dirty-bitmap sync: what the guest wrote since the last one joins the
/// pages to send; QEMU's auto-converge looks at the period.
fn sync(m: &mut Machine, to_send: &mut PageSet, trigger: &mut Trigger, last_sync: Instant) {
    let newly = m
        .ram
        .dirty_log
        .as_mut()
        .map(PageSet::take)
        .unwrap_or_default();
    let dirtied = newly.count() as u64;
    to_send.union_with(&newly);
    let ram = &mut m.migration.ram;
    ram.dirty_sync_count += 1;
    let secs = last_sync.elapsed().as_secs_f64().max(1e-3);
    ram.dirty_pages_rate = (dirtied as f64 / secs) as u64;
    let pass = ram.dirty_sync_count;
    if m.migration_events() {
        m.emit("MIGRATION_PASS", Some(json!({"pass": pass})));
    }
    trigger.dirtied += dirtied * PAGE_SIZE;
    if trigger.last_check.elapsed() < Duration::from_secs(1) {
        return;
    }
    let mig = &mut m.migration;
    let sent = mig.ram.transferred - trigger.sent_at_check;
    let high = trigger.dirtied > sent * mig.number("throttle-trigger-threshold") / 100;
    trigger.last_check = Instant::now();
    trigger.dirtied = 0;
    trigger.sent_at_check = mig.ram.transferred;
    if mig.capability("auto-converge") && high {
        trigger.high_periods += 1;
        if trigger.high_periods >= 2 {
            trigger.high_periods = 0;
            let max = mig.number("max-cpu-throttle");
            mig.throttle_pct = if mig.throttle_pct == 0 {
                mig.number("cpu-throttle-initial")
            } else {
                (mig.throttle_pct + mig.number("cpu-throttle-increment")).min(max)
            };
        }
    }
}

fn page_words(set: &PageSet) -> Vec<u64> {
    let mut words = vec![0u64; set.len().div_ceil(64)];
    let mut page = set.next_from(0);
    let mut seen = 0;
    while let Some(p) = page {
        words[p / 64] |= 1 << (p % 64);
        seen += 1;
        if seen == set.count() {
            break;
        }
        page = set.next_from(p + 1);
    }
    words
}

/// The pages a [`Frame::Postcopy`] names.
pub fn pages_of(words: &[u64], len: usize) -> PageSet {
    let mut set = PageSet::new(len);
    for (i, word) in words.iter().enumerate() {
        for bit in 0..64 {
            if word & (1 << bit) != 0 && i * 64 + bit < len {
                set.insert(i * 64 + bit);
            }
        }
    }
    set
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

    #[test]
    fn a_postcopy_set_survives_as_words() {
        let mut set = PageSet::new(130);
        for p in [0, 63, 64, 129] {
            set.insert(p);
        }
        assert_eq!(pages_of(&page_words(&set), 130), set);
    }
}
