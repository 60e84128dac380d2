//! Who a certificate names and what it may do.
//!
//! A livemig certificate carries its holder's name as the subject's common
//! name and its role as the subject's organizational unit, under the
//! organization `livemig`.

use protocol::Role;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::TlsError;

/// The organization every livemig certificate's subject names.
pub const ORGANIZATION: &str = "livemig";

/// The holder of a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The certificate's common name (`pki issue DIR NAME`).
    pub name: String,
    /// What it may do.
    pub role: Role,
}

impl Identity {
    /// Reads the name and role out of a certificate (DER).
    ///
    /// # Errors
    /// [`TlsError::Certificate`] if it does not parse or names no role.
    pub fn from_certificate(der: &[u8]) -> Result<Identity, TlsError> {
        let bad = |why: String| TlsError::Certificate(why);
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| bad(format!("does not parse: {e}")))?;
        let subject = cert.subject();
        let first = |attrs: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue>| {
            attrs
                .next()
                .and_then(|a| a.as_str().ok())
                .map(str::to_string)
        };
        let name = first(&mut subject.iter_common_name())
            .ok_or_else(|| bad("names no common name".into()))?;
        let organization = first(&mut subject.iter_organization());
        if organization.as_deref() != Some(ORGANIZATION) {
            return Err(bad(format!(
                "{name:?} is not a livemig certificate (organization {organization:?})"
            )));
        }
        let role = first(&mut subject.iter_organizational_unit())
            .ok_or_else(|| bad(format!("{name:?} names no role")))?
            .parse::<Role>()
            .map_err(|e| bad(format!("{name:?}: {e}")))?;
        Ok(Identity { name, role })
    }
}
