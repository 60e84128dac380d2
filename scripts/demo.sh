#!/usr/bin/env bash
# Runs the livemig demo: a busy guest live-migrated with auto-converge
# between two agents on this machine. Extra arguments go to `livemig demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --bins
exec target/release/livemig demo "$@"
