//! An encrypted, authenticated migration stream (`migrate --tls`): both
//! QEMUs get a `tls-creds-x509` object made from their agent's certificate.
//! The source checks that the destination's certificate names the host it
//! dials (`tls-hostname`); the destination admits only a source whose
//! certificate is the source agent's (`tls-authz`), so nobody else can feed
//! its incoming port.

use std::path::PathBuf;

use domain::qemu::argv::{TLS_CLIENT_ID, TLS_SERVER_ID};
use qmp::commands::migration::MigrationParameters;
use qmp::commands::object::{ObjectAdd, ObjectDel};
use qmp::commands::vm::QomList;
use qmp::Client;

/// The id of the destination's authorization object.
pub const AUTHZ_ID: &str = "livemig-migration-authz";

/// What one QEMU needs for a TLS migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamTls {
    /// The agent's credentials as QEMU reads them (see
    /// `tls::qemu::write_credentials`).
    pub credentials: PathBuf,
    /// Who is at the other end.
    pub peer: TlsPeer,
}

/// The other end of the stream, as one side checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsPeer {
    /// On the source: the destination's certificate must be valid for
    /// this host name or address.
    Destination {
        /// The host the source agent dialled.
        hostname: String,
    },
    /// On the destination: only a client certificate with one of these
    /// distinguished names may send.
    Source {
        /// The source agent's certificate subject, as QEMU may print it.
        distinguished_names: Vec<String>,
    },
}

/// Makes sure the QEMU behind `qmp` has the objects `tls` needs and
/// returns the migration parameters that use them.
///
/// The agent's QEMUs load the credentials at start (see
/// `domain::qemu::argv::Hardening`), while they can still read them: one
/// that runs as an unprivileged user could not later. A QEMU started
/// without them (before the agent had certificates) gets them now. The
/// destination's authorization is made afresh for each job.
///
/// # Errors
/// The QMP error of an object QEMU refuses (unreadable or invalid
/// certificates).
pub async fn set_up(qmp: &Client, tls: &StreamTls) -> Result<MigrationParameters, qmp::Error> {
    let (id, server) = match &tls.peer {
        TlsPeer::Destination { .. } => (TLS_CLIENT_ID, false),
        TlsPeer::Source { .. } => (TLS_SERVER_ID, true),
    };
    let objects = qmp
        .execute(&QomList {
            path: "/objects".into(),
        })
        .await?;
    if !objects.iter().any(|o| o.name == id) {
        let dir = tls.credentials.to_string_lossy();
        qmp.execute(&ObjectAdd::tls_creds_x509(id, &dir, server))
            .await?;
    }
    let mut params = MigrationParameters {
        tls_creds: Some(id.into()),
        ..Default::default()
    };
    match &tls.peer {
        TlsPeer::Destination { hostname } => {
            params.tls_hostname = Some(hostname.clone());
        }
        TlsPeer::Source {
            distinguished_names,
        } => {
            if objects.iter().any(|o| o.name == AUTHZ_ID) {
                qmp.execute(&ObjectDel {
                    id: AUTHZ_ID.into(),
                })
                .await?;
            }
            qmp.execute(&ObjectAdd::authz_exact(AUTHZ_ID, distinguished_names))
                .await?;
            params.tls_authz = Some(AUTHZ_ID.into());
        }
    }
    Ok(params)
}

