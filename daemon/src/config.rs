//! Daemon configuration: command-line flags, each also an environment variable, and a JSON
//! file whose keys are the flag names (v1 `-config` files load: `-` and `_` are the same, and
//! values may be strings, numbers or booleans). Precedence: flag, then environment, then file,
//! then the default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use pilot_registry_client::{Fingerprint, RegistryAddrs, Transport};
use serde_json::Value;
use tunnel::stream::congestion::{Algorithm, UnknownAlgorithm};
use tunnel::stream::{Config as StreamConfig, EndpointConfig};

pub use pilot_driver::config::{parse_duration, SOCKET_FILE, SYSTEM_HOME, SYSTEM_SOCKET};

/// `pilotd` command line.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "pilotd",
    version,
    about = "The Pilot daemon: encrypted UDP tunnels, NAT traversal, trust and the IPC socket for agents",
    long_about = "The Pilot daemon gives this host a permanent Pilot address, registers it with a \
registry, keeps encrypted tunnels to peers (direct, hole-punched or relayed through a beacon) \
and serves agents and pilotctl on a Unix socket.\n\nEvery flag can also be set with the \
environment variable shown, or as a key of the JSON file given with --config (v1 config files \
load). Flags win over the environment, which wins over the file.\n\nWithout a subcommand pilotd \
runs the daemon. `pilotd up` runs the same daemon and also gives the host a network interface \
(pilot0) carrying the node's IPv6 address in fd06:3fcd:b33d::/48; `pilotd down` removes what a \
crashed `pilotd up` left behind."
)]
pub struct Cli {
    /// What to do; without one, run the daemon.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// JSON configuration file (keys are flag names; v1 keys accepted).
    #[arg(long, global = true, env = "PILOT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as JSON and exit (non-zero if it is invalid).
    #[arg(long, global = true)]
    pub check_config: bool,
    /// Print the man page (roff) and exit.
    #[arg(long, hide = true)]
    pub man_page: bool,
    /// Registry address (host:port), or several in order of preference: separated by commas
    /// or with the flag repeated (a config file takes a string or a list). On a failed connect
    /// or a lost session the daemon moves to the next address (after a whole round of
    /// failures, with a jittered backoff growing to 10s), registers again there and keeps
    /// using it while it works. [default: 127.0.0.1:9000]
    #[arg(
        long,
        global = true,
        env = "PILOT_REGISTRY",
        value_name = "HOST:PORT[,HOST:PORT...]"
    )]
    pub registry: Vec<String>,
    /// Beacon address (host:port); "" disables NAT traversal through a beacon.
    #[arg(long, global = true, env = "PILOT_BEACON")]
    pub beacon: Option<String>,
    /// UDP address of the tunnel socket. [default: [::]:4000]
    #[arg(long, global = true, env = "PILOT_LISTEN")]
    pub listen: Option<String>,
    /// Public endpoint to register instead of discovering it through the beacon (host:port;
    /// the registry keeps only the port and uses the address it sees).
    #[arg(long, global = true, env = "PILOT_ENDPOINT")]
    pub endpoint: Option<String>,
    /// State directory (identity, trust). [default: /var/lib/pilot as root, else $PILOT_HOME
    /// or ~/.pilot]
    #[arg(long, global = true, env = "PILOT_HOME")]
    pub home: Option<PathBuf>,
    /// Identity file. [default: <home>/identity.json]
    #[arg(long, global = true, env = "PILOT_IDENTITY")]
    pub identity: Option<PathBuf>,
    /// IPC socket path. [default: /run/pilot/pilotd.sock as root, else <home>/pilotd.sock]
    #[arg(long, global = true, env = "PILOT_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Group that may use the IPC socket: the socket gets that group and mode 0660, so its
    /// members run pilotctl without root ("" or unset: owner only, mode 0600). The packaged
    /// service sets "pilot". [default: none]
    #[arg(long, global = true, env = "PILOT_SOCKET_GROUP")]
    pub socket_group: Option<String>,
    /// v1's switch for tunnel encryption. Tunnels are always encrypted: `true` (v1's default)
    /// is accepted so v1 command lines and config files load, `false` is refused at start
    /// (docs/COMPAT.md). Hidden from help.
    #[arg(long, global = true, env = "PILOT_ENCRYPT", num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub encrypt: Option<bool>,
    /// Accept plaintext (PILT) packets from peers, as a v1 daemon run with `-encrypt=false`
    /// sends, and answer such a peer in plaintext until it makes an encrypted session.
    /// Nothing authenticates plaintext. [default: false]
    #[arg(long, global = true, env = "PILOT_ALLOW_PLAINTEXT", num_args = 0..=1, default_missing_value = "true")]
    pub allow_plaintext: Option<bool>,
    /// Use UDP segmentation offload (GSO/GRO) on the tunnel socket where the kernel offers it;
    /// the datagrams on the wire are the same either way. [default: true]
    #[arg(long, global = true, env = "PILOT_UDP_OFFLOAD", num_args = 0..=1, default_missing_value = "true")]
    pub udp_offload: Option<bool>,
    /// Owner string (an e-mail address, say) sent when registering with a v1 registry.
    /// pilot-registry registers a node by proof of its key and takes no owner string.
    /// [default: none]
    #[arg(long, global = true, env = "PILOT_OWNER")]
    pub owner: Option<String>,
    /// Hostname to claim after registering.
    #[arg(long, global = true, env = "PILOT_HOSTNAME")]
    pub hostname: Option<String>,
    /// Make the node public (its endpoint visible to everyone). [default: false]
    #[arg(long, global = true, env = "PILOT_PUBLIC", num_args = 0..=1, default_missing_value = "true")]
    pub public: Option<bool>,
    /// Turn off the echo service (virtual port 7, streams and datagrams). [default: the service runs]
    #[arg(long, global = true, env = "PILOT_NO_ECHO", num_args = 0..=1, default_missing_value = "true")]
    pub no_echo: Option<bool>,
    /// Turn off the data exchange service (virtual port 1001: messages and files). [default: the service runs]
    #[arg(long, global = true, env = "PILOT_NO_DATAEXCHANGE", num_args = 0..=1, default_missing_value = "true")]
    pub no_dataexchange: Option<bool>,
    /// Turn off the event stream broker (virtual port 1002: publish/subscribe). [default: the service runs]
    #[arg(long, global = true, env = "PILOT_NO_EVENTSTREAM", num_args = 0..=1, default_missing_value = "true")]
    pub no_eventstream: Option<bool>,
    /// Turn off the task delegation service (virtual port 1003). [default: the service runs]
    #[arg(long, global = true, env = "PILOT_NO_TASKS", num_args = 0..=1, default_missing_value = "true")]
    pub no_tasks: Option<bool>,
    /// Turn off the nameserver (virtual port 53: name, network and service records). [default: the service runs]
    #[arg(long, global = true, env = "PILOT_NO_NAMESERVER", num_args = 0..=1, default_missing_value = "true")]
    pub no_nameserver: Option<bool>,
    /// Turn off the stdio service (virtual port 1000: text streams land in the inbox). [default: the service runs]
    #[arg(long, global = true, env = "PILOT_NO_STDIO", num_args = 0..=1, default_missing_value = "true")]
    pub no_stdio: Option<bool>,
    /// Registry heartbeat and NAT keepalive interval (e.g. 30s). [default: 30s]
    #[arg(long, global = true, env = "PILOT_KEEPALIVE")]
    pub keepalive: Option<String>,
    /// Close connections idle this long (e.g. 120s). [default: 120s]
    #[arg(long, global = true, env = "PILOT_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Congestion control of stream connections: cubic, bbr (model-based: keeps its rate
    /// under random loss and keeps queues short) or newreno. [default: cubic]
    #[arg(long, global = true, env = "PILOT_CONGESTION")]
    pub congestion: Option<String>,
    /// Most new inbound connections per second from all peers together, 0 for no limit
    /// (each second's worth may come at once). [default: 1000]
    #[arg(long, global = true, env = "PILOT_SYN_RATE_LIMIT")]
    pub syn_rate_limit: Option<u32>,
    /// Most new inbound connections per second from one peer, 0 for no limit.
    /// [default: 200]
    #[arg(long, global = true, env = "PILOT_SYN_RATE_LIMIT_PER_PEER")]
    pub syn_rate_limit_per_peer: Option<u32>,
    /// Most connections per local port. [default: 1024]
    #[arg(long, global = true, env = "PILOT_MAX_CONNS_PER_PORT")]
    pub max_conns_per_port: Option<usize>,
    /// Most connections in total. [default: 4096]
    #[arg(long, global = true, env = "PILOT_MAX_CONNS_TOTAL")]
    pub max_conns_total: Option<usize>,
    /// Accept tasks from peers (the setting is kept in <home>/tasks/settings.json;
    /// `pilotctl enable-tasks` changes it at run time). [default: the kept setting, else off]
    #[arg(long, global = true, env = "PILOT_ACCEPT_TASKS", num_args = 0..=1, default_missing_value = "true")]
    pub accept_tasks: Option<bool>,
    /// Largest file the data exchange service accepts, in bytes. [default: 1073741824]
    #[arg(long, global = true, env = "PILOT_MAX_FILE_SIZE")]
    pub max_file_size: Option<u64>,
    /// Most bytes of received files kept in <home>/received (0: no limit).
    /// [default: 17179869184]
    #[arg(long, global = true, env = "PILOT_MAX_RECEIVED_BYTES")]
    pub max_received_bytes: Option<u64>,
    /// Registry connection over TLS (needs --registry-fingerprint). [default: false]
    #[arg(long, global = true, env = "PILOT_REGISTRY_TLS", num_args = 0..=1, default_missing_value = "true")]
    pub registry_tls: Option<bool>,
    /// SHA-256 of the registry's certificate, lowercase hex (pins the registry). With several
    /// --registry addresses the one fingerprint pins every one of them: give the instances
    /// the same certificate.
    #[arg(long, global = true, env = "PILOT_REGISTRY_FINGERPRINT")]
    pub registry_fingerprint: Option<String>,
    /// Webhook URL for daemon events ("" disables).
    #[arg(long, global = true, env = "PILOT_WEBHOOK")]
    pub webhook: Option<String>,
    /// Log level (error, warn, info, debug, trace, or a tracing filter). [default: info]
    #[arg(long, global = true, env = "PILOT_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log format: text or json. [default: text]
    #[arg(long, global = true, env = "PILOT_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// TUN interface name for `up` and `down` (at most 15 bytes). [default: pilot0]
    #[arg(long, global = true, env = "PILOT_TUN_NAME")]
    pub tun_name: Option<String>,
    /// MTU of the TUN interface for `up`, 1280 to 65535. [default: 65535]
    #[arg(long, global = true, env = "PILOT_MTU")]
    pub mtu: Option<u32>,
    /// Ports of this host's kernel listeners that any caller may reach through `up`, comma
    /// separated (e.g. 80,443). Other ports are reachable only by trusted peers. [default: none]
    #[arg(long, global = true, env = "PILOT_EXPOSE")]
    pub expose: Option<String>,
    /// Host firewall handling for `up`: none (a self-test warns and names the accept rule to
    /// add) or nftables (insert that rule into each nftables input chain that would drop the
    /// TUN interface's packets, and remove it on exit). [default: none]
    #[arg(long, global = true, env = "PILOT_FIREWALL")]
    pub firewall: Option<String>,
    /// How `up` points the system resolver at the `.pilot` DNS answerer: auto (systemd-resolved
    /// when it runs, else resolvconf when installed, else nothing), resolved (systemd-resolved or
    /// fail), or off (change nothing; `pilotctl status` says how to do it by hand). Settings made
    /// are reverted when pilotd stops. [default: auto]
    #[arg(long, global = true, env = "PILOT_DNS")]
    pub dns: Option<String>,
}

