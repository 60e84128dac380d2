//! Network continuity: a client's TCP session to a guest on a host bridge
//! survives the guest's live migration to a host on the same L2 segment
//! (two network namespaces, each with a bridge, joined by a veth pair).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use guest::linux::counter::keep_talking;
use guest::linux::LinuxWorkload;
use guest::Workload;
use protocol::MigrateOptions;
use testkit::{live, netns, wait_until, TestBed};

#[tokio::test]
async fn a_tcp_session_to_a_bridged_linux_guest_survives_its_live_migration() {
    let bed = TestBed::new().await;
    let (net, a, b) = bed.hosts_on_one_segment("tcp").await;
    let guest_ip = net.address(10);
    let workload = LinuxWorkload {
        port: Some(7000),
        address: Some(format!("{guest_ip}/24")),
        ..LinuxWorkload::memory(Workload::busy(8, 20_000))
    };
    let definition = bed.linux_definition("vm", 192, &workload, "[[nics]]\nbridge = \"br0\"\n");
    a.define_and_start(definition).await;

    // The client lives on host a's side of the segment.
    let addr: std::net::SocketAddr = format!("{guest_ip}:7000").parse().unwrap();
    let stream = wait_until(
        Duration::from_secs(90),
        "the guest's counter to accept a connection",
        || async { netns::connect_in(&net.a, addr, Duration::from_secs(2)).ok() },
    )
    .await;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || keep_talking(stream, Duration::from_millis(20), stop))
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    let record = a
        .migrate_completes(
            "vm",
            &b,
            MigrateOptions {
                auto_converge: true,
                ..live()
            },
        )
        .await;
    // The session keeps answering from b.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    let session = tokio::task::spawn_blocking(move || client.join().expect("the client"))
        .await
        .unwrap();

    assert_eq!(session.error, None, "the session broke");
    let n = &session.numbers;
    assert!(n.len() > 50, "{} answers", n.len());
    assert!(
        n.windows(2).all(|w| w[1] == w[0] + 1),
        "the counter skipped or restarted: the guest lost its state or the session"
    );
    eprintln!(
        "TCP session: {} answers, longest pause {:?}, migration downtime {:?} ms",
        n.len(),
        session.longest_pause,
        record.downtime_ms
    );
    // Nothing of the guest's NIC is left on a.
    let taps = std::process::Command::new("ip")
        .args(["-n", &net.a, "-o", "link", "show", "type", "tun"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&taps.stdout).trim().is_empty(),
        "a tap left on a: {}",
        String::from_utf8_lossy(&taps.stdout)
    );
}

#[tokio::test]
async fn an_interface_that_is_not_the_domain_s_own_tap_is_never_taken_over() {
    let bed = TestBed::new().await;
    let (net, a, _b) = bed.hosts_on_one_segment("taken").await;
    let definition = bed.linux_definition(
        "vm",
        192,
        &LinuxWorkload::memory(Workload::IDLE),
        "[[nics]]\nbridge = \"br0\"\n",
    );
    // An interface of the name the agent would give the tap: another
    // agent's, or anything else on the host.
    let taken = agent::tap_names(a.state_dir(), &definition).remove(0);
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(["netns", "exec", &net.a, "ip"])
            .args(args)
            .output()
            .unwrap()
    };
    let made = ip(&["tuntap", "add", "dev", &taken, "mode", "tap"]);
    assert!(made.status.success(), "{made:?}");
    a.request(testkit::define(&definition)).await.unwrap();

    let refused = a
        .request(protocol::Request::Start {
            domain: "vm".parse().unwrap(),
            paused: false,
        })
        .await
        .unwrap_err()
        .to_api();
    assert!(
        refused.message.contains(&taken) && refused.message.contains("left alone"),
        "{refused:?}"
    );
    assert!(
        ip(&["link", "show", &taken]).status.success(),
        "it was deleted"
    );
    assert!(a.qemu_pids().is_empty());
}
