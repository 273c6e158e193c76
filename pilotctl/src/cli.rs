//! The command line: global flags and every command, with their help texts.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::parse::{parse_duration, parse_size};

/// The list of error codes shown at the end of `pilotctl --help`.
pub const ERROR_CODES_HELP: &str = "\
Output:
  Text for people by default. With --json, exactly one JSON object on stdout:
    {\"status\":\"ok\",\"data\":{...}}
    {\"status\":\"error\",\"code\":\"...\",\"message\":\"...\"}
  Exit status: 0 on success, 1 on an error, 2 on a usage error (bad flags or arguments).

Error codes (stable; match on the code, not on the message):
  daemon_down       pilotd is not running, or its socket cannot be reached
  bad_address       a peer, address, node ID or port does not parse
  unknown_peer      the node is not a tunnel peer, or the connection ID is unknown
  untrusted         the operation needs trust the peer has not granted
  invalid_hostname  the hostname breaks the naming rules or is taken
  not_found         no such node, hostname, network or pending request
  bad_request       an argument is invalid (also every usage error)
  unsupported       the daemon does not know this operation (it is older than pilotctl,
                    or is not pilotd: a v1 daemon has none of the extension requests)
  timeout           the peer, registry or daemon did not answer in time
  refused           the peer or registry refused (connection refused, registry rejection)
  unavailable       the registry or the trust service cannot be reached right now
  bad_reply         the daemon's answer does not decode
  short_echo        bench: the peer echoed back fewer bytes than were sent
  internal          an unexpected local failure

Environment:
  PILOT_SOCKET   the daemon's IPC socket (same as --socket)
  PILOT_HOME     pilotd's state directory; the default socket is <PILOT_HOME>/pilotd.sock
";

const LONG_ABOUT: &str = "\
pilotctl controls a running pilotd over its IPC socket: the node's identity and visibility, \
hostnames, trust, peers and connections, and simple data transfer between agents.

Peers can be named by address (0:0000.0000.002A), decimal node ID (42) or hostname (alice); \
hostnames are resolved through the daemon and the registry.

The socket is --socket, else $PILOT_SOCKET, else pilotd's default: /run/pilot/pilotd.sock \
when running as root, otherwise <PILOT_HOME or ~/.pilot>/pilotd.sock (falling back to \
/run/pilot/pilotd.sock when only that one exists).";

/// `pilotctl` command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "pilotctl",
    version,
    about = "Control a running Pilot daemon (pilotd)",
    long_about = LONG_ABOUT,
    after_long_help = ERROR_CODES_HELP,
    after_help = "Run `pilotctl --help` for the output format and error codes, \
                  `pilotctl <command> --help` for a command's details and an example."
)]
pub struct Cli {
    /// The daemon's IPC socket.
    #[arg(long, global = true, env = "PILOT_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print exactly one JSON object on stdout: {"status":"ok","data":…} or
    /// {"status":"error","code":…,"message":…}.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// A duration argument.
fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

/// A byte-size argument.
fn size(s: &str) -> Result<u64, String> {
    parse_size(s)
}

/// Every command.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Show this node's status: address, hostname, key, peers, connections, traffic.
    #[command(after_help = "Example:\n  pilotctl info\n  pilotctl --json info")]
    Info,

