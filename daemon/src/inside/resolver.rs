//! Pointing the host's resolver at the `.pilot` answerer (`pilotd up --dns`).
//!
//! The answerer lives in the data path at [`dns::RESOLVER`] port 53 (no socket). This module
//! only tells the system resolver to send `.pilot` names and reverse lookups of the Pilot /48
//! there, and takes that back when pilotd stops:
//! - **systemd-resolved**, over D-Bus: on the TUN link, DNS server [`dns::RESOLVER`], the
//!   routing-only domains `~pilot` and `~`[`dns::REVERSE_ZONE`], not a default route for other
//!   names, and LLMNR, mDNS, DNSSEC and DNS-over-TLS off (the answerer signs nothing and
//!   speaks plain DNS). Reapplied whenever resolved (re)starts; `RevertLink` on stop. A crash
//!   leaves nothing behind: the TUN link goes with the process, and resolved forgets it.
//! - **resolvconf**, where resolved does not run: a record `lo.<iface>` naming the answerer.
//!   Both resolvconf implementations (Debian's and openresolv) put records named `lo.*` first,
//!   the place of resolvers on the host itself, which the answerer is; it REFUSEs names outside
//!   its zones, so the C library moves on to the next server at once. Deleted on stop, and by
//!   `pilotd down` after a crash.
//! - Otherwise nothing: [`SystemDns::describe`] says how to do it by hand. This module never
//!   writes `/etc/resolv.conf` itself.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;
use tunnel::inside::dns;

/// The D-Bus name of systemd-resolved.
pub const RESOLVED_NAME: &str = "org.freedesktop.resolve1";
const RESOLVED_PATH: &str = "/org/freedesktop/resolve1";
const RESOLVED_MANAGER: &str = "org.freedesktop.resolve1.Manager";

/// How long one D-Bus call or one `resolvconf` run may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// How long resolved may take to learn about a new link before the settings are given up.
const LINK_WAIT: Duration = Duration::from_secs(5);

/// What `pilotd up` does about the system resolver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsMode {
    /// systemd-resolved when it runs, else resolvconf when installed, else nothing.
    #[default]
    Auto,
    /// systemd-resolved, or fail to start.
    Resolved,
    /// Change nothing.
    Off,
}

impl FromStr for DnsMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" | "auto" => Ok(DnsMode::Auto),
            "resolved" => Ok(DnsMode::Resolved),
            "off" => Ok(DnsMode::Off),
            other => Err(format!("{other:?} is not auto, resolved or off")),
        }
    }
}

/// Why the system resolver could not be told.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    /// No D-Bus system bus, or resolved is not on it.
    #[error("systemd-resolved is not reachable on the D-Bus system bus ({0}); use --dns=auto or --dns=off")]
    NoResolved(String),
    /// resolved refused or failed a call.
    #[error("systemd-resolved {method} on link {ifname}: {source}")]
    Call {
        /// The method.
        method: &'static str,
        /// The link.
        ifname: String,
        /// What D-Bus said.
        source: zbus::Error,
    },
    /// A call did not finish in time.
    #[error("systemd-resolved {0} timed out")]
    Timeout(&'static str),
    /// `resolvconf` failed.
    #[error("resolvconf {action} {record}: {reason}")]
    Resolvconf {
        /// `-a` or `-d`.
        action: &'static str,
        /// The record name.
        record: String,
        /// What happened.
        reason: String,
    },
    /// `resolvconf` was killed by a signal.
    #[error("resolvconf {action} {record}: killed by signal {signal}")]
    ResolvconfKilled {
        /// `-a` or `-d`.
        action: &'static str,
        /// The record name.
        record: String,
        /// The signal.
        signal: i32,
    },
}

/// Which mechanism carries the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// systemd-resolved over D-Bus.
    Resolved,
    /// A resolvconf record.
    Resolvconf,
    /// Nothing was changed.
    None,
}

/// The settings made for one TUN interface; [`SystemDns::revert`] takes them back.
pub struct SystemDns {
    mechanism: Mechanism,
    ifname: String,
    ifindex: u32,
    conn: Option<zbus::Connection>,
    watcher: Option<JoinHandle<()>>,
    /// What the last (re)apply did, for `pilotctl info` and `status`.
    state: Arc<Mutex<String>>,
}

impl fmt::Debug for SystemDns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SystemDns")
            .field("mechanism", &self.mechanism)
            .field("ifname", &self.ifname)
            .field("ifindex", &self.ifindex)
            .finish_non_exhaustive()
    }
}