/// `pilotd` subcommands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Run the daemon and bring up the TUN interface with this node's IPv6 address.
    ///
    /// Runs the daemon as plain `pilotd` does and, once the node is registered, creates the TUN
    /// interface (--tun-name, default pilot0) with the node's IPv6 address
    /// fd06:3fcd:b33d:<net>::<node>/128 and a route to fd06:3fcd:b33d::/48. The interface,
    /// address and route are removed on SIGTERM or SIGINT. Needs root or CAP_NET_ADMIN.
    Up,
    /// Remove what a stopped `pilotd up` left behind, and exit.
    ///
    /// Removes a TUN interface of that name that no process holds, routes to
    /// fd06:3fcd:b33d::/48 and Pilot addresses; exits 0, also when there was nothing to remove.
    /// Interfaces of another kind, and a TUN interface a running `pilotd up` holds, are left
    /// alone (an error).
    Down,
}

/// The effective configuration.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Config {
    /// Registry addresses, first preferred (a string when there is one, as before).
    #[serde(serialize_with = "registry_addrs")]
    pub registry: RegistryAddrs,
    /// Beacon address, if NAT traversal through a beacon is on.
    pub beacon: Option<String>,
    /// Tunnel socket address.
    pub listen: SocketAddr,
    /// Endpoint registered instead of discovering one.
    pub endpoint: Option<SocketAddr>,
    /// State directory.
    pub home: PathBuf,
    /// Identity file.
    pub identity: PathBuf,
    /// IPC socket.
    pub socket: PathBuf,
    /// Group given the IPC socket (mode 0660), if any.
    pub socket_group: Option<String>,
    /// Accept plaintext from peers with an identity.
    pub allow_plaintext: bool,
    /// UDP segmentation offload.
    pub udp_offload: bool,
    /// Owner string.
    pub owner: Option<String>,
    /// Hostname to claim.
    pub hostname: Option<String>,
    /// Public node.
    pub public: bool,
    /// Whether the echo service (port 7) is off.
    pub no_echo: bool,
    /// Whether the data exchange service is off.
    pub no_dataexchange: bool,
    /// Whether the event stream broker is off.
    pub no_eventstream: bool,
    /// Whether the task delegation service is off.
    pub no_tasks: bool,
    /// Whether the nameserver is off.
    pub no_nameserver: bool,
    /// Whether the stdio service is off.
    pub no_stdio: bool,
    /// Heartbeat and keepalive interval.
    #[serde(with = "secs")]
    pub keepalive: Duration,
    /// Idle connection timeout.
    #[serde(with = "secs")]
    pub idle_timeout: Duration,
    /// Congestion control of stream connections.
    #[serde(serialize_with = "by_name")]
    pub congestion: Algorithm,
    /// New inbound connections per second (0: no limit).
    pub syn_rate_limit: u32,
    /// New inbound connections per second from one peer (0: no limit).
    pub syn_rate_limit_per_peer: u32,
    /// Connections per local port.
    pub max_conns_per_port: usize,
    /// Connections in total.
    pub max_conns_total: usize,
    /// Accept tasks: `None` keeps the setting kept in the state directory.
    pub accept_tasks: Option<bool>,
    /// Largest file accepted by the data exchange service.
    pub max_file_size: u64,
    /// Most bytes of received files kept (0: no limit).
    pub max_received_bytes: u64,
    /// TLS to the registry.
    pub registry_tls: bool,
    /// Pinned registry certificate.
    pub registry_fingerprint: Option<String>,
    /// Webhook URL.
    pub webhook: Option<String>,
    /// Log filter.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// TUN interface name (`pilotd up` and `pilotd down`).
    pub tun_name: String,
    /// TUN interface MTU (`pilotd up`).
    pub mtu: u16,
    /// Kernel ports any caller may reach (`pilotd up`); others only trusted peers.
    pub expose: Vec<u16>,
    /// Host firewall handling (`pilotd up`).
    pub firewall: crate::inside::firewall::FirewallMode,
    /// How the system resolver learns about `.pilot` (`pilotd up`).
    pub dns: crate::inside::resolver::DnsMode,
}

