//! Block devices as `query-block` and `query-blockstats` describe them,
//! read from the `-drive`s and the images' own headers. The simulated
//! guest does no disk I/O and no block jobs run: copying disks is tested
//! with real QEMU.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde_json::{json, Value};

use super::QmpError;
use crate::machine::{lock, Shared};

pub fn execute(shared: &Shared, name: &str, _args: &Value) -> Option<Result<Value, QmpError>> {
    let m = lock(shared);
    Some(Ok(match name {
        "query-block" => Value::Array(
            m.config
                .drives
                .iter()
                .map(|d| {
                    let image = image_info(&d.file, &d.format);
                    json!({
                        "device": d.id,
                        "qdev": d.id.trim_start_matches("drive-"),
                        "locked": false,
                        "removable": false,
                        "type": "unknown",
                        "inserted": {
                            "file": d.file.display().to_string(),
                            "node-name": d.node_name,
                            "drv": d.format,
                            "ro": false,
                            "cache": {"writeback": d.cache != "writethrough",
                                      "direct": d.cache == "none" || d.cache == "directsync",
                                      "no-flush": d.cache == "unsafe"},
                            "image": image,
                        },
                    })
                })
                .collect(),
        ),
        "query-blockstats" => Value::Array(
            m.config
                .drives
                .iter()
                .map(|d| {
                    json!({"device": d.id, "node-name": d.node_name,
                           "stats": {"wr_bytes": 0, "rd_bytes": 0}})
                })
                .collect(),
        ),
        "query-block-jobs" => json!([]),
        _ => return None,
    }))
}

/// What an image says of itself: its size, and for qcow2 its backing file.
fn image_info(path: &Path, format: &str) -> Value {
    let mut info = json!({
        "filename": path.display().to_string(),
        "format": format,
        "virtual-size": std::fs::metadata(path).map_or(0, |m| m.len()),
    });
    if format == "qcow2" {
        if let Some((size, backing)) = qcow2_header(path) {
            info["virtual-size"] = json!(size);
            if let Some(backing) = backing {
                let full = path.parent().map_or_else(
                    || backing.clone(),
                    |dir| dir.join(&backing).display().to_string(),
                );
                info["backing-filename"] = json!(backing);
                info["full-backing-filename"] = json!(full);
            }
        }
    }
    info
}

/// A qcow2 header's virtual size and backing file name.
fn qcow2_header(path: &Path) -> Option<(u64, Option<String>)> {
    let mut file = std::fs::File::open(path).ok()?;
    let mut header = [0u8; 32];
    file.read_exact(&mut header).ok()?;
    if &header[..4] != b"QFI\xfb" {
        return None;
    }
    let be64 = |at: usize| u64::from_be_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    let backing_offset = be64(8);
    let backing_len = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes")) as usize;
    let size = be64(24);
    if backing_offset == 0 || backing_len == 0 || backing_len > 4096 {
        return Some((size, None));
    }
    file.seek(SeekFrom::Start(backing_offset)).ok()?;
    let mut name = vec![0u8; backing_len];
    file.read_exact(&mut name).ok()?;
    Some((size, Some(String::from_utf8_lossy(&name).into_owned())))
}
