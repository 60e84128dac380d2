//! The tap devices of a domain's bridged NICs. The agent creates them (QEMU
//! runs sandboxed, with no right to spawn a helper), owned by QEMU's user,
//! attached to the bridge the definition names; they go when QEMU exits.
//!
//! Each tap carries an alias naming the agent and the domain it was made
//! for; the agent deletes only interfaces with its own alias for that
//! domain, so a name that is somebody else's (however it came to exist) is
//! an error at start, never a running guest's network cut.

use std::path::Path;
use std::time::Duration;

use domain::definition::NicNetwork;
use domain::devices::nic::stable_hash;
use domain::DomainDefinition;
use protocol::ErrorCode;
use tokio::process::Command;

use protocol::ApiError;

/// How long one `ip` command may take.
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// A domain's taps on one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Taps {
    /// The interface names, one per bridged NIC.
    pub names: Vec<String>,
    /// The alias each carries: this agent's and the domain's.
    marker: String,
}

impl Taps {
    /// The taps of `def`'s bridged NICs on the agent with `state_dir`:
    /// `lm`, ten hex digits (40 bits) of the state directory and the
    /// domain, `n` and the NIC's position in hex. Two agents on one host
    /// (a migration over loopback) get different names; one agent gets the
    /// same names again after a restart.
    pub fn of(state_dir: &Path, def: &DomainDefinition) -> Taps {
        let key = format!("{}/{}", state_dir.display(), def.name);
        let id = stable_hash(key.as_bytes()) & 0xff_ffff_ffff;
        let agent = stable_hash(state_dir.as_os_str().as_encoded_bytes());
        Taps {
            names: def
                .nics
                .iter()
                .enumerate()
                .filter(|(_, nic)| nic.network == NicNetwork::Bridge)
                .map(|(index, _)| format!("lm{id:010x}n{index:x}"))
                .collect(),
            marker: format!("livemig agent-{agent:016x} domain {}", def.name),
        }
    }

    /// Creates them (see [`create`]).
    ///
    /// # Errors
    /// As [`create`].
    pub async fn create(
        &self,
        def: &DomainDefinition,
        user: Option<&str>,
        host: &str,
    ) -> Result<(), TapError> {
        create(self, def, user, host).await
    }

    /// Removes those that are still this agent's for this domain.
    pub async fn remove(&self) {
        remove(&self.names, &self.marker).await;
    }
}

/// The alias of interface `name`, if it exists.
async fn alias_of(name: &str) -> Option<String> {
    let dir = Path::new("/sys/class/net").join(name);
    tokio::fs::metadata(&dir).await.ok()?;
    Some(
        tokio::fs::read_to_string(dir.join("ifalias"))
            .await
            .unwrap_or_default()
            .trim()
            .to_string(),
    )
}

/// Why a domain's NICs could not be attached.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TapError {
    /// The definition names a bridge the host does not have.
    #[error("domain '{domain}': there is no bridge '{bridge}' on {host}")]
    NoBridge {
        domain: String,
        bridge: String,
        host: String,
    },
    /// An interface of the tap's name exists that this agent did not make
    /// for this domain.
    #[error(
        "domain '{domain}': network interface {tap} already exists and is not one this agent \
         made for it; it is left alone (remove it if it is stale)"
    )]
    Taken { domain: String, tap: String },
    /// `ip` refused to make or attach the tap.
    #[error("domain '{domain}': cannot attach a NIC to bridge '{bridge}'")]
    Attach {
        domain: String,
        bridge: String,
        #[source]
        source: IpError,
    },
}

impl From<TapError> for ApiError {
    fn from(e: TapError) -> ApiError {
        ApiError::new(ErrorCode::OperationInvalid, types::error_chain(&e))
    }
}

/// An `ip` command that did not do its part.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IpError {
    #[error("cannot run ip")]
    Run(#[source] std::io::Error),
    #[error("ip {command}: {stderr}")]
    Refused { command: String, stderr: String },
    #[error("ip {command} took over {IP_TIMEOUT:?}")]
    Timeout { command: String },
}

