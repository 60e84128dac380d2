//! One serde type per QMP command, grouped by area.
//!
//! Argument structs serialize to QEMU's kebab-case names; reply structs accept
//! any extra field and every field QEMU may omit is an `Option`.

pub mod block;
pub mod dirty_rate;
pub mod migration;
pub mod object;
pub mod vm;

/// Declares a command without arguments.
macro_rules! unit_command {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $reply:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, serde::Serialize)]
        pub struct $ty;

        impl $crate::command::Command for $ty {
            const NAME: &'static str = $name;
            type Reply = $reply;
        }
    };
}
pub(crate) use unit_command;
