//! Network namespaces and `pilotd up` processes for the tests that need the real kernel (root):
//! each namespace is named after the test process and deleted on drop.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs::File;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub mod container;

pub const ROOT: &str = "needs root: network namespaces and /dev/net/tun";
pub const WAIT: Duration = Duration::from_secs(20);

/// A network namespace of this test process, deleted on drop.
pub struct Netns {
    pub name: String,
    /// The UDP address `pilotd` listens on here. [default: 127.0.0.1:0]
    pub listen: String,
}

impl Netns {
    pub fn new() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "pilot-t-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns {
            name,
            listen: "127.0.0.1:0".into(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> args`, which must succeed; returns its stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut v = vec!["-n", &self.name];
        v.extend_from_slice(args);
        run("ip", &v)
    }

    /// A veth pair `name` and `name`-p, both up (the kernel here may lack the dummy driver).
    pub fn veth(&self, name: &str) {
        let peer = format!("{name}-p");
        self.ip(&["link", "add", name, "type", "veth", "peer", "name", &peer]);
        self.ip(&["link", "set", name, "up"]);
        self.ip(&["link", "set", &peer, "up"]);
    }

    /// `ip -n <ns> args`, whatever its outcome.
    pub fn ip_try(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .unwrap()
    }

    /// `sysctl -w key=value` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
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
    pub fn registry(&self) -> String {
        self.registry_at("127.0.0.1:0")
    }

    /// A registry listening on `bind` inside the namespace (as [`Netns::registry`]).
    pub fn registry_at(&self, bind: &str) -> String {
        let bind = bind.to_owned();
        let path = format!("/run/netns/{}", self.name);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap();
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let addr = rt.block_on(crate::support::registry_at(&bind));
            tx.send(addr).unwrap();
            rt.block_on(std::future::pending::<()>());
        });
        rx.recv_timeout(WAIT).unwrap()
    }

    /// `pilotd args...` inside the namespace with `home` as state directory, logging at level
    /// `info` (or `$PILOT_TEST_LOG_LEVEL`, to debug a failing test).
    pub fn pilotd(&self, home: &Path, registry: &str, args: &[&str]) -> Command {
        self.pilotd_with(&[], home, registry, args)
    }

    /// Like [`Netns::pilotd`], run through `wrapper` (a command and its arguments).
    pub fn pilotd_with(
        &self,
        wrapper: &[&str],
        home: &Path,
        registry: &str,
        args: &[&str],
    ) -> Command {
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
                &self.listen,
            ])
            .args([
                "--log-level",
                &std::env::var("PILOT_TEST_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
            ])
            .args(args)
            .env("PILOT_DNS", "off")
            .env_remove("PILOT_TUN_NAME")
            .env_remove("PILOT_MTU")
            .env_remove("PILOT_CONFIG");
        c
    }
}

impl Netns {
    /// A veth pair from this namespace (`ip4`/24 on `name`) to `other` (`other_ip4`/24 on
    /// `name`-p), both ends up.
    pub fn link_to(&self, other: &Netns, name: &str, ip4: &str, other_ip4: &str) {
        let peer = format!("{name}-p");
        self.ip(&[
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &other.name,
        ]);
        self.ip(&["addr", "add", &format!("{ip4}/24"), "dev", name]);
        other.ip(&["addr", "add", &format!("{other_ip4}/24"), "dev", &peer]);
        self.ip(&["link", "set", name, "up"]);
        other.ip(&["link", "set", &peer, "up"]);
    }

    /// `nft -f -` inside the namespace with `script` on stdin, which must succeed.
    pub fn nft_script(&self, script: &str) {
        use std::io::Write;
        let mut c = self
            .exec("nft", &["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft -f - <<{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `nft list ruleset` inside the namespace.
    pub fn nft_ruleset(&self) -> String {
        let out = self.exec("nft", &["list", "ruleset"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `program args...` inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]).args(args);
        c
    }
}

impl Netns {
    /// Gives the namespace its own resolv.conf (`ip netns exec` mounts
    /// `/etc/netns/<name>/resolv.conf` over `/etc/resolv.conf`); removed on drop.
    pub fn resolv_conf(&self, content: &str) {
        let dir = PathBuf::from("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), content).unwrap();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&self.name));
    }
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
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
pub struct Up {
    pub child: Child,
    pub log: PathBuf,
    pub ula: Ipv6Addr,
}

impl Up {
    /// Starts `pilotd up` and waits for its `pilot0 up: <ula>` line.
    pub fn start(ns: &Netns, home: &Path, registry: &str, extra: &[&str]) -> Up {
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

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        run("kill", &[sig, &self.child.id().to_string()]);
    }

    pub fn wait(&mut self) -> ExitStatus {
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

pub fn rand_suffix() -> u32 {
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

impl Netns {
    /// Whether a TCP socket listens on `port` in this namespace.
    pub fn is_listening(&self, port: u16) -> bool {
        let probe = format!("sport = :{port}");
        self.exec("ss", &["-Hltn", &probe])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false)
    }

    /// Waits until a TCP socket listens on `port` in this namespace (checked there, so a
    /// client started next is not refused while the server starts).
    pub fn wait_listening(&self, port: u16) {
        wait_until(&format!("a listener on TCP port {port}"), || {
            self.is_listening(port)
        });
    }

    /// Python's http.server in this namespace on `ip`:`port`, serving `dir`; its log (which
    /// names each client) goes to `log` when given. Returns once it listens.
    pub fn http_server(&self, ip: Ipv6Addr, port: u16, dir: &Path, log: Option<&Path>) -> Proc {
        let stderr = match log {
            Some(path) => Stdio::from(File::create(path).unwrap()),
            None => Stdio::null(),
        };
        let child = self
            .exec(
                "python3",
                &[
                    "-u",
                    "-m",
                    "http.server",
                    &port.to_string(),
                    "--bind",
                    &ip.to_string(),
                    "--directory",
                    dir.to_str().unwrap(),
                ],
            )
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let server = Proc(child);
        self.wait_listening(port);
        server
    }
}

/// A child process, killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
