//! Two agents served in-process (`agent::serve` on listeners bound
//! beforehand, as mini-redis does) migrate a real guest between them: the
//! same code path as `livemigd`, without a process per agent, over mutual
//! TLS.

use std::path::Path;
use std::time::Duration;

use agent::{serve, Config, Listeners};
use domain::DomainDefinition;
use guest::{SerialLog, Workload};
use protocol::domain::{DefinitionDoc, DomainState};
use protocol::job::JobStatus;
use protocol::{AgentUri, Client, MigrateOptions, Reply, Request};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const TIMEOUT: Duration = Duration::from_secs(120);

/// An agent served by a task of this test.
struct InProcess {
    client: Client,
    tcp: String,
    serial_dir: std::path::PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), agent::RunError>>,
}

impl InProcess {
    async fn start(dir: &Path, pki: &Path, images: &Path, name: &str) -> InProcess {
        let mut config = Config::new(
            dir.to_path_buf(),
            dir.join("livemigd.sock"),
            Some("127.0.0.1:0".parse().unwrap()),
        );
        config.tls_dir =
            Some(tls::pki::issue(pki, name, protocol::Role::Agent, &["127.0.0.1".into()]).unwrap());
        config.finish_timeout = Duration::from_secs(30);
        config.image_dirs = vec![images.to_path_buf()];
        let listeners = Listeners::bind(&config).await.expect("bind");
        let tcp = format!("tls://{}", listeners.tcp_addr().expect("a TCP address"));
        let socket = config.socket.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(config, listeners, async {
            let _ = stopped.await;
        }));
        let client = Client::connect(&AgentUri::Unix(socket))
            .await
            .expect("connect");
        InProcess {
            client,
            tcp,
            serial_dir: dir.join("logs"),
            stop: Some(stop),
            task,
        }
    }

    async fn request(&self, request: Request) -> Reply {
        self.client
            .request(request, TIMEOUT)
            .await
            .expect("the agent answers")
    }

    async fn state(&self, name: &str) -> Option<DomainState> {
        match self.request(Request::List { all: true }).await {
            Reply::Domains { domains } => domains
                .into_iter()
                .find(|d| d.name == name)
                .map(|d| d.state),
            other => panic!("{other:?}"),
        }
    }

    async fn shut_down(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let ran = tokio::time::timeout(TIMEOUT, &mut self.task)
            .await
            .expect("the agent stops")
            .expect("the agent task does not panic");
        assert!(ran.is_ok(), "{ran:?}");
    }
}

/// The guest's serial log on a host, once it shows `passes` sweeps.
async fn passes(dir: &Path, name: &str, passes: u64) -> SerialLog {
    let path = dir.join(format!("{name}.serial.log"));
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let log = SerialLog::read(&path).unwrap_or_default();
        if log.last_progress().is_some_and(|p| p.pass > passes) {
            return log;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress in {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn two_in_process_agents_migrate_a_guest() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let kernel = guest::install_kernel(&images).unwrap();
    let pki = dir.path().join("pki");
    tls::pki::init(&pki).unwrap();
    let a = InProcess::start(&dir.path().join("a"), &pki, &images, "a").await;
    let b = InProcess::start(&dir.path().join("b"), &pki, &images, "b").await;
    let definition = DomainDefinition::from_toml(&guest::definition_toml(
        "vm",
        64,
        &kernel,
        Workload::busy(8, 200_000),
    ))
    .unwrap();
    a.request(Request::Define {
        definition: DefinitionDoc(definition.to_document()),
    })
    .await;
    a.request(Request::Start {
        domain: "vm".parse().unwrap(),
        paused: false,
    })
    .await;
    passes(&a.serial_dir, "vm", 1).await;

    let Reply::MigrationStarted { job_id } = a
        .request(Request::Migrate {
            domain: "vm".parse().unwrap(),
            destination: b.tcp.clone(),
            flags: Box::new(MigrateOptions {
                live: true,
                auto_converge: true,
                ..Default::default()
            }),
        })
        .await
    else {
        panic!("the migration did not start")
    };
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let record = loop {
        if let Reply::Job {
            record: Some(record),
            ..
        } = a.request(Request::Job { id: job_id.clone() }).await
        {
            break record;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job never ended"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert_eq!(b.state("vm").await, Some(DomainState::Running));
    assert_eq!(
        a.state("vm").await,
        Some(DomainState::ShutOff),
        "defined on a, running on b"
    );
    let log = passes(&b.serial_dir, "vm", 2).await;
    assert!(log.memory_intact(), "{:?}", log.corruptions);

    b.request(Request::Destroy {
        domain: "vm".parse().unwrap(),
    })
    .await;
    a.shut_down().await;
    b.shut_down().await;
}
