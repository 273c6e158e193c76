//! A NAT lab in Linux network namespaces: real kernels, real nftables NATs, real `pilotd`,
//! `pilot-registry` and `pilot-beacon` processes. Needs root and `nft`.
//!
//! ```text
//!                     inet (registry 198.18.0.1:9000, beacon 198.18.0.1:9001 on lo;
//!                           forwards between sites; loss and blocks go in its forward hook)
//!        n1 198.18.1.1 /            \ n2 198.18.2.1
//!   wan 198.18.1.2  [nat-1]        [cgnat-2] wan 198.18.2.2 ... lan 100.64.2.1
//!   lan bridge 10.1.0.1 |              [nat-2] wan 100.64.2.2, lan bridge 10.2.0.1
//!          eth0 10.1.0.10 [host]          [host] eth0 10.2.0.10
//! ```
//!
//! A [`Lab`] is the internet namespace with the registry and the beacon; [`Lab::site`] adds a
//! NAT (or a chain of two for [`Nat::DoubleNat`]) with a LAN bridge behind it, and
//! [`Site::host`] a namespace on that LAN running `pilotd` on UDP port [`HOST_PORT`]. The test
//! process talks to each daemon through its IPC socket (a file, so no namespace is entered).
//!
//! Invariants: every namespace name carries the lab's random ID, so parallel runs never
//! collide; dropping a [`Host`] kills its `pilotd` before its namespace goes; dropping a
//! [`Site`] or the [`Lab`] deletes their namespaces (and with them every veth, bridge and
//! nftables table); no traffic leaves the lab's namespaces.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pilot_driver::{Driver, PilotStream};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel::ipc::{ConnInfo, PeerInfo};
use tunnel::{Addr, SocketAddr as PilotAddr};

/// The registry's address in the internet namespace.
pub const REGISTRY: &str = "198.18.0.1:9000";
/// The beacon's address in the internet namespace.
pub const BEACON: &str = "198.18.0.1:9001";
/// The beacon's IPv4 address (also the registry's).
pub const SERVICES_IP: &str = "198.18.0.1";
/// The UDP port every `pilotd` of the lab listens on inside its LAN namespace.
pub const HOST_PORT: u16 = 4000;
/// The virtual port of the echo service each host runs ([`Host::serve`]).
pub const ECHO_PORT: u16 = 4242;
/// The virtual port of the hashing sink each host runs ([`Host::serve`]): it reads to EOF
/// and answers with the SHA-256 of what it read.
pub const SINK_PORT: u16 = 4243;
/// How long a daemon or server has to come up.
pub const START_WAIT: Duration = Duration::from_secs(30);

