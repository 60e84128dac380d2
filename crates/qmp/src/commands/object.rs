//! QOM objects created and removed at run time (`object-add`,
//! `object-del`): TLS credentials and authorization lists for an encrypted
//! migration stream.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::command::{Command, Empty};

/// `object-add`: an object of `qom_type` named `id`, with its properties.
#[derive(Debug, Clone, Serialize)]
pub struct ObjectAdd {
    /// The QOM type (`tls-creds-x509`, `authz-list`, ...).
    #[serde(rename = "qom-type")]
    pub qom_type: String,
    /// The object's id, unique in the QEMU process.
    pub id: String,
    /// The type's properties, as QEMU names them.
    #[serde(flatten)]
    pub props: Map<String, Value>,
}

impl Command for ObjectAdd {
    const NAME: &'static str = "object-add";
    type Reply = Empty;
}

impl ObjectAdd {
    /// `tls-creds-x509` loading `dir` (QEMU's file names: `ca-cert.pem`,
    /// `server-cert.pem`, `client-key.pem`, ...) for one end of a
    /// connection, always verifying the other end's certificate.
    pub fn tls_creds_x509(id: &str, dir: &str, server: bool) -> ObjectAdd {
        let mut props = Map::new();
        props.insert("dir".into(), dir.into());
        props.insert(
            "endpoint".into(),
            if server { "server" } else { "client" }.into(),
        );
        props.insert("verify-peer".into(), true.into());
        ObjectAdd {
            qom_type: "tls-creds-x509".into(),
            id: id.into(),
            props,
        }
    }

    /// `authz-list` that admits exactly the identities given (x509
    /// distinguished names, compared as strings) and denies anything else.
    pub fn authz_exact(id: &str, identities: &[String]) -> ObjectAdd {
        let rules: Vec<Value> = identities
            .iter()
            .map(|who| serde_json::json!({ "match": who, "policy": "allow", "format": "exact" }))
            .collect();
        let mut props = Map::new();
        props.insert("policy".into(), "deny".into());
        props.insert("rules".into(), rules.into());
        ObjectAdd {
            qom_type: "authz-list".into(),
            id: id.into(),
            props,
        }
    }
}

/// `object-del`
#[derive(Debug, Clone, Serialize)]
pub struct ObjectDel {
    /// The object's id.
    pub id: String,
}

impl Command for ObjectDel {
    const NAME: &'static str = "object-del";
    type Reply = Empty;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_flat_as_qemu_wants_them() {
        let add = ObjectAdd::tls_creds_x509("t0", "/s/qemu-tls", true);
        assert_eq!(
            serde_json::to_value(&add).unwrap(),
            serde_json::json!({"qom-type": "tls-creds-x509", "id": "t0",
                "dir": "/s/qemu-tls", "endpoint": "server", "verify-peer": true})
        );
        let authz = ObjectAdd::authz_exact("z0", &["CN=a".into()]);
        assert_eq!(
            serde_json::to_value(&authz).unwrap()["rules"][0],
            serde_json::json!({"match": "CN=a", "policy": "allow", "format": "exact"})
        );
    }
}
