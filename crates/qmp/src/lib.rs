//! An async client for the QEMU Machine Protocol.
//!
//! - [`client`]: connects to a QMP unix socket, reads the greeting, negotiates,
//!   then multiplexes commands (routed back by `id`, several in flight) and
//!   broadcasts events. Every call has a timeout; a lost connection fails every
//!   pending call.
//! - [`command`]: the [`Command`] trait tying a wire name to its argument and
//!   reply types.
//! - [`commands`]: one serde type per QMP command we use, grouped by area.
//! - [`event`]: asynchronous events (`MIGRATION`, `STOP`, ...).
//! - [`error`]: typed errors, including QMP's own error classes.
//! - `scripted` (feature `scripted`): a scripted QEMU monitor for other
//!   crates' tests.
//!
//! Every enum read from QEMU has an `Unknown`/`Other` variant and every reply
//! struct ignores fields it does not know, so a newer QEMU cannot break
//! decoding.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod command;
pub mod commands;
pub mod error;
pub mod event;
mod greeting;
#[cfg(feature = "scripted")]
pub mod scripted;

pub use client::{Client, DEFAULT_TIMEOUT};
pub use command::{Command, Empty};
pub use error::{Error, ErrorClass, Result};
pub use event::{Event, EventKind};
pub use greeting::{Greeting, QemuVersion};
