//! `pilot-beacon`: the Pilot beacon server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use pilot_beacon::{
    check_token, Authority, CacheConfig, Config, OpenAuthority, RegistryAddrs, RegistryAuthority,
    TokenCheck,
};
use pilot_registry_client::{Fingerprint, Transport};

/// The Pilot beacon: tells nodes their public UDP endpoint, introduces nodes to each other
/// for hole punching, and relays tunnel frames between nodes that cannot reach each other
/// directly. Speaks the Pilot v1 beacon protocol on UDP.
///
/// Choose exactly one authority: --registry (with --beacon-token-file), which asks the
/// registry who may punch and relay to whom and verifies signed discovers against registered
/// keys; or --open, Pilot v1's behaviour, where anyone may claim any node and relay to
/// anyone (insecure).
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// UDP address to listen on. The IPv6 wildcard `[::]` also accepts IPv4.
    #[arg(long, env = "PILOT_BEACON_ADDR", default_value = "[::]:9001")]
    addr: SocketAddr,
    /// Registry to ask about nodes (HOST:PORT; plain TCP unless --registry-tls). Needs
    /// --beacon-token-file. Several addresses of one registry (comma-separated, or the flag
    /// repeated; a list in the config file), first preferred: a failed request moves to the
    /// next, and after every address failed in a row the beacon backs off (jittered, up to
    /// 6.4s). With --registry-tls one fingerprint pins them all.
    #[arg(
        long,
        env = "PILOT_BEACON_REGISTRY",
        value_name = "HOST:PORT[,HOST:PORT...]",
        value_delimiter = ',',
        requires = "beacon_token_file",
        conflicts_with = "open"
    )]
    registry: Vec<String>,
    /// Talk TLS to the registry, accepting only the certificate pinned by
    /// --registry-fingerprint (no check against system roots).
    #[arg(
        long,
        env = "PILOT_BEACON_REGISTRY_TLS",
        requires = "registry",
        requires = "registry_fingerprint"
    )]
    registry_tls: bool,
    /// SHA-256 of the registry's TLS certificate, 64 hex digits (pilot-registry logs it at
    /// start as fingerprint=...). Needs --registry-tls. Pins every --registry address: give
    /// the registry's instances the same certificate.
    #[arg(
        long,
        env = "PILOT_BEACON_REGISTRY_FINGERPRINT",
        value_name = "HEX",
        requires = "registry_tls",
        value_parser = clap::value_parser!(Fingerprint)
    )]
    registry_fingerprint: Option<Fingerprint>,
    /// File holding the token the registry expects from beacons (its --beacon-token-file).
    #[arg(long, env = "PILOT_BEACON_TOKEN_FILE", value_name = "PATH")]
    beacon_token_file: Option<PathBuf>,
    /// Run without a registry, as Pilot v1 does: every node may reach every node and nothing
    /// is authenticated. Insecure: anyone can take over any node's entry.
    #[arg(long, env = "PILOT_BEACON_OPEN")]
    open: bool,
    /// Peer beacons (HOST:PORT, comma-separated). Only they may send gossip (Sync), and relays
    /// they forward are trusted for the sender's identity.
    #[arg(
        long,
        env = "PILOT_BEACON_PEERS",
        value_delimiter = ',',
        value_name = "HOST:PORT,..."
    )]
    peers: Vec<String>,
    /// This beacon's ID in the gossip it sends.
    #[arg(long, env = "PILOT_BEACON_ID", default_value_t = 0)]
    beacon_id: u32,
    /// Seconds an entry lives without a refresh (daemons refresh every 30 s).
    #[arg(long, env = "PILOT_BEACON_ENTRY_TTL", default_value_t = 180, value_parser = clap::value_parser!(u64).range(1..))]
    entry_ttl: u64,
    /// Relay bytes per second per sending node (0: unlimited).
    #[arg(
        long,
        env = "PILOT_BEACON_RELAY_BYTES_PER_SEC",
        default_value_t = 12_500_000
    )]
    relay_bytes_per_sec: u64,
    /// Relay datagrams per second per sending node (0: unlimited).
    #[arg(
        long,
        env = "PILOT_BEACON_RELAY_PACKETS_PER_SEC",
        default_value_t = 20_000
    )]
    relay_packets_per_sec: u64,
    /// Milliseconds a sender may burst ahead of its relay rates.
    #[arg(long, env = "PILOT_BEACON_RELAY_BURST_MS", default_value_t = 500)]
    relay_burst_ms: u64,
    /// Punch requests per second per requesting node (0: unlimited).
    #[arg(long, env = "PILOT_BEACON_PUNCH_PER_SEC", default_value_t = 2)]
    punch_per_sec: u64,
    /// Punch requests a node may send at once.
    #[arg(long, env = "PILOT_BEACON_PUNCH_BURST", default_value_t = 10)]
    punch_burst: u64,
    /// Most nodes in the table.
    #[arg(long, env = "PILOT_BEACON_MAX_NODES", default_value_t = 1 << 20)]
    max_nodes: usize,
    /// Log format.
    #[arg(long, env = "PILOT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Log level or filter (error, warn, info, debug, trace, or a tracing filter).
    #[arg(long, env = "PILOT_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// JSON config file whose keys are these flags' long names (e.g. {"addr": "[::]:9001"};
    /// keys starting with '#' are comments). Flags and environment variables win over it.
    #[arg(long, env = "PILOT_BEACON_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Check the settings (flags, environment, config file, token file), print them as JSON
    /// and exit; non-zero when they are invalid.
    #[arg(long)]
    check_config: bool,
    /// Print the man page (roff) and exit.
    #[arg(long, hide = true)]
    man_page: bool,
}

