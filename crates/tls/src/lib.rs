//! Mutual TLS for livemig: every TCP connection between a client and an
//! agent, or between two agents, is TLS with a certificate on both sides,
//! issued by the cluster's CA; a client's certificate names its role.
//!
//! - [`pki`]: the CA (`pki init`), certificates with a role and hosts
//!   (`pki issue`), and revocation (`pki revoke`, a CRL every agent checks).
//! - [`dir`]: a TLS directory (`ca.pem`, `cert.pem`, `key.pem`), as a daemon
//!   or a client uses it, and the rustls configurations built from it.
//! - [`qemu`]: the same credentials laid out as QEMU reads them, for
//!   encrypted migration streams.
//! - [`identity`]: who a certificate names (its common name) and what it
//!   may do (its role).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod dir;
pub mod identity;
pub mod pki;
pub mod qemu;

pub use dir::{TlsDir, TlsError};
pub use identity::Identity;

/// The file names of a TLS directory.
pub mod files {
    /// The CA certificate both sides trust.
    pub const CA: &str = "ca.pem";
    /// This side's certificate.
    pub const CERT: &str = "cert.pem";
    /// This side's private key.
    pub const KEY: &str = "key.pem";
    /// The CA's private key (in the PKI directory only).
    pub const CA_KEY: &str = "ca-key.pem";
    /// The CA's list of revoked certificates (optional in a TLS
    /// directory; `pki revoke` writes it in the PKI directory).
    pub const CRL: &str = "crl.pem";
    /// What `pki revoke` has revoked, a line each (PKI directory only).
    pub const REVOKED: &str = "revoked.txt";
}
