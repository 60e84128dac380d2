//! The simulated guest: the in-tree test kernel's workload, modelled.
//!
//! It reads the test kernel's command line (`wss=MiB spin=N report=MS`) and
//! does what that kernel does: sweeps its working set page by page, checks
//! that each page still holds what it wrote there on the previous sweep,
//! writes the new value, and prints the kernel's own lines on the serial
//! port (`livemig-guest: start ...`, `progress ...`, `CORRUPT ...`), so the
//! test harness reads a simulated guest's log with the parser it uses for
//! the real one.
//!
//! Its speed is a model, not a measurement: one page write takes
//! [`WRITE_NS`] plus [`SPIN_NS`] per spin iteration, close to what the
//! kernel does under TCG here. `rate=MiB/s` on the command line (which the
//! real kernel ignores) sets the speed outright. Throttling (QEMU's
//! `cpu-throttle-percentage`) takes the same share of its work away as it
//! takes CPU time from a real vCPU; its clock (`t_ms`) runs whenever the
//! vCPUs do, throttled or not, and stops while the VM is paused, like the
//! kernel's TSC.

use serde::{Deserialize, Serialize};

use crate::ram::{PageSet, Ram, PAGE_SIZE};

/// Nanoseconds per page write with `spin=0`.
pub const WRITE_NS: f64 = 14_100.0;
/// Nanoseconds per spin iteration: the tests' workloads measured under TCG
/// here (spin 20000: ~50 MiB/s, 250000: ~4 MiB/s, 600000: ~1.5 MiB/s).
pub const SPIN_NS: f64 = 4.0;

/// What the guest's command line asks of it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// Pages it sweeps; an idle guest touches one.
    pub pages: usize,
    /// Working set as the command line gave it, MiB (0: idle).
    pub working_set_mib: u64,
    /// Spin iterations per write.
    pub spin: u64,
    /// Bytes it writes per second of vCPU time.
    pub rate: f64,
    /// Guest milliseconds between progress lines.
    pub report_ms: u64,
}

impl Workload {
    /// Reads the test kernel's command line for a guest of `ram_pages`.
    pub fn from_cmdline(cmdline: &str, ram_pages: usize) -> Workload {
        let field = |key: &str| {
            cmdline.split_whitespace().find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == key).then(|| v.parse::<u64>().ok()).flatten()
            })
        };
        let working_set_mib = field("wss").unwrap_or(0);
        let spin = field("spin").unwrap_or(0);
        let report_ms = field("report").unwrap_or(500).max(10);
        let wss_pages = (working_set_mib << 20) / PAGE_SIZE;
        let (pages, rate) = if working_set_mib == 0 {
            // The idle kernel touches one page a hundred times a second.
            (1, 100.0 * PAGE_SIZE as f64)
        } else {
            let per_write_ns = WRITE_NS + SPIN_NS * spin as f64;
            let rate = match field("rate") {
                Some(mib) => (mib << 20) as f64,
                None => PAGE_SIZE as f64 * 1e9 / per_write_ns,
            };
            (wss_pages as usize, rate)
        };
        Workload {
            pages: pages.clamp(1, ram_pages.max(1)),
            working_set_mib,
            spin,
            rate,
            report_ms,
        }
    }
}

/// The guest's own state: what a migration carries as its device state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Guest {
    /// What it does.
    pub workload: Workload,
    /// Sweeps completed, plus one.
    pub pass: u64,
    /// The next page it writes.
    pub cursor: usize,
    /// Pages written so far.
    pub writes: u64,
    /// Corruptions found so far.
    pub errors: u64,
    /// Its clock, milliseconds.
    pub t_ms: f64,
    /// When it prints its next progress line.
    pub next_report_ms: u64,
    /// Fraction of a page write owed from the last tick.
    pub carry: f64,
    /// Mixed into every value, so two guests never write the same words.
    pub seed: u64,
}

/// What a guest wrote to `page` on sweep `pass` (never 0 for a written
/// page: pass counts from 1).
pub fn value(seed: u64, pass: u64, page: usize) -> u64 {
    (pass << 32) | ((page as u64) ^ (seed & 0xffff_ffff))
}

impl Guest {
    /// A guest that has just booted.
    pub fn boot(workload: Workload, seed: u64) -> Guest {
        Guest {
            workload,
            pass: 1,
            cursor: 0,
            writes: 0,
            errors: 0,
            t_ms: 0.0,
            next_report_ms: workload.report_ms,
            carry: 0.0,
            seed,
        }
    }