/// The parameters that turn TLS off again on a QEMU whose parameters
/// `current` still name credentials, so a job never inherits another's.
pub fn turned_off(current: &MigrationParameters) -> MigrationParameters {
    let set = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.is_empty());
    let off = |v: &Option<String>| set(v).then(String::new);
    MigrationParameters {
        tls_creds: off(&current.tls_creds),
        tls_hostname: off(&current.tls_hostname),
        tls_authz: off(&current.tls_authz),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use protocol::job::Role;
    use protocol::MigrateOptions;
    use qmp::scripted::ScriptedQemu;
    use serde_json::json;

    use super::*;
    use crate::settings::{self, ThrottleVia};
    use crate::Flags;

    fn tls_flags() -> Flags {
        Flags::new(MigrateOptions {
            live: true,
            tls: true,
            ..Default::default()
        })
        .unwrap()
    }

    fn destination() -> StreamTls {
        StreamTls {
            credentials: "/state/qemu-tls".into(),
            peer: TlsPeer::Source {
                distinguished_names: vec!["O=livemig,OU=agent,CN=a".into()],
            },
        }
    }

    async fn apply(qmp: &qmp::Client, tls: Option<&StreamTls>, role: Role) -> settings::Previous {
        settings::apply(
            qmp,
            &tls_flags(),
            Default::default(),
            role,
            ThrottleVia::NotQemu,
            tls,
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn the_destination_admits_only_the_source_agent_and_forgets_it_after() {
        let (qmp, qemu) = ScriptedQemu::start().await;
        let previous = apply(&qmp, Some(&destination()), Role::Destination).await;

        let creds = qemu.with(|s| s.objects[TLS_SERVER_ID].clone());
        assert_eq!(creds["qom-type"], "tls-creds-x509");
        assert_eq!(creds["endpoint"], "server");
        assert_eq!(creds["verify-peer"], true);
        assert_eq!(creds["dir"], "/state/qemu-tls");
        let authz = qemu.with(|s| s.objects[AUTHZ_ID].clone());
        assert_eq!(authz["policy"], "deny");
        assert_eq!(
            authz["rules"],
            json!([{"match": "O=livemig,OU=agent,CN=a", "policy": "allow", "format": "exact"}])
        );
        assert_eq!(qemu.parameter("tls-creds"), Some(json!(TLS_SERVER_ID)));
        assert_eq!(qemu.parameter("tls-authz"), Some(json!(AUTHZ_ID)));

        settings::restore(&qmp, &previous).await.unwrap();
        assert_eq!(qemu.parameter("tls-creds"), Some(json!("")));
        assert_eq!(qemu.parameter("tls-authz"), Some(json!("")));
    }

    #[tokio::test]
    async fn the_source_checks_the_host_it_dials_and_a_later_job_replaces_the_objects() {
        let (qmp, qemu) = ScriptedQemu::start().await;
        let source = StreamTls {
            credentials: "/state/qemu-tls".into(),
            peer: TlsPeer::Destination {
                hostname: "10.0.0.2".into(),
            },
        };
        apply(&qmp, Some(&source), Role::Source).await;
        assert_eq!(
            qemu.with(|s| s.objects[TLS_CLIENT_ID]["endpoint"].clone()),
            "client"
        );
        assert_eq!(qemu.parameter("tls-hostname"), Some(json!("10.0.0.2")));
        assert!(qemu.with(|s| !s.objects.contains_key(AUTHZ_ID)));

        // The job failed and its settings were never restored (e.g. the
        // agent restarted): the next one still sets up cleanly, with the
        // credentials already there...
        apply(&qmp, Some(&source), Role::Source).await;
        assert_eq!(qemu.with(|s| s.objects.len()), 1);
        assert_eq!(qemu.calls("object-add").len(), 1);
        // ...and one without --tls turns TLS off.
        settings::apply(
            &qmp,
            &Flags::default(),
            Default::default(),
            Role::Source,
            ThrottleVia::NotQemu,
            None,
        )
        .await
        .unwrap();
        assert_eq!(qemu.parameter("tls-creds"), Some(json!("")));
        assert_eq!(qemu.parameter("tls-hostname"), Some(json!("")));
    }

    #[tokio::test]
    async fn a_second_incoming_job_admits_only_its_own_source() {
        let (qmp, qemu) = ScriptedQemu::start().await;
        apply(&qmp, Some(&destination()), Role::Destination).await;
        let other = StreamTls {
            peer: TlsPeer::Source {
                distinguished_names: vec!["O=livemig,OU=agent,CN=c".into()],
            },
            ..destination()
        };
        apply(&qmp, Some(&other), Role::Destination).await;
        assert_eq!(
            qemu.with(|s| s.objects[AUTHZ_ID]["rules"][0]["match"].clone()),
            "O=livemig,OU=agent,CN=c"
        );
    }

    #[tokio::test]
    async fn credentials_qemu_refuses_leave_the_settings_as_they_were() {
        let (qmp, qemu) = ScriptedQemu::start().await;
        qemu.on("object-add", |_, _| {
            Some(Err((
                "GenericError",
                "Unable to access credentials /state/qemu-tls/ca-cert.pem".into(),
            )))
        });
        let err = settings::apply(
            &qmp,
            &tls_flags(),
            Default::default(),
            Role::Destination,
            ThrottleVia::NotQemu,
            Some(&destination()),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("ca-cert.pem"), "{err}");
        assert_eq!(qemu.parameter("tls-creds"), Some(json!("")));
        assert!(qemu.calls("migrate-set-parameters").is_empty());
    }
}
