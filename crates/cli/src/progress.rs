//! Showing a running migration.
//!
//! On a terminal: a progress bar (indicatif) with the phase, how far the
//! whole migration is (it never runs backwards: a new pass does not empty
//! the bar, see [`Completion`]), what is left, the transfer and dirty rates,
//! the throttle, the pass, the expected downtime and when the pass ends.
//! Otherwise: one plain line a second. With `--json`: one NDJSON event a
//! second (`progress`) and one per job action (`action`), on stdout, before
//! the record.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use protocol::job::{JobInfo, TimedAction};
use serde_json::json;

use crate::output;

use types::units::MIB_F64 as MIB;
const LINE_INTERVAL: Duration = Duration::from_secs(1);
/// The bar's resolution.
const BAR_STEPS: u64 = 1000;

enum Display {
    Bar(ProgressBar),
    Lines,
    Json,
}

/// How far a migration is, as a share that only grows: the bytes sent
/// over the bytes sent and still to send. A new pass finds pages dirtied
/// again, so what is left jumps up and the share of *this pass* falls back
/// (a bar at 96 % dropping to 58 %); the whole job's share is held at the
/// highest it reached instead, and the pass is shown beside it.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Completion {
    shown: f64,
}

impl Completion {
    /// The share to show after this poll, 0 to 1.
    pub fn next(&mut self, processed: Option<u64>, remaining: Option<u64>) -> f64 {
        if let (Some(done), Some(left)) = (processed, remaining) {
            let total = done.saturating_add(left);
            if total > 0 {
                self.shown = self.shown.max(done as f64 / total as f64);
            }
        }
        self.shown
    }
}

/// The progress display of one job.
pub struct Progress {
    display: Display,
    job_id: String,
    last_line: Option<Instant>,
    actions_seen: usize,
    completion: Completion,
}

impl Progress {
    /// A bar on a terminal, lines otherwise, NDJSON with `json`.
    pub fn new(job_id: &str, json: bool) -> Progress {
        let display = if json {
            Display::Json
        } else if std::io::stdout().is_terminal() {
            let bar = ProgressBar::new(BAR_STEPS);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {elapsed_precise} [{bar:28.cyan/blue}] {percent:>3}% {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            Display::Bar(bar)
        } else {
            Display::Lines
        };
        Progress {
            display,
            job_id: job_id.to_string(),
            last_line: None,
            actions_seen: 0,
            completion: Completion::default(),
        }
    }

    /// True when a person is watching (a prompt makes sense).
    pub fn interactive(&self) -> bool {
        matches!(self.display, Display::Bar(_))
    }

    /// Shows one poll of the job.
    pub fn update(&mut self, job: &JobInfo) {
        let new_actions = &job.actions[self.actions_seen.min(job.actions.len())..];
        let s = &job.stats;
        let done = self
            .completion
            .next(s.memory_processed_bytes, s.memory_remaining_bytes);
        match &self.display {
            Display::Bar(bar) => {
                bar.set_position((done * BAR_STEPS as f64).round() as u64);
                bar.set_message(summary(job));
                for a in new_actions {
                    bar.println(format!(
                        "  {:>7.1} s  {}",
                        a.t_ms as f64 / 1000.0,
                        describe(a)
                    ));
                }
            }
            Display::Lines => {
                if self.last_line.is_none_or(|t| t.elapsed() >= LINE_INTERVAL) {
                    self.last_line = Some(Instant::now());
                    println!("{}", output::progress_line(job, done));
                }
                for a in new_actions {
                    println!("Action: {:.1} s {}", a.t_ms as f64 / 1000.0, describe(a));
                }
            }
            Display::Json => {
                if self.last_line.is_none_or(|t| t.elapsed() >= LINE_INTERVAL) {
                    self.last_line = Some(Instant::now());
                    println!("{}", progress_event(&self.job_id, job));
                }
                for a in new_actions {
                    println!(
                        "{}",
                        json!({"event": "action", "job": self.job_id, "t_ms": a.t_ms,
                               "action": a.action, "value": a.value, "detail": a.detail})
                    );
                }
            }
        }
        self.actions_seen = job.actions.len();
    }

    /// Prints a line without tearing the bar.
    pub fn say(&self, text: &str) {
        match &self.display {
            Display::Bar(bar) => bar.println(text),
            Display::Lines => println!("{text}"),
            Display::Json => eprintln!("{text}"),
        }
    }

    /// Hides the bar (to ask a question, or at the end).
    pub fn suspend<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.display {
            Display::Bar(bar) => bar.suspend(f),
            _ => f(),
        }
    }

