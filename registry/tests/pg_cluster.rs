#![allow(clippy::unwrap_used)]
//! A throwaway PostgreSQL cluster for the tests: `initdb` and `pg_ctl` run as user `nobody`
//! (PostgreSQL refuses to run as root; switching users needs root) in a temporary directory,
//! listening on a free port of 127.0.0.1 with trust authentication. [`Cluster`]'s `Drop`
//! stops the server and deletes the directory, also when the test panics.
//!
//! Tests that use it are `#[ignore = "root: ..."]`; when they run without root, or without
//! PostgreSQL's server binaries, they fail with a message naming what is missing.

use std::cell::RefCell;
use std::net::TcpListener;
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use pilot_registry::store::pg::PgStore;

const NOBODY: u32 = 65534;

/// A running cluster.
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    next_db: AtomicU32,
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The directory holding `initdb` and `pg_ctl`: the newest /usr/lib/postgresql/N/bin, else
/// the PATH.
fn server_bin() -> Option<PathBuf> {
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((v, bin))
        })
        .collect();
    versioned.sort();
    if let Some((_, b)) = versioned.pop() {
        return Some(b);
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p).find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a server binary as nobody.
fn as_nobody(bin: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid",
            &NOBODY.to_string(),
            "--regid",
            &NOBODY.to_string(),
            "--clear-groups",
            "--",
        ])
        .arg(bin)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("running {} through setpriv: {e}", bin.display()))
}

fn check(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cluster {
    /// Creates and starts a cluster. Panics, naming what is missing, when not root or when
    /// PostgreSQL's server binaries are not installed.
    pub fn start() -> Cluster {
        assert!(
            is_root(),
            "this test needs root: it runs PostgreSQL's initdb and pg_ctl as user nobody \
             (run it as root, as scripts/test.sh does)"
        );
        let bin = server_bin().expect(
            "PostgreSQL's server binaries (initdb, pg_ctl) are in neither \
             /usr/lib/postgresql/*/bin nor the PATH: install the postgresql package \
             (scripts/setup.sh does)",
        );
        let dir = tempfile::Builder::new()
            .prefix("pilot-pg-")
            .tempdir()
            .unwrap();
        chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
        let data = dir.path().join("data");
        let data_s = data.to_str().unwrap().to_owned();
        let out = as_nobody(
            &bin.join("initdb"),
            &[
                "-D",
                &data_s,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
        );
        check("initdb", &out);
        let mut cluster = Cluster {
            dir,
            bin,
            port: 0,
            next_db: AtomicU32::new(0),
        };
        // A port found free can be taken before the server binds it: try a few.
        let mut last = None;
        for _ in 0..3 {
            let port = free_port();
            let opts = format!(
                "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
                cluster.dir.path().display()
            );
            let log = cluster.dir.path().join("server.log");
            let out = as_nobody(
                &cluster.bin.join("pg_ctl"),
                &[
                    "-D",
                    &data_s,
                    "-l",
                    log.to_str().unwrap(),
                    "-o",
                    &opts,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            );
            if out.status.success() {
                cluster.port = port;
                return cluster;
            }
            last = Some((out, std::fs::read_to_string(&log).unwrap_or_default()));
        }
        let (out, log) = last.unwrap();
        panic!(
            "pg_ctl start failed ({}):\n{}{}\nserver log:\n{log}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name` (when missing) and returns its URL.
    pub fn database(&self, name: &str) -> String {
        let query = format!("SELECT 1 FROM pg_database WHERE datname = '{name}'");
        if self.sql("postgres", &query) != "1" {
            let out = self.client("createdb").arg(name).output().unwrap();
            check("createdb", &out);
        }
        self.url(name)
    }

    /// A new, empty database.
    pub fn fresh_database(&self) -> String {
        let n = self.next_db.fetch_add(1, Ordering::Relaxed);
        self.database(&format!("t{n}"))
    }

    /// Runs one SQL command as the superuser on `db` and returns its unaligned output.
    pub fn sql(&self, db: &str, command: &str) -> String {
        let out = self
            .client("psql")
            .args(["-d", db, "-v", "ON_ERROR_STOP=1", "-tAc", command])
            .output()
            .unwrap();
        check("psql", &out);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A client `tool` of the cluster's installation (psql, createdb), connecting to this
    /// cluster as the superuser.
    fn client(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(tool));
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
        ]);
        cmd
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.port != 0 {
            let data = self.dir.path().join("data");
            let out = as_nobody(
                &self.bin.join("pg_ctl"),
                &[
                    "-D",
                    data.to_str().unwrap_or(""),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
            );
            if !out.status.success() {
                eprintln!(
                    "pg_ctl stop: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        // The TempDir removes the directory (root may remove nobody's files).
    }
}

thread_local! {
    /// The cluster the protocol tests of this thread run on (none: redb).
    static ACTIVE: RefCell<Option<Cluster>> = const { RefCell::new(None) };
}

/// Runs `test` (a `#[tokio::test]` function, which builds its runtime on this thread) with its
/// stores on a new cluster, then stops the cluster, also when `test` panics.
pub fn with_postgresql(test: fn()) {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            ACTIVE.with(|a| a.borrow_mut().take());
        }
    }
    let cluster = Cluster::start();
    ACTIVE.with(|a| *a.borrow_mut() = Some(cluster));
    let _reset = Reset;
    test();
}

/// A store for a protocol test: on the thread's cluster when there is one (a new database
/// for `None`, the same database for the same `path`), else redb (in memory for `None`).
pub fn store(path: Option<&Path>) -> Box<dyn pilot_registry::store::Store> {
    use pilot_registry::store::RedbStore;
    let url = ACTIVE.with(|a| {
        a.borrow().as_ref().map(|c| match path {
            None => c.fresh_database(),
            Some(p) => {
                // One database per path: its name is a hash of the path.
                let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                for b in p.as_os_str().as_encoded_bytes() {
                    h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
                }
                c.database(&format!("p{h:016x}"))
            }
        })
    });
    match (url, path) {
        (Some(u), _) => Box::new(PgStore::connect(&u).unwrap()),
        (None, Some(p)) => Box::new(RedbStore::open(p).unwrap()),
        (None, None) => Box::new(RedbStore::in_memory().unwrap()),
    }
}
