//! The `livemig` binary as a user first meets it: its help names every
//! command and virsh's migrate options, and bad usage exits 2 with the
//! reason, before any agent is contacted.

use std::process::{Command, Output};

fn livemig(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_livemig"))
        .args(args)
        .env_remove("LIVEMIG_URI")
        .env_remove("LIVEMIG_TLS_DIR")
        .output()
        .expect("run livemig")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_help_names_the_commands_virsh_users_look_for() {
    let out = livemig(&["--help"]);

    assert!(out.status.success());
    let help = stdout(&out);
    for command in [
        "define",
        "start",
        "destroy",
        "list",
        "dominfo",
        "migrate",
        "domjobinfo",
        "domjobabort",
        "migrate-setspeed",
        "migrate-setmaxdowntime",
        "migrate-postcopy",
        "domcapabilities",
    ] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(command)),
            "no {command} in\n{help}"
        );
    }
}

#[test]
fn migrate_takes_virshs_option_names() {
    let out = livemig(&["migrate", "--help"]);

    assert!(out.status.success());
    let help = stdout(&out);
    for option in [
        "--live",
        "--offline",
        "--auto-converge",
        "--auto-converge-initial",
        "--auto-converge-increment",
        "--postcopy",
        "--postcopy-after-precopy",
        "--bandwidth",
        "--timeout",
        "--persistent",
        "--undefine-source",
        "--suspend",
        "--copy-storage-all",
        "--copy-storage-inc",
        "--migrate-disks",
        "--tls",
        "--unsafe",
        "--migrateuri",
    ] {
        assert!(help.contains(option), "no {option} in\n{help}");
    }
}

#[test]
fn bad_usage_exits_2_and_says_why() {
    let unknown = livemig(&["migrate", "--live", "--no-such-flag", "vm", "tls://h:7000"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("--no-such-flag"));

    let missing = livemig(&["migrate", "--live"]);
    assert_eq!(missing.status.code(), Some(2));
}
