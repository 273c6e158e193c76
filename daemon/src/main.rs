//! `pilotd`: parses the configuration, starts the daemon, and stops it cleanly on SIGTERM or
//! SIGINT (FIN to every connection, deregistration, socket removed, exit 0).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use pilotd::config::{Cli, LogFormat};
use pilotd::node::Node;
use pilotd::registry_link::LinkCmd;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pilotd: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
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
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => sub.json().init(),
        LogFormat::Text => sub.init(),
    }
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
    rt.block_on(async move {
        let node = match Node::start(&config).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("pilotd: {e}");
                return ExitCode::FAILURE;
            }
        };
        shutdown_signal().await;
        tracing::info!("stopping");
        let link = node.daemon.link.clone();
        node.shutdown().await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let dereg = serde_json::json!({"type": "deregister", "node_id": null});
        if link.send(LinkCmd::Call(dereg, tx)).await.is_ok() {
            match tokio::time::timeout(Duration::from_secs(3), rx).await {
                Ok(Ok(Ok(_))) => tracing::info!("deregistered"),
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "deregistration failed"),
                _ => tracing::warn!("deregistration timed out"),
            }
        }
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