    pub fn finish(&self) {
        if let Display::Bar(bar) = &self.display {
            bar.finish_and_clear();
        }
    }
}

/// One controller action, as the bar and the plain lines show it.
fn describe(a: &TimedAction) -> String {
    let value = a.value.map(|v| format!(" {v:.1}")).unwrap_or_default();
    format!("{}{value}: {}", a.action, a.detail)
}

/// The bar's message.
fn summary(job: &JobInfo) -> String {
    let s = &job.stats;
    let remaining = s.memory_remaining_bytes.unwrap_or(0) as f64 / MIB;
    let rate = s.bandwidth_mib_s.unwrap_or(0.0);
    let dirty = s
        .dirty_rate_pages_s
        .zip(s.page_size)
        .map_or(0.0, |(p, size)| (p * size) as f64 / MIB);
    let eta = if rate > 0.0 {
        format!("pass ends in {:.0} s", remaining / rate)
    } else {
        "pass end unknown".into()
    };
    format!(
        "{} · pass {} · {remaining:.0} MiB left · {rate:.0} MiB/s · dirty {dirty:.0} MiB/s · throttle {:.1}% · downtime ~{} · {eta}",
        job.phase,
        s.iteration.unwrap_or(0),
        job.throttle_pct.max(s.cpu_throttle_pct.unwrap_or(0) as f64),
        s.expected_downtime_ms
            .map_or("-".into(), |d| format!("{d} ms")),
    )
}

/// One NDJSON progress event.
pub fn progress_event(job_id: &str, job: &JobInfo) -> serde_json::Value {
    let s = &job.stats;
    json!({
        "event": "progress",
        "job": job_id,
        "elapsed_ms": job.elapsed_ms,
        "phase": job.phase,
        "qemu_status": s.qemu_status,
        "pass": s.iteration,
        "memory_total_bytes": s.memory_total_bytes,
        "memory_remaining_bytes": s.memory_remaining_bytes,
        "memory_processed_bytes": s.memory_processed_bytes,
        "bandwidth_mib_s": s.bandwidth_mib_s,
        "dirty_rate_pages_s": s.dirty_rate_pages_s,
        "page_size": s.page_size,
        "throttle_pct": job.throttle_pct.max(s.cpu_throttle_pct.unwrap_or(0) as f64),
        "expected_downtime_ms": s.expected_downtime_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_never_runs_backwards_when_a_new_pass_begins() {
        let mut c = Completion::default();
        let mib = 1 << 20;
        // Pass 1 sends 90 of 100 MiB; pass 2 finds 60 MiB dirtied again.
        let polls = [
            (Some(10 * mib), Some(90 * mib)),
            (Some(90 * mib), Some(10 * mib)),
            (Some(100 * mib), Some(60 * mib)),
            (Some(130 * mib), Some(30 * mib)),
            (None, None),
            (Some(160 * mib), Some(0)),
        ];
        let shown: Vec<f64> = polls.iter().map(|(d, r)| c.next(*d, *r)).collect();
        assert!(shown.windows(2).all(|w| w[1] >= w[0]), "{shown:?}");
        assert!((shown[1] - 0.9).abs() < 1e-9, "{shown:?}");
        assert!(
            (shown[2] - 0.9).abs() < 1e-9,
            "held at 90 %, not 62 %: {shown:?}"
        );
        assert_eq!(shown[5], 1.0);
    }
}
