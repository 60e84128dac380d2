use std::path::PathBuf;

use proptest::prelude::*;

use super::*;

const RANGE: Option<(u16, u16)> = Some((49152, 49215));

fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[tokio::test]
async fn without_a_hint_qemu_listens_where_the_peer_reached_this_agent() {
    let ip = Some(IpAddr::from([127, 0, 0, 1]));
    assert_eq!(
        listen(None, ip, RANGE).await.unwrap(),
        Listen::Ports("127.0.0.1".into(), (49152, 49215))
    );
    assert_eq!(
        listen(None, ip, None).await.unwrap(),
        Listen::Uri(DataUri::Tcp {
            host: "127.0.0.1".into(),
            port: 0
        })
    );
}

#[tokio::test]
async fn a_hint_is_taken_only_as_tcp_to_an_own_address_and_port() {
    let ip = Some(IpAddr::from([127, 0, 0, 1]));
    assert_eq!(
        listen(Some("tcp:127.0.0.1:49160"), ip, RANGE)
            .await
            .unwrap(),
        Listen::Uri(DataUri::Tcp {
            host: "127.0.0.1".into(),
            port: 49160
        })
    );
    assert_eq!(
        listen(Some("tcp:127.0.0.1:0"), ip, RANGE).await.unwrap(),
        Listen::Ports("127.0.0.1".into(), (49152, 49215))
    );
    for (hint, ports, code, says) in [
        // QEMU would unlink the file and bind a socket there.
        (
            "unix:/etc/important",
            RANGE,
            ErrorCode::PermissionDenied,
            "only propose tcp:",
        ),
        // Not this host's: the data would go (or come from) elsewhere.
        (
            "tcp:192.0.2.1:49160",
            RANGE,
            ErrorCode::PermissionDenied,
            "not an address of this host",
        ),
        (
            "tcp:0.0.0.0:49160",
            RANGE,
            ErrorCode::PermissionDenied,
            "not an address of this host",
        ),
        (
            "tcp:127.0.0.1:22",
            RANGE,
            ErrorCode::PermissionDenied,
            "outside this host's migration ports",
        ),
        (
            "tcp:127.0.0.1:80",
            None,
            ErrorCode::PermissionDenied,
            "privileged",
        ),
        (
            "exec:touch /tmp/owned",
            RANGE,
            ErrorCode::InvalidArgument,
            "bad migration URI",
        ),
    ] {
        let err = listen(Some(hint), ip, ports).await.unwrap_err();
        assert_eq!(err.code, code, "{hint}: {err}");
        assert!(err.message.contains(says), "{hint}: {err}");
    }
}

#[test]
fn a_disks_port_is_one_of_this_hosts() {
    nbd_port(None, RANGE).unwrap();
    nbd_port(Some(49200), RANGE).unwrap();
    nbd_port(Some(10809), None).unwrap();
    for (asked, ports) in [(Some(10809), RANGE), (Some(22), None)] {
        let err = nbd_port(asked, ports).unwrap_err();
        assert_eq!(err.code, ErrorCode::PermissionDenied, "{err}");
    }
}

proptest! {
    /// Whatever a peer proposes, what this host accepts is tcp: to an
    /// address it can bind, on a port of its range.
    #[test]
    fn what_is_accepted_is_an_own_address_in_range(
        a in any::<u8>(), b in any::<u8>(), c in any::<u8>(), d in any::<u8>(),
        port in any::<u16>(),
        scheme in prop::sample::select(vec!["tcp", "unix", "exec", "rdma", "fd", "tcp://"]),
    ) {
        let hint = match scheme {
            "unix" => format!("unix:/tmp/{a}.{b}"),
            s => format!("{s}:{a}.{b}.{c}.{d}:{port}"),
        };
        if let Ok(listen) = run(listen(Some(&hint), None, RANGE)) {
            let (host, port) = match listen {
                Listen::Uri(DataUri::Tcp { host, port }) => (host, port),
                Listen::Ports(host, _) => (host, 49152),
                Listen::Uri(other) => panic!("{hint} accepted as {other}"),
            };
            let ip: IpAddr = host.parse().unwrap();
            prop_assert!(is_own(ip), "{} accepted", hint);
            prop_assert!((49152..=49215).contains(&port), "{} accepted", hint);
        }
    }
}

/// A host's image directory with a base image, and a secret outside it.
struct Images {
    _root: tempfile::TempDir,
    dir: PathBuf,
    secret: PathBuf,
    confinement: Confinement,
}

