//! Block devices as `query-block` and `query-blockstats` describe them
//! (read from the `-drive`s and the images' own headers), and the NBD
//! server, NBD nodes and mirror jobs of a disk copy ([`crate::block`]).
//! The simulated guest does no disk I/O: its counters stay at zero.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};

use super::{generic, string_arg, Outcome, QmpError};
use crate::block::mirror::{self, Source, DEFAULT_BUF_SIZE};
use crate::block::{server, JobStatus, NbdNode};
use crate::machine::{lock, Machine, Shared};

pub fn execute(shared: &Shared, name: &str, args: &Value) -> Option<Outcome> {
    if name == "blockdev-add" {
        return Some(blockdev_add(shared, args));
    }
    let mut m = lock(shared);
    Some(Outcome::Reply(match name {
        "query-block" => Ok(query_block(&m)),
        "query-blockstats" => Ok(Value::Array(
            m.config
                .drives
                .iter()
                .map(|d| {
                    json!({"device": d.id, "node-name": d.node_name,
                           "stats": {"wr_bytes": 0, "rd_bytes": 0}})
                })
                .collect(),
        )),
        "query-block-jobs" => Ok(Value::Array(
            m.block.jobs.iter().map(|j| j.info()).collect(),
        )),
        "nbd-server-start" => nbd_server_start(shared, &mut m, args),
        "block-export-add" => block_export_add(&mut m, args),
        "nbd-server-stop" => match m.block.server.take() {
            Some(_) => Ok(json!({})),
            None => Err(generic("NBD server not running")),
        },
        "blockdev-del" => blockdev_del(&mut m, args),
        "blockdev-mirror" => blockdev_mirror(shared, &mut m, args),
        "block-job-cancel" => string_arg(args, "device").and_then(|job| {
            let force = args.get("force").and_then(Value::as_bool).unwrap_or(false);
            mirror::cancel(&mut m, job, force).map(|()| json!({}))
        }),
        "block-job-set-speed" => block_job_set_speed(&mut m, args),
        "job-dismiss" => job_dismiss(&mut m, args),
        _ => return None,
    }))
}

fn query_block(m: &Machine) -> Value {
    Value::Array(
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
    )
}

/// A `tls-creds` argument names an object that exists.
fn tls_creds(m: &Machine, args: &Value) -> Result<bool, QmpError> {
    match args.get("tls-creds").and_then(Value::as_str) {
        None => Ok(false),
        Some(id) if m.objects.iter().any(|(i, _)| i == id) => Ok(true),
        Some(id) => Err(generic(format!("No TLS credentials with id '{id}'"))),
    }
}

/// An `inet` address: QEMU's legacy form (`{type, data: {host, port,
/// to}}`) or the flat one.
fn inet(addr: &Value) -> Result<(String, String, Option<u16>), QmpError> {
    let data = addr.get("data").unwrap_or(addr);
    let field = |name: &str| {
        data.get(name)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| generic(format!("Parameter '{name}' is missing")))
    };
    if addr.get("type").and_then(Value::as_str) != Some("inet") {
        return Err(generic(
            "the simulated VM serves NBD on inet addresses only",
        ));
    }
    let to = match data.get("to") {
        None => None,
        Some(to) => Some(
            to.as_u64()
                .and_then(|t| u16::try_from(t).ok())
                .ok_or_else(|| generic("Parameter 'to' expects uint16"))?,
        ),
    };
    Ok((field("host")?, field("port")?, to))
}

fn nbd_server_start(shared: &Shared, m: &mut Machine, args: &Value) -> Result<Value, QmpError> {
    if m.block.server.is_some() {
        return Err(generic("NBD server already running"));
    }
    let (host, port, to) = inet(args.get("addr").unwrap_or(&Value::Null))?;
    let tls = tls_creds(m, args)?;
    m.block.server = Some(server::start(shared, &host, &port, to, tls).map_err(generic)?);
    Ok(json!({}))
}

fn block_export_add(m: &mut Machine, args: &Value) -> Result<Value, QmpError> {
    if args.get("type").and_then(Value::as_str) != Some("nbd") {
        return Err(generic("the simulated VM exports over NBD only"));
    }
    let id = string_arg(args, "id")?.to_string();
    let node = string_arg(args, "node-name")?.to_string();
    let name = args
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or(&node)
        .to_string();
    if !m.config.drives.iter().any(|d| d.node_name == node) {
        return Err(generic(format!(
            "Cannot find device='' nor node-name='{node}'"
        )));
    }
    let Some(server) = &mut m.block.server else {
        return Err(generic("NBD server not running"));
    };
    if server.exports.iter().any(|e| e.id == id) {
        return Err(generic(format!("Block export id '{id}' is already in use")));
    }
    server.exports.push(server::Export {
        id,
        node,
        name,
        writable: args
            .get("writable")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    });
    Ok(json!({}))
}

