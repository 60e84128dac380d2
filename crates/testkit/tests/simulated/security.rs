//! Nobody unauthorized gets in: the network port speaks mutual TLS only,
//! a client's certificate decides what it may do, and the local socket is
//! its owner's alone.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use protocol::domain::DefinitionDoc;
use protocol::{AgentUri, Client, ClientError, ErrorCode, Reply, Request, Role};
use testkit::{bin, Host, TestBed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REQUEST: &[u8] = b"{\"version\":1,\"id\":1,\"request\":{\"op\":\"list\",\"all\":true}}\n";

/// A client with the certificate in `dir`.
async fn client(host: &Host, dir: &Path) -> Result<Client, ClientError> {
    let config = tls::TlsDir::load(dir).unwrap().client_config().unwrap();
    let uri: AgentUri = host.uri().parse().unwrap();
    Client::connect_with(&uri, Some(&config)).await
}

async fn ask(client: &Client, request: Request) -> Result<Reply, ClientError> {
    client.request(request, Duration::from_secs(30)).await
}

fn denied(result: Result<Reply, ClientError>) -> bool {
    matches!(result, Err(ClientError::Api(e)) if e.code == ErrorCode::PermissionDenied)
}

/// What the agent answers to `REQUEST` sent raw on `stream`: nothing, if
/// it refused the connection.
async fn answer_to_raw_request<S>(mut stream: S) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = stream.write_all(REQUEST).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut answer)).await;
    answer
}

#[tokio::test]
async fn a_plaintext_client_a_foreign_certificate_and_no_certificate_get_no_answer() {
    let bed = TestBed::simulated().await;
    let a = bed.host("a").await;
    let addr = a.uri().trim_start_matches("tls://").to_string();

    // Plaintext on the TLS port.
    let plain = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let answer = answer_to_raw_request(plain).await;
    assert!(
        !String::from_utf8_lossy(&answer).contains("\"ok\""),
        "plaintext got an answer: {answer:?}"
    );

    // A certificate from another CA.
    let other = bed.path().join("other-pki");
    tls::pki::init(&other).unwrap();
    let stranger = tls::pki::issue(&other, "mallory", Role::Admin, &[]).unwrap();
    let refused = match testkit::tls_client::connect(&a.uri(), &stranger).await {
        Err(_) => true,
        Ok(stream) => answer_to_raw_request(stream).await.is_empty(),
    };
    assert!(refused, "a certificate from another CA got an answer");

    // The right CA, but no client certificate.
    let roots = {
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for cert in
            rustls::pki_types::CertificateDer::pem_file_iter(bed.path().join("pki/ca.pem")).unwrap()
        {
            roots.add(cert.unwrap()).unwrap();
        }
        roots
    };
    let anonymous = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let refused = match tokio_rustls::TlsConnector::from(std::sync::Arc::new(anonymous))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
    {
        Err(_) => true,
        Ok(stream) => answer_to_raw_request(stream).await.is_empty(),
    };
    assert!(refused, "a client without a certificate got an answer");

    // And a legitimate client is served.
    let admin = bed.certificate("ops", Role::Admin, &[]);
    let ok = ask(
        &client(&a, &admin).await.unwrap(),
        Request::List { all: true },
    )
    .await;
    assert!(matches!(ok, Ok(Reply::Domains { .. })), "{ok:?}");
}

