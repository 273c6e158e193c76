#!/usr/bin/env bash
# The main job: the embedded default on one host. Starts a registry, a beacon that asks that
# registry who may reach whom, and pilotd registered with both, all on loopback with state
# under $PILOT_HOME (default ${TMPDIR:-/tmp}/pilot-demo), waits for the daemon to register,
# prints `pilotctl info`, and keeps the three running until Ctrl-C (or for $PILOT_RUN_SECS
# seconds when set).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -p pilot-registry -p pilot-beacon -p pilotd -p pilotctl
bin=target/release
home="${PILOT_HOME:-${TMPDIR:-/tmp}/pilot-demo}"
mkdir -p "$home"
chmod 700 "$home"
token="$home/beacon.token"
[ -s "$token" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$token"
chmod 600 "$token"
reg_port="${PILOT_REGISTRY_PORT:-9000}"
beacon_port="${PILOT_BEACON_PORT:-9001}"
udp_port="${PILOT_UDP_PORT:-4000}"

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

"$bin/pilot-registry" --addr "127.0.0.1:$reg_port" --store "$home/registry.redb" \
    --beacon-token-file "$token" >"$home/registry.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    grep -q "listening" "$home/registry.log" 2>/dev/null && break
    sleep 0.1
done
"$bin/pilot-beacon" --addr "127.0.0.1:$beacon_port" --registry "127.0.0.1:$reg_port" \
    --beacon-token-file "$token" >"$home/beacon.log" 2>&1 &
pids+=($!)
"$bin/pilotd" --home "$home/node" --socket "$home/node/pilotd.sock" \
    --registry "127.0.0.1:$reg_port" --beacon "127.0.0.1:$beacon_port" \
    --listen "127.0.0.1:$udp_port" >"$home/pilotd.log" 2>&1 &
pids+=($!)

for _ in $(seq 100); do
    grep -q "registered" "$home/pilotd.log" 2>/dev/null && break
    sleep 0.1
done
if ! grep -q "registered" "$home/pilotd.log"; then
    echo "run: pilotd did not register; logs under $home" >&2
    tail -n 20 "$home/registry.log" "$home/beacon.log" "$home/pilotd.log" >&2
    exit 1
fi
echo "registry 127.0.0.1:$reg_port, beacon 127.0.0.1:$beacon_port, pilotd udp 127.0.0.1:$udp_port"
for _ in $(seq 50); do
    [ -S "$home/node/pilotd.sock" ] && break
    sleep 0.1
done
"$bin/pilotctl" --socket "$home/node/pilotd.sock" info
echo
echo "try: $bin/pilotctl --socket $home/node/pilotd.sock --json info"
echo "logs and state under $home; Ctrl-C stops all three"
if [ -n "${PILOT_RUN_SECS:-}" ]; then
    sleep "$PILOT_RUN_SECS"
else
    wait -n
fi