    /// Who is this node or caller: identity, key, trust, tunnel path and connections.
    #[command(
        long_about = "Who is this node or caller: its node ID, address, ULA, hostname, \
                      public key and key fingerprint, visibility, whether this node trusts \
                      it, the tunnel to it, and this node's connections to it.\n\n\
                      Purpose: a service on this host authorizes a caller by its Pilot \
                      identity. With `pilotd up`, a connection from a peer reaches the \
                      host's listeners from the peer's ULA (fd06:3fcd:b33d::/48) and port, \
                      so the service passes its accept()ed peer address, [ULA]:PORT, to \
                      `pilotctl --json whois` and checks the node ID, the key fingerprint or \
                      `trust.trusted`: the caller's ULA is the source address of its \
                      connection, set by pilotd from the Pilot address of the tunnel peer \
                      that opened it. `tunnel.authenticated` tells whether that tunnel's key \
                      is signed by the node's identity key.",
        after_help = "Run with --help for the NODE forms and the fields.\n\nExample:\n  \
                      pilotctl whois alice\n  pilotctl --json whois \
                      '[fd06:3fcd:b33d::2a]:51234'",
        after_long_help = "NODE forms:\n  \
            fd06:3fcd:b33d::2a            a ULA (any network's subnet)\n  \
            [fd06:3fcd:b33d::2a]:51234    a ULA and the caller's port\n  \
            fd06:3fcd:b33d::2a:51234      the same without brackets, when the last group \
            cannot be part of the address (use brackets to be sure)\n  \
            0:0000.0000.002A[:PORT]       a Pilot address\n  \
            42[:PORT]                     a decimal node ID\n  \
            alice[:PORT]                  a hostname, resolved through the registry\n\n\
            Fields (text and --json):\n  \
            node_id, address, ula  the node; the ULA is computed from the address\n  \
            hostname               the registry's hostname (null if none)\n  \
            public_key             the Ed25519 key the registry holds, standard base64\n  \
            key_fingerprint        the first 16 bytes of SHA-256 over the raw 32-byte key, \
            32 lowercase hex digits (shown as sha256:<hex>)\n  \
            visibility             public or private; also tags, networks\n  \
            self                   true when NODE is this node\n  \
            trust                  {trusted, mutual, network, approved_at}: from this \
            node's trust list (`pilotctl trust`)\n  \
            tunnel                 {path: direct|relayed, endpoint, encrypted, \
            authenticated}, or null when the node is not a tunnel peer now\n  \
            port                   the PORT given, or null\n  \
            connections            this node's connections to the node (with PORT: only \
            those whose remote port is PORT): id, local_port, remote_port, state, \
            bytes_sent, bytes_recv; sorted by id\n\n\
            Errors: bad_address when NODE does not parse (or is a ULA outside the Pilot \
            prefix), not_found when the registry knows no such node or hostname.\n\n\
            Example:\n  pilotctl whois alice\n  pilotctl whois fd06:3fcd:b33d::2a\n  \
            pilotctl --json whois '[fd06:3fcd:b33d::2a]:51234'"
    )]
    Whois {
        /// ULA, [ULA]:PORT, address, node ID or hostname (see below).
        node: String,
    },

    /// One line for this node, then one per tunnel peer: ULA, hostname, path, traffic.
    #[command(
        long_about = "One line for this node (ULA, hostname, address, and the virtual NIC \
                      when pilotd runs as `pilotd up`), then one line per tunnel peer, \
                      sorted by node ID: ULA, hostname, address, path (direct ENDPOINT or \
                      relay ENDPOINT), encrypted, open connections, bytes sent and \
                      received.",
        after_help = "Run with --help for where the traffic figures come from.\n\n\
                      Example:\n  pilotctl status\n  pilotctl --json status",
        after_long_help = "Hostnames come from a registry lookup per peer (at most 4 at \
            once, 10 s each); a peer whose lookup fails or that has no hostname shows `-` \
            (null in JSON).\n\n\
            Traffic: the daemon reports no per-peer tunnel counters, so CONNS, SENT and \
            RECEIVED come from its connection list: CONNS counts the connections to the peer \
            not in TIME_WAIT or CLOSED; SENT and RECEIVED sum the stream payload bytes of \
            every connection to the peer the daemon still lists (TIME_WAIT included). \
            Datagrams, connections already forgotten, and tunnel overhead are not counted; \
            `pilotctl info` has the node-wide tunnel totals.\n\n\
            JSON: {\"self\": {node_id, address, ula, hostname, interface}, \"peers\": \
            [{node_id, address, ula, hostname, path, endpoint, encrypted, authenticated, \
            connections, bytes_sent, bytes_recv}, …]}.\n\n\
            Example:\n  pilotctl status\n  pilotctl --json status"
    )]
    Status,

    /// Set this node's hostname in the registry, so others can find it by name.
    #[command(
        name = "set-hostname",
        after_help = "Hostnames are lower-case letters, digits and hyphens, unique in the \
                      registry.\n\nExample:\n  pilotctl set-hostname alice"
    )]
    SetHostname {
        /// The new hostname.
        name: String,
    },

    /// Remove this node's hostname from the registry.
    #[command(
        name = "clear-hostname",
        after_help = "Example:\n  pilotctl clear-hostname"
    )]
    ClearHostname,

    /// Resolve a hostname (or address, or node ID) to a node ID and address.
    #[command(
        visible_alias = "resolve",
        after_help = "Private nodes resolve only for peers that trust them.\n\nExample:\n  \
                      pilotctl find alice\n  pilotctl resolve 42"
    )]
    Find {
        /// Hostname, address or node ID.
        name: String,
    },

    /// Make this node public: anyone may learn its endpoint and connect.
    #[command(name = "set-public", after_help = "Example:\n  pilotctl set-public")]
    SetPublic,

    /// Make this node private: only trusted peers may learn its endpoint.
    #[command(name = "set-private", after_help = "Example:\n  pilotctl set-private")]
    SetPrivate,

    /// Replace this node's tags in the registry (at most 3), or clear them.
    #[command(after_help = "Example:\n  pilotctl tags gpu inference\n  pilotctl tags --clear")]
    Tags {
        /// The tags, at most 3.
        #[arg(required_unless_present = "clear", num_args = 1..=3)]
        tags: Vec<String>,
        /// Remove every tag.
        #[arg(long, conflicts_with = "tags")]
        clear: bool,
    },

    /// Show a node's public registry record: address, key, visibility, hostname, tags.
    #[command(
        after_help = "Example:\n  pilotctl lookup alice\n  pilotctl lookup 0:0000.0000.002A"
    )]
    Lookup {
        /// Address, node ID or hostname.
        peer: String,
    },

    /// List tunnel peers: endpoint, direct or relayed, encrypted, authenticated.
    #[command(after_help = "Example:\n  pilotctl peers\n  pilotctl peers --search 127.0.0.1")]
    Peers {
        /// Only peers whose node ID, address or endpoint contains this text.
        #[arg(long)]
        search: Option<String>,
    },

    /// List connections with their transport statistics (TIME_WAIT ones included).
    #[command(after_help = "Example:\n  pilotctl connections")]
    Connections,

    /// Close a connection by its ID (see `pilotctl connections`).
    #[command(after_help = "Example:\n  pilotctl disconnect 3")]
    Disconnect {
        /// The connection ID.
        conn_id: u32,
    },

    /// Ask a node for trust, with a justification it will see.
    #[command(
        after_help = "The peer sees the request in `pilotctl pending` and answers with \
                      `pilotctl approve` or `pilotctl reject`.\n\nExample:\n  pilotctl \
                      handshake bob \"summarizer agent, needs your search API\""
    )]
    Handshake {
        /// Address, node ID or hostname.
        peer: String,
        /// Why you ask (free text, shown to the peer).
        #[arg(trailing_var_arg = true)]
        justification: Vec<String>,
    },

    /// List trust requests waiting for an answer.
    #[command(after_help = "Example:\n  pilotctl pending")]
    Pending,

    /// Approve a pending trust request.
    #[command(after_help = "Example:\n  pilotctl approve 42")]
    Approve {
        /// Address, node ID or hostname of the requesting node.
        peer: String,
    },

    /// Reject a pending trust request, with an optional reason sent to the peer.
    #[command(after_help = "Example:\n  pilotctl reject 42 \"unknown agent\"")]
    Reject {
        /// Address, node ID or hostname of the requesting node.
        peer: String,
        /// Why (free text, sent to the peer).
        #[arg(trailing_var_arg = true)]
        reason: Vec<String>,
    },

    /// List trusted peers.
    #[command(after_help = "Example:\n  pilotctl trust")]
    Trust,

    /// Withdraw trust from a peer; it is told so.
    #[command(after_help = "Example:\n  pilotctl untrust 42")]
    Untrust {
        /// Address, node ID or hostname.
        peer: String,
    },

    /// Measure the round-trip time to a peer's echo service (port 7), probe by probe.
    #[command(
        after_help = "Each probe uses a fresh connection; the result names the path \
                      (direct or relayed). The command fails only when no probe is \
                      answered.\n\nExample:\n  pilotctl ping bob --count 3"
    )]
    Ping {
        /// Address, node ID or hostname.
        peer: String,
        /// Number of probes.
        #[arg(long, short = 'c', default_value_t = 4)]
        count: u32,
        /// Time to wait for each probe's echo.
        #[arg(long, default_value = "5s", value_parser = duration)]
        timeout: Duration,
    },

    /// Open a stream connection and pipe stdin to it and its data to stdout.
    #[command(
        after_help = "The target is PEER:PORT or PEER with a separate PORT (default 1000). \
                      Stdin is sent until its end, then the connection is half-closed; the \
                      command ends when the peer closes. With --message, that text is sent \
                      instead of stdin. With --json the received data is returned in the \
                      JSON (as UTF-8 text).\n\nExample:\n  echo hello | pilotctl connect \
                      bob:7\n  pilotctl connect 0:0000.0000.002A 1000 --message ping"
    )]
    Connect {
        /// PEER:PORT, or PEER (address, node ID or hostname).
        target: String,
        /// The port, when TARGET has none.
        port: Option<u16>,
        /// Send this text instead of stdin.
        #[arg(long, short = 'm')]
        message: Option<String>,
        /// Give up after this long.
        #[arg(long, value_parser = duration)]
        timeout: Option<Duration>,
    },

    /// Send one message to a port: as a datagram, or over a stream connection.
    /// Send raw bytes to any port of a peer, over a stream or as one datagram.
    #[command(
        after_help = "The message is the MESSAGE argument, else stdin. Over a stream (the \
                      default), the connection is half-closed after the message and the \
                      peer's reply is read until it closes or --timeout passes; --no-wait \
                      skips the reply. --datagram sends one unreliable datagram instead.\n\n\
                      Example:\n  pilotctl send bob:5000 \"hello\"\n  pilotctl \
                      send 42 5000 --datagram \"hello\""
    )]
    Send {
        /// PEER:PORT, or PEER (address, node ID or hostname).
        target: String,
        /// The port when TARGET has none, then the message.
        #[arg(num_args = 0..=2)]
        rest: Vec<String>,
        /// Send a datagram instead of a stream.
        #[arg(long, short = 'd')]
        datagram: bool,
        /// Do not wait for a reply on the stream.
        #[arg(long, conflicts_with = "datagram")]
        no_wait: bool,
        /// How long to wait for the connection and the reply.
        #[arg(long, default_value = "10s", value_parser = duration)]
        timeout: Duration,
    },

    /// Receive messages on a port: datagrams, and stream connections read to their end.
    #[command(
        after_help = "Stops after --count messages or --timeout, whichever comes first; \
                      with neither it runs until interrupted (not allowed with --json). \
                      Reaching the timeout is not an error.\n\nExample:\n  pilotctl listen \
                      5000 --count 1 --timeout 30s"
    )]
    Listen {
        /// The port to bind.
        port: u16,
        /// Stop after this many messages.
        #[arg(long, short = 'c')]
        count: Option<u64>,
        /// Stop after this long.
        #[arg(long, value_parser = duration)]
        timeout: Option<Duration>,
    },

    /// Measure throughput: send bytes to a port (the echo service by default) and time it.
    #[command(
        after_help = "Reports the send rate (until the last byte is handed to the daemon) \
                      and the round-trip rate (until the last byte came back). The port must \
                      echo every byte: an echo that ends short is the error short_echo. The \
                      stream is ended only once the whole echo is counted (a v1 echo stops \
                      echoing at the end of the stream). Rates are in MB/s (10^6 bytes per \
                      second). Sizes take \
                      K, M, G, T suffixes (powers of 1024).\n\nExample:\n  pilotctl bench \
                      bob --size 1G\n  pilotctl bench 42 --size 64M --port 7"
    )]
    Bench {
        /// Address, node ID or hostname.
        peer: String,
        /// Bytes to send.
        #[arg(long, short = 's', default_value = "1M", value_parser = size)]
        size: u64,
        /// The port; 7 is the echo service.
        #[arg(long, short = 'p', default_value_t = 7)]
        port: u16,
        /// Give up after this long.
        #[arg(long, default_value = "120s", value_parser = duration)]
        timeout: Duration,
    },

    /// Remove this node from the registry; the daemon keeps running, unregistered until
    /// `pilotctl register` (stopping the daemon does not deregister).
    #[command(after_help = "Example:\n  pilotctl deregister")]
    Deregister,

    /// Register the node with the registry again (after `deregister`), under its identity,
    /// with its kept hostname, visibility, tags, networks and task advert.
    #[command(after_help = "Example:\n  pilotctl register")]
    Register,

    /// Replace the node's identity key; the registry accepts the new key because the current
    /// one signs the change. The address stays the same.
    #[command(
        name = "rotate-key",
        after_help = "The new key is saved in the identity file (the old one is gone) and every \
                      tunnel is re-keyed under it. Peers look the new key up when its key \
                      exchange reaches them; trust and the node ID are kept. A crash during the \
                      rotation is settled with the registry on the next start.\n\n\
                      Example:\n  pilotctl rotate-key"
    )]
    RotateKey,

    /// Measure connection setup and echo round trips to a peer (port 7), and show the path.
    #[command(
        after_help = "Opens one connection to the peer's echo service (the setup time is \
                      the tunnel and stream handshake), sends --count probes on it, and \
                      reports each round trip and whether the path is direct or \
                      relayed.\n\nExample:\n  pilotctl traceroute bob"
    )]
    Traceroute {
        peer: String,
        #[arg(long, short = 'c', default_value_t = 3)]
        count: u32,
        #[arg(long, default_value = "10s", value_parser = duration)]
        timeout: Duration,
    },

    /// Send a typed message to a peer's inbox (data exchange service, port 1001).
    #[command(
        name = "send-message",
        after_help = "The message is MESSAGE, else stdin (at most 16 MiB). --type is text \
                      (default), json (checked before sending) or binary. The peer stores \
                      it in its inbox (`pilotctl inbox` there) and acknowledges it.\n\n\
                      Example:\n  pilotctl send-message bob \"hello\"\n  pilotctl \
                      send-message bob '{\"job\":42}' --type json\n  pilotctl send-message \
                      bob --type binary < blob.bin"
    )]
    SendMessage {
        peer: String,
        message: Option<String>,
        #[arg(long = "type", short = 't', default_value = "text",
              value_parser = ["text", "json", "binary"])]
        kind: String,
        #[arg(long, default_value = "30s", value_parser = duration)]
        timeout: Duration,
    },

    /// Send a file to a peer (data exchange service, port 1001).
    #[command(
        name = "send-file",
        after_help = "The peer stores it under its received/ directory with a safe name \
                      (never overwriting: a taken name gets -1, -2, ...) and acknowledges it \
                      once complete. Files over 16 MiB stream (a v1 peer cannot take them). \
                      A progress bar shows on a terminal.\n\nExample:\n  pilotctl \
                      send-file bob ./report.pdf\n  pilotctl send-file bob data.bin --name \
                      dataset-v2.bin"
    )]
    SendFile {
        peer: String,
        path: PathBuf,
        /// The name the peer stores it under. [default: the file's own name]
        #[arg(long)]
        name: Option<String>,
        /// Give up after this long. [default: no limit]
        #[arg(long, value_parser = duration)]
        timeout: Option<Duration>,
    },

    /// Messages peers sent to this node (send-message, connect).
    #[command(
        visible_alias = "receive",
        after_help = "Example:\n  pilotctl inbox\n  pilotctl --json inbox\n  \
                      pilotctl inbox --clear"
    )]
    Inbox {
        /// Delete every stored message.
        #[arg(long)]
        clear: bool,
    },

    /// Files peers sent to this node (send-file).
    #[command(after_help = "Example:\n  pilotctl received\n  pilotctl received --clear")]
    Received {
        /// Delete every received file.
        #[arg(long)]
        clear: bool,
    },

    /// Subscribe to a topic on a peer's event stream (port 1002) and print its events.
    #[command(
        after_help = "TOPIC `*` receives every topic. Stops after --count events or \
                      --timeout, whichever comes first; with neither it runs until \
                      interrupted (not allowed with --json). Events you publish yourself \
                      are not sent back to you.\n\n\"Subscribed\" is printed once the \
                      peer has acknowledged the subscription frame at the transport level \
                      (the protocol has no acknowledgement of its own); events published \
                      after that reach you. If the broker closes the stream, subscribe \
                      fails (exit 1, code refused).\n\nExample:\n  pilotctl subscribe bob \
                      alerts\n  pilotctl --json subscribe bob '*' --count 10 --timeout 1m"
    )]
    Subscribe {
        peer: String,
        topic: String,
        #[arg(long, short = 'c')]
        count: Option<u64>,
        #[arg(long, value_parser = duration)]
        timeout: Option<Duration>,
    },

    /// Publish one event to a topic on a peer's event stream (port 1002).
    #[command(
        after_help = "The event is DATA, else stdin (at most 16 MiB). Every subscriber of \
                      the topic and of `*` on that peer receives it.\n\nExample:\n  \
                      pilotctl publish bob alerts \"disk full\"\n  date | pilotctl \
                      publish bob clock"
    )]
    Publish {
        peer: String,
        topic: String,
        data: Option<String>,
    },

    /// Records of the local nameserver (port 53), and queries to a peer's.
    #[command(
        subcommand,
        after_help = "Example:\n  pilotctl names add A web 0:0000.0000.002A\n  pilotctl \
                      names list\n  pilotctl names query bob A web"
    )]
    Names(NamesCmd),

    /// Hand tasks to peers and work on tasks peers hand to this node (port 1003).
    #[command(
        subcommand,
        visible_alias = "task",
        after_help = "A peer accepts tasks only after `pilotctl enable-tasks` there.\n\n\
                      Example:\n  pilotctl tasks submit bob \"summarize today's logs\"\n  \
                      pilotctl tasks list --type received\n  pilotctl tasks accept <id>\n  \
                      pilotctl tasks execute\n  pilotctl tasks results <id> --text \"done\""
    )]
    Tasks(TasksCmd),

    /// Start, stop or check pilotd for this socket.
    #[command(
        subcommand,
        after_help = "Example:\n  pilotctl daemon start\n  pilotctl daemon status\n  \
                      pilotctl daemon stop"
    )]
    Daemon(DaemonCmd),

    /// Print a shell completion script.
    #[command(
        after_help = "Example:\n  pilotctl completions bash > /etc/bash_completion.d/pilotctl\n  \
                      pilotctl completions zsh > \"${fpath[1]}/_pilotctl\"\n  pilotctl \
                      completions fish > ~/.config/fish/completions/pilotctl.fish"
    )]
    Completions { shell: clap_complete::Shell },

    /// Print the man page (roff) and exit.
    #[command(hide = true, after_help = "Example:\n  pilotctl man-page | man -l -")]
    ManPage,

    /// Networks: list, create, join, leave, invite.
    #[command(
        subcommand,
        after_help = "Example:\n  pilotctl networks list\n  pilotctl networks create lab \
                      --join-rule token --token s3cret\n  pilotctl networks join 7 --token \
                      s3cret"
    )]
    Networks(NetworksCmd),

    /// Set the URL that receives this node's events as HTTP POSTs, or clear it.
    #[command(
        after_help = "Example:\n  pilotctl webhook https://example.com/pilot\n  pilotctl \
                      webhook --clear"
    )]
    Webhook {
        /// An http:// or https:// URL.
        #[arg(required_unless_present = "clear")]
        url: Option<String>,
        /// Disable the webhook.
        #[arg(long, conflicts_with = "url")]
        clear: bool,
    },

    /// Advertise in the registry that this node executes tasks.
    #[command(
        name = "enable-tasks",
        after_help = "Example:\n  pilotctl enable-tasks"
    )]
    EnableTasks,

    /// Stop advertising task execution.
    #[command(
        name = "disable-tasks",
        after_help = "Example:\n  pilotctl disable-tasks"
    )]
    DisableTasks,
}

