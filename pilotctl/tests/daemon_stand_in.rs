#![allow(clippy::unwrap_used)]
//! pilotctl against stand-ins for the daemon's IPC socket (v1 wire §7): a scripted socket
//! that answers the way a given daemon does, so what pilotctl reports for answers no pilotd
//! of ours gives (a peer whose echo stops early, a v1 daemon without the extension
//! requests) is checked without a network.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use pilotctl::{run_captured, Captured, EXIT_ERROR};
use tunnel::ipc::{self, ExtReply, FrameDecoder, Message};

/// How the stand-in answers.
#[derive(Clone, Copy)]
enum Daemon {
    /// pilotd with the extensions; a dialed peer echoes at most `echo` bytes, then closes.
    Pilotd { echo: u64 },
    /// A v1 daemon: no extension requests (v1 wire §7.2 has no command 0x40), so each one is
    /// answered with v1's Error message.
    V1,
}

/// The connection ID the stand-in gives every Dial.
const CONN: u32 = 7;

/// Serves `path` in a thread, one client at a time, until the test process ends.
fn stand_in(path: &Path, daemon: Daemon) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            serve(sock.unwrap(), daemon);
        }
    });
}

fn reply(sock: &mut UnixStream, m: &Message<'_>) {
    let mut v = Vec::new();
    m.encode(&mut v).unwrap();
    // The client may be gone already (it closes as soon as it has what it needs).
    let _ = sock.write_all(&v);
}

fn serve(mut sock: UnixStream, daemon: Daemon) {
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut echoed = 0u64;
    let mut eof_sent = false;
    loop {
        let n = match sock.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        dec.push(&buf[..n]);
        while let Some(m) = dec.next_message().unwrap() {
            match (m, daemon) {
                (Message::Ext { .. }, Daemon::V1) => {
                    let message = format!("unknown command: 0x{:02x}", ipc::cmd::EXT);
                    reply(
                        &mut sock,
                        &Message::Error {
                            code: ipc::ERROR_CODE,
                            message: &message,
                        },
                    );
                }
                (Message::Ext { .. }, Daemon::Pilotd { .. }) => {
                    let ok = ExtReply::ok(&serde_json::json!({})).to_json();
                    reply(&mut sock, &Message::ExtOk { json: &ok });
                }
                (Message::Dial { .. }, _) => {
                    reply(&mut sock, &Message::DialOk { conn_id: CONN });
                }
                (Message::Send { conn_id, data }, Daemon::Pilotd { echo }) => {
                    if eof_sent {
                        continue;
                    }
                    let take = (echo - echoed).min(data.len() as u64) as usize;
                    if take > 0 {
                        reply(
                            &mut sock,
                            &Message::Recv {
                                conn_id,
                                data: &data[..take],
                            },
                        );
                        echoed += take as u64;
                    }
                    if echoed == echo {
                        // The peer's echo ends here: its FIN reaches us as EOF.
                        reply(&mut sock, &Message::CloseOk { conn_id });
                        eof_sent = true;
                    }
                }
                (Message::Close { conn_id }, _) => {
                    reply(&mut sock, &Message::CloseOk { conn_id });
                    if !eof_sent {
                        reply(&mut sock, &Message::CloseOk { conn_id });
                        eof_sent = true;
                    }
                }
                (Message::Info, _) => {
                    reply(
                        &mut sock,
                        &Message::InfoOk {
                            json: br#"{"node_id":5,"address":"0:0000.0000.0005"}"#,
                        },
                    );
                }
                _ => {}
            }
        }
    }
}

async fn ctl(sock: &Path, args: &[&str]) -> Captured {
    let sock = sock.to_str().unwrap();
    let mut all = vec!["--json", "--socket", sock];
    all.extend_from_slice(args);
    run_captured(&all).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_with_a_short_echo_is_an_error_with_its_own_code() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 1 << 20;

    // A full echo: success, every byte counted.
    let full = dir.path().join("full.sock");
    stand_in(&full, Daemon::Pilotd { echo: size });
    let out = ctl(&full, &["bench", "42", "--size", "1M", "--timeout", "20s"]).await;
    let v = out.json();
    assert_eq!(v["status"], "ok", "{}{}", out.stdout, out.stderr);
    assert_eq!(v["data"]["recv_bytes"], size);
    assert!(v["data"]["total_mbps"].as_f64().unwrap() > 0.0, "{v}");

    // The peer echoes 600,000 bytes, then closes: an error, not a result.
    let short = dir.path().join("short.sock");
    stand_in(&short, Daemon::Pilotd { echo: 600_000 });
    let out = ctl(&short, &["bench", "42", "--size", "1M", "--timeout", "20s"]).await;
    assert_eq!(out.status, EXIT_ERROR, "{}{}", out.stdout, out.stderr);
    let v = out.json();
    assert_eq!(v["status"], "error", "{v}");
    assert_eq!(v["code"], "short_echo", "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("600000 of 1048576 bytes"), "{msg}");

    // In text mode the error goes to stderr, and nothing claims success.
    let out = run_captured(&[
        "--socket",
        short.to_str().unwrap(),
        "bench",
        "42",
        "--size",
        "1M",
    ])
    .await;
    assert_eq!(out.status, EXIT_ERROR);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(out.stderr.contains("short_echo"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_without_the_extensions_is_reported_as_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("v1.sock");
    stand_in(&sock, Daemon::V1);
    for args in [
        &["info"][..],
        &["peers"],
        &["connections"],
        &["lookup", "42"],
    ] {
        let out = ctl(&sock, args).await;
        assert_eq!(out.status, EXIT_ERROR, "{args:?}: {}", out.stdout);
        let v = out.json();
        assert_eq!(v["code"], "unsupported", "{args:?}: {v}");
        let msg = v["message"].as_str().unwrap();
        assert!(msg.contains("not pilotd"), "{args:?}: {msg}");
        assert!(msg.contains("unknown command: 0x40"), "{args:?}: {msg}");
    }
}
