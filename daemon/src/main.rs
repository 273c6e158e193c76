//! `pilotd`: parses the configuration, starts the daemon, and stops it cleanly on SIGTERM or
//! SIGINT (FIN to every connection, socket removed, exit 0). A stop does not deregister: the
//! node keeps its registry entry (and the registry its attributes) until it is reaped, so a
//! restart finds it as it was (docs/COMPAT.md); `pilotctl deregister` removes it.
//!
//! `pilotd up` also brings up the TUN interface once the node is registered and removes it
//! before that shutdown; `pilotd down` removes what an earlier `pilotd up` left and exits.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use pilotd::config::{Cli, Command, Config, LogFormat};
use pilotd::inside::datapath::{Inside, InsideConfig};
use pilotd::inside::firewall::{self, FirewallMode};
use pilotd::inside::iface::{cleanup, Iface, IfaceConfig};
use pilotd::inside::resolver::{self, Mechanism, SystemDns};
use pilotd::ipc_server::InsideStatus;
use pilotd::node::Node;
use pilotd::service;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.man_page {
        use clap::CommandFactory;
        return pilot_service::man::print_daemon_page(Cli::command(), "pilotd");
    }
    let config = match cli.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pilotd: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        // Addresses that cannot resolve would only show later as a node that never registers.
        let named = config
            .registry
            .as_slice()
            .iter()
            .map(|r| ("registry", r.as_str()))
            .chain(config.beacon.as_deref().map(|b| ("beacon", b)));
        for (what, addr) in named {
            if let Err(e) = std::net::ToSocketAddrs::to_socket_addrs(addr) {
                eprintln!("pilotd: {what} {addr:?} does not resolve: {e}");
                return ExitCode::from(2);
            }
        }
        return match serde_json::to_string_pretty(&config) {
            Ok(s) => {
                println!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pilotd: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let filter = match EnvFilter::try_new(&config.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("pilotd: log-level {:?}: {e}", config.log_level);
            return ExitCode::from(2);
        }
    };
    let reload = Reload {
        set_filter: service::init_logs(filter, config.log_format == LogFormat::Json),
        cli: cli.clone(),
    };
    raise_open_files();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pilotd: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        None => rt.block_on(run(config, None, reload)),
        Some(Command::Up) => {
            let iface = IfaceConfig {
                name: config.tun_name.clone(),
                mtu: config.mtu,
                ..IfaceConfig::default()
            };
            rt.block_on(run(config, Some(iface), reload))
        }
        Some(Command::Down) => rt.block_on(down(&config.tun_name)),
    }
}

/// What SIGHUP reloads need: the command line to resolve again and the log filter to change.
struct Reload {
    cli: Cli,
    set_filter: service::SetLogFilter,
}

