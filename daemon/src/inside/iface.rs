//! The kernel-facing side of `pilotd up`: the TUN interface (`pilot0` by default), its
//! address and its route, kept in place while the daemon runs.
//!
//! Layer: inside (the TUN side), I/O only. This module opens the device and configures the
//! kernel over rtnetlink; it never reads or writes packets. The data path takes
//! [`Iface::device`] and does that.
//!
//! What `up` leaves in the kernel, and keeps there until [`Iface::down`] or the process exits:
//!
//! ```text
//! pilot0: TUN (IFF_TUN | IFF_NO_PI, no IFF_VNET_HDR), MTU from the config, up
//!   inet6 fd06:3fcd:b33d:<net>::<node>/128 nodad noprefixroute  (the node's ULA, the only
//!                                                                address)
//!   fd06:3fcd:b33d::/48 dev pilot0 src <the node's ULA>    (main table)
//!   addr_gen_mode = none                                  (no fe80:: link-local address)
//! ```
//!
//! Invariants:
//! - The node's ULA is the only unicast address on the interface: IPv6 address generation is
//!   switched off (`addr_gen_mode` none) before the link goes up, so the kernel never creates
//!   a link-local address there, and the /48 route pins the ULA as preferred source.
//! - The device is not persistent: when the last descriptor closes (a crash, `kill -9`) the
//!   kernel removes the interface together with its address and routes.
//! - A watcher puts the address and the route back when something else removes them, and
//!   brings the link up again when something takes it down.
//! - Nothing here removes an interface that is not a TUN device, nor a TUN device that a live
//!   process holds open: those are errors ([`IfaceError::NameTaken`], [`IfaceError::InUse`]).

use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{
    InfoData, InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, Nla};
use rtnetlink::{Handle, LinkUnspec, MulticastGroup, RouteMessageBuilder};
use tokio::task::JoinHandle;
use tunnel::ula::{PREFIX_ADDR, PREFIX_LEN};

/// The interface name used unless the configuration names another.
pub const DEFAULT_NAME: &str = "pilot0";

/// The MTU used unless the configuration gives another.
///
/// Packets written to this interface never leave the host as they are: the data path carries
/// their payload inside Pilot streams and datagrams, segmenting as the tunnel needs. A large
/// MTU, as on the loopback interface, lets local TCP hand over big segments and costs fewer
/// reads per byte. The data path reads with buffers of this size.
pub const DEFAULT_MTU: u16 = 65535;

/// The smallest MTU accepted: IPv6 needs 1280 (RFC 8200 §5); below it the kernel disables
/// IPv6 on the interface.
pub const MIN_MTU: u16 = 1280;

/// Longest interface name Linux accepts (IFNAMSIZ less the terminating NUL).
pub const MAX_NAME_LEN: usize = 15;

/// `IFLA_TUN_NUM_QUEUES` (linux/if_link.h): how many descriptors hold the TUN device. The
/// kernel reports it for multi-queue devices only; for the others, carrier tells (the driver
/// turns it on when a descriptor attaches and off when the last one detaches).
const IFLA_TUN_NUM_QUEUES: u16 = 8;
/// `IFLA_TUN_TYPE` (linux/if_link.h): 1 for TUN, 2 for TAP.
const IFLA_TUN_TYPE: u16 = 3;
/// `IFF_TUN` as reported in `IFLA_TUN_TYPE`.
const TUN_TYPE_TUN: u8 = 1;
/// `IN6_ADDR_GEN_MODE_NONE` (linux/if_link.h), as written to `addr_gen_mode`.
const ADDR_GEN_MODE_NONE: &str = "1";

/// TUN offloads. Only [`Offload::None`] exists today; `IFF_VNET_HDR` (GSO/GRO through the TUN,
/// each packet preceded by a virtio-net header) becomes a second variant once the data path
/// reads and writes those headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Offload {
    /// One IP packet per read and write, no virtio-net header.
    #[default]
    None,
}

/// How to create the interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfaceConfig {
    /// Interface name (at most 15 bytes; checked by [`check_name`]).
    pub name: String,
    /// MTU, at least [`MIN_MTU`].
    pub mtu: u16,
    /// TUN offloads.
    pub offload: Offload,
}

impl Default for IfaceConfig {
    fn default() -> Self {
        IfaceConfig {
            name: DEFAULT_NAME.into(),
            mtu: DEFAULT_MTU,
            offload: Offload::None,
        }
    }
}