#[tokio::test]
async fn a_certificate_s_role_decides_what_it_may_do() {
    let bed = TestBed::simulated().await;
    let a = bed.host("a").await;
    let definition = DefinitionDoc(
        bed.definition("vm", 64, guest::Workload::IDLE)
            .to_document(),
    );
    let monitor = client(&a, &bed.certificate("grafana", Role::Monitor, &[]))
        .await
        .unwrap();
    let agent = client(&a, &bed.certificate("host-x", Role::Agent, &["127.0.0.1"]))
        .await
        .unwrap();
    let admin = client(&a, &bed.certificate("ops", Role::Admin, &[]))
        .await
        .unwrap();

    // A monitor reads and changes nothing.
    assert!(matches!(
        ask(&monitor, Request::List { all: true }).await,
        Ok(Reply::Domains { .. })
    ));
    assert!(denied(
        ask(
            &monitor,
            Request::Define {
                definition: definition.clone()
            }
        )
        .await
    ));
    // An agent does the peer half of a migration only.
    assert!(denied(
        ask(
            &agent,
            Request::Define {
                definition: definition.clone()
            }
        )
        .await
    ));
    assert!(denied(ask(&agent, Request::List { all: true }).await));
    // An administrator does everything.
    assert!(matches!(
        ask(&admin, Request::Define { definition }).await,
        Ok(Reply::Done)
    ));
    assert!(matches!(
        ask(
            &admin,
            Request::Start {
                domain: "vm".parse().unwrap(),
                paused: false
            }
        )
        .await,
        Ok(Reply::Done)
    ));
    // Paths and pids are for administrators.
    let info = |client| async move {
        match ask(
            client,
            Request::DomInfo {
                domain: "vm".parse().unwrap(),
            },
        )
        .await
        {
            Ok(Reply::DomainInfo(info)) => info,
            other => panic!("{other:?}"),
        }
    };
    let seen = info(&monitor).await;
    assert!(seen.qemu_pid.is_none() && seen.qmp_socket.is_none() && seen.serial_log.is_none());
    assert!(info(&admin).await.qemu_pid.is_some());
    let Ok(Reply::Hello(hello)) = ask(&monitor, Request::Hello).await else {
        panic!("hello")
    };
    assert_eq!(hello.state_dir, None);

    let destroy = || Request::Destroy {
        domain: "vm".parse().unwrap(),
    };
    let refused = ask(&monitor, destroy()).await;
    assert!(denied(refused), "a monitor destroyed a domain");
    assert!(!a.qemu_pids().is_empty(), "the domain still runs");
    assert!(matches!(ask(&admin, destroy()).await, Ok(Reply::Done)));
    assert!(a.qemu_pids().is_empty());

    // What the refusal says, through the CLI.
    let out = std::process::Command::new(bin("livemig"))
        .args(["-c", &a.uri(), "destroy", "vm"])
        .env("LIVEMIG_TLS_DIR", bed.path().join("pki/grafana"))
        .env_remove("LIVEMIG_URI")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("grafana (role monitor) may not send `destroy`"),
        "{stderr}"
    );
}

