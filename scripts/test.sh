#!/usr/bin/env bash
# Runs every test: unit tests, protocol tests against a fake QMP peer, and the
# end-to-end tests with real QEMU, real agents and the in-tree guest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The Linux test guest's workload, static (its kernel and busybox come from
# setup.sh's packages).
scripts/build-linux-guest.sh >/dev/null
# The end-to-end tests run the livemig and livemigd binaries.
cargo build --bins
cargo test --workspace --no-fail-fast "$@"
