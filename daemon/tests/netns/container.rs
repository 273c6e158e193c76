//! Booted systemd containers for the tests that need a real init and D-Bus (root): a Debian
//! root file system (a tarball made once by scripts/rootfs.sh) unpacked in a temporary
//! directory, booted by `systemd-nspawn` in one of this process's network namespaces, powered
//! off and deleted on drop.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::Netns;

/// How long a container may take to boot or to power off.
pub const BOOT_WAIT: Duration = Duration::from_secs(60);

/// The path of the repository's root (daemon/ is one level below it).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A Debian bookworm root file system in a temporary directory: the tarball of `set` (named
/// and listed in scripts/rootfs.sh, made once and kept under the target directory), unpacked.
pub fn debian_rootfs(set: &str) -> tempfile::TempDir {
    let out = Command::new(repo().join("scripts/rootfs.sh"))
        .arg(set)
        .stdin(Stdio::null())
        .output()
        .expect("scripts/rootfs.sh");
    assert!(
        out.status.success(),
        "scripts/rootfs.sh {set}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tar = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dir = tempfile::Builder::new()
        .prefix("pilot-rootfs-")
        .tempdir()
        .unwrap();
    let out = Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar -xf {tar}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// A container booted with systemd as PID 1 in a network namespace of the test, with
/// `/dev/net/tun` and CAP_NET_ADMIN.
pub struct Container {
    nspawn: Child,
    /// The container's PID 1, as the host sees it.
    pub leader: u32,
    root: tempfile::TempDir,
    log: PathBuf,
}

impl Container {
    /// Boots `root` in `ns` and waits until systemd reports the system running (or degraded).
    pub fn boot(root: tempfile::TempDir, ns: &Netns) -> Container {
        let log = std::env::temp_dir().join(format!(
            "{}.nspawn.log",
            root.path().file_name().unwrap().to_string_lossy()
        ));
        let nspawn = Command::new("systemd-nspawn")
            .arg("-D")
            .arg(root.path())
            .args([
                "-b",
                "--quiet",
                "--register=no",
                "--keep-unit",
                &format!("--network-namespace-path=/run/netns/{}", ns.name),
                "--bind=/dev/net/tun",
                "--capability=CAP_NET_ADMIN",
            ])
            .stdin(Stdio::null())
            .stdout(File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut c = Container {
            nspawn,
            leader: 0,
            root,
            log,
        };
        let deadline = Instant::now() + BOOT_WAIT;
        loop {
            if let Some(st) = c.nspawn.try_wait().unwrap() {
                panic!("systemd-nspawn exited ({st}):\n{}", c.console());
            }
            if c.leader == 0 {
                // nspawn may show a short-lived helper child first; the leader is the child
                // that runs systemd.
                c.leader = children(c.nspawn.id())
                    .into_iter()
                    .find(|p| {
                        std::fs::read_to_string(format!("/proc/{p}/comm"))
                            .is_ok_and(|comm| matches!(comm.trim(), "systemd" | "init"))
                    })
                    .unwrap_or(0);
            }
            if c.leader != 0 {
                let state = c.enter(&["systemctl", "is-system-running"]);
                let state = String::from_utf8_lossy(&state.stdout);
                if matches!(state.trim(), "running" | "degraded") {
                    return c;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the container did not boot:\n{}",
                c.console()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The container's root file system, as the host sees it.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// What the container printed on its console.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `args` run directly in the container's namespaces (for `systemctl` and `systemd-run`).
    pub fn enter(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a", "--"])
            .args(args)
            .output()
            .unwrap()
    }

    /// `args` run as a transient service of the container's systemd, waited for; stdout and
    /// stderr as the command wrote them.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut v = vec!["systemd-run", "--wait", "--pipe", "--quiet", "--"];
        v.extend_from_slice(args);
        self.enter(&v)
    }

    /// Like [`Container::run`], which must succeed; returns stdout and stderr together.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let text = text(&out);
        assert!(out.status.success(), "{args:?} in the container: {text}");
        text
    }

    /// The journal of `unit` in the container.
    pub fn journal(&self, unit: &str) -> String {
        text(&self.enter(&["journalctl", "--no-pager", "-o", "cat", "-u", unit]))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM asks systemd-nspawn to power the container off cleanly.
        let _ = Command::new("kill")
            .args(["-TERM", &self.nspawn.id().to_string()])
            .status();
        let deadline = Instant::now() + BOOT_WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                let _ = std::fs::remove_file(&self.log);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// The child processes of `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// stdout then stderr of `out`, as text.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
