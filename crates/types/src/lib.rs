//! The vocabulary every livemig crate shares, and nothing else: the wire
//! protocol and the libraries both speak it, so it sits under both.
//!
//! - [`name`]: validated domain names (they become file names).
//! - [`accel`]: the accelerator a guest runs with.
//! - [`units`]: bandwidths, throttles and byte counts, with the conversions
//!   that happen where units cross a boundary (MiB/s on the wire, bytes/s
//!   inside; percent on the wire, fractions inside).
//! - [`net`]: `HOST:PORT` as both agent and migration URIs write it.
//! - [`error_chain`]: an error and its sources on one line.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod accel;
pub mod name;
pub mod net;
pub mod units;

pub use accel::Accel;
pub use name::{DomainName, InvalidName};
pub use units::{Bandwidth, Throttle, MIB};

/// An error and its sources on one line, skipping a source whose text its
/// parent already includes.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: inner")]
    struct Repeats(#[source] Inner);

    #[test]
    fn chains_sources_once() {
        assert_eq!(error_chain(&Outer(Inner)), "outer: inner");
        assert_eq!(error_chain(&Repeats(Inner)), "outer: inner");
    }
}
