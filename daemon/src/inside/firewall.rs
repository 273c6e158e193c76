//! The host firewall and `pilotd up`: whether the kernel's input filtering lets packets that
//! arrive on the TUN interface reach local sockets, and (with `--firewall=nftables`) a scoped
//! accept rule that makes it so while `up` runs.
//!
//! Layer: inside (the TUN side), I/O at the edges only: [`dropping_chains`] is a pure function
//! of a ruleset (`nft -j list ruleset`); [`self_test`], [`open`] and [`close`] run `nft` and
//! write one packet to the device.
//!
//! Why this matters: the data path terminates kernel TCP with a hairpin, so every packet it
//! hands to the kernel, in both directions, arrives on the TUN interface from an address in
//! fd06:3fcd:b33d::/48 (a caller's ULA, or a fake address of the hairpin). An input chain that
//! drops by default drops all of them.
//!
//! The self-test has two parts:
//! - Real probes, written to the TUN device from the probe address
//!   ([`tunnel::inside::PROBE_ADDR`], a fake hairpin address no NAT entry uses), so the kernel
//!   receives them on the interface exactly as it receives the data path's packets:
//!   - one UDP datagram to a UDP socket bound to the node's ULA: it reaches the socket or not;
//!   - one TCP SYN to a listener bound to the node's ULA: if the input path lets it through, the
//!     kernel answers with a SYN-ACK to the probe address, which the data path reports
//!     ([`ProbeAnswer`]) instead of rewriting; the probe then resets the half-open connection.
//!     This catches filters that let datagrams in but drop new TCP connections (a rule on
//!     `ct state new`, on TCP flags, or on ports).
//!
//!   Nothing else answers a probe (a `reject` rule's ICMPv6 error goes to the probe address,
//!   which the data path drops).
//! - A reading of the nftables ruleset, to name the chains that drop: each input base chain of
//!   family `inet` or `ip6` is evaluated for a new connection from the /48 on the interface.
//!   Conditions it does not understand (named sets, ports, marks, limits) count as not
//!   matching, so a rule accepting only some ports does not count as accepting the interface.
//!   The warning names, for each such chain, the `nft insert rule ...` that fixes it.
//!
//! Neither part fails `up`: each is bounded in time ([`PROBE_WAIT`] times [`PROBE_TRIES`],
//! [`NFT_TIMEOUT`]), and what it cannot find out is logged as unknown.
//!
//! `--firewall=nftables`: in nftables every base chain on a hook must accept a packet; an
//! accept in a chain of our own (at any priority) does not skip another table's chain that
//! drops. So [`open`] inserts the accept rule at the top of each input chain that would drop,
//! tagged with the comment [`comment`] (`pilotd:<tun>`), and [`close`] deletes the rules
//! carrying that comment (on exit, and in `pilotd down` for what a killed `up` left). Both use
//! the `nft` command with a script on stdin (`nft -f -`), one transaction each: simple, and it
//! follows the kernel's ruleset format across versions without a netlink library.
//!
//! Invariants:
//! - Only rules whose comment is exactly `pilotd:<tun>` are ever deleted; no table or chain is
//!   created or removed.
//! - The rule accepts only packets arriving on the TUN interface from fd06:3fcd:b33d::/48.
//! - Rules a firewall manager (firewalld, ufw) rewrites later are not put back.

use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddrV6};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;
use tunnel::inside::PROBE_ADDR;

use super::datapath::ProbeAnswer;

/// The prefix of every Pilot ULA, as the rules write it.
pub const ULA_PREFIX: &str = "fd06:3fcd:b33d::/48";

/// How long the probe datagram may take to reach its socket.
pub const PROBE_WAIT: Duration = Duration::from_millis(300);
/// Probe datagrams sent, one per [`PROBE_WAIT`], before the path is judged closed (one may be
/// lost to a busy machine or an interface that has just come up).
pub const PROBE_TRIES: u32 = 3;

/// The source port of the probes (discard).
const PROBE_PORT: u16 = 9;

/// How long one `nft` command may run.
pub const NFT_TIMEOUT: Duration = Duration::from_secs(3);

/// Most chains followed through `jump`/`goto` from one base chain.
const MAX_DEPTH: usize = 16;

/// What `pilotd up` does about the host firewall.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FirewallMode {
    /// Nothing: the self-test warns and names the rule to add.
    #[default]
    None,
    /// Insert a scoped accept rule into each nftables input chain that would drop, and remove it
    /// on exit.
    Nftables,
}

