//! `pilotd up` and `pilotd down` against the real kernel: each test makes its own network
//! namespace with a registry in it, runs the `pilotd` binary there with `ip netns exec`, and
//! checks the interface, address and routes with `ip`.
//!
//! These need root (network namespaces, /dev/net/tun), so they are ignored by default;
//! `scripts/test.sh` runs them when it runs as root.
#![allow(clippy::unwrap_used)]

use crate::netns;

use std::net::Ipv6Addr;
use std::path::Path;
use std::process::{Output, Stdio};

use netns::*;

/// The routes of the main table into the Pilot /48, one per line.
fn pilot_routes(ns: &Netns) -> Vec<String> {
    ns.ip(&["-6", "route", "show", "root", "fd06:3fcd:b33d::/48"])
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

/// Every IPv6 address in the namespace, as `ip -o` lines.
fn addresses(ns: &Netns) -> String {
    ns.ip(&["-o", "-6", "addr", "show"])
}

fn link_exists(ns: &Netns, name: &str) -> bool {
    ns.ip_try(&["link", "show", name]).status.success()
}

/// Checks the state `pilotd up` promises: a TUN pilot0 that is up with the given MTU, the ULA
/// as its only address (NODAD, no link-local), the /48 routed there with the ULA as source.
fn assert_configured(ns: &Netns, ula: Ipv6Addr, mtu: u32) {
    assert_eq!(
        tunnel::ula::from_ipv6(ula).map(|a| a.network),
        Ok(0),
        "{ula}"
    );
    let link = ns.ip(&["-d", "link", "show", "pilot0"]);
    assert!(link.contains("tun type tun"), "{link}");
    assert!(link.contains(&format!("mtu {mtu} ")), "{link}");
    assert!(link.contains(",UP"), "{link}");
    let addrs = ns.ip(&["-o", "-6", "addr", "show", "dev", "pilot0"]);
    let lines: Vec<&str> = addrs.lines().collect();
    assert_eq!(lines.len(), 1, "one address only:\n{addrs}");
    assert!(lines[0].contains(&format!("inet6 {ula}/128 ")), "{addrs}");
    assert!(lines[0].contains("nodad noprefixroute"), "{addrs}");
    assert!(!addrs.contains("fe80"), "{addrs}");
    let routes = pilot_routes(ns);
    assert_eq!(
        routes,
        vec![format!(
            "fd06:3fcd:b33d::/48 dev pilot0 proto static src {ula} metric 1024 pref medium"
        )],
    );
    let get = ns.ip(&["-6", "route", "get", "fd06:3fcd:b33d:0::f00d"]);
    assert!(
        get.contains(&format!("dev pilot0 proto static src {ula}")),
        "{get}"
    );
}

fn assert_clean(ns: &Netns) {
    assert!(!link_exists(ns, "pilot0"), "pilot0 still there");
    assert_eq!(pilot_routes(ns), Vec::<String>::new());
    let addrs = addresses(ns);
    assert!(!addrs.contains("fd06:3fcd:b33d"), "{addrs}");
}

fn down(ns: &Netns, home: &Path, registry: &str) -> Output {
    ns.pilotd(home, registry, &["down"]).output().unwrap()
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn up_creates_the_interface_with_the_ula_and_the_route() {
    let _ = ROOT;
    let ns = Netns::new();
    let reg = ns.registry();
    let home = tempfile::tempdir().unwrap();
    let up = Up::start(&ns, home.path(), &reg, &["--mtu", "9000"]);
    assert_configured(&ns, up.ula, 9000);
    assert!(up.log_text().contains(&format!("pilot0 up: {}", up.ula)));
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn sigterm_removes_interface_address_and_route() {
    let ns = Netns::new();
    let reg = ns.registry();
    let home = tempfile::tempdir().unwrap();
    let mut up = Up::start(&ns, home.path(), &reg, &[]);
    assert_configured(&ns, up.ula, 65535);
    up.signal("-TERM");
    let st = up.wait();
    assert!(st.success(), "{st}\n{}", up.log_text());
    assert!(up.log_text().contains("interface removed"));
    assert_clean(&ns);
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn after_kill_9_up_starts_again_and_cleans_leftovers() {
    let ns = Netns::new();
    let reg = ns.registry();
    let home = tempfile::tempdir().unwrap();
    let mut up = Up::start(&ns, home.path(), &reg, &[]);
    let first = up.ula;
    up.signal("-KILL");
    assert!(!up.wait().success());
    wait_until("the kernel to remove pilot0", || {
        !link_exists(&ns, "pilot0")
    });
    // What a crash may leave: a persistent TUN of that name nobody holds, a Pilot route and
    // address on another device.
    ns.ip(&["tuntap", "add", "dev", "pilot0", "mode", "tun"]);
    ns.veth("stale0");
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{first}/128"),
        "dev",
        "stale0",
        "nodad",
    ]);
    ns.ip(&["-6", "route", "add", "fd06:3fcd:b33d::/48", "dev", "stale0"]);
    let up = Up::start(&ns, home.path(), &reg, &[]);
    assert_eq!(up.ula, first, "same identity, same address");
    assert_configured(&ns, up.ula, 65535);
    let stale = ns.ip(&["-o", "-6", "addr", "show", "dev", "stale0"]);
    assert!(!stale.contains("fd06:3fcd:b33d"), "{stale}");
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn down_cleans_leftovers_and_is_idempotent() {
    let ns = Netns::new();
    let reg = ns.registry();
    let home = tempfile::tempdir().unwrap();
    // A persistent TUN pilot0 that nobody holds, a route and an address on another device.
    ns.ip(&["tuntap", "add", "dev", "pilot0", "mode", "tun"]);
    ns.veth("stale0");
    ns.ip(&[
        "-6",
        "addr",
        "add",
        "fd06:3fcd:b33d::5/128",
        "dev",
        "stale0",
        "nodad",
    ]);
    ns.ip(&["-6", "route", "add", "fd06:3fcd:b33d::/48", "dev", "stale0"]);
    ns.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:1::1/64",
        "dev",
        "stale0",
        "nodad",
    ]);
    let out = down(&ns, home.path(), &reg);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("removed interface pilot0"), "{stdout}");
    assert_clean(&ns);
    assert!(link_exists(&ns, "stale0"), "other devices stay");
    assert!(
        addresses(&ns).contains("fd00:1::1/64"),
        "other addresses stay"
    );
    let again = down(&ns, home.path(), &reg);
    assert!(again.status.success());
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(stdout.contains("nothing to remove"), "{stdout}");
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn what_is_removed_is_put_back_and_down_refuses_a_live_interface() {
    let ns = Netns::new();
    let reg = ns.registry();
    let home = tempfile::tempdir().unwrap();
    let up = Up::start(&ns, home.path(), &reg, &[]);
    assert_configured(&ns, up.ula, 65535);
    ns.ip(&[
        "-6",
        "addr",
        "del",
        &format!("{}/128", up.ula),
        "dev",
        "pilot0",
    ]);
    wait_until("the address and the route's source to come back", || {
        ns.ip(&["-o", "-6", "addr", "show", "dev", "pilot0"])
            .contains(&up.ula.to_string())
            && pilot_routes(&ns)
                .first()
                .is_some_and(|r| r.contains(&format!("src {}", up.ula)))
    });
    ns.ip(&["-6", "route", "del", "fd06:3fcd:b33d::/48", "dev", "pilot0"]);
    wait_until("the route to come back", || pilot_routes(&ns).len() == 1);
    assert_configured(&ns, up.ula, 65535);
    ns.ip(&["link", "set", "pilot0", "down"]);
    wait_until("the link, address and route to come back", || {
        ns.ip(&["link", "show", "pilot0"]).contains(",UP")
            && ns
                .ip(&["-o", "-6", "addr", "show", "dev", "pilot0"])
                .contains(&up.ula.to_string())
            && pilot_routes(&ns).len() == 1
    });
    assert_configured(&ns, up.ula, 65535);
    let log = up.log_text();
    assert!(log.contains("put back what was removed"), "{log}");
    // `pilotd down` leaves an interface that a running `pilotd up` holds.
    let out = down(&ns, home.path(), &reg);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another process"), "{err}");
    assert_configured(&ns, up.ula, 65535);
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn a_name_taken_by_another_kind_of_device_is_a_clear_error() {
    let ns = Netns::new();
    let reg = ns.registry();
    let home = tempfile::tempdir().unwrap();
    ns.veth("pilot0");
    let out = ns
        .pilotd(home.path(), &reg, &["up"])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("interface pilot0 already exists and is not a Pilot TUN device"),
        "{err}"
    );
    assert!(err.contains("(kind: veth)"), "{err}");
    let out = down(&ns, home.path(), &reg);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a Pilot TUN device"), "{err}");
    let link = ns.ip(&["-d", "link", "show", "pilot0"]);
    assert!(link.contains("veth"), "the veth stays: {link}");
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn ipv6_disabled_by_default_is_enabled_on_the_interface() {
    let ns = Netns::new();
    let reg = ns.registry();
    let home = tempfile::tempdir().unwrap();
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
    ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
    let mut up = Up::start(&ns, home.path(), &reg, &[]);
    assert_configured(&ns, up.ula, 65535);
    assert!(up.log_text().contains("enabled it on this interface only"));
    up.signal("-INT");
    assert!(up.wait().success());
    assert_clean(&ns);
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn without_cap_net_admin_up_says_what_is_missing() {
    let ns = Netns::new();
    let reg = ns.registry();
    let home = tempfile::tempdir().unwrap();
    let drop_cap = [
        "setpriv",
        "--inh-caps=-net_admin",
        "--bounding-set=-net_admin",
    ];
    let out = ns
        .pilotd_with(&drop_cap, home.path(), &reg, &["up"])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("creating TUN interface pilot0: permission denied; run as root or give pilotd CAP_NET_ADMIN"),
        "{err}"
    );
    assert_clean(&ns);
}
