//! What a host's guests print: their serial logs, and waiting on them.

use guest::SerialLog;

use super::Host;
use crate::{wait_until, GUEST_TIMEOUT};
use std::path::Path;

impl Host {
    /// The guest's serial log on this host.
    pub async fn serial(&self, name: &str) -> SerialLog {
        let info = self.dominfo(name).await.expect("dominfo");
        let path = info.serial_log.expect("running domain has a serial log");
        SerialLog::read(Path::new(&path)).expect("read serial log")
    }

    /// Waits for `lines` more progress lines than the log has now.
    pub async fn wait_guest_progress(&self, name: &str, lines: usize) -> SerialLog {
        let start = self.serial(name).await.progress.len();
        wait_until(
            GUEST_TIMEOUT,
            &format!("{lines} progress lines from '{name}' on {}", self.name),
            || async {
                let log = self.serial(name).await;
                assert!(log.errors.is_empty(), "guest error: {:?}", log.errors);
                (log.progress.len() >= start + lines).then_some(log)
            },
        )
        .await
    }

    /// Waits until the Linux guest's disk workload has read back `blocks`
    /// more blocks than it had when called, every one as written.
    pub async fn wait_guest_disk(&self, name: &str, blocks: u64) -> SerialLog {
        let start = self
            .serial(name)
            .await
            .last_disk()
            .map_or(0, |d| d.verified);
        wait_until(
            GUEST_TIMEOUT,
            &format!("{blocks} disk blocks verified by '{name}' on {}", self.name),
            || async {
                let log = self.serial(name).await;
                assert!(log.errors.is_empty(), "guest error: {:?}", log.errors);
                assert!(log.disk_intact(), "disk corrupted: {:?}", log.corruptions);
                log.last_disk()
                    .is_some_and(|d| d.verified >= start + blocks)
                    .then_some(log)
            },
        )
        .await
    }

    /// Waits until the guest has completed `passes` more sweeps over its
    /// working set, so every page has been checked again.
    pub async fn wait_guest_passes(&self, name: &str, passes: u64) -> SerialLog {
        let first = self
            .wait_guest_progress(name, 1)
            .await
            .last_progress()
            .expect("progress");
        wait_until(
            GUEST_TIMEOUT,
            &format!("{passes} passes of '{name}' on {}", self.name),
            || async {
                let log = self.serial(name).await;
                let last = log.last_progress()?;
                (last.pass >= first.pass + passes && last.writes > first.writes).then_some(log)
            },
        )
        .await
    }
}
