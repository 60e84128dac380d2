//! Holding QEMU's own switchover back while a vCPU may be slow to stop, and
//! switching over ourselves.

use std::time::Duration;

use protocol::job::ActionKind;
use qmp::commands::migration::MigrationParameters;
use qmp::commands::vm::Stop;
use tokio::time::Instant;
use types::units::mib;
use types::{Bandwidth, Throttle};

use super::watch::{downtime, set_parameters, Watch};

/// QEMU's downtime limit while the watcher holds the switchover: QEMU only
/// switches over by itself if a pass dirtied next to nothing.
const HELD_DOWNTIME: Duration = Duration::from_millis(1);
/// Time for QEMU to take the `stop` request before the vCPUs get CPU time.
const STOP_LEAD: Duration = Duration::from_millis(5);
/// How long the `stop` may take once the vCPUs can run.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl Watch<'_> {
    /// Holds QEMU's own switchover back, or lets it go again.
    pub async fn hold_switchover(&mut self, hold: bool) {
        let limit = if hold {
            HELD_DOWNTIME
        } else {
            self.limits.downtime
        };
        let ms = self.limits.downtime.as_millis();
        let detail = match self.set_qemu_downtime(limit).await {
            Ok(()) => {
                self.limits.held = hold;
                if hold {
                    format!(
                        "QEMU's switchover held back: above 99 % a vCPU can wait up to a second \
                         to stop, so livemig pauses the guest itself once what is left fits in \
                         {ms} ms"
                    )
                } else {
                    format!("QEMU switches over by itself again ({ms} ms limit)")
                }
            }
            Err(e) => format!("QEMU refused the downtime limit: {e}"),
        };
        self.record(ActionKind::Hold, Some(limit.as_millis() as f64), detail);
    }

    /// Lifts the throttle so that a vCPU out of quota sees a stop of QEMU's
    /// (`what`) at once rather than at its next period; true if lifted.
    pub(super) async fn lift_throttle_for_stop(&mut self, what: &str) -> bool {
        let Some(throttle) = self.throttle.as_mut() else {
            return false;
        };
        if let Err(e) = throttle.set(0.0).await {
            tracing::warn!(error = %e, "could not lift the throttle for {what}");
            return false;
        }
        self.update(|p| p.throttle = Throttle::NONE);
        true
    }

    /// Switches over while QEMU's own switchover is held: pause the guest,
    /// let the throttled vCPUs run so they stop at once, then let QEMU
    /// complete as in its own stop-and-copy.
    pub async fn switch_over(&mut self, remaining: f64) {
        let paused_at = Instant::now();
        let stop = self.qmp.execute(&Stop);
        tokio::pin!(stop);
        let early = tokio::select! {
            result = &mut stop => Some(result),
            _ = tokio::time::sleep(STOP_LEAD) => None,
        };
        // A vCPU out of quota only sees the stop at its next period, up to
        // a second away; and a quota written now only takes its new period
        // after the old one ends, so even a fresh millisecond of quota can
        // run out before the vCPU gets to the stop. No quota, then: the
        // vCPU runs until it stops, which it does at once if the stop
        // reached it during the lead.
        self.lift_throttle_for_stop("the stop").await;
        self.update(|p| p.throttle = Throttle::NONE);
        let result = match early {
            Some(result) => Ok(result),
            None => tokio::time::timeout(STOP_TIMEOUT, stop).await,
        };
        let left = mib(remaining);
        match result {
            Ok(Ok(_)) => {
                self.paused_at = Some(paused_at);
                let stop_ms = paused_at.elapsed().as_millis();
                // What the guest dirtied since the last sync still goes
                // through the live phase's loop; QEMU sends its own
                // stop-and-copy without the bandwidth cap, and so does
                // livemig once the guest is paused.
                let uncapped = set_parameters(
                    self.qmp,
                    MigrationParameters {
                        max_bandwidth: Some(Bandwidth::UNLIMITED.bytes_per_sec()),
                        ..downtime(self.limits.downtime)
                    },
                )
                .await;
                let detail = match uncapped {
                    Ok(()) => {
                        self.limits.held = false;
                        format!(
                            "{left:.1} MiB left: guest paused in {stop_ms} ms; QEMU completes \
                             without the bandwidth cap, as in its own stop-and-copy; downtime \
                             counts from here",
                        )
                    }
                    Err(e) => format!(
                        "{left:.1} MiB left: guest paused in {stop_ms} ms, but QEMU refused the \
                         switchover's parameters ({e}); downtime counts from here",
                    ),
                };
                self.record(ActionKind::Switchover, None, detail);
                if self.limits.held {
                    self.hold_switchover(false).await;
                }
            }
            Ok(Err(e)) => self.record(
                ActionKind::Switchover,
                None,
                format!("QEMU refused to pause: {e}"),
            ),
            Err(_) => self.record(
                ActionKind::Switchover,
                None,
                format!("QEMU did not pause within {STOP_TIMEOUT:?}"),
            ),
        }
    }

    /// How long the guest was paused for livemig's switchover, if it was:
    /// from the `stop` to QEMU's end of the job, read off QEMU's total time
    /// (its clock starts a moment before ours, so this errs long) rather
    /// than off when the watcher noticed the end.
    pub fn paused_for(&self, total_time_ms: Option<u64>) -> Option<u64> {
        let paused_at = self.paused_at?;
        let offset = paused_at.duration_since(self.started).as_millis() as u64;
        Some(match total_time_ms {
            Some(total) if total > offset => total - offset,
            _ => paused_at.elapsed().as_millis() as u64,
        })
    }
}
