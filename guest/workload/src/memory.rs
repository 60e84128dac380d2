//! The memory workload: the bare-metal guest's sweep, in a process. Each
//! page holds a word derived from its index and the pass that wrote it; a
//! sweep checks the word before writing the next pass's.

use std::hint::black_box;
use std::time::{Duration, Instant};

use crate::report;
use crate::settings::Settings;

const PAGE_WORDS: usize = 4096 / 8;

fn stamp(page: usize, pass: u64) -> u64 {
    (page as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ pass.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
}

/// Sweeps forever, reporting every `report_ms`.
pub fn run(settings: &Settings, started: Instant) -> ! {
    let pages = (settings.wss_mib as usize * 256).max(1);
    let idle = settings.wss_mib == 0;
    let mut memory = vec![0u64; pages * PAGE_WORDS];
    for page in 0..pages {
        memory[page * PAGE_WORDS] = stamp(page, 0);
        memory[page * PAGE_WORDS + PAGE_WORDS / 2] = !stamp(page, 0);
    }
    let report_every = Duration::from_millis(settings.report_ms);
    let mut next_report = Instant::now() + report_every;
    let mut pass: u64 = 1;
    let mut writes: u64 = 0;
    let mut errors: u64 = 0;
    loop {
        for page in 0..pages {
            let first = page * PAGE_WORDS;
            let second = first + PAGE_WORDS / 2;
            let expected = stamp(page, pass - 1);
            if memory[first] != expected || memory[second] != !expected {
                errors += 1;
                if errors <= 16 {
                    report::line(&format!(
                        "CORRUPT page={page} pass={pass} expected={expected:#018x} found={:#018x}/{:#018x}",
                        memory[first], !memory[second]
                    ));
                }
            }
            memory[first] = stamp(page, pass);
            memory[second] = !stamp(page, pass);
            writes += 1;
            for i in 0..settings.spin {
                black_box(i);
            }
            if idle {
                std::thread::sleep(Duration::from_millis(10));
            }
            let now = Instant::now();
            if now >= next_report {
                next_report = now + report_every;
                report::line(&format!(
                    "progress t_ms={} pass={pass} writes={writes} errors={errors}",
                    started.elapsed().as_millis()
                ));
            }
        }
        pass += 1;
    }
}