#[tokio::test]
async fn plaintext_needs_insecure_and_the_local_socket_is_the_owner_s() {
    let bed = TestBed::simulated().await;
    let out = std::process::Command::new(bin("livemigd"))
        .args(["--state-dir"])
        .arg(bed.path().join("plain"))
        .args(["--listen", "tcp://127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--insecure") && stderr.contains("livemig pki"),
        "says how to set up TLS: {stderr}"
    );

    let a = bed.host("a").await;
    let socket = a.state_dir().join("livemigd.sock");

    // Raw QMP is off unless the agent's owner turns it on.
    let quiet = launcher::AgentProcess::spawn(&launcher::LaunchOptions {
        binary: bin("livemigd"),
        state_dir: bed.path().join("quiet"),
        listen: None,
        tls_dir: None,
        netns: None,
        image_dirs: Vec::new(),
        extra_args: Vec::new(),
        private_dirs: Vec::new(),
    })
    .await
    .unwrap();
    let local = Client::connect(&quiet.local_uri()).await.unwrap();
    let refused = ask(
        &local,
        Request::QemuMonitorCommand {
            domain: "vm".parse().unwrap(),
            command: serde_json::json!({"execute": "query-status"}),
        },
    )
    .await;
    assert!(denied(refused), "raw QMP allowed by default");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn idle_slow_and_oversized_clients_leave_the_agent_answering_the_others() {
    // Two thousand sockets on this side too.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    // A process of its own, whose memory is measured.
    let bed = TestBed::simulated_with_agent_processes().await;
    let a = bed.host("a").await;
    let addr = a.uri().trim_start_matches("tls://").to_string();
    let admin = bed.certificate("ops", Role::Admin, &[]);
    let before = rss_kib(a.pgid());

    // Two thousand connections that never say anything, from one address
    // (another loopback address than the clients below).
    let mut idle = Vec::new();
    for _ in 0..2000 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        idle.push(socket.connect(addr.parse().unwrap()).await.unwrap());
    }
    // Only the address's share of handshake places is held; the rest were
    // closed at once, not left to hold a place for the handshake time-out.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let open = idle
        .iter()
        .filter(|s| {
            let mut byte = [0u8; 1];
            matches!(s.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count();
    assert!(open <= 32, "{open} handshakes from one address held open");
    // A client that starts a request and stalls.
    let mut slow = testkit::tls_client::connect(&a.uri(), &admin)
        .await
        .unwrap();
    slow.write_all(b"{\"version\":1,\"id\":1,").await.unwrap();
    // A request longer than any message may be.
    let mut big = testkit::tls_client::connect(&a.uri(), &admin)
        .await
        .unwrap();
    let chunk = vec![b' '; 1 << 20];
    for _ in 0..5 {
        if big.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), big.read_to_end(&mut answer)).await;
    assert!(
        !String::from_utf8_lossy(&answer).contains("\"ok\""),
        "an oversized request was served"
    );

    // The agent still answers a legitimate client.
    let client = client(&a, &admin).await.unwrap();
    assert!(matches!(
        ask(&client, Request::List { all: true }).await,
        Ok(Reply::Domains { .. })
    ));
    let after = rss_kib(a.pgid());
    assert!(
        after < before + 256 * 1024,
        "the agent grew from {before} KiB to {after} KiB"
    );
    drop(idle);
    drop(slow);
}

/// `livemig list` run as `nobody` (group `nogroup`) against `host`'s socket.
fn list_as_nobody(host: &Host) -> std::process::Output {
    // Let others reach the socket's directory (the operator's layout would
    // be /run/livemig); the socket's own mode decides.
    for dir in [host.state_dir().parent().unwrap(), host.state_dir()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin("livemig"))
        .args(["-c", &host.local_uri(), "list"])
        .output()
        .expect("setpriv")
}

#[tokio::test]
async fn a_socket_group_lets_its_members_use_the_local_socket_and_nobody_else() {
    let bed = TestBed::simulated().await;
    let closed = bed.host("closed").await;
    let out = list_as_nobody(&closed);
    assert!(!out.status.success(), "nobody used an owner-only socket");
    let mode = std::fs::metadata(closed.state_dir().join("livemigd.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let shared = bed
        .host_args("shared", &["--socket-group", "nogroup"])
        .await;
    let socket = std::fs::metadata(shared.state_dir().join("livemigd.sock")).unwrap();
    assert_eq!(socket.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&socket), 65534);
    let out = list_as_nobody(&shared);
    assert!(
        out.status.success(),
        "a member of the group: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_client_that_never_reads_its_replies_is_cut_off() {
    let bed = TestBed::simulated().await;
    let a = bed.host_args("a", &["--timeout", "client-write=2s"]).await;
    let admin = bed.certificate("ops", Role::Admin, &[]);
    let stream = testkit::tls_client::connect(&a.uri(), &admin)
        .await
        .unwrap();
    let (mut read, mut write) = tokio::io::split(stream);
    // Requests, pipelined, and no reading: the agent's replies fill the
    // socket buffers and its write to this client can never finish.
    let writer = tokio::spawn(async move {
        for id in 1.. {
            let envelope = protocol::envelope::RequestEnvelope {
                version: protocol::PROTOCOL_VERSION,
                id,
                request: Request::List { all: true },
            };
            let mut line = serde_json::to_vec(&envelope).unwrap();
            line.push(b'\n');
            if write.write_all(&line).await.is_err() {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(6)).await;
    // The agent has closed the connection: what it wrote drains, then the
    // stream ends, rather than waiting forever.
    let mut drained = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(20), read.read_to_end(&mut drained)).await;
    assert!(ended.is_ok(), "the connection is still open");
    writer.abort();
    let client = client(&a, &admin).await.unwrap();
    assert!(matches!(
        ask(&client, Request::List { all: true }).await,
        Ok(Reply::Domains { .. })
    ));
}

/// `livemig pki revoke PKI NAME`, and the CRL copied into the TLS
/// directories of `hosts`, as an operator distributes it.
fn revoke(bed: &TestBed, name: &str, hosts: &[&str]) {
    let pki = bed.path().join("pki");
    let out = std::process::Command::new(bin("livemig"))
        .args(["pki", "revoke"])
        .arg(&pki)
        .arg(name)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for host in hosts {
        std::fs::copy(pki.join("crl.pem"), pki.join(host).join("crl.pem")).unwrap();
    }
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_within_seconds_without_a_restart() {
    let bed = TestBed::simulated().await;
    let a = bed.host("a").await;
    let b = bed.host("b").await;
    let ops = bed.certificate("ops", Role::Admin, &[]);
    let thief = bed.certificate("thief", Role::Admin, &[]);
    assert!(client(&a, &thief).await.is_ok());

    revoke(&bed, "thief", &["agent-a"]);

    // The agent reads the list again within its check interval.
    // The agent reads the list again within its check interval; the
    // thief's handshake (or its first request) fails from then on.
    testkit::wait_until(
        Duration::from_secs(15),
        "the revocation to apply",
        || async {
            match client(&a, &thief).await {
                Ok(c) => ask(&c, Request::List { all: true }).await.err(),
                Err(e) => Some(e),
            }
        },
    )
    .await;
    // Everyone else still gets in, and a still reaches its peer.
    let admin = client(&a, &ops).await.unwrap();
    assert!(matches!(
        ask(&admin, Request::List { all: true }).await,
        Ok(Reply::Domains { .. })
    ));

    // A revoked peer: a no longer dials b.
    revoke(&bed, "agent-b", &["agent-a"]);
    a.define_and_start(bed.definition("vm", 64, guest::Workload::IDLE))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refused = a
        .start_migration(
            "vm",
            &b.uri(),
            protocol::MigrateOptions {
                live: true,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        refused.to_string().to_lowercase().contains("revoked"),
        "{refused}"
    );
    assert_eq!(
        a.state("vm").await,
        Some(protocol::domain::DomainState::Running)
    );
}