impl Config {
    /// How the registry link connects: TLS pinned to [`Config::registry_fingerprint`] when
    /// [`Config::registry_tls`] is on (resolution guarantees the fingerprint is then present
    /// and valid), else plain TCP.
    pub fn registry_transport(&self) -> Transport {
        match (self.registry_tls, &self.registry_fingerprint) {
            (true, Some(fp)) => fp.parse().map_or(Transport::Tcp, Transport::TlsPinned),
            _ => Transport::Tcp,
        }
    }
}

fn registry_addrs<S: serde::Serializer>(a: &RegistryAddrs, s: S) -> Result<S::Ok, S::Error> {
    use serde::Serialize;
    match a.as_slice() {
        [one] => s.serialize_str(one),
        many => many.serialize(s),
    }
}

fn by_name<S: serde::Serializer>(a: &Algorithm, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(a)
}

impl Config {
    /// The transport settings these options give.
    pub fn endpoint_config(&self) -> EndpointConfig {
        let stream = StreamConfig {
            idle_timeout: self.idle_timeout,
            congestion: self.congestion,
            ..StreamConfig::default()
        };
        EndpointConfig {
            stream,
            max_conns_per_port: self.max_conns_per_port,
            max_conns: self.max_conns_total,
            ..EndpointConfig::default()
        }
    }
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", d.as_secs_f64()))
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not a JSON object.
    #[error("config file {path} is not a JSON object: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A key of the config file is not a known setting.
    #[error("config file {path}: unknown key {key:?}")]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A value does not parse.
    #[error("{setting}: {reason}")]
    Invalid {
        /// The setting (flag name).
        setting: &'static str,
        /// Why.
        reason: String,
    },
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        reason: reason.into(),
    }
}

