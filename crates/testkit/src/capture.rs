//! What goes over the wire in a network namespace: a packet socket opened
//! inside it records the start of every TCP connection, so a test can see
//! whether a migration stream is plaintext (QEMU's `QEVM` magic) or TLS.
//!
//! Only the first [`KEEP_BYTES`] of each connection are kept; the socket's
//! buffer is large, and what a busy link drops leaves a gap that ends the
//! reassembled prefix rather than corrupting it.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{self, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};
use nix::sys::time::TimeVal;

/// How much of each connection is kept.
pub const KEEP_BYTES: u32 = 1 << 20;

/// One TCP segment seen.
#[derive(Debug, Clone)]
struct Segment {
    src_port: u16,
    dst_port: u16,
    seq: u32,
    syn: bool,
    ack: bool,
    payload: Vec<u8>,
}

/// A capture running on its own thread.
#[derive(Debug)]
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Segment>>,
}

/// What a capture saw.
#[derive(Debug)]
pub struct Captured {
    segments: Vec<Segment>,
}

impl Capture {
    /// Starts capturing every frame in the network namespace `netns`.
    ///
    /// # Errors
    /// The namespace cannot be entered or the socket opened (needs root).
    pub fn start(netns: &str) -> std::io::Result<Capture> {
        let ns = File::open(format!("/run/netns/{netns}"))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            // setns moves this thread only; the socket stays in the
            // namespace it was opened in.
            let socket = setns(&ns, CloneFlags::CLONE_NEWNET).and_then(|()| {
                let fd = socket::socket(
                    AddressFamily::Packet,
                    SockType::Raw,
                    SockFlag::empty(),
                    SockProtocol::EthAll,
                )?;
                socket::setsockopt(&fd, sockopt::RcvBufForce, &(64 << 20))?;
                socket::setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(0, 100_000))?;
                Ok(fd)
            });
            let fd = match socket {
                Ok(fd) => {
                    let _ = ready_tx.send(Ok(()));
                    fd
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(std::io::Error::from(e)));
                    return Vec::new();
                }
            };
            let mut kept: BTreeMap<(u16, u16), u32> = BTreeMap::new();
            let mut segments = Vec::new();
            let mut frame = vec![0u8; 256 * 1024];
            while !stopping.load(Ordering::Relaxed) {
                let Ok(n) = socket::recv(fd.as_raw_fd(), &mut frame, MsgFlags::empty()) else {
                    continue;
                };
                if let Some(mut segment) = parse(&frame[..n]) {
                    let total = kept
                        .entry((segment.src_port, segment.dst_port))
                        .or_default();
                    if *total >= KEEP_BYTES && !segment.syn {
                        continue;
                    }
                    *total = total.saturating_add(segment.payload.len() as u32);
                    segment.payload.truncate(KEEP_BYTES as usize);
                    segments.push(segment);
                }
            }
            segments
        });
        ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("the capture thread died"))??;
        Ok(Capture { stop, thread })
    }

    /// Stops, and returns what was seen.
    pub fn finish(self) -> Captured {
        self.stop.store(true, Ordering::Relaxed);
        Captured {
            segments: self.thread.join().unwrap_or_default(),
        }
    }
}

/// A TCP segment out of an Ethernet frame carrying IPv4.
fn parse(frame: &[u8]) -> Option<Segment> {
    let ip = frame.get(14..)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip.first()? >> 4 != 4 || *ip.get(9)? != 6 {
        return None;
    }
    let header = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let tcp = ip.get(header..total.max(header).min(ip.len()))?;
    let offset = usize::from(tcp.get(12)? >> 4) * 4;
    let flags = *tcp.get(13)?;
    Some(Segment {
        src_port: u16::from_be_bytes([tcp[0], tcp[1]]),
        dst_port: u16::from_be_bytes([tcp[2], tcp[3]]),
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        syn: flags & 0x02 != 0,
        ack: flags & 0x10 != 0,
        payload: tcp.get(offset..)?.to_vec(),
    })
}

impl Captured {
    /// Every connection opened during the capture: its server port and the
    /// start of what the client sent.
    pub fn client_streams(&self) -> Vec<(u16, Vec<u8>)> {
        let mut ports: Vec<u16> = self
            .segments
            .iter()
            .filter(|s| s.syn && !s.ack)
            .map(|s| s.dst_port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
            .into_iter()
            .filter_map(|port| Some((port, self.client_stream(port)?)))
            .collect()
    }

    /// The first bytes the client of the first connection to `port` sent,
    /// in order, up to the first gap or [`KEEP_BYTES`]; `None` if no
    /// connection to `port` was seen opening.
    pub fn client_stream(&self, port: u16) -> Option<Vec<u8>> {
        let open = self
            .segments
            .iter()
            .find(|s| s.dst_port == port && s.syn && !s.ack)?;
        let first = open.seq.wrapping_add(1);
        let mut pieces: BTreeMap<u32, &[u8]> = BTreeMap::new();
        for s in &self.segments {
            if s.src_port == open.src_port && s.dst_port == port && !s.payload.is_empty() {
                let at = s.seq.wrapping_sub(first);
                if at < KEEP_BYTES {
                    pieces.entry(at).or_insert(&s.payload);
                }
            }
        }
        let mut stream = Vec::new();
        for (at, bytes) in pieces {
            let at = at as usize;
            if at > stream.len() {
                break;
            }
            let skip = stream.len() - at;
            if skip < bytes.len() {
                stream.extend_from_slice(&bytes[skip..]);
            }
        }
        Some(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(src: u16, dst: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + 20 + payload.len()) as u16;
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&ip);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&src.to_be_bytes());
        tcp[2..4].copy_from_slice(&dst.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        f.extend_from_slice(&tcp);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn reassembles_from_the_syn_and_stops_at_a_gap() {
        let segments = [
            frame(5000, 7000, u32::MAX, 0x02, b""),
            frame(5000, 7000, 4, 0x10, b"ABC"),
            frame(5000, 7000, 0, 0x10, b"QEVM"),
            frame(5000, 7000, 2, 0x10, b"VM"),
            frame(5000, 7000, 100, 0x10, b"after a gap"),
            frame(7000, 5000, 9, 0x10, b"the other way"),
        ]
        .iter()
        .filter_map(|f| parse(f))
        .collect();
        let captured = Captured { segments };
        assert_eq!(captured.client_stream(7000).unwrap(), b"QEVMABC");
        assert!(captured.client_stream(7001).is_none());
    }
}
