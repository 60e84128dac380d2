//! The "newc" cpio format the kernel unpacks an initramfs from.

/// An archive being written in memory.
#[derive(Debug, Default)]
pub struct Archive {
    bytes: Vec<u8>,
    next_inode: u32,
}

/// File type bits of a mode.
const DIRECTORY: u32 = 0o040_000;
const REGULAR: u32 = 0o100_000;
const CHAR_DEVICE: u32 = 0o020_000;

impl Archive {
    /// A directory.
    pub fn directory(&mut self, name: &str) {
        self.entry(name, DIRECTORY | 0o755, (0, 0), &[]);
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, REGULAR | mode, (0, 0), data);
    }

    /// A character device node.
    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, CHAR_DEVICE | 0o600, (major, minor), &[]);
    }

    /// Ends the archive and returns it.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.bytes
    }

    fn entry(&mut self, name: &str, mode: u32, (rmajor, rminor): (u32, u32), data: &[u8]) {
        self.next_inode += 1;
        let size = u32::try_from(data.len()).expect("initramfs files are under 4 GiB");
        let name_size = u32::try_from(name.len() + 1).expect("a short name");
        let fields = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            if mode & DIRECTORY != 0 { 2 } else { 1 },
            0, // mtime: a reproducible image
            size,
            0, // devmajor
            0, // devminor
            rmajor,
            rminor,
            name_size,
            0, // check
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads back (name, mode, data) of every entry, as the kernel would.
    fn entries(bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let hex = |at: usize| {
            u32::from_str_radix(std::str::from_utf8(&bytes[at..at + 8]).unwrap(), 16).unwrap()
        };
        let align = |n: usize| n.div_ceil(4) * 4;
        let mut at = 0;
        let mut out = Vec::new();
        loop {
            assert_eq!(&bytes[at..at + 6], b"070701");
            let mode = hex(at + 6 + 8);
            let size = hex(at + 6 + 6 * 8) as usize;
            let name_size = hex(at + 6 + 11 * 8) as usize;
            let name_at = at + 110;
            let name = String::from_utf8(bytes[name_at..name_at + name_size - 1].to_vec()).unwrap();
            let data_at = align(name_at + name_size);
            let data = bytes[data_at..data_at + size].to_vec();
            at = align(data_at + size);
            if name == "TRAILER!!!" {
                return out;
            }
            out.push((name, mode, data));
        }
    }

    #[test]
    fn entries_read_back_with_their_types_and_contents() {
        let mut archive = Archive::default();
        archive.directory("bin");
        archive.file("bin/x", 0o755, b"hello");
        archive.char_device("dev/console", 5, 1);
        let bytes = archive.finish();
        assert!(bytes.len().is_multiple_of(4));
        let read = entries(&bytes);
        assert_eq!(read.len(), 3);
        assert_eq!(read[0].0, "bin");
        assert_eq!(read[0].1 & 0o170_000, DIRECTORY);
        assert_eq!(
            read[1],
            ("bin/x".into(), REGULAR | 0o755, b"hello".to_vec())
        );
        assert_eq!(read[2].1 & 0o170_000, CHAR_DEVICE);
    }
}
