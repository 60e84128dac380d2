//! The disk copy's state machine on the source, driven by a scripted QEMU
//! monitor: mirrors started, in sync, completed at switchover, abandoned
//! on any failure, with nothing left behind.

use migration::storage::source::{MirrorEvent, MirrorPlan, Mirrors};
use migration::storage::StorageError;
use migration::vcpu_throttle::{BoxFuture, ThrottleError, VcpuThrottle};
use qmp::commands::block::{CopyMode, MirrorSync};
use qmp::scripted::ScriptedQemu;
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn plan() -> MirrorPlan {
    MirrorPlan {
        host: "10.0.0.2".into(),
        port: 10809,
        sync: MirrorSync::Full,
        copy_mode: CopyMode::Background,
        tls_hostname: None,
        speed: Some(16 << 20),
    }
}

/// Long enough never to end a copy in these tests but the one about it.
const WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

fn targets() -> Vec<String> {
    vec!["vda".into(), "vdb".into()]
}

/// Nothing of the copy left in QEMU: no job, no NBD node.
fn clean(qemu: &ScriptedQemu) {
    qemu.with(|s| {
        assert!(s.block_jobs.is_empty(), "jobs left: {:?}", s.block_jobs);
        assert!(s.block_nodes.is_empty(), "nodes left: {:?}", s.block_nodes);
    });
}

#[tokio::test]
async fn mirrors_reach_sync_then_complete_with_nothing_left() {
    let (qmp, qemu) = ScriptedQemu::start().await;
    let mirrors = Mirrors::start(&qmp, &plan(), &targets()).await.unwrap();

    let add = qemu.calls("blockdev-add");
    assert_eq!(add.len(), 2);
    assert_eq!(
        add[0],
        json!({"driver": "nbd", "node-name": "livemig-nbd-vda", "export": "livemig-vda",
               "server": {"type": "inet", "host": "10.0.0.2", "port": "10809"}})
    );
    let mirror = &qemu.calls("blockdev-mirror")[1];
    assert_eq!(mirror["device"], "disk-vdb");
    assert_eq!(mirror["target"], "livemig-nbd-vdb");
    assert_eq!(mirror["sync"], "full");
    assert_eq!(mirror["speed"], 16 << 20);
    assert_eq!(mirror["auto-dismiss"], false);

    let mut seen = Vec::new();
    mirrors
        .wait_ready(&qmp, &CancellationToken::new(), None, WINDOW, None, |e| {
            if let MirrorEvent::Progress { progress, .. } = e {
                seen.push(progress)
            }
        })
        .await
        .unwrap();
    assert!(seen.last().unwrap().processed == seen.last().unwrap().total);
    assert!(seen.first().unwrap().processed < seen.first().unwrap().total);

    mirrors.complete(&qmp).await.unwrap();
    // Completed, not abandoned: a ready mirror cancelled without force
    // leaves the target an exact copy.
    assert!(qemu
        .calls("block-job-cancel")
        .iter()
        .all(|c| c["force"] == false));
    clean(&qemu);
}

#[tokio::test]
async fn a_mirror_that_fails_is_reported_and_every_mirror_abandoned() {
    let (qmp, qemu) = ScriptedQemu::start().await;
    let mirrors = Mirrors::start(&qmp, &plan(), &targets()).await.unwrap();
    qemu.with(|s| {
        s.block_jobs[1]["status"] = json!("concluded");
        s.block_jobs[1]["error"] = json!("Input/output error");
    });

    let err = mirrors
        .wait_ready(&qmp, &CancellationToken::new(), None, WINDOW, None, |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StorageError::MirrorFailed { target, message } if target == "vdb" && message.contains("Input/output")),
        "{err:?}"
    );
    mirrors.abandon(&qmp).await;
    assert!(qemu
        .calls("block-job-cancel")
        .iter()
        .all(|c| c["force"] == true));
    clean(&qemu);
}

