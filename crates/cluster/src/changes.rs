//! Being woken when the cluster's state changes, instead of reading it
//! over and over: an etcd watch on a prefix, re-established whenever the
//! stream breaks (etcd restarted, a connection lost).

use std::time::Duration;

use etcd_client::WatchOptions;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Cluster;

/// How long to wait before watching again after the stream broke.
const REWATCH_AFTER: Duration = Duration::from_secs(1);

/// Changes under a prefix. A wake-up may be spurious (the watch was set
/// up again and something may have changed meanwhile); a change is never
/// missed while the watch holds, and the caller's own deadline covers the
/// moments it does not.
#[derive(Debug)]
pub struct Changes {
    seen: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl Drop for Changes {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Changes {
    /// Waits until something changed since the last call, or `at_most`;
    /// whether something changed.
    pub async fn next(&mut self, at_most: Duration) -> bool {
        matches!(
            tokio::time::timeout(at_most, self.seen.changed()).await,
            Ok(Ok(()))
        )
    }
}

impl Cluster {
    /// Watches every key under `prefix` (a full key watches just that
    /// key's prefix: pass one ending in `/` for a directory).
    pub fn changes(&self, prefix: &str) -> Changes {
        let (tx, seen) = watch::channel(0u64);
        let mut client = self.client.clone();
        let prefix = prefix.to_string();
        let task = tokio::spawn(async move {
            loop {
                let watched = crate::connect::bounded(
                    client.watch(prefix.as_str(), Some(WatchOptions::new().with_prefix())),
                )
                .await;
                if let Ok((_watcher, mut stream)) = watched {
                    // Whatever changed while the stream was down.
                    tx.send_modify(|n| *n += 1);
                    while let Ok(Some(reply)) = stream.message().await {
                        if !reply.events().is_empty() {
                            tx.send_modify(|n| *n += 1);
                        }
                        if reply.canceled() {
                            break;
                        }
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(REWATCH_AFTER).await;
            }
        });
        Changes { seen, task }
    }
}
