//! # switchyard-testkit
//!
//! Harnesses for tests that use real processes: a child process that is killed by pid
//! (never by name) and reaped on drop, the lost/duplicate/order checker that failure
//! tests assert with, and a peak-memory probe.
//!
//! | item | what |
//! | --- | --- |
//! | [`Child`] | a child process with its stdout lines as a channel; SIGTERM or SIGKILL by pid; killed on drop |
//! | [`Ledger`] | what was acknowledged vs what was observed: lost, duplicated, out of order |
//! | [`peak_rss_kb`] | this process's peak resident memory (VmHWM) |
//! | [`chaos_bus::ChaosBus`] | a `Bus` wrapper injecting duplicate deliveries, redeliveries and delays (seeded) to test your handlers |
//! | [`require_binary`] | finds a server binary, or fails loudly under `CI=true` |
//! | [`servers::NatsServer`], [`servers::Postgres`] | `nats-server -js` and PostgreSQL on a free loopback port, data in a temp dir, stopped by pid |

pub mod chaos_bus;
pub mod servers;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A child process whose stdout is read line by line; killed (SIGKILL, by pid) on drop.
pub struct Child {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl Child {
    /// Starts `command` with stdout piped (stderr inherited, so its logs show in test output).
    pub fn spawn(mut command: Command) -> std::io::Result<Child> {
        command.stdout(Stdio::piped()).stdin(Stdio::null());
        let mut child = command.spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("child has no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Child { child, lines: rx })
    }

    /// Re-runs the current test binary so that only the test named `entry` runs, with
    /// `env` set; that test acts as the child (the self-exec pattern of test harnesses).
    /// A name containing `::` is matched exactly (a full test path), so suites in
    /// different modules of one test binary each reach their own entry.
    pub fn spawn_test_entry(entry: &str, env: &[(&str, String)]) -> std::io::Result<Child> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.args([entry, "--nocapture", "--test-threads=1"]);
        if entry.contains("::") {
            cmd.arg("--exact");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        Child::spawn(cmd)
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line, waiting at most `timeout`; `None` on timeout or end of output.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Waits for a line containing `prefix` (returning what follows it), discarding others.
    /// (Matching inside the line tolerates a test harness's status text before it.)
    pub fn wait_for(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.next_line(left)?;
            if let Some(at) = line.find(prefix) {
                return Some(line[at + prefix.len()..].to_string());
            }
        }
    }

    /// Sends SIGKILL to the child by its pid and reaps it.
    pub fn kill(&mut self) -> std::io::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM to the child by its pid (asking it to stop cleanly); reap it with
    /// [`wait`](Self::wait).
    pub fn terminate(&self) -> std::io::Result<()> {
        self.signal("TERM")
    }

    /// Sends SIGSTOP to the child by its pid: it stalls (its connections stay open, it
    /// answers nothing) until [`resume`](Self::resume).
    pub fn stop(&self) -> std::io::Result<()> {
        self.signal("STOP")
    }

    /// Sends SIGCONT to a child stopped with [`stop`](Self::stop).
    pub fn resume(&self) -> std::io::Result<()> {
        self.signal("CONT")
    }

    /// Sends `signal` (`TERM`, `STOP`, …) to the child by its pid with `kill`.
    fn signal(&self, signal: &str) -> std::io::Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "kill -{signal} {} failed: {status}",
                self.child.id()
            )))
        }
    }

    /// Waits for the child to exit and returns its status.
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
    }

    /// Waits at most `timeout` for the child to exit: its status, or `None` if it still
    /// runs.
    pub fn wait_timeout(
        &mut self,
        timeout: Duration,
    ) -> std::io::Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Remaining stdout lines, until the child closes its output or `timeout` passes.
    pub fn drain(&self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut v = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => v.push(l),
                Err(_) => break,
            }
        }
        v
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Peak resident set size of this process in KiB (Linux `VmHWM`), if known.
pub fn peak_rss_kb() -> Option<u64> {
    proc_status_kb("VmHWM:")
}