/// Why the lab could not be built or driven.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("driver: {0}")]
    Driver(#[from] pilot_driver::DriverError),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("{0} exited early:\n{1}")]
    Exited(String, String),
    #[error("binary {0} missing and `cargo build` did not make it")]
    NoBinary(PathBuf),
    #[error("transfer: {0}")]
    Transfer(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

/// Whether this process runs as root and `nft` works: what the lab needs. When not, the
/// reason.
pub fn unavailable() -> Option<String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if !root {
        return Some("not root".into());
    }
    let nft = Command::new("nft")
        .args(["--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    (!nft).then(|| "`nft` is missing".into())
}

/// The kinds of NAT a site can sit behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Endpoint-independent mapping and filtering: the host's port is forwarded to it from
    /// anyone (masquerade keeps the port; a dnat sends inbound datagrams back).
    FullCone,
    /// Endpoint-independent mapping; inbound only from IP addresses the host sent to (a
    /// dynamic nftables set of destinations gates the dnat).
    AddressRestricted,
    /// Plain Linux masquerade: the port is kept when free (endpoint-independent mapping),
    /// inbound only from the exact remote endpoint (conntrack).
    PortRestricted,
    /// Masquerade with `fully-random` ports: every destination gets a new mapping.
    Symmetric,
    /// A home masquerade behind a carrier-grade masquerade (100.64.0.0/10 in between).
    DoubleNat,
    /// A masquerade whose firewall drops all UDP except to and from the beacon.
    UdpFirewall,
}

impl Nat {
    /// Every kind, in the order of the matrix.
    pub const ALL: [Nat; 6] = [
        Nat::FullCone,
        Nat::AddressRestricted,
        Nat::PortRestricted,
        Nat::Symmetric,
        Nat::DoubleNat,
        Nat::UdpFirewall,
    ];

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Nat::FullCone => "full-cone",
            Nat::AddressRestricted => "addr-restricted",
            Nat::PortRestricted => "port-restricted",
            Nat::Symmetric => "symmetric",
            Nat::DoubleNat => "double-nat",
            Nat::UdpFirewall => "udp-firewall",
        }
    }

    /// Whether a direct path between hosts behind `a` and `b` exists for a hole puncher that
    /// learns endpoints from the beacon and from what arrives: not through a UDP firewall, not
    /// between a symmetric NAT and one that filters on the remote port.
    pub fn direct_possible(a: Nat, b: Nat) -> bool {
        let port_filtering =
            |n: Nat| matches!(n, Nat::PortRestricted | Nat::DoubleNat | Nat::Symmetric);
        if a == Nat::UdpFirewall || b == Nat::UdpFirewall {
            return false;
        }
        !((a == Nat::Symmetric && port_filtering(b)) || (b == Nat::Symmetric && port_filtering(a)))
    }

    /// The nftables script of a NAT namespace with `wan` towards the internet and `lan`
    /// towards the hosts; `host` is the LAN address inbound datagrams to [`HOST_PORT`] go to
    /// when the kind forwards them.
    fn rules(self, host: &str) -> String {
        let mut pre = String::new();
        let mut fwd = String::new();
        let mut sets = String::new();
        let mut masq = "masquerade";
        match self {
            Nat::FullCone => {
                pre = format!("iifname \"wan\" udp dport {HOST_PORT} dnat to {host}:{HOST_PORT}");
            }
            Nat::AddressRestricted => {
                sets = "set seen { type ipv4_addr; flags dynamic,timeout; timeout 120s; }".into();
                fwd = format!(
                    "iifname \"lan\" oifname \"wan\" udp sport {HOST_PORT} update @seen {{ ip daddr }}"
                );
                pre = format!(
                    "iifname \"wan\" udp dport {HOST_PORT} ip saddr @seen dnat to {host}:{HOST_PORT}"
                );
            }
            Nat::PortRestricted | Nat::DoubleNat => {}
            Nat::Symmetric => masq = "masquerade fully-random",
            Nat::UdpFirewall => {
                fwd = format!(
                    "oifname \"wan\" meta l4proto udp ip daddr != {SERVICES_IP} drop\n    \
                     iifname \"wan\" meta l4proto udp ip saddr != {SERVICES_IP} drop"
                );
            }
        }
        format!(
            "table ip natlab {{\n  {sets}\n  \
             chain natpre {{ type nat hook prerouting priority dstnat; policy accept;\n    {pre}\n  }}\n  \
             chain natpost {{ type nat hook postrouting priority srcnat; policy accept;\n    \
             oifname \"wan\" {masq}\n  }}\n  \
             chain filtfwd {{ type filter hook forward priority filter; policy accept;\n    {fwd}\n  }}\n  \
             chain filtin {{ type filter hook input priority filter; policy accept;\n    \
             iifname \"wan\" meta l4proto udp drop\n  }}\n}}\n"
        )
    }
}

