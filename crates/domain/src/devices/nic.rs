//! Network interfaces: virtio-net devices on a host bridge (a tap device
//! the agent creates) or on QEMU's user-mode network.

use serde::{Deserialize, Serialize};

/// The most NICs a domain may have.
pub const MAX_NICS: usize = 8;

/// What a NIC is plugged into.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicNetwork {
    /// A tap device on a host bridge: the guest is on the bridge's L2
    /// segment, and its TCP sessions survive a migration to a host on the
    /// same segment.
    #[default]
    Bridge,
    /// QEMU's user-mode network (NAT, no root needed): outbound only, and
    /// its connections do not survive a migration.
    User,
}

/// A virtio-net NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// What it is plugged into.
    #[serde(default)]
    pub network: NicNetwork,
    /// The host bridge (with `network = "bridge"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// Its MAC address [default: 52:54:00 and three bytes from the
    /// domain's name and the NIC's position].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// Why a NIC was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NicError {
    /// More than [`MAX_NICS`].
    #[error("a domain has at most {MAX_NICS} NICs, got {0}")]
    TooMany(usize),
    /// A bridge NIC without a bridge, or a user NIC with one.
    #[error("NIC {0}: network = \"bridge\" needs bridge = \"NAME\" (and \"user\" takes none)")]
    Bridge(usize),
    /// Not an interface name.
    #[error("NIC {index}: bridge {name:?} is not an interface name (1 to 15 letters, digits, '.', '_', '-')")]
    BridgeName {
        /// Which NIC.
        index: usize,
        /// The name.
        name: String,
    },
    /// Not a unicast MAC address.
    #[error("NIC {index}: MAC {mac:?} is not a unicast address like 52:54:00:12:34:56")]
    Mac {
        /// Which NIC.
        index: usize,
        /// The address.
        mac: String,
    },
    /// Two NICs with one MAC.
    #[error("two NICs have the MAC {0}")]
    DuplicateMac(String),
}

/// A Linux interface name.
pub fn is_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn is_unicast_mac(mac: &str) -> bool {
    let octets: Vec<&str> = mac.split(':').collect();
    octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()))
        && u8::from_str_radix(octets[0], 16).is_ok_and(|first| first & 1 == 0)
}

/// FNV-1a: stable across builds and hosts, unlike std's hasher (names
/// derived from it must come out the same on every host and run).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Nic {
    /// The NIC's MAC: its own, or one derived from the domain's name and
    /// the NIC's position (the same on every host).
    pub fn mac_address(&self, domain: &str, index: usize) -> String {
        if let Some(mac) = &self.mac {
            return mac.to_ascii_lowercase();
        }
        let h = stable_hash(format!("{domain}/{index}").as_bytes()).to_be_bytes();
        format!("52:54:00:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2])
    }
}

/// Checks a domain's NICs.
///
/// # Errors
/// The first problem found.
pub fn validate(domain: &str, nics: &[Nic]) -> Result<(), NicError> {
    if nics.len() > MAX_NICS {
        return Err(NicError::TooMany(nics.len()));
    }
    let mut macs = Vec::new();
    for (index, nic) in nics.iter().enumerate() {
        match (nic.network, &nic.bridge) {
            (NicNetwork::Bridge, Some(name)) if !is_interface_name(name) => {
                return Err(NicError::BridgeName {
                    index,
                    name: name.clone(),
                })
            }
            (NicNetwork::Bridge, Some(_)) | (NicNetwork::User, None) => {}
            _ => return Err(NicError::Bridge(index)),
        }
        if let Some(mac) = nic.mac.as_ref().filter(|m| !is_unicast_mac(m)) {
            return Err(NicError::Mac {
                index,
                mac: mac.clone(),
            });
        }
        let mac = nic.mac_address(domain, index);
        if macs.contains(&mac) {
            return Err(NicError::DuplicateMac(mac));
        }
        macs.push(mac);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridged(bridge: &str) -> Nic {
        Nic {
            network: NicNetwork::Bridge,
            bridge: Some(bridge.into()),
            mac: None,
        }
    }

    #[test]
    fn a_derived_mac_is_stable_unicast_and_distinct_per_position() {
        let nic = bridged("br0");
        let first = nic.mac_address("web1", 0);
        assert_eq!(first, nic.mac_address("web1", 0));
        assert_ne!(first, nic.mac_address("web1", 1));
        assert!(first.starts_with("52:54:00:") && is_unicast_mac(&first));
    }

    #[test]
    fn bad_nics_are_named() {
        assert_eq!(
            validate(
                "d",
                &[Nic {
                    bridge: None,
                    ..bridged("x")
                }]
            ),
            Err(NicError::Bridge(0))
        );
        let user_with_bridge = Nic {
            network: NicNetwork::User,
            ..bridged("br0")
        };
        assert_eq!(validate("d", &[user_with_bridge]), Err(NicError::Bridge(0)));
        assert!(matches!(
            validate("d", &[bridged("br0; rm -rf /")]),
            Err(NicError::BridgeName { .. })
        ));
        let multicast = Nic {
            mac: Some("01:00:5e:00:00:01".into()),
            ..bridged("br0")
        };
        assert!(matches!(
            validate("d", &[multicast]),
            Err(NicError::Mac { .. })
        ));
        let same = Nic {
            mac: Some("52:54:00:00:00:01".into()),
            ..bridged("br0")
        };
        assert_eq!(
            validate("d", &[same.clone(), same]),
            Err(NicError::DuplicateMac("52:54:00:00:00:01".into()))
        );
        assert!(validate("d", &[bridged("br0"), bridged("br1")]).is_ok());
    }
}
