#!/usr/bin/env bash
# Throughput, CPU, memory and round-trip time of `pilotd up` (pilot0) against the bare veth it
# runs over, measured in the same run. Needs root (network namespaces, /dev/net/tun), iperf3,
# ping and python3 (scripts/setup.sh installs them).
#
# Two namespaces linked by a veth (10.78.0.1 / 10.78.0.2, and fdaa:78::1 / fdaa:78::2 so
# that both paths carry IPv6), a registry in the first, `pilotd up --public --expose 5201` in
# both. iperf3 from A to B's ULA (through pilot0) and to B's veth address; ping -6 both ways.
# Prints a markdown table.
#
#   scripts/bench-tun.sh            builds release binaries first
#   BENCH_NO_BUILD=1 scripts/bench-tun.sh
#   BENCH_SECS=5                    seconds per iperf3 run [default: 5]
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "bench-tun: needs root (network namespaces, /dev/net/tun)" >&2
    exit 1
fi
for c in iperf3 ping python3 ip; do
    command -v "$c" >/dev/null || { echo "bench-tun: $c not found (scripts/setup.sh)" >&2; exit 1; }
done

cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
    cargo build --release -p pilotd -p pilot-registry --locked >&2
fi
pilotd="$target/release/pilotd"
registry="$target/release/pilot-registry"
secs="${BENCH_SECS:-5}"

# Names unique to this run; everything is removed on exit.
tag="$$"
nsa="pbench-$tag-a"
nsb="pbench-$tag-b"
work="$(mktemp -d /tmp/bench-tun.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${pids[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    ip netns del "$nsa" 2>/dev/null || true
    ip netns del "$nsb" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

ip netns add "$nsa"
ip netns add "$nsb"
for ns in "$nsa" "$nsb"; do ip -n "$ns" link set lo up; done
ip -n "$nsa" link add "pb$tag" type veth peer name "pb$tag-p" netns "$nsb"
ip -n "$nsa" addr add 10.78.0.1/24 dev "pb$tag"
ip -n "$nsb" addr add 10.78.0.2/24 dev "pb$tag-p"
ip -n "$nsa" addr add fdaa:78::1/64 dev "pb$tag" nodad
ip -n "$nsb" addr add fdaa:78::2/64 dev "pb$tag-p" nodad
ip -n "$nsa" link set "pb$tag" up
ip -n "$nsb" link set "pb$tag-p" up

wait_for() { # what, command...
    local what="$1"
    shift
    for _ in $(seq 200); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "bench-tun: timed out waiting for $what" >&2
    exit 1
}
listening() { # ns, port
    [ -n "$(ip netns exec "$1" ss -Hltn "sport = :$2")" ]
}

ip netns exec "$nsa" "$registry" --addr 10.78.0.1:9000 --ephemeral --register-per-minute 0 \
    --requests-per-ip 0 --requests-per-node 0 --log-level warn 2>"$work/registry.log" &
pids+=($!)
wait_for "the registry" listening "$nsa" 9000

# `ip netns exec` execs the program, so $! is pilotd's own PID.
start_up() { # ns, name, veth ip
    mkdir -p "$work/$2"
    ip netns exec "$1" "$pilotd" --home "$work/$2" --socket "$work/$2/pilotd.sock" \
        --registry 10.78.0.1:9000 --beacon "" --listen "$3:0" --log-level info \
        up --public --expose 5201 2>"$work/$2.log" >/dev/null &
    pids+=($!)
    eval "pid_$2=$!"
    wait_for "pilot0 up in $2" grep -q " up: " "$work/$2.log"
}
start_up "$nsa" a 10.78.0.1
start_up "$nsb" b 10.78.0.2
ula_b="$(sed -n 's/.* up: \([^ ]*\).*/\1/p' "$work/b.log" | head -1)"
sleep 1

kib() { # pid, field: VmRSS or VmHWM in MiB
    awk -v f="$2:" '$1 == f { printf "%.1f", $2 / 1024 }' "/proc/$1/status"
}
ticks() { # utime + stime of both daemons, in clock ticks
    echo $(($(awk '{ print $14 + $15 }' "/proc/$pid_a/stat") + $(awk '{ print $14 + $15 }' "/proc/$pid_b/stat")))
}
rss_idle_a="$(kib "$pid_a" VmRSS)"
rss_idle_b="$(kib "$pid_b" VmRSS)"

ip netns exec "$nsb" iperf3 -s -B "$ula_b" -p 5201 >/dev/null 2>&1 &
pids+=($!)
ip netns exec "$nsb" iperf3 -s -B fdaa:78::2 -p 5202 >/dev/null 2>&1 &
pids+=($!)
wait_for "iperf3 on pilot0" listening "$nsb" 5201
wait_for "iperf3 on the veth" listening "$nsb" 5202

# iperf3 from A; prints "bytes bits_per_second" received.
iperf() { # host, port, extra args...
    local host="$1" port="$2"
    shift 2
    ip netns exec "$nsa" iperf3 -c "$host" -p "$port" -t "$secs" -J "$@" |
        python3 -c 'import json, sys; s = json.load(sys.stdin)["end"]["sum_received"]; print(int(s["bytes"]), s["bits_per_second"])'
}
hz="$(getconf CLK_TCK)"
declare -A gbps cpu
for mode in 1 4; do
    t0="$(ticks)"
    read -r bytes bps < <(iperf "$ula_b" 5201 -P "$mode")
    t1="$(ticks)"
    gbps[pilot$mode]="$(python3 -c "print(f'{$bps / 1e9:.2f}')")"
    cpu[$mode]="$(python3 -c "print(f'{($t1 - $t0) / $hz / ($bytes / 1e9):.2f}')")"
    read -r _ bps < <(iperf fdaa:78::2 5202 -P "$mode")
    gbps[veth$mode]="$(python3 -c "print(f'{$bps / 1e9:.2f}')")"
done

rtt() { # host: average ping RTT in ms
    ip netns exec "$nsa" ping -6 -q -c 20 -i 0.05 -W 5 "$1" | sed -n 's|.*= [^/]*/\([^/]*\)/.*|\1|p'
}
rtt_pilot="$(rtt "$ula_b")"
rtt_veth="$(rtt fdaa:78::2)"
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }

cat <<EOF
| figure | pilot0 | veth | pilot0 / veth |
|---|---|---|---|
| iperf3 TCP, 1 stream (Gbit/s) | ${gbps[pilot1]} | ${gbps[veth1]} | $(ratio "${gbps[pilot1]}" "${gbps[veth1]}") |
| iperf3 TCP, -P 4 (Gbit/s) | ${gbps[pilot4]} | ${gbps[veth4]} | $(ratio "${gbps[pilot4]}" "${gbps[veth4]}") |
| ping -6 RTT avg (ms) | $rtt_pilot | $rtt_veth | $(ratio "$rtt_pilot" "$rtt_veth") |
| CPU-s/GB, both pilotd, 1 stream | ${cpu[1]} | | |
| CPU-s/GB, both pilotd, -P 4 | ${cpu[4]} | | |
| RSS idle A / B (MiB) | $rss_idle_a / $rss_idle_b | | |
| RSS peak (VmHWM) A / B (MiB) | $(kib "$pid_a" VmHWM) / $(kib "$pid_b" VmHWM) | | |
EOF