/// Why the interface could not be set up or removed. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    /// Not root and no CAP_NET_ADMIN.
    #[error("{what}: permission denied; run as root or give pilotd CAP_NET_ADMIN")]
    PermissionDenied {
        /// The step that was refused.
        what: String,
    },
    /// The TUN driver is not there.
    #[error("/dev/net/tun is not available ({source}); load the TUN driver with `modprobe tun`")]
    NoTunDevice {
        /// What opening it returned.
        source: io::Error,
    },
    /// The kernel runs without IPv6.
    #[error(
        "IPv6 is disabled in this kernel (/proc/sys/net/ipv6 does not exist: booted with \
ipv6.disable=1?); pilotd up needs IPv6: remove ipv6.disable=1 from the kernel command line and reboot"
    )]
    Ipv6Unavailable,
    /// The name is not a usable interface name.
    #[error("interface name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// An interface of that name exists and is not a TUN device.
    #[error(
        "interface {name} already exists and is not a Pilot TUN device (kind: {kind}); \
remove it or choose another name with --tun-name"
    )]
    NameTaken {
        /// The name.
        name: String,
        /// What it is (`dummy`, `veth`, `tap`, or `device` when the kernel does not say).
        kind: String,
    },
    /// A TUN device of that name is held open by a live process.
    #[error(
        "TUN interface {name} is in use by another process (is another `pilotd up` running?); \
stop it or choose another name with --tun-name"
    )]
    InUse {
        /// The name.
        name: String,
    },
    /// Creating the TUN device failed for another reason.
    #[error("creating TUN interface {name}: {source}")]
    Tun {
        /// The name.
        name: String,
        /// Why.
        source: io::Error,
    },
    /// A netlink request failed.
    #[error("{what}: {source}")]
    Netlink {
        /// The request.
        what: String,
        /// Why.
        source: rtnetlink::Error,
    },
    /// The netlink socket could not be opened.
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] io::Error),
    /// A sysctl under /proc/sys could not be read or written.
    #[error("{path}: {source}")]
    Sysctl {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// The errno a netlink request failed with, if it was refused by the kernel.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn netlink(what: impl Into<String>, source: rtnetlink::Error) -> IfaceError {
    let what = what.into();
    if errno(&source) == Some(nix::libc::EPERM) {
        return IfaceError::PermissionDenied { what };
    }
    IfaceError::Netlink { what, source }
}

/// Checks that `name` is a name Linux accepts for an interface.
pub fn check_name(name: &str) -> Result<(), IfaceError> {
    let bad = |reason| {
        Err(IfaceError::InvalidName {
            name: name.into(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("not a valid interface name");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || !b.is_ascii_graphic())
    {
        return bad("only printable ASCII without '/', ':' or spaces");
    }
    Ok(())
}

/// Fails with [`IfaceError::Ipv6Unavailable`] when the kernel runs without IPv6.
fn check_ipv6() -> Result<(), IfaceError> {
    if Path::new("/proc/sys/net/ipv6").exists() {
        Ok(())
    } else {
        Err(IfaceError::Ipv6Unavailable)
    }
}

fn sysctl_path(name: &str, key: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv6/conf/{name}/{key}"))
}

fn read_sysctl(path: &Path) -> Result<String, IfaceError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| IfaceError::Sysctl {
            path: path.to_owned(),
            source,
        })
}

fn write_sysctl(path: &Path, value: &str) -> Result<(), IfaceError> {
    std::fs::write(path, value).map_err(|source| {
        if source.kind() == io::ErrorKind::PermissionDenied {
            IfaceError::PermissionDenied {
                what: format!("writing {}", path.display()),
            }
        } else {
            IfaceError::Sysctl {
                path: path.to_owned(),
                source,
            }
        }
    })
}

/// Turns IPv6 on for the interface when the system default left it off, and turns off
/// address generation so that the kernel adds no link-local address.
fn prepare_ipv6(name: &str) -> Result<(), IfaceError> {
    let disable = sysctl_path(name, "disable_ipv6");
    if read_sysctl(&disable)? != "0" {
        write_sysctl(&disable, "0")?;
        tracing::info!(
            iface = name,
            "IPv6 is disabled by default on this host; enabled it on this interface only"
        );
    }
    match write_sysctl(&sysctl_path(name, "addr_gen_mode"), ADDR_GEN_MODE_NONE) {
        Err(e @ IfaceError::PermissionDenied { .. }) => Err(e),
        // Kernels before 4.11 have no such knob; the /48 route's pinned source still keeps a
        // link-local address from ever being the source toward Pilot addresses.
        Err(e) => {
            tracing::warn!(iface = name, error = %e, "cannot turn off link-local address generation");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

/// What a link of the configured name is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LinkKind {
    /// A TUN device; `held` when a process has it open.
    Tun { held: bool },
    /// Anything else: its kind as the kernel names it.
    Other(String),
}

fn link_name(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn nla_bytes(nla: &impl Nla) -> Vec<u8> {
    let mut v = vec![0; nla.value_len()];
    nla.emit_value(&mut v);
    v
}

fn link_kind(m: &LinkMessage) -> LinkKind {
    let infos = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(i) => Some(i),
        _ => None,
    });
    let Some(infos) = infos else {
        return LinkKind::Other("device".into());
    };
    let kind = infos.iter().find_map(|i| match i {
        LinkInfo::Kind(k) => Some(k),
        _ => None,
    });
    if kind != Some(&InfoKind::Tun) {
        return LinkKind::Other(kind.map_or_else(|| "device".into(), |k| k.to_string()));
    }
    let mut tun_type = None;
    let mut queues = None;
    for i in infos {
        if let LinkInfo::Data(InfoData::Tun(attrs)) = i {
            for a in attrs {
                let v = nla_bytes(a);
                match a.kind() {
                    IFLA_TUN_TYPE => tun_type = v.first().copied(),
                    IFLA_TUN_NUM_QUEUES => {
                        queues = <[u8; 4]>::try_from(v.as_slice())
                            .ok()
                            .map(u32::from_ne_bytes)
                    }
                    _ => {}
                }
            }
        }
    }
    let carrier = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Carrier(c) => Some(*c != 0),
        _ => None,
    });
    match tun_type {
        Some(TUN_TYPE_TUN) | None => LinkKind::Tun {
            held: queues.map_or(carrier.unwrap_or(true), |q| q > 0),
        },
        Some(_) => LinkKind::Other("tap".into()),
    }
}