/// Settings read from a config file, as strings keyed by normalized flag name.
fn read_file(path: &Path) -> Result<BTreeMap<String, Value>, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| ConfigError::Format {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let Value::Object(map) = v else {
        return Err(ConfigError::Format {
            path: path.to_owned(),
            reason: "top level is not an object".into(),
        });
    };
    // Keys starting with '#' are comments (the shipped example documents each setting so).
    Ok(map
        .into_iter()
        .filter(|(k, _)| !k.starts_with('#'))
        .map(|(k, v)| (k.trim_start_matches('-').replace('_', "-"), v))
        .collect())
}

/// Keys v1 config files may hold that this daemon reads elsewhere or does not need.
const IGNORED_V1_KEYS: &[&str] = &["time-wait", "no-dataexchange", "no-eventstream", "log-file"];

fn file_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn parse_bool(setting: &'static str, s: &str) -> Result<bool, ConfigError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(invalid(setting, format!("{s:?} is not true or false"))),
    }
}

fn parse_socket_addr(setting: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    // v1 writes ":4000" for every address.
    let s = s.trim();
    let full = if s.starts_with(':') {
        format!("[::]{s}")
    } else {
        s.to_owned()
    };
    full.parse().map_err(|_| {
        invalid(
            setting,
            format!("{s:?} is not an address like [::]:4000 or 0.0.0.0:4000"),
        )
    })
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn default_home() -> PathBuf {
    if is_root() {
        return PathBuf::from(SYSTEM_HOME);
    }
    match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h).join(".pilot"),
        _ => PathBuf::from(".pilot"),
    }
}