/// `blockdev-add` of an `nbd` node: connects before it answers, as QEMU
/// does.
fn blockdev_add(shared: &Shared, args: &Value) -> Outcome {
    let checked = (|| {
        let m = lock(shared);
        if args.get("driver").and_then(Value::as_str) != Some("nbd") {
            return Err(generic("the simulated VM adds nbd nodes only"));
        }
        let node = string_arg(args, "node-name")?.to_string();
        if m.block.nodes.iter().any(|n| n.name == node)
            || m.config.drives.iter().any(|d| d.node_name == node)
        {
            return Err(generic(format!("Duplicate nodes with node-name='{node}'")));
        }
        let (host, port, _) = inet(args.get("server").unwrap_or(&Value::Null))?;
        let export = string_arg(args, "export")?.to_string();
        Ok((node, host, port, export, tls_creds(&m, args)?))
    })();
    let (node, host, port, export, tls) = match checked {
        Ok(checked) => checked,
        Err(e) => return Outcome::Reply(Err(e)),
    };
    let shared = shared.clone();
    Outcome::Pending(Box::pin(async move {
        let (stream, size) = mirror::connect(&host, &port, &export, tls)
            .await
            .map_err(generic)?;
        let mut m = lock(&shared);
        if m.block.nodes.iter().any(|n| n.name == node) {
            return Err(generic(format!("Duplicate nodes with node-name='{node}'")));
        }
        m.block.nodes.push(NbdNode {
            name: node,
            size,
            stream: Arc::new(tokio::sync::Mutex::new(stream)),
        });
        Ok(json!({}))
    }))
}

fn blockdev_del(m: &mut Machine, args: &Value) -> Result<Value, QmpError> {
    let node = string_arg(args, "node-name")?;
    let Some(at) = m.block.nodes.iter().position(|n| n.name == node) else {
        return Err(generic(format!(
            "Failed to find node with node-name='{node}'"
        )));
    };
    if m.block
        .jobs
        .iter()
        .any(|j| j.target == node && j.status != JobStatus::Concluded)
    {
        return Err(generic(format!(
            "Node '{node}' is busy: block device is in use by block job: mirror"
        )));
    }
    m.block.nodes.remove(at);
    Ok(json!({}))
}

fn blockdev_mirror(shared: &Shared, m: &mut Machine, args: &Value) -> Result<Value, QmpError> {
    let id = string_arg(args, "job-id")?.to_string();
    let device = string_arg(args, "device")?;
    let target = string_arg(args, "target")?.to_string();
    if m.block.jobs.iter().any(|j| j.id == id) {
        return Err(generic(format!("Job ID '{id}' already in use")));
    }
    let Some(drive) = m.config.drives.iter().find(|d| d.node_name == device) else {
        return Err(generic(format!(
            "Cannot find device='' nor node-name='{device}'"
        )));
    };
    let Some(node) = m.block.nodes.iter().find(|n| n.name == target) else {
        return Err(generic(format!(
            "Cannot find device='' nor node-name='{target}'"
        )));
    };
    if m.block
        .jobs
        .iter()
        .any(|j| j.target == target && j.status != JobStatus::Concluded)
    {
        return Err(generic(format!(
            "Node '{target}' is busy: block device is in use by block job: mirror"
        )));
    }
    let sync = args.get("sync").and_then(Value::as_str).unwrap_or("full");
    if sync != "full" && sync != "top" {
        return Err(generic(format!(
            "the simulated VM mirrors with sync 'full' or 'top', not '{sync}'"
        )));
    }
    let len = virtual_size(&drive.file, &drive.format);
    if node.size != len {
        return Err(generic("Source and target image have different sizes"));
    }
    let speed = non_negative(args, "speed")?.unwrap_or(0);
    let buf_size = non_negative(args, "buf-size")?.unwrap_or(DEFAULT_BUF_SIZE);
    let auto_dismiss = args
        .get("auto-dismiss")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let source = Source {
        file: drive.file.clone(),
        // With sync 'top' on a raw image there is no chain: the same bytes.
        raw: drive.format == "raw",
    };
    let stream = node.stream.clone();
    let mut job = mirror::job(&id, &target, len, speed, auto_dismiss);
    job.task = Some(
        tokio::spawn(mirror::run(shared.clone(), id, source, buf_size, stream)).abort_handle(),
    );
    m.block.jobs.push(job);
    Ok(json!({}))
}

fn non_negative(args: &Value, name: &str) -> Result<Option<u64>, QmpError> {
    match args.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| generic(format!("Parameter '{name}' expects a non-negative value"))),
    }
}

fn block_job_set_speed(m: &mut Machine, args: &Value) -> Result<Value, QmpError> {
    let id = string_arg(args, "device")?;
    let speed = non_negative(args, "speed")?.unwrap_or(0);
    let Some(job) = m.block.jobs.iter_mut().find(|j| j.id == id) else {
        return Err(("DeviceNotActive", format!("Block job '{id}' not found")));
    };
    job.speed = speed;
    Ok(json!({}))
}

fn job_dismiss(m: &mut Machine, args: &Value) -> Result<Value, QmpError> {
    let id = string_arg(args, "id")?;
    let Some(job) = m.block.jobs.iter().find(|j| j.id == id) else {
        return Err(generic("Job not found"));
    };
    if job.status != JobStatus::Concluded {
        return Err(generic(format!(
            "Job '{id}' in state '{}' cannot accept command verb 'dismiss'",
            job.status.as_str()
        )));
    }
    m.block.jobs.retain(|j| j.id != id);
    Ok(json!({}))
}

/// The size the guest sees of an image.
pub fn virtual_size(path: &Path, format: &str) -> u64 {
    image_info(path, format)["virtual-size"]
        .as_u64()
        .unwrap_or(0)
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