impl FromStr for FirewallMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" | "none" => Ok(FirewallMode::None),
            "nftables" => Ok(FirewallMode::Nftables),
            other => Err(format!("{other:?} is not none or nftables")),
        }
    }
}

/// Why an `nft` command did not do its work.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The `nft` command is not installed.
    #[error("the `nft` command is not installed (needed by --firewall=nftables): install nftables, or use --firewall=none and add the accept rule yourself")]
    NftMissing,
    /// `nft` could not be started or talked to.
    #[error("running nft: {0}")]
    Io(#[from] std::io::Error),
    /// `nft` ran longer than [`NFT_TIMEOUT`].
    #[error("nft {0} did not finish within {NFT_TIMEOUT:?}")]
    Timeout(String),
    /// `nft` exited with an error.
    #[error("nft {args}: {stderr}")]
    Failed {
        /// The arguments.
        args: String,
        /// What it said.
        stderr: String,
    },
    /// `nft -j` printed something that is not the JSON ruleset.
    #[error("nft -j list ruleset: {0}")]
    Json(#[from] serde_json::Error),
    /// The blocking task running `nft` was lost.
    #[error("nft task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// An nftables chain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Chain {
    /// Family: `inet` or `ip6` for the chains this module looks at.
    pub family: String,
    /// Table name.
    pub table: String,
    /// Chain name.
    pub name: String,
}

impl Chain {
    /// The `nft` command (without `nft`) that inserts the accept rule for `tun` at the top of
    /// this chain; `comment` adds the tag [`open`] uses.
    pub fn accept_rule(&self, tun: &str, comment: Option<&str>) -> String {
        let mut r = format!(
            "insert rule {} {} {} iifname \"{tun}\" ip6 saddr {ULA_PREFIX} accept",
            self.family,
            quote_name(&self.table),
            quote_name(&self.name)
        );
        if let Some(c) = comment {
            r.push_str(&format!(" comment \"{c}\""));
        }
        r
    }
}

impl std::fmt::Display for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.family, self.table, self.name)
    }
}

/// Table and chain names as `nft` reads them: names that are not plain identifiers are quoted.
fn quote_name(n: &str) -> String {
    let plain = n.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if plain {
        n.to_owned()
    } else {
        format!("\"{}\"", n.replace('"', ""))
    }
}

/// The comment tagging the rules [`open`] inserts for `tun`.
pub fn comment(tun: &str) -> String {
    format!("pilotd:{tun}")
}

/// The packet the ruleset is evaluated for: a new connection arriving on `tun` from anywhere in
/// fd06:3fcd:b33d::/48 to `own`.
#[derive(Debug, Clone, Copy)]
struct Packet<'a> {
    tun: &'a str,
    own: Ipv6Addr,
}

/// What a chain does with the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Accept,
    Drop,
    /// Fell off the end, or `return`: the caller goes on (a base chain applies its policy).
    Through,
}

/// The input base chains of `ruleset` (the JSON of `nft -j list ruleset`) that would drop a new
/// connection arriving on `tun` from fd06:3fcd:b33d::/48 to `own`, in ruleset order.
pub fn dropping_chains(ruleset: &Value, tun: &str, own: Ipv6Addr) -> Vec<Chain> {
    let items = ruleset
        .get("nftables")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut bases: Vec<(Chain, bool)> = Vec::new();
    let mut rules: std::collections::HashMap<Chain, Vec<&Vec<Value>>> = Default::default();
    for item in items {
        if let Some(c) = item.get("chain") {
            let Some(chain) = chain_of(c, "name") else {
                continue;
            };
            if c.get("hook").and_then(Value::as_str) == Some("input")
                && matches!(chain.family.as_str(), "inet" | "ip6")
            {
                let drop = c.get("policy").and_then(Value::as_str) == Some("drop");
                bases.push((chain, drop));
            }
        } else if let Some(r) = item.get("rule") {
            if let (Some(chain), Some(expr)) = (
                chain_of(r, "chain"),
                r.get("expr").and_then(Value::as_array),
            ) {
                rules.entry(chain).or_default().push(expr);
            }
        }
    }
    let pkt = Packet { tun, own };
    bases
        .into_iter()
        .filter(
            |(chain, policy_drop)| match eval_chain(&rules, chain, pkt, 0) {
                Outcome::Accept => false,
                Outcome::Drop => true,
                Outcome::Through => *policy_drop,
            },
        )
        .map(|(c, _)| c)
        .collect()
}

