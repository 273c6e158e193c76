#!/usr/bin/env bash
# The main job. Today pilot has its protocol core (the `tunnel` crate) and no daemon yet, so
# this runs the handshake walk-through: two nodes create identities, exchange signed PILA
# frames and carry an encrypted packet. It becomes "registry, beacon and daemon on one host"
# when those land.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo run --release --locked -p tunnel --example handshake -- "${PILOT_HOME:-${TMPDIR:-/tmp}/pilot-demo}"
