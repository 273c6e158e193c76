//! systemd-resolved for real: `pilotd up` in a booted Debian container (systemd-nspawn) tells
//! resolved over D-Bus to send `.pilot` names and reverse lookups of the Pilot /48 to pilot0's
//! answerer, puts that back after resolved restarts, and takes it back when it stops.
//!
//! Needs root (network namespaces, systemd-nspawn, /dev/net/tun) and mmdebstrap with a Debian
//! mirror, so it is ignored by default; `scripts/test.sh` runs it when it runs as root.
#![allow(clippy::unwrap_used)]

use crate::netns;

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use netns::container::{debian_rootfs, Container};
use netns::*;
use tunnel::inside::dns;

/// Waits until `cond` holds for the output of `args` run in the container.
fn wait_for(c: &Container, args: &[&str], what: &str, cond: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = container_text(c, args);
        if cond(&out) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn container_text(c: &Container, args: &[&str]) -> String {
    netns::container::text(&c.run(args))
}

/// Starts `pilotd up` in the container as the transient service `unit`, stopped as the shipped
/// unit stops it (SIGTERM to pilotd alone, which then takes its resolver settings back), with
/// hostname `bob`, the `listen` address and `extra` flags; returns the ULA once pilot0 is up.
fn start_up(c: &Container, unit: &str, reg: &str, listen: &str, extra: &[&str]) -> Ipv6Addr {
    let unit_arg = format!("--unit={unit}");
    let mut args = vec![
        "systemd-run",
        &unit_arg,
        "--property=KillMode=mixed",
        "--",
        "/usr/local/bin/pilotd",
        "up",
        "--registry",
        reg,
        "--beacon",
        "",
        "--listen",
        listen,
        "--public",
        "--hostname",
        "bob",
        "--home",
        "/var/lib/pilot-test",
    ];
    args.extend_from_slice(extra);
    let out = c.enter(&args);
    assert!(out.status.success(), "{}", netns::container::text(&out));
    let log = wait_for(
        c,
        &["journalctl", "--no-pager", "-o", "cat", "-u", unit],
        "pilot0 up",
        |s| s.contains("pilot0 up: "),
    );
    log.lines()
        .find_map(|l| l.split_once("pilot0 up: ").map(|(_, r)| r.to_owned()))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no ULA in the `up:` line:\n{log}"))
}

#[test]
#[ignore = "needs root: systemd-nspawn, network namespaces and /dev/net/tun"]
fn resolved_routes_pilot_names_to_the_answerer_and_forgets_them_at_stop() {
    let a = Netns::new();
    let b = Netns::new();
    a.link_to(&b, "prs0", "10.81.0.1", "10.81.0.2");
    let reg = a.registry_at("10.81.0.1:0");
    let root = debian_rootfs("resolved");
    std::fs::copy(
        env!("CARGO_BIN_EXE_pilotd"),
        root.path().join("usr/local/bin/pilotd"),
    )
    .unwrap();
    let c = Container::boot(root, &b);

    // --dns resolved: the link carries the answerer, both routing domains and no default route.
    let ula = start_up(
        &c,
        "pilotd-resolved",
        &reg,
        "10.81.0.2:0",
        &["--dns", "resolved"],
    );
    let status = c.ok(&["resolvectl", "status", "pilot0"]);
    assert!(
        status.contains(&format!("DNS Servers: {}", dns::RESOLVER)),
        "{status}"
    );
    assert!(
        status.contains(&format!("~{} ~{}", dns::ZONE, dns::REVERSE_ZONE)),
        "{status}"
    );
    for off in ["-DefaultRoute", "-LLMNR", "-mDNS"] {
        assert!(status.contains(off), "{off} missing: {status}");
    }
    let q = c.ok(&["resolvectl", "query", "bob.pilot"]);
    assert!(
        q.contains(&ula.to_string()) && q.contains("link: pilot0"),
        "{q}"
    );
    let g = c.ok(&["getent", "ahosts", "bob.pilot"]);
    assert!(g.contains(&ula.to_string()), "{g}");
    let r = c.ok(&["resolvectl", "query", &ula.to_string()]);
    assert!(r.contains("bob.pilot"), "{r}");

    // A restart of resolved loses link settings; pilotd puts them back.
    c.ok(&["systemctl", "restart", "systemd-resolved"]);
    wait_for(
        &c,
        &["resolvectl", "domain", "pilot0"],
        "~pilot after resolved restarted",
        |s| s.contains("~pilot"),
    );
    let q = c.ok(&["resolvectl", "query", "--cache=no", "bob.pilot"]);
    assert!(q.contains(&ula.to_string()), "{q}");
    assert!(
        c.journal("pilotd-resolved").contains("settings reapplied"),
        "{}",
        c.journal("pilotd-resolved")
    );

    // Stopping pilotd takes the settings back and removes the link.
    c.ok(&["systemctl", "stop", "pilotd-resolved"]);
    let log = c.journal("pilotd-resolved");
    assert!(log.contains(".pilot settings are taken back"), "{log}");
    assert!(!log.contains("were not taken back"), "{log}");
    let domains = c.ok(&["resolvectl", "domain"]);
    assert!(!domains.contains("~pilot"), "{domains}");
    assert!(!c.run(&["ip", "link", "show", "pilot0"]).status.success());

    // --dns auto finds resolved on its own.
    start_up(&c, "pilotd-auto", &reg, "10.81.0.2:0", &["--dns", "auto"]);
    let d = c.ok(&["resolvectl", "domain", "pilot0"]);
    assert!(d.contains("~pilot"), "{d}");
    c.ok(&["systemctl", "stop", "pilotd-auto"]);

    // --dns off leaves resolved alone and says how to do it by hand.
    start_up(&c, "pilotd-off", &reg, "10.81.0.2:0", &["--dns", "off"]);
    let d = c.ok(&["resolvectl", "domain", "pilot0"]);
    assert!(!d.contains("~pilot"), "{d}");
    let log = c.journal("pilotd-off");
    assert!(log.contains("not configured (--dns=off)"), "{log}");
    c.ok(&["systemctl", "stop", "pilotd-off"]);
}

#[test]
#[ignore = "needs root: systemd-nspawn, network namespaces and /dev/net/tun"]
fn without_resolved_a_resolvconf_record_names_the_answerer_first() {
    let a = Netns::new();
    let b = Netns::new();
    a.link_to(&b, "prc0", "10.82.0.1", "10.82.0.2");
    let reg = a.registry_at("10.82.0.1:0");
    let root = debian_rootfs("resolvconf");
    std::fs::copy(
        env!("CARGO_BIN_EXE_pilotd"),
        root.path().join("usr/local/bin/pilotd"),
    )
    .unwrap();
    // An upstream server that never answers, listed before pilotd's record is added.
    std::fs::write(
        root.path().join("etc/resolv.conf"),
        "nameserver 10.82.0.1\noptions timeout:5 attempts:1\n",
    )
    .unwrap();
    let c = Container::boot(root, &b);
    c.ok(&[
        "sh",
        "-c",
        "echo 'nameserver 10.82.0.1' | resolvconf -a e0.upstream",
    ]);
    start_up(&c, "pilotd-rc", &reg, "10.82.0.2:0", &[]);
    let log = c.journal("pilotd-rc");
    assert!(log.contains("resolvconf record lo.pilot0"), "{log}");
    let conf = c.ok(&["cat", "/etc/resolv.conf"]);
    let first = conf
        .lines()
        .find(|l| l.starts_with("nameserver"))
        .unwrap_or_default();
    assert_eq!(first, format!("nameserver {}", dns::RESOLVER), "{conf}");
    assert!(conf.contains("nameserver 10.82.0.1"), "{conf}");
    // glibc asks pilot0's answerer first and gets the name at once.
    let t = Instant::now();
    let g = c.ok(&["getent", "ahosts", "bob.pilot"]);
    assert!(g.contains("fd06:3fcd:b33d:"), "{g}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());

    // A clean stop deletes the record.
    c.ok(&["systemctl", "stop", "pilotd-rc"]);
    let conf = c.ok(&["cat", "/etc/resolv.conf"]);
    assert!(
        !conf.contains(&dns::RESOLVER.to_string()),
        "{conf}\n{}",
        c.journal("pilotd-rc")
    );
    assert!(conf.contains("nameserver 10.82.0.1"), "{conf}");

    // After kill -9 the record stays; `pilotd down` deletes it.
    start_up(&c, "pilotd-rc2", &reg, "10.82.0.2:0", &[]);
    c.ok(&["systemctl", "kill", "--signal=KILL", "pilotd-rc2"]);
    wait_for(
        &c,
        &["systemctl", "is-active", "pilotd-rc2"],
        "pilotd killed",
        |s| !s.trim().starts_with("active"),
    );
    let conf = c.ok(&["cat", "/etc/resolv.conf"]);
    assert!(conf.contains(&dns::RESOLVER.to_string()), "{conf}");
    c.ok(&["/usr/local/bin/pilotd", "down"]);
    let conf = c.ok(&["cat", "/etc/resolv.conf"]);
    assert!(!conf.contains(&dns::RESOLVER.to_string()), "{conf}");
}
