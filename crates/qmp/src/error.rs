//! Errors from the QMP client.

use std::time::Duration;

use serde::Deserialize;

/// QMP's error classes (`ErrorClass` in QEMU's `qapi/error.json`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub enum ErrorClass {
    /// Anything else QEMU refuses.
    GenericError,
    /// No such command.
    CommandNotFound,
    /// The device is not active.
    DeviceNotActive,
    /// No such device.
    DeviceNotFound,
    /// KVM lacks a capability.
    KVMMissingCap,
    #[serde(other)]
    /// A class this crate does not know.
    Unknown,
}

/// Errors returned by [`crate::Client`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to QMP socket {path}")]
    /// The socket could not be reached.
    Connect {
        /// The socket.
        path: String,
        #[source]
        /// Why.
        source: std::io::Error,
    },
    #[error("QMP I/O error")]
    /// Reading or writing failed.
    Io(#[from] std::io::Error),
    #[error("QMP peer sent malformed JSON: {line:?}")]
    /// A line that is not JSON.
    Malformed {
        /// The line.
        line: String,
        #[source]
        /// Why.
        source: serde_json::Error,
    },
    #[error("unexpected QMP greeting: {0}")]
    /// The peer does not greet like QEMU.
    Greeting(String),
    #[error("QMP command `{command}` failed ({class:?}): {desc}")]
    /// QEMU refused a command.
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: ErrorClass,
        /// QEMU's description.
        desc: String,
    },
    #[error("QMP command `{command}` returned a reply we cannot decode")]
    /// A reply that does not decode.
    Decode {
        /// The command.
        command: String,
        #[source]
        /// Why.
        source: serde_json::Error,
    },
    #[error("QMP command `{command}` got no reply within {timeout:?}")]
    /// No reply in time.
    Timeout {
        /// The command.
        command: String,
        /// How long we waited.
        timeout: Duration,
    },
    #[error("QMP connection closed")]
    /// The connection is gone.
    Disconnected,
}

impl Error {
    /// True when QEMU rejected the command because it does not have it.
    pub fn is_command_not_found(&self) -> bool {
        matches!(
            self,
            Error::Command {
                class: ErrorClass::CommandNotFound,
                ..
            }
        )
    }
}

/// A QMP result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
