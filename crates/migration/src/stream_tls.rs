//! An encrypted, authenticated migration stream (`migrate --tls`): both
//! QEMUs get a `tls-creds-x509` object made from their agent's certificate.
//! The source checks that the destination's certificate names the host it
//! dials (`tls-hostname`); the destination admits only a source whose
//! certificate is the source agent's (`tls-authz`), so nobody else can feed
//! its incoming port.

use std::path::PathBuf;

use qmp::commands::migration::MigrationParameters;
use qmp::commands::object::{ObjectAdd, ObjectDel};
use qmp::Client;

/// The id of the credentials object in a QEMU.
pub const CREDENTIALS_ID: &str = "livemig-migration-tls";
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

/// Creates the objects `tls` needs in the QEMU behind `qmp` (replacing any
/// an earlier job left, so renewed certificates are read again) and returns
/// the migration parameters that use them.
///
/// # Errors
/// The QMP error of an object QEMU refuses (unreadable or invalid
/// certificates).
pub async fn set_up(qmp: &Client, tls: &StreamTls) -> Result<MigrationParameters, qmp::Error> {
    for id in [CREDENTIALS_ID, AUTHZ_ID] {
        // Absent on a QEMU that never migrated with TLS.
        let _ = qmp.execute(&ObjectDel { id: id.into() }).await;
    }
    let dir = tls.credentials.to_string_lossy();
    let mut params = MigrationParameters {
        tls_creds: Some(CREDENTIALS_ID.into()),
        ..Default::default()
    };
    match &tls.peer {
        TlsPeer::Destination { hostname } => {
            qmp.execute(&ObjectAdd::tls_creds_x509(CREDENTIALS_ID, &dir, false))
                .await?;
            params.tls_hostname = Some(hostname.clone());
        }
        TlsPeer::Source {
            distinguished_names,
        } => {
            qmp.execute(&ObjectAdd::tls_creds_x509(CREDENTIALS_ID, &dir, true))
                .await?;
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

        let creds = qemu.with(|s| s.objects[CREDENTIALS_ID].clone());
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
        assert_eq!(qemu.parameter("tls-creds"), Some(json!(CREDENTIALS_ID)));
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
            qemu.with(|s| s.objects[CREDENTIALS_ID]["endpoint"].clone()),
            "client"
        );
        assert_eq!(qemu.parameter("tls-hostname"), Some(json!("10.0.0.2")));
        assert!(qemu.with(|s| !s.objects.contains_key(AUTHZ_ID)));

        // The job failed and its settings were never restored (e.g. the
        // agent restarted): the next one still sets up cleanly...
        apply(&qmp, Some(&source), Role::Source).await;
        assert_eq!(qemu.with(|s| s.objects.len()), 1);
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
