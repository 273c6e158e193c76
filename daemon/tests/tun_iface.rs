//! `pilotd up` and `pilotd down` against the real kernel: each test makes its own network
//! namespace with a registry in it, runs the `pilotd` binary there with `ip netns exec`, and
//! checks the interface, address and routes with `ip`.
//!
//! These need root (network namespaces, /dev/net/tun), so they are ignored by default;
//! `scripts/test.sh` runs them when it runs as root.
#![allow(clippy::unwrap_used)]

mod support;

use std::fs::File;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const ROOT: &str = "needs root: network namespaces and /dev/net/tun";
const WAIT: Duration = Duration::from_secs(20);

/// A network namespace of this test process, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "pilot-t-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> args`, which must succeed; returns its stdout.
    fn ip(&self, args: &[&str]) -> String {
        let mut v = vec!["-n", &self.name];
        v.extend_from_slice(args);
        run("ip", &v)
    }

    /// A veth pair `name` and `name`-p, both up (the kernel here may lack the dummy driver).
    fn veth(&self, name: &str) {
        let peer = format!("{name}-p");
        self.ip(&["link", "add", name, "type", "veth", "peer", "name", &peer]);
        self.ip(&["link", "set", name, "up"]);
        self.ip(&["link", "set", &peer, "up"]);
    }

    /// `ip -n <ns> args`, whatever its outcome.
    fn ip_try(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .unwrap()
    }

    /// `sysctl -w key=value` inside the namespace.
    fn sysctl(&self, key: &str, value: &str) {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "sysctl",
                "-q",
                "-w",
                &format!("{key}={value}"),
            ],
        );
    }

    /// Starts a registry listening on 127.0.0.1 inside the namespace; returns its address.
    /// It runs on a thread of its own that entered the namespace, until the test process ends.
    fn registry(&self) -> String {
        let path = format!("/run/netns/{}", self.name);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap();
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let addr = rt.block_on(support::registry());
            tx.send(addr).unwrap();
            rt.block_on(std::future::pending::<()>());
        });
        rx.recv_timeout(WAIT).unwrap()
    }

    /// `pilotd args...` inside the namespace with `home` as state directory.
    fn pilotd(&self, home: &Path, registry: &str, args: &[&str]) -> Command {
        self.pilotd_with(&[], home, registry, args)
    }

    /// Like [`Netns::pilotd`], run through `wrapper` (a command and its arguments).
    fn pilotd_with(&self, wrapper: &[&str], home: &Path, registry: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name])
            .args(wrapper)
            .arg(env!("CARGO_BIN_EXE_pilotd"))
            .arg("--home")
            .arg(home)
            .arg("--socket")
            .arg(home.join("pilotd.sock"))
            .args([
                "--registry",
                registry,
                "--beacon",
                "",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--log-level", "info"])
            .args(args)
            .env_remove("PILOT_TUN_NAME")
            .env_remove("PILOT_MTU")
            .env_remove("PILOT_CONFIG");
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// A running `pilotd up`, killed on drop if still running.
struct Up {
    child: Child,
    log: PathBuf,
    ula: Ipv6Addr,
}

impl Up {
    /// Starts `pilotd up` and waits for its `pilot0 up: <ula>` line.
    fn start(ns: &Netns, home: &Path, registry: &str, extra: &[&str]) -> Up {
        let log = home.join(format!("up-{}.log", rand_suffix()));
        let mut args = vec!["up"];
        args.extend_from_slice(extra);
        let child = ns
            .pilotd(home, registry, &args)
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut up = Up {
            child,
            log,
            ula: Ipv6Addr::UNSPECIFIED,
        };
        wait_until("the `up:` log line", || {
            if let Some(st) = up.child.try_wait().unwrap() {
                panic!("pilotd up exited early ({st}):\n{}", up.log_text());
            }
            up.log_text()
                .lines()
                .find_map(|l| l.split_once(" up: ").map(|(_, r)| r.to_owned()))
                .and_then(|r| r.split_whitespace().next()?.parse().ok())
                .map(|ula| up.ula = ula)
                .is_some()
        });
        up
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        run("kill", &[sig, &self.child.id().to_string()]);
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "pilotd did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn rand_suffix() -> u32 {
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

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
