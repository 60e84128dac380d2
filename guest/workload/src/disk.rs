//! The disk workload: 4 KiB blocks, each holding its index, the generation
//! that wrote it and a checksum of its payload, cycled through in order.
//! Each block is read back (bypassing the page cache) and checked before
//! it is rewritten with the next generation, so every write the guest made
//! is checked once, on whichever host the guest then runs.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};

use crate::report;

const BLOCK: usize = 4096;
const MAGIC: u64 = 0x6c69_7665_6d69_6721; // "livemig!"
/// Linux's O_DIRECT on x86-64: reads come from the device, not the cache.
const O_DIRECT: i32 = 0o40000;

fn fill(block: &mut [u8], index: u64, generation: u64) {
    let mut x = index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation.rotate_left(17) ^ 1;
    for chunk in block[32..].chunks_exact_mut(8) {
        // xorshift: cheap, and different for every (block, generation).
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    let sum = checksum(&block[32..]);
    block[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    block[8..16].copy_from_slice(&index.to_le_bytes());
    block[16..24].copy_from_slice(&generation.to_le_bytes());
    block[24..32].copy_from_slice(&sum.to_le_bytes());
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn word(block: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(block[at..at + 8].try_into().expect("eight bytes"))
}

/// What a block read back says, against the generation last written.
fn check(block: &[u8], index: u64, generation: u64) -> Result<(), String> {
    let found = (word(block, 0), word(block, 8), word(block, 16));
    if found != (MAGIC, index, generation) {
        return Err(format!(
            "header magic={:#x} index={} generation={} (expected {index}/{generation})",
            found.0, found.1, found.2
        ));
    }
    if word(block, 24) != checksum(&block[32..]) {
        return Err("payload checksum".into());
    }
    Ok(())
}

/// Blocks read and written per request: a guest under TCG pays per request
/// (an exit to QEMU, an interrupt back), so one 64 KiB request moves about
/// as many bytes a second as sixteen of 4 KiB would if it were alone.
const BATCH: u64 = 16;

/// Writes and checks blocks until the process ends.
pub fn run(
    device: &str,
    blocks: u64,
    kib_s: u64,
    report_every: Duration,
    started: Instant,
) -> io::Result<()> {
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(O_DIRECT)
        .open(device)?;
    // O_DIRECT wants an aligned buffer: take the aligned part of a larger one.
    let mut raw = vec![0u8; (BATCH as usize + 1) * BLOCK];
    let offset = raw.as_ptr().align_offset(BLOCK);
    let buffer = &mut raw[offset..offset + BATCH as usize * BLOCK];
    let interval = if kib_s == 0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(4.0 / kib_s as f64)
    };
    let (mut generation, mut writes, mut verified, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let mut next_report = Instant::now() + report_every;
    let mut next_write = Instant::now();
    loop {
        let mut first = 0;
        while first < blocks {
            let count = BATCH.min(blocks - first);
            let batch = &mut buffer[..count as usize * BLOCK];
            let at = first * BLOCK as u64;
            if generation > 0 {
                file.read_exact_at(batch, at)?;
                for (index, block) in (first..).zip(batch.chunks_exact(BLOCK)) {
                    match check(block, index, generation - 1) {
                        Ok(()) => verified += 1,
                        Err(what) => {
                            errors += 1;
                            if errors <= 16 {
                                report::line(&format!("CORRUPT disk block={index} {what}"));
                            }
                        }
                    }
                }
            }
            for (index, block) in (first..).zip(batch.chunks_exact_mut(BLOCK)) {
                fill(block, index, generation);
            }
            file.write_all_at(batch, at)?;
            writes += count;
            first += count;
            let now = Instant::now();
            if now >= next_report {
                next_report = now + report_every;
                report::line(&format!(
                    "disk t_ms={} writes={writes} verified={verified} errors={errors}",
                    started.elapsed().as_millis()
                ));
            }
            next_write += interval * count as u32;
            if let Some(wait) = next_write.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            } else {
                next_write = Instant::now();
            }
        }
        generation += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_checks_against_its_own_generation_only() {
        let mut block = vec![0u8; BLOCK];
        fill(&mut block, 7, 3);
        assert!(check(&block, 7, 3).is_ok());
        assert!(check(&block, 7, 2).is_err());
        assert!(check(&block, 8, 3).is_err());
        block[100] ^= 1;
        assert_eq!(check(&block, 7, 3), Err("payload checksum".into()));
    }
}