/// Current resident set size of this process in KiB (Linux `VmRSS`), if known.
pub fn current_rss_kb() -> Option<u64> {
    proc_status_kb("VmRSS:")
}

fn proc_status_kb(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// What a failure test acknowledged and what it later observed, and the verdict.
///
/// Keys identify messages (e.g. `"p3-1711"`), subjects are their ordering keys and
/// sequence numbers their order within a subject.
#[derive(Debug, Default)]
pub struct Ledger {
    acknowledged: HashMap<String, (String, u64)>,
    observed: HashMap<String, u32>,
    last_seq: BTreeMap<String, u64>,
    out_of_order: Vec<String>,
}

/// The verdict of a [`Ledger`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Acknowledged but never observed.
    pub lost: Vec<String>,
    /// Observed more than once.
    pub duplicated: Vec<String>,
    /// Observed before an earlier message of its subject.
    pub out_of_order: Vec<String>,
    /// How many were acknowledged.
    pub acknowledged: usize,
    /// How many distinct messages were observed.
    pub observed: usize,
}

impl Verdict {
    /// True when nothing was lost, duplicated or reordered.
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty() && self.duplicated.is_empty() && self.out_of_order.is_empty()
    }
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that the system acknowledged message `key` (subject, sequence).
    pub fn acknowledged(&mut self, key: &str, subject: &str, seq: u64) {
        self.acknowledged
            .insert(key.to_string(), (subject.to_string(), seq));
    }

    /// Records that message `key` was observed, in observation order.
    pub fn observed(&mut self, key: &str, subject: &str, seq: u64) {
        let n = self.observed.entry(key.to_string()).or_default();
        *n += 1;
        if *n == 1 {
            let last = self.last_seq.entry(subject.to_string()).or_insert(0);
            if seq != 0 && seq <= *last {
                self.out_of_order.push(key.to_string());
            }
            *last = (*last).max(seq);
        }
    }

    /// The verdict (lists sorted for stable messages).
    pub fn verdict(&self) -> Verdict {
        let mut lost: Vec<_> = self
            .acknowledged
            .keys()
            .filter(|k| !self.observed.contains_key(*k))
            .cloned()
            .collect();
        lost.sort();
        let mut duplicated: Vec<_> = self
            .observed
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, _)| k.clone())
            .collect();
        duplicated.sort();
        Verdict {
            lost,
            duplicated,
            out_of_order: self.out_of_order.clone(),
            acknowledged: self.acknowledged.len(),
            observed: self.observed.len(),
        }
    }
}

/// Finds `name` on the PATH. When missing, says so loudly; under `CI=true` that is a panic
/// (a failure), elsewhere the caller gets `None` and should return early.
pub fn require_binary(name: &str, install_hint: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let msg =
            format!("`{name}` not found on PATH; install it ({install_hint}) to run this test");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg} — under CI=true a missing server binary is a failure");
        }
        eprintln!("WARNING: SKIPPING: {msg}");
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_finds_lost_duplicated_and_reordered() {
        let mut l = Ledger::new();
        l.acknowledged("a1", "a", 1);
        l.acknowledged("a2", "a", 2);
        l.acknowledged("b1", "b", 1);
        l.observed("a2", "a", 2);
        l.observed("a1", "a", 1);
        l.observed("a2", "a", 2);
        let v = l.verdict();
        assert_eq!(v.lost, vec!["b1"]);
        assert_eq!(v.duplicated, vec!["a2"]);
        assert_eq!(v.out_of_order, vec!["a1"]);
        assert!(!v.is_clean());
    }

    #[test]
    fn child_lines_and_kill_by_pid() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hello; echo ready 42; sleep 30"]);
        let mut c = Child::spawn(cmd).unwrap();
        assert_eq!(
            c.wait_for("ready ", Duration::from_secs(5)).as_deref(),
            Some("42")
        );
        assert!(c.pid() > 0);
        c.kill().unwrap();
    }

    #[test]
    fn rss_is_readable() {
        assert!(peak_rss_kb().unwrap() > 0);
    }
}