/// The command a user runs to point systemd-resolved at the answerer by hand.
pub fn manual_hint(ifname: &str) -> String {
    format!(
        "point a resolver at [{r}]:53 for .pilot names, e.g. `resolvectl dns {ifname} {r}; \
         resolvectl domain {ifname} '~{z}' '~{rz}'`",
        r = dns::RESOLVER,
        z = dns::ZONE,
        rz = dns::REVERSE_ZONE,
    )
}

/// The resolvconf record pilotd writes for `ifname`: named as a resolver on the host, so
/// resolvconf lists it before the others.
pub fn resolvconf_record(ifname: &str) -> String {
    format!("lo.{ifname}")
}

impl SystemDns {
    /// Points the system resolver at the answerer for the TUN link `ifname` (index `ifindex`),
    /// as `mode` says. Only [`DnsMode::Resolved`] fails when resolved is not there; `auto`
    /// falls back to resolvconf, then to nothing.
    pub async fn configure(
        mode: DnsMode,
        ifname: &str,
        ifindex: u32,
    ) -> Result<SystemDns, ResolverError> {
        let state = Arc::new(Mutex::new(String::new()));
        let nothing = |state: Arc<Mutex<String>>, why: String| {
            set(&state, why);
            SystemDns {
                mechanism: Mechanism::None,
                ifname: ifname.to_owned(),
                ifindex,
                conn: None,
                watcher: None,
                state,
            }
        };
        if mode == DnsMode::Off {
            let why = format!("not configured (--dns=off): {}", manual_hint(ifname));
            return Ok(nothing(state, why));
        }
        match resolved_connection().await {
            Ok(conn) => {
                if let Err(e) = apply_resolved(&conn, ifname, ifindex).await {
                    if mode == DnsMode::Resolved {
                        return Err(e);
                    }
                    // resolved runs but refused: the host's resolver is resolved, so
                    // resolvconf (its compatibility front end) would fail the same way. What
                    // was set goes back (a DNS server without its routing domains would take
                    // every name).
                    let _ = call(&conn, "RevertLink", ifname, &(link(ifindex),)).await;
                    tracing::warn!(iface = %ifname, error = %e, "cannot point systemd-resolved at .pilot");
                    return Ok(nothing(
                        state,
                        format!("not configured ({e}): {}", manual_hint(ifname)),
                    ));
                }
                set(&state, resolved_text(ifname));
                let watcher = tokio::spawn(watch_resolved(
                    conn.clone(),
                    ifname.to_owned(),
                    ifindex,
                    state.clone(),
                ));
                return Ok(SystemDns {
                    mechanism: Mechanism::Resolved,
                    ifname: ifname.to_owned(),
                    ifindex,
                    conn: Some(conn),
                    watcher: Some(watcher),
                    state,
                });
            }
            Err(e) if mode == DnsMode::Resolved => return Err(e),
            Err(e) => tracing::debug!(error = %e, "systemd-resolved not used"),
        }
        match resolvconf_path() {
            Some(path) => {
                if let Err(e) = resolvconf_add(&path, ifname).await {
                    tracing::warn!(iface = %ifname, error = %e, "cannot add the resolvconf record for .pilot");
                    return Ok(nothing(
                        state,
                        format!("not configured ({e}): {}", manual_hint(ifname)),
                    ));
                }
                set(
                    &state,
                    format!(
                        "resolvconf record {} names [{}]:53",
                        resolvconf_record(ifname),
                        dns::RESOLVER
                    ),
                );
                Ok(SystemDns {
                    mechanism: Mechanism::Resolvconf,
                    ifname: ifname.to_owned(),
                    ifindex,
                    conn: None,
                    watcher: None,
                    state,
                })
            }
            None => {
                let why = format!(
                    "not configured (neither systemd-resolved nor resolvconf found): {}",
                    manual_hint(ifname)
                );
                Ok(nothing(state, why))
            }
        }
    }

    /// Which mechanism carries the settings.
    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    /// One line saying how `.pilot` names reach the answerer now (or how to make them).
    pub fn describe(&self) -> String {
        lock(&self.state).clone()
    }

    /// A handle on [`SystemDns::describe`]'s text that stays current after reapplies.
    pub fn describer(&self) -> impl Fn() -> String + Send + Sync + 'static {
        let state = self.state.clone();
        move || lock(&state).clone()
    }

    /// Takes back what [`SystemDns::configure`] set.
    pub async fn revert(mut self) -> Result<(), ResolverError> {
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
        match self.mechanism {
            Mechanism::None => Ok(()),
            Mechanism::Resolved => match &self.conn {
                Some(conn) => call(conn, "RevertLink", &self.ifname, &(link(self.ifindex),)).await,
                None => Ok(()),
            },
            Mechanism::Resolvconf => match resolvconf_path() {
                Some(path) => resolvconf_delete(&path, &self.ifname).await,
                None => Ok(()),
            },
        }
    }
}

