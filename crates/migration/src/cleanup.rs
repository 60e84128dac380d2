//! Cleanup on the source: after a failed or cancelled migration the guest
//! must run here again, as it did before.

use qmp::commands::vm::{Cont, QueryStatus, RunState};
use qmp::Client;

/// Makes sure the source guest runs again, unless it was not running before
/// the migration (`was_running`); says what was done, for the job record.
/// A late `migrate_cancel` can leave the vCPUs stopped, so the state is
/// read back rather than assumed.
pub async fn resume_source(qmp: &Client, was_running: bool) -> String {
    match qmp.execute(&QueryStatus).await {
        Ok(s) if s.status == RunState::Running => "source kept running".into(),
        Ok(s) if !was_running => {
            format!("source left {:?} as it was before the migration", s.status)
        }
        Ok(_) => match qmp.execute(&Cont).await {
            Ok(_) => "source resumed".into(),
            Err(e) => format!("could not resume the source: {}", types::error_chain(&e)),
        },
        Err(e) => format!("cannot query the source QEMU: {}", types::error_chain(&e)),
    }
}
