//! A compromised host of the cluster (a valid agent certificate) asking a
//! destination agent, with `peer-prepare` alone, to touch what it may not:
//! each attempt is refused with a clear error and leaves the host as it
//! was. The peer proposes; the destination decides.

use std::time::Duration;

use guest::Workload;
use protocol::migrate::StorageCopy;
use protocol::{ApiError, ErrorCode, MigrateOptions};
use testkit::{rogue, Host, TestBed};

async fn refused(client: &protocol::Client, request: protocol::Request) -> ApiError {
    client
        .request(request, Duration::from_secs(30))
        .await
        .expect_err("the destination refuses")
        .to_api()
}

/// Nothing of the attempt is left on `b`.
async fn untouched(b: &Host) {
    assert!(b.qemu_pids().is_empty(), "a VM started on b");
    assert!(b.list_all().await.is_empty(), "b keeps a domain");
}

#[tokio::test]
async fn a_peer_cannot_choose_where_the_destination_s_qemu_opens_a_socket() {
    let bed = TestBed::simulated().await;
    let b = bed.host("b").await;
    let rogue = rogue::client(&bed, &b).await;
    let def = bed.definition("vm", 64, Workload::IDLE);
    // QEMU unlinks a regular file at a unix: listen address and binds a
    // socket in its place: any file the agent's user may delete.
    let victim = bed.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();

    for (uri, code, says) in [
        (
            format!("unix:{}", victim.display()),
            ErrorCode::PermissionDenied,
            "only propose tcp:",
        ),
        (
            "tcp:192.0.2.1:49152".into(),
            ErrorCode::PermissionDenied,
            "not an address of this host",
        ),
        (
            "tcp:127.0.0.1:22".into(),
            ErrorCode::PermissionDenied,
            "privileged port",
        ),
        (
            "exec:rm -rf /".into(),
            ErrorCode::InvalidArgument,
            "bad migration URI",
        ),
    ] {
        let options = MigrateOptions {
            live: true,
            migrateuri: Some(uri.clone()),
            ..Default::default()
        };
        let err = refused(&rogue, rogue::prepare(&def, options, vec![])).await;
        assert_eq!(err.code, code, "{uri}: {err}");
        assert!(err.message.contains(says), "{uri}: {err}");
        assert!(err.message.contains(&uri), "the error names it: {err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        untouched(&b).await;
    }

    // Its own address, from the rogue too: a migration may go on.
    let options = MigrateOptions {
        live: true,
        migrateuri: Some("tcp:127.0.0.1:0".into()),
        ..Default::default()
    };
    let reply = rogue
        .request(
            rogue::prepare(&def, options, vec![]),
            Duration::from_secs(30),
        )
        .await
        .expect("a hint of this host's own address is taken");
    let protocol::Reply::Prepared { uri, .. } = reply else {
        panic!("{reply:?}");
    };
    assert!(uri.starts_with("tcp:127.0.0.1:"), "{uri}");
    // The rogue's connection closing aborts what it prepared.
    drop(rogue);
    b.wait_no_qemu().await;
}

#[tokio::test]
async fn a_peer_cannot_read_a_file_through_the_backing_of_an_image_it_has_created() {
    let bed = TestBed::simulated().await;
    let b = bed.host("b").await;
    let rogue = rogue::client(&bed, &b).await;
    let secret = bed.path().join("secret");
    std::fs::write(&secret, "host key").unwrap();
    let disk = bed.images().join("vm.qcow2");
    let def = domain::DomainDefinition::from_toml(&format!(
        "{}[[disks]]\npath = {:?}\nformat = \"qcow2\"\n",
        guest::definition_toml("vm", 64, bed.kernel(), Workload::IDLE),
        disk.display().to_string()
    ))
    .unwrap();
    let options = MigrateOptions {
        live: true,
        copy_storage_inc: true,
        ..Default::default()
    };
    let inside_link = bed.images().join("base.raw");
    std::os::unix::fs::symlink(&secret, &inside_link).unwrap();

    for (backing, says) in [
        // Created on the secret and served over NBD, it would hand the
        // secret's bytes to whoever reads the export.
        (
            secret.display().to_string(),
            "outside the image directories",
        ),
        (
            inside_link.display().to_string(),
            "outside the image directories",
        ),
        (
            format!("json:{{\"file.filename\":\"{}\"}}", secret.display()),
            "not an absolute file name",
        ),
    ] {
        let storage = vec![StorageCopy {
            target: "vda".into(),
            virtual_size: 1 << 20,
            backing: Some((backing.clone(), "raw".into())),
        }];
        let err = refused(&rogue, rogue::prepare(&def, options.clone(), storage)).await;
        assert_eq!(err.code, ErrorCode::PermissionDenied, "{backing}: {err}");
        assert!(err.message.contains(says), "{backing}: {err}");
        assert!(!disk.exists(), "{backing}: b created the image");
        untouched(&b).await;
    }
}

/// `b`'s persistent definition of `name`, as an administrator reads it.
async fn definition_on(b: &Host, name: &str) -> serde_json::Value {
    let reply = b
        .request(protocol::Request::DumpDef {
            domain: name.parse().unwrap(),
        })
        .await
        .unwrap();
    let protocol::Reply::Definition { definition } = reply else {
        panic!("{reply:?}");
    };
    definition.0
}

#[tokio::test]
async fn a_peer_cannot_replace_a_domain_defined_on_the_destination() {
    let bed = TestBed::simulated().await;
    let b = bed.host("b").await;
    b.request(testkit::define(&bed.definition("web", 64, Workload::IDLE)))
        .await
        .unwrap();
    let before = definition_on(&b, "web").await;
    let rogue = rogue::client(&bed, &b).await;
    // The admin's next `start` would boot a shell as init, on other disks.
    let evil = domain::DomainDefinition::from_toml(&format!(
        "name = \"web\"\nmemory_mib = 96\n[kernel]\npath = {:?}\ncmdline = \"init=/bin/sh\"\n",
        bed.kernel().display().to_string()
    ))
    .unwrap();

    for options in [
        MigrateOptions {
            offline: true,
            persistent: true,
            ..Default::default()
        },
        MigrateOptions {
            live: true,
            ..Default::default()
        },
    ] {
        let err = refused(&rogue, rogue::prepare(&evil, options.clone(), vec![])).await;
        assert_eq!(err.code, ErrorCode::PermissionDenied, "{options:?}: {err}");
        assert!(
            err.message.contains("was not handed to rogue")
                && err.message.contains("--allow-replace rogue"),
            "{err}"
        );
        assert_eq!(definition_on(&b, "web").await, before, "{options:?}");
        assert!(b.qemu_pids().is_empty());
    }
    // A new domain may still arrive offline: that is what offline
    // migration is for.
    rogue
        .request(
            rogue::prepare(
                &bed.definition("fresh", 64, Workload::IDLE),
                MigrateOptions {
                    offline: true,
                    persistent: true,
                    ..Default::default()
                },
                vec![],
            ),
            Duration::from_secs(30),
        )
        .await
        .expect("a new domain arrives offline");
}

#[tokio::test]
async fn an_administrator_may_let_a_peer_replace_domains() {
    let bed = TestBed::simulated().await;
    let b = bed.host_args("b", &["--allow-replace", "rogue"]).await;
    b.request(testkit::define(&bed.definition("web", 64, Workload::IDLE)))
        .await
        .unwrap();
    let rogue = rogue::client(&bed, &b).await;
    rogue
        .request(
            rogue::prepare(
                &bed.definition("web", 96, Workload::IDLE),
                MigrateOptions {
                    offline: true,
                    persistent: true,
                    ..Default::default()
                },
                vec![],
            ),
            Duration::from_secs(30),
        )
        .await
        .expect("allowed by the administrator");
    assert_eq!(definition_on(&b, "web").await["memory_mib"], 96);
}

#[tokio::test]
async fn a_guest_handed_to_a_peer_may_come_back_after_a_restart_and_only_from_it() {
    let bed = TestBed::simulated().await;
    let mut a = bed.host("a").await;
    let b = bed.host("b").await;
    a.define_and_start(bed.definition("vm", 64, Workload::busy(4, 50_000)))
        .await;
    let there = a.migrate_live("vm", &b).await;
    assert_eq!(
        there.status,
        protocol::job::JobStatus::Completed,
        "{there:?}"
    );
    // The binding is on a's disk.
    a.restart_keeping_guests().await;

    // Another host may not send a guest of that name to a.
    let rogue = rogue::client(&bed, &a).await;
    let err = refused(
        &rogue,
        rogue::prepare(
            &bed.definition("vm", 64, Workload::IDLE),
            MigrateOptions {
                live: true,
                ..Default::default()
            },
            vec![],
        ),
    )
    .await;
    assert!(err.message.contains("was not handed to rogue"), "{err}");
    // Nor see the job that moved it.
    let err = refused(
        &rogue,
        protocol::Request::Job {
            id: there.id.clone(),
        },
    )
    .await;
    assert_eq!(err.code, ErrorCode::NoJob, "{err}");

    // b, which has it, may.
    let back = b.migrate_live("vm", &a).await;
    assert_eq!(back.status, protocol::job::JobStatus::Completed, "{back:?}");
    testkit::assert_runs_only_on("vm", &a, &b, 1).await;
}

#[tokio::test]
async fn a_peers_incoming_migrations_stay_within_its_quota() {
    let bed = TestBed::simulated().await;
    let b = bed.host_args("b", &["--peer-max-jobs", "1"]).await;
    let rogue = rogue::client(&bed, &b).await;
    let live = MigrateOptions {
        live: true,
        ..Default::default()
    };
    rogue
        .request(
            rogue::prepare(
                &bed.definition("one", 64, Workload::IDLE),
                live.clone(),
                vec![],
            ),
            Duration::from_secs(30),
        )
        .await
        .expect("the first is within the quota");
    let err = refused(
        &rogue,
        rogue::prepare(&bed.definition("two", 64, Workload::IDLE), live, vec![]),
    )
    .await;
    assert_eq!(err.code, ErrorCode::PermissionDenied, "{err}");
    assert!(err.message.contains("--peer-max-jobs"), "{err}");
    assert_eq!(b.qemu_pids().len(), 1, "only the first VM started");
    drop(rogue);
    b.wait_no_qemu().await;
}

#[tokio::test]
async fn a_job_id_or_source_that_is_not_what_sources_send_is_refused() {
    let bed = TestBed::simulated().await;
    let b = bed.host("b").await;
    let rogue = rogue::client(&bed, &b).await;
    let def = bed.definition("vm", 64, Workload::IDLE);
    let live = MigrateOptions {
        live: true,
        ..Default::default()
    };
    // A forged log line, terminal escapes; a source to be dialled later.
    for (job_id, source, says) in [
        (
            "x\n2026-01-01T00:00:00Z INFO migration completed\u{1b}[2J".to_string(),
            "tls://127.0.0.1:1".to_string(),
            "is not a UUID",
        ),
        (
            uuid::Uuid::new_v4().to_string(),
            "file:///etc/passwd".to_string(),
            "is not an agent URI",
        ),
    ] {
        let protocol::Request::PeerPrepare(mut prepare) =
            rogue::prepare(&def, live.clone(), vec![])
        else {
            unreachable!()
        };
        prepare.job_id = job_id.clone();
        prepare.source = source;
        let err = refused(&rogue, protocol::Request::PeerPrepare(prepare)).await;
        assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
        assert!(err.message.contains(says), "{err}");
        assert!(!err.message.contains('\n'), "escaped: {err}");
        untouched(&b).await;
    }
}

#[tokio::test]
async fn the_destination_s_vm_binds_the_disks_port_itself_within_its_range() {
    let bed = TestBed::simulated().await;
    let b = bed
        .host_args("b", &["--migration-ports", "40200-40210"])
        .await;
    // Someone else holds the first ports of the range.
    let held: Vec<_> = (40200..40202)
        .filter_map(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
        .collect();
    let rogue = rogue::client(&bed, &b).await;
    let disk = bed.images().join("vm.raw");
    let def = domain::DomainDefinition::from_toml(&format!(
        "{}[[disks]]\npath = {:?}\n",
        guest::definition_toml("vm", 64, bed.kernel(), Workload::IDLE),
        disk.display().to_string()
    ))
    .unwrap();
    let options = MigrateOptions {
        live: true,
        copy_storage_all: true,
        ..Default::default()
    };
    let storage = vec![StorageCopy {
        target: "vda".into(),
        virtual_size: 1 << 20,
        backing: None,
    }];
    let reply = rogue
        .request(
            rogue::prepare(&def, options, storage),
            Duration::from_secs(30),
        )
        .await
        .expect("prepared");
    let protocol::Reply::Prepared { uri, nbd_port, .. } = reply else {
        panic!("{reply:?}");
    };
    let nbd_port = nbd_port.expect("an NBD port");
    let data_port: u16 = uri.rsplit(':').next().unwrap().parse().unwrap();
    // In the range, and not a port someone else holds (another process
    // on this machine may hold one of the first two as well).
    let held_ports: Vec<u16> = held
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    for port in [nbd_port, data_port] {
        assert!(
            (40200..=40210).contains(&port) && !held_ports.contains(&port),
            "{port} ({uri}, NBD {nbd_port}, held {held_ports:?})"
        );
    }
    assert_ne!(nbd_port, data_port);
    // The port answered is the one the VM listens on.
    std::net::TcpStream::connect(("127.0.0.1", nbd_port)).expect("the NBD server");
    assert!(disk.exists(), "the image to copy into");
    drop(rogue);
    b.wait_no_qemu().await;
    testkit::wait_until(
        Duration::from_secs(10),
        "the half-copied image to be removed",
        || async { (!disk.exists()).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_peer_cannot_run_a_guest_on_another_domain_s_disk() {
    let bed = TestBed::simulated().await;
    let b = bed.host("b").await;
    // web's disk, through a link too.
    let disk = bed.images().join("web.raw");
    std::fs::write(&disk, vec![0x5au8; 1 << 20]).unwrap();
    let link = bed.images().join("alias.raw");
    std::os::unix::fs::symlink(&disk, &link).unwrap();
    let with_disk = |name: &str, path: &std::path::Path| {
        domain::DomainDefinition::from_toml(&format!(
            "{}[[disks]]\npath = {:?}\nshared = true\n",
            guest::definition_toml(name, 64, bed.kernel(), Workload::IDLE),
            path.display().to_string()
        ))
        .unwrap()
    };
    b.request(testkit::define(&with_disk("web", &disk)))
        .await
        .unwrap();
    let rogue = rogue::client(&bed, &b).await;
    for path in [&disk, &link] {
        for options in [
            MigrateOptions {
                live: true,
                ..Default::default()
            },
            MigrateOptions {
                offline: true,
                persistent: true,
                ..Default::default()
            },
        ] {
            let err = refused(
                &rogue,
                rogue::prepare(&with_disk("evil", path), options, vec![]),
            )
            .await;
            assert_eq!(err.code, ErrorCode::PermissionDenied, "{err}");
            assert!(err.message.contains("domain 'web''s"), "{err}");
        }
    }
    assert!(b.qemu_pids().is_empty());
    assert_eq!(b.list_all().await.len(), 1, "only web");
    assert_eq!(std::fs::read(&disk).unwrap(), vec![0x5au8; 1 << 20]);
}
