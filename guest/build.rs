//! Assembles the test guest with the system's GNU binutils (`as`, `ld`), so the
//! kernel is built from source by every `cargo build` with nothing downloaded.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn run(tool: &str, args: &[&str]) {
    let status = Command::new(tool).args(args).status().unwrap_or_else(|e| {
        panic!("cannot run `{tool}` to build the test guest ({e}); install binutils")
    });
    assert!(
        status.success(),
        "`{tool} {}` failed: {status}",
        args.join(" ")
    );
}

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let src = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("src");
    let asm = src.join("guest.s");
    let script = src.join("guest.ld");
    let object = out.join("guest.o");
    let kernel = out.join("livemig-guest.elf");
    let assembler = env::var("LIVEMIG_GUEST_AS").unwrap_or_else(|_| "as".into());
    let linker = env::var("LIVEMIG_GUEST_LD").unwrap_or_else(|_| "ld".into());

    run(
        &assembler,
        &[
            "--32",
            "-o",
            object.to_str().unwrap(),
            asm.to_str().unwrap(),
        ],
    );
    run(
        &linker,
        &[
            "-m",
            "elf_i386",
            "-z",
            "noexecstack",
            "--no-warn-rwx-segments",
            "-T",
            script.to_str().unwrap(),
            "-o",
            kernel.to_str().unwrap(),
            object.to_str().unwrap(),
        ],
    );
    println!("cargo:rerun-if-changed=src/guest.s");
    println!("cargo:rerun-if-changed=src/guest.ld");
    println!("cargo:rerun-if-env-changed=LIVEMIG_GUEST_AS");
    println!("cargo:rerun-if-env-changed=LIVEMIG_GUEST_LD");
}