fn images() -> Images {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("images");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(root.path().join("logs")).unwrap();
    std::fs::write(dir.join("base.raw"), vec![0u8; 4096]).unwrap();
    let secret = root.path().join("secret");
    std::fs::write(&secret, b"private key").unwrap();
    std::os::unix::fs::symlink(&secret, dir.join("link.raw")).unwrap();
    let confinement = Confinement {
        image_dirs: vec![dir.clone()],
        allow_device_nodes: false,
        logs_dir: root.path().join("logs"),
    };
    Images {
        dir,
        secret,
        confinement,
        _root: root,
    }
}

fn two_disks(dir: &std::path::Path) -> DomainDefinition {
    DomainDefinition::from_toml(&format!(
        "name = \"vm\"\nmemory_mib = 64\n[[disks]]\npath = {:?}\nformat = \"qcow2\"\n\
         [[disks]]\npath = {:?}\nshared = true\n",
        dir.join("vm.qcow2").display().to_string(),
        dir.join("shared.raw").display().to_string(),
    ))
    .unwrap()
}

fn copy(target: &str, backing: Option<(&str, &str)>) -> StorageCopy {
    StorageCopy {
        target: target.into(),
        virtual_size: 1 << 20,
        backing: backing.map(|(f, t)| (f.to_string(), t.to_string())),
    }
}

#[tokio::test]
async fn copied_disks_are_the_definitions_own_on_confined_backing_files() {
    let i = images();
    let def = two_disks(&i.dir);
    let base = i.dir.join("base.raw").display().to_string();
    storage(&def, &[copy("vda", Some((&base, "raw")))], &i.confinement)
        .await
        .unwrap();
    storage(&def, &[copy("vda", None)], &i.confinement)
        .await
        .unwrap();

    let secret = i.secret.display().to_string();
    let link = i.dir.join("link.raw").display().to_string();
    let cases: Vec<(Vec<StorageCopy>, ErrorCode, &str)> = vec![
        (
            vec![copy("vda", None), copy("vda", None)],
            ErrorCode::InvalidArgument,
            "twice",
        ),
        (
            vec![copy("vdz", None)],
            ErrorCode::InvalidArgument,
            "does not have",
        ),
        (
            vec![copy("vdb", None)],
            ErrorCode::InvalidArgument,
            "shared storage",
        ),
        (
            vec![StorageCopy {
                virtual_size: 0,
                ..copy("vda", None)
            }],
            ErrorCode::InvalidArgument,
            "size of 0",
        ),
        // The attack: a new image on a file the peer wants to read.
        (
            vec![copy("vda", Some((&secret, "raw")))],
            ErrorCode::PermissionDenied,
            "outside the image directories",
        ),
        (
            vec![copy("vda", Some((&link, "raw")))],
            ErrorCode::PermissionDenied,
            "outside the image directories",
        ),
        (
            vec![copy(
                "vda",
                Some(("json:{\"file.filename\":\"/etc/shadow\"}", "raw")),
            )],
            ErrorCode::PermissionDenied,
            "absolute",
        ),
        (
            vec![copy("vda", Some(("nbd://10.0.0.1/x", "raw")))],
            ErrorCode::PermissionDenied,
            "absolute",
        ),
        (
            vec![copy("vda", Some((&base, "vmdk")))],
            ErrorCode::InvalidArgument,
            "neither raw nor qcow2",
        ),
        (
            vec![copy("vda", Some(("/dev/sda", "raw")))],
            ErrorCode::PermissionDenied,
            "outside the image directories",
        ),
    ];
    for (copies, code, says) in cases {
        let err = storage(&def, &copies, &i.confinement).await.unwrap_err();
        assert_eq!(err.code, code, "{copies:?}: {err}");
        assert!(err.message.contains(says), "{copies:?}: {err}");
    }
}

#[tokio::test]
async fn a_backing_file_inside_whose_chain_leads_out_is_refused() {
    let i = images();
    let def = two_disks(&i.dir);
    let top = i.dir.join("top.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b"])
        .arg(&i.secret)
        .arg(&top)
        .arg("1M")
        .output()
        .expect("qemu-img (qemu-utils)");
    assert!(out.status.success(), "{out:?}");
    let err = storage(
        &def,
        &[copy("vda", Some((top.to_str().unwrap(), "qcow2")))],
        &i.confinement,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::PermissionDenied, "{err}");
    assert!(err.message.contains("backing chain"), "{err}");
}

