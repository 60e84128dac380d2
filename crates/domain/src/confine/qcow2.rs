//! The part of a qcow2 header that names other files: the backing file,
//! its format, and an external data file. QEMU opens these on its own
//! when it opens the image, so confining a disk means confining them too.

use std::io;
use std::path::Path;

use tokio::io::AsyncReadExt;

/// qcow2's magic, `QFI\xfb`.
const MAGIC: u32 = 0x5146_49fb;
/// Header extension: the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: an external data file's name.
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Header extensions end with this type.
const EXT_END: u32 = 0;
/// The header and its extensions fit in the first cluster; QEMU's largest
/// cluster is 2 MiB, but it refuses headers longer than 64 KiB of
/// extensions in practice, and so do we.
pub(super) const MAX_HEADER: usize = 64 << 10;
/// QEMU limits a backing file name to 1023 bytes.
const MAX_BACKING_NAME: u32 = 1023;

/// What a qcow2 header says of other files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Header {
    /// The backing file's name as recorded (relative names are relative
    /// to the image's directory).
    pub backing: Option<String>,
    /// The backing file's recorded format.
    pub backing_format: Option<String>,
    /// The image keeps its data in another file.
    pub data_file: bool,
}

/// Why a header is refused.
pub(super) type Malformed = &'static str;

fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

fn be64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// Parses the start of a qcow2 image.
///
/// # Errors
/// What is wrong with it, when it is not a qcow2 header this module
/// understands completely.
pub(super) fn parse(bytes: &[u8]) -> Result<Header, Malformed> {
    const SHORT: Malformed = "the qcow2 header is cut short";
    if be32(bytes, 0) != Some(MAGIC) {
        return Err("it is not a qcow2 image");
    }
    let version = be32(bytes, 4).ok_or(SHORT)?;
    let backing_offset = be64(bytes, 8).ok_or(SHORT)?;
    let backing_size = be32(bytes, 16).ok_or(SHORT)?;
    let header_length = match version {
        2 => 72,
        3 => be32(bytes, 100).ok_or(SHORT)? as usize,
        _ => return Err("its qcow2 version is neither 2 nor 3"),
    };
    if !(72..=MAX_HEADER).contains(&header_length) {
        return Err("its qcow2 header length is out of range");
    }
    let mut header = Header::default();
    if backing_offset != 0 {
        if backing_size == 0 || backing_size > MAX_BACKING_NAME {
            return Err("its backing file name's length is out of range");
        }
        let start = usize::try_from(backing_offset).map_err(|_| SHORT)?;
        let end = start
            .checked_add(backing_size as usize)
            .ok_or("its backing file name lies beyond the header")?;
        let name = bytes
            .get(start..end)
            .ok_or("its backing file name lies beyond the header")?;
        let name = std::str::from_utf8(name).map_err(|_| "its backing file name is not UTF-8")?;
        if name.contains('\0') {
            return Err("its backing file name contains a NUL byte");
        }
        header.backing = Some(name.to_string());
    }
    if version == 2 {
        return Ok(header);
    }
    let mut at = header_length;
    loop {
        let kind = be32(bytes, at).ok_or(SHORT)?;
        let len = be32(bytes, at + 4).ok_or(SHORT)? as usize;
        let data_at = at + 8;
        let data = bytes
            .get(data_at..data_at.checked_add(len).ok_or(SHORT)?)
            .ok_or(SHORT)?;
        match kind {
            EXT_END => return Ok(header),
            EXT_BACKING_FORMAT => {
                let format =
                    std::str::from_utf8(data).map_err(|_| "its backing format is not UTF-8")?;
                header.backing_format = Some(format.to_string());
            }
            EXT_DATA_FILE => header.data_file = true,
            _ => {}
        }
        // Extensions are padded to 8 bytes.
        at = data_at + len.div_ceil(8) * 8;
    }
}

/// Reads `path`'s qcow2 header.
///
/// # Errors
/// The file cannot be read, or what [`parse`] refuses (as
/// `InvalidData`).
pub(super) async fn read(path: &Path) -> io::Result<Header> {
    let file = tokio::fs::File::open(path).await?;
    let mut bytes = Vec::with_capacity(MAX_HEADER);
    file.take(MAX_HEADER as u64).read_to_end(&mut bytes).await?;
    parse(&bytes).map_err(|why| io::Error::new(io::ErrorKind::InvalidData, why))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A version 3 header with `backing`, and extensions `(type, data)`.
    fn image(backing: Option<&str>, extensions: &[(u32, &[u8])]) -> Vec<u8> {
        let mut h = vec![0u8; 104];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        for (kind, data) in extensions {
            h.extend_from_slice(&kind.to_be_bytes());
            h.extend_from_slice(&(data.len() as u32).to_be_bytes());
            h.extend_from_slice(data);
            h.resize(h.len().div_ceil(8) * 8, 0);
        }
        h.extend_from_slice(&[0u8; 8]);
        if let Some(name) = backing {
            let at = h.len() as u64;
            h[8..16].copy_from_slice(&at.to_be_bytes());
            h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            h.extend_from_slice(name.as_bytes());
        }
        h
    }

    #[test]
    fn reads_the_backing_file_its_format_and_a_data_file() {
        let h = parse(&image(
            Some("/images/base.raw"),
            &[(EXT_BACKING_FORMAT, b"raw"), (EXT_DATA_FILE, b"/x")],
        ))
        .unwrap();
        assert_eq!(h.backing.as_deref(), Some("/images/base.raw"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert!(h.data_file);
        assert_eq!(parse(&image(None, &[])).unwrap(), Header::default());
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        assert!(parse(b"RAW DATA").is_err());
        let mut v4 = image(None, &[]);
        v4[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert!(parse(&v4).is_err());
        let mut beyond = image(Some("/a"), &[]);
        beyond[16..20].copy_from_slice(&100u32.to_be_bytes());
        assert!(parse(&beyond).is_err());
        let cut = image(None, &[(EXT_BACKING_FORMAT, b"qcow2")]);
        assert!(parse(&cut[..110]).is_err());
    }

    #[tokio::test]
    async fn agrees_with_qemu_img() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let top = dir.path().join("top.qcow2");
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(&top)
            .output()
            .expect("qemu-img (qemu-utils, installed by the test set-up)");
        assert!(out.status.success(), "{out:?}");
        let h = read(&top).await.unwrap();
        assert_eq!(h.backing.as_deref(), base.to_str());
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert!(!h.data_file);
        assert!(read(&base).await.is_err());
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
            let mut with_magic = MAGIC.to_be_bytes().to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = parse(&with_magic);
        }
    }
}
