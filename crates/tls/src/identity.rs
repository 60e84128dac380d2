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
    /// The subject's attributes as `TYPE=value` (RFC 4514 escaping), in
    /// the certificate's order: what QEMU's TLS authorization compares.
    pub subject: Vec<String>,
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
        let subject = subject
            .iter()
            .flat_map(|rdn| rdn.iter())
            .map(|attr| {
                let kind = x509_parser::objects::oid2abbrev(
                    attr.attr_type(),
                    x509_parser::objects::oid_registry(),
                )
                .map_or_else(|_| attr.attr_type().to_id_string(), str::to_string);
                let value = attr.as_str().map_err(|_| {
                    bad(format!(
                        "{name:?} has a subject attribute {kind} that is not text"
                    ))
                })?;
                Ok(format!("{kind}={}", escape(value)))
            })
            .collect::<Result<_, TlsError>>()?;
        Ok(Identity {
            name,
            role,
            subject,
        })
    }

    /// The subject as a distinguished name string, in both of the orders
    /// TLS libraries print one (the certificate's, and RFC 4514's reverse):
    /// GnuTLS, which QEMU uses, has printed each in different versions.
    pub fn distinguished_names(&self) -> [String; 2] {
        let forward = self.subject.join(",");
        let mut reversed = self.subject.clone();
        reversed.reverse();
        [forward, reversed.join(",")]
    }
}

/// Escapes an attribute value as RFC 4514 asks.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == value.chars().count() && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_characters_are_escaped() {
        assert_eq!(escape("a,b"), "a\\,b");
        assert_eq!(escape(" x "), "\\ x\\ ");
        assert_eq!(escape("plain-name.1"), "plain-name.1");
    }
}
