#!/usr/bin/env bash
# The main job: the embedded default on one host. Starts a registry and a beacon that asks
# that registry who may reach whom, then:
#
# - as root: two nodes running `pilotd up` (each a virtual NIC, pilot0, carrying its ULA), node
#   A on this host and node B in a network namespace the script creates (linked by a veth);
#   B trusts A after a handshake, serves a page with Python's http.server on its ULA, and this
#   host fetches it with an unmodified `curl http://[B's ULA]:8080/` through pilot0. A is
#   `alice` on the system socket (/run/pilot/pilotd.sock) and B is `bob`, so the README's
#   pilotctl commands work as written; pilotctl is linked into /usr/local/bin;
# - otherwise (no TUN without root): one plain pilotd on loopback, as an agent host.
#
# Prints `pilotctl info` and keeps everything running until Ctrl-C (or for $PILOT_RUN_SECS
# seconds when set). State and logs go under $PILOT_HOME (default ${TMPDIR:-/tmp}/pilot-demo).
# It builds release binaries, unless PILOT_BIN_DIR names a directory holding built ones
# (scripts/test.sh passes those of its test build).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ -n "${PILOT_BIN_DIR:-}" ]; then
    bin=$(cd "$PILOT_BIN_DIR" && pwd)
else
    cargo build --release --locked -p pilot-registry -p pilot-beacon -p pilotd -p pilotctl
    bin="${CARGO_TARGET_DIR:-$(pwd)/target}/release"
fi
for b in pilot-registry pilot-beacon pilotd pilotctl; do
    [ -x "$bin/$b" ] || { echo "run: $bin/$b is missing" >&2; exit 1; }
