//! The QMP commands a simulated VM answers: the ones livemig sends, with
//! QEMU 7.2's replies and refusals. Anything else is `CommandNotFound`, as
//! from a QEMU that lacks it, and `query-commands` lists only these.

mod block;
mod migration;
mod vm;

use std::future::Future;
use std::pin::Pin;

use serde_json::Value;

pub use block::virtual_size;

use crate::machine::Shared;

/// A QMP error: class and description.
pub type QmpError = (&'static str, String);

/// What a command comes to.
pub enum Outcome {
    /// A reply.
    Reply(Result<Value, QmpError>),
    /// Reply, then exit (`quit`).
    Quit,
    /// A reply once this is done (QEMU's monitor waits too, e.g. while
    /// `blockdev-add` connects).
    Pending(Pin<Box<dyn Future<Output = Result<Value, QmpError>> + Send>>),
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Reply(reply) => f.debug_tuple("Reply").field(reply).finish(),
            Outcome::Quit => f.write_str("Quit"),
            Outcome::Pending(_) => f.write_str("Pending"),
        }
    }
}

/// A `GenericError`.
pub fn generic(desc: impl Into<String>) -> QmpError {
    ("GenericError", desc.into())
}

/// Every command, by name.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-machines",
    "query-kvm",
    "query-command-line-options",
    "query-status",
    "query-cpus-fast",
    "query-name",
    "stop",
    "cont",
    "quit",
    "announce-self",
    "object-add",
    "object-del",
    "qom-list",
    "query-migrate",
    "query-migrate-capabilities",
    "migrate-set-capabilities",
    "query-migrate-parameters",
    "migrate-set-parameters",
    "migrate",
    "migrate-incoming",
    "migrate_cancel",
    "migrate-continue",
    "migrate-start-postcopy",
    "calc-dirty-rate",
    "query-dirty-rate",
    "query-block",
    "query-blockstats",
    "query-block-jobs",
    "nbd-server-start",
    "block-export-add",
    "nbd-server-stop",
    "blockdev-add",
    "blockdev-del",
    "blockdev-mirror",
    "block-job-cancel",
    "block-job-set-speed",
    "job-dismiss",
    "x-livemig-query-ram",
];

/// Runs one command.
pub fn execute(shared: &Shared, name: &str, args: &Value) -> Outcome {
    if let Some(reply) = vm::execute(shared, name, args) {
        return reply;
    }
    if let Some(outcome) = block::execute(shared, name, args) {
        return outcome;
    }
    let reply = migration::execute(shared, name, args).unwrap_or_else(|| {
        Err((
            "CommandNotFound",
            format!("The command {name} has not been found"),
        ))
    });
    Outcome::Reply(reply)
}

/// An argument that must be a string.
pub fn string_arg<'a>(args: &'a Value, name: &str) -> Result<&'a str, QmpError> {
    args.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| generic(format!("Parameter '{name}' is missing")))
}
