//! Who is asking, and on which connection: settled before a request is
//! read, and what every handler's access checks go by.

use std::fmt;
use std::net::IpAddr;

use protocol::Role;
use tls::Identity;

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub(crate) enum Caller {
    /// The unix socket's owner, or root: an administrator.
    Local,
    /// A TLS client, as its certificate names it.
    Certified(Identity),
    /// A plaintext TCP client of an agent started `--insecure`.
    Insecure,
}

impl Caller {
    pub fn role(&self) -> Role {
        match self {
            Caller::Local | Caller::Insecure => Role::Admin,
            Caller::Certified(identity) => identity.role,
        }
    }

    /// The certificate's name, for a certified caller.
    pub fn name(&self) -> Option<&str> {
        match self {
            Caller::Certified(identity) => Some(&identity.name),
            _ => None,
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Local => f.write_str("the local administrator"),
            Caller::Certified(i) => write!(f, "{} (role {})", i.name, i.role),
            Caller::Insecure => f.write_str("a plaintext client"),
        }
    }
}

/// Where a request came from.
#[derive(Debug, Clone)]
pub(crate) struct ConnContext {
    pub id: u64,
    /// Our address on this connection (TCP only): the address a peer
    /// reached us on, hence the one its QEMU can reach ours on.
    pub local_ip: Option<IpAddr>,
    pub caller: Caller,
}
