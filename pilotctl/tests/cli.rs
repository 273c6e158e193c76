#![allow(clippy::unwrap_used)]
//! Argument parsing, help texts and the error envelope, without a daemon.

use std::process::Command as Process;

use clap::{CommandFactory, Parser};
use pilotctl::{
    run_captured, Cli, Command, NetworksCmd, ERROR_CODES, EXIT_ERROR, EXIT_OK, EXIT_USAGE,
};
use serde_json::Value;

const NO_SOCKET: &str = "/nonexistent-pilot-dir/pilotd.sock";

fn parse(args: &[&str]) -> Cli {
    Cli::try_parse_from(std::iter::once("pilotctl").chain(args.iter().copied())).unwrap()
}

#[test]
fn bench_size_takes_binary_suffixes() {
    let cli = parse(&["bench", "bob", "--size", "1G"]);
    match cli.command {
        Command::Bench { size, port, .. } => {
            assert_eq!(size, 1 << 30);
            assert_eq!(port, 7);
        }
        other => panic!("parsed as {other:?}"),
    }
    match parse(&["bench", "42", "-s", "1.5M", "--port", "9000"]).command {
        Command::Bench { size, port, .. } => {
            assert_eq!(size, 3 << 19);
            assert_eq!(port, 9000);
        }
        other => panic!("parsed as {other:?}"),
    }
    assert!(Cli::try_parse_from(["pilotctl", "bench", "bob", "--size", "12Q"]).is_err());
}

#[test]
fn global_flags_go_anywhere() {
    let cli = parse(&["info", "--json", "--socket", "/tmp/x.sock"]);
    assert!(cli.json);
    assert_eq!(
        cli.socket.as_deref(),
        Some(std::path::Path::new("/tmp/x.sock"))
    );
    assert!(matches!(cli.command, Command::Info));
    let cli = parse(&["--json", "ping", "bob", "-c", "2", "--timeout", "500ms"]);
    match cli.command {
        Command::Ping {
            peer,
            count,
            timeout,
        } => {
            assert_eq!(peer, "bob");
            assert_eq!(count, 2);
            assert_eq!(timeout, std::time::Duration::from_millis(500));
        }
        other => panic!("parsed as {other:?}"),
    }
}

#[test]
fn commands_parse() {
    match parse(&["handshake", "bob", "needs", "your", "API"]).command {
        Command::Handshake {
            peer,
            justification,
        } => {
            assert_eq!(peer, "bob");
            assert_eq!(justification.join(" "), "needs your API");
        }
        other => panic!("parsed as {other:?}"),
    }
    assert!(matches!(
        parse(&["resolve", "alice"]).command,
        Command::Find { name } if name == "alice"
    ));
    assert!(matches!(
        parse(&["tags", "--clear"]).command,
        Command::Tags { clear: true, .. }
    ));
    assert!(Cli::try_parse_from(["pilotctl", "tags", "a", "b", "c", "d"]).is_err());
    assert!(Cli::try_parse_from(["pilotctl", "tags"]).is_err());
    assert!(matches!(
        parse(&["networks", "invite", "7", "bob"]).command,
        Command::Networks(NetworksCmd::Invite { network_id: 7, peer }) if peer == "bob"
    ));
    assert!(matches!(
        parse(&["listen", "5000", "--count", "3", "--timeout", "2s"]).command,
        Command::Listen {
            port: 5000,
            count: Some(3),
            ..
        }
    ));
    assert!(matches!(
        parse(&["send", "bob:5000", "hi", "--datagram"]).command,
        Command::Send { datagram: true, ref rest, .. } if rest == &["hi".to_owned()]
    ));
    assert!(Cli::try_parse_from(["pilotctl", "webhook"]).is_err());
    assert!(matches!(
        parse(&["whois", "[fd06:3fcd:b33d::2a]:51234"]).command,
        Command::Whois { ref node } if node == "[fd06:3fcd:b33d::2a]:51234"
    ));
    assert!(Cli::try_parse_from(["pilotctl", "whois"]).is_err());
    assert!(matches!(parse(&["status"]).command, Command::Status));
}

#[tokio::test]
async fn whois_help_states_its_purpose_and_forms() {
    let out = run_captured(&["whois", "--help"]).await;
    assert_eq!(out.status, 0);
    for needle in [
        "authorize",
        "[fd06:3fcd:b33d::2a]:51234",
        "SHA-256",
        "not_found",
    ] {
        assert!(out.stdout.contains(needle), "whois --help lacks {needle}");
    }
    let out = run_captured(&["status", "--help"]).await;
    assert!(out.stdout.contains("per-peer"), "{}", out.stdout);
}

#[tokio::test]
async fn whois_rejects_bad_names_before_the_daemon_is_asked() {
    for bad in ["fd00::1", "[fd06:3fcd:b33d::2a]:99999", "10.0.0.1", "a b"] {
        let out = run_captured(&["--json", "--socket", NO_SOCKET, "whois", bad]).await;
        assert_eq!(out.status, EXIT_ERROR, "{bad}");
        assert_eq!(out.json()["code"], "bad_address", "{bad}");
    }
    let out = run_captured(&[
        "--json",
        "--socket",
        NO_SOCKET,
        "whois",
        "fd06:3fcd:b33d::2a",
    ])
    .await;
    assert_eq!(out.json()["code"], "daemon_down");
}

