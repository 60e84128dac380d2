//! Two "hosts" on one machine: network namespaces joined by a veth pair,
//! optionally each with a bridge the veth is a port of, so that guests on
//! either host's bridge share one L2 segment.
//!
//! Names carry the test process id so parallel test binaries do not clash;
//! dropping the pair deletes both namespaces (which removes the veth too).

use std::process::Command;

/// Two namespaces, `a` at 10.77.N.1 and `b` at 10.77.N.2.
#[derive(Debug)]
pub struct NetnsPair {
    /// The first namespace's name.
    pub a: String,
    /// The second namespace's name.
    pub b: String,
    /// The first namespace's address.
    pub a_ip: String,
    /// The second namespace's address.
    pub b_ip: String,
    /// `10.77.N`: the segment's first three octets.
    pub prefix: String,
    /// The bridge in each namespace (same name in both), if bridged.
    pub bridge: Option<String>,
    veth_a: String,
    veth_b: String,
}

/// Why a namespace, link or shaping could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The tool (`ip`, `tc`) would not run.
    #[error("cannot run {tool}")]
    Run {
        /// The tool.
        tool: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It ran and refused (often: not root).
    #[error("{command} failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// What it said.
        stderr: String,
    },
    /// Its output was not what it should be.
    #[error("unexpected {tool} output {output:?}")]
    Output {
        /// The tool.
        tool: &'static str,
        /// What it printed.
        output: String,
    },
}

