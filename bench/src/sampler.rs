//! Reads the guest's progress counter from its serial logs, stamped with
//! host time, to measure how much work the guest got done.
//!
//! The counter lives in guest memory, so it continues on the destination
//! from where the source left it: samples from both logs form one series.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest::SerialLog;

/// `(host time, writes)` pairs, in time order per log.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    points: Vec<(Instant, u64)>,
}

impl Samples {
    fn push(&mut self, at: Instant, writes: u64) {
        self.points.push((at, writes));
        self.points.sort_by_key(|(t, _)| *t);
    }

    /// The counter at host time `t`, interpolated between the samples
    /// around it.
    pub fn writes_at(&self, t: Instant) -> Option<f64> {
        let after = self.points.iter().position(|(at, _)| *at >= t)?;
        if after == 0 {
            return Some(self.points[0].1 as f64);
        }
        let (t0, w0) = self.points[after - 1];
        let (t1, w1) = self.points[after];
        let span = t1.duration_since(t0).as_secs_f64();
        if span <= 0.0 {
            return Some(w1 as f64);
        }
        let f = t.duration_since(t0).as_secs_f64() / span;
        Some(w0 as f64 + f * (w1 as f64 - w0 as f64))
    }

    /// Writes per second over the `window` up to the latest sample.
    pub fn recent_rate(&self, window: Duration) -> Option<f64> {
        let (end, last) = *self.points.last()?;
        let start = end.checked_sub(window)?;
        if self.points.first()?.0 > start {
            return None;
        }
        let a = self.writes_at(start)?;
        Some((last as f64 - a) / window.as_secs_f64())
    }
}

/// Polls serial logs every 50 ms and records each new progress line with
/// the host time it was seen.
#[derive(Debug, Clone)]
pub struct Sampler {
    samples: Arc<Mutex<Samples>>,
    logs: Arc<Mutex<Vec<(PathBuf, usize)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Sampler {
    pub fn start() -> Sampler {
        let sampler = Sampler {
            samples: Arc::default(),
            logs: Arc::default(),
            stop: Arc::default(),
        };
        let s = sampler.clone();
        tokio::spawn(async move {
            while !s.stop.load(std::sync::atomic::Ordering::Relaxed) {
                let paths: Vec<(PathBuf, usize)> = s.logs.lock().expect("logs").clone();
                for (i, (path, seen)) in paths.iter().enumerate() {
                    let Ok(log) = SerialLog::read(path) else {
                        continue;
                    };
                    let now = Instant::now();
                    if log.progress.len() > *seen {
                        let mut samples = s.samples.lock().expect("samples");
                        for p in &log.progress[*seen..] {
                            samples.push(now, p.writes);
                        }
                        s.logs.lock().expect("logs")[i].1 = log.progress.len();
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        sampler
    }

    /// Starts following a log (lines already in it are skipped).
    pub fn follow(&self, path: PathBuf) {
        let mut logs = self.logs.lock().expect("logs");
        if logs.iter().any(|(p, _)| *p == path) {
            return;
        }
        let seen = SerialLog::read(&path)
            .map(|l| l.progress.len())
            .unwrap_or(0);
        logs.push((path, seen));
    }

    pub fn samples(&self) -> Samples {
        self.samples.lock().expect("samples").clone()
    }

    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