impl Drop for SystemDns {
    fn drop(&mut self) {
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
    }
}

fn resolved_text(ifname: &str) -> String {
    format!(
        "systemd-resolved sends ~{} and ~{} on {ifname} to [{}]:53",
        dns::ZONE,
        dns::REVERSE_ZONE,
        dns::RESOLVER
    )
}

fn set(state: &Mutex<String>, text: String) {
    *lock(state) = text;
}

fn lock(state: &Mutex<String>) -> std::sync::MutexGuard<'_, String> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// resolved's link index type on D-Bus.
fn link(ifindex: u32) -> i32 {
    i32::try_from(ifindex).unwrap_or(i32::MAX)
}

/// A system-bus connection on which resolved runs (or can be activated).
async fn resolved_connection() -> Result<zbus::Connection, ResolverError> {
    let conn = tokio::time::timeout(CALL_TIMEOUT, zbus::Connection::system())
        .await
        .map_err(|_| ResolverError::NoResolved("connecting to the system bus timed out".into()))?
        .map_err(|e| ResolverError::NoResolved(e.to_string()))?;
    let bus = zbus::fdo::DBusProxy::new(&conn)
        .await
        .map_err(|e| ResolverError::NoResolved(e.to_string()))?;
    let name = zbus::names::BusName::try_from(RESOLVED_NAME)
        .map_err(|e| ResolverError::NoResolved(e.to_string()))?;
    let owned = tokio::time::timeout(CALL_TIMEOUT, bus.name_has_owner(name))
        .await
        .map_err(|_| ResolverError::NoResolved("NameHasOwner timed out".into()))?
        .map_err(|e| ResolverError::NoResolved(e.to_string()))?;
    if owned {
        Ok(conn)
    } else {
        Err(ResolverError::NoResolved(format!(
            "{RESOLVED_NAME} has no owner"
        )))
    }
}

/// One Manager method call with a timeout.
async fn call<B>(
    conn: &zbus::Connection,
    method: &'static str,
    ifname: &str,
    body: &B,
) -> Result<(), ResolverError>
where
    B: serde::Serialize + zbus::zvariant::DynamicType,
{
    let fut = conn.call_method(
        Some(RESOLVED_NAME),
        RESOLVED_PATH,
        Some(RESOLVED_MANAGER),
        method,
        body,
    );
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Err(_) => Err(ResolverError::Timeout(method)),
        Ok(Err(source)) => Err(ResolverError::Call {
            method,
            ifname: ifname.to_owned(),
            source,
        }),
        Ok(Ok(_)) => Ok(()),
    }
}

/// Whether a failed call means resolved has not seen the link yet.
fn link_unknown(e: &ResolverError) -> bool {
    matches!(e, ResolverError::Call { source: zbus::Error::MethodError(name, _, _), .. }
        if name.as_str() == "org.freedesktop.resolve1.NoSuchLink")
}

/// Sets the link's DNS server, routing domains and protocol switches. Waits up to
/// [`LINK_WAIT`] for resolved to learn about a link that has just been created.
async fn apply_resolved(
    conn: &zbus::Connection,
    ifname: &str,
    ifindex: u32,
) -> Result<(), ResolverError> {
    let deadline = tokio::time::Instant::now() + LINK_WAIT;
    loop {
        match apply_resolved_once(conn, ifname, ifindex).await {
            Err(e) if link_unknown(&e) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => return r,
        }
    }
}

async fn apply_resolved_once(
    conn: &zbus::Connection,
    ifname: &str,
    ifindex: u32,
) -> Result<(), ResolverError> {
    let i = link(ifindex);
    const AF_INET6: i32 = 10;
    let server: (i32, Vec<u8>) = (AF_INET6, dns::RESOLVER.octets().to_vec());
    call(conn, "SetLinkDNS", ifname, &(i, vec![server])).await?;
    let domains = vec![
        (dns::ZONE.to_owned(), true),
        (dns::REVERSE_ZONE.to_owned(), true),
    ];
    call(conn, "SetLinkDomains", ifname, &(i, domains)).await?;
    call(conn, "SetLinkDefaultRoute", ifname, &(i, false)).await?;
    call(conn, "SetLinkLLMNR", ifname, &(i, "no")).await?;
    call(conn, "SetLinkMulticastDNS", ifname, &(i, "no")).await?;
    call(conn, "SetLinkDNSSEC", ifname, &(i, "no")).await?;
    call(conn, "SetLinkDNSOverTLS", ifname, &(i, "no")).await?;
    Ok(())
}