/// Runs `tool args...` (`prefix` goes before the arguments: `ip netns exec
/// NS`), checking that it succeeded.
pub(crate) fn run(tool: &'static str, prefix: &[&str], args: &[&str]) -> Result<(), NetnsError> {
    let program = prefix.first().copied().unwrap_or(tool);
    let out = Command::new(program)
        .args(prefix.iter().skip(1))
        .args(args)
        .output()
        .map_err(|source| NetnsError::Run { tool, source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetnsError::Failed {
            command: format!("{tool} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn ip(args: &[&str]) -> Result<(), NetnsError> {
    run("ip", &[], args)
}

impl NetnsPair {
    /// Creates the namespaces, the veth pair and addresses; brings
    /// everything up, loopback included.
    ///
    /// # Errors
    /// The failing `ip` command and its message (e.g. not root).
    pub fn create(tag: &str) -> Result<NetnsPair, NetnsError> {
        Self::make(tag, false)
    }

    /// As [`NetnsPair::create`], with a bridge `br0` in each namespace
    /// holding the veth end and the host's address: a guest with a NIC on
    /// either bridge is on the segment `PREFIX.0/24`.
    ///
    /// # Errors
    /// The failing `ip` command and its message.
    pub fn create_bridged(tag: &str) -> Result<NetnsPair, NetnsError> {
        Self::make(tag, true)
    }

    /// An address on the segment for a guest: `PREFIX.host`.
    pub fn address(&self, host: u8) -> String {
        format!("{}.{host}", self.prefix)
    }

    fn make(tag: &str, bridged: bool) -> Result<NetnsPair, NetnsError> {
        let id = std::process::id();
        let a = format!("lm-{tag}-{id}-a");
        let b = format!("lm-{tag}-{id}-b");
        let subnet = (id.wrapping_add(tag.bytes().map(u32::from).sum::<u32>()) % 250) + 1;
        // Interface names are at most 15 bytes.
        let short: String = tag.chars().take(3).collect();
        let veth_a = format!("la{short}{id}");
        let veth_b = format!("lb{short}{id}");
        let pair = NetnsPair {
            a_ip: format!("10.77.{subnet}.1"),
            b_ip: format!("10.77.{subnet}.2"),
            prefix: format!("10.77.{subnet}"),
            bridge: bridged.then(|| "br0".to_string()),
            a,
            b,
            veth_a: veth_a.clone(),
            veth_b: veth_b.clone(),
        };
        ip(&["netns", "add", &pair.a])?;
        // From here on, Drop cleans up whatever was made.
        ip(&["netns", "add", &pair.b])?;
        ip(&[
            "link", "add", &veth_a, "type", "veth", "peer", "name", &veth_b,
        ])?;
        ip(&["link", "set", &veth_a, "netns", &pair.a])?;
        ip(&["link", "set", &veth_b, "netns", &pair.b])?;
        for (ns, veth, addr, mac) in [
            (&pair.a, &veth_a, &pair.a_ip, "02:00:00:00:00:0a"),
            (&pair.b, &veth_b, &pair.b_ip, "02:00:00:00:00:0b"),
        ] {
            let dev = match &pair.bridge {
                Some(bridge) => {
                    // A bridge without an address of its own takes its
                    // lowest port's: a guest's tap coming or going would
                    // change it under the neighbours' ARP caches.
                    ip(&[
                        "-n", ns, "link", "add", bridge, "address", mac, "type", "bridge",
                    ])?;
                    ip(&["-n", ns, "link", "set", veth, "master", bridge])?;
                    ip(&["-n", ns, "link", "set", veth, "up"])?;
                    bridge
                }
                None => veth,
            };
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }
}

impl NetnsPair {
    /// Takes the link down on both ends: nothing crosses, nothing is reset
    /// (connections just stop hearing from each other).
    pub fn cut(&self) -> Result<(), NetnsError> {
        ip(&["-n", &self.a, "link", "set", &self.veth_a, "down"])?;
        ip(&["-n", &self.b, "link", "set", &self.veth_b, "down"])
    }

    /// Brings the link back.
    pub fn restore(&self) -> Result<(), NetnsError> {
        ip(&["-n", &self.a, "link", "set", &self.veth_a, "up"])?;
        ip(&["-n", &self.b, "link", "set", &self.veth_b, "up"])
    }

    /// Shapes traffic from `a` to `b` with a token bucket: `rate` such as
    /// "40mbit", queueing up to `latency` such as "200ms" (this kernel has
    /// no netem, so delay comes from queueing behind the rate).
    pub fn shape(&self, rate: &str, latency: &str) -> Result<(), NetnsError> {
        self.token_bucket(rate, "latency", latency)
    }

    /// Shapes traffic from `a` to `b` to `rate` with a queue of only
    /// `queue_bytes`: TCP overruns it and the overflow is dropped, which
    /// makes a lossy link (this kernel has no netem or random-drop action;
    /// a longer queue would push back on the sender instead of dropping).
    pub fn shape_lossy(&self, rate: &str, queue_bytes: u32) -> Result<(), NetnsError> {
        self.token_bucket(rate, "limit", &queue_bytes.to_string())
    }

    /// A `tbf` qdisc on `a`'s side; `queue` is "latency" or "limit".
    fn token_bucket(&self, rate: &str, queue: &str, size: &str) -> Result<(), NetnsError> {
        tc(
            &self.a,
            &[
                "qdisc",
                "replace",
                "dev",
                &self.veth_a,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "64kb",
                queue,
                size,
            ],
        )
    }

    /// Packets the shaping on `a`'s side has dropped so far.
    pub fn dropped_packets(&self) -> Result<u64, NetnsError> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.a, "tc", "-s", "qdisc", "show", "dev"])
            .arg(&self.veth_a)
            .output()
            .map_err(|source| NetnsError::Run { tool: "tc", source })?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "Sent 123 bytes 4 pkt (dropped 5, overlimits 6 requeues 0)"
        text.split("dropped ")
            .skip(1)
            .map(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap_or("")
                    .parse::<u64>()
                    .map_err(|_| NetnsError::Output {
                        tool: "tc",
                        output: text.to_string(),
                    })
            })
            .sum()
    }

    /// Removes shaping.
    pub fn unshape(&self) -> Result<(), NetnsError> {
        tc(&self.a, &["qdisc", "del", "dev", &self.veth_a, "root"])
    }
}

pub(crate) fn tc(ns: &str, args: &[&str]) -> Result<(), NetnsError> {
    run("tc", &["ip", "netns", "exec", ns, "tc"], args)
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = ip(&["netns", "delete", ns]);
        }
    }
}

/// A TCP connection made from inside the namespace `netns` (on a thread
/// of its own, which alone enters it; the socket stays in the namespace).
///
/// # Errors
/// The namespace cannot be entered, or the connection fails.
pub fn connect_in(
    netns: &str,
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> std::io::Result<std::net::TcpStream> {
    let ns = std::fs::File::open(format!("/run/netns/{netns}"))?;
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        std::net::TcpStream::connect_timeout(&addr, timeout)
    })
    .join()
    .map_err(|_| std::io::Error::other("the connecting thread panicked"))?
}
