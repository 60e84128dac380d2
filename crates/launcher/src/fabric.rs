//! Several "hosts" on one machine: a network namespace each, all joined by
//! veth pairs to one bridge in the machine's own namespace, which holds
//! the segment's last address so that processes outside the namespaces (an
//! etcd, a controller, the CLI) reach every host. Each host's link can be
//! capped both ways. Names carry the process id; dropping the fabric
//! deletes the namespaces (and with them the veths) and the bridge.

use crate::netns::{run, tc, NetnsError};

/// One host of a [`Fabric`].
#[derive(Debug, Clone)]
pub struct FabricHost {
    /// Its namespace.
    pub netns: String,
    /// Its address.
    pub ip: String,
    /// Its end of the veth, inside the namespace.
    veth_inside: String,
    /// The bridge's end, outside.
    veth_outside: String,
}

impl FabricHost {
    /// Bytes this host has sent onto the segment (what the bridge's end of
    /// its veth received), from the kernel's counters.
    pub fn sent_bytes(&self) -> Option<u64> {
        std::fs::read_to_string(format!(
            "/sys/class/net/{}/statistics/rx_bytes",
            self.veth_outside
        ))
        .ok()?
        .trim()
        .parse()
        .ok()
    }
}

/// Hosts on one segment.
#[derive(Debug)]
pub struct Fabric {
    /// The hosts, at `PREFIX.1`, `PREFIX.2`, ...
    pub hosts: Vec<FabricHost>,
    /// The address outside the namespaces, on the bridge (`PREFIX.254`).
    pub gateway_ip: String,
    bridge: String,
}

fn ip(args: &[&str]) -> Result<(), NetnsError> {
    run("ip", &[], args)
}

impl Fabric {
    /// Creates `count` hosts (at most 200) on a bridge.
    ///
    /// # Errors
    /// The failing `ip` command and its message (e.g. not root).
    pub fn create(tag: &str, count: usize) -> Result<Fabric, NetnsError> {
        let id = std::process::id();
        let subnet = (id.wrapping_add(tag.bytes().map(u32::from).sum::<u32>()) % 250) + 1;
        let prefix = format!("10.78.{subnet}");
        let short: String = tag.chars().take(3).collect();
        let bridge = format!("lf{short}{id}");
        let mut fabric = Fabric {
            hosts: Vec::new(),
            gateway_ip: format!("{prefix}.254"),
            bridge: bridge.clone(),
        };
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", fabric.gateway_ip),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 1..=count.min(200) {
            let host = FabricHost {
                netns: format!("lm-{tag}-{id}-{i}"),
                ip: format!("{prefix}.{i}"),
                veth_inside: format!("li{short}{id}{i}"),
                veth_outside: format!("lo{short}{id}{i}"),
            };
            ip(&["netns", "add", &host.netns])?;
            // From here on, Drop removes it.
            fabric.hosts.push(host.clone());
            ip(&[
                "link",
                "add",
                &host.veth_outside,
                "type",
                "veth",
                "peer",
                "name",
                &host.veth_inside,
            ])?;
            ip(&["link", "set", &host.veth_inside, "netns", &host.netns])?;
            ip(&["link", "set", &host.veth_outside, "master", &bridge])?;
            ip(&["link", "set", &host.veth_outside, "up"])?;
            let ns = host.netns.as_str();
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", host.ip),
                "dev",
                &host.veth_inside,
            ])?;
            ip(&["-n", ns, "link", "set", &host.veth_inside, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(fabric)
    }

    /// Caps every host's link at `mib_s` MiB/s each way (a token bucket on
    /// both ends of its veth).
    ///
    /// # Errors
    /// The failing `tc` command.
    pub fn cap(&self, mib_s: u64) -> Result<(), NetnsError> {
        let rate = format!("{}mbit", mib_s * 8 * 1024 * 1024 / 1_000_000);
        for host in &self.hosts {
            let tbf = |dev: &str| -> Vec<String> {
                [
                    "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", "256kb",
                    "latency", "100ms",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect()
            };
            let inside = tbf(&host.veth_inside);
            let inside: Vec<&str> = inside.iter().map(String::as_str).collect();
            tc(&host.netns, &inside)?;
            let outside = tbf(&host.veth_outside);
            let outside: Vec<&str> = outside.iter().map(String::as_str).collect();
            run("tc", &[], &outside)?;
        }
        Ok(())
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        for host in &self.hosts {
            let _ = ip(&["netns", "delete", &host.netns]);
        }
        let _ = ip(&["link", "delete", &self.bridge]);
    }
}
