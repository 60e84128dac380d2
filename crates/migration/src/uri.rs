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
