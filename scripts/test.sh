#!/usr/bin/env bash
# Runs the tests: unit tests, state machines against scripted QMP and
# peers, the agent and CLI on simulated VMs, and the end-to-end tests with
# real QEMU, real agents and the in-tree guests.
#
#   scripts/test.sh          everything
#   scripts/test.sh --fast   everything that needs no real QEMU (a few minutes)
#
# Tests run side by side as far as the machine allows (cargo-nextest; each
# takes slots by the CPU it needs, see .config/nextest.toml): two real QEMU
# guests at a time, and the tests that measure rates or throttle real
# vCPUs (tests/convergence) alone.
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
# The end-to-end tests run the livemig, livemigd and livemig-simvm binaries;
# building the tests builds them (each has tests of its own).
if $fast; then
    exec cargo nextest run --workspace --profile fast "${args[@]}"
fi
# The Linux test guest's workload, static (its kernel and busybox come from
# setup.sh's packages).
scripts/build-linux-guest.sh >/dev/null

exec cargo nextest run --workspace "${args[@]}"
