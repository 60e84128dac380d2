//! The workload of livemig's Linux test guest, started by the initramfs's
//! `/init`. It reads its settings from the kernel command line and reports
//! on stdout (the serial console) in the bare-metal guest's format, so the
//! same parser reads both:
//!
//! - memory: sweeps a working set, checking that every page still holds
//!   what it last wrote (`progress` and `CORRUPT` lines);
//! - disk: writes checksummed blocks to a block device at a set rate and
//!   reads each back before rewriting it, bypassing the page cache
//!   (`disk` lines, `CORRUPT disk` on a mismatch);
//! - network: a TCP counter on a port: every line a client sends is
//!   answered with the next number of one counter, so a client sees a
//!   gap or a reset if the guest lost its state;
//! - spinners: with `spinners=N`, threads that only compute, pinned to
//!   vCPUs 1..=N while the memory sweep is pinned to vCPU 0 (`spinner`
//!   lines with their loop counts).

mod counter;
mod disk;
mod memory;
mod report;
mod settings;
mod spinner;

use std::time::{Duration, Instant};

use settings::Settings;

fn main() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let settings = Settings::parse(&cmdline);
    let started = Instant::now();
    report::line(&format!(
        "start wss_mib={} pages={} spin={} tsc_khz=0",
        settings.wss_mib,
        settings.wss_mib * 256,
        settings.spin
    ));
    if let Some(port) = settings.port {
        match counter::serve(port) {
            Ok(()) => report::line(&format!("net listening port={port}")),
            Err(e) => report::line(&format!("error net port {port}: {e}")),
        }
    }
    if let Some(device) = settings.disk.clone() {
        let blocks = settings.disk_blocks;
        let rate = settings.disk_kib_s;
        let report_every = Duration::from_millis(settings.report_ms);
        std::thread::spawn(move || {
            if let Err(e) = disk::run(&device, blocks, rate, report_every, started) {
                report::line(&format!("error disk {device}: {e}"));
            }
        });
    }
    if settings.spinners > 0 {
        if !spinner::pin_to(0) {
            report::line("error memory: cannot pin to cpu 0");
        }
        spinner::start(
            settings.spinners,
            Duration::from_millis(settings.report_ms),
            started,
        );
    }
    memory::run(&settings, started);
}