/// `pilotctl networks …`.
#[derive(Debug, Clone, Subcommand)]
pub enum NamesCmd {
    /// Every record of the local nameserver: the operator's (permanent) and those peers
    /// registered (5 minutes unless refreshed).
    #[command(after_help = "Example:\n  pilotctl names list")]
    List,
    /// Add a permanent record: `A <name> <addr>`, `N <name> <net_id>` or
    /// `S <name> <addr> <net_id> <port>`. A record with the same key is replaced.
    #[command(
        after_help = "Example:\n  pilotctl names add A web 0:0000.0000.002A\n  \
                      pilotctl names add N lab 7\n  pilotctl names add S http \
                      0:0000.0000.002A 7 80"
    )]
    Add {
        #[arg(required = true, num_args = 3..=5)]
        record: Vec<String>,
    },
    /// Remove a record, written as for `add`.
    #[command(after_help = "Example:\n  pilotctl names remove A web 0:0000.0000.002A")]
    Remove {
        #[arg(required = true, num_args = 3..=5)]
        record: Vec<String>,
    },
    /// Ask a peer's nameserver: `A <name>`, `N <name>` or `S <net_id> <port>`.
    #[command(
        after_help = "Example:\n  pilotctl names query bob A web\n  pilotctl names \
                      query bob S 7 80"
    )]
    Query {
        peer: String,
        #[arg(required = true, num_args = 2..=3)]
        query: Vec<String>,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum TasksCmd {
    /// Hand a task to a peer; it answers at once whether it accepts it into its queue.
    #[command(
        after_help = "Example:\n  pilotctl tasks submit bob \"resize the images in \
                      bucket 7\""
    )]
    Submit {
        peer: String,
        #[arg(required = true, trailing_var_arg = true)]
        description: Vec<String>,
    },
    /// Tasks received from peers and submitted to them, with their status.
    #[command(
        after_help = "Example:\n  pilotctl tasks list\n  pilotctl tasks list --type \
                      submitted"
    )]
    List {
        #[arg(long = "type", value_parser = ["received", "submitted"])]
        kind: Option<String>,
    },
    /// Received tasks waiting to run (NEW and ACCEPTED), oldest first.
    #[command(after_help = "Example:\n  pilotctl tasks queue")]
    Queue,
    /// Accept a received task; the submitter is told.
    #[command(
        after_help = "Example:\n  pilotctl tasks accept 1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    )]
    Accept { task_id: String },
    /// Decline a received task with a reason; the submitter is told.
    #[command(after_help = "Example:\n  pilotctl tasks decline <id> \"no GPU here\"")]
    Decline {
        task_id: String,
        #[arg(required = true, trailing_var_arg = true)]
        justification: Vec<String>,
    },
    /// Withdraw a task this node submitted.
    #[command(after_help = "Example:\n  pilotctl tasks cancel <id>")]
    Cancel { task_id: String },
    /// Start the oldest accepted task (its status becomes EXECUTING).
    #[command(after_help = "Example:\n  pilotctl tasks execute")]
    Execute,
    /// Send a task's results to its submitter, as text or a file.
    #[command(
        after_help = "A file must be at most 8 MiB with a document, data, image or \
                      model extension (md txt rtf docx pdf pptx csv parquet xlsx xls jpg png \
                      svg gif webp pth pt onnx h5 pb ckpt safetensors bin ...); source code \
                      is refused.\n\nExample:\n  \
                      pilotctl tasks results <id> --text \"42\"\n  pilotctl tasks results \
                      <id> --file out.csv"
    )]
    Results {
        task_id: String,
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        text: Option<String>,
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum DaemonCmd {
    /// Start pilotd in the background on this socket and wait until it answers.
    #[command(
        after_help = "pilotd is looked up in $PILOTD_BIN, next to pilotctl, then in \
                      PATH. Arguments after `--` go to pilotd unchanged (see `pilotd \
                      --help`). Its log goes to --log (default: pilotd.log next to the \
                      socket). Fails if a daemon already answers on the socket.\n\n\
                      Example:\n  pilotctl daemon start\n  pilotctl --socket /tmp/a.sock \
                      daemon start -- --home /tmp/a --registry 10.0.0.1:9000"
    )]
    Start {
        /// pilotd's log file.
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
        /// How long to wait for the daemon to answer.
        #[arg(long, default_value = "15s", value_parser = duration)]
        wait: Duration,
        /// Arguments for pilotd.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Stop the daemon on this socket (SIGTERM, then SIGKILL after --wait).
    #[command(after_help = "Example:\n  pilotctl daemon stop")]
    Stop {
        /// How long to wait before SIGKILL.
        #[arg(long, default_value = "10s", value_parser = duration)]
        wait: Duration,
    },
    /// Whether a daemon answers on this socket, and its node, uptime, peers and connections.
    #[command(
        after_help = "With --check nothing is printed; the exit status is 0 when the \
                      daemon answers and 1 otherwise.\n\nExample:\n  pilotctl daemon \
                      status\n  pilotctl daemon status --check && echo up"
    )]
    Status {
        /// Only set the exit status.
        #[arg(long)]
        check: bool,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum NetworksCmd {
    /// Every network the registry knows.
    #[command(after_help = "Example:\n  pilotctl networks list")]
    List,
    /// Create a network with this node as its first member.
    #[command(after_help = "Example:\n  pilotctl networks create lab --join-rule invite")]
    Create {
        /// Its name.
        name: String,
        /// Who may join.
        #[arg(long, value_parser = ["open", "token", "invite"])]
        join_rule: Option<String>,
        /// The join token of a `token` network.
        #[arg(long)]
        token: Option<String>,
    },
    /// Join a network.
    #[command(after_help = "Example:\n  pilotctl networks join 7 --token s3cret")]
    Join {
        /// The network ID.
        network_id: u16,
        /// The join token of a `token` network.
        #[arg(long)]
        token: Option<String>,
        /// The member that invited this node into an `invite` network.
        #[arg(long)]
        inviter: Option<String>,
    },
    /// Leave a network.
    #[command(after_help = "Example:\n  pilotctl networks leave 7")]
    Leave {
        /// The network ID.
        network_id: u16,
    },
    /// Invite a node into an invite-only network this node belongs to.
    #[command(after_help = "Example:\n  pilotctl networks invite 7 bob")]
    Invite {
        /// The network ID.
        network_id: u16,
        /// Address, node ID or hostname of the invited node.
        peer: String,
    },
}
