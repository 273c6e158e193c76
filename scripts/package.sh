#!/usr/bin/env bash
# Builds pilot's .deb and .rpm from this checkout: release binaries (stripped), systemd units,
# example configuration, man pages, shell completions, network manager snippets, changelog and
# copyright, all from the one list packaging/files.txt. Output: $PILOT_DIST (default dist/),
# pilot_<version>-<release>_<arch>.deb and pilot-<version>-<release>.<arch>.rpm; it prints
# their paths. Needs dpkg-dev, rpm and binutils (scripts/setup.sh installs them).
#
# PILOT_BIN_DIR=DIR packages the pilotd, pilot-registry, pilot-beacon and pilotctl already
# built in DIR instead of building release ones (scripts/test.sh passes the binaries of its
# own test build); PILOT_PACKAGE_LINT=1 runs lintian and rpmlint on the result.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
umask 022
target=${CARGO_TARGET_DIR:-$root/target}
dist=${PILOT_DIST:-$root/dist}
release=1
version=$(sed -n '/^\[workspace.package\]/,/^\[/{s/^version *= *"\(.*\)"/\1/p}' Cargo.toml)
maintainer="Pilot maintainers <maintainers@users.noreply.b-seed-98d167d1.example>"
for tool in dpkg-deb dpkg-shlibdeps rpmbuild strip gzip; do
    command -v "$tool" >/dev/null || { echo "package: $tool not found (scripts/setup.sh installs it)" >&2; exit 1; }
done

if [ -n "${PILOT_BIN_DIR:-}" ]; then
    bindir=$PILOT_BIN_DIR
else
    cargo build --release --locked -p pilotd -p pilot-registry -p pilot-beacon -p pilotctl
    bindir=$target/release
fi
for b in pilotd pilot-registry pilot-beacon pilotctl; do
    [ -x "$bindir/$b" ] || { echo "package: $bindir/$b is missing" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/gen" "$dist"
for b in pilotd pilot-registry pilot-beacon pilotctl; do
    strip --strip-unneeded -o "$work/bin/$b" "$bindir/$b"
done
gen=$work/gen
"$work/bin/pilotd" --man-page | gzip -9n >"$gen/pilotd.8.gz"
"$work/bin/pilot-registry" --man-page | gzip -9n >"$gen/pilot-registry.8.gz"
"$work/bin/pilot-beacon" --man-page | gzip -9n >"$gen/pilot-beacon.8.gz"
"$work/bin/pilotctl" man-page | gzip -9n >"$gen/pilotctl.1.gz"
"$work/bin/pilotctl" completions bash >"$gen/pilotctl.bash"
"$work/bin/pilotctl" completions zsh >"$gen/_pilotctl"
"$work/bin/pilotctl" completions fish >"$gen/pilotctl.fish"
gzip -9n <packaging/changelog >"$gen/changelog.gz"

# stage FORMAT DIR: installs every file of packaging/files.txt under DIR; prints
# "DESTINATION config" for configuration files and "DESTINATION" for the others.
stage() {
    local fmt=$1 dir=$2 systemd zsh mode src dst flag
    case $fmt in
    deb) systemd=/lib/systemd zsh=/usr/share/zsh/vendor-completions ;;
    rpm) systemd=/usr/lib/systemd zsh=/usr/share/zsh/site-functions ;;
    esac
    while read -r mode src dst flag; do
        case $mode in '' | '#'*) continue ;; esac
        case $src in
        @bin/*) src=$work/bin/${src#@bin/} ;;
        @gen/*) src=$gen/${src#@gen/} ;;
        esac
        dst=${dst//\{systemd\}/$systemd}
        dst=${dst//\{zsh\}/$zsh}
        install -D -m "$mode" "$src" "$dir$dst"
        echo "$dst${flag:+ $flag}"
    done <packaging/files.txt
}

# The .deb
deb=$work/deb
stage deb "$deb" >"$work/deb.list"
mkdir -p "$deb/DEBIAN"
awk '$2 == "config" { print $1 }' "$work/deb.list" >"$deb/DEBIAN/conffiles"
for s in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$s" "$deb/DEBIAN/$s"
done
# lintian's overrides: metadata for the checker, in the .deb only.
install -D -m 0644 packaging/debian/lintian-overrides "$deb/usr/share/lintian/overrides/pilot"
mkdir -p "$work/shlibs/debian"
touch "$work/shlibs/debian/control"
# The binaries are analysed where they were stripped, not in the package tree: its warning
# that they should be there is silenced (a real failure still stops the script).
shlibs=$(cd "$work/shlibs" && dpkg-shlibdeps -O "$work"/bin/* 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || { echo "package: dpkg-shlibdeps found no dependencies" >&2; exit 1; }
arch=$(dpkg --print-architecture)
cat >"$deb/DEBIAN/control" <<CONTROL
Package: pilot
Version: $version-$release
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $(du -sk --exclude=DEBIAN "$deb" | cut -f1)
Depends: $shlibs, systemd, passwd
Suggests: nftables
Section: net
Priority: optional
Description: encrypted overlay network: node daemon, registry, beacon and CLI
 Pilot gives each host a permanent 48-bit virtual address and encrypted UDP
 tunnels to other hosts, with NAT traversal. pilotd runs the node and its pilot0
 interface (IPv6 fd06:3fcd:b33d::/48); pilot-registry and pilot-beacon are the
 servers nodes register with; pilotctl controls a running pilotd. Members of
 the group pilot may use pilotctl without root.
CONTROL
(cd "$deb" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$deb/DEBIAN/md5sums"
debfile=$dist/pilot_${version}-${release}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$deb" "$debfile" >/dev/null

# The .rpm
stagedir=$work/rpmroot
stage rpm "$stagedir" >"$work/rpm.list"
files=$(
    echo "%dir /etc/pilot"
    echo "%dir /usr/share/doc/pilot"
    awk '$2 == "config" { print "%config(noreplace) " $1; next }
         $1 ~ /^\/usr\/share\/doc\/pilot\/copyright$/ { print "%license " $1; next }
         { print $1 }' "$work/rpm.list"
)
mkdir -p "$work/rpm"
awk -v version="$version" -v release="$release" -v stage="$stagedir" -v files="$files" '
    { gsub(/@VERSION@/, version); gsub(/@RELEASE@/, release); gsub(/@STAGE@/, stage) }
    /^@FILES@$/ { print files; next }
    { print }' packaging/rpm/pilot.spec.in >"$work/rpm/pilot.spec"
rpmbuild --quiet -bb --define "_topdir $work/rpm" --define "_rpmdir $work/rpm/out" \
    --define "_build_id_links none" "$work/rpm/pilot.spec" >/dev/null
rpmfile=$(find "$work/rpm/out" -name '*.rpm' | head -n1)
cp "$rpmfile" "$dist/"
cp "$work/rpm/pilot.spec" "$dist/pilot.spec"
echo "$debfile"
echo "$dist/$(basename "$rpmfile")"
if [ -n "${PILOT_PACKAGE_LINT:-}" ]; then
    # lintian and rpmlint with the justified overrides (packaging/debian/lintian-overrides,
    # packaging/rpm/rpmlint.toml); their reports go to stderr.
    lintian --info --fail-on error,warning "$debfile" >&2
    rpmlint -c packaging/rpm/rpmlint.toml "$dist/$(basename "$rpmfile")" >&2 ||
        { echo "package: rpmlint found problems" >&2; exit 1; }
fi
