//! Guest memory as the simulation keeps it: one 64-bit word per 4 KiB page
//! (what the guest last wrote there), and bitmaps of pages.
//!
//! A page's word stands for its 4 KiB: the migration sends the word and
//! counts 4 KiB on the link, and the guest checks the word it finds against
//! the one it last wrote. A lost or stale page is therefore seen by the
//! guest exactly as a real guest would see it.

/// Bytes a page stands for.
pub const PAGE_SIZE: u64 = 4096;
/// RAM blocks besides the guest's that a PC machine migrates (BIOS, option
/// ROM, ACPI tables): QEMU 7.2 counts 520 KiB of them in `ram.total`.
pub const FIRMWARE_BYTES: u64 = 520 << 10;
/// What a firmware page holds: never zero, never written by the guest.
const FIRMWARE_WORD: u64 = 0xf1f1_f1f1_f1f1_f1f1;

/// A set of page indexes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    len: usize,
    count: usize,
}

impl PageSet {
    /// An empty set over `len` pages.
    pub fn new(len: usize) -> Self {
        PageSet {
            words: vec![0; len.div_ceil(64)],
            len,
            count: 0,
        }
    }

    /// Every page of `len`.
    pub fn full(len: usize) -> Self {
        let mut set = PageSet::new(len);
        for page in 0..len {
            set.insert(page);
        }
        set
    }

    /// Pages it spans.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Pages in the set.
    pub fn count(&self) -> usize {
        self.count
    }

    /// True when no page is in it.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds a page; true if it was not there.
    pub fn insert(&mut self, page: usize) -> bool {
        let (word, bit) = (page / 64, 1u64 << (page % 64));
        let fresh = self.words[word] & bit == 0;
        if fresh {
            self.words[word] |= bit;
            self.count += 1;
        }
        fresh
    }

    /// Removes a page; true if it was there.
    pub fn remove(&mut self, page: usize) -> bool {
        let (word, bit) = (page / 64, 1u64 << (page % 64));
        let present = self.words[word] & bit != 0;
        if present {
            self.words[word] &= !bit;
            self.count -= 1;
        }
        present
    }

    /// True if the page is in the set.
    pub fn contains(&self, page: usize) -> bool {
        page < self.len && self.words[page / 64] & (1u64 << (page % 64)) != 0
    }

    /// Adds every page of `other`.
    pub fn union_with(&mut self, other: &PageSet) {
        for (mine, theirs) in self.words.iter_mut().zip(&other.words) {
            *mine |= theirs;
        }
        self.count = self.words.iter().map(|w| w.count_ones() as usize).sum();
    }

    /// Takes the set, leaving it empty.
    pub fn take(&mut self) -> PageSet {
        let empty = PageSet::new(self.len);
        std::mem::replace(self, empty)
    }

    /// The first page at or after `from` (wrapping around), if any.
    pub fn next_from(&self, from: usize) -> Option<usize> {
        if self.count == 0 {
            return None;
        }
        let scan = |start: usize, end: usize| -> Option<usize> {
            let mut page = start;
            while page < end {
                let word = self.words[page / 64] >> (page % 64);
                if word == 0 {
                    page = (page / 64 + 1) * 64;
                    continue;
                }
                let found = page + word.trailing_zeros() as usize;
                return (found < end).then_some(found);
            }
            None
        };
        scan(from.min(self.len), self.len).or_else(|| scan(0, from.min(self.len)))
    }
}

/// The guest's pages, then the firmware's.
#[derive(Debug, Clone)]
pub struct Ram {
    /// What each page holds; 0 for a page never written.
    pub pages: Vec<u64>,
    /// Pages of guest RAM (the firmware's follow).
    pub guest_pages: usize,
    /// Pages written since the migration's last dirty-bitmap sync: what a
    /// dirty log holds (every page, as with QEMU, only once migration has
    /// started logging).
    pub dirty_log: Option<PageSet>,
    /// Pages written since a dirty-rate measurement began.
    pub rate_log: Option<PageSet>,
}

impl Ram {
    /// `bytes` of zeroed guest RAM, and the firmware's (none for a machine
    /// without RAM: a probe).
    pub fn new(bytes: u64) -> Self {
        let guest_pages = (bytes / PAGE_SIZE) as usize;
        let firmware = if bytes == 0 {
            0
        } else {
            (FIRMWARE_BYTES / PAGE_SIZE) as usize
        };
        let mut pages = vec![0; guest_pages + firmware];
        pages[guest_pages..].fill(FIRMWARE_WORD);
        Ram {
            pages,
            guest_pages,
            dirty_log: None,
            rate_log: None,
        }
    }

    /// Pages a migration sends: the guest's and the firmware's.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// True for a guest without RAM (a probe).
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// The guest writes `value` to `page`.
    pub fn write(&mut self, page: usize, value: u64) {
        self.pages[page] = value;
        if let Some(log) = &mut self.dirty_log {
            log.insert(page);
        }
        if let Some(log) = &mut self.rate_log {
            log.insert(page);
        }
    }

    /// Guest pages that hold something (written at least once).
    pub fn in_use(&self) -> usize {
        self.pages[..self.guest_pages]
            .iter()
            .filter(|&&v| v != 0)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_counts_and_finds_its_pages_wrapping_around() {
        let mut set = PageSet::new(200);
        assert!(set.insert(3));
        assert!(!set.insert(3));
        assert!(set.insert(130));
        assert_eq!(set.count(), 2);
        assert_eq!(set.next_from(0), Some(3));
        assert_eq!(set.next_from(4), Some(130));
        assert_eq!(set.next_from(131), Some(3));
        assert!(set.remove(3));
        assert_eq!(set.next_from(131), Some(130));
        assert_eq!(set.take().count(), 1);
        assert!(set.is_empty());
        assert_eq!(set.next_from(0), None);
    }

    #[test]
    fn writes_reach_the_logs_that_are_on() {
        let mut ram = Ram::new(64 * PAGE_SIZE);
        assert_eq!(
            ram.len() as u64 * PAGE_SIZE,
            64 * PAGE_SIZE + FIRMWARE_BYTES
        );
        ram.write(1, 7);
        ram.dirty_log = Some(PageSet::new(ram.len()));
        ram.write(2, 8);
        ram.write(2, 9);
        assert_eq!(ram.dirty_log.as_ref().unwrap().count(), 1);
        assert_eq!(ram.in_use(), 2);
    }

    #[test]
    fn union_keeps_the_count_right() {
        let mut a = PageSet::new(100);
        let mut b = PageSet::new(100);
        a.insert(1);
        b.insert(1);
        b.insert(99);
        a.union_with(&b);
        assert_eq!(a.count(), 2);
        assert_eq!(PageSet::full(70).count(), 70);
    }
}
