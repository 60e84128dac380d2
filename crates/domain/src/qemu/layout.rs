//! Guest RAM layout, and the QEMU TCG migration bug it works around.
//!
//! QEMU before 9.0, under TCG, loses guest writes during migration: the fast
//! path of `cpu_physical_memory_sync_dirty_bitmap()` clears dirty bits 64
//! pages at a time without resetting the TCG TLB's not-dirty state, so stores
//! through a TLB entry that stays resident are never sent again (fixed in 9.0
//! by "physmem: Fix migration dirty bitmap coherency with TCG memory
//! access"). The fast path is only taken for RAM blocks whose length is a
//! multiple of 64 pages; a block 8 KiB shorter makes QEMU take the correct
//! per-page path. So on affected versions we size guest RAM in bytes with an
//! explicit memory backend.

use qmp::QemuVersion;
use serde::{Deserialize, Serialize};

use crate::definition::Accel;

use types::MIB;
/// Two 4 KiB pages: enough to break 64-page alignment, too little to matter.
pub const WORKAROUND_SHRINK_BYTES: u64 = 8 << 10;
/// The first QEMU release with the dirty-bitmap fix.
pub const FIXED_IN: QemuVersion = QemuVersion::new(9, 0, 0);

/// True when this QEMU version, with this accelerator, corrupts migrated RAM
/// unless the RAM block is sized off the 64-page grid.
pub fn tcg_dirty_bitmap_bug(accel: Accel, version: QemuVersion) -> bool {
    accel == Accel::Tcg && version < FIXED_IN
}

/// How guest RAM is given to QEMU. Both ends of a migration must use the
/// same layout, so the source's layout travels with the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamLayout {
    /// Guest RAM in bytes.
    pub bytes: u64,
    /// Given as `-object memory-backend-ram` (needed for a size that is not
    /// a whole number of MiB) rather than plain `-m`.
    pub backend: bool,
}

impl RamLayout {
    /// Plain `-m MiB`.
    pub fn plain(memory_mib: u32) -> Self {
        RamLayout {
            bytes: u64::from(memory_mib) * MIB,
            backend: false,
        }
    }

    /// The layout for a domain on this QEMU: plain unless the TCG bug needs
    /// working around.
    pub fn for_domain(memory_mib: u32, accel: Accel, version: QemuVersion) -> Self {
        if tcg_dirty_bitmap_bug(accel, version) {
            RamLayout {
                bytes: u64::from(memory_mib) * MIB - WORKAROUND_SHRINK_BYTES,
                backend: true,
            }
        } else {
            Self::plain(memory_mib)
        }
    }

    /// True when this layout keeps QEMU off the buggy fast path.
    pub fn avoids_tcg_dirty_bitmap_bug(&self) -> bool {
        const GRID: u64 = 64 * 4096;
        !self.bytes.is_multiple_of(GRID)
    }

    /// The `-m` value: MiB when whole, else KiB.
    pub fn memory_arg(&self) -> String {
        if self.bytes.is_multiple_of(MIB) {
            format!("{}M", self.bytes / MIB)
        } else {
            format!("{}k", self.bytes / 1024)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V7_2: QemuVersion = QemuVersion::new(7, 2, 22);
    const V9_0: QemuVersion = QemuVersion::new(9, 0, 0);

    #[test]
    fn tcg_before_9_0_gets_an_off_grid_backend() {
        let layout = RamLayout::for_domain(512, Accel::Tcg, V7_2);
        assert!(layout.backend);
        assert_eq!(layout.bytes, 512 * MIB - 8192);
        assert!(layout.avoids_tcg_dirty_bitmap_bug());
        assert_eq!(layout.memory_arg(), "524280k");
    }

    #[test]
    fn fixed_qemu_or_kvm_keep_the_plain_layout() {
        for (accel, version) in [(Accel::Tcg, V9_0), (Accel::Kvm, V7_2)] {
            let layout = RamLayout::for_domain(512, accel, version);
            assert_eq!(layout, RamLayout::plain(512));
            assert!(!layout.avoids_tcg_dirty_bitmap_bug());
            assert_eq!(layout.memory_arg(), "512M");
        }
    }
}