fn chain_of(v: &Value, name_key: &str) -> Option<Chain> {
    Some(Chain {
        family: v.get("family")?.as_str()?.to_owned(),
        table: v.get("table")?.as_str()?.to_owned(),
        name: v.get(name_key)?.as_str()?.to_owned(),
    })
}

fn eval_chain(
    rules: &std::collections::HashMap<Chain, Vec<&Vec<Value>>>,
    chain: &Chain,
    pkt: Packet<'_>,
    depth: usize,
) -> Outcome {
    if depth > MAX_DEPTH {
        return Outcome::Through;
    }
    for expr in rules.get(chain).map(Vec::as_slice).unwrap_or_default() {
        match eval_rule(rules, chain, expr, pkt, depth) {
            Some(Outcome::Through) => return Outcome::Through,
            Some(o) => return o,
            None => {}
        }
    }
    Outcome::Through
}

/// The rule's verdict for the packet: `None` when the rule does not apply or has no verdict,
/// `Some(Through)` for `return`.
fn eval_rule(
    rules: &std::collections::HashMap<Chain, Vec<&Vec<Value>>>,
    chain: &Chain,
    expr: &[Value],
    pkt: Packet<'_>,
    depth: usize,
) -> Option<Outcome> {
    let jump = |target: &Value| -> Option<Outcome> {
        let name = target.get("target")?.as_str()?;
        let to = Chain {
            name: name.to_owned(),
            ..chain.clone()
        };
        match eval_chain(rules, &to, pkt, depth + 1) {
            Outcome::Through => None,
            o => Some(o),
        }
    };
    for e in expr {
        let Some(obj) = e.as_object() else {
            continue;
        };
        for (key, val) in obj {
            match key.as_str() {
                "match" if match_applies(val, pkt) != Some(true) => return None,
                "accept" => return Some(Outcome::Accept),
                "drop" | "reject" => return Some(Outcome::Drop),
                "return" => return Some(Outcome::Through),
                "jump" => {
                    if let Some(o) = jump(val) {
                        return Some(o);
                    }
                }
                "goto" => return Some(jump(val).unwrap_or(Outcome::Through)),
                "vmap" => {
                    let verdict = vmap_verdict(val, pkt)?;
                    return match verdict.0.as_str() {
                        "accept" => Some(Outcome::Accept),
                        "drop" | "reject" => Some(Outcome::Drop),
                        "return" => Some(Outcome::Through),
                        "jump" => jump(verdict.1),
                        "goto" => Some(jump(verdict.1).unwrap_or(Outcome::Through)),
                        _ => None,
                    };
                }
                _ => {}
            }
        }
    }
    None
}

/// The verdict (name and argument) a verdict map gives the packet, if its key is understood and
/// an entry matches.
fn vmap_verdict<'v>(vmap: &'v Value, pkt: Packet<'_>) -> Option<(String, &'v Value)> {
    let key = vmap.get("key")?;
    let entries = vmap.get("data")?.get("set")?.as_array()?;
    for entry in entries {
        let pair = entry.as_array()?;
        let (k, v) = (pair.first()?, pair.get(1)?);
        if value_applies(key, k, pkt) == Some(true) {
            let (name, arg) = v.as_object()?.iter().next()?;
            return Some((name.clone(), arg));
        }
    }
    None
}

/// Whether a `match` expression holds for every packet the evaluation stands for; `None` when
/// it cannot be told.
fn match_applies(m: &Value, pkt: Packet<'_>) -> Option<bool> {
    let op = m.get("op").and_then(Value::as_str).unwrap_or("==");
    let left = m.get("left")?;
    let right = m.get("right")?;
    let r = value_applies(left, right, pkt)?;
    match op {
        "==" | "in" => Some(r),
        "!=" => Some(!r),
        _ => None,
    }
}