done
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
ns=""
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "$ns" ]; then ip netns del "$ns" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for FILE PATTERN WHAT: waits up to 20 s for PATTERN in FILE.
wait_for() {
    for _ in $(seq 200); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "run: $3 did not happen; logs under $home" >&2
    tail -n 20 "$home"/*.log >&2
    exit 1
}

# node_id SOCKET: the node ID of the daemon behind SOCKET.
node_id() {
    "$bin/pilotctl" --json --socket "$1" info |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["data"]["node_id"])'
}

if [ "$(id -u)" -eq 0 ]; then
    host_ip=10.231.77.1
    ns_ip=10.231.77.2
    listen="$host_ip"
    ns="pilot-demo-$$"
    veth="pd$$"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add "$veth" type veth peer name "${veth}b" netns "$ns"
    ip addr add "$host_ip/24" dev "$veth"
    ip -n "$ns" addr add "$ns_ip/24" dev "${veth}b"
    ip link set "$veth" up
    ip -n "$ns" link set "${veth}b" up
else
    echo "run: not root, so no virtual NIC (pilotd up needs a TUN interface); starting one plain node"
    listen=127.0.0.1
fi

"$bin/pilot-registry" --addr "$listen:$reg_port" --store "$home/registry.redb" \
    --beacon-token-file "$token" >"$home/registry.log" 2>&1 &
pids+=($!)
wait_for "$home/registry.log" listening "the registry start"
"$bin/pilot-beacon" --addr "$listen:$beacon_port" --registry "$listen:$reg_port" \
    --beacon-token-file "$token" >"$home/beacon.log" 2>&1 &
pids+=($!)

if [ -z "$ns" ]; then
    "$bin/pilotd" --home "$home/node" --socket "$home/node/pilotd.sock" \
        --registry "$listen:$reg_port" --beacon "$listen:$beacon_port" \
        --listen "$listen:$udp_port" >"$home/pilotd.log" 2>&1 &
    pids+=($!)
    wait_for "$home/pilotd.log" registered "pilotd's registration"
    echo "registry $listen:$reg_port, beacon $listen:$beacon_port, pilotd udp $listen:$udp_port"
    for _ in $(seq 50); do
        [ -S "$home/node/pilotd.sock" ] && break
        sleep 0.1
    done
    "$bin/pilotctl" --socket "$home/node/pilotd.sock" info
    echo
    echo "try: $bin/pilotctl --socket $home/node/pilotd.sock --json info"
    echo "logs and state under $home; Ctrl-C stops all three"
else
    # Node A takes the system socket, where a plain `pilotctl` looks first as root, unless
    # another pilotd holds it; pilotctl goes on PATH unless another one is there.
    sock_a=/run/pilot/pilotd.sock
    if "$bin/pilotctl" --socket "$sock_a" daemon status --check >/dev/null 2>&1; then
        echo "run: another pilotd serves $sock_a; node A uses $home/a/pilotd.sock (pilotctl --socket)"
        sock_a="$home/a/pilotd.sock"
    fi
    link=/usr/local/bin/pilotctl
    if [ ! -e "$link" ] || [[ "$(readlink "$link")" == */release/pilotctl || "$(readlink "$link")" == */debug/pilotctl ]]; then
        ln -sfn "$bin/pilotctl" "$link"
        echo "run: $link -> $bin/pilotctl"
    elif [ "$(readlink -f "$link")" != "$(readlink -f "$bin/pilotctl")" ]; then
        echo "run: $link is another pilotctl; this build's is $bin/pilotctl"
    fi
    sock_b="$home/b/pilotd.sock"
    "$bin/pilotd" up --home "$home/a" --socket "$sock_a" --public --hostname alice \
        --registry "$host_ip:$reg_port" --beacon "$host_ip:$beacon_port" \
        --listen "$host_ip:$udp_port" >"$home/a.log" 2>&1 &
    pids+=($!)
    ip netns exec "$ns" "$bin/pilotd" up --home "$home/b" --socket "$sock_b" --public \
        --hostname bob --accept-tasks \
        --registry "$host_ip:$reg_port" --beacon "$host_ip:$beacon_port" \
        --listen "$ns_ip:$udp_port" >"$home/b.log" 2>&1 &
    pids+=($!)
    wait_for "$home/a.log" "pilot0 up:" "node A's pilot0"
    wait_for "$home/b.log" "pilot0 up:" "node B's pilot0"
    ula_b=$(grep -o 'pilot0 up: [0-9a-f:]*' "$home/b.log" | head -n1 | cut -d' ' -f3)
    id_a=$(node_id "$sock_a")
    id_b=$(node_id "$sock_b")

    # B trusts A: A asks, B approves once the request arrived.
    "$bin/pilotctl" --socket "$sock_a" handshake "$id_b" "run.sh demo" >/dev/null
    for _ in $(seq 100); do
        "$bin/pilotctl" --socket "$sock_b" approve "$id_a" >/dev/null 2>&1 && break
        sleep 0.1
    done

    site="$home/site"
    mkdir -p "$site"
    echo "hello from node B ($ula_b), served by python3 -m http.server" >"$site/index.html"
    ip netns exec "$ns" python3 -m http.server 8080 --bind "$ula_b" --directory "$site" \
        >"$home/http.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        [ -n "$(ip netns exec "$ns" ss -Hltn "sport = :8080")" ] && break
        sleep 0.1
    done

    echo "registry $host_ip:$reg_port, beacon $host_ip:$beacon_port"
    echo "node A (this host): $("$bin/pilotctl" --socket "$sock_a" info | head -n 1)"
    echo "node B (namespace $ns): ULA $ula_b, trusts A"
    echo
    echo "\$ curl -g http://[$ula_b]:8080/"
    curl -sS -g --max-time 20 "http://[$ula_b]:8080/"
    echo
    "$bin/pilotctl" --socket "$sock_a" info
    echo
    echo "try: curl -g http://[$ula_b]:8080/   ping -6 $ula_b   pilotctl ping bob   pilotctl status"
    echo "     (the README's \"Using a node\" commands work here as written)"
    echo "logs and state under $home; Ctrl-C stops everything and removes pilot0 and $ns"
fi
if [ -n "${PILOT_RUN_SECS:-}" ]; then
    # In the background: bash runs the INT/TERM trap at once only while it is in `wait`.
    sleep "$PILOT_RUN_SECS" &
    pids+=($!)
    wait "$!"
else
    wait -n
fi
