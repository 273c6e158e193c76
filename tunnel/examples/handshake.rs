//! Two nodes, in one process, do what two pilot daemons do on their tunnel socket before any
//! stream flows: load or create identities, exchange signed PILA frames, verify them against
//! the registered keys, derive sessions and carry a packet each way as PILS.
//!
//! `cargo run -p tunnel --example handshake [STATE_DIR]` keeps the identities in STATE_DIR
//! (default: a `pilot-handshake-demo` directory under the system temp dir), so a second run
//! shows the same keys.

use std::path::PathBuf;
use std::process::ExitCode;

use rand_core::OsRng;
use tunnel::crypto::{build_auth_key_exchange, verify_auth_key_exchange, Session};
use tunnel::wire::frame::{AuthKeyExchangeRepr, Frame, ENCRYPTED_HEADER_LEN, ENCRYPTED_OVERHEAD};
use tunnel::wire::{Flags, Packet, PacketRepr, Protocol, HEADER_LEN};
use tunnel::{addr::port, ula, Addr, Identity, SocketAddr};
use x25519_dalek::{PublicKey, StaticSecret};

struct Node {
    addr: Addr,
    identity: Identity,
    x25519: StaticSecret,
}

impl Node {
    fn pila(&self) -> Vec<u8> {
        let public = PublicKey::from(&self.x25519).to_bytes();
        build_auth_key_exchange(self.identity.signing_key(), self.addr.node, &public)
            .to_bytes()
            .to_vec()
    }

    /// Verifies the peer's PILA against the key "the registry" holds and derives a session.
    fn accept(&self, pila: &[u8], registered: &Identity) -> Result<Session, String> {
        let Ok(Frame::AuthKeyExchange(view)) = Frame::parse(pila) else {
            return Err("not a PILA frame".into());
        };
        let repr = AuthKeyExchangeRepr::parse(&view);
        verify_auth_key_exchange(&repr, &registered.public_key()).map_err(|e| e.to_string())?;
        Session::new(
            self.addr.node,
            &self.x25519,
            &repr.x25519_public,
            &mut OsRng,
        )
        .map_err(|e| e.to_string())
    }
}

fn run() -> Result<(), String> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("pilot-handshake-demo"));
    let mut nodes = Vec::new();
    for (node, name) in [(1u32, "alice"), (2, "bob")] {
        let path = dir.join(format!("{name}.json"));
        let (identity, created) =
            Identity::load_or_create(&path, &mut OsRng).map_err(|e| e.to_string())?;
        let addr = Addr::new(0, node);
        println!(
            "{name}: {addr}  ula {}  key {}  ({} {})",
            ula::to_ipv6(addr),
            identity.public_key_base64(),
            if created { "created" } else { "loaded" },
            path.display()
        );
        nodes.push(Node {
            addr,
            identity,
            x25519: StaticSecret::random_from_rng(OsRng),
        });
    }
    let (a, b) = (&nodes[0], &nodes[1]);
    let (pila_a, pila_b) = (a.pila(), b.pila());
    println!("PILA frames: {} bytes each", pila_a.len());
    let mut sa = a.accept(&pila_b, &b.identity)?;
    let mut sb = b.accept(&pila_a, &a.identity)?;

    // A datagram from alice to bob's echo port, sealed, then opened by bob.
    let payload = b"hello over pilot";
    let repr = PacketRepr {
        flags: Flags::empty(),
        protocol: Protocol::Datagram,
        src: SocketAddr::new(a.addr, port::EPHEMERAL_START),
        dst: SocketAddr::new(b.addr, port::ECHO),
        seq: 0,
        ack: 0,
        window: 0,
        payload_len: payload.len() as u16,
    };
    let mut buf = vec![0u8; HEADER_LEN + payload.len() + ENCRYPTED_OVERHEAD];
    let n = repr
        .emit_with_payload(&mut buf[ENCRYPTED_HEADER_LEN..], payload)
        .map_err(|e| e.to_string())?;
    let len = sa.seal(&mut buf, n).map_err(|e| e.to_string())?;
    println!("alice -> bob: PILS frame of {len} bytes");
    let inner = sb.open(&mut buf[..len]).map_err(|e| e.to_string())?;
    let p = Packet::new_checked(&*inner).map_err(|e| e.to_string())?;
    let got = PacketRepr::parse(&p).map_err(|e| e.to_string())?;
    println!(
        "bob opened: {} -> {} {:?} {:?}",
        got.src,
        got.dst,
        got.protocol,
        String::from_utf8_lossy(p.payload())
    );
    // A replay of the same frame is refused.
    let mut replay = buf[..len].to_vec();
    match sb.open(&mut replay) {
        Err(e) => println!("replayed frame refused: {e}"),
        Ok(_) => return Err("a replayed frame was accepted".into()),
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
