//! The greeting QEMU sends when a client connects.

use std::fmt;

use serde::{Deserialize, Serialize};

/// QEMU's version as reported by the greeting and `query-version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QemuVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

impl QemuVersion {
    /// A version from its parts.
    pub const fn new(major: u32, minor: u32, micro: u32) -> Self {
        QemuVersion {
            major,
            minor,
            micro,
        }
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct GreetingEnvelope {
    #[serde(rename = "QMP")]
    pub qmp: Greeting,
}

/// The `QMP` object of the greeting.
#[derive(Debug, Clone, Deserialize)]
pub struct Greeting {
    /// QEMU's version.
    pub version: GreetingVersion,
    #[serde(default)]
    /// Capabilities QEMU offers to negotiate.
    pub capabilities: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GreetingVersion {
    pub qemu: QemuVersion,
    #[serde(default)]
    pub package: String,
}