/// Every link, as (index, name, kind).
async fn links(handle: &Handle) -> Result<Vec<(u32, String, LinkKind)>, IfaceError> {
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| netlink("listing interfaces", e))?;
    Ok(msgs
        .iter()
        .map(|m| {
            (
                m.header.index,
                link_name(m).unwrap_or_default().to_owned(),
                link_kind(m),
            )
        })
        .collect())
}

fn in_prefix(ip: &Ipv6Addr) -> bool {
    let p = PREFIX_ADDR.octets();
    ip.octets()[..6] == p[..6]
}

fn route_dst(m: &RouteMessage) -> Option<Ipv6Addr> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(*ip),
        _ => None,
    })
}

fn route_oif(m: &RouteMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// A route of the main table to all or part of the Pilot /48.
fn is_pilot_route(m: &RouteMessage) -> bool {
    m.header.address_family == AddressFamily::Inet6
        && m.header.destination_prefix_length >= PREFIX_LEN
        && route_table(m) == u32::from(RouteHeader::RT_TABLE_MAIN)
        && route_dst(m).is_some_and(|d| in_prefix(&d))
}

fn addr_ip(m: &AddressMessage) -> Option<Ipv6Addr> {
    m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(IpAddr::V6(ip)) => Some(*ip),
        _ => None,
    })
}

/// What [`cleanup`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// A leftover (persistent, unheld) TUN device of the configured name was removed.
    pub interface: bool,
    /// Routes to the Pilot /48 removed.
    pub routes: usize,
    /// Pilot addresses removed from other interfaces.
    pub addresses: usize,
}

impl Cleanup {
    /// Whether anything was removed.
    pub fn is_empty(&self) -> bool {
        *self == Cleanup::default()
    }
}

/// Removes what an earlier `pilotd up` may have left: a TUN device named `name` that no
/// process holds, routes of the main table into `fd06:3fcd:b33d::/48`, and Pilot addresses.
/// Interfaces that are TUN devices held by a live process (another node's interface) are left
/// alone, with their routes and addresses.
///
/// Fails with [`IfaceError::NameTaken`] when `name` is an interface that is not a TUN device,
/// and with [`IfaceError::InUse`] when a live process holds the TUN device `name`.
pub async fn cleanup(name: &str) -> Result<Cleanup, IfaceError> {
    check_name(name)?;
    let (conn, handle, _) = rtnetlink::new_connection().map_err(IfaceError::Socket)?;
    let task = tokio::spawn(conn);
    let r = cleanup_with(&handle, name).await;
    task.abort();
    r
}

