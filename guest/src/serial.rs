//! Parsing what the guest prints on its serial port.
//!
//! A destination QEMU writes a fresh log, so a log may hold progress lines
//! without the start line; partial last lines (still being written) are
//! ignored.

use std::io;
use std::path::Path;

const PREFIX: &str = "livemig-guest: ";

/// The guest's start line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// Working set, MiB.
    pub working_set_mib: u64,
    /// Pages in it.
    pub pages: u64,
    /// Busy-loop iterations per write.
    pub spin: u64,
    /// The TSC's rate, kHz.
    pub tsc_khz: u64,
}

/// One progress line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Guest time since start (the TSC, which stops while the VM is paused).
    pub t_ms: u64,
    /// Completed sweeps over the working set, plus one.
    pub pass: u64,
    /// Loop iterations so far: the guest's unit of work.
    pub writes: u64,
    /// Corruptions detected so far.
    pub errors: u64,
}

/// One `disk` line of the Linux guest's disk workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskProgress {
    /// Time since the workload started.
    pub t_ms: u64,
    /// Blocks written.
    pub writes: u64,
    /// Blocks read back and found as written.
    pub verified: u64,
    /// Blocks read back wrong.
    pub errors: u64,
}

/// One `spinner` line: a compute-only thread pinned to one vCPU (the
/// Linux guest's `spinners=N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpinnerProgress {
    /// The vCPU it is pinned to.
    pub cpu: u32,
    /// Time since the workload started.
    pub t_ms: u64,
    /// Loops so far.
    pub loops: u64,
}

/// A `CORRUPT` line, verbatim after the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption(pub String);

/// Everything a serial log says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SerialLog {
    /// The start line.
    pub start: Option<Start>,
    /// Every progress line.
    pub progress: Vec<Progress>,
    /// Every corruption the guest reported (memory, or `CORRUPT disk`).
    pub corruptions: Vec<Corruption>,
    /// Every `disk` line (the Linux guest's disk workload).
    pub disk: Vec<DiskProgress>,
    /// `error ...` lines: the guest could not run its workload.
    pub errors: Vec<String>,
    /// Every `spinner` line.
    pub spinners: Vec<SpinnerProgress>,
}

impl SerialLog {
    /// Reads and parses a log file; a missing file is an empty log.
    ///
    /// # Errors
    /// Any I/O error other than the file not existing.
    pub fn read(path: &Path) -> io::Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Self::parse(&String::from_utf8_lossy(&bytes))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e),
        }
    }

    /// Parses complete lines; anything unrecognised is skipped.
    pub fn parse(text: &str) -> Self {
        let mut log = SerialLog::default();
        let complete = match text.rfind('\n') {
            Some(end) => &text[..end],
            None => "",
        };
        for line in complete.lines() {
            let Some(rest) = line.trim_end_matches('\r').strip_prefix(PREFIX) else {
                continue;
            };
            if let Some(fields) = rest.strip_prefix("progress ") {
                if let Some(p) = parse_progress(fields) {
                    log.progress.push(p);
                }
            } else if let Some(fields) = rest.strip_prefix("disk ") {
                if let Some(d) = parse_disk(fields) {
                    log.disk.push(d);
                }
            } else if let Some(fields) = rest.strip_prefix("spinner ") {
                if let Some(p) = parse_spinner(fields) {
                    log.spinners.push(p);
                }
            } else if let Some(fields) = rest.strip_prefix("start ") {
                log.start = parse_start(fields);
            } else if rest.starts_with("CORRUPT") {
                log.corruptions.push(Corruption(rest.to_string()));
            } else if let Some(message) = rest.strip_prefix("error ") {
                log.errors.push(message.to_string());
            }
        }
        log
    }

    /// The most recent progress line.
    pub fn last_progress(&self) -> Option<Progress> {
        self.progress.last().copied()
    }

    /// True when the disk workload found every block as it wrote it.
    pub fn disk_intact(&self) -> bool {
        !self
            .corruptions
            .iter()
            .any(|c| c.0.starts_with("CORRUPT disk"))
            && self.disk.iter().all(|d| d.errors == 0)
    }

    /// The vCPUs that have spinners, in order.
    pub fn spinner_cpus(&self) -> Vec<u32> {
        let mut cpus: Vec<u32> = self.spinners.iter().map(|s| s.cpu).collect();
        cpus.sort_unstable();
        cpus.dedup();
        cpus
    }

    /// The last `spinner` line of vCPU `cpu` at or before `t_ms` (guest
    /// time), or its first line if none is that early.
    pub fn spinner_at(&self, cpu: u32, t_ms: u64) -> Option<SpinnerProgress> {
        let mut lines = self.spinners.iter().filter(|s| s.cpu == cpu);
        let first = *lines.clone().next()?;
        Some(lines.rfind(|s| s.t_ms <= t_ms).copied().unwrap_or(first))
    }

    /// Spinner `cpu`'s loops per second (guest time) over the `window_ms`
    /// up to this log's last line of it, and from that line to the last
    /// line of it in `later` (the same log read again, e.g. after a
    /// migration): its speed before and since.
    pub fn spinner_speeds(
        &self,
        later: &SerialLog,
        cpu: u32,
        window_ms: u64,
    ) -> Option<(f64, f64)> {
        let start = self.last_spinner(cpu)?;
        let earlier = self.spinner_at(cpu, start.t_ms.saturating_sub(window_ms))?;
        Some((
            spinner_rate(earlier, start)?,
            spinner_rate(start, later.last_spinner(cpu)?)?,
        ))
    }

    /// The most recent `spinner` line of vCPU `cpu`.
    pub fn last_spinner(&self, cpu: u32) -> Option<SpinnerProgress> {
        self.spinners.iter().rfind(|s| s.cpu == cpu).copied()
    }

    /// The most recent `disk` line.
    pub fn last_disk(&self) -> Option<DiskProgress> {
        self.disk.last().copied()
    }

    /// True when the guest reported no corruption at all.
    pub fn memory_intact(&self) -> bool {
        self.corruptions.is_empty() && self.progress.iter().all(|p| p.errors == 0)
    }
}

