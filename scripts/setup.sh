#!/usr/bin/env bash
# Installs what building and testing pilot needs on a fresh Debian machine with a Rust
# toolchain (rustup). Safe to run again: it only installs what is missing.
set -euo pipefail

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: $1 needs root; run as root or install it yourself" >&2
        return 1
    fi
}

# Debian packages used by the tests (kept in one list as later tests add to it): iproute2
# (ip netns, ip link/addr/route), procps (sysctl) and util-linux (setpriv) for the TUN
# interface tests; curl, iputils-ping (ping) and python3 (http.server, UDP peers) for the
# data path tests through pilot0; iperf3, openssh-server and openssh-client (ssh, scp,
# ssh-keygen) for the pilot0 tests and scripts/bench-tun.sh; dpkg-dev (dpkg-shlibdeps),
# rpm (rpmbuild), binutils (strip), lintian and rpmlint for scripts/package.sh and its checks;
# mmdebstrap and systemd-container (systemd-nspawn) for the package tests and the
# systemd-resolved test in booted containers; chromium (headless) for the registry dashboard
# test, which loads the page, checks what its scripts drew and saves a screenshot; postgresql
# (initdb, pg_ctl, psql, createdb) for pilot-registry's PostgreSQL store tests, which start
# throwaway clusters of their own (the package's default cluster is not used).
APT_PACKAGES=(pkg-config nftables iproute2 procps util-linux curl iputils-ping python3 iperf3
    openssh-server openssh-client dpkg-dev rpm binutils lintian rpmlint mmdebstrap
    systemd-container chromium postgresql)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    need_root "apt-get install ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found; install a Rust toolchain (rustup) first" >&2
    exit 1
fi
for c in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^$c"; then
        rustup component add "$c"
    fi
done
