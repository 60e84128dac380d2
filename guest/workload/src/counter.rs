//! A TCP counter: every line a client sends is answered with the next
//! number of one counter shared by all connections. A client that sees
//! its numbers keep climbing across a migration kept its session and the
//! guest kept its state.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Listens on `port` and serves each client on a thread of its own.
pub fn serve(port: u16) -> io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    let counter = Arc::new(AtomicU64::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let counter = counter.clone();
            std::thread::spawn(move || {
                let _ = answer(stream, &counter);
            });
        }
    });
    Ok(())
}

fn answer(stream: TcpStream, counter: &AtomicU64) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        writeln!(writer, "{n} {line}")?;
    }
    Ok(())
}