/// Whether `left` (a packet field) equals `right` (a value, set or prefix) for the packet.
fn value_applies(left: &Value, right: &Value, pkt: Packet<'_>) -> Option<bool> {
    if let Some(set) = right.get("set").and_then(Value::as_array) {
        let mut unknown = false;
        for r in set {
            match value_applies(left, r, pkt) {
                Some(true) => return Some(true),
                Some(false) => {}
                None => unknown = true,
            }
        }
        return if unknown { None } else { Some(false) };
    }
    if let Some(list) = right.as_array() {
        return value_applies(left, &serde_json::json!({ "set": list }), pkt);
    }
    if let Some(meta) = left.get("meta").and_then(|m| m.get("key")?.as_str()) {
        return match meta {
            "iifname" | "iif" => {
                let r = right.as_str()?;
                Some(match r.strip_suffix('*') {
                    Some(prefix) => pkt.tun.starts_with(prefix),
                    None => r == pkt.tun,
                })
            }
            "nfproto" => Some(right.as_str()? == "ipv6"),
            // The packets are TCP, UDP and ICMPv6: a match on one protocol covers only some.
            "l4proto" => Some(false),
            _ => None,
        };
    }
    if let Some(ct) = left.get("ct").and_then(|c| c.get("key")?.as_str()) {
        return match ct {
            "state" => Some(right.as_str()? == "new"),
            _ => None,
        };
    }
    if let Some(p) = left.get("payload") {
        let proto = p.get("protocol")?.as_str()?;
        let field = p.get("field")?.as_str()?;
        return match (proto, field) {
            ("ip6", "saddr") => Some(covers_ula(right)?),
            ("ip6", "daddr") => Some(contains(right, pkt.own)?),
            ("ip6", "nexthdr") => Some(false),
            ("ip", _) | ("arp", _) => Some(false),
            // Ports and other transport fields: only some connections.
            _ => Some(false),
        };
    }
    None
}

/// Whether an address or prefix covers all of fd06:3fcd:b33d::/48.
fn covers_ula(v: &Value) -> Option<bool> {
    if v.is_string() {
        return Some(false);
    }
    let p = v.get("prefix")?;
    let len = p.get("len")?.as_u64()?;
    let addr: Ipv6Addr = p.get("addr")?.as_str()?.parse().ok()?;
    Some(len <= 48 && in_prefix(tunnel::ula::PREFIX_ADDR, addr, len))
}

/// Whether an address or prefix contains `ip`.
fn contains(v: &Value, ip: Ipv6Addr) -> Option<bool> {
    if let Some(s) = v.as_str() {
        return Some(s.parse::<Ipv6Addr>().ok()? == ip);
    }
    let p = v.get("prefix")?;
    let len = p.get("len")?.as_u64()?;
    let addr: Ipv6Addr = p.get("addr")?.as_str()?.parse().ok()?;
    Some(in_prefix(ip, addr, len))
}

fn in_prefix(ip: Ipv6Addr, prefix: Ipv6Addr, len: u64) -> bool {
    let len = len.min(128) as u32;
    let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
    u128::from(ip) & mask == u128::from(prefix) & mask
}

/// Runs `nft args...` with `stdin`, bounded by [`NFT_TIMEOUT`]; returns its stdout.
fn nft_blocking(args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
    let mut child = match Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(FirewallError::NftMissing)
        }
        Err(e) => return Err(e.into()),
    };
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    // Output is read on threads so a full pipe never stalls the child.
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let deadline = Instant::now() + NFT_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(FirewallError::Timeout(args.join(" ")));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    if !status.success() {
        return Err(FirewallError::Failed {
            args: args.join(" "),
            stderr: stderr.trim().to_owned(),
        });
    }
    Ok(stdout)
}

async fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let stdin = stdin.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        nft_blocking(&a, stdin.as_deref())
    })
    .await?
}

/// The current ruleset, as `nft -j list ruleset` prints it.
pub async fn ruleset() -> Result<Value, FirewallError> {
    let out = nft(&["-j", "list", "ruleset"], None).await?;
    Ok(serde_json::from_str(&out)?)
}

