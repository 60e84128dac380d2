//! `calc-dirty-rate` and `query-dirty-rate`: the distinct pages the guest
//! wrote over a window, counted exactly (QEMU samples them).

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::ram::{PageSet, PAGE_SIZE};

/// A measurement.
#[derive(Debug, Default)]
pub struct DirtyRate {
    /// When the window began, and how long it lasts.
    window: Option<(Instant, u64, i64)>,
    /// The last result, MiB/s.
    measured: Option<i64>,
    sample_pages: u64,
}

impl DirtyRate {
    /// Starts a window of `calc_time` seconds; the guest's writes go to a
    /// fresh log from now on.
    pub fn start(
        &mut self,
        calc_time: u64,
        sample_pages: u64,
        rate_log: &mut Option<PageSet>,
        pages: usize,
    ) {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.window = Some((Instant::now(), calc_time, epoch));
        self.measured = None;
        self.sample_pages = sample_pages;
        *rate_log = Some(PageSet::new(pages));
    }

    /// Ends the window once its time is up.
    pub fn settle(&mut self, rate_log: &mut Option<PageSet>) {
        let Some((start, secs, _)) = self.window else {
            return;
        };
        if self.measured.is_none() && start.elapsed().as_secs_f64() >= secs as f64 {
            let pages = rate_log.take().map_or(0, |l| l.count() as u64);
            let mib = pages * PAGE_SIZE / (1 << 20);
            self.measured = Some((mib / secs.max(1)) as i64);
        }
    }

    /// `query-dirty-rate`'s reply.
    pub fn info(&self) -> Value {
        match self.window {
            None => json!({"status": "unstarted", "sample-pages": 512, "mode": "page-sampling",
                           "start-time": 0, "calc-time": 0}),
            Some((_, secs, epoch)) => {
                let mut info = json!({
                    "status": if self.measured.is_some() { "measured" } else { "measuring" },
                    "start-time": epoch,
                    "calc-time": secs,
                    "sample-pages": self.sample_pages,
                    "mode": "page-sampling",
                });
                if let Some(rate) = self.measured {
                    info["dirty-rate"] = json!(rate);
                }
                info
            }
        }
    }
}