    /// The kernel's start line.
    pub fn start_line(&self) -> String {
        format!(
            "livemig-guest: start wss_mib={} pages={} spin={} tsc_khz=1000000\n",
            self.workload.working_set_mib, self.workload.pages, self.workload.spin
        )
    }

    /// Runs the vCPUs for `secs` with `throttle` (0 to 1) of their time
    /// taken away. Pages in `missing` have not arrived yet (post-copy): the
    /// guest waits at the first one it needs. Returns what it printed.
    pub fn run(
        &mut self,
        ram: &mut Ram,
        secs: f64,
        throttle: f64,
        missing: Option<&PageSet>,
    ) -> String {
        let mut out = String::new();
        self.t_ms += secs * 1000.0;
        self.carry +=
            secs * (1.0 - throttle).clamp(0.0, 1.0) * self.workload.rate / PAGE_SIZE as f64;
        let writes = self.carry.floor();
        self.carry -= writes;
        for _ in 0..writes as u64 {
            let page = self.cursor;
            if missing.is_some_and(|m| m.contains(page)) {
                // Waits for the page to arrive: the rest of the slice is lost.
                self.carry = 0.0;
                break;
            }
            let expected = if self.pass > 1 {
                value(self.seed, self.pass - 1, page)
            } else {
                0
            };
            let found = ram.pages[page];
            if found != expected {
                self.errors += 1;
                out.push_str(&format!(
                    "livemig-guest: CORRUPT page={page} expected={expected:#018x} found={found:#018x}\n"
                ));
            }
            ram.write(page, value(self.seed, self.pass, page));
            self.writes += 1;
            self.cursor += 1;
            if self.cursor == self.workload.pages {
                self.cursor = 0;
                self.pass += 1;
            }
        }
        while self.t_ms >= self.next_report_ms as f64 {
            out.push_str(&format!(
                "livemig-guest: progress t_ms={} pass={} writes={} errors={}\n",
                self.next_report_ms, self.pass, self.writes, self.errors
            ));
            self.next_report_ms += self.workload.report_ms;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy(mib: u64, rate_mib: u64) -> Workload {
        Workload::from_cmdline(
            &format!("wss={mib} spin=0 report=100 rate={rate_mib}"),
            1 << 20,
        )
    }

    #[test]
    fn the_kernels_command_line_sets_the_working_set_and_speed() {
        let w = Workload::from_cmdline("wss=64 spin=2000 report=500", 1 << 20);
        assert_eq!(w.pages, 16384);
        assert!(
            (w.rate / (1 << 20) as f64 - 177.0).abs() < 5.0,
            "{}",
            w.rate
        );
        let idle = Workload::from_cmdline("wss=0 spin=0 report=500", 1 << 20);
        assert_eq!(idle.pages, 1);
        assert_eq!(busy(1, 256).rate, (256u64 << 20) as f64);
    }

    #[test]
    fn a_sweep_checks_every_page_and_reports_progress() {
        let mut ram = Ram::new(4 << 20);
        let mut guest = Guest::boot(busy(1, 256), 7);
        // 256 MiB/s for 20 ms: 5.12 MiB, five sweeps of 1 MiB and a part.
        let out = guest.run(&mut ram, 0.02, 0.0, None);
        assert_eq!(guest.writes, 1310);
        assert_eq!(guest.pass, 6);
        assert_eq!(guest.errors, 0);
        assert_eq!(out.matches("progress").count(), 0);
        let out = guest.run(&mut ram, 0.1, 0.0, None);
        assert!(out.contains("progress t_ms=100 pass="), "{out}");
    }

    #[test]
    fn a_page_that_lost_a_write_is_reported_corrupt() {
        let mut ram = Ram::new(4 << 20);
        let mut guest = Guest::boot(busy(1, 256), 7);
        guest.run(&mut ram, 0.01, 0.0, None);
        ram.pages[3] = 0;
        let out = guest.run(&mut ram, 0.01, 0.0, None);
        assert_eq!(guest.errors, 1);
        assert!(out.contains("CORRUPT page=3"), "{out}");
    }

    #[test]
    fn a_throttled_guest_writes_less_and_a_missing_page_stalls_it() {
        let mut ram = Ram::new(4 << 20);
        let mut guest = Guest::boot(busy(1, 256), 7);
        guest.run(&mut ram, 0.01, 0.75, None);
        assert_eq!(guest.writes, 163);
        let mut missing = PageSet::new(ram.len());
        missing.insert(170);
        guest.run(&mut ram, 0.01, 0.0, Some(&missing));
        assert_eq!(guest.cursor, 170);
        assert!(guest.t_ms >= 20.0);
    }
}
