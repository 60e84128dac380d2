//! The contract between real QEMU and the simulated VM: a scenario runs on
//! a bed of each, asserts what a user would check, and returns what the
//! agent saw that may not differ between them. Tests whose subject is the
//! agent, the CLI or the protocol run on the simulation only because these
//! scenarios hold it to QEMU.

use std::fmt::Debug;
use std::future::Future;

use crate::TestBed;

/// Runs `scenario` on real QEMU, then on simulated VMs, and checks that
/// both gave the same observation.
pub async fn holds<F, Fut, O>(scenario: F)
where
    F: Fn(TestBed) -> Fut,
    Fut: Future<Output = O>,
    O: Debug + PartialEq,
{
    // Which half a failure comes from shows in the test's output.
    eprintln!("contract: the scenario on real QEMU");
    let real = scenario(TestBed::new().await).await;
    eprintln!("contract: the scenario on the simulated VM");
    let simulated = scenario(TestBed::simulated().await).await;
    assert_eq!(
        simulated, real,
        "the agent saw the simulated VM (left) differ from QEMU (right)"
    );
}
