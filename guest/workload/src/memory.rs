//! The memory workload: the bare-metal guest's sweep, in a process. Each
//! page holds a word derived from its index and the pass that wrote it; a
//! sweep checks the word before writing the next pass's.

use std::hint::black_box;
use std::time::{Duration, Instant};

use crate::report;
use crate::settings::{Fill, Settings};

const PAGE_WORDS: usize = 4096 / 8;

/// Words text is made of: a page of them compresses about as prose does.
const VOCABULARY: [&str; 32] = [
    "the",
    "guest",
    "memory",
    "page",
    "is",
    "copied",
    "while",
    "it",
    "keeps",
    "running",
    "on",
    "source",
    "host",
    "and",
    "migration",
    "converges",
    "when",
    "dirty",
    "rate",
    "falls",
    "below",
    "link",
    "bandwidth",
    "of",
    "a",
    "busy",
    "virtual",
    "machine",
    "writes",
    "data",
    "every",
    "second",
];

/// xorshift64: cheap, and the same sequence on every run.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Fills the pages as `fill` says (the stamps are written after).
fn fill(memory: &mut [u64], fill: Fill) {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    match fill {
        Fill::Zero => {}
        Fill::Random => memory.iter_mut().for_each(|w| *w = next(&mut state)),
        Fill::Text => {
            for page in memory.chunks_mut(PAGE_WORDS) {
                let mut text = Vec::with_capacity(PAGE_WORDS * 8 + 16);
                while text.len() < PAGE_WORDS * 8 {
                    let word = VOCABULARY[(next(&mut state) % VOCABULARY.len() as u64) as usize];
                    text.extend_from_slice(word.as_bytes());
                    text.push(b' ');
                }
                for (w, bytes) in page.iter_mut().zip(text.chunks_exact(8)) {
                    *w = u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
                }
            }
        }
    }
}

fn stamp(page: usize, pass: u64) -> u64 {
    (page as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ pass.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
}

/// Sweeps forever, reporting every `report_ms`.
pub fn run(settings: &Settings, started: Instant) -> ! {
    let pages = (settings.wss_mib as usize * 256).max(1);
    let idle = settings.wss_mib == 0;
    let mut memory = vec![0u64; pages * PAGE_WORDS];
    fill(&mut memory, settings.fill);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_pages_are_words_and_random_ones_are_not_repeated() {
        let mut text = vec![0u64; 2 * PAGE_WORDS];
        fill(&mut text, Fill::Text);
        let bytes: Vec<u8> = text.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert!(bytes.iter().all(|b| b.is_ascii_lowercase() || *b == b' '));
        assert_ne!(text[..PAGE_WORDS], text[PAGE_WORDS..], "pages differ");
        let mut random = vec![0u64; 2 * PAGE_WORDS];
        fill(&mut random, Fill::Random);
        let mut distinct = random.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), random.len());
    }
}
