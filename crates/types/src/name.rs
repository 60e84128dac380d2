//! Domain names. They end up in file names and QEMU arguments, so they are
//! restricted to a safe alphabet before they touch anything.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

const MAX_LEN: usize = 64;

/// A validated domain name: 1–64 characters of `[A-Za-z0-9._-]`, starting
/// with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DomainName(String);

/// A name [`DomainName`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid domain name {name:?}: {reason}")]
pub struct InvalidName {
    /// The name as given.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl DomainName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DomainName {
    type Error = InvalidName;

    fn try_from(name: String) -> Result<Self, InvalidName> {
        let reason = if name.is_empty() {
            Some("it is empty")
        } else if name.len() > MAX_LEN {
            Some("it is longer than 64 characters")
        } else if !name.as_bytes()[0].is_ascii_alphanumeric() {
            Some("it must start with a letter or a digit")
        } else if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            Some("only letters, digits, '.', '_' and '-' are allowed")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(InvalidName { name, reason }),
            None => Ok(DomainName(name)),
        }
    }
}

impl FromStr for DomainName {
    type Err = InvalidName;

    fn from_str(s: &str) -> Result<Self, InvalidName> {
        DomainName::try_from(s.to_string())
    }
}

impl From<DomainName> for String {
    fn from(name: DomainName) -> String {
        name.0
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in ["web1", "db-primary", "a.b_c", "9lives"] {
            assert!(name.parse::<DomainName>().is_ok(), "{name}");
        }
    }

    #[test]
    fn rejects_names_that_could_escape_a_directory_or_an_option() {
        for name in [
            "",
            "../etc",
            ".hidden",
            "a/b",
            "a,b",
            "a b",
            "-rf",
            &"x".repeat(65),
        ] {
            assert!(name.parse::<DomainName>().is_err(), "{name:?}");
        }
    }
}
