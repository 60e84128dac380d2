//! Which kernel modules the guest's devices need, in an order `insmod`
//! can load them: each module's `depends=` (from its `.modinfo` section)
//! before it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::LinuxGuestError;

/// The drivers of the devices livemig gives a guest: virtio-pci, its disks
/// and its NICs.
pub const WANTED: &[&str] = &["virtio_pci", "virtio_blk", "virtio_net"];

/// The `depends=` list a module file declares.
fn depends(module: &[u8]) -> Vec<String> {
    let key = b"depends=";
    module
        .windows(key.len())
        .position(|w| w == key)
        .map(|at| {
            let rest = &module[at + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Every `.ko` under `dir`, by module name (`-` and `_` are one to the
/// kernel).
fn index(dir: &Path) -> BTreeMap<String, PathBuf> {
    let mut found = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                found.insert(name.replace('-', "_"), path);
            }
        }
    }
    found
}

/// The module files for [`WANTED`] and what they depend on, dependencies
/// first. A wanted module the kernel has built in (no file) is skipped.
///
/// # Errors
/// [`LinuxGuestError::Read`] if a module file cannot be read.
pub fn load_order(modules_dir: &Path) -> Result<Vec<PathBuf>, LinuxGuestError> {
    let index = index(modules_dir);
    let mut order: Vec<PathBuf> = Vec::new();
    let mut visiting: Vec<String> = Vec::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        visiting: &mut Vec<String>,
        order: &mut Vec<PathBuf>,
    ) -> Result<(), LinuxGuestError> {
        let Some(path) = index.get(name) else {
            return Ok(());
        };
        if order.contains(path) || visiting.iter().any(|v| v == name) {
            return Ok(());
        }
        visiting.push(name.to_string());
        let bytes = std::fs::read(path).map_err(|source| LinuxGuestError::Read {
            path: path.clone(),
            source,
        })?;
        for dependency in depends(&bytes) {
            visit(&dependency.replace('-', "_"), index, visiting, order)?;
        }
        visiting.pop();
        order.push(path.clone());
        Ok(())
    }
    for name in WANTED {
        visit(name, &index, &mut visiting, &mut order)?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_load_first() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("kernel/drivers");
        std::fs::create_dir_all(&sub).unwrap();
        let module = |name: &str, deps: &str| {
            let mut bytes = b"\x7fELF....".to_vec();
            bytes.extend_from_slice(
                format!("license=GPL\0depends={deps}\0name={name}\0").as_bytes(),
            );
            std::fs::write(sub.join(format!("{name}.ko")), bytes).unwrap();
        };
        module("virtio_blk", "virtio,virtio_ring");
        module("virtio_ring", "virtio");
        module("virtio", "");
        module("virtio_pci", "virtio_pci_modern_dev,virtio,virtio_ring");
        module("virtio_pci_modern_dev", "");
        let names: Vec<String> = load_order(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        // virtio_net is built in here: skipped.
        assert_eq!(
            names,
            [
                "virtio_pci_modern_dev",
                "virtio",
                "virtio_ring",
                "virtio_pci",
                "virtio_blk"
            ]
        );
    }
}
