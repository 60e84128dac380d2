//! The TCP ports a process listens on, from `/proc`: how the agent learns
//! which port QEMU bound when it let QEMU pick one (the NBD server of a
//! disk copy), so no port is chosen by binding and releasing it first.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// TCP state `LISTEN` in `/proc/net/tcp`.
const LISTEN: &str = "0A";

/// The socket inodes `pid` holds open.
async fn socket_inodes(pid: u32) -> io::Result<BTreeSet<u64>> {
    let mut inodes = BTreeSet::new();
    let mut fds = tokio::fs::read_dir(format!("/proc/{pid}/fd")).await?;
    while let Some(fd) = fds.next_entry().await? {
        let Ok(target) = tokio::fs::read_link(fd.path()).await else {
            continue;
        };
        let target = target.to_string_lossy();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
        {
            inodes.insert(inode);
        }
    }
    Ok(inodes)
}

/// An address as `/proc/net/tcp{,6}` prints it: the IP's 32-bit words in
/// host order, in hex, and the port in hex.
fn parse_address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| {
        ip.get(i * 8..i * 8 + 8)
            .and_then(|w| u32::from_str_radix(w, 16).ok())
            .map(|w| w.to_le_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The listening sockets of a `/proc/net/tcp{,6}` table whose inodes are
/// in `inodes`.
fn listening_in(table: &str, inodes: &BTreeSet<u64>) -> Vec<SocketAddr> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
            let inode: u64 = inode.parse().ok()?;
            (*state == LISTEN && inodes.contains(&inode))
                .then(|| parse_address(local))
                .flatten()
        })
        .collect()
}

/// The TCP addresses process `pid` listens on.
///
/// # Errors
/// When `/proc` cannot be read for it (gone, or not ours to look at).
pub async fn listening(pid: u32) -> io::Result<BTreeSet<SocketAddr>> {
    let inodes = socket_inodes(pid).await?;
    let mut found = BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        if let Ok(text) = tokio::fs::read_to_string(format!("/proc/{pid}/net/{table}")).await {
            found.extend(listening_in(&text, &inodes));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kernels_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
             0: 0100007F:C350 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n   \
             1: 0100007F:C351 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 0 100 0 0 10 0\n   \
             2: 0100007F:C352 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 9999 1 0 100 0 0 10 0\n";
        let ours = BTreeSet::from([4242, 4243]);
        assert_eq!(
            listening_in(table, &ours),
            vec!["127.0.0.1:50000".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            parse_address("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn finds_a_listener_of_this_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let found = listening(std::process::id()).await.unwrap();
        assert!(found.contains(&addr), "{found:?}");
        drop(listener);
        let found = listening(std::process::id()).await.unwrap();
        assert!(!found.contains(&addr), "{found:?}");
    }
}