fn field(fields: &str, key: &str) -> Option<u64> {
    fields.split_whitespace().find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

fn parse_progress(fields: &str) -> Option<Progress> {
    Some(Progress {
        t_ms: field(fields, "t_ms")?,
        pass: field(fields, "pass")?,
        writes: field(fields, "writes")?,
        errors: field(fields, "errors")?,
    })
}

fn parse_disk(fields: &str) -> Option<DiskProgress> {
    Some(DiskProgress {
        t_ms: field(fields, "t_ms")?,
        writes: field(fields, "writes")?,
        verified: field(fields, "verified")?,
        errors: field(fields, "errors")?,
    })
}

fn parse_spinner(fields: &str) -> Option<SpinnerProgress> {
    Some(SpinnerProgress {
        cpu: field(fields, "cpu")? as u32,
        t_ms: field(fields, "t_ms")?,
        loops: field(fields, "loops")?,
    })
}

/// Loops per second of guest time from `a` to `b` (the same spinner).
pub fn spinner_rate(a: SpinnerProgress, b: SpinnerProgress) -> Option<f64> {
    (b.t_ms > a.t_ms)
        .then(|| (b.loops - a.loops.min(b.loops)) as f64 / ((b.t_ms - a.t_ms) as f64 / 1000.0))
}

fn parse_start(fields: &str) -> Option<Start> {
    Some(Start {
        working_set_mib: field(fields, "wss_mib")?,
        pages: field(fields, "pages")?,
        spin: field(fields, "spin")?,
        tsc_khz: field(fields, "tsc_khz")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
livemig-guest: start wss_mib=64 pages=16384 spin=0 tsc_khz=2599422
livemig-guest: progress t_ms=500 pass=205 writes=3358464 errors=0
livemig-guest: CORRUPT hot expected=0x000c7c3e found=0x00028d4c
livemig-guest: progress t_ms=1000 pass=512 writes=8378112 errors=1
livemig-guest: progress t_ms=15";

    #[test]
    fn parses_start_progress_and_corruption() {
        let log = SerialLog::parse(SAMPLE);
        assert_eq!(log.start.unwrap().pages, 16384);
        assert_eq!(
            log.progress.len(),
            2,
            "the partial last line is not a line yet"
        );
        assert_eq!(log.last_progress().unwrap().writes, 8_378_112);
        assert_eq!(log.corruptions.len(), 1);
        assert!(!log.memory_intact());
    }

    #[test]
    fn spinner_lines_give_each_vcpus_speed() {
        let log = SerialLog::parse(
            "livemig-guest: spinner cpu=1 t_ms=500 loops=1000\n\
             livemig-guest: spinner cpu=2 t_ms=510 loops=900\n\
             livemig-guest: spinner cpu=1 t_ms=1000 loops=3000\n\
             livemig-guest: spinner cpu=1 t_ms=1500 loops=4000\n",
        );
        assert_eq!(log.spinner_cpus(), [1, 2]);
        let a = log.spinner_at(1, 999).unwrap();
        assert_eq!(a.loops, 1000);
        let b = log.last_spinner(1).unwrap();
        assert_eq!(spinner_rate(a, b), Some(3000.0));
        assert_eq!(log.spinner_at(2, 0).unwrap().loops, 900, "first line");
        assert_eq!(spinner_rate(b, b), None);
        // 1000 loops/s over the second before t=1000, 2000/s since.
        let earlier = SerialLog::parse(
            "livemig-guest: spinner cpu=1 t_ms=0 loops=0\n\
             livemig-guest: spinner cpu=1 t_ms=1000 loops=1000\n",
        );
        let later = SerialLog::parse(&format!(
            "{}livemig-guest: spinner cpu=1 t_ms=2000 loops=3000\n",
            "livemig-guest: spinner cpu=1 t_ms=1000 loops=1000\n"
        ));
        assert_eq!(
            earlier.spinner_speeds(&later, 1, 1000),
            Some((1000.0, 2000.0))
        );
    }

    #[test]
    fn disk_lines_and_disk_corruption_are_read() {
        let log = SerialLog::parse(
            "livemig-guest: disk t_ms=500 writes=40 verified=8 errors=0\n\
             livemig-guest: CORRUPT disk block=3 payload checksum\n\
             livemig-guest: disk t_ms=1000 writes=80 verified=47 errors=1\n",
        );
        assert_eq!(log.last_disk().unwrap().verified, 47);
        assert!(!log.disk_intact());
        let clean = SerialLog::parse("livemig-guest: disk t_ms=5 writes=4 verified=0 errors=0\n");
        assert!(clean.disk_intact());
    }

    #[test]
    fn a_clean_log_is_intact() {
        let log = SerialLog::parse("livemig-guest: progress t_ms=1 pass=1 writes=2 errors=0\n");
        assert!(log.memory_intact());
    }

    #[test]
    fn an_error_count_alone_marks_memory_as_not_intact() {
        let log = SerialLog::parse("livemig-guest: progress t_ms=1 pass=1 writes=2 errors=3\n");
        assert!(!log.memory_intact());
    }

    #[test]
    fn guest_errors_are_collected() {
        let log = SerialLog::parse("livemig-guest: error working set does not fit in RAM\nnoise\n");
        assert_eq!(
            log.errors,
            vec!["working set does not fit in RAM".to_string()]
        );
    }
}