/// Sends a UDP datagram from a fake hairpin address through `device` to a socket bound to
/// `own`, up to [`PROBE_TRIES`] times: `Some(true)` once one arrives (each is given
/// [`PROBE_WAIT`]), `Some(false)` if none did, `None` if the probe could not be sent.
pub async fn probe(device: &tun_rs::AsyncDevice, own: Ipv6Addr) -> Option<bool> {
    let sock = match tokio::net::UdpSocket::bind(SocketAddrV6::new(own, 0, 0, 0)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "firewall probe: cannot bind to the node's address");
            return None;
        }
    };
    let port = sock.local_addr().ok()?.port();
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
        .to_be_bytes();
    let mut payload = b"pilotd firewall probe ".to_vec();
    payload.extend_from_slice(&nonce);
    let src = SocketAddrV6::new(PROBE_ADDR, PROBE_PORT, 0, 0);
    let mut pkt = vec![0u8; 128];
    let n = tunnel::inside::packet::build_udp(
        src,
        SocketAddrV6::new(own, port, 0, 0),
        &payload,
        &mut pkt,
    )
    .ok()?;
    pkt.truncate(n);
    let mut buf = [0u8; 128];
    for _ in 0..PROBE_TRIES {
        let deadline = tokio::time::Instant::now() + PROBE_WAIT;
        if let Err(e) = device.send(&pkt).await {
            tracing::debug!(error = %e, "firewall probe: writing to the device failed");
            return None;
        }
        loop {
            match tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
                Err(_) => break,
                Ok(Err(_)) => return None,
                Ok(Ok((len, from))) => {
                    if buf.get(..len) == Some(payload.as_slice())
                        && from.ip() == std::net::IpAddr::V6(*src.ip())
                    {
                        return Some(true);
                    }
                }
            }
        }
    }
    Some(false)
}

/// Sends a TCP SYN from the probe address through `device` to a listener bound to `own`, up
/// to [`PROBE_TRIES`] times: `Some(true)` once the data path reports the kernel's SYN-ACK
/// (each try is given [`PROBE_WAIT`]), `Some(false)` if none came, `None` if the probe could
/// not be sent. The half-open connection is reset afterwards.
pub async fn probe_tcp(
    device: &tun_rs::AsyncDevice,
    own: Ipv6Addr,
    mut answers: watch::Receiver<Option<ProbeAnswer>>,
) -> Option<bool> {
    use tunnel::inside::packet::{build_tcp, tcp_flags};
    let listener = match tokio::net::TcpListener::bind(SocketAddrV6::new(own, 0, 0, 0)).await {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e, "firewall probe: cannot listen on the node's address");
            return None;
        }
    };
    let port = listener.local_addr().ok()?.port();
    let probe = SocketAddrV6::new(PROBE_ADDR, PROBE_PORT, 0, 0);
    let to = SocketAddrV6::new(own, port, 0, 0);
    // Any initial sequence number will do; a varying one keeps the answers of runs apart.
    let isn = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let mut pkt = [0u8; 128];
    let n = build_tcp(probe, to, isn, 0, tcp_flags::SYN, &mut pkt).ok()?;
    let expected = ProbeAnswer {
        port,
        probe_port: PROBE_PORT,
        ack: isn.wrapping_add(1),
    };
    answers.mark_unchanged();
    for _ in 0..PROBE_TRIES {
        let deadline = tokio::time::Instant::now() + PROBE_WAIT;
        if let Err(e) = device.send(&pkt[..n]).await {
            tracing::debug!(error = %e, "firewall probe: writing to the device failed");
            return None;
        }
        loop {
            match tokio::time::timeout_at(deadline, answers.changed()).await {
                Err(_) => break,
                Ok(Err(_)) => return None,
                Ok(Ok(())) => {
                    if *answers.borrow_and_update() == Some(expected) {
                        let mut rst = [0u8; 128];
                        if let Ok(n) =
                            build_tcp(probe, to, expected.ack, 0, tcp_flags::RST, &mut rst)
                        {
                            let _ = device.send(&rst[..n]).await;
                        }
                        return Some(true);
                    }
                }
            }
        }
    }
    Some(false)
}

/// What the self-test found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SelfTest {
    /// Whether the probe datagram reached its socket (`None`: not sent).
    pub delivered: Option<bool>,
    /// Whether the probe SYN reached its listener (`None`: not sent).
    pub tcp: Option<bool>,
    /// The nftables input chains that would drop packets from the interface (`None`: the
    /// ruleset could not be read).
    pub dropping: Option<Vec<Chain>>,
}

impl SelfTest {
    /// Whether input filtering is judged to drop the interface's packets: the probes' answers
    /// when there are any (either probe lost counts), else the ruleset's.
    pub fn drops(&self) -> bool {
        match (self.delivered, self.tcp) {
            (None, None) => self.dropping.as_ref().is_some_and(|d| !d.is_empty()),
            (udp, tcp) => udp == Some(false) || tcp == Some(false),
        }
    }
}

