//! A running daemon: identity, tunnel socket, registry link and engine, started in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::lookup_host;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::dataexchange::{DataExchange, DataExchangeConfig};
use crate::desired::{Desired, DesiredError};
use crate::engine::{bind_udp, Cmd, Engine, EngineConfig, EngineHandle};
use crate::events::Events;
use crate::eventstream::{Broker, BrokerLimits};
use crate::identity::NodeIdentity;
use crate::ipc_server::{self, IpcContext, IpcServer};
use crate::nameserver::{NameLimits, Nameserver};
use crate::registry_link::{self, LinkCmd, LinkConfig};
use crate::stdio::Stdio;
use crate::tasks::{TaskConfig, TaskService};
use crate::trust::{TrustConfig, TrustError, TrustHandle, TrustService};
use crate::webhook::{UrlError, Webhook, WebhookHandle, WebhookUrl};
use tunnel::node::tunnels::TunnelConfig;
use tunnel::node::{Node as NodeCore, NodeConfig};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The identity file.
    #[error("identity {path}: {reason}")]
    Identity {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The tunnel socket.
    #[error("binding the tunnel socket {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The registry state file (see [`crate::desired`]).
    #[error("registry state: {0}")]
    Desired(#[from] DesiredError),
    /// The beacon address does not resolve.
    #[error("beacon address {0}: {1}")]
    Beacon(String, #[source] std::io::Error),
    /// The trust service (its state file, or port 444).
    #[error("trust service: {0}")]
    Trust(#[from] TrustError),
    /// The webhook URL does not parse.
    #[error("webhook URL: {0}")]
    Webhook(#[from] UrlError),
    /// The IPC socket.
    #[error("IPC socket {path}: {source}")]
    Ipc {
        /// The socket path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// How long shutdown waits for the webhook poster to post the events still queued.
const WEBHOOK_DRAIN: Duration = Duration::from_secs(3);

/// A started daemon.
#[derive(Debug)]
pub struct Daemon {
    /// How applications reach the engine.
    pub engine: EngineHandle,
    /// Requests to the registry on this node's session.
    pub link: mpsc::Sender<LinkCmd>,
    /// The tunnel socket's local address.
    pub udp_addr: SocketAddr,
    /// Our identity (a rotation replaces its key).
    pub identity: Arc<NodeIdentity>,
    /// Handshake events pushed by the registry, for the trust service.
    pub pushes: Option<mpsc::Receiver<serde_json::Value>>,
    /// What the registry should hold for this node (applied after every registration).
    pub desired: Desired,
    task: tokio::task::JoinHandle<()>,
}

async fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))
}

impl Daemon {
    /// Starts the daemon's parts; registration then proceeds in the background. Events are
    /// not reported anywhere.
    pub async fn start(config: &Config) -> Result<Daemon, StartError> {
        Daemon::start_with_events(config, Events::default()).await
    }

    /// Starts the daemon's parts, reporting node, connection and datagram events to `events`.
    pub async fn start_with_events(config: &Config, events: Events) -> Result<Daemon, StartError> {
        // The socket first: a start that fails on a busy port leaves no new identity behind.
        let socket = bind_udp(config.listen).map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let (identity, created) =
            NodeIdentity::load_or_create(&config.identity).map_err(|e| StartError::Identity {
                path: config.identity.display().to_string(),
                reason: e.to_string(),
            })?;
        if created {
            tracing::info!(path = %config.identity.display(), "created a new identity");
        }
        let udp_addr = socket.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let beacon = match &config.beacon {
            Some(b) => Some(
                resolve(b)
                    .await
                    .map_err(|e| StartError::Beacon(b.clone(), e))?,
            ),
            None => None,
        };
        let desired = Desired::load(&config.home)?;
        if desired
            .update(|s| {
                let before = s.clone();
                s.reconcile(config.hostname.as_deref(), config.public);
                *s != before
            })
            .await?
        {
            tracing::debug!(path = ?desired.path(), "registry state follows the flags");
        }
        let identity = Arc::new(identity);
        let tunnels = TunnelConfig {
            refuse_plaintext: !config.allow_plaintext,
            beacon,
        };
        let (link_tx, link_rx) = mpsc::channel(1024);
        let (ev_tx, ev_rx) = mpsc::channel(1024);
        let listen_port = config.endpoint.map_or(udp_addr.port(), |e| e.port());
        let link_config = LinkConfig {
            registry: config.registry.clone(),
            transport: config.registry_transport(),
            identity: identity.clone(),
            listen_port,
            owner: config.owner.clone(),
            desired: desired.clone(),
            keepalive: config.keepalive,
            instance: registry_link::new_instance(),
        };
        let (push_tx, push_rx) = mpsc::channel(256);
        tokio::spawn(registry_link::run(link_config, link_rx, ev_tx, push_tx));
        let endpoint = config.endpoint_config();
        let node = NodeCore::new(
            0,
            (*identity.key()).clone(),
            NodeConfig {
                endpoint,
                tunnels,
                syn_per_sec: config.syn_rate_limit,
                syn_per_peer_per_sec: config.syn_rate_limit_per_peer,
            },
            rand_core::OsRng,
        );
        let (engine, handle) = Engine::new(
            socket,
            node,
            EngineConfig {
                endpoint,
                beacon,
                endpoint_override: config.endpoint,
                offload: config.udp_offload,
                events: events.clone(),
                syn_per_sec: config.syn_rate_limit,
                syn_per_peer_per_sec: config.syn_rate_limit_per_peer,
            },
            link_tx.clone(),
            ev_rx,
        );
        let task = tokio::spawn(engine.run());
        tracing::info!(udp = %udp_addr, registry = %config.registry, "daemon started");
        Ok(Daemon {
            engine: handle,
            link: link_tx,
            udp_addr,
            identity,
            pushes: Some(push_rx),
            desired,
            task,
        })
    }

    /// Waits until the node is registered; returns its node ID.
    pub async fn registered(&self, timeout: Duration) -> Option<u32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(info) = self.engine.info().await {
                if let Some(n) = info.get("node_id").and_then(|v| v.as_u64()) {
                    if n != 0 {
                        return u32::try_from(n).ok();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Finishes every connection (FIN) and stops.
    pub async fn shutdown(self) {
        let _ = self.engine.send(Cmd::Shutdown).await;
        let _ = self.task.await;
    }
}

/// A whole node as `pilotd` runs it: the daemon, its trust service (port 444 and the gate) and
/// the IPC socket agents and `pilotctl` use.
#[derive(Debug)]
pub struct Node {
    /// The engine and registry link.
    pub daemon: Daemon,
    /// The event feed services and the engine report to.
    pub events: Events,
    /// The webhook poster.
    pub webhook: WebhookHandle,
    /// The event stream broker (port 1002), unless turned off.
    pub eventstream: Option<Broker>,
    /// The nameserver (port 53), unless turned off.
    pub nameserver: Option<Nameserver>,
    /// The data exchange service (port 1001), unless turned off.
    pub dataexchange: Option<Arc<DataExchange>>,
    /// The stdio service (port 1000), unless turned off (it needs data exchange's inbox).
    pub stdio: Option<Stdio>,
    /// The task service (port 1003), unless turned off.
    pub tasks: Option<TaskService>,
    /// The trust service.
    pub trust: TrustHandle,
    /// The IPC server.
    pub ipc: IpcServer,
}

impl Node {
    /// Starts every part, in order; on failure, what was started is stopped again.
    pub async fn start(config: &Config) -> Result<Node, StartError> {
        let url = match config.webhook.as_deref() {
            None | Some("") => None,
            Some(u) => Some(WebhookUrl::parse(u).map_err(StartError::Webhook)?),
        };
        let (events, events_rx) = Events::channel();
        let mut daemon = Daemon::start_with_events(config, events.clone()).await?;
        events.set_wanted(url.is_some());
        let webhook = Webhook::start(events_rx, url, daemon.engine.node_watch());
        let trust = TrustService::start(
            TrustConfig::new(
                &config.home,
                daemon.identity.clone(),
                daemon.desired.public(),
            ),
            daemon.engine.clone(),
            daemon.link.clone(),
            daemon.pushes.take(),
        )
        .await;
        let (trust_tx, trust) = match trust {
            Ok(t) => t,
            Err(e) => {
                daemon.shutdown().await;
                return Err(e.into());
            }
        };
        if !config.no_echo {
            if let Err(e) = crate::services::start_echo(daemon.engine.clone()).await {
                tracing::warn!(error = %e, "echo service not started");
            }
        }
        let eventstream = if config.no_eventstream {
            None
        } else {
            match Broker::start(&daemon.engine, events.clone(), BrokerLimits::default()).await {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!(error = %e, "event stream not started");
                    None
                }
            }
        };
        let nameserver = if config.no_nameserver {
            None
        } else {
            match Nameserver::open(&config.home, NameLimits::default()) {
                Ok(ns) => match ns.start(&daemon.engine).await {
                    Ok(()) => Some(ns),
                    Err(e) => {
                        tracing::warn!(error = %e, "nameserver not started");
                        None
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "nameserver store unreadable; nameserver not started");
                    None
                }
            }
        };
        let dataexchange = if config.no_dataexchange {
            None
        } else {
            let mut dx = DataExchangeConfig::new(&config.home);
            dx.max_file_size = config.max_file_size;
            dx.max_received_bytes = config.max_received_bytes;
            match crate::dataexchange::start(&daemon.engine, dx, events.clone()).await {
                Ok(d) => Some(Arc::new(d)),
                Err(e) => {
                    tracing::warn!(error = %e, "data exchange service not started");
                    None
                }
            }
        };
        let stdio = match (&dataexchange, config.no_stdio) {
            (Some(dx), false) => match Stdio::start(&daemon.engine, dx.clone()).await {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "stdio service not started");
                    None
                }
            },
            _ => None,
        };
        let tasks = if config.no_tasks {
            None
        } else {
            let cfg = TaskConfig {
                enabled: config.accept_tasks,
                ..TaskConfig::new(&config.home)
            };
            match TaskService::start(
                cfg,
                daemon.engine.clone(),
                daemon.link.clone(),
                events.clone(),
            )
            .await
            {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "task service not started");
                    None
                }
            }
        };
        let task_exec = tasks.as_ref().is_some_and(|t| t.handle().enabled());
        follow_task_service(&daemon, task_exec).await;
        let mut trust_events = trust.subscribe();
        let feed = events.clone();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match trust_events.recv().await {
                    Ok(ev) => {
                        if let Some((name, data)) = ev.webhook() {
                            feed.emit(name, data);
                        }
                    }
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => break,
                }
            }
        });
        let ctx = IpcContext {
            events: events.clone(),
            engine: daemon.engine.clone(),
            link: daemon.link.clone(),
            trust: Some(trust_tx),
            trust_handle: Some(trust.clone()),
            webhook: Some(webhook.clone()),
            nameserver: nameserver.clone(),
            stdio: stdio.clone(),
            tasks: tasks.as_ref().map(TaskService::handle),
            home: config.home.clone(),
            identity: daemon.identity.clone(),
            desired: daemon.desired.clone(),
        };
        let ipc = match ipc_server::serve(&config.socket, ctx).await {
            Ok(s) => s,
            Err(source) => {
                daemon.shutdown().await;
                return Err(StartError::Ipc {
                    path: config.socket.display().to_string(),
                    source,
                });
            }
        };
        tracing::info!(socket = %config.socket.display(), "IPC socket ready");
        Ok(Node {
            daemon,
            events,
            webhook,
            eventstream,
            nameserver,
            dataexchange,
            stdio,
            tasks,
            trust,
            ipc,
        })
    }

    /// Stops accepting IPC clients (their connections finish), then finishes every
    /// connection (FIN) and stops the engine.
    pub async fn shutdown(self) {
        self.ipc.shutdown().await;
        if let Some(t) = self.tasks {
            t.stop().await;
        }
        if let Some(ns) = &self.nameserver {
            if let Err(e) = ns.flush().await {
                tracing::warn!(error = %e, "nameserver records not saved");
            }
        }
        self.daemon.shutdown().await;
        if self.webhook.url().is_some() && !self.webhook.drain(&self.events, WEBHOOK_DRAIN).await {
            tracing::warn!("webhook events still queued at exit were not posted");
        }
    }
}

/// Makes the task advert in the desired state follow the task service, whose setting decides
/// at start (`--accept-tasks`, else its kept setting); a change is stored and sent to the
/// registry in the background (if that fails, the next registration applies it).
async fn follow_task_service(daemon: &Daemon, enabled: bool) {
    let changed = daemon
        .desired
        .update(|s| {
            // Never advertised and not accepting: nothing to tell the registry.
            let unchanged =
                s.task_exec.unwrap_or(false) == enabled && (s.task_exec.is_some() || !enabled);
            if !unchanged {
                s.task_exec = Some(enabled);
            }
            !unchanged
        })
        .await;
    match changed {
        Ok(true) => {
            let link = daemon.link.clone();
            tokio::spawn(async move {
                let req = serde_json::json!({"type": "set_task_exec", "node_id": null, "enabled": enabled});
                if let Err(e) = registry_link::request(
                    &link,
                    |tx| LinkCmd::Call(req, tx),
                    ipc_server::REGISTRY_TIMEOUT,
                )
                .await
                {
                    tracing::debug!(error = %e, "task advert sent with the next registration");
                }
            });
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "task advert not stored"),
    }
}