/// Reapplies the link settings each time resolved gets a new owner on the bus (a restart
/// loses them).
async fn watch_resolved(
    conn: zbus::Connection,
    ifname: String,
    ifindex: u32,
    state: Arc<Mutex<String>>,
) {
    let bus = match zbus::fdo::DBusProxy::new(&conn).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch systemd-resolved for restarts");
            return;
        }
    };
    let mut changes = match bus
        .receive_name_owner_changed_with_args(&[(0, RESOLVED_NAME)])
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch systemd-resolved for restarts");
            return;
        }
    };
    while let Some(signal) = changes.next().await {
        let Ok(args) = signal.args() else { continue };
        if args.new_owner().is_none() {
            tracing::info!("systemd-resolved stopped; its link settings come back when it does");
            set(
                &state,
                format!("systemd-resolved not running: {}", manual_hint(&ifname)),
            );
            continue;
        }
        match apply_resolved(&conn, &ifname, ifindex).await {
            Ok(()) => {
                tracing::info!(iface = %ifname, "systemd-resolved restarted; .pilot settings reapplied");
                set(&state, resolved_text(&ifname));
            }
            Err(e) => {
                tracing::warn!(iface = %ifname, error = %e, "systemd-resolved restarted; cannot reapply the .pilot settings");
                set(
                    &state,
                    format!("systemd-resolved: {e}; {}", manual_hint(&ifname)),
                );
            }
        }
    }
}

/// The `resolvconf` program, if installed.
fn resolvconf_path() -> Option<std::path::PathBuf> {
    [
        "/usr/sbin/resolvconf",
        "/sbin/resolvconf",
        "/usr/bin/resolvconf",
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.is_file())
}

/// Runs `resolvconf` with `args` and `input` on stdin.
async fn resolvconf_run(
    path: &std::path::Path,
    action: &'static str,
    ifname: &str,
    input: &[u8],
) -> Result<(), ResolverError> {
    let record = resolvconf_record(ifname);
    let fail = |reason: String| ResolverError::Resolvconf {
        action,
        record: record.clone(),
        reason,
    };
    let mut child = tokio::process::Command::new(path)
        .arg(action)
        .arg(&record)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input)
            .await
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = tokio::time::timeout(CALL_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| fail("timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&out.status) {
        Err(ResolverError::ResolvconfKilled {
            action,
            record,
            signal,
        })
    } else {
        Err(fail(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

async fn resolvconf_add(path: &std::path::Path, ifname: &str) -> Result<(), ResolverError> {
    let record = format!("nameserver {}\n", dns::RESOLVER);
    resolvconf_run(path, "-a", ifname, record.as_bytes()).await
}

/// Deletes the record. Tried twice: a service manager stopping pilotd may signal every
/// process of its group, a `resolvconf` started during the stop among them.
async fn resolvconf_delete(path: &std::path::Path, ifname: &str) -> Result<(), ResolverError> {
    match resolvconf_run(path, "-d", ifname, b"").await {
        Err(ResolverError::ResolvconfKilled { .. }) => {
            tokio::time::sleep(Duration::from_millis(200)).await;
            resolvconf_run(path, "-d", ifname, b"").await
        }
        r => r,
    }
}

/// Deletes a resolvconf record a crashed `pilotd up` left for `ifname`; whether one was there
/// cannot be told, so this reports only that resolvconf is installed and ran.
pub async fn cleanup_resolvconf(ifname: &str) -> Result<bool, ResolverError> {
    match resolvconf_path() {
        Some(path) => resolvconf_delete(&path, ifname).await.map(|()| true),
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!("auto".parse::<DnsMode>().unwrap(), DnsMode::Auto);
        assert_eq!("".parse::<DnsMode>().unwrap(), DnsMode::Auto);
        assert_eq!("resolved".parse::<DnsMode>().unwrap(), DnsMode::Resolved);
        assert_eq!("off".parse::<DnsMode>().unwrap(), DnsMode::Off);
        assert!("resolvconf2".parse::<DnsMode>().is_err());
    }

    #[test]
    fn hint_names_interface_address_and_both_zones() {
        let h = manual_hint("pilot7");
        assert!(
            h.contains("resolvectl dns pilot7 fd06:3fcd:b33d:0:fffe::53"),
            "{h}"
        );
        assert!(h.contains("'~pilot'"), "{h}");
        assert!(h.contains("'~d.3.3.b.d.c.f.3.6.0.d.f.ip6.arpa'"), "{h}");
        assert_eq!(resolvconf_record("pilot7"), "lo.pilot7");
    }

    #[tokio::test]
    async fn off_changes_nothing_and_says_how() {
        let s = SystemDns::configure(DnsMode::Off, "pilot9", 99)
            .await
            .unwrap();
        assert_eq!(s.mechanism(), Mechanism::None);
        assert!(
            s.describe().starts_with("not configured (--dns=off)"),
            "{}",
            s.describe()
        );
        s.revert().await.unwrap();
    }
}