impl Cli {
    /// Fills every unset flag from the config file, if any, and the defaults.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(p) => read_file(p)?,
            None => BTreeMap::new(),
        };
        if let Some(path) = &self.config {
            for k in file.keys() {
                if !KNOWN_KEYS.contains(&k.as_str()) && !IGNORED_V1_KEYS.contains(&k.as_str()) {
                    return Err(ConfigError::UnknownKey {
                        path: path.clone(),
                        key: k.clone(),
                    });
                }
            }
        }
        let get = |flag: Option<String>, key: &str| -> Option<String> {
            flag.or_else(|| file.get(key).and_then(file_str))
        };
        let pb = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());

        let home = get(pb(&self.home), "home")
            .map(PathBuf::from)
            .unwrap_or_else(default_home);
        let identity = get(pb(&self.identity), "identity")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("identity.json"));
        let socket = get(pb(&self.socket), "socket")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                if is_root() {
                    PathBuf::from(SYSTEM_SOCKET)
                } else {
                    home.join(SOCKET_FILE)
                }
            });
        let bool_of =
            |flag: Option<bool>, key: &'static str, default: bool| -> Result<bool, ConfigError> {
                match flag {
                    Some(b) => Ok(b),
                    None => match file.get(key).and_then(file_str) {
                        Some(s) => parse_bool(key, &s),
                        None => Ok(default),
                    },
                }
            };
        let num =
            |flag: Option<u64>, key: &'static str, default: u64| -> Result<u64, ConfigError> {
                match flag {
                    Some(n) => Ok(n),
                    None => match file.get(key).and_then(file_str) {
                        Some(s) => s
                            .trim()
                            .parse()
                            .map_err(|_| invalid(key, format!("{s:?} is not a whole number"))),
                        None => Ok(default),
                    },
                }
            };
        let dur = |flag: Option<String>,
                   key: &'static str,
                   default: Duration|
         -> Result<Duration, ConfigError> {
            match get(flag, key) {
                Some(s) => parse_duration(&s).map_err(|e| invalid(key, e.to_string())),
                None => Ok(default),
            }
        };
        let nonempty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());

        let listen = parse_socket_addr(
            "listen",
            &get(self.listen.clone(), "listen").unwrap_or_else(|| "[::]:4000".into()),
        )?;
        let endpoint = nonempty(get(self.endpoint.clone(), "endpoint"))
            .map(|s| parse_socket_addr("endpoint", &s))
            .transpose()?;
        let log_format = match get(self.log_format.clone(), "log-format")
            .unwrap_or_else(|| "text".into())
            .as_str()
        {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log-format",
                    format!("{other:?} is not text or json"),
                ))
            }
        };
        let registry = registry_list(&self.registry, file.get("registry"))?;
        let registry_tls = bool_of(self.registry_tls, "registry-tls", false)?;
        let registry_fingerprint = nonempty(get(
            self.registry_fingerprint.clone(),
            "registry-fingerprint",
        ))
        .map(|fp| {
            fp.parse::<Fingerprint>()
                .map(|f| f.to_string())
                .map_err(|e| invalid("registry-fingerprint", e.to_string()))
        })
        .transpose()?;
        // v1 wire §4.1: TLS to the registry is pinned, never verified against system roots.
        match (registry_tls, &registry_fingerprint) {
            (true, None) => {
                return Err(invalid(
                    "registry-tls",
                    "needs --registry-fingerprint: the SHA-256 of the registry's certificate, \
                     which pilot-registry logs at start as fingerprint=<64 hex digits> \
                     (certificates are not checked against system roots)",
                ))
            }
            (false, Some(_)) => {
                return Err(invalid(
                    "registry-fingerprint",
                    "pins a TLS certificate, but --registry-tls is off: add --registry-tls \
                     (the registry must serve TLS) or drop the fingerprint",
                ))
            }
            _ => {}
        }
        if !bool_of(self.encrypt, "encrypt", true)? {
            return Err(invalid(
                "encrypt",
                "false is not supported: pilotd always encrypts tunnels (X25519 + AES-256-GCM); \
                 to accept a v1 peer that sends plaintext, use --allow-plaintext",
            ));
        }
        let keepalive = dur(self.keepalive.clone(), "keepalive", Duration::from_secs(30))?;
        if keepalive < Duration::from_secs(1) {
            return Err(invalid("keepalive", "must be at least 1s"));
        }
        let tun_name = get(self.tun_name.clone(), "tun-name")
            .unwrap_or_else(|| crate::inside::iface::DEFAULT_NAME.into());
        crate::inside::iface::check_name(&tun_name)
            .map_err(|e| invalid("tun-name", e.to_string()))?;
        let mtu = num(
            self.mtu.map(u64::from),
            "mtu",
            u64::from(crate::inside::iface::DEFAULT_MTU),
        )?;
        let mtu = u16::try_from(mtu)
            .ok()
            .filter(|m| *m >= crate::inside::iface::MIN_MTU)
            .ok_or_else(|| {
                invalid(
                    "mtu",
                    format!(
                        "{mtu} is outside {}..=65535 (IPv6 needs at least 1280)",
                        crate::inside::iface::MIN_MTU
                    ),
                )
            })?;
        let expose = match get(self.expose.clone(), "expose") {
            None => Vec::new(),
            Some(s) => parse_ports(&s).map_err(|e| invalid("expose", e))?,
        };
        let firewall = match get(self.firewall.clone(), "firewall") {
            None => crate::inside::firewall::FirewallMode::None,
            Some(s) => s.parse().map_err(|e: String| invalid("firewall", e))?,
        };
        let dns = match get(self.dns.clone(), "dns") {
            None => crate::inside::resolver::DnsMode::Auto,
            Some(s) => s.parse().map_err(|e: String| invalid("dns", e))?,
        };
        let congestion = match get(self.congestion.clone(), "congestion") {
            None => Algorithm::default(),
            Some(s) => s
                .parse()
                .map_err(|e: UnknownAlgorithm| invalid("congestion", e.to_string()))?,
        };
        let socket_group = nonempty(get(self.socket_group.clone(), "socket-group"));
        if let Some(g) = &socket_group {
            crate::service::group_id(g).map_err(|e| match e {
                crate::service::ShareError::NoGroup(_) => {
                    invalid("socket-group", format!("no group named {g:?}"))
                }
                e => invalid("socket-group", e.to_string()),
            })?;
        }
        let max =
            |v: u64, key: &'static str| usize::try_from(v).map_err(|_| invalid(key, "too large"));
        Ok(Config {
            registry,
            beacon: nonempty(Some(
                get(self.beacon.clone(), "beacon").unwrap_or_else(|| "127.0.0.1:9001".into()),
            )),
            listen,
            endpoint,
            home,
            identity,
            socket,
            socket_group,
            allow_plaintext: bool_of(self.allow_plaintext, "allow-plaintext", false)?,
            udp_offload: bool_of(self.udp_offload, "udp-offload", true)?,
            owner: nonempty(get(self.owner.clone(), "owner")),
            hostname: nonempty(get(self.hostname.clone(), "hostname")),
            public: bool_of(self.public, "public", false)?,
            no_echo: bool_of(self.no_echo, "no-echo", false)?,
            no_dataexchange: bool_of(self.no_dataexchange, "no-dataexchange", false)?,
            no_eventstream: bool_of(self.no_eventstream, "no-eventstream", false)?,
            no_tasks: bool_of(self.no_tasks, "no-tasks", false)?,
            no_nameserver: bool_of(self.no_nameserver, "no-nameserver", false)?,
            no_stdio: bool_of(self.no_stdio, "no-stdio", false)?,
            keepalive,
            idle_timeout: dur(
                self.idle_timeout.clone(),
                "idle-timeout",
                Duration::from_secs(120),
            )?,
            syn_rate_limit: u32::try_from(num(
                self.syn_rate_limit.map(u64::from),
                "syn-rate-limit",
                1000,
            )?)
            .map_err(|_| invalid("syn-rate-limit", "too large"))?,
            syn_rate_limit_per_peer: u32::try_from(num(
                self.syn_rate_limit_per_peer.map(u64::from),
                "syn-rate-limit-per-peer",
                200,
            )?)
            .map_err(|_| invalid("syn-rate-limit-per-peer", "too large"))?,
            max_conns_per_port: max(
                num(
                    self.max_conns_per_port.map(|v| v as u64),
                    "max-conns-per-port",
                    1024,
                )?,
                "max-conns-per-port",
            )?,
            max_conns_total: max(
                num(
                    self.max_conns_total.map(|v| v as u64),
                    "max-conns-total",
                    4096,
                )?,
                "max-conns-total",
            )?,
            accept_tasks: match self.accept_tasks {
                Some(b) => Some(b),
                None => match get(None, "accept-tasks") {
                    Some(_) => Some(bool_of(None, "accept-tasks", false)?),
                    None => None,
                },
            },
            max_file_size: num(self.max_file_size, "max-file-size", 1 << 30)?,
            max_received_bytes: num(self.max_received_bytes, "max-received-bytes", 16 << 30)?,
            registry_tls,
            registry_fingerprint,
            webhook: match nonempty(get(self.webhook.clone(), "webhook")) {
                Some(u) => {
                    crate::webhook::WebhookUrl::parse(&u)
                        .map_err(|e| invalid("webhook", e.to_string()))?;
                    Some(u)
                }
                None => None,
            },
            log_level: get(self.log_level.clone(), "log-level").unwrap_or_else(|| "info".into()),
            log_format,
            tun_name,
            mtu,
            expose,
            firewall,
            dns,
            congestion,
        })
    }
}

