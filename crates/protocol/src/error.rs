//! Errors that cross between processes and keep their meaning.

use serde::{Deserialize, Serialize};

/// Error categories, stable for scripts (and CLI exit codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The request is malformed or names a bad value.
    InvalidArgument,
    /// The client's role does not allow the request.
    PermissionDenied,
    /// The definition does not validate.
    InvalidDefinition,
    /// No domain by that name.
    NoDomain,
    /// No job by that id.
    NoJob,
    /// The domain is not in a state that allows it (e.g. already running).
    OperationInvalid,
    /// The QEMU binary lacks a feature.
    Unsupported,
    /// The peer agent cannot be reached.
    PeerUnreachable,
    /// The peer agent refused or failed.
    PeerFailed,
    /// QEMU refused or failed.
    Qemu,
    /// The migration job failed or was cancelled.
    MigrationFailed,
    /// Persisting state failed.
    Storage,
    /// The other side speaks another protocol version.
    Protocol,
    /// A bug or an unexpected condition in the agent.
    Internal,
    /// A code from a newer agent.
    #[serde(other)]
    Unknown,
}

/// An error that crosses between processes keeping its meaning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The category, for scripts.
    pub code: ErrorCode,
    /// What happened, for people.
    pub message: String,
}

impl ApiError {
    /// An error of category `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
}