fn caller(name: &str, role: protocol::Role) -> Caller {
    Caller::Certified(tls::Identity {
        name: name.into(),
        role,
        subject: Vec::new(),
    })
}

fn arriving(id: &str, peer: &str, memory_mib: u32, disk_bytes: u64) -> crate::jobs::IncomingJob {
    let definition = DomainDefinition::from_toml(&format!(
        "name = \"{id}\"\nmemory_mib = {memory_mib}\n[kernel]\npath = \"/k\"\n"
    ))
    .unwrap();
    crate::jobs::IncomingJob {
        ident: migration::record::JobIdentity {
            id: id.into(),
            domain: id.into(),
            role: protocol::job::Role::Destination,
            source: "tls://a:1".into(),
            destination: "tls://b:1".into(),
            flags: migration::Flags::new(protocol::MigrateOptions {
                live: true,
                ..Default::default()
            })
            .unwrap(),
            started_at_ms: 0,
            peer: Some(peer.into()),
        },
        started: tokio::time::Instant::now(),
        connection: 1,
        prepared_by: Some(peer.into()),
        created_domain: true,
        disk_bytes,
        previous: Default::default(),
        vm: None,
        phase: std::sync::Mutex::new(protocol::job::Phase::Perform),
        definition,
        replaced_definition: None,
        reattached: false,
        created_images: Vec::new(),
        postcopy_resume: Default::default(),
    }
}

fn claim(memory_mib: u64, disk_bytes: u64) -> Claim<'static> {
    Claim {
        name: "vm",
        memory_mib,
        disk_bytes,
    }
}

#[test]
fn a_peer_replaces_only_a_domain_handed_to_it_unless_allowed() {
    let rules = PeerRules::default();
    let a = caller("agent-a", protocol::Role::Agent);
    let new = Arrival {
        existing: None,
        incoming: vec![],
    };
    admit(&new, &a, &rules, claim(64, 0)).unwrap();
    let handed_to_a = Arrival {
        existing: Some(Some("agent-a")),
        incoming: vec![],
    };
    admit(&handed_to_a, &a, &rules, claim(64, 0)).unwrap();
    for existing in [Some(None), Some(Some("agent-c"))] {
        let arrival = Arrival {
            existing,
            incoming: vec![],
        };
        let err = admit(&arrival, &a, &rules, claim(64, 0)).unwrap_err();
        assert_eq!(err.code, ErrorCode::PermissionDenied, "{err}");
        assert!(err.message.contains("--allow-replace agent-a"), "{err}");
        // An administrator's rule, or an administrator.
        for allowed in ["agent-a", "*"] {
            let rules = PeerRules {
                allow_replace: vec![allowed.into()],
                ..PeerRules::default()
            };
            admit(&arrival, &a, &rules, claim(64, 0)).unwrap();
        }
        admit(
            &arrival,
            &caller("root", protocol::Role::Admin),
            &PeerRules::default(),
            claim(64, 0),
        )
        .unwrap();
        admit(
            &arrival,
            &Caller::Local,
            &PeerRules::default(),
            claim(64, 0),
        )
        .unwrap();
    }
}

#[test]
fn a_peers_incoming_migrations_stay_within_its_quotas() {
    let rules = PeerRules {
        allow_replace: vec![],
        max_jobs: 2,
        max_memory_mib: 1024,
        max_disk_gib: 1,
    };
    let a = caller("agent-a", protocol::Role::Agent);
    let one = arriving("one", "agent-a", 512, 1 << 29);
    let others = arriving("other", "agent-c", 4096, 8 << 30);
    let arrival = Arrival {
        existing: None,
        incoming: vec![&one, &others],
    };
    // What another peer holds does not count against this one.
    admit(&arrival, &a, &rules, claim(512, 1 << 29)).unwrap();
    for (claim, says) in [
        (claim(513, 0), "--peer-max-memory"),
        (claim(64, (1 << 29) + 1), "--peer-max-disk"),
    ] {
        let err = admit(&arrival, &a, &rules, claim).unwrap_err();
        assert_eq!(err.code, ErrorCode::PermissionDenied, "{err}");
        assert!(err.message.contains(says), "{err}");
    }
    let two = arriving("two", "agent-a", 64, 0);
    let full = Arrival {
        existing: None,
        incoming: vec![&one, &two],
    };
    let err = admit(&full, &a, &rules, claim(64, 0)).unwrap_err();
    assert!(err.message.contains("--peer-max-jobs"), "{err}");
}