#[tokio::test]
async fn a_cancel_while_copying_stops_the_wait() {
    let (qmp, qemu) = ScriptedQemu::start().await;
    // A disk that never gets in sync.
    qemu.on("query-block-jobs", |s, _| {
        Some(Ok(serde_json::Value::Array(s.block_jobs.clone())))
    });
    let mirrors = Mirrors::start(&qmp, &plan(), &targets()).await.unwrap();
    let cancel = CancellationToken::new();
    let waiting = mirrors.wait_ready(&qmp, &cancel, None, WINDOW, None, |_| {});
    let cancelling = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        cancel.cancel();
    };
    let (result, ()) = tokio::join!(waiting, cancelling);
    assert!(matches!(result, Err(StorageError::Cancelled)), "{result:?}");
}

#[tokio::test]
async fn a_second_disk_qemu_refuses_undoes_the_first() {
    let (qmp, qemu) = ScriptedQemu::start().await;
    qemu.on("blockdev-mirror", |_, args| {
        (args["job-id"] == "livemig-mirror-vdb")
            .then(|| Err(("GenericError", "Permission denied".to_string())))
    });

    let err = Mirrors::start(&qmp, &plan(), &targets()).await.unwrap_err();

    assert!(err.to_string().contains("vdb"), "{err}");
    clean(&qemu);
}

#[tokio::test]
async fn a_mirror_gone_at_switchover_fails_the_completion() {
    let (qmp, qemu) = ScriptedQemu::start().await;
    let mirrors = Mirrors::start(&qmp, &plan(), &targets()).await.unwrap();
    mirrors
        .wait_ready(&qmp, &CancellationToken::new(), None, WINDOW, None, |_| {})
        .await
        .unwrap();
    qemu.with(|s| s.block_jobs.remove(0));

    let err = mirrors.complete(&qmp).await.unwrap_err();

    assert!(
        matches!(&err, StorageError::MirrorGone(t) if t == "vda"),
        "{err:?}"
    );
    clean(&qemu);
}

#[tokio::test]
async fn a_copy_the_guest_outwrites_is_stopped_and_reported_not_mirrored_forever() {
    let (qmp, qemu) = ScriptedQemu::start().await;
    // The guest writes 8 MiB between two looks, the copy sends 4 MiB.
    qemu.with(|s| s.disk_writes_per_query = 8 << 20);
    let mirrors = Mirrors::start(&qmp, &plan(), &targets()).await.unwrap();

    let err = mirrors
        .wait_ready(
            &qmp,
            &CancellationToken::new(),
            None,
            std::time::Duration::from_secs(1),
            None,
            |_| {},
        )
        .await
        .unwrap_err();
    let StorageError::NotConverging(stop) = &err else {
        panic!("{err:?}");
    };
    assert!(stop.write_rate > stop.copy_rate, "{stop:?}");
    // Its block counters say what the guest wrote: 8 MiB a look on each
    // of two disks.
    assert!(
        stop.guest_write_rate.unwrap_or(0.0) >= stop.write_rate,
        "{stop:?}"
    );
    let message = err.to_string();
    assert!(message.contains("does not converge"), "{message}");
    assert!(
        message.contains("the guest wrote its disks at"),
        "{message}"
    );
    mirrors.abandon(&qmp).await;
    clean(&qemu);
}

/// A vCPU throttle on the scripted guest: its disk writes scale with the
/// vCPU time the throttle leaves.
struct ScriptedThrottle {
    qemu: qmp::scripted::Model,
    unthrottled_writes: u64,
    set: std::sync::Arc<std::sync::Mutex<Vec<f64>>>,
}

impl VcpuThrottle for ScriptedThrottle {
    fn kind(&self) -> &'static str {
        "host"
    }
    fn max(&self) -> f64 {
        0.999
    }
    fn set(&mut self, throttle: f64) -> BoxFuture<'_, Result<(), ThrottleError>> {
        self.set.lock().unwrap().push(throttle);
        let writes = (self.unthrottled_writes as f64 * (1.0 - throttle)) as u64;
        self.qemu.with(|s| s.disk_writes_per_query = writes);
        Box::pin(async { Ok(()) })
    }
    fn release(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    fn acts_before_migration(&self) -> bool {
        true
    }
}

