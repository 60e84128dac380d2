//! What to do next, for the errors people hit most.

use protocol::{ClientError, ErrorCode};

/// A hint for `error`, if there is one.
pub fn hint(error: &anyhow::Error) -> Option<&'static str> {
    let client = error.downcast_ref::<ClientError>()?;
    match client {
        ClientError::Connect { .. } => Some(
            "is livemigd running? Without -c or LIVEMIG_URI this talks to the local agent at \
             /run/livemig/livemigd.sock (contrib/livemigd.service); for another, pass -c \
             unix:///DIR/livemigd.sock or -c tls://HOST:PORT",
        ),
        ClientError::Api(api) => api_hint(api.code),
        ClientError::Tls { .. } => Some(
            "the agent's certificate must name the host you dialled (`livemig pki issue ... \
             --host HOST`), and yours must come from the same CA",
        ),
        ClientError::NoCredentials { .. } => Some(
            "issue yourself a certificate with `livemig pki issue PKI NAME --role admin` and \
             pass its directory with --tls-dir",
        ),
        _ => None,
    }
}

fn api_hint(code: ErrorCode) -> Option<&'static str> {
    use ErrorCode::*;
    match code {
        NoDomain => Some("`livemig list --all` shows the domains this agent knows"),
        NoJob => Some("`livemig jobs` lists finished jobs; `livemig domjobinfo DOMAIN` the running one"),
        Unsupported => Some(
            "`livemig domcapabilities` on each host lists what its QEMU supports; drop the flag or \
             upgrade QEMU there",
        ),
        PeerUnreachable => Some(
            "check the destination agent runs and listens on that address (livemigd --listen \
             tcp://HOST:PORT) and that this host can reach it",
        ),
        InvalidDefinition => Some("fix the definition file; README.md shows every key"),
        OperationInvalid => Some("`livemig dominfo DOMAIN` shows its state and any active job"),
        PermissionDenied => Some(
            "your certificate's role does not allow this: monitor reads, agent does only the peer \
             half of a migration, admin does everything",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_domain_and_a_dead_agent_get_their_hints() {
        let api: anyhow::Error = ClientError::Api(protocol::ApiError::new(
            ErrorCode::NoDomain,
            "no domain named 'x'",
        ))
        .into();
        assert!(hint(&api).unwrap().contains("list --all"));
        let connect: anyhow::Error = ClientError::Connect {
            uri: "unix:///x".into(),
            source: std::io::ErrorKind::NotFound.into(),
        }
        .into();
        assert!(hint(&connect).unwrap().contains("livemigd running"));
        assert_eq!(hint(&anyhow::anyhow!("other")), None);
    }
}
