//! Who may ask what: every request has an [`Access`] class decided by its
//! type alone, and every client a [`Role`] (from its certificate, or
//! `admin` for the local socket's owner); `Role::allows` (beside the
//! requests, in `request`) joins the two.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a request does, which is all an access check needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// Reads state and changes nothing.
    Read,
    /// Changes a domain, a job or the host.
    Control,
    /// The other agent's half of a migration.
    Peer,
}

/// What a client may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Admin,
    /// Another agent: the peer half of a migration (and `hello`, and
    /// asking how a job stands), for jobs it started.
    Agent,
    /// Read-only: `list`, `dom-info`, `dom-job-info`, `jobs`, metrics.
    Monitor,
}

impl Role {
    /// The role's name, as certificates and the CLI spell it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Agent => "agent",
            Role::Monitor => "monitor",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A role name [`Role`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?} (admin, agent or monitor)")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, UnknownRole> {
        match s {
            "admin" => Ok(Role::Admin),
            "agent" => Ok(Role::Agent),
            "monitor" => Ok(Role::Monitor),
            other => Err(UnknownRole(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_round_trip() {
        for role in [Role::Admin, Role::Agent, Role::Monitor] {
            assert_eq!(role.name().parse::<Role>().unwrap(), role);
        }
        assert!("root".parse::<Role>().is_err());
    }
}
