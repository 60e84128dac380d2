#!/usr/bin/env bash
# Runs the livemig demo: a busy guest live-migrated with auto-converge
# between two agents on this machine. Extra arguments go to `livemig demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The Linux guest (`--guest linux`) needs its static workload; the demo
# packs it with Debian's kernel and busybox at run time.
prev=""
for arg in "$@"; do
    if [ "$arg" = "--guest=linux" ] || { [ "$prev" = "--guest" ] && [ "$arg" = "linux" ]; }; then
        echo "==> building the Linux guest's workload"
        scripts/build-linux-guest.sh >/dev/null
    fi
    prev="$arg"
done
cargo build --release --bins
exec target/release/livemig demo "$@"
