//! The QEMU binary's probed capabilities, kept in the state directory
//! (`qemu-probe.json`) with the fingerprint of the binary they came from: a
//! restarted agent does not probe again, and an upgraded binary is probed
//! afresh. A probe starts a QEMU (a few hundred ms) that the first
//! migration after a start would otherwise wait for, on both hosts.

use std::path::{Path, PathBuf};

use domain::qemu::fingerprint::{CachedProbe, Fingerprint};
use domain::qemu::QemuBinary;

use crate::errors;
use crate::store::Store;

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("qemu-probe.json")
}

/// The cached probe, if it was made of the binary `now` fingerprints.
pub(crate) async fn load(state_dir: &Path, now: &Fingerprint) -> Option<QemuBinary> {
    let text = tokio::fs::read(path(state_dir)).await.ok()?;
    match serde_json::from_slice::<CachedProbe>(&text) {
        Ok(cached) if cached.fingerprint == *now => Some(cached.binary),
        Ok(_) => {
            tracing::info!(binary = %now.path.display(), "the QEMU binary changed since its last probe");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "unreadable cached QEMU probe; probing again");
            None
        }
    }
}

/// Keeps `binary`'s probe for the next start; a failure only costs a probe.
pub(crate) async fn save(store: &Store, fingerprint: Fingerprint, binary: &QemuBinary) {
    let cached = CachedProbe {
        fingerprint,
        binary: binary.clone(),
    };
    let Ok(bytes) = serde_json::to_vec_pretty(&cached) else {
        return;
    };
    if let Err(e) = store.write_file(path(store.root()), bytes).await {
        tracing::warn!(error = %errors::chain(&e), "cannot cache the QEMU probe");
    }
}