async fn ip(args: &[&str]) -> Result<(), IpError> {
    let run = Command::new("ip").args(args).kill_on_drop(true).output();
    let command = || args.join(" ");
    match tokio::time::timeout(IP_TIMEOUT, run).await {
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => Err(IpError::Refused {
            command: command(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
        Ok(Err(e)) => Err(IpError::Run(e)),
        Err(_) => Err(IpError::Timeout { command: command() }),
    }
}

/// Creates the taps of `def` (named by [`names`]) on their bridges, for
/// QEMU running as `user` (the agent's own user when `None`).
///
/// # Errors
/// [`TapError`] naming the bridge that does not exist or the command that
/// failed; taps made so far are removed.
async fn create(
    owned: &Taps,
    def: &DomainDefinition,
    user: Option<&str>,
    host: &str,
) -> Result<(), TapError> {
    let taps = &owned.names;
    let marker = owned.marker.as_str();
    let bridges = def
        .nics
        .iter()
        .filter(|n| n.network == NicNetwork::Bridge)
        .filter_map(|n| n.bridge.as_deref());
    for (made, (tap, bridge)) in taps.iter().zip(bridges).enumerate() {
        let fail = |error: TapError| async {
            remove(&taps[..made], marker).await;
            Err(error)
        };
        if !Path::new("/sys/class/net")
            .join(bridge)
            .join("bridge")
            .is_dir()
        {
            return fail(TapError::NoBridge {
                domain: def.name.to_string(),
                bridge: bridge.to_string(),
                host: host.to_string(),
            })
            .await;
        }
        warn_if_address_moves(bridge);
        match alias_of(tap).await {
            // A tap this agent made for this domain, left when it crashed
            // with its QEMU.
            Some(alias) if alias == marker => {
                let _ = ip(&["link", "del", tap]).await;
            }
            Some(_) => {
                return fail(TapError::Taken {
                    domain: def.name.to_string(),
                    tap: tap.clone(),
                })
                .await
            }
            None => {}
        }
        let mut add = vec!["tuntap", "add", "dev", tap, "mode", "tap"];
        if let Some(user) = user {
            add.extend(["user", user]);
        }
        for args in [
            add,
            vec!["link", "set", "dev", tap, "alias", marker],
            vec!["link", "set", tap, "master", bridge],
            vec!["link", "set", tap, "up"],
        ] {
            if let Err(source) = ip(&args).await {
                let _ = ip(&["link", "del", tap]).await;
                return fail(TapError::Attach {
                    domain: def.name.to_string(),
                    bridge: bridge.to_string(),
                    source,
                })
                .await;
            }
        }
    }
    Ok(())
}

/// A bridge with no address of its own takes its lowest port's, so a tap
/// coming or going (a guest arriving or leaving) can change it under its
/// neighbours' ARP caches: the host, and guests talking to it, go quiet for
/// seconds. Said once per start; the fix is the operator's
/// (`ip link set BRIDGE address ...`, or the distribution's network
/// configuration).
fn warn_if_address_moves(bridge: &str) {
    const SET_BY_USER: &str = "3";
    let path = Path::new("/sys/class/net")
        .join(bridge)
        .join("addr_assign_type");
    if let Ok(kind) = std::fs::read_to_string(&path) {
        if kind.trim() != SET_BY_USER {
            tracing::warn!(
                bridge,
                "the bridge has no MAC address of its own: it changes as guests' taps come and \
                 go, which stalls traffic to this host; give it a fixed one"
            );
        }
    }
}

/// Removes taps that carry `marker`; one already gone, or another's, is
/// left.
async fn remove(taps: &[String], marker: &str) {
    for tap in taps {
        match alias_of(tap).await {
            Some(alias) if alias == marker => {
                if let Err(e) = ip(&["link", "del", tap]).await {
                    tracing::debug!(tap, error = %e, "tap not removed");
                }
            }
            Some(_) => tracing::warn!(
                tap,
                "an interface of this tap's name is not ours; left alone"
            ),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_per_agent_stable_and_fit_an_interface_name() {
        let def = DomainDefinition::from_toml(
            "name = \"web\"\nmemory_mib = 64\n[kernel]\npath = \"/k\"\n\
             [[nics]]\nbridge = \"br0\"\n[[nics]]\nnetwork = \"user\"\n[[nics]]\nbridge = \"br1\"\n",
        )
        .unwrap();
        let names = |dir: &str| Taps::of(Path::new(dir), &def).names;
        let a = names("/var/lib/a");
        assert_eq!(a.len(), 2, "user-mode NICs have no tap");
        assert!(a[0].ends_with("n0") && a[1].ends_with("n2"), "{a:?}");
        assert!(a.iter().all(|n| n.len() <= 15), "{a:?}");
        assert_eq!(a, names("/var/lib/a"));
        assert_ne!(a, names("/var/lib/b"));
        // 40 bits of the domain and the agent: a thousand domains share a
        // name with odds of about one in two million.
        assert_eq!(a[0].len(), "lm".len() + 10 + "n0".len());
    }
}
