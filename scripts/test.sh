#!/usr/bin/env bash
# Runs every test of the workspace: unit, golden, property, integration, doc tests, and the
# benchmarks once in test mode. Installs what is missing first. Ends with one summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
log=$(mktemp)
rootfs_log=$(mktemp)
prefetch=
trap 'rm -f "$log" "$rootfs_log"; [ -z "$prefetch" ] || kill "$prefetch" 2>/dev/null || true' EXIT
if [ "$(id -u)" -eq 0 ]; then
    # The root tests boot systemd containers on Debian rootfs tarballs; making them is mostly
    # waiting on the mirror, so it runs beside the compile below. The tests wait for it, and a
    # failure here shows again, with its cause, in the test that needs the tarball.
    scripts/rootfs.sh --all >"$rootfs_log" 2>&1 &
    prefetch=$!
fi
# Every target but the binaries' own test harnesses (they have no unit tests: `test = false`).
cargo test --workspace --tests --benches --examples --locked 2>&1 | tee "$log"
cargo test --workspace --doc --locked 2>&1 | tee -a "$log"
# The TUN interface, data path, package and PostgreSQL tests need root (network namespaces,
# /dev/net/tun, containers, running the database as another user): they are ignored in the
# run above, counted as skipped there, and run here when we are root (then they count as run,
# not as skipped).
if [ "$(id -u)" -eq 0 ]; then
    echo "== root-only tests ==" >>"$log"
    # The package, main-job and NAT lab tests package and run the binaries this build made
    # (test profile) instead of compiling the workspace again with the release profile's LTO.
    export PILOT_BIN_DIR="${CARGO_TARGET_DIR:-$PWD/target}/debug"
    # Each run below selects its tests by name in every crate's integration binary; with
    # --workspace, features resolve as in the run above, so nothing is built again.
    # pilot0 in network namespaces (tun_*) and the beacon relay tests of daemons.rs (nftables
    # rules on loopback).
    cargo test --workspace --test integration --locked -- --ignored tun_ daemons:: 2>&1 | tee -a "$log"
    # The NAT lab: pilotd pairs behind nftables NATs in network namespaces.
    cargo test --workspace --test integration --locked -- --ignored nat_lab:: 2>&1 | tee -a "$log"
    # The .deb and .rpm built by scripts/package.sh, installed in booted systemd containers.
    cargo test --workspace --test integration --locked -- --ignored packages:: 2>&1 | tee -a "$log"
    # The README's "Using a node" commands, as written, right after the main job.
    cargo test --workspace --test integration --locked -- --ignored readme_commands:: 2>&1 | tee -a "$log"
    # pilot-registry on PostgreSQL: the store, the protocol suite and the SIGKILL test, each
    # on a throwaway cluster (initdb and pg_ctl as user nobody on a free loopback port).
    cargo test --workspace --test integration --locked -- --ignored postgresql 2>&1 | tee -a "$log"
    wait "$prefetch" || sed 's/^/rootfs prefetch: /' "$rootfs_log" >&2
    prefetch=
fi
# Sum cargo's per-binary "test result" lines into one closing line.
awk '/^== root-only tests ==$/ { root = 1; next }
     /^test result:/ { p += $4; f += $6; i += $8; if (root) i -= $4 + $6 }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log" |
    tee "${PILOT_TEST_SUMMARY:-/dev/null}"
