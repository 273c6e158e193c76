//! `pilot-registry`: the Pilot registry server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pilot_registry::state::Policy;
use pilot_registry::store::pg::{self, PgStore};
use pilot_registry::store::{RedbStore, Store};
use pilot_registry::{server, Config, Registry};

/// The Pilot registry: node addresses, keys, hostnames, networks, trust pairs and the trust
/// handshake relay, over the Pilot v1 protocol (TCP, optionally TLS).
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// TCP address to listen on.
    #[arg(long, env = "PILOT_REGISTRY_ADDR", default_value = "[::]:9000")]
    addr: SocketAddr,
    /// Where the state is kept: a file (redb, created if missing), or a PostgreSQL database
    /// as postgres://USER[:PASSWORD]@HOST[:PORT]/DB (tables are created or migrated at start;
    /// one registry instance per database; the password is never logged, and PGPASSWORD is
    /// used when the URL has none). Default: /var/lib/pilot/registry.redb as root, otherwise
    /// $PILOT_HOME/registry.redb or ~/.pilot/registry.redb.
    #[arg(long, env = "PILOT_REGISTRY_STORE", value_name = "PATH|URL")]
    store: Option<PathBuf>,
    /// Keep state in memory only: everything is lost at exit.
    #[arg(long, env = "PILOT_REGISTRY_EPHEMERAL", conflicts_with = "store")]
    ephemeral: bool,
    /// TLS certificate chain (PEM). Needs --tls-key.
    #[arg(long, env = "PILOT_REGISTRY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM). Needs --tls-cert.
    #[arg(long, env = "PILOT_REGISTRY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve TLS with a self-signed certificate made at start; its fingerprint is logged for
    /// pinning (it changes at every start: prefer --tls-cert for long-lived deployments).
    #[arg(
        long,
        env = "PILOT_REGISTRY_TLS_SELF_SIGNED",
        conflicts_with = "tls_cert"
    )]
    tls_self_signed: bool,
    /// File holding the admin token that gates network creation and score changes.
    #[arg(long, env = "PILOT_REGISTRY_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// File holding the token beacons present to ask whether two nodes may reach each other.
    #[arg(long, env = "PILOT_REGISTRY_BEACON_TOKEN_FILE")]
    beacon_token_file: Option<PathBuf>,
    /// Serve HTTP on ADDR (default 127.0.0.1:9100 when given without a value): the dashboard
    /// at / (node counts, networks and members, trust graph, request rate; no IPs or keys),
    /// v1's dashboard JSON at /api/stats and Prometheus metrics at /metrics. Keep it on
    /// loopback (a warning is logged otherwise). --metrics is an alias.
    #[arg(long, visible_alias = "metrics", value_name = "ADDR", env = "PILOT_REGISTRY_HTTP", num_args = 0..=1, default_missing_value = "127.0.0.1:9100")]
    http: Option<SocketAddr>,
    /// Registrations of new keys per source IP per minute (0: unlimited).
    #[arg(long, env = "PILOT_REGISTRY_REGISTER_PER_MINUTE", default_value_t = 10)]
    register_per_minute: u32,
    /// Requests per source IP per second (0: unlimited).
    #[arg(long, env = "PILOT_REGISTRY_REQUESTS_PER_IP", default_value_t = 200)]
    requests_per_ip: u32,
    /// Requests per authenticated node per second (0: unlimited).
    #[arg(long, env = "PILOT_REGISTRY_REQUESTS_PER_NODE", default_value_t = 50)]
    requests_per_node: u32,
    /// Most simultaneous client connections.
    #[arg(
        long,
        env = "PILOT_REGISTRY_MAX_CONNECTIONS",
        default_value_t = 200_000
    )]
    max_connections: usize,
    /// Log format.
    #[arg(long, env = "PILOT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Log level or filter (error, warn, info, debug, trace, or a tracing filter).
    #[arg(long, env = "PILOT_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// JSON config file whose keys are these flags' long names (e.g. {"addr": "[::]:9000"};
    /// keys starting with '#' are comments). Flags and environment variables win over it.
    #[arg(long, env = "PILOT_REGISTRY_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Check the settings (flags, environment, config file, token and TLS files), print them
    /// as JSON and exit; non-zero when they are invalid.
    #[arg(long)]
    check_config: bool,
    /// Print the man page (roff) and exit.
    #[arg(long, hide = true)]
    man_page: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Import a v1 registry snapshot (the JSON file of `registry -store`) into an empty store,
    /// then exit.
    ImportV1 {
        /// The v1 snapshot file.
        snapshot: PathBuf,
    },
}

