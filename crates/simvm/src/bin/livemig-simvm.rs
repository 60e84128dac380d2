//! `livemig-simvm`: a simulated VM for livemig's simulated hypervisor. It
//! takes QEMU's command line; see the `simvm` crate.

use std::process::ExitCode;

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("livemig-simvm: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(simvm::run(&argv)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // QEMU's prefix, so logs read the same.
            eprintln!("qemu-system-x86_64: {e}");
            ExitCode::FAILURE
        }
    }
}
