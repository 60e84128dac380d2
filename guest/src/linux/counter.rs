//! The client side of the workload's TCP counter: a session that sends a
//! line every interval and reads each answer, to show whether a guest kept
//! its state and the session across a migration.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a client saw of its session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    /// The counter's answers, in order.
    pub numbers: Vec<u64>,
    /// The longest wait for an answer.
    pub longest_pause: Duration,
    /// Why the session ended before `stop`, if it did.
    pub error: Option<String>,
}

impl Session {
    /// Answers came, none was lost or repeated, and the session held.
    pub fn unbroken(&self) -> bool {
        self.error.is_none()
            && !self.numbers.is_empty()
            && self.numbers.windows(2).all(|w| w[1] == w[0] + 1)
    }
}

/// Sends a line every `every` on `stream` and reads its answer, until
/// `stop` is set or the session fails.
pub fn keep_talking(stream: TcpStream, every: Duration, stop: Arc<AtomicBool>) -> Session {
    let mut session = Session::default();
    let read = match stream.try_clone() {
        Ok(read) => read,
        Err(e) => {
            session.error = Some(format!("cannot read the session: {e}"));
            return session;
        }
    };
    let (mut reader, mut writer) = (BufReader::new(read), stream);
    let mut last = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let mut line = String::new();
        let answer = writeln!(writer, "ping")
            .and_then(|()| reader.read_line(&mut line))
            .map_err(|e| e.to_string())
            .and_then(|n| match n {
                0 => Err("the guest closed the session".to_string()),
                _ => line
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .ok_or_else(|| format!("unexpected answer {line:?}")),
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
        std::thread::sleep(every);
    }
    session
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_a_restart_or_an_error_breaks_the_session() {
        let ok = Session {
            numbers: vec![4, 5, 6],
            ..Default::default()
        };
        assert!(ok.unbroken());
        for numbers in [vec![4, 6], vec![4, 5, 1], vec![]] {
            assert!(!Session {
                numbers,
                ..Default::default()
            }
            .unbroken());
        }
        let failed = Session {
            error: Some("reset".into()),
            ..ok
        };
        assert!(!failed.unbroken());
    }
}