async fn cleanup_with(handle: &Handle, name: &str) -> Result<Cleanup, IfaceError> {
    let mut done = Cleanup::default();
    let all = links(handle).await?;
    let mut protected = Vec::new();
    for (index, n, kind) in &all {
        match kind {
            LinkKind::Tun { held: true } if n == name => {
                return Err(IfaceError::InUse { name: name.into() })
            }
            LinkKind::Tun { held: true } => protected.push(*index),
            LinkKind::Tun { held: false } if n == name => {
                match handle.link().del(*index).execute().await {
                    Ok(()) => done.interface = true,
                    Err(e) if errno(&e) == Some(nix::libc::ENODEV) => {}
                    Err(e) => return Err(netlink(format!("removing interface {name}"), e)),
                }
                tracing::info!(iface = name, "removed a leftover TUN interface");
            }
            LinkKind::Other(k) if n == name => {
                return Err(IfaceError::NameTaken {
                    name: name.into(),
                    kind: k.clone(),
                })
            }
            _ => {}
        }
    }
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(|e| netlink("listing routes", e))?;
    for r in routes {
        if !is_pilot_route(&r) || route_oif(&r).is_some_and(|i| protected.contains(&i)) {
            continue;
        }
        let dst = route_dst(&r);
        match handle.route().del(r).execute().await {
            Ok(()) => {
                done.routes += 1;
                tracing::info!(route = ?dst, "removed a leftover route to the Pilot prefix");
            }
            Err(e) if errno(&e) == Some(nix::libc::ESRCH) => {}
            Err(e) => return Err(netlink("removing a route to fd06:3fcd:b33d::/48", e)),
        }
    }
    let addrs: Vec<AddressMessage> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| netlink("listing addresses", e))?;
    for a in addrs {
        let Some(ip) = addr_ip(&a) else { continue };
        if !in_prefix(&ip) || protected.contains(&a.header.index) {
            continue;
        }
        match handle.address().del(a).execute().await {
            Ok(()) => {
                done.addresses += 1;
                tracing::info!(addr = %ip, "removed a leftover Pilot address");
            }
            Err(e) if errno(&e) == Some(nix::libc::EADDRNOTAVAIL) => {}
            Err(e) => return Err(netlink(format!("removing address {ip}"), e)),
        }
    }
    Ok(done)
}

/// The address message for the node's ULA on `index`: /128, no duplicate address detection
/// (the address is ours by construction, and DAD would hold it tentative for a second), and no
/// prefix route of its own (the /48 route covers it).
fn address_message(index: u32, addr: Ipv6Addr) -> AddressMessage {
    let mut m = rtnetlink::AddressMessageBuilder::<Ipv6Addr>::new()
        .index(index)
        .address(addr, 128)
        .build();
    m.header.flags = AddressHeaderFlags::Nodad;
    m.attributes.push(AddressAttribute::Flags(
        AddressFlags::Nodad | AddressFlags::Noprefixroute,
    ));
    m
}

/// `fd06:3fcd:b33d::/48 dev <index> src <addr>` in the main table.
fn route_message(index: u32, addr: Ipv6Addr) -> RouteMessage {
    RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(PREFIX_ADDR, PREFIX_LEN)
        .output_interface(index)
        .pref_source(addr)
        .build()
}

async fn set_up(handle: &Handle, index: u32, name: &str) -> Result<(), IfaceError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| netlink(format!("bringing {name} up"), e))
}

async fn add_address(handle: &Handle, index: u32, addr: Ipv6Addr) -> Result<(), IfaceError> {
    let mut req = handle.address().add(index, IpAddr::V6(addr), 128).replace();
    *req.message_mut() = address_message(index, addr);
    req.execute()
        .await
        .map_err(|e| netlink(format!("adding address {addr}/128"), e))
}

async fn add_route(handle: &Handle, index: u32, addr: Ipv6Addr) -> Result<(), IfaceError> {
    handle
        .route()
        .add(route_message(index, addr))
        .replace()
        .execute()
        .await
        .map_err(|e| netlink("adding route fd06:3fcd:b33d::/48", e))
}