#[tokio::test]
async fn an_adaptive_job_throttles_a_guest_that_outwrites_the_copy_until_the_disks_are_in_sync() {
    let (qmp, qemu) = ScriptedQemu::start().await;
    // Unthrottled, the guest's writes would lap the copy.
    qemu.with(|s| s.disk_writes_per_query = 5 << 20);
    let set = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut throttle: Box<dyn VcpuThrottle> = Box::new(ScriptedThrottle {
        qemu: qemu.model(),
        unthrottled_writes: 5 << 20,
        set: set.clone(),
    });
    let mirrors = Mirrors::start(&qmp, &plan(), &targets()).await.unwrap();

    let mut events = Vec::new();
    mirrors
        .wait_ready(
            &qmp,
            &CancellationToken::new(),
            None,
            std::time::Duration::from_secs(30),
            Some(&mut throttle),
            |e| events.push(e),
        )
        .await
        .unwrap();

    // Two disks, each written 5 MiB and copied 4 MiB a look: writes at half
    // the copy need a 60 % throttle; lifted once in sync.
    let set = set.lock().unwrap().clone();
    assert_eq!(set.len(), 2, "{set:?}");
    assert!((set[0] - 0.6).abs() < 0.02, "{set:?}");
    assert_eq!(set[1], 0.0);
    let changes: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            MirrorEvent::Throttle { why, applied, .. } => Some((why.clone(), applied.clone())),
            _ => None,
        })
        .collect();
    assert!(changes[0].0.contains("outrun"), "{changes:?}");
    assert!(changes[1].0.contains("in sync"), "{changes:?}");
    assert!(changes.iter().all(|(_, applied)| applied.is_ok()));
    // The dirty rate was measured and reported.
    assert!(events.iter().any(|e| matches!(
        e,
        MirrorEvent::Progress { dirty_rate: Some(rate), .. } if *rate > 0.0
    )));
    mirrors.complete(&qmp).await.unwrap();
    clean(&qemu);
}

#[tokio::test]
async fn mirrors_in_sync_are_switched_to_copy_every_write() {
    let (qmp, qemu) = ScriptedQemu::start().await;
    let mirrors = Mirrors::start(&qmp, &plan(), &targets()).await.unwrap();
    mirrors
        .wait_ready(&qmp, &CancellationToken::new(), None, WINDOW, None, |_| {})
        .await
        .unwrap();

    mirrors.block_writes(&qmp).await.unwrap();

    let changes = qemu.calls("block-job-change");
    assert_eq!(
        changes,
        [
            json!({"id": "livemig-mirror-vda", "type": "mirror", "copy-mode": "write-blocking"}),
            json!({"id": "livemig-mirror-vdb", "type": "mirror", "copy-mode": "write-blocking"}),
        ]
    );
    mirrors.complete(&qmp).await.unwrap();
    clean(&qemu);
}

#[tokio::test]
async fn mirrors_left_by_a_dead_agent_are_swept_before_a_new_copy() {
    let (qmp, qemu) = ScriptedQemu::start().await;
    // An agent died mid-copy: its mirror of vda failed on a gone server,
    // and its NBD node stayed.
    qemu.with(|s| {
        s.block_jobs
            .push(json!({"device": "livemig-mirror-vda", "type": "mirror",
            "len": 8 << 20, "offset": 1 << 20, "ready": false, "status": "concluded",
            "error": "Input/output error"}));
        s.block_nodes.push("livemig-nbd-vda".into());
    });

    let mirrors = Mirrors::start(&qmp, &plan(), &targets()).await.unwrap();

    assert_eq!(qemu.calls("job-dismiss")[0]["id"], "livemig-mirror-vda");
    assert_eq!(qemu.calls("blockdev-mirror").len(), 2);
    mirrors
        .wait_ready(&qmp, &CancellationToken::new(), None, WINDOW, None, |_| {})
        .await
        .unwrap();
    mirrors.complete(&qmp).await.unwrap();
    clean(&qemu);
    // Nothing left: a sweep finds nothing.
    assert_eq!(Mirrors::sweep(&qmp).await, 0);
}