/// Probes the input path of `tun` (a datagram, and a SYN whose answer the data path reports on
/// `answers`) and reads the nftables ruleset; logs a warning naming the rule to add when
/// packets arriving on the interface are dropped. Never fails; bounded by [`PROBE_WAIT`] and
/// [`NFT_TIMEOUT`].
pub async fn self_test(
    device: &Arc<tun_rs::AsyncDevice>,
    tun: &str,
    own: Ipv6Addr,
    answers: watch::Receiver<Option<ProbeAnswer>>,
) -> SelfTest {
    let delivered = probe(device, own).await;
    let tcp = probe_tcp(device, own, answers).await;
    let dropping = match ruleset().await {
        Ok(rs) => Some(dropping_chains(&rs, tun, own)),
        Err(FirewallError::NftMissing) => None,
        Err(e) => {
            tracing::debug!(error = %e, "firewall self-test: cannot read the nftables ruleset");
            None
        }
    };
    let t = SelfTest {
        delivered,
        tcp,
        dropping,
    };
    let chains = t.dropping.clone().unwrap_or_default();
    if !t.drops() {
        tracing::info!(
            iface = tun,
            probe_udp = ?t.delivered,
            probe_tcp = ?t.tcp,
            "firewall self-test: packets arriving on {tun} reach local sockets"
        );
        return t;
    }
    if t.delivered == Some(true) && t.tcp == Some(false) {
        tracing::warn!(
            iface = tun,
            dropping_chains = chains.len(),
            "firewall self-test: the host firewall lets datagrams arriving on {tun} in but \
             drops new TCP connections; connections through {tun} will fail until they are \
             accepted"
        );
    } else {
        tracing::warn!(
            iface = tun,
            probe_udp = ?t.delivered,
            probe_tcp = ?t.tcp,
            dropping_chains = chains.len(),
            "firewall self-test: the host firewall drops packets arriving on {tun}; \
             connections through {tun} will fail until they are accepted (or start with \
             --firewall=nftables)"
        );
    }
    for c in &chains {
        tracing::warn!(
            "input chain {c} drops them; to accept them, run: nft {}",
            c.accept_rule(tun, None)
        );
    }
    if chains.is_empty() {
        tracing::warn!(
            "no nftables chain found that drops them by policy or plain rule (a rule on \
             protocols, ports, TCP flags or sets, or ip6tables-legacy?); insert at the top of \
             each input chain an accept for {tun} from {ULA_PREFIX}, e.g. nft insert rule \
             <family> <table> <chain> iifname \"{tun}\" ip6 saddr {ULA_PREFIX} accept, or \
             ip6tables -I INPUT -i {tun} -s {ULA_PREFIX} -j ACCEPT"
        );
    }
    t
}

/// Inserts the accept rule for `tun` at the top of every nftables input chain that would drop
/// packets from the interface, after removing rules an earlier run left; returns the chains.
pub async fn open(tun: &str, own: Ipv6Addr) -> Result<Vec<Chain>, FirewallError> {
    close(tun).await?;
    let rs = ruleset().await?;
    let chains = dropping_chains(&rs, tun, own);
    if chains.is_empty() {
        return Ok(chains);
    }
    let tag = comment(tun);
    let script: String = chains
        .iter()
        .map(|c| c.accept_rule(tun, Some(&tag)) + "\n")
        .collect();
    nft(&["-f", "-"], Some(&script)).await?;
    Ok(chains)
}

/// Deletes every rule whose comment is `pilotd:<tun>`; returns how many. Without `nft`
/// installed there is nothing to delete: `Ok(0)`.
pub async fn close(tun: &str) -> Result<usize, FirewallError> {
    let rs = match ruleset().await {
        Ok(rs) => rs,
        Err(FirewallError::NftMissing) => return Ok(0),
        Err(e) => return Err(e),
    };
    let script = delete_script(&rs, &comment(tun));
    let n = script.lines().count();
    if n > 0 {
        nft(&["-f", "-"], Some(&script)).await?;
    }
    Ok(n)
}