/// The TUN interface of a running `pilotd up`.
///
/// Dropping it stops the watcher; the kernel removes the interface, its address and its
/// routes when the last holder of [`Iface::device`] drops it. [`Iface::down`] removes them at
/// once.
pub struct Iface {
    /// The open device, for the data path.
    pub device: Arc<tun_rs::AsyncDevice>,
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub index: u32,
    /// The node's ULA, the interface's only address.
    pub addr: Ipv6Addr,
    /// MTU.
    pub mtu: u16,
    handle: Handle,
    repairs: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Iface {
    /// Creates the interface, gives it `addr`, routes the Pilot /48 to it with `addr` as
    /// source, brings it up and starts the watcher that keeps address and route in place.
    /// Leftovers of an earlier run are removed first (see [`cleanup`]).
    ///
    /// Must run inside a tokio runtime.
    pub async fn up(config: &IfaceConfig, addr: Ipv6Addr) -> Result<Iface, IfaceError> {
        check_name(&config.name)?;
        check_ipv6()?;
        let (conn, handle, _) = rtnetlink::new_connection().map_err(IfaceError::Socket)?;
        let mut tasks = vec![tokio::spawn(conn)];
        let r = Iface::build(config, addr, handle, &mut tasks).await;
        if r.is_err() {
            for t in tasks {
                t.abort();
            }
        }
        r
    }

    async fn build(
        config: &IfaceConfig,
        addr: Ipv6Addr,
        handle: Handle,
        tasks: &mut Vec<JoinHandle<()>>,
    ) -> Result<Iface, IfaceError> {
        let name = config.name.clone();
        let left = cleanup_with(&handle, &name).await?;
        if !left.is_empty() {
            tracing::info!(
                iface = %name,
                interface = left.interface,
                routes = left.routes,
                addresses = left.addresses,
                "cleaned up after an earlier run"
            );
        }
        let device = open_tun(config, &handle).await?;
        let index = device.if_index().map_err(|source| IfaceError::Tun {
            name: name.clone(),
            source,
        })?;
        // A device dropped on an error path below takes the interface with it.
        prepare_ipv6(&name)?;
        set_up(&handle, index, &name).await?;
        add_address(&handle, index, addr).await?;
        add_route(&handle, index, addr).await?;
        let repairs = Arc::new(AtomicU64::new(0));
        tasks.push(watch(
            handle.clone(),
            name.clone(),
            index,
            addr,
            repairs.clone(),
        )?);
        Ok(Iface {
            device: Arc::new(device),
            name,
            index,
            addr,
            mtu: config.mtu,
            handle,
            repairs,
            tasks: std::mem::take(tasks),
        })
    }

    /// How many times the watcher has put the address or the route back.
    pub fn repairs(&self) -> u64 {
        self.repairs.load(Ordering::Relaxed)
    }

    /// Stops the watcher and removes the route, the address and the interface.
    pub async fn down(mut self) -> Result<(), IfaceError> {
        for t in self.tasks.drain(1..) {
            t.abort();
        }
        let h = &self.handle;
        let r = match h
            .route()
            .del(route_message(self.index, self.addr))
            .execute()
            .await
        {
            Err(e) if errno(&e) != Some(nix::libc::ESRCH) => {
                Err(netlink("removing route fd06:3fcd:b33d::/48", e))
            }
            _ => Ok(()),
        };
        let a = match h
            .address()
            .del(address_message(self.index, self.addr))
            .execute()
            .await
        {
            Err(e) if errno(&e) != Some(nix::libc::EADDRNOTAVAIL) => {
                Err(netlink(format!("removing address {}", self.addr), e))
            }
            _ => Ok(()),
        };
        let l = match h.link().del(self.index).execute().await {
            Err(e) if errno(&e) != Some(nix::libc::ENODEV) => {
                Err(netlink(format!("removing interface {}", self.name), e))
            }
            _ => Ok(()),
        };
        tracing::info!(iface = %self.name, "interface removed");
        r.and(a).and(l)
    }
}

impl std::fmt::Debug for Iface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iface")
            .field("name", &self.name)
            .field("index", &self.index)
            .field("addr", &self.addr)
            .field("mtu", &self.mtu)
            .field("repairs", &self.repairs())
            .finish_non_exhaustive()
    }
}

