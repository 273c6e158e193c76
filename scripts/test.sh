#!/usr/bin/env bash
# Runs every test of the workspace: unit, golden, property, integration, and the benchmarks
# once in test mode. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace --all-targets --locked
cargo test --workspace --doc --locked
