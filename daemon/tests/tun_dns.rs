//! DNS for `.pilot` names at pilot0's resolver address, with the system's own resolver
//! (glibc through `getent`, and `curl`): a namespace whose resolv.conf points at
//! `tunnel::inside::dns::RESOLVER` resolves hostnames, numeric names and reverse names of nodes.
//!
//! These need root (network namespaces, /dev/net/tun), so they are ignored by default;
//! `scripts/test.sh` runs them when it runs as root.
#![allow(clippy::unwrap_used)]

use crate::netns;

use std::fs::File;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use netns::*;
use tunnel::inside::dns;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn pilot_names_resolve_for_the_system_resolver() {
    let mut a = Netns::new();
    let mut b = Netns::new();
    a.link_to(&b, "pv0", "10.79.0.1", "10.79.0.2");
    a.listen = "10.79.0.1:0".into();
    b.listen = "10.79.0.2:0".into();
    a.resolv_conf(&format!(
        "nameserver {}\noptions timeout:2 attempts:1\n",
        dns::RESOLVER
    ));
    let reg = a.registry_at("10.79.0.1:0");
    let dir = tempfile::tempdir().unwrap();
    for home in ["a", "b", "c"] {
        std::fs::create_dir(dir.path().join(home)).unwrap();
    }
    let up_a = Up::start(&a, &dir.path().join("a"), &reg, &["--public"]);
    let up_b = Up::start(
        &b,
        &dir.path().join("b"),
        &reg,
        &["--public", "--hostname", "bob", "--expose", "8080"],
    );
    // C: a private node (plain pilotd) that does not trust A.
    let home_c = dir.path().join("c");
    let _c = Proc(
        b.pilotd(&home_c, &reg, &["--hostname", "carol"])
            .stdout(Stdio::null())
            .stderr(File::create(home_c.join("pilotd.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let getent = |args: &[&str]| {
        let t = Instant::now();
        let out = a.exec("getent", args).output().unwrap();
        (out, t.elapsed())
    };

    // The hostname, as the system resolver sees it (retried while B's hostname registers).
    let deadline = Instant::now() + Duration::from_secs(20);
    let bob = loop {
        let (out, _) = getent(&["ahosts", "bob.pilot"]);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "bob.pilot never resolved: {}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(bob.contains(&up_b.ula.to_string()), "{bob}");

    // The numeric name, and the reverse name of B's ULA.
    let addr = tunnel::ula::from_ipv6(up_b.ula).unwrap();
    let (out, _) = getent(&["ahosts", &dns::numeric_name(addr)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&up_b.ula.to_string()), "{}", text(&out));
    let (out, _) = getent(&["hosts", &up_b.ula.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("bob.pilot"), "{}", text(&out));

    // An unknown name fails at once; a private node that does not trust us does not resolve.
    let (out, took) = getent(&["ahosts", "nobody.pilot"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(took < Duration::from_secs(2), "NXDOMAIN after {took:?}");
    std::thread::sleep(Duration::from_secs(1));
    let (out, _) = getent(&["ahosts", "carol.pilot"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a private name resolved: {}",
        text(&out)
    );

    // An unmodified program by name.
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("index.html"), b"bob by name\n").unwrap();
    let _server = b.http_server(up_b.ula, 8080, site.path(), None);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = a
            .exec(
                "curl",
                &["-sS", "--max-time", "10", "http://bob.pilot:8080/"],
            )
            .output()
            .unwrap();
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout), "bob by name\n");
            break;
        }
        assert!(Instant::now() < deadline, "curl by name: {}", text(&out));
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = &up_a;
}
