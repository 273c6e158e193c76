#!/usr/bin/env bash
# Runs every test of the workspace: unit, golden, property, integration, doc tests, and the
# benchmarks once in test mode. Installs what is missing first. Ends with one summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --all-targets --locked 2>&1 | tee "$log"
cargo test --workspace --doc --locked 2>&1 | tee -a "$log"
# Sum cargo's per-binary "test result" lines into one closing line.
awk '/^test result:/ { p += $4; f += $6; i += $8 }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log" |
    tee "${PILOT_TEST_SUMMARY:-/dev/null}"
