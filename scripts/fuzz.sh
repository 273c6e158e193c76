#!/usr/bin/env bash
# Runs every cargo-fuzz target for FUZZ_SECS seconds each (default 30). The fuzz crate needs
# sanitizer flags that stable rustc takes with RUSTC_BOOTSTRAP=1, so no nightly is required.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${FUZZ_SECS:-30}"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for target in $(cargo fuzz list); do
    echo "fuzz: $target for ${secs}s"
    log=$(mktemp)
    if ! cargo fuzz run -O "$target" -- -max_total_time="$secs" >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        echo "fuzz: $target found a failure (artifact under fuzz/artifacts/$target)" >&2
        rm -f "$log"
        exit 1
    fi
    grep -E '^Done' "$log" || true
    rm -f "$log"
done