fn default_store() -> PathBuf {
    if nix_is_root() {
        return PathBuf::from("/var/lib/pilot/registry.redb");
    }
    if let Some(h) = std::env::var_os("PILOT_HOME") {
        return PathBuf::from(h).join("registry.redb");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".pilot").join("registry.redb")
}

fn nix_is_root() -> bool {
    // Effective UID from procfs keeps this binary free of libc calls.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn read_secret(path: &Option<PathBuf>, what: &str) -> Result<Option<String>, String> {
    let Some(p) = path else {
        return Ok(None);
    };
    let s = std::fs::read_to_string(p).map_err(|e| format!("{what} {}: {e}", p.display()))?;
    let s = s.trim().to_owned();
    if s.len() < 16 {
        return Err(format!(
            "{what} {}: use at least 16 characters",
            p.display()
        ));
    }
    Ok(Some(s))
}

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

fn main() -> ExitCode {
    use clap::CommandFactory;
    use pilot_service::config_file::{self, Parsed};
    let (cli, matches) = match config_file::parse::<Cli>(std::env::args_os().collect(), "config") {
        Parsed::Ok(c) => c,
        Parsed::Cli(e) => e.exit(),
        Parsed::File(e) => {
            eprintln!("pilot-registry: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.man_page {
        return pilot_service::man::print_daemon_page(Cli::command(), "pilot-registry");
    }
    if cli.check_config {
        if let Err(e) = check_files(&cli) {
            eprintln!("pilot-registry: {e}");
            return ExitCode::from(2);
        }
        let mut settings = config_file::effective(&Cli::command(), &matches, "config");
        if let Some(serde_json::Value::String(s)) = settings.get_mut("store") {
            if pg::is_url(s) {
                *s = pg::redact_url(s);
            }
        }
        println!("{:#}", serde_json::Value::Object(settings));
        return ExitCode::SUCCESS;
    }
    if let Err(e) = init_logs(&cli) {
        eprintln!("pilot-registry: {e}");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pilot-registry: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pilot-registry: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What `--check-config` checks beyond the flags: the secret files hold usable tokens, the
/// TLS files are readable and the log filter parses.
fn check_files(cli: &Cli) -> Result<(), String> {
    read_secret(&cli.admin_token_file, "admin token file")?;
    read_secret(&cli.beacon_token_file, "beacon token file")?;
    if let Some(url) = cli
        .store
        .as_ref()
        .and_then(|s| s.to_str())
        .filter(|s| pg::is_url(s))
    {
        pg::check_url(url).map_err(|e| e.to_string())?;
    }
    for p in [&cli.tls_cert, &cli.tls_key].into_iter().flatten() {
        std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .map_err(|e| format!("log-level {:?}: {e}", cli.log_level))?;
    Ok(())
}

async fn run(cli: Cli) -> Result<(), String> {
    let store_path = cli.store.clone().unwrap_or_else(default_store);
    // What the logs and reports call the store (a database without its password).
    let store_name;
    let store: Box<dyn Store> = if cli.ephemeral {
        store_name = "memory".to_owned();
        Box::new(RedbStore::in_memory().map_err(|e| e.to_string())?)
    } else if let Some(url) = store_path.to_str().filter(|s| pg::is_url(s)) {
        // Connecting blocks this thread (a few round trips); nothing else runs yet.
        let st = PgStore::connect(url).map_err(|e| e.to_string())?;
        store_name = st.target().to_owned();
        Box::new(st)
    } else {
        store_name = store_path.display().to_string();
        Box::new(RedbStore::open(&store_path).map_err(|e| e.to_string())?)
    };
    if let Some(Command::ImportV1 { snapshot }) = &cli.command {
        let json = std::fs::read(snapshot).map_err(|e| format!("{}: {e}", snapshot.display()))?;
        let mut store = store;
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let rep = pilot_registry::import::import_v1(store.as_mut(), &json, unix)
            .map_err(|e| format!("{}: {e}", snapshot.display()))?;
        println!(
            "imported {} nodes ({} inactive), {} networks, {} trust pairs, {} pending handshakes; skipped {} invalid entries into {}",
            rep.nodes,
            rep.inactive_nodes,
            rep.networks,
            rep.trust_pairs,
            rep.handshakes,
            rep.skipped,
            store_name
        );
        return Ok(());
    }
    let tls = match (&cli.tls_cert, &cli.tls_key, cli.tls_self_signed) {
        (Some(c), Some(k), _) => {
            let cert = std::fs::read(c).map_err(|e| format!("{}: {e}", c.display()))?;
            let key = std::fs::read(k).map_err(|e| format!("{}: {e}", k.display()))?;
            let der = rustls_pemfile_first_der(&cert);
            let acc = server::tls_from_pem(&cert, &key)?;
            tracing::info!(fingerprint = %server::fingerprint(&der), "TLS enabled");
            Some(acc)
        }
        (_, _, true) => {
            let (cert, key, fp) = server::self_signed()?;
            tracing::info!(fingerprint = %fp, "TLS enabled with a self-signed certificate");
            Some(server::tls_from_pem(cert.as_bytes(), key.as_bytes())?)
        }
        _ => None,
    };
    let config = Config {
        policy: Policy {
            admin_token: read_secret(&cli.admin_token_file, "admin token file")?,
            beacon_token: read_secret(&cli.beacon_token_file, "beacon token file")?,
        },
        register_per_minute: cli.register_per_minute,
        requests_per_ip: cli.requests_per_ip,
        requests_per_node: cli.requests_per_node,
        max_connections: cli.max_connections,
    };
    let reg = Registry::open(store, config).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(cli.addr)
        .await
        .map_err(|e| format!("listening on {}: {e}", cli.addr))?;
    let bound = listener.local_addr().unwrap_or(cli.addr);
    tracing::info!(addr = %bound, store = %store_name, "registry listening");
    if let Some(h) = cli.http {
        if !h.ip().is_loopback() {
            tracing::warn!(addr = %h, "HTTP listener is not on loopback: anyone who reaches it sees the dashboard, node addresses, networks and metrics");
        }
        let l = tokio::net::TcpListener::bind(h)
            .await
            .map_err(|e| format!("HTTP listener {h}: {e}"))?;
        let bound = l.local_addr().unwrap_or(h);
        tracing::info!(addr = %bound, "HTTP: dashboard at http://{bound}/, /api/stats, /metrics");
        tokio::spawn(pilot_registry::http::serve(
            reg.clone(),
            l,
            std::future::pending(),
        ));
    }
    let status = format!("listening on {bound}");
    if let Err(e) = pilot_service::notify::ready(&status) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
    reg.serve(listener, tls, async {
        shutdown_signal().await;
        let _ = pilot_service::notify::stopping();
    })
    .await;
    tracing::info!("registry stopped");
    Ok(())
}

fn rustls_pemfile_first_der(pem: &[u8]) -> Vec<u8> {
    rustls_pemfile::certs(&mut &pem[..])
        .next()
        .and_then(Result::ok)
        .map(|c| c.to_vec())
        .unwrap_or_default()
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
