//! Constructors for the errors handlers return.

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

pub(crate) fn storage(error: &crate::store::StoreError) -> ApiError {
    ApiError::new(ErrorCode::Storage, chain(error))
}

/// An error with its sources, on one line.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    types::error_chain(error)
}
