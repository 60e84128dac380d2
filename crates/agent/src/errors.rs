//! The errors handlers return: constructors by code, and the conversions
//! of the agent's own errors into the API's (which crosses the wire, so it
//! carries the chain of causes as its message).

use domain::DomainName;
use protocol::{ApiError, ErrorCode};

pub(crate) fn no_domain(name: &DomainName) -> ApiError {
    ApiError::new(ErrorCode::NoDomain, format!("no domain named '{name}'"))
}

pub(crate) fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidArgument, message)
}

pub(crate) fn operation_invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::OperationInvalid, message)
}

pub(crate) fn qemu(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Qemu, message)
}

impl From<crate::store::StoreError> for ApiError {
    fn from(error: crate::store::StoreError) -> ApiError {
        ApiError::new(ErrorCode::Storage, chain(&error))
    }
}

impl From<crate::history::HistoryError> for ApiError {
    fn from(error: crate::history::HistoryError) -> ApiError {
        ApiError::new(ErrorCode::Storage, chain(&error))
    }
}

/// QEMU refused or did not answer.
pub(crate) fn qemu_failed(error: &dyn std::error::Error) -> ApiError {
    qemu(chain(error))
}

/// An error with its sources, on one line.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    types::error_chain(error)
}
