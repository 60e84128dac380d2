//! The Linux test guest boots under QEMU (TCG) and its workload reports:
//! memory progress, disk blocks written and verified, and a TCP counter.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use guest::linux::{build, LinuxWorkload, Parts};
use guest::{SerialLog, Workload};

/// The workload scripts/build-linux-guest.sh builds.
fn workload_binary() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/x86_64-unknown-linux-gnu/release/livemig-workload")
}

/// QEMU, killed when the test ends.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_linux_guest_boots_and_its_workload_reports_memory_disk_and_network() {
    let dir = tempfile::tempdir().unwrap();
    let parts = Parts::installed(&workload_binary()).expect("the Linux guest's pieces");
    let image = build(&parts, dir.path()).unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let workload = LinuxWorkload {
        disk: Some("/dev/vda".into()),
        port: Some(7000),
        address: Some("10.0.2.15/24".into()),
        ..LinuxWorkload::memory(Workload::busy(8, 20_000))
    };
    let serial = dir.path().join("serial.log");
    let qemu = Qemu(
        Command::new("qemu-system-x86_64")
            .args([
                "-nodefaults",
                "-display",
                "none",
                "-accel",
                "tcg",
                "-m",
                "256",
            ])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .args(["-append", &workload.cmdline()])
            .args(["-serial", &format!("file:{}", serial.display())])
            .args([
                "-drive",
                &format!("file={},format=raw,if=virtio,cache=none", disk.display()),
            ])
            .args([
                "-netdev",
                &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:7000"),
                "-device",
                "virtio-net-pci,netdev=n0,romfile=",
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64"),
    );

    let deadline = Instant::now() + Duration::from_secs(120);
    let text = loop {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        let log = SerialLog::parse(&text);
        let disk_verified = text
            .lines()
            .filter_map(|l| l.strip_prefix("livemig-guest: disk "))
            .any(|l| !l.contains("verified=0 "));
        if log.progress.len() >= 3 && disk_verified && text.contains("net listening") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not report:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let log = SerialLog::parse(&text);
    assert!(log.memory_intact(), "{text}");
    assert!(log.errors.is_empty(), "{:?}", log.errors);
    assert!(!text.contains("CORRUPT"), "{text}");

    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut numbers = Vec::new();
    for word in ["a", "b", "c"] {
        writeln!(writer, "{word}").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let (n, echoed) = line.trim_end().split_once(' ').unwrap();
        assert_eq!(echoed, word);
        numbers.push(n.parse::<u64>().unwrap());
    }
    assert_eq!(numbers, [1, 2, 3]);
    drop(qemu);
}
