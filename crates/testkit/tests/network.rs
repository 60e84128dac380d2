//! Network continuity: a client's TCP session to a guest on a host bridge
//! survives the guest's live migration to a host on the same L2 segment
//! (two network namespaces, each with a bridge, joined by a veth pair).

use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest::linux::LinuxWorkload;
use guest::Workload;
use protocol::MigrateOptions;
use testkit::{live, netns, wait_until, TestBed};

/// What the client saw: the counter's answers, in order, and the longest
/// wait for one.
struct Session {
    numbers: Vec<u64>,
    longest_pause: Duration,
    error: Option<String>,
}

/// Sends a line every 20 ms on `stream` and reads the answer, until `stop`.
fn keep_talking(stream: std::net::TcpStream, stop: Arc<AtomicBool>) -> Session {
    let mut session = Session {
        numbers: Vec::new(),
        longest_pause: Duration::ZERO,
        error: None,
    };
    let mut reader = BufReader::new(stream.try_clone().expect("a second handle"));
    let mut writer = stream;
    let mut last = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let mut line = String::new();
        let answer = writeln!(writer, "ping")
            .and_then(|()| reader.read_line(&mut line))
            .map_err(|e| e.to_string())
            .and_then(|n| {
                if n == 0 {
                    return Err("the guest closed the session".to_string());
                }
                line.split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .ok_or_else(|| format!("unexpected answer {line:?}"))
            });
        match answer {
            Ok(n) => {
                session.longest_pause = session.longest_pause.max(last.elapsed());
                last = Instant::now();
                session.numbers.push(n);
            }
            Err(e) => {
                session.error = Some(e);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    session
}

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
        std::thread::spawn(move || keep_talking(stream, stop))
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
    for ns in [&net.a, &net.b] {
        for args in [vec!["link"], vec!["neigh"]] {
            let out = std::process::Command::new("ip")
                .arg("-n")
                .arg(ns)
                .args(&args)
                .output()
                .unwrap();
            eprintln!(
                "DEBUG {ns} {args:?}\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let out = std::process::Command::new("bridge")
            .arg("-n")
            .arg(ns)
            .args(["fdb", "show", "br", "br0"])
            .output()
            .unwrap();
        eprintln!("DEBUG {ns} fdb\n{}", String::from_utf8_lossy(&out.stdout));
    }
    stop.store(true, Ordering::SeqCst);
    let session = tokio::task::spawn_blocking(move || client.join().expect("the client"))
        .await
        .unwrap();

    eprintln!(
        "DEBUG answers {} last {:?}",
        session.numbers.len(),
        session.numbers.last()
    );
    eprintln!("DEBUG serial b: {:?}", b.serial("vm").await.last_progress());
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
