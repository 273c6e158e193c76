//! The README's promise: right after the main job (`scripts/run.sh` as root), every command of
//! its "Using a node" block works as written, with the `pilotctl` found on PATH.
//!
//! Needs root (the main job brings up pilot0 in two places), so it is ignored by default;
//! `scripts/test.sh` runs it when it runs as root. It builds the release binaries, as the main
//! job does.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the main job may take to build and start.
const START: Duration = Duration::from_secs(30 * 60);
/// How long one README command may take (`bench --size 1G` is the slowest).
const COMMAND: Duration = Duration::from_secs(180);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The command lines of the README's "Using a node" block, comments removed.
fn readme_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let at = readme
        .find("Using a node")
        .expect("a \"Using a node\" block");
    let rest = &readme[at..];
    let start = rest.find("```sh\n").unwrap() + "```sh\n".len();
    let end = start + rest[start..].find("```").unwrap();
    rest[start..end]
        .lines()
        .map(strip_comment)
        .filter(|l| !l.is_empty())
        .collect()
}

/// `line` without a trailing `# comment` (a `#` after blanks, outside quotes).
fn strip_comment(line: &str) -> String {
    let (mut single, mut double) = (false, false);
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev.is_whitespace() => {
                return line[..i].trim().to_owned();
            }
            _ => {}
        }
        prev = c;
    }
    line.trim().to_owned()
}

/// The main job, interrupted (as Ctrl-C does) on drop.
struct MainJob {
    child: Child,
    out: PathBuf,
}

impl MainJob {
    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for MainJob {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `sh -c line`, which must exit 0 within [`COMMAND`]; returns its output.
fn run_line(line: &str, cwd: &Path) -> String {
    let mut child = Command::new("sh")
        .args(["-c", line])
        .current_dir(cwd)
        .env_remove("PILOT_SOCKET")
        .env_remove("PILOT_HOME")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + COMMAND;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut out = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            assert!(st.success(), "`{line}` failed ({st}):\n{out}");
            return out;
        }
        assert!(Instant::now() < deadline, "`{line}` did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits up to 30 s until `seen` contains `what`.
fn wait_for_output(seen: &Mutex<String>, what: &str, purpose: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.lock().unwrap().contains(what) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {purpose}: {}",
            seen.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_block_is_found_and_comments_are_removed() {
    let lines = readme_commands();
    assert!(lines.len() >= 10, "{lines:?}");
    assert!(lines.iter().all(|l| l.contains("pilotctl")), "{lines:?}");
    assert_eq!(
        strip_comment(r#"pilotctl handshake bob "a # b" # ask"#),
        r#"pilotctl handshake bob "a # b""#
    );
    assert_eq!(
        strip_comment("pilotctl subscribe bob '*'"),
        "pilotctl subscribe bob '*'"
    );
}

#[test]
#[ignore = "needs root: the main job brings up pilot0 and a network namespace"]
fn readme_commands_work_after_the_main_job() {
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("run.out");
    let mut cmd = Command::new(repo().join("scripts/run.sh"));
    // cargo test's own CARGO_* variables would make the release build look stale.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR" {
            cmd.env_remove(k);
        }
    }
    let child = cmd
        .env("PILOT_HOME", home.path().join("demo"))
        .env("PILOT_REGISTRY_PORT", "29300")
        .env("PILOT_BEACON_PORT", "29301")
        .env("PILOT_UDP_PORT", "29302")
        .env("PILOT_RUN_SECS", "3600")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(home.path().join("run.err")).unwrap())
        .spawn()
        .unwrap();
    let mut job = MainJob { child, out };
    let deadline = Instant::now() + START;
    while !job.output().contains("Ctrl-C stops everything") {
        if let Some(st) = job.child.try_wait().unwrap() {
            panic!(
                "scripts/run.sh exited ({st}):\n{}\n{}",
                job.output(),
                std::fs::read_to_string(home.path().join("run.err")).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "the main job did not start");
        std::thread::sleep(Duration::from_millis(500));
    }
    let completions = Path::new("/etc/bash_completion.d/pilotctl");
    let had_completions = completions.exists();

    // The subscriber's stdout, read by a thread as it arrives.
    let mut subscriber: Option<(Child, Arc<Mutex<String>>)> = None;
    for line in readme_commands() {
        if line.contains("pilotctl subscribe") {
            // Runs until interrupted. In a process group of its own, so that one signal ends
            // the shell and pilotctl.
            let mut child = Command::new("sh")
                .args(["-c", &line])
                .current_dir(repo())
                .process_group(0)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let seen = Arc::new(Mutex::new(String::new()));
            let (mut stdout, sink) = (child.stdout.take().unwrap(), seen.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stdout.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
            // "Subscribed" means the subscription is live: the README's next command may
            // publish at once.
            wait_for_output(&seen, "Subscribed", "subscribe to say it subscribed");
            subscriber = Some((child, seen));
            continue;
        }
        let text = run_line(&line, &repo());
        if line == "pilotctl info" {
            assert!(text.contains("alice"), "{text}");
        }
        if line.starts_with("pilotctl publish") {
            let (mut sub, seen) = subscriber.take().expect("subscribe comes before publish");
            wait_for_output(&seen, "disk full", "the published event at the subscriber");
            assert!(sub.try_wait().unwrap().is_none(), "subscribe exited early");
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{}", sub.id())])
                .status();
            let _ = sub.wait();
        }
    }
    if !had_completions {
        let _ = std::fs::remove_file(completions);
    }

    // Ctrl-C ends the main job, which removes its namespace and pilot0.
    let ns = format!("pilot-demo-{}", job.child.id());
    let _ = Command::new("kill")
        .args(["-INT", &job.child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while job.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the main job did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&ns),
        "{ns} left behind"
    );
    let pilot0 = Command::new("ip")
        .args(["link", "show", "pilot0"])
        .output()
        .unwrap();
    assert!(!pilot0.status.success(), "pilot0 left behind");
}
