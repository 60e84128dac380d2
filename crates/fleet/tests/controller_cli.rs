//! `livemig-controller`'s command line: a cluster it cannot use is a clear
//! error before anything starts.

use std::process::Command;

fn controller(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_livemig-controller"))
        .args(args)
        .env_remove("LIVEMIG_CLUSTER")
        .output()
        .expect("livemig-controller runs")
}

#[test]
fn a_cluster_it_cannot_use_is_a_clear_error() {
    for (args, says) in [
        (vec![], "--cluster"),
        (vec!["--cluster", "http://127.0.0.1:2379"], "plaintext"),
        (vec!["--cluster", "127.0.0.1:2379"], "expected https://"),
        (
            vec!["--cluster", "https://127.0.0.1:2379"],
            "needs --tls-dir",
        ),
    ] {
        let out = controller(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
