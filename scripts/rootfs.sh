#!/usr/bin/env bash
# Prints the path of a Debian bookworm rootfs tarball (mmdebstrap, variant minbase) for the
# tests' booted systemd containers, making it first when it is missing. Each set is named and
# its packages are listed here, once; the tarballs are kept under
# ${CARGO_TARGET_DIR:-target}/pilot-rootfs/ and reused by later runs. Concurrent callers of
# one set wait for each other (flock), so scripts/test.sh can make them in the background
# while the tests compile and the tests find them ready. Needs root and mmdebstrap.
#
# usage: scripts/rootfs.sh SET      (prints the tarball's path)
#        scripts/rootfs.sh --all    (makes every set, in parallel)
set -euo pipefail
cd "$(dirname "$0")/.."

# packages:   the .deb and .rpm tests: systemd to boot, iproute2 to look at pilot0, curl and
#             busybox (httpd) for traffic through it, rpm to install the .rpm.
# resolved:   pilot names through systemd-resolved.
# resolvconf: pilot names through a resolv.conf record (openresolv), without systemd-resolved.
packages_of() {
    case $1 in
    packages) echo systemd,systemd-sysv,dbus,iproute2,curl,busybox,rpm ;;
    resolved) echo systemd,systemd-sysv,dbus,systemd-resolved,iproute2 ;;
    resolvconf) echo systemd,systemd-sysv,dbus,openresolv,iproute2 ;;
    *) return 1 ;;
    esac
}
sets=(packages resolved resolvconf)

usage() {
    echo "usage: scripts/rootfs.sh SET | --all   (SET: ${sets[*]})" >&2
    exit 2
}
[ $# -eq 1 ] || usage

if [ "$1" = --all ]; then
    pids=()
    for s in "${sets[@]}"; do
        "$0" "$s" &
        pids+=($!)
    done
    rc=0
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    exit $rc
fi

include=$(packages_of "$1") || usage
command -v mmdebstrap >/dev/null || { echo "rootfs: mmdebstrap not found (scripts/setup.sh installs it)" >&2; exit 1; }
dir=${CARGO_TARGET_DIR:-$PWD/target}/pilot-rootfs
mkdir -p "$dir"
# The name carries the package list, so a changed list makes a new tarball.
tar=$dir/bookworm-$1-${include//,/-}.tar
exec 9>"$tar.lock"
flock 9
if [ ! -s "$tar" ]; then
    start=$SECONDS
    rm -f "$tar.partial"
    # The output's name does not end in .tar, so the format is named; the mirror is named so
    # that mmdebstrap does not read a sources list from stdin.
    mmdebstrap --quiet --variant=minbase --format=tar --include="$include" \
        bookworm "$tar.partial" http://deb.debian.org/debian </dev/null >&2
    mv "$tar.partial" "$tar"
    echo "rootfs: made $1 in $((SECONDS - start)) s" >&2
fi
echo "$tar"
