//! The two halves of a migration (see `docs/ARCHITECTURE.md`).

pub(crate) mod destination;
pub(crate) mod postcopy;
pub(crate) mod source;
