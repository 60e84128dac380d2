//! A compromised peer agent: a mutual-TLS endpoint with a valid agent
//! certificate from the cluster's CA that passes every request on to a real
//! agent and rewrites its replies as the test says, e.g. a Prepare answered
//! with a data URI that would send the guest's memory elsewhere.

use std::sync::Arc;
use std::time::Duration;

use protocol::codec::{read_message, write_message};
use protocol::envelope::{RequestEnvelope, ResponseEnvelope, ResponseResult};
use protocol::{AgentUri, ApiError, Client, ErrorCode, Reply, PROTOCOL_VERSION};
use tokio::io::BufReader;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::{Host, TestBed};

/// How the rogue changes a real reply.
pub type Rewrite = Arc<dyn Fn(Reply) -> Reply + Send + Sync>;

/// The rogue peer; dropping it stops it.
#[derive(Debug)]
pub struct RoguePeer {
    uri: String,
    task: JoinHandle<()>,
}

impl Drop for RoguePeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The rogue's TLS directory: an agent certificate named `rogue` from the
/// bed's CA, as every host of the cluster has one.
fn rogue_tls(bed: &TestBed) -> tls::TlsDir {
    let issued = bed.path().join("pki/rogue");
    let dir = if issued.exists() {
        issued
    } else {
        bed.certificate("rogue", protocol::Role::Agent, &["127.0.0.1"])
    };
    tls::TlsDir::load(&dir).expect("the rogue's certificate")
}

/// A compromised peer talking to `host` directly, with its own agent
/// certificate: whatever peer request it likes, as a host of the cluster.
///
/// # Panics
/// If the certificate cannot be set up or `host` does not answer.
pub async fn client(bed: &TestBed, host: &Host) -> Client {
    let config = rogue_tls(bed)
        .client_config()
        .expect("a client configuration");
    let uri: AgentUri = host.uri().parse().expect("the agent's URI");
    Client::connect_with(&uri, Some(&config))
        .await
        .expect("the rogue connects")
}

/// A `peer-prepare` for `definition` as a source running it on QEMU 7.2
/// under TCG would send it, with `flags` and the disks it copies, under a
/// new job id.
pub fn prepare(
    definition: &domain::DomainDefinition,
    flags: protocol::MigrateOptions,
    storage: Vec<protocol::migrate::StorageCopy>,
) -> protocol::Request {
    use domain::qemu::RamLayout;
    let ram = RamLayout::for_domain(
        definition.memory_mib,
        definition.accel,
        qmp::QemuVersion::new(7, 2, 0),
    );
    protocol::Request::PeerPrepare(Box::new(protocol::migrate::PrepareRequest {
        job_id: uuid::Uuid::new_v4().to_string(),
        definition: protocol::domain::DefinitionDoc(definition.to_document()),
        spec: protocol::migrate::LaunchSpec {
            machine: "pc-i440fx-7.2".into(),
            accel: definition.accel,
            ram: protocol::migrate::RamLayout {
                bytes: ram.bytes,
                backend: ram.backend,
            },
        },
        flags,
        source: "tls://127.0.0.1:1".into(),
        storage,
    }))
}

impl RoguePeer {
    /// Listens on loopback with an agent certificate named `rogue`,
    /// forwarding to `real` with the same certificate.
    ///
    /// # Panics
    /// If the certificate or the listener cannot be set up.
    pub async fn start(bed: &TestBed, real: &Host, rewrite: Rewrite) -> RoguePeer {
        let tls = rogue_tls(bed);
        let acceptor = TlsAcceptor::from(tls.server_config().expect("a server configuration"));
        let client_config = tls.client_config().expect("a client configuration");
        let upstream: AgentUri = real.uri().parse().expect("the real agent's URI");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let uri = format!("tls://{}", listener.local_addr().expect("address"));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let upstream = upstream.clone();
                let client_config = client_config.clone();
                let rewrite = rewrite.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let Ok(real) = Client::connect_with(&upstream, Some(&client_config)).await
                    else {
                        return;
                    };
                    let (read, mut write) = tokio::io::split(stream);
                    let mut read = BufReader::new(read);
                    while let Ok(Some(envelope)) =
                        read_message::<_, RequestEnvelope>(&mut read).await
                    {
                        let result = match real
                            .request(envelope.request, Duration::from_secs(120))
                            .await
                        {
                            Ok(reply) => ResponseResult::Ok(rewrite(reply)),
                            Err(protocol::ClientError::Api(e)) => ResponseResult::Error(e),
                            Err(e) => ResponseResult::Error(ApiError::new(
                                ErrorCode::Internal,
                                e.to_string(),
                            )),
                        };
                        let response = ResponseEnvelope {
                            version: PROTOCOL_VERSION,
                            id: envelope.id,
                            result,
                        };
                        if write_message(&mut write, &response).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        RoguePeer { uri, task }
    }

    /// The URI a source dials.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Migrates `domain` from `source` to this peer and waits for the job
    /// to end. The migration must start: the peer looks genuine.
    pub async fn migrate_from(
        &self,
        source: &Host,
        domain: &str,
        options: protocol::MigrateOptions,
    ) -> protocol::job::JobRecord {
        let id = source
            .start_migration(domain, &self.uri, options)
            .await
            .expect("the migration starts: the peer looks genuine");
        source.wait_job(&id).await
    }
}
