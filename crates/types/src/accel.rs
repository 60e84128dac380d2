//! The accelerator QEMU runs a guest with.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The accelerator QEMU runs the guest with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// QEMU's own translator: works everywhere, the default.
    #[default]
    Tcg,
    /// The host's KVM.
    Kvm,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        })
    }
}

/// A name [`Accel`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown accelerator {0:?} (tcg or kvm)")]
pub struct UnknownAccel(pub String);

impl std::str::FromStr for Accel {
    type Err = UnknownAccel;

    fn from_str(s: &str) -> Result<Self, UnknownAccel> {
        match s {
            "tcg" => Ok(Accel::Tcg),
            "kvm" => Ok(Accel::Kvm),
            other => Err(UnknownAccel(other.to_string())),
        }
    }
}
