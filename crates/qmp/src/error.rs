//! Errors from the QMP client.

use std::time::Duration;

use serde::Deserialize;

/// QMP's error classes (`ErrorClass` in QEMU's `qapi/error.json`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KVMMissingCap,
    #[serde(other)]
    Unknown,
}

/// Errors returned by [`crate::Client`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP I/O error")]
    Io(#[from] std::io::Error),
    #[error("QMP peer sent malformed JSON: {line:?}")]
    Malformed {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unexpected QMP greeting: {0}")]
    Greeting(String),
    #[error("QMP command `{command}` failed ({class:?}): {desc}")]
    Command {
        command: String,
        class: ErrorClass,
        desc: String,
    },
    #[error("QMP command `{command}` returned a reply we cannot decode")]
    Decode {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("QMP command `{command}` got no reply within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("QMP connection closed")]
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

pub type Result<T, E = Error> = std::result::Result<T, E>;
