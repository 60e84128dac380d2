//! What the `livemig` CLI printed, as tests read it.

use std::process::Output;

use protocol::job::JobRecord;

/// Its standard output, as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Its standard error, as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The job record `migrate --json` prints last.
pub fn json_record(out: &Output) -> JobRecord {
    let text = stdout(out);
    let last = text.lines().last().expect("a job record");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("not a job record: {last}: {e}"))
}
