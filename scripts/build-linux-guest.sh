#!/usr/bin/env bash
# Builds the Linux test guest's workload as a static binary (glibc's static
# libraries, crt-static): it runs alone in the guest's initramfs. The guest
# itself (kernel, initramfs) is packed at run time from this binary, the
# Debian cloud kernel and busybox-static (see guest/src/linux).
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --quiet --target x86_64-unknown-linux-gnu -p livemig-workload
echo "target/x86_64-unknown-linux-gnu/release/livemig-workload"