const NO_AUTHORITY: &str = "no authority chosen: pass --registry HOST:PORT with \
--beacon-token-file PATH (checks who may punch and relay to whom), or --open (Pilot v1 \
behaviour: anyone may claim any node and relay to anyone; insecure)";

fn init_logs(cli: &Cli) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .map_err(|e| format!("--log-level {:?}: {e}", cli.log_level))?;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        b.json().init();
    } else {
        b.init();
    }
    Ok(())
}

fn read_token(path: &PathBuf) -> Result<String, String> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| format!("beacon token file {}: {e}", path.display()))?;
    let s = s.trim().to_owned();
    if s.len() < 16 {
        return Err(format!(
            "beacon token file {}: use at least 16 characters",
            path.display()
        ));
    }
    Ok(s)
}

fn main() -> ExitCode {
    use clap::CommandFactory;
    use pilot_service::config_file::{self, Parsed};
    let (cli, matches) = match config_file::parse::<Cli>(std::env::args_os().collect(), "config") {
        Parsed::Ok(c) => c,
        Parsed::Cli(e) => e.exit(),
        Parsed::File(e) => {
            eprintln!("pilot-beacon: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.man_page {
        return pilot_service::man::print_daemon_page(Cli::command(), "pilot-beacon");
    }
    if cli.registry.is_empty() && !cli.open {
        eprintln!("pilot-beacon: {NO_AUTHORITY}");
        return ExitCode::from(2);
    }
    let registry = if cli.registry.is_empty() {
        None
    } else {
        match RegistryAddrs::parse_all(&cli.registry) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("pilot-beacon: --registry: {e}");
                return ExitCode::from(2);
            }
        }
    };
    if cli.check_config {
        if let Some(f) = &cli.beacon_token_file {
            if let Err(e) = read_token(f) {
                eprintln!("pilot-beacon: {e}");
                return ExitCode::from(2);
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&cli.log_level) {
            eprintln!("pilot-beacon: log-level {:?}: {e}", cli.log_level);
            return ExitCode::from(2);
        }
        let mut settings = config_file::effective(&Cli::command(), &matches, "config");
        // The registry addresses as parsed: one prints as the string it always was, several
        // as a list.
        if let Some(r) = &registry {
            let v = match r.as_slice() {
                [one] => serde_json::json!(one),
                many => serde_json::json!(many),
            };
            settings.insert("registry".into(), v);
        }
        println!("{:#}", serde_json::Value::Object(settings));
        return ExitCode::SUCCESS;
    }
    if let Err(e) = init_logs(&cli) {
        eprintln!("pilot-beacon: {e}");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pilot-beacon: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli, registry)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pilot-beacon: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, registry: Option<RegistryAddrs>) -> Result<(), String> {
    let authority: Arc<dyn Authority> = match (registry, &cli.beacon_token_file) {
        (Some(registry), Some(token_file)) => {
            let token = read_token(token_file)?;
            let transport = match cli.registry_fingerprint {
                Some(fp) if cli.registry_tls => Transport::TlsPinned(fp),
                _ => Transport::Tcp,
            };
            tracing::info!(%registry, tls = cli.registry_tls, "authority: registry");
            let config = CacheConfig {
                transport,
                ..CacheConfig::new(registry.clone(), token)
            };
            match check_token(&config).await {
                Ok(()) => tracing::info!(%registry, "the registry accepts this beacon's token"),
                Err(e @ TokenCheck::Refused { .. }) => {
                    return Err(format!(
                        "{e} (--beacon-token-file {})",
                        token_file.display()
                    ))
                }
                Err(e @ TokenCheck::Unreachable { .. }) => tracing::warn!(
                    "{e}; punch and relay requests wait for it, and are refused while it \
                     stays unreachable"
                ),
            }
            Arc::new(RegistryAuthority::spawn(config))
        }
        _ => {
            tracing::warn!("authority: open (v1 behaviour): nothing is authenticated");
            Arc::new(OpenAuthority)
        }
    };
    let mut peers = Vec::new();
    for p in &cli.peers {
        let found: Vec<SocketAddr> = tokio::net::lookup_host(p.as_str())
            .await
            .map_err(|e| format!("--peers {p}: {e}"))?
            .collect();
        if found.is_empty() {
            return Err(format!("--peers {p}: no address"));
        }
        peers.extend(found);
    }
    let config = Config {
        beacon_id: cli.beacon_id,
        peers,
        entry_ttl: Duration::from_secs(cli.entry_ttl),
        relay_bytes_per_sec: cli.relay_bytes_per_sec,
        relay_packets_per_sec: cli.relay_packets_per_sec,
        relay_burst: Duration::from_millis(cli.relay_burst_ms),
        punch_per_sec: cli.punch_per_sec,
        punch_burst: cli.punch_burst,
        max_nodes: cli.max_nodes,
        ..Config::default()
    };
    let socket = pilot_beacon::bind(cli.addr).map_err(|e| e.to_string())?;
    let bound = socket.local_addr().map_or(cli.addr, |a| a);
    let server = pilot_beacon::Server::new(socket, authority, config);
    let stats = server.stats();
    if let Err(e) = pilot_service::notify::ready(&format!("serving on UDP {bound}")) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
    server
        .run(async {
            shutdown_signal().await;
            let _ = pilot_service::notify::stopping();
        })
        .await
        .map_err(|e| format!("UDP {}: {e}", cli.addr))?;
    let s = stats.snapshot();
    tracing::info!(
        datagrams = s.datagrams,
        relayed = s.relayed_packets,
        dropped = s.dropped_total(),
        "beacon stopped"
    );
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
