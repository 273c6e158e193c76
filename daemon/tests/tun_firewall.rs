//! `pilotd up` behind a host firewall: namespace B has an nftables input chain with policy
//! drop that accepts only loopback, established traffic and its veth (so the tunnel's UDP
//! works), and nothing for pilot0. A curls an http.server on B's ULA through pilot0.
//!
//! These need root (network namespaces, /dev/net/tun, nftables), so they are ignored by
//! default; `scripts/test.sh` runs them when it runs as root.
#![allow(clippy::unwrap_used)]

use crate::netns;

use std::process::Output;
use std::time::{Duration, Instant};

use netns::*;

const EXPOSED: u16 = 8080;

/// B's firewall: drop by default, the usual accepts, nothing for pilot0.
const DROPPING: &str = r#"
table inet filter {
  chain input {
    type filter hook input priority 0; policy drop;
    ct state established,related accept
    iifname "lo" accept
    iifname "pv0-p" accept
  }
}
"#;

/// B's firewall: accept by default, but drop new TCP connections arriving on pilot0 (datagrams
/// still get in).
const DROPPING_NEW_TCP: &str = r#"
table inet filter {
  chain input {
    type filter hook input priority 0; policy accept;
    iifname "pilot0" meta l4proto tcp ct state new drop
  }
}
"#;

/// A with plain `pilotd up`; B behind a firewall, exposing [`EXPOSED`], with `b_args`.
struct Pair {
    a: Netns,
    b: Netns,
    up_a: Up,
    up_b: Up,
    _dir: tempfile::TempDir,
}

impl Pair {
    /// B behind [`DROPPING`].
    fn start(b_args: &[&str]) -> Pair {
        Pair::start_behind(DROPPING, b_args)
    }

    /// B behind the nftables script `firewall`.
    fn start_behind(firewall: &str, b_args: &[&str]) -> Pair {
        let mut a = Netns::new();
        let mut b = Netns::new();
        a.link_to(&b, "pv0", "10.77.0.1", "10.77.0.2");
        a.listen = "10.77.0.1:0".into();
        b.listen = "10.77.0.2:0".into();
        b.nft_script(firewall);
        let reg = a.registry_at("10.77.0.1:0");
        let dir = tempfile::tempdir().unwrap();
        for home in ["a", "b"] {
            std::fs::create_dir(dir.path().join(home)).unwrap();
        }
        let up_a = Up::start(&a, &dir.path().join("a"), &reg, &["--public"]);
        let expose = EXPOSED.to_string();
        let mut args = vec!["--public", "--expose", &expose];
        args.extend_from_slice(b_args);
        let up_b = Up::start(&b, &dir.path().join("b"), &reg, &args);
        Pair {
            a,
            b,
            up_a,
            up_b,
            _dir: dir,
        }
    }

    /// Python's http.server on B's ULA serving `dir`, once it listens.
    fn http_server(&self, dir: &std::path::Path) -> Proc {
        self.b.http_server(self.up_b.ula, EXPOSED, dir, None)
    }

    /// curl from A to B's ULA fails within 3 s: B's firewall keeps it out.
    fn assert_curl_blocked(&self) {
        let (out, _) = self.curl(3);
        assert!(
            !out.status.success(),
            "curl got through the dropping firewall: {}",
            text(&out.stdout)
        );
    }

    /// curl from A to B's ULA, at most `max` seconds.
    fn curl(&self, max: u64) -> (Output, Duration) {
        let url = format!("http://[{}]:{EXPOSED}/hello.txt", self.up_b.ula);
        let t = Instant::now();
        let out = self
            .a
            .exec("curl", &["-sS", "-g", "--max-time", &max.to_string(), &url])
            .output()
            .unwrap();
        (out, t.elapsed())
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn site() -> tempfile::TempDir {
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("hello.txt"), b"hello past the firewall\n").unwrap();
    site
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn the_tcp_probe_sees_a_firewall_that_drops_only_new_connections() {
    let p = Pair::start_behind(DROPPING_NEW_TCP, &[]);
    let log = p.up_b.log_text();
    assert!(
        log.contains(
            "the host firewall lets datagrams arriving on pilot0 in but drops new TCP connections"
        ),
        "no warning:\n{log}"
    );
    // The warning is right: a connection through pilot0 does not get in.
    let site = site();
    let _server = p.http_server(site.path());
    p.assert_curl_blocked();
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn the_self_test_names_the_rule_and_the_rule_lets_connections_in() {
    let p = Pair::start(&[]);
    // A has no firewall: no warning there.
    assert!(
        p.up_a
            .log_text()
            .contains("firewall self-test: packets arriving on pilot0 reach"),
        "{}",
        p.up_a.log_text()
    );
    let log = p.up_b.log_text();
    assert!(
        log.contains("the host firewall drops packets arriving on pilot0"),
        "no warning:\n{log}"
    );
    let rules: Vec<String> = log
        .lines()
        .filter_map(|l| {
            l.split_once("to accept them, run: nft ")
                .map(|(_, r)| r.trim().to_owned())
        })
        .collect();
    assert_eq!(
        rules,
        ["insert rule inet filter input iifname \"pilot0\" ip6 saddr fd06:3fcd:b33d::/48 accept"],
        "{log}"
    );

    let site = site();
    let _server = p.http_server(site.path());
    p.assert_curl_blocked();

    // The rule the warning names, as a user would run it.
    let out = p.b.exec("nft", &[&rules[0]]).output().unwrap();
    assert!(
        out.status.success(),
        "nft {}: {}",
        rules[0],
        text(&out.stderr)
    );
    let (out, _) = p.curl(20);
    assert!(out.status.success(), "curl: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello past the firewall\n");
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn firewall_nftables_accepts_while_up_and_removes_its_rule_on_exit() {
    let mut p = Pair::start(&["--firewall", "nftables"]);
    let log = p.up_b.log_text();
    assert!(
        log.contains("firewall self-test: packets arriving on pilot0 reach local sockets"),
        "{log}"
    );
    assert!(!log.contains("the host firewall drops"), "{log}");
    let rules = p.b.nft_ruleset();
    assert!(rules.contains("comment \"pilotd:pilot0\""), "{rules}");

    let site = site();
    let _server = p.http_server(site.path());
    let (out, _) = p.curl(20);
    assert!(out.status.success(), "curl: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello past the firewall\n");

    p.up_b.signal("-TERM");
    assert!(p.up_b.wait().success(), "{}", p.up_b.log_text());
    let rules = p.b.nft_ruleset();
    assert!(!rules.contains("pilotd"), "rule left after exit:\n{rules}");
    // The host's own table and policy are untouched.
    assert!(rules.contains("policy drop"), "{rules}");
    assert!(rules.contains("iifname \"pv0-p\" accept"), "{rules}");
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn pilotd_down_removes_a_rule_a_killed_up_left() {
    let mut p = Pair::start(&["--firewall", "nftables"]);
    assert!(p.b.nft_ruleset().contains("pilotd:pilot0"));
    p.up_b.child.kill().unwrap();
    p.up_b.wait();
    assert!(p.b.nft_ruleset().contains("pilotd:pilot0"));
    let home = tempfile::tempdir().unwrap();
    let out =
        p.b.pilotd(home.path(), "127.0.0.1:1", &["down"])
            .output()
            .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("removed 1 firewall rule(s)"),
        "{}",
        text(&out.stdout)
    );
    let rules = p.b.nft_ruleset();
    assert!(!rules.contains("pilotd"), "{rules}");
    assert!(rules.contains("policy drop"), "{rules}");
    let _ = &p.up_a;
}
