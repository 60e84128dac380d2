//! Lines on the serial console, whole: the threads share one lock.

use std::io::Write;
use std::sync::Mutex;

static OUT: Mutex<()> = Mutex::new(());

/// Prints `livemig-guest: TEXT` as one line.
pub fn line(text: &str) {
    let _held = OUT.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "livemig-guest: {text}");
    let _ = out.flush();
}