/// A network namespace, deleted on drop (with its interfaces and nftables tables).
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    fn new(name: String) -> Result<Netns, LabError> {
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> args`, which must succeed; returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, LabError> {
        let mut v = vec!["-n", &self.name];
        v.extend_from_slice(args);
        run("ip", &v)
    }

    /// `program args...` inside the namespace.
    pub fn exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// `sysctl -w key=value` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), LabError> {
        let kv = format!("{key}={value}");
        run(
            "ip",
            &["netns", "exec", &self.name, "sysctl", "-q", "-w", &kv],
        )
        .map(drop)
    }

    /// `nft -f -` inside the namespace with `script` on stdin.
    pub fn nft(&self, script: &str) -> Result<(), LabError> {
        let mut c = self
            .exec("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err("spawning nft"))?;
        if let Some(mut stdin) = c.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(io_err("writing to nft"))?;
        }
        let out = c.wait_with_output().map_err(io_err("waiting for nft"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(LabError::Command {
                cmd: format!("nft -f - <<{script}"),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
    }

    /// A veth pair from this namespace (`name`, `ip4` with its prefix) to `other`
    /// (`other_name`, `other_ip4`), both ends up; an empty address leaves that end without one.
    fn link(
        &self,
        name: &str,
        ip4: &str,
        other: &Netns,
        other_name: &str,
        other_ip4: &str,
    ) -> Result<(), LabError> {
        self.ip(&[
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            other_name,
            "netns",
            &other.name,
        ])?;
        if !ip4.is_empty() {
            self.ip(&["addr", "add", ip4, "dev", name])?;
        }
        if !other_ip4.is_empty() {
            other.ip(&["addr", "add", other_ip4, "dev", other_name])?;
        }
        self.ip(&["link", "set", name, "up"])?;
        other.ip(&["link", "set", other_name, "up"])?;
        Ok(())
    }

    /// Whether a socket of `proto` ("t" or "u") is bound to `port` here.
    pub fn is_bound(&self, proto: &str, port: u16) -> bool {
        let filter = format!("sport = :{port}");
        self.exec("ss")
            .args([&format!("-Hln{proto}"), filter.as_str()])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<String, LabError> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(io_err(format!("spawning {cmd}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(LabError::Command {
            cmd: format!("{cmd} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// A child process with its log file, killed on drop.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Proc, LabError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io_err(format!("opening {}", log.display())))?;
        let child = cmd
            .env_remove("PILOT_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .map_err(io_err(format!("spawning {name}")))?;
        Ok(Proc {
            name: name.into(),
            child: Some(child),
            log,
        })
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        let from = lines.len().saturating_sub(n);
        format!(
            "--- last lines of {} ---\n{}",
            self.log.display(),
            lines[from..].join("\n")
        )
    }

    /// An error if the process has exited.
    fn check_alive(&mut self) -> Result<(), LabError> {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => Ok(()),
            _ => Err(LabError::Exited(self.name.clone(), self.log_tail(40))),
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `cond` every 50 ms until it holds or `within` has passed.
pub fn wait_until(
    what: &str,
    within: Duration,
    mut cond: impl FnMut() -> Result<bool, LabError>,
) -> Result<(), LabError> {
    let deadline = Instant::now() + within;
    loop {
        if cond()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(LabError::Timeout(what.into()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The directory holding the `pilotd`, `pilot-registry` and `pilot-beacon` binaries:
/// `$PILOT_BIN_DIR` (as for scripts/package.sh and scripts/run.sh), else the target directory
/// of the running test (target/<profile>/deps/<test> -> target/<profile>), where they are
/// built when missing.
pub fn bin_dir() -> Result<PathBuf, LabError> {
    if let Some(d) = std::env::var_os("PILOT_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().map_err(io_err("current_exe"))?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let bins = ["pilotd", "pilot-registry", "pilot-beacon"];
    if bins.iter().any(|b| !dir.join(b).is_file()) {
        let cargo = option_env!("CARGO").unwrap_or("cargo");
        let st = Command::new(cargo)
            .args([
                "build",
                "-p",
                "pilotd",
                "-p",
                "pilot-registry",
                "-p",
                "pilot-beacon",
            ])
            .status()
            .map_err(io_err("running cargo build"))?;
        if !st.success() {
            return Err(LabError::Command {
                cmd: "cargo build -p pilotd -p pilot-registry -p pilot-beacon".into(),
                stderr: st.to_string(),
            });
        }
    }
    for b in bins {
        if !dir.join(b).is_file() {
            return Err(LabError::NoBinary(dir.join(b)));
        }
    }
    Ok(dir)
}

/// A random hex ID for namespace names (from the kernel's UUID source).
fn lab_id() -> String {
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap_or_default();
    let hex: String = uuid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(6)
        .collect();
    format!("{hex}{}", std::process::id() % 1000)
}

/// The internet namespace with the registry and the beacon.
#[derive(Debug)]
pub struct Lab {
    pub id: String,
    pub bins: PathBuf,
    /// Logs, tokens and the homes of the daemons; kept when `PILOT_NATLAB_KEEP` is set.
    pub dir: tempfile::TempDir,
    // Declared before `inet`: processes die before their namespace goes.
    pub registry: Proc,
    pub beacon: Proc,
    pub inet: Netns,
    sites: u32,
}

impl Lab {
    /// Creates the internet namespace and starts the registry and the beacon in it.
    pub fn start() -> Result<Lab, LabError> {
        let bins = bin_dir()?;
        let id = lab_id();
        let inet = Netns::new(format!("nl-{id}-inet"))?;
        inet.ip(&["addr", "add", &format!("{SERVICES_IP}/32"), "dev", "lo"])?;
        inet.sysctl("net.ipv4.ip_forward", "1")?;
        let mut dir = tempfile::Builder::new()
            .prefix(&format!("natlab-{id}-"))
            .tempdir()
            .map_err(io_err("tempdir"))?;
        if std::env::var_os("PILOT_NATLAB_KEEP").is_some() {
            dir.disable_cleanup(true);
            eprintln!("natlab {id}: logs kept in {}", dir.path().display());
        }
        let token = dir.path().join("beacon.token");
        std::fs::write(&token, "natlab-beacon-token-0123456789\n").map_err(io_err("token"))?;
        let mut lab = Lab {
            registry: Proc {
                name: "registry".into(),
                child: None,
                log: dir.path().join("registry.log"),
            },
            beacon: Proc {
                name: "beacon".into(),
                child: None,
                log: dir.path().join("beacon.log"),
            },
            id,
            bins,
            dir,
            inet,
            sites: 0,
        };
        lab.start_registry()?;
        lab.start_beacon()?;
        Ok(lab)
    }

    fn token(&self) -> PathBuf {
        self.dir.path().join("beacon.token")
    }

    /// (Re)starts the registry (in memory: a restart forgets every node, which re-register).
    pub fn start_registry(&mut self) -> Result<(), LabError> {
        self.registry.kill();
        let mut c = self.inet.exec(self.bins.join("pilot-registry"));
        c.args(["--addr", REGISTRY, "--ephemeral"])
            .arg("--beacon-token-file")
            .arg(self.token())
            .args(["--register-per-minute", "0"])
            .args(["--requests-per-ip", "0", "--requests-per-node", "0"])
            .args(["--log-level", &log_level()]);
        self.registry = Proc::spawn("registry", c, self.dir.path().join("registry.log"))?;
        let port = port_of(REGISTRY);
        wait_until("registry listening", START_WAIT, || {
            self.registry.check_alive()?;
            Ok(self.inet.is_bound("t", port))
        })
    }

    /// (Re)starts the beacon.
    pub fn start_beacon(&mut self) -> Result<(), LabError> {
        self.beacon.kill();
        let mut c = self.inet.exec(self.bins.join("pilot-beacon"));
        c.args(["--addr", BEACON, "--registry", REGISTRY])
            .arg("--beacon-token-file")
            .arg(self.token())
            .args(["--relay-bytes-per-sec", "0", "--relay-packets-per-sec", "0"])
            .args(["--punch-per-sec", "0", "--log-level", &log_level()]);
        self.beacon = Proc::spawn("beacon", c, self.dir.path().join("beacon.log"))?;
        let port = port_of(BEACON);
        wait_until("beacon listening", START_WAIT, || {
            self.beacon.check_alive()?;
            Ok(self.inet.is_bound("u", port))
        })
    }

    /// A new site: a NAT of `kind` (two for [`Nat::DoubleNat`]) linked to the internet
    /// namespace, with an empty LAN bridge behind it.
    pub fn site(&mut self, kind: Nat) -> Result<Site, LabError> {
        self.sites += 1;
        let i = self.sites;
        assert!(i < 250, "at most 249 sites per lab");
        let outer = Netns::new(format!("nl-{}-nat{i}", self.id))?;
        outer.sysctl("net.ipv4.ip_forward", "1")?;
        self.inet.link(
            &format!("n{i}"),
            &format!("198.18.{i}.1/24"),
            &outer,
            "wan",
            &format!("198.18.{i}.2/24"),
        )?;
        outer.ip(&["route", "add", "default", "via", &format!("198.18.{i}.1")])?;
        let public_ip = format!("198.18.{i}.2");
        let mut nats = vec![outer];
        if kind == Nat::DoubleNat {
            let home = Netns::new(format!("nl-{}-home{i}", self.id))?;
            home.sysctl("net.ipv4.ip_forward", "1")?;
            let cgnat = &nats[0];
            cgnat.link(
                "lan",
                &format!("100.64.{i}.1/24"),
                &home,
                "wan",
                &format!("100.64.{i}.2/24"),
            )?;
            home.ip(&["route", "add", "default", "via", &format!("100.64.{i}.1")])?;
            cgnat.nft(&Nat::PortRestricted.rules(""))?;
            nats.push(home);
        }
        let gw = nats
            .last()
            .unwrap_or_else(|| unreachable!("nats holds the outer NAT"));
        gw.ip(&["link", "add", "lan", "type", "bridge"])?;
        gw.ip(&["addr", "add", &format!("10.{i}.0.1/24"), "dev", "lan"])?;
        gw.ip(&["link", "set", "lan", "up"])?;
        gw.nft(&kind.rules(&format!("10.{i}.0.10")))?;
        Ok(Site {
            kind,
            index: i,
            public_ip,
            hosts: 0,
            roams: 0,
            dir: self.dir.path().join(format!("site{i}")),
            registry: REGISTRY.into(),
            beacon: BEACON.into(),
            bins: self.bins.clone(),
            lab_id: self.id.clone(),
            nats,
        })
    }

    /// A site of `kind` with one host on it, started and registered.
    pub async fn host(&mut self, kind: Nat) -> Result<Host, LabError> {
        self.host_with(kind, &[]).await
    }

    /// Like [`Lab::host`], with `extra` arguments for `pilotd` (see [`Site::host_with`]).
    pub async fn host_with(&mut self, kind: Nat, extra: &[&str]) -> Result<Host, LabError> {
        let mut site = self.site(kind)?;
        let host = site.host_with(extra)?;
        let mut host = host.with_site(site);
        host.wait_registered().await?;
        Ok(host)
    }

    /// Drops `percent` % of the UDP datagrams the internet namespace forwards between sites
    /// (not those to or from the beacon), at random; 0 removes the rule.
    pub fn set_loss(&self, percent: u8) -> Result<(), LabError> {
        let _ = self.inet.nft("delete table ip natlab_loss\n");
        if percent == 0 {
            return Ok(());
        }
        self.inet.nft(&format!(
            "table ip natlab_loss {{\n  chain filtfwd {{ type filter hook forward priority filter; \
             policy accept;\n    meta l4proto udp numgen random mod 100 < {percent} drop\n  }}\n}}\n"
        ))
    }

    /// Blocks (or, with `false`, unblocks) all UDP the internet namespace forwards between
    /// sites: only the beacon's relay connects them then.
    pub fn block_direct_udp(&self, block: bool) -> Result<(), LabError> {
        let _ = self.inet.nft("delete table ip natlab_block\n");
        if !block {
            return Ok(());
        }
        self.inet.nft(
            "table ip natlab_block {\n  chain filtfwd { type filter hook forward priority filter; \
             policy accept;\n    meta l4proto udp drop\n  }\n}\n",
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.registry.kill();
        self.beacon.kill();
    }
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| unreachable!("the lab's constant addresses end in a port"))
}

/// The daemons' log filter: `PILOT_TEST_LOG_LEVEL`, else info.
fn log_level() -> String {
    std::env::var("PILOT_TEST_LOG_LEVEL").unwrap_or_else(|_| "info".into())
}

/// A NAT (or a chain of two) and the LAN behind it.
#[derive(Debug)]
pub struct Site {
    pub kind: Nat,
    pub index: u32,
    /// The address the site's traffic leaves the NAT with.
    pub public_ip: String,
    hosts: u32,
    /// Times [`Site::roam`] moved the site.
    roams: u32,
    dir: PathBuf,
    registry: String,
    beacon: String,
    bins: PathBuf,
    lab_id: String,
    /// Outermost first.
    pub nats: Vec<Netns>,
}

impl Site {
    /// The namespace the LAN bridge is in (the innermost NAT).
    pub fn gateway(&self) -> &Netns {
        self.nats
            .last()
            .unwrap_or_else(|| unreachable!("a site has at least one NAT"))
    }

    /// Moves the site to a new public address and new NAT mappings, as when the uplink of a
    /// host changes under it: the outer NAT's `wan` gets 198.18.<site>.<2 + n> (n: the count
    /// of moves), its masquerade maps UDP to ports from 20000 + 1000 n on (random among them
    /// for [`Nat::Symmetric`]), and the old address goes, with which the kernel forgets every
    /// mapping made with it. Datagrams to the old public endpoint are lost from then on.
    /// Returns the new public address.
    pub fn roam(&mut self) -> Result<String, LabError> {
        self.roams += 1;
        let (i, n) = (self.index, self.roams);
        assert!(n < 40, "at most 39 moves per site");
        let new_ip = format!("198.18.{i}.{}", 2 + n);
        let outer = self
            .nats
            .first()
            .unwrap_or_else(|| unreachable!("a site has at least one NAT"));
        // Deleting the primary address must keep the new one (a secondary of the same
        // prefix) rather than take it along.
        outer.sysctl("net.ipv4.conf.wan.promote_secondaries", "1")?;
        outer.ip(&["addr", "add", &format!("{new_ip}/24"), "dev", "wan"])?;
        let lo = 20000 + 1000 * n;
        let random = if self.kind == Nat::Symmetric {
            " fully-random"
        } else {
            ""
        };
        outer.nft(&format!(
            "flush chain ip natlab natpost\n\
             add rule ip natlab natpost oifname \"wan\" meta l4proto udp masquerade to :{lo}-{}{random}\n\
             add rule ip natlab natpost oifname \"wan\" masquerade{random}\n",
            lo + 999
        ))?;
        outer.ip(&[
            "addr",
            "del",
            &format!("{}/24", self.public_ip),
            "dev",
            "wan",
        ])?;
        outer.ip(&[
            "route",
            "replace",
            "default",
            "via",
            &format!("198.18.{i}.1"),
        ])?;
        self.public_ip = new_ip.clone();
        Ok(new_ip)
    }

    /// A new host on the LAN (10.<site>.0.10, .11, ...) running `pilotd` on [`HOST_PORT`]
    /// as a public node; not yet registered (see [`Host::wait_registered`]). Only the first
    /// host of a site gets the inbound forwarding of the full-cone and address-restricted
    /// kinds.
    pub fn host(&mut self) -> Result<Host, LabError> {
        self.host_with(&[])
    }

    /// Like [`Site::host`], with `extra` arguments after `pilotd`'s own (e.g. `["up",
    /// "--expose", "22"]` for the TUN interface).
    pub fn host_with(&mut self, extra: &[&str]) -> Result<Host, LabError> {
        let i = self.index;
        let j = self.hosts;
        self.hosts += 1;
        let ns = Netns::new(format!("nl-{}-h{i}-{j}", self.lab_id))?;
        let ip = format!("10.{i}.0.{}", 10 + j);
        let port_name = format!("h{j}");
        ns.link("eth0", &format!("{ip}/24"), self.gateway(), &port_name, "")?;
        self.gateway()
            .ip(&["link", "set", &port_name, "master", "lan"])?;
        ns.ip(&["route", "add", "default", "via", &format!("10.{i}.0.1")])?;
        let home = self.dir.join(format!("h{j}"));
        std::fs::create_dir_all(&home).map_err(io_err(format!("mkdir {}", home.display())))?;
        let socket = home.join("pilotd.sock");
        let mut host = Host {
            name: format!("{}#{i}.{j}", self.kind.name()),
            kind: self.kind,
            lan_ip: ip,
            socket,
            home,
            node_id: 0,
            registry: self.registry.clone(),
            beacon: self.beacon.clone(),
            bin: self.bins.join("pilotd"),
            extra: extra.iter().map(|a| a.to_string()).collect(),
            pilotd: None,
            ns,
            site: None,
        };
        host.start()?;
        Ok(host)
    }
}

/// A LAN namespace running `pilotd`.
#[derive(Debug)]
pub struct Host {
    pub name: String,
    pub kind: Nat,
    pub lan_ip: String,
    pub home: PathBuf,
    pub socket: PathBuf,
    pub node_id: u32,
    registry: String,
    beacon: String,
    bin: PathBuf,
    /// Arguments after the lab's own (see [`Site::host_with`]).
    extra: Vec<String>,
    // Declared before `ns` and `site`: the daemon dies before its namespaces go.
    pub pilotd: Option<Proc>,
    pub ns: Netns,
    site: Option<Site>,
}

impl Host {
    fn with_site(mut self, site: Site) -> Host {
        self.site = Some(site);
        self
    }

    /// The site this host owns, when made by [`Lab::host`].
    pub fn site(&self) -> Option<&Site> {
        self.site.as_ref()
    }

    /// The site this host owns, to change it (e.g. [`Site::roam`]).
    pub fn site_mut(&mut self) -> Option<&mut Site> {
        self.site.as_mut()
    }

    /// Starts `pilotd` (same home, so the same identity).
    pub fn start(&mut self) -> Result<(), LabError> {
        let mut c = self.ns.exec(&self.bin);
        c.arg("--home")
            .arg(&self.home)
            .arg("--socket")
            .arg(&self.socket)
            .args(["--registry", &self.registry, "--beacon", &self.beacon])
            .args(["--listen", &format!("0.0.0.0:{HOST_PORT}")])
            .args(["--public", "true", "--log-level", &log_level()])
            .args(&self.extra)
            .env("PILOT_DNS", "off");
        self.pilotd = Some(Proc::spawn(
            &format!("pilotd {}", self.name),
            c,
            self.home.join("pilotd.log"),
        )?);
        Ok(())
    }

    /// Kills `pilotd`.
    pub fn stop(&mut self) {
        self.pilotd = None;
    }

    /// Waits until the daemon answers on its socket with a node ID; records it.
    pub async fn wait_registered(&mut self) -> Result<u32, LabError> {
        let deadline = Instant::now() + START_WAIT;
        loop {
            if let Some(p) = self.pilotd.as_mut() {
                p.check_alive()?;
            }
            if let Ok(d) = Driver::connect(&self.socket).await {
                if let Ok(info) = d.info().await {
                    if info.node_id != 0 {
                        self.node_id = info.node_id;
                        return Ok(info.node_id);
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(LabError::Timeout(format!(
                    "{} registered\n{}",
                    self.name,
                    self.log_tail(40)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A new driver connection to the daemon.
    pub async fn driver(&self) -> Result<Driver, LabError> {
        Ok(Driver::connect(&self.socket).await?)
    }

    /// The virtual address of `port` on this host.
    pub fn addr(&self, port: u16) -> PilotAddr {
        PilotAddr::new(Addr::new(0, self.node_id), port)
    }

    /// The last `n` lines of the daemon's log.
    pub fn log_tail(&self, n: usize) -> String {
        self.pilotd
            .as_ref()
            .map(|p| p.log_tail(n))
            .unwrap_or_default()
    }

    /// What the daemon shows of tunnel peer `peer` (`None`: no tunnel to it).
    pub async fn peer_info(&self, peer: u32) -> Result<Option<PeerInfo>, LabError> {
        let info = self.driver().await?.info().await?;
        Ok(info.peer_list.into_iter().find(|p| p.node_id == peer))
    }

    /// The daemon's connections (its `conn_list`).
    pub async fn connections(&self) -> Result<Vec<ConnInfo>, LabError> {
        Ok(self.driver().await?.info().await?.conn_list)
    }

    /// The address of the TUN interface of a host started with `up` (from the daemon's
    /// `up: <address>` log line), once it is up.
    pub fn ula(&self) -> Option<std::net::Ipv6Addr> {
        let log = std::fs::read_to_string(self.pilotd.as_ref()?.log.as_path()).ok()?;
        log.lines()
            .find_map(|l| l.split_once(" up: ").map(|(_, r)| r.to_owned()))
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
    }

    /// Whether this daemon reaches `peer` through the relay (`None`: no tunnel to it).
    pub async fn relayed(&self, peer: u32) -> Result<Option<bool>, LabError> {
        let info = self.driver().await?.info().await?;
        Ok(info
            .peer_list
            .iter()
            .find(|p| p.node_id == peer)
            .map(|p| p.relay))
    }

    /// Runs the echo service on [`ECHO_PORT`] and the hashing sink on [`SINK_PORT`] until
    /// the returned task is aborted.
    pub async fn serve(&self) -> Result<tokio::task::JoinHandle<()>, LabError> {
        self.serve_tracked(std::sync::Arc::default()).await
    }

    /// [`Host::serve`], with the sink marking in `progress` what it has read (of all its
    /// streams together).
    pub async fn serve_tracked(
        &self,
        progress: std::sync::Arc<Progress>,
    ) -> Result<tokio::task::JoinHandle<()>, LabError> {
        let d = self.driver().await?;
        let mut echo = d.listen(ECHO_PORT).await?;
        let mut sink = d.listen(SINK_PORT).await?;
        Ok(tokio::spawn(async move {
            let _d = d;
            loop {
                tokio::select! {
                    Ok((s, _)) = echo.accept() => {
                        tokio::spawn(async move {
                            let (mut r, mut w) = tokio::io::split(s);
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                            let _ = w.shutdown().await;
                        });
                    }
                    Ok((s, _)) = sink.accept() => {
                        tokio::spawn(hash_sink(s, progress.clone()));
                    }
                    else => break,
                }
            }
        }))
    }
}

/// Reads to EOF, then writes the SHA-256 of what it read and closes; marks what it read in
/// `progress`.
async fn hash_sink(s: PilotStream, progress: std::sync::Arc<Progress>) {
    let (mut r, mut w) = tokio::io::split(s);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut read = progress.written();
    loop {
        match r.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                read += n;
                progress.mark(read);
            }
            Err(_) => return,
        }
    }
    let _ = w.write_all(&h.finalize()).await;
    let _ = w.shutdown().await;
}

/// Deterministic pseudo-random bytes (xorshift64*).
#[derive(Debug)]
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Prng {
        Prng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Dials the echo service of `dst` and measures the time from the dial to the first byte
/// back of a 1 KiB echo; the whole echo must come back intact.
pub async fn echo_first_byte(d: &Driver, dst: PilotAddr) -> Result<Duration, LabError> {
    let t0 = Instant::now();
    let s = d.dial(PilotAddr::new(dst.addr, ECHO_PORT)).await?;
    let (mut r, mut w) = tokio::io::split(s);
    let mut data = vec![0u8; 1024];
    Prng::new(u64::from(dst.addr.node)).fill(&mut data);
    w.write_all(&data)
        .await
        .map_err(|e| LabError::Transfer(format!("echo write: {e}")))?;
    let mut back = vec![0u8; data.len()];
    r.read_exact(&mut back[..1])
        .await
        .map_err(|e| LabError::Transfer(format!("echo read: {e}")))?;
    let ttfb = t0.elapsed();
    r.read_exact(&mut back[1..])
        .await
        .map_err(|e| LabError::Transfer(format!("echo read: {e}")))?;
    if back != data {
        return Err(LabError::Transfer("the echo differs".into()));
    }
    let _ = w.shutdown().await;
    Ok(ttfb)
}

/// When the writer of a transfer got each chunk into its stream: how far it is, and how
/// long it went without progress.
#[derive(Debug, Default)]
pub struct Progress {
    /// (time, bytes by then), in order.
    marks: std::sync::Mutex<Vec<(Instant, usize)>>,
    /// A writer marking here writes at most this many bytes per second.
    pace: Option<f64>,
}

impl Progress {
    /// Progress of a writer that writes at most `bytes_per_sec` (so that a transfer lasts
    /// long enough for something to happen in its middle).
    pub fn paced(bytes_per_sec: f64) -> Progress {
        Progress {
            pace: Some(bytes_per_sec),
            ..Progress::default()
        }
    }

    /// When a paced writer that started at `start` and has written `written` bytes may
    /// write more.
    fn due(&self, start: Instant, written: usize) -> Option<Instant> {
        self.pace
            .map(|rate| start + Duration::from_secs_f64(written as f64 / rate))
    }

    fn mark(&self, written: usize) {
        if let Ok(mut m) = self.marks.lock() {
            m.push((Instant::now(), written));
        }
    }

    /// Bytes so far (written by a writer, read by a sink).
    pub fn written(&self) -> usize {
        self.marks
            .lock()
            .ok()
            .and_then(|m| m.last().map(|&(_, n)| n))
            .unwrap_or(0)
    }

    /// The longest time between two successive marks of which the second fell in
    /// `from..until`, and when it ended.
    pub fn longest_stall(&self, from: Instant, until: Instant) -> Option<(Duration, Instant)> {
        let m = self.marks.lock().ok()?;
        m.windows(2)
            .filter(|w| (from..until).contains(&w[1].0))
            .map(|w| (w[1].0.duration_since(w[0].0), w[1].0))
            .max_by_key(|&(gap, _)| gap)
    }

    /// The first mark at or after `t`.
    pub fn first_after(&self, t: Instant) -> Option<Instant> {
        let m = self.marks.lock().ok()?;
        m.iter().map(|&(at, _)| at).find(|&at| at >= t)
    }
}

/// Sends `total` pseudo-random bytes to the hashing sink of `dst` and checks the SHA-256 it
/// answers; returns the time from the dial to the answer.
pub async fn hashed_transfer(
    d: &Driver,
    dst: PilotAddr,
    total: usize,
    seed: u64,
) -> Result<Duration, LabError> {
    hashed_transfer_tracked(d, dst, total, seed, std::sync::Arc::default()).await
}

/// [`hashed_transfer`] marking each chunk written in `progress`.
pub async fn hashed_transfer_tracked(
    d: &Driver,
    dst: PilotAddr,
    total: usize,
    seed: u64,
    progress: std::sync::Arc<Progress>,
) -> Result<Duration, LabError> {
    const CHUNK: usize = 256 * 1024;
    let t0 = Instant::now();
    let s = d.dial(PilotAddr::new(dst.addr, SINK_PORT)).await?;
    progress.mark(0);
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        let mut rng = Prng::new(seed);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut left = total;
        while left > 0 {
            let n = left.min(CHUNK);
            rng.fill(&mut buf[..n]);
            h.update(&buf[..n]);
            w.write_all(&buf[..n]).await?;
            left -= n;
            progress.mark(total - left);
            if let Some(due) = progress.due(t0, total - left) {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        w.shutdown().await?;
        Ok::<_, std::io::Error>((<[u8; 32]>::from(h.finalize()), w))
    });
    let mut answer = Vec::new();
    r.read_to_end(&mut answer)
        .await
        .map_err(|e| LabError::Transfer(format!("reading the hash: {e}")))?;
    let (sent, _w) = writer
        .await
        .map_err(|e| LabError::Transfer(format!("writer: {e}")))?
        .map_err(|e| LabError::Transfer(format!("write: {e}")))?;
    if answer != sent {
        return Err(LabError::Transfer(format!(
            "SHA-256 differs: sent {}, the sink answered {} bytes",
            hex(&sent),
            answer.len()
        )));
    }
    Ok(t0.elapsed())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
