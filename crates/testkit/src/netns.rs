//! Two "hosts" on one machine: network namespaces joined by a veth pair.
//!
//! Names carry the test process id so parallel test binaries do not clash;
//! dropping the pair deletes both namespaces (which removes the veth too).

use std::process::Command;

/// Two namespaces, `a` at 10.77.N.1 and `b` at 10.77.N.2.
#[derive(Debug)]
pub struct NetnsPair {
    pub a: String,
    pub b: String,
    pub a_ip: String,
    pub b_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetnsPair {
    /// Creates the namespaces, the veth pair and addresses; brings
    /// everything up, loopback included.
    ///
    /// # Errors
    /// The failing `ip` command and its message (e.g. not root).
    pub fn create(tag: &str) -> Result<NetnsPair, String> {
        let id = std::process::id();
        let a = format!("lm-{tag}-{id}-a");
        let b = format!("lm-{tag}-{id}-b");
        let subnet = (id % 250) + 1;
        let pair = NetnsPair {
            a_ip: format!("10.77.{subnet}.1"),
            b_ip: format!("10.77.{subnet}.2"),
            a,
            b,
        };
        let veth_a = format!("lmva{id}");
        let veth_b = format!("lmvb{id}");
        ip(&["netns", "add", &pair.a])?;
        // From here on, Drop cleans up whatever was made.
        ip(&["netns", "add", &pair.b])?;
        ip(&[
            "link", "add", &veth_a, "type", "veth", "peer", "name", &veth_b,
        ])?;
        ip(&["link", "set", &veth_a, "netns", &pair.a])?;
        ip(&["link", "set", &veth_b, "netns", &pair.b])?;
        for (ns, dev, addr) in [
            (&pair.a, &veth_a, &pair.a_ip),
            (&pair.b, &veth_b, &pair.b_ip),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = ip(&["netns", "delete", ns]);
        }
    }
}