impl Drop for Iface {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Opens the TUN device, mapping the kernel's refusals to errors a user can act on.
async fn open_tun(
    config: &IfaceConfig,
    handle: &Handle,
) -> Result<tun_rs::AsyncDevice, IfaceError> {
    let Offload::None = config.offload;
    let built = tun_rs::DeviceBuilder::new()
        .name(&config.name)
        .mtu(config.mtu)
        .offload(false)
        .packet_information(false)
        .enable(false)
        .build_async();
    let source = match built {
        Ok(d) => return Ok(d),
        Err(e) => e,
    };
    let name = config.name.clone();
    Err(match source.raw_os_error() {
        Some(nix::libc::EPERM) | Some(nix::libc::EACCES) => IfaceError::PermissionDenied {
            what: format!("creating TUN interface {name}"),
        },
        Some(nix::libc::ENOENT) | Some(nix::libc::ENODEV) | Some(nix::libc::ENXIO) => {
            IfaceError::NoTunDevice { source }
        }
        Some(nix::libc::EBUSY) => IfaceError::InUse { name },
        Some(nix::libc::EINVAL) => {
            // TUNSETIFF refuses a name that belongs to a device of another kind.
            match links(handle)
                .await?
                .into_iter()
                .find(|(_, n, _)| *n == name)
            {
                Some((_, _, LinkKind::Other(kind))) => IfaceError::NameTaken { name, kind },
                _ => IfaceError::Tun { name, source },
            }
        }
        _ => IfaceError::Tun { name, source },
    })
}

/// Starts the task that puts the address and the route back when they are removed.
fn watch(
    handle: Handle,
    name: String,
    index: u32,
    addr: Ipv6Addr,
    repairs: Arc<AtomicU64>,
) -> Result<JoinHandle<()>, IfaceError> {
    let (conn, _, mut events) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Ipv6Route,
    ])
    .map_err(IfaceError::Socket)?;
    Ok(tokio::spawn(async move {
        let conn = tokio::spawn(conn);
        while let Some((msg, _)) = events.next().await {
            let NetlinkMessage {
                payload: NetlinkPayload::InnerMessage(m),
                ..
            } = msg
            else {
                continue;
            };
            let repaired = match m {
                RouteNetlinkMessage::DelAddress(a)
                    if a.header.index == index && addr_ip(&a) == Some(addr) =>
                {
                    // The kernel drops the route's preferred source with the address: pin it
                    // again too.
                    let r = match add_address(&handle, index, addr).await {
                        Ok(()) => add_route(&handle, index, addr).await,
                        Err(e) => Err(e),
                    };
                    Some(("address", r))
                }
                // Taking the link down flushes its IPv6 address and routes: bring it up and
                // put them back.
                RouteNetlinkMessage::NewLink(l)
                    if l.header.index == index && !l.header.flags.contains(LinkFlags::Up) =>
                {
                    let r = match set_up(&handle, index, &name).await {
                        Ok(()) => match add_address(&handle, index, addr).await {
                            Ok(()) => add_route(&handle, index, addr).await,
                            Err(e) => Err(e),
                        },
                        Err(e) => Err(e),
                    };
                    Some(("link", r))
                }
                RouteNetlinkMessage::DelRoute(r)
                    if is_pilot_route(&r)
                        && r.header.destination_prefix_length == PREFIX_LEN
                        && route_oif(&r) == Some(index) =>
                {
                    Some(("route", add_route(&handle, index, addr).await))
                }
                _ => None,
            };
            match repaired {
                Some((what, Ok(()))) => {
                    let n = repairs.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::info!(iface = %name, what, repairs = n, "put back what was removed");
                }
                Some((what, Err(e))) => {
                    tracing::warn!(iface = %name, what, error = %e, "could not put it back")
                }
                None => {}
            }
        }
        conn.abort();
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("pilot0").is_ok());
        assert!(check_name("a-b.c_d").is_ok());
        assert!(check_name("123456789012345").is_ok());
        for bad in [
            "",
            "1234567890123456",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "pilöt",
        ] {
            assert!(
                matches!(check_name(bad), Err(IfaceError::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn pilot_routes_are_recognized() {
        let ula = Ipv6Addr::new(0xfd06, 0x3fcd, 0xb33d, 0, 0, 0, 0, 7);
        assert!(in_prefix(&ula));
        assert!(!in_prefix(&"fd06:3fcd:b33e::1".parse().unwrap_or(ula)));
        let m = route_message(3, ula);
        assert!(is_pilot_route(&m));
        assert_eq!(route_oif(&m), Some(3));
        let other = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix("fd00::".parse().unwrap_or(ula), 8)
            .build();
        assert!(!is_pilot_route(&other));
    }

    #[test]
    fn address_message_has_nodad() {
        let ula = Ipv6Addr::new(0xfd06, 0x3fcd, 0xb33d, 0, 0, 0, 0, 7);
        let m = address_message(5, ula);
        assert_eq!(m.header.prefix_len, 128);
        assert_eq!(m.header.index, 5);
        assert!(m.header.flags.contains(AddressHeaderFlags::Nodad));
        assert_eq!(addr_ip(&m), Some(ula));
    }
}
