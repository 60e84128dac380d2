#!/usr/bin/env bash
# Runs the tests: unit tests, state machines against scripted QMP and
# peers, the agent and CLI on simulated VMs, and the end-to-end tests with
# real QEMU, real agents and the in-tree guests.
#
#   scripts/test.sh          everything
#   scripts/test.sh --fast   everything that needs no real QEMU (a few minutes)
#
# Tests run two at a time (cargo-nextest, .config/nextest.toml), except the
# ones that measure rates or throttle real vCPUs (tests/convergence) and the
# fault matrix (tests/faults), which run one at a time afterwards: a second
# busy guest on a 2-core machine would change what they measure.
set -euo pipefail
cd "$(dirname "$0")/.."

fast=false
args=()
for arg in "$@"; do
    case "$arg" in
    --fast) fast=true ;;
    *) args+=("$arg") ;;
    esac
done

scripts/setup.sh
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "==> installing cargo-nextest"
    cargo install --locked cargo-nextest
fi
# The end-to-end tests run the livemig, livemigd and livemig-simvm binaries.
cargo build --bins
if $fast; then
    exec cargo nextest run --workspace --profile fast "${args[@]}"
fi
# The Linux test guest's workload, static (its kernel and busybox come from
# setup.sh's packages).
scripts/build-linux-guest.sh >/dev/null

alone='binary(convergence) | binary(faults)'
status=0
cargo nextest run --workspace -j 2 -E "not ($alone)" "${args[@]}" || status=$?
cargo nextest run --workspace -j 1 -E "$alone" "${args[@]}" || status=$?
exit $status