/// The registry addresses: the flags (each one address or several separated by commas), else
/// the file's `registry` (a string like the flag's, or a list of them), else the default.
fn registry_list(flags: &[String], file: Option<&Value>) -> Result<RegistryAddrs, ConfigError> {
    let bad = |e: pilot_registry_client::AddrListError| invalid("registry", e.to_string());
    if !flags.is_empty() {
        return RegistryAddrs::parse_all(flags).map_err(bad);
    }
    match file {
        None => RegistryAddrs::parse("127.0.0.1:9000").map_err(bad),
        Some(Value::Array(items)) => {
            let strings = items
                .iter()
                .map(|v| {
                    v.as_str().ok_or_else(|| {
                        invalid("registry", format!("list entry {v} is not a string"))
                    })
                })
                .collect::<Result<Vec<&str>, _>>()?;
            RegistryAddrs::parse_all(strings).map_err(bad)
        }
        Some(v) => match file_str(v) {
            Some(s) => RegistryAddrs::parse(&s).map_err(bad),
            None => Err(invalid(
                "registry",
                "must be a string (host:port, several separated by commas) or a list of them",
            )),
        },
    }
}

/// Parses a comma-separated list of ports (1 to 65535), sorted and without repeats; an empty
/// string is no ports.
fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<u16>() {
            Ok(p) if p > 0 => ports.push(p),
            _ => return Err(format!("{part:?} is not a port (1 to 65535)")),
        }
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// Keys a config file may hold (flag names).
const KNOWN_KEYS: &[&str] = &[
    "registry",
    "beacon",
    "listen",
    "endpoint",
    "home",
    "identity",
    "socket",
    "socket-group",
    "encrypt",
    "allow-plaintext",
    "udp-offload",
    "no-echo",
    "max-file-size",
    "accept-tasks",
    "max-received-bytes",
    "no-dataexchange",
    "no-eventstream",
    "no-tasks",
    "no-nameserver",
    "no-stdio",
    "owner",
    "hostname",
    "public",
    "keepalive",
    "idle-timeout",
    "syn-rate-limit",
    "syn-rate-limit-per-peer",
    "max-conns-per-port",
    "max-conns-total",
    "registry-tls",
    "registry-fingerprint",
    "webhook",
    "log-level",
    "log-format",
    "tun-name",
    "mtu",
    "expose",
    "firewall",
    "dns",
    "congestion",
];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut v = vec!["pilotd"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap()
    }

    #[test]
    fn defaults_work() {
        let c = cli(&["--home", "/tmp/x"]).resolve().unwrap();
        assert_eq!(c.listen, "[::]:4000".parse().unwrap());
        assert_eq!(c.identity, PathBuf::from("/tmp/x/identity.json"));
        assert!(!c.allow_plaintext && !c.public);
        assert_eq!(c.registry_transport(), Transport::Tcp);
        assert_eq!(c.keepalive, Duration::from_secs(30));
        assert_eq!(c.beacon.as_deref(), Some("127.0.0.1:9001"));
    }

    #[test]
    fn bare_switches_mean_true() {
        let c = cli(&[
            "--home",
            "/tmp/x",
            "--public",
            "--udp-offload",
            "false",
            "--no-echo",
        ])
        .resolve()
        .unwrap();
        assert!(c.public && !c.udp_offload && c.no_echo);
        let c = cli(&["--home", "/tmp/x", "--public=false"])
            .resolve()
            .unwrap();
        assert!(!c.public);
    }

    #[test]
    fn file_fills_what_flags_leave_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("daemon.json");
        std::fs::write(
            &f,
            r#"{"registry": "10.0.0.1:9000", "listen": ":4100", "encrypt": "true",
                "keepalive": "10s", "public": true, "max_conns_total": 12, "no-echo": true,
                "hostname": "alpha"}"#,
        )
        .unwrap();
        let c = cli(&[
            "--config",
            f.to_str().unwrap(),
            "--hostname",
            "beta",
            "--home",
            "/tmp/y",
        ])
        .resolve()
        .unwrap();
        assert_eq!(c.registry.to_string(), "10.0.0.1:9000");
        assert_eq!(c.listen, "[::]:4100".parse().unwrap());
        assert_eq!(c.keepalive, Duration::from_secs(10));
        assert!(c.public);
        assert_eq!(c.max_conns_total, 12);
        assert_eq!(c.hostname.as_deref(), Some("beta"));
    }

    #[test]
    fn tun_settings_resolve_and_validate() {
        let c = cli(&["--home", "/tmp/x"]).resolve().unwrap();
        assert_eq!(c.tun_name, "pilot0");
        assert_eq!(c.mtu, 65535);
        assert!(c.expose.is_empty());
        assert_eq!(cli(&[]).command, None);
        let c = cli(&[
            "up",
            "--tun-name",
            "pt1",
            "--mtu",
            "1280",
            "--home",
            "/tmp/x",
        ]);
        assert_eq!(c.command, Some(Command::Up));
        let c = c.resolve().unwrap();
        assert_eq!((c.tun_name.as_str(), c.mtu), ("pt1", 1280));
        assert_eq!(cli(&["down"]).command, Some(Command::Down));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("daemon.json");
        std::fs::write(&f, r#"{"tun_name": "pfile", "mtu": "9000"}"#).unwrap();
        let c = cli(&["--config", f.to_str().unwrap()]).resolve().unwrap();
        assert_eq!((c.tun_name.as_str(), c.mtu), ("pfile", 9000));
        for bad in [&["--mtu", "1279"][..], &["--mtu", "65536"], &["--mtu", "0"]] {
            let e = cli(bad).resolve().unwrap_err();
            assert!(e.to_string().starts_with("mtu:"), "{e}");
        }
        for bad in ["", "a/b", "much-too-long-name"] {
            let e = cli(&["--tun-name", bad]).resolve().unwrap_err();
            assert!(e.to_string().starts_with("tun-name:"), "{e}");
        }
    }

    #[test]
    fn firewall_mode_parses_and_validates() {
        use crate::inside::firewall::FirewallMode;
        assert_eq!(
            cli(&["--home", "/tmp/x"]).resolve().unwrap().firewall,
            FirewallMode::None
        );
        let c = cli(&["up", "--firewall", "nftables"]).resolve().unwrap();
        assert_eq!(c.firewall, FirewallMode::Nftables);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.json");
        std::fs::write(&f, r#"{"firewall": "nftables"}"#).unwrap();
        let c = cli(&["--config", f.to_str().unwrap()]).resolve().unwrap();
        assert_eq!(c.firewall, FirewallMode::Nftables);
        let e = cli(&["--firewall", "iptables"]).resolve().unwrap_err();
        assert!(e.to_string().starts_with("firewall:"), "{e}");
    }

    #[test]
    fn congestion_control_reaches_the_endpoint_config() {
        let c = cli(&["--home", "/tmp/x"]).resolve().unwrap();
        assert_eq!(c.congestion, Algorithm::Cubic);
        assert_eq!(c.endpoint_config().stream.congestion, Algorithm::Cubic);
        for (arg, want) in [
            ("bbr", Algorithm::Bbr),
            ("cubic", Algorithm::Cubic),
            ("newreno", Algorithm::NewReno),
        ] {
            let c = cli(&["--congestion", arg]).resolve().unwrap();
            assert_eq!(c.endpoint_config().stream.congestion, want);
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.json");
        std::fs::write(&f, r#"{"congestion": "bbr", "idle-timeout": "50s"}"#).unwrap();
        let c = cli(&["--config", f.to_str().unwrap()]).resolve().unwrap();
        let e = c.endpoint_config();
        assert_eq!(e.stream.congestion, Algorithm::Bbr);
        assert_eq!(e.stream.idle_timeout, Duration::from_secs(50));
        let e = cli(&["--congestion", "vegas"]).resolve().unwrap_err();
        assert!(e.to_string().starts_with("congestion:"), "{e}");
    }

    #[test]
    fn dns_mode_parses_and_validates() {
        use crate::inside::resolver::DnsMode;
        assert_eq!(
            cli(&["--home", "/tmp/x"]).resolve().unwrap().dns,
            DnsMode::Auto
        );
        for (arg, want) in [
            ("auto", DnsMode::Auto),
            ("resolved", DnsMode::Resolved),
            ("off", DnsMode::Off),
        ] {
            assert_eq!(cli(&["up", "--dns", arg]).resolve().unwrap().dns, want);
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.json");
        std::fs::write(&f, r#"{"dns": "off"}"#).unwrap();
        let c = cli(&["--config", f.to_str().unwrap()]).resolve().unwrap();
        assert_eq!(c.dns, DnsMode::Off);
        let e = cli(&["--dns", "dnsmasq"]).resolve().unwrap_err();
        assert!(e.to_string().starts_with("dns:"), "{e}");
    }

    #[test]
    fn exposed_ports_parse_and_validate() {
        let c = cli(&["--expose", "443, 80,80,,22"]).resolve().unwrap();
        assert_eq!(c.expose, vec![22, 80, 443]);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("daemon.json");
        std::fs::write(&f, r#"{"expose": "8080"}"#).unwrap();
        let c = cli(&["--config", f.to_str().unwrap()]).resolve().unwrap();
        assert_eq!(c.expose, vec![8080]);
        for bad in ["0", "65536", "http", "80;443"] {
            let e = cli(&["--expose", bad]).resolve().unwrap_err();
            assert!(e.to_string().starts_with("expose:"), "{e}");
        }
    }

    #[test]
    fn shipped_example_documents_every_key_and_resolves() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config/pilotd.json");
        let Value::Object(file) = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
        else {
            panic!("{} is not a JSON object", path.display())
        };
        for k in KNOWN_KEYS {
            assert!(
                file.contains_key(&format!("# {k}")),
                "{k} is not documented"
            );
        }
        for k in file.keys().filter(|k| !k.starts_with('#')) {
            assert!(KNOWN_KEYS.contains(&k.as_str()), "{k} is not a setting");
            assert!(
                file.contains_key(&format!("# {k}")),
                "{k} is not documented"
            );
        }
        // The group may not exist on this machine: the flag ("" = none) wins over the file.
        let c = cli(&["--config", path.to_str().unwrap(), "--socket-group", ""])
            .resolve()
            .unwrap();
        assert_eq!(c.socket_group, None);
        assert_eq!(c.home, PathBuf::from(SYSTEM_HOME));
        assert_eq!(c.socket, PathBuf::from(SYSTEM_SOCKET));
        assert_eq!((c.tun_name.as_str(), c.mtu), ("pilot0", 65535));
        assert_eq!(c.accept_tasks, None);
    }

    #[test]
    fn socket_group_must_exist() {
        let c = cli(&["--home", "/tmp/x", "--socket-group", "root"])
            .resolve()
            .unwrap();
        assert_eq!(c.socket_group.as_deref(), Some("root"));
        let e = cli(&["--socket-group", "no-such-group-pilot-test"])
            .resolve()
            .unwrap_err();
        assert!(e.to_string().starts_with("socket-group:"), "{e}");
        assert!(e.to_string().contains("no-such-group-pilot-test"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("daemon.json");
        std::fs::write(&f, r#"{"keepalive": "often"}"#).unwrap();
        let e = cli(&["--config", f.to_str().unwrap()])
            .resolve()
            .unwrap_err();
        assert!(e.to_string().starts_with("keepalive:"), "{e}");
        std::fs::write(&f, r##"{"# colour": "a comment", "keepalive": "5s"}"##).unwrap();
        let c = cli(&["--config", f.to_str().unwrap()]).resolve().unwrap();
        assert_eq!(c.keepalive, Duration::from_secs(5));
        std::fs::write(&f, r#"{"colour": "blue"}"#).unwrap();
        let e = cli(&["--config", f.to_str().unwrap()])
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("unknown key \"colour\""), "{e}");
        std::fs::write(&f, "[1]").unwrap();
        assert!(cli(&["--config", f.to_str().unwrap()]).resolve().is_err());
        let e = cli(&["--listen", "nowhere"]).resolve().unwrap_err();
        assert!(e.to_string().starts_with("listen:"), "{e}");
        let e = cli(&["--registry-tls", "true"]).resolve().unwrap_err();
        assert!(e.to_string().contains("fingerprint"), "{e}");
        let e = cli(&["--registry-fingerprint", "abcd"])
            .resolve()
            .unwrap_err();
        assert!(e.to_string().starts_with("registry-fingerprint:"), "{e}");
        let e = cli(&["--log-format", "xml"]).resolve().unwrap_err();
        assert!(e.to_string().starts_with("log-format:"), "{e}");
    }

    #[test]
    fn several_registries_come_from_commas_repeated_flags_or_a_file_list() {
        let c = cli(&["--home", "/tmp/x"]).resolve().unwrap();
        assert_eq!(c.registry.as_slice(), ["127.0.0.1:9000"]);
        let c = cli(&[
            "--home",
            "/tmp/x",
            "--registry",
            "a:1, b:2",
            "--registry",
            "c:3",
        ])
        .resolve()
        .unwrap();
        assert_eq!(c.registry.as_slice(), ["a:1", "b:2", "c:3"]);
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["registry"], serde_json::json!(["a:1", "b:2", "c:3"]));
        let one = cli(&["--home", "/tmp/x", "--registry", "a:1"])
            .resolve()
            .unwrap();
        assert_eq!(serde_json::to_value(&one).unwrap()["registry"], "a:1");

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("daemon.json");
        std::fs::write(&f, r#"{"registry": ["10.0.0.1:9000", "10.0.0.2:9000"]}"#).unwrap();
        let path = f.to_str().unwrap();
        let c = cli(&["--config", path, "--home", "/tmp/y"])
            .resolve()
            .unwrap();
        assert_eq!(c.registry.as_slice(), ["10.0.0.1:9000", "10.0.0.2:9000"]);
        // A flag replaces the file's whole list.
        let c = cli(&["--config", path, "--home", "/tmp/y", "--registry", "h:9"])
            .resolve()
            .unwrap();
        assert_eq!(c.registry.as_slice(), ["h:9"]);
    }

    #[test]
    fn a_registry_list_with_a_bad_entry_is_refused_naming_it() {
        let e = cli(&["--home", "/tmp/x", "--registry", "a:1,b"])
            .resolve()
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "registry: registry address \"b\" (entry 2 of the list): no port: write host:port"
        );
        let e = cli(&["--home", "/tmp/x", "--registry", "a:1,a:1"])
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.contains("listed twice"), "{e}");
        let e = cli(&["--home", "/tmp/x", "--registry", ""])
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.contains("a registry address is required"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("daemon.json");
        std::fs::write(&f, r#"{"registry": ["10.0.0.1:9000", 7]}"#).unwrap();
        let e = cli(&["--config", f.to_str().unwrap(), "--home", "/tmp/y"])
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.contains("7 is not a string"), "{e}");
    }

    #[test]
    fn registry_tls_is_pinned_and_a_lone_fingerprint_is_refused() {
        let fp = "AB".repeat(32);
        let c = cli(&[
            "--home",
            "/tmp/x",
            "--registry-tls",
            "--registry-fingerprint",
            &fp,
        ])
        .resolve()
        .unwrap();
        assert_eq!(
            c.registry_fingerprint.as_deref(),
            Some("ab".repeat(32).as_str())
        );
        assert_eq!(
            c.registry_transport(),
            Transport::TlsPinned(Fingerprint([0xab; 32]))
        );
        let e = cli(&["--registry-tls"]).resolve().unwrap_err().to_string();
        assert!(
            e.starts_with("registry-tls:") && e.contains("--registry-fingerprint"),
            "{e}"
        );
        let e = cli(&["--registry-fingerprint", &fp])
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("registry-fingerprint:") && e.contains("--registry-tls"),
            "{e}"
        );
    }

    #[test]
    fn encrypt_false_is_refused_and_true_loads() {
        let e = cli(&["--encrypt", "false"])
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("encrypt:") && e.contains("always encrypts"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("daemon.json");
        std::fs::write(&f, r#"{"encrypt": false}"#).unwrap();
        let e = cli(&["--config", f.to_str().unwrap()])
            .resolve()
            .unwrap_err();
        assert!(e.to_string().starts_with("encrypt:"), "{e}");
        cli(&["--home", "/tmp/x", "--encrypt"]).resolve().unwrap();
        cli(&["--home", "/tmp/x", "--encrypt", "true"])
            .resolve()
            .unwrap();
        let help = {
            use clap::CommandFactory;
            Cli::command().render_long_help().to_string()
        };
        assert!(!help.contains("--encrypt"), "{help}");
    }
}