/// Runs the daemon until SIGTERM or SIGINT; with `iface`, brings the TUN interface up once the
/// node is registered and removes it again before the daemon stops.
async fn run(config: Config, iface: Option<IfaceConfig>, reload: Reload) -> ExitCode {
    let hup = service::hangups();
    let mut stop = std::pin::pin!(shutdown_signal());
    let node = match Node::start(&config).await {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("pilotd: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(group) = &config.socket_group {
        if let Err(e) = service::share_socket(&config.socket, group) {
            tracing::error!(error = %e, "cannot share the IPC socket");
            eprintln!("pilotd: {e}");
            stop_node(node).await;
            return ExitCode::FAILURE;
        }
    }
    let iface = match iface {
        None => {
            let engine = node.daemon.engine.clone();
            let (cli, set_filter, config) = (reload.cli, reload.set_filter, config.clone());
            tokio::spawn(async move {
                if let Ok(id) = engine.registered().await {
                    let status = service::status_line(id, None);
                    service::notify_ready(&status);
                    service::spawn_reloader(hup, cli, config, set_filter, status);
                }
            });
            None
        }
        Some(ic) => {
            let node_id = loop {
                tokio::select! {
                    () = &mut stop => {
                        stop_node(node).await;
                        return ExitCode::SUCCESS;
                    }
                    id = node.daemon.registered(REGISTRATION_WAIT) => match id {
                        Some(id) => break id,
                        None => tracing::info!(
                            registry = %config.registry,
                            "not registered yet; the interface comes up once the node is"
                        ),
                    },
                }
            };
            let addr = tunnel::ula::to_ipv6(tunnel::addr::Addr::new(0, node_id));
            let i = match Iface::up(&ic, addr).await {
                Ok(i) => i,
                Err(e) => {
                    tracing::error!(iface = %ic.name, error = %e, "cannot bring the interface up");
                    eprintln!("pilotd: {e}");
                    stop_node(node).await;
                    return ExitCode::FAILURE;
                }
            };
            let inside_config = InsideConfig {
                own: tunnel::addr::Addr::new(0, node_id),
                link: node.daemon.link.clone(),
                expose: config.expose.clone(),
                gate: node.trust.gate(),
            };
            match Inside::start(i.device.clone(), node.daemon.engine.clone(), inside_config).await {
                Ok(inside) => {
                    let system_dns = match SystemDns::configure(config.dns, &i.name, i.index).await
                    {
                        Ok(d) => d,
                        Err(e) => {
                            tracing::error!(iface = %i.name, error = %e, "cannot point the system resolver at .pilot");
                            eprintln!("pilotd: {e}");
                            inside.stop().await;
                            let _ = i.down().await;
                            stop_node(node).await;
                            return ExitCode::FAILURE;
                        }
                    };
                    let dns_system = system_dns.describer();
                    let stats = inside.reporter();
                    let (name, ula, mtu, expose) = (
                        i.name.clone(),
                        i.addr.to_string(),
                        i.mtu,
                        config.expose.clone(),
                    );
                    node.ipc
                        .set_inside(InsideStatus(std::sync::Arc::new(move || {
                            let s = stats().unwrap_or_default();
                            serde_json::json!({
                                "interface": name, "ula": ula, "mtu": mtu, "expose": expose,
                                "dns": tunnel::inside::dns::RESOLVER.to_string(),
                                "dns_system": dns_system(),
                                "flows": s.flows, "outbound_dials": s.outbound_dials,
                                "outbound_refused": s.outbound_refused,
                                "inbound_offered": s.inbound_offered,
                                "inbound_refused": s.inbound_refused, "stats": s,
                            })
                        })));
                    if config.firewall == FirewallMode::Nftables {
                        match firewall::open(&i.name, i.addr).await {
                            Ok(chains) if chains.is_empty() => tracing::info!(
                                iface = %i.name,
                                "firewall: no nftables input chain drops {}; no rule added",
                                i.name
                            ),
                            Ok(chains) => {
                                for c in &chains {
                                    tracing::info!(iface = %i.name, "firewall: accepting {} in input chain {c} (comment \"{}\")", i.name, firewall::comment(&i.name));
                                }
                            }
                            Err(e) => {
                                tracing::error!(iface = %i.name, error = %e, "firewall: cannot add the accept rule");
                                eprintln!("pilotd: {e}");
                                inside.stop().await;
                                let _ = system_dns.revert().await;
                                let _ = firewall::close(&i.name).await;
                                let _ = i.down().await;
                                stop_node(node).await;
                                return ExitCode::FAILURE;
                            }
                        }
                    }
                    firewall::self_test(&i.device, &i.name, i.addr, inside.probe_answers()).await;
                    tracing::info!(iface = %i.name, "names: {}", system_dns.describe());
                    tracing::info!(iface = %i.name, index = i.index, mtu = i.mtu, expose = ?config.expose, "{} up: {}", i.name, i.addr);
                    let status = service::status_line(node_id, Some((&i.name, i.addr)));
                    service::notify_ready(&status);
                    service::spawn_reloader(
                        hup,
                        reload.cli,
                        config.clone(),
                        reload.set_filter,
                        status,
                    );
                    Some((i, inside, system_dns))
                }
                Err(e) => {
                    tracing::error!(iface = %i.name, error = %e, "cannot start the data path");
                    eprintln!("pilotd: {e}");
                    let _ = i.down().await;
                    stop_node(node).await;
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    stop.await;
    service::notify_stopping();
    tracing::info!("stopping");
    if let Some((i, inside, system_dns)) = iface {
        inside.stop().await;
        let name = i.name.clone();
        let mechanism = system_dns.mechanism();
        match system_dns.revert().await {
            Ok(()) if mechanism == Mechanism::None => {}
            Ok(()) => {
                tracing::info!(iface = %name, "the system resolver's .pilot settings are taken back")
            }
            Err(e) => {
                tracing::warn!(iface = %name, error = %e, "the system resolver's .pilot settings were not taken back")
            }
        }
        if config.firewall == FirewallMode::Nftables {
            match firewall::close(&name).await {
                Ok(n) => tracing::info!(iface = %name, rules = n, "firewall: accept rules removed"),
                Err(e) => {
                    tracing::warn!(iface = %name, error = %e, "firewall: accept rules not removed; `pilotd down` removes them")
                }
            }
        }
        if let Err(e) = i.down().await {
            tracing::warn!(iface = %name, error = %e, "interface not fully removed; `pilotd down` removes the rest");
        }
    }
    stop_node(node).await;
    ExitCode::SUCCESS
}

/// Raises the soft limit of open files to the hard one: every connection the data path carries
/// holds a kernel socket, and the usual soft default (1,024) is reached near 1,000 connections.
fn raise_open_files() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "open file limit raised"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open file limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open file limit"),
    }
}

/// How long each wait for registration lasts before `pilotd up` logs that it still waits.
const REGISTRATION_WAIT: Duration = Duration::from_secs(10);

/// Finishes every connection and stops. The node stays registered (v1 deregisters here).
async fn stop_node(node: Node) {
    node.shutdown().await;
    tracing::info!("stopped");
}

/// `pilotd down`: removes what a `pilotd up` left behind.
async fn down(name: &str) -> ExitCode {
    // A record left by a crashed `up`; resolvconf reports a missing one as an error too.
    let _ = resolver::cleanup_resolvconf(name).await;
    let rules = match firewall::close(name).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!(
                "pilotd down: firewall rules tagged {:?} not checked: {e}",
                firewall::comment(name)
            );
            0
        }
    };
    if rules > 0 {
        println!(
            "pilotd down: removed {rules} firewall rule(s) tagged {:?}",
            firewall::comment(name)
        );
    }
    match cleanup(name).await {
        Ok(c) if c.is_empty() => {
            if rules == 0 {
                println!(
                    "pilotd down: nothing to remove ({name} absent, no Pilot routes or addresses)"
                );
            }
            ExitCode::SUCCESS
        }
        Ok(c) => {
            println!(
                "pilotd down: removed {}{} route(s) to fd06:3fcd:b33d::/48 and {} Pilot address(es)",
                if c.interface { format!("interface {name}, ") } else { String::new() },
                c.routes,
                c.addresses
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pilotd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, so a signal
/// that arrives before the first poll is not lost.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    }
}
