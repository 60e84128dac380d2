//! Agent addresses: `unix:///run/livemig.sock`, `tls://host:port` (mutual
//! TLS) or `tcp://host:port` (plaintext, for agents started `--insecure`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where an agent listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AgentUri {
    /// `unix:///PATH`: the local socket.
    Unix(PathBuf),
    /// `tcp://HOST:PORT`: plaintext.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// `tls://HOST:PORT`: mutual TLS; the agent's certificate must name
    /// `HOST`.
    Tls {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

/// A URI [`AgentUri`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad agent URI {uri:?}: {reason} (expected unix:///PATH, tls://HOST:PORT or tcp://HOST:PORT)"
)]
pub struct BadAgentUri {
    /// The URI as given.
    pub uri: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for AgentUri {
    type Err = BadAgentUri;

    fn from_str(uri: &str) -> Result<Self, BadAgentUri> {
        let bad = |reason| BadAgentUri {
            uri: uri.to_string(),
            reason,
        };
        if let Some(path) = uri.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad("the socket path must be absolute"));
            }
            return Ok(AgentUri::Unix(PathBuf::from(path)));
        }
        let (tls, rest) = match (uri.strip_prefix("tls://"), uri.strip_prefix("tcp://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            (None, None) => return Err(bad("unknown scheme")),
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = types::net::split_host_port(rest).map_err(bad)?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?;
        let host = host.to_string();
        Ok(if tls {
            AgentUri::Tls { host, port }
        } else {
            AgentUri::Tcp { host, port }
        })
    }
}

impl AgentUri {
    /// The host and port of a network address (TLS or TCP).
    pub fn host_port(&self) -> Option<(&str, u16)> {
        match self {
            AgentUri::Unix(_) => None,
            AgentUri::Tcp { host, port } | AgentUri::Tls { host, port } => Some((host, *port)),
        }
    }
}

impl fmt::Display for AgentUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentUri::Unix(path) => write!(f, "unix://{}", path.display()),
            AgentUri::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp://[{host}]:{port}")
            }
            AgentUri::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            AgentUri::Tls { host, port } if host.contains(':') => {
                write!(f, "tls://[{host}]:{port}")
            }
            AgentUri::Tls { host, port } => write!(f, "tls://{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_schemes_and_prints_them_back() {
        for uri in [
            "unix:///run/livemig.sock",
            "tcp://10.0.0.2:7000",
            "tcp://[::1]:7000",
            "tls://10.0.0.2:7000",
            "tls://[::1]:7000",
        ] {
            assert_eq!(uri.parse::<AgentUri>().unwrap().to_string(), uri);
        }
    }

    #[test]
    fn refuses_malformed_uris() {
        for uri in [
            "",
            "qemu:///system",
            "unix://rel/path",
            "tcp://host",
            "tcp://:1",
            "tcp://h:0",
            "tcp://h:x",
            "tcp://a b:1",
            "tls://h:0",
            "https://h:1",
        ] {
            assert!(uri.parse::<AgentUri>().is_err(), "{uri}");
        }
    }
}
