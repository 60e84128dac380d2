//! The workload's settings, from the kernel command line: the bare-metal
//! guest's `wss= spin= report=`, plus `fill= disk= disk_blocks= disk_kib_s=
//! port= spinners=`.

/// What the working set's pages hold besides the sweep's stamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fill {
    /// Zeros.
    #[default]
    Zero,
    /// Words of English-like text: compresses as text does.
    Text,
    /// Pseudo-random bytes: does not compress.
    Random,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Working set, MiB; 0: touch one page a hundred times a second.
    pub wss_mib: u64,
    /// Busy-loop iterations after each page write.
    pub spin: u64,
    /// What the pages hold.
    pub fill: Fill,
    /// Interval between progress lines, ms.
    pub report_ms: u64,
    /// The block device to write, if any.
    pub disk: Option<String>,
    /// How many 4 KiB blocks of it to cycle through.
    pub disk_blocks: u64,
    /// Write rate, KiB/s (0: as fast as it goes).
    pub disk_kib_s: u64,
    /// The TCP counter's port, if any.
    pub port: Option<u16>,
    /// Compute-only threads on vCPUs 1..=N (the sweep then on vCPU 0).
    pub spinners: u32,
}

impl Settings {
    /// Reads `key=value` words; unknown words (the kernel's own) are
    /// skipped, bad numbers fall back to the defaults.
    pub fn parse(cmdline: &str) -> Settings {
        let value = |key: &str| {
            cmdline
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        };
        let number =
            |key: &str, default: u64| value(key).and_then(|v| v.parse().ok()).unwrap_or(default);
        Settings {
            wss_mib: number("wss", 16),
            spin: number("spin", 20_000),
            fill: match value("fill") {
                Some("text") => Fill::Text,
                Some("random") => Fill::Random,
                _ => Fill::Zero,
            },
            report_ms: number("report", 500).max(50),
            disk: value("disk").map(str::to_string),
            disk_blocks: number("disk_blocks", 4096).max(1),
            disk_kib_s: number("disk_kib_s", 1024),
            port: value("port").and_then(|v| v.parse().ok()),
            spinners: number("spinners", 0) as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_words_among_the_kernels() {
        let s = Settings::parse(
            "console=ttyS0 quiet wss=8 spin=100 report=250 disk=/dev/vda disk_kib_s=64 port=7000 \
             spinners=3",
        );
        assert_eq!(s.wss_mib, 8);
        assert_eq!(s.spin, 100);
        assert_eq!(s.report_ms, 250);
        assert_eq!(s.disk.as_deref(), Some("/dev/vda"));
        assert_eq!(s.disk_blocks, 4096);
        assert_eq!(s.disk_kib_s, 64);
        assert_eq!(s.port, Some(7000));
        assert_eq!(s.spinners, 3);
        assert_eq!(s.fill, Fill::Zero);
        assert_eq!(Settings::parse("fill=text").fill, Fill::Text);
        assert_eq!(Settings::parse("fill=random").fill, Fill::Random);
    }

    #[test]
    fn defaults_without_words() {
        let s = Settings::parse("console=ttyS0");
        assert_eq!(s.disk, None);
        assert_eq!(s.port, None);
        assert_eq!(s.wss_mib, 16);
        assert_eq!(s.spinners, 0);
    }
}
