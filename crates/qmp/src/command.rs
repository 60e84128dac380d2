//! The typed-command contract.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A QMP command: its wire name, its arguments (the implementing type) and
/// its reply type. Commands without arguments are unit structs, which
/// serialize to `null` and are sent without `arguments`.
pub trait Command: Serialize {
    /// The command's wire name.
    const NAME: &'static str;
    /// What a successful reply decodes to.
    type Reply: DeserializeOwned;
}

/// The empty `{}` reply of commands that return nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Empty {}
