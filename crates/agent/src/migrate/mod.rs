//! The two halves of a migration (see `docs/ARCHITECTURE.md`). The QEMU
//! side of each step is in the `migration` crate; here are the peer calls,
//! the domain table and what is persisted.

pub(crate) mod destination;
pub(crate) mod source;
pub(crate) mod stream_tls;

use domain::DomainDefinition;
use migration::postcopy::PostcopyError;
use migration::Flags;
use protocol::{ApiError, ErrorCode};
use qmp::commands::migration::MigrationStatus;

use crate::errors;

/// Brings a post-copy migration whose link failed to `postcopy-paused`;
/// not in post-copy at all is an error with `not_in_postcopy`'s message.
pub(crate) async fn pause_postcopy(
    qmp: &qmp::Client,
    not_in_postcopy: impl FnOnce(Option<MigrationStatus>) -> String,
) -> Result<(), ApiError> {
    migration::postcopy::pause(qmp).await.map_err(|e| match e {
        PostcopyError::NotInPostcopy(status) => errors::operation_invalid(not_in_postcopy(status)),
        other => errors::qemu(errors::chain(&other)),
    })
}

/// `--persistent-xml`'s definition, for the domain's next start: under
/// the arriving name.
///
/// # Errors
/// A malformed one, or one under another name.
pub(crate) fn persistent_definition(
    flags: &Flags,
    arriving: &DomainDefinition,
) -> Result<Option<DomainDefinition>, ApiError> {
    let Some(doc) = &flags.options().persistent_xml else {
        return Ok(None);
    };
    let next = DomainDefinition::from_document(doc.0.clone()).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidDefinition,
            format!("--persistent-xml: {e}"),
        )
    })?;
    if next.name != arriving.name {
        return Err(errors::invalid(format!(
            "--persistent-xml defines domain '{}', not '{}'",
            next.name, arriving.name
        )));
    }
    Ok(Some(next))
}