#[test]
fn every_command_has_help_with_an_example() {
    let cmd = Cli::command();
    let mut seen = 0;
    for sub in cmd.get_subcommands() {
        let about = sub.get_about().map(|s| s.to_string()).unwrap_or_default();
        assert!(!about.is_empty(), "{} has no help", sub.get_name());
        let after = sub
            .get_after_help()
            .map(|s| s.to_string())
            .unwrap_or_default();
        assert!(
            after.contains("Example"),
            "{} has no example",
            sub.get_name()
        );
        seen += 1;
    }
    assert!(seen >= 25, "only {seen} commands");
}

#[tokio::test]
async fn long_help_lists_every_error_code() {
    let out = run_captured(&["--help"]).await;
    assert_eq!(out.status, 0);
    for c in ERROR_CODES {
        assert!(out.stdout.contains(c), "--help does not mention {c}");
    }
    assert!(out.stdout.contains("\"status\":\"ok\""));
}

#[tokio::test]
async fn daemon_down_is_a_json_error() {
    let out = run_captured(&["--json", "--socket", NO_SOCKET, "info"]).await;
    assert_eq!(out.status, EXIT_ERROR);
    let v = out.json();
    assert_eq!(v["status"], "error");
    assert_eq!(v["code"], "daemon_down");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("pilotd is not running"), "{msg}");
    assert!(msg.contains(NO_SOCKET), "{msg}");
    assert_eq!(v.as_object().unwrap().len(), 3, "{v}");
    assert_eq!(out.stdout.lines().count(), 1);
    assert!(out.stderr.is_empty());
}

#[tokio::test]
async fn daemon_down_in_text_mode_goes_to_stderr() {
    let out = run_captured(&["--socket", NO_SOCKET, "peers"]).await;
    assert_eq!(out.status, EXIT_ERROR);
    assert!(out.stdout.is_empty());
    assert!(
        out.stderr.contains("pilotd is not running"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("sudo pilotd"));
}

#[tokio::test]
async fn bad_address_is_reported_before_the_daemon_is_asked() {
    let out = run_captured(&[
        "--json",
        "--socket",
        NO_SOCKET,
        "lookup",
        "0:00zz.0000.0001",
    ])
    .await;
    assert_eq!(out.status, EXIT_ERROR);
    assert_eq!(out.json()["code"], "bad_address");
    let out = run_captured(&["--json", "--socket", NO_SOCKET, "connect", "bob"]).await;
    // The default port applies, so this one reaches the (absent) daemon.
    assert_eq!(out.json()["code"], "daemon_down");
    let out = run_captured(&["--json", "--socket", NO_SOCKET, "send", "bob"]).await;
    assert_eq!(out.json()["code"], "bad_address");
}

#[tokio::test]
async fn usage_errors_exit_2_with_a_json_error() {
    let out = run_captured(&["--json", "ping"]).await;
    assert_eq!(out.status, EXIT_USAGE);
    let v = out.json();
    assert_eq!(v["status"], "error");
    assert_eq!(v["code"], "bad_request");
    assert!(v["message"].as_str().unwrap().contains("<PEER>"), "{v}");
    let out = run_captured(&["no-such-command"]).await;
    assert_eq!(out.status, EXIT_USAGE);
    assert!(out.stdout.is_empty());
    assert!(!out.stderr.is_empty());
}

#[tokio::test]
async fn listen_with_json_needs_an_end() {
    let out = run_captured(&["--json", "--socket", NO_SOCKET, "listen", "5000"]).await;
    assert_eq!(out.status, EXIT_ERROR);
    assert_eq!(out.json()["code"], "bad_request");
}

#[test]
fn binary_reports_daemon_down() {
    let out = Process::new(env!("CARGO_BIN_EXE_pilotctl"))
        .args(["--json", "info"])
        .env("PILOT_SOCKET", NO_SOCKET)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(EXIT_ERROR));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "error");
    assert_eq!(v["code"], "daemon_down");
    assert!(v["message"].as_str().unwrap().contains(NO_SOCKET));
}

#[tokio::test]
async fn completions_are_generated_for_each_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run_captured(&["completions", shell]).await;
        assert_eq!(out.status, EXIT_OK, "{shell}: {}", out.stderr);
        assert!(out.stdout.contains("traceroute"), "{shell}");
    }
    let out = run_captured(&["completions", "tcsh"]).await;
    assert_eq!(out.status, EXIT_USAGE);
}

#[tokio::test]
async fn oversized_stdin_is_refused_not_cut() {
    let big = vec![b'x'; (16 << 20) + 1];
    let out = pilotctl::run_captured_with_stdin(
        &["--json", "--socket", NO_SOCKET, "send", "bob:5000"],
        big,
    )
    .await;
    assert_eq!(out.status, EXIT_ERROR);
    assert_eq!(out.json()["code"], "bad_request", "{}", out.stdout);
}

#[tokio::test]
async fn status_check_prints_nothing() {
    let out = run_captured(&["--socket", NO_SOCKET, "daemon", "status", "--check"]).await;
    assert_eq!(out.status, EXIT_ERROR);
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    let out = run_captured(&["--json", "completions", "bash"]).await;
    assert_eq!(out.json()["code"], "bad_request");
}

/// A reader that closes the pipe early (`pilotctl completions zsh | head`) ends the command
/// quietly, without a panic.
#[test]
fn completions_into_a_closed_pipe_do_not_panic() {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_pilotctl"))
        .args(["completions", "zsh"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}