/// `delete rule` lines for the rules of `ruleset` whose comment is `tag`.
fn delete_script(ruleset: &Value, tag: &str) -> String {
    let items = ruleset
        .get("nftables")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut script = String::new();
    for r in items.iter().filter_map(|i| i.get("rule")) {
        if r.get("comment").and_then(Value::as_str) != Some(tag) {
            continue;
        }
        let (Some(chain), Some(handle)) = (
            chain_of(r, "chain"),
            r.get("handle").and_then(Value::as_u64),
        ) else {
            continue;
        };
        script.push_str(&format!(
            "delete rule {} {} {} handle {handle}\n",
            chain.family,
            quote_name(&chain.table),
            quote_name(&chain.name)
        ));
    }
    script
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    const OWN: Ipv6Addr = Ipv6Addr::new(0xfd06, 0x3fcd, 0xb33d, 0, 0, 0, 0, 7);

    fn chain(family: &str, table: &str, name: &str, policy: &str) -> Value {
        json!({"chain": {"family": family, "table": table, "name": name, "handle": 1,
            "type": "filter", "hook": "input", "prio": 0, "policy": policy}})
    }

    fn rule(family: &str, table: &str, chain: &str, handle: u64, expr: Value) -> Value {
        json!({"rule": {"family": family, "table": table, "chain": chain, "handle": handle,
            "expr": expr}})
    }

    fn iif(name: &str) -> Value {
        json!({"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": name}})
    }

    fn ct_established() -> Value {
        json!({"match": {"op": "in", "left": {"ct": {"key": "state"}},
            "right": ["established", "related"]}})
    }

    fn rs(items: Vec<Value>) -> Value {
        json!({ "nftables": items })
    }

    fn names(v: &[Chain]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_dropping_policy_with_the_usual_accepts_drops_pilot0() {
        let r = rs(vec![
            chain("inet", "filter", "input", "drop"),
            rule(
                "inet",
                "filter",
                "input",
                2,
                json!([ct_established(), {"accept": null}]),
            ),
            rule(
                "inet",
                "filter",
                "input",
                3,
                json!([iif("lo"), {"accept": null}]),
            ),
            rule(
                "inet",
                "filter",
                "input",
                4,
                json!([{"match": {"op": "==",
                "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 22}},
                {"accept": null}]),
            ),
        ]);
        let d = dropping_chains(&r, "pilot0", OWN);
        assert_eq!(names(&d), ["inet filter input"]);
        assert_eq!(
            d[0].accept_rule("pilot0", None),
            "insert rule inet filter input iifname \"pilot0\" ip6 saddr fd06:3fcd:b33d::/48 accept"
        );
    }

    #[test]
    fn accepts_for_the_interface_or_the_prefix_count() {
        for accept in [
            json!([iif("pilot0"), {"accept": null}]),
            json!([iif("pilot*"), {"counter": null}, {"accept": null}]),
            json!([{"match": {"op": "==", "left": {"meta": {"key": "iifname"}},
                "right": {"set": ["lo", "pilot0"]}}}, {"accept": null}]),
            json!([{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}},
                "right": {"prefix": {"addr": "fd06:3fcd:b33d::", "len": 48}}}}, {"accept": null}]),
            json!([{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}},
                "right": {"prefix": {"addr": "fc00::", "len": 7}}}}, {"accept": null}]),
            json!([{"vmap": {"key": {"meta": {"key": "iifname"}},
                "data": {"set": [["lo", {"accept": null}], ["pilot0", {"accept": null}]]}}}]),
        ] {
            let r = rs(vec![
                chain("inet", "filter", "input", "drop"),
                rule("inet", "filter", "input", 2, accept.clone()),
            ]);
            assert!(dropping_chains(&r, "pilot0", OWN).is_empty(), "{accept}");
        }
    }

    #[test]
    fn narrower_accepts_and_other_families_do_not() {
        // A /64 inside the /48, another interface, IPv4: pilot0 still dropped.
        for accept in [
            json!([{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}},
                "right": {"prefix": {"addr": "fd06:3fcd:b33d::", "len": 64}}}}, {"accept": null}]),
            json!([iif("eth0"), {"accept": null}]),
            json!([iif("pilot0"), {"match": {"op": "==",
                "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "10.0.0.1"}},
                {"accept": null}]),
            json!([{"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "pilot0"}},
                {"accept": null}]),
        ] {
            let r = rs(vec![
                chain("ip6", "filter", "INPUT", "drop"),
                rule("ip6", "filter", "INPUT", 2, accept.clone()),
            ]);
            assert_eq!(
                names(&dropping_chains(&r, "pilot0", OWN)),
                ["ip6 filter INPUT"],
                "{accept}"
            );
        }
        // IPv4-only tables and other hooks are not on the path.
        let mut fwd = chain("inet", "filter", "forward", "drop");
        fwd["chain"]["hook"] = json!("forward");
        let r = rs(vec![chain("ip", "filter", "INPUT", "drop"), fwd]);
        assert!(dropping_chains(&r, "pilot0", OWN).is_empty());
    }

    #[test]
    fn explicit_drops_jumps_and_vmaps_are_followed() {
        // Policy accept but a final drop; an accept reached through a jump; a ct vmap.
        let r = rs(vec![
            chain("inet", "a", "input", "accept"),
            rule(
                "inet",
                "a",
                "input",
                2,
                json!([iif("lo"), {"accept": null}]),
            ),
            rule(
                "inet",
                "a",
                "input",
                3,
                json!([{"reject": {"type": "icmpx"}}]),
            ),
            chain("inet", "b", "input", "drop"),
            rule(
                "inet",
                "b",
                "input",
                2,
                json!([{"jump": {"target": "tun"}}]),
            ),
            json!({"chain": {"family": "inet", "table": "b", "name": "tun", "handle": 5}}),
            rule(
                "inet",
                "b",
                "tun",
                6,
                json!([iif("pilot0"), {"accept": null}]),
            ),
            chain("inet", "c", "input", "accept"),
            rule(
                "inet",
                "c",
                "input",
                2,
                json!([{"vmap": {"key": {"ct": {"key": "state"}},
                "data": {"set": [["established", {"accept": null}], ["new", {"drop": null}]]}}}]),
            ),
            chain("inet", "d", "input", "accept"),
        ]);
        assert_eq!(
            names(&dropping_chains(&r, "pilot0", OWN)),
            ["inet a input", "inet c input"]
        );
    }

    #[test]
    fn odd_input_never_panics() {
        for v in [
            json!(null),
            json!({"nftables": 3}),
            json!({"nftables": [{"chain": {}}, {"rule": {"expr": 1}}, 5]}),
            rs(vec![
                chain("inet", "x", "input", "drop"),
                rule(
                    "inet",
                    "x",
                    "input",
                    1,
                    json!([{"jump": {"target": "input"}}]),
                ),
            ]),
        ] {
            let _ = dropping_chains(&v, "pilot0", OWN);
        }
    }

    #[test]
    fn delete_script_names_only_tagged_rules() {
        let mut tagged = rule("inet", "filter", "input", 9, json!([{"accept": null}]));
        tagged["rule"]["comment"] = json!("pilotd:pilot0");
        let mut other = rule("inet", "filter", "input", 10, json!([{"accept": null}]));
        other["rule"]["comment"] = json!("pilotd:pilot1");
        let r = rs(vec![
            chain("inet", "filter", "input", "drop"),
            tagged,
            other,
        ]);
        assert_eq!(
            delete_script(&r, &comment("pilot0")),
            "delete rule inet filter input handle 9\n"
        );
    }

    #[test]
    fn either_lost_probe_means_dropping() {
        let t = |delivered, tcp, dropping: Option<Vec<Chain>>| SelfTest {
            delivered,
            tcp,
            dropping,
        };
        let chains = || {
            Some(vec![Chain {
                family: "inet".into(),
                table: "filter".into(),
                name: "input".into(),
            }])
        };
        // The probes, when sent, outweigh a reading of the ruleset.
        assert!(!t(Some(true), Some(true), chains()).drops());
        assert!(t(Some(true), Some(false), Some(vec![])).drops());
        assert!(t(Some(false), Some(true), None).drops());
        assert!(t(None, Some(false), None).drops());
        assert!(!t(None, Some(true), None).drops());
        // Without probes the ruleset decides.
        assert!(t(None, None, chains()).drops());
        assert!(!t(None, None, Some(vec![])).drops());
        assert!(!t(None, None, None).drops());
    }

    #[test]
    fn modes_parse() {
        assert_eq!("none".parse(), Ok(FirewallMode::None));
        assert_eq!("nftables".parse(), Ok(FirewallMode::Nftables));
        assert!("iptables".parse::<FirewallMode>().is_err());
        assert_eq!(quote_name("filter"), "filter");
        assert_eq!(quote_name("my table"), "\"my table\"");
    }
}
