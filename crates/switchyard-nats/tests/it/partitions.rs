//! Per-subject ordering across processes (decision 0013): members of one group in two
//! child processes, many subjects, handlers that take a random time. Every handler
//! appends `B <subject> <index> <pid>` when it begins and `E …` when it ends (before its
//! ack) to one file opened for append, so the file's order is the order in which the two
//! processes did things. Per subject, a message may begin only once the one before it
//! ended, and never before an earlier one: checked after the run. No assertion on speed:
//! the waits are upper bounds so that a broken run fails instead of hanging.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard::{Bus, Envelope, SubscribeOptions};
use switchyard_nats::{NatsBus, NatsConfig};
use switchyard_testkit::Child;
use switchyard_testkit::servers::NatsServer;

use crate::runtime;

const MODE_VAR: &str = "SWITCHYARD_PARTITION_CHILD";
const URL_VAR: &str = "SWITCHYARD_PARTITION_URL";
const DIR_VAR: &str = "SWITCHYARD_PARTITION_DIR";
const NAME_VAR: &str = "SWITCHYARD_PARTITION_NAME";

const TOPIC: &str = "orders";
const GROUP: &str = "g";
const NAMESPACE: &str = "parts";
const SUBJECTS: u64 = 24;
const PER_SUBJECT: u64 = 40;
const TOTAL: u64 = SUBJECTS * PER_SUBJECT;
/// Partitions of a topic created by the bus.
const PARTITIONS: u32 = 16;
/// The longest any run may take before it counts as hung.
const RUN_LIMIT: Duration = Duration::from_secs(180);

fn bus(url: &str) -> NatsBus {
    let mut config = NatsConfig::new(url);
    config.namespace = Some(NAMESPACE.into());
    NatsBus::new(config)
}

fn message(subject: u64, i: u64) -> Envelope {
    Envelope::new(
        "order.v1",
        "/it",
        "application/json",
        format!("{{\"i\":{i}}}"),
    )
    .with_subject(format!("s{subject}"))
}

/// The messages of subjects interleaved, each subject's in order, from index `from`.
async fn publish(bus: &NatsBus, from: u64, to: u64) {
    for i in from..to {
        let batch: Vec<_> = (0..SUBJECTS).map(|s| message(s, i)).collect();
        bus.publish_batch(TOPIC, batch).await.unwrap();
    }
}

/// The child: consumes the group, handling up to 8 messages at once with random delays,
/// appending to the log; prints the partitions it owns; closes cleanly when its stop
/// file appears.
#[test]
fn partition_child() {
    let Ok(mode) = std::env::var(MODE_VAR) else {
        return;
    };
    println!();
    let url = std::env::var(URL_VAR).unwrap();
    let dir = PathBuf::from(std::env::var(DIR_VAR).unwrap());
    let name = std::env::var(NAME_VAR).unwrap();
    assert_eq!(mode, "consume");
    let rt = runtime();
    rt.block_on(async move {
        let bus = bus(&url);
        let log = Arc::new(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("log"))
                .unwrap(),
        ));
        let mut sub = bus
            .subscribe(TOPIC, GROUP, SubscribeOptions::default())
            .await
            .unwrap();
        println!("READY");
        let pid = std::process::id();
        let limit = Arc::new(tokio::sync::Semaphore::new(8));
        let mut rng = u64::from(pid) | 1;
        let stop = dir.join(format!("stop-{name}"));
        let stall = dir.join(format!("stall-{name}"));
        let mut last_own = Instant::now();
        loop {
            if stop.exists() {
                break;
            }
            if stall.exists() {
                // A real stall (every thread frozen: handlers, lease renewals,
                // keep-alives), started here so that the log's `STOP` line follows the
                // begin line of every message handed out so far.
                std::fs::remove_file(&stall).unwrap();
                write(&log, &format!("STOP {pid}\n"));
                std::process::Command::new("kill")
                    .args(["-STOP", &pid.to_string()])
                    .status()
                    .unwrap();
                write(&log, &format!("CONT {pid}\n"));
            }
            if last_own.elapsed() >= Duration::from_millis(200) {
                println!("OWN {:?}", bus.owned_partitions(TOPIC, GROUP));
                last_own = Instant::now();
            }
            let batch =
                match tokio::time::timeout(Duration::from_millis(200), sub.next_batch(8)).await {
                    Ok(b) => b.unwrap(),
                    Err(_) => continue,
                };
            for d in batch {
                let permit = limit.clone().acquire_owned().await.unwrap();
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let delay = Duration::from_micros(rng % 4_000);
                let log = log.clone();
                // Begun when the handler gets it (logged here, before it is spawned).
                let subject = d.envelope().subject.clone().unwrap_or_default();
                let v: serde_json::Value = serde_json::from_slice(&d.envelope().data).unwrap();
                let i = v["i"].as_u64().unwrap();
                write(&log, &format!("B {subject} {i} {pid}\n"));
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    write(&log, &format!("E {subject} {i} {pid}\n"));
                    // A stale ack (the message went back meanwhile) is the contract's
                    // business, not this test's.
                    let _ = d.ack().await;
                    drop(permit);
                });
            }
        }
        // Let the running handlers finish, then close: the partitions go back.
        let _ = limit.acquire_many(8).await;
        drop(sub);
        bus.close().await.unwrap();
        println!("CLOSED");
    });
    std::process::exit(0);
}

fn write(log: &Mutex<std::fs::File>, line: &str) {
    let mut f = log.lock().unwrap();
    f.write_all(line.as_bytes()).unwrap();
}

fn spawn(url: &str, dir: &Path, name: &str) -> Child {
    let child = Child::spawn_test_entry(
        "partitions::partition_child",
        &[
            (MODE_VAR, "consume".into()),
            (URL_VAR, url.into()),
            (DIR_VAR, dir.display().to_string()),
            (NAME_VAR, name.into()),
        ],
    )
    .unwrap();
    child
        .wait_for("READY", Duration::from_secs(60))
        .expect("the child should subscribe");
    child
}

/// One log event: a handler began or ended, or a process stalled itself (`STOP`, the
/// line written just before) and ran again (`CONT`).
enum Event {
    Begin { subject: String, i: u64, pid: u32 },
    End { subject: String, i: u64, pid: u32 },
    Stop { pid: u32 },
    Cont,
}

fn events(dir: &Path) -> Vec<Event> {
    let text = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut it = l.split(' ');
            let kind = it.next()?;
            match kind {
                "STOP" => {
                    return Some(Event::Stop {
                        pid: it.next()?.parse().ok()?,
                    });
                }
                "CONT" => return Some(Event::Cont),
                _ => {}
            }
            let subject = it.next()?.to_string();
            let i = it.next()?.parse().ok()?;
            let pid = it.next()?.parse().ok()?;
            Some(match kind {
                "B" => Event::Begin { subject, i, pid },
                _ => Event::End { subject, i, pid },
            })
        })
        .collect()
}

/// Distinct messages whose handler ended.
fn done(dir: &Path) -> usize {
    events(dir)
        .iter()
        .filter_map(|e| match e {
            Event::End { subject, i, .. } => Some((subject.clone(), *i)),
            _ => None,
        })
        .collect::<BTreeSet<_>>()
        .len()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + RUN_LIMIT;
    while !f() {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Per subject: each message begins only after the previous one ended (unless the
/// process handling it was killed, or it was in hand when its process stalled), never
/// ahead of an earlier one, and every message ended. A message begun again at or below
/// the last finished index is a redelivery, allowed only after a kill or a stall. A
/// stalled process may end, late, what it had in hand when it stopped; once it runs again
/// it must not begin anything out of turn (its leases are fenced by time).
fn check(dir: &Path, killed: Option<u32>) {
    struct S {
        last_done: i64,
        open: Option<(u64, u32)>,
    }
    let mut subjects: HashMap<String, S> = HashMap::new();
    // What was in hand when a process stopped: (subject, index, pid).
    let mut stalled: BTreeSet<(String, u64, u32)> = BTreeSet::new();
    let mut after_stop = false;
    for (n, e) in events(dir).iter().enumerate() {
        let (begin, subject, i_u, pid) = match e {
            Event::Stop { pid: stopped } => {
                after_stop = true;
                for (name, s) in &subjects {
                    if let Some((j, pid)) = s.open
                        && pid == *stopped
                    {
                        stalled.insert((name.clone(), j, pid));
                    }
                }
                continue;
            }
            Event::Cont => continue,
            Event::Begin { subject, i, pid } => (true, subject, *i, *pid),
            Event::End { subject, i, pid } => (false, subject, *i, *pid),
        };
        let s = subjects.entry(subject.clone()).or_insert(S {
            last_done: -1,
            open: None,
        });
        let i = i64::try_from(i_u).unwrap();
        if begin {
            if let Some((j, open_pid)) = s.open {
                assert!(
                    Some(open_pid) == killed || stalled.contains(&(subject.clone(), j, open_pid)),
                    "line {n}: {subject} {i} began in pid {pid} while {j} was in hand in pid {open_pid}"
                );
            }
            assert!(
                i <= s.last_done + 1,
                "line {n}: {subject} {i} began before {} had ended",
                s.last_done + 1
            );
            if i <= s.last_done {
                assert!(
                    killed.is_some() || after_stop,
                    "line {n}: {subject} {i} handled again without a kill or a stall"
                );
            }
            s.open = Some((i_u, pid));
        } else if s.open == Some((i_u, pid)) {
            s.last_done = s.last_done.max(i);
            s.open = None;
        } else {
            // Only what a stalled process had in hand may end after another began.
            assert!(
                stalled.remove(&(subject.clone(), i_u, pid)),
                "line {n}: {subject} {i} ended but was not the one in hand"
            );
            s.last_done = s.last_done.max(i);
        }
    }
    assert_eq!(subjects.len() as u64, SUBJECTS, "every subject was handled");
    for (name, s) in &subjects {
        assert_eq!(
            s.last_done,
            i64::try_from(PER_SUBJECT).unwrap() - 1,
            "{name}: every message handled"
        );
    }
}

/// The latest `OWN [..]` line of `child`, parsed (read without waiting beyond `wait`).
fn latest_own(child: &Child, latest: &mut Vec<u32>, wait: Duration) {
    while let Some(line) = child.next_line(wait) {
        if let Some(list) = line.split("OWN [").nth(1) {
            *latest = list
                .trim_end_matches(']')
                .split(',')
                .filter_map(|p| p.trim().parse().ok())
                .collect();
        }
    }
}

enum Ending {
    /// Both run to the end.
    None,
    /// The first child is killed by pid mid-stream.
    Kill,
    /// The first child closes its bus mid-stream.
    Close,
    /// The first child stalls mid-stream (SIGSTOP) until the second has taken every
    /// partition from it (the lease TTL), then runs again.
    Stall,
}

/// Runs two members: both from the start, or the second joining mid-stream; the first
/// ends as `ending` says once a third of the messages are done.
fn run(late_join: bool, ending: Ending) {
    let Some(server) = NatsServer::start().expect("start nats-server") else {
        println!("nats-server not installed: case skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let rt = runtime();
    let publisher = bus(&url);
    rt.block_on(publish(&publisher, 0, PER_SUBJECT / 4));
    let mut a = spawn(&url, dir.path(), "a");
    let mut b = if late_join {
        wait_until("a fifth handled by the first member", || {
            done(dir.path()) as u64 >= TOTAL / 5
        });
        None
    } else {
        Some(spawn(&url, dir.path(), "b"))
    };
    rt.block_on(publish(&publisher, PER_SUBJECT / 4, PER_SUBJECT / 2));
    if b.is_none() {
        b = Some(spawn(&url, dir.path(), "b"));
    }
    rt.block_on(publish(&publisher, PER_SUBJECT / 2, PER_SUBJECT));
    let mut killed = None;
    match ending {
        Ending::None => {}
        Ending::Stall => {
            wait_until("a third handled", || done(dir.path()) as u64 >= TOTAL / 3);
            std::fs::write(dir.path().join("stall-a"), b"").unwrap();
            wait_until("the first member stalled", || {
                events(dir.path())
                    .iter()
                    .any(|e| matches!(e, Event::Stop { .. }))
            });
            let b = b.as_ref().unwrap();
            let mut own_b = Vec::new();
            wait_until("the second member took every partition", || {
                latest_own(b, &mut own_b, Duration::ZERO);
                own_b.len() == PARTITIONS as usize
            });
            a.resume().unwrap();
        }
        Ending::Kill | Ending::Close => {
            wait_until("a third handled", || done(dir.path()) as u64 >= TOTAL / 3);
            if let Ending::Kill = ending {
                killed = Some(a.pid());
                a.kill().unwrap();
            } else {
                std::fs::write(dir.path().join("stop-a"), b"").unwrap();
                a.wait_for("CLOSED", RUN_LIMIT)
                    .expect("the first member should close");
            }
        }
    }
    wait_until("every message handled", || done(dir.path()) as u64 >= TOTAL);
    check(dir.path(), killed);
    let b = b.unwrap();
    if let Ending::None | Ending::Stall = ending {
        // Every partition ends with exactly one owner, and both members have some.
        let (mut own_a, mut own_b) = (Vec::new(), Vec::new());
        wait_until("the partitions split between the members", || {
            latest_own(&a, &mut own_a, Duration::ZERO);
            latest_own(&b, &mut own_b, Duration::ZERO);
            let all: BTreeSet<u32> = own_a.iter().chain(&own_b).copied().collect();
            !own_a.is_empty()
                && !own_b.is_empty()
                && own_a.len() + own_b.len() == PARTITIONS as usize
                && all.len() == PARTITIONS as usize
        });
    } else {
        // The survivor owns every partition.
        let mut own_b = Vec::new();
        wait_until("the survivor owns every partition", || {
            latest_own(&b, &mut own_b, Duration::ZERO);
            own_b.len() == PARTITIONS as usize
        });
    }
    rt.block_on(publisher.close()).unwrap();
}

#[test]
fn two_processes_keep_per_subject_order() {
    run(false, Ending::None);
}

#[test]
fn a_member_killed_mid_stream_loses_nothing_and_order_holds() {
    run(false, Ending::Kill);
}

#[test]
fn a_member_closing_mid_stream_hands_its_partitions_over_in_order() {
    run(false, Ending::Close);
}

#[test]
fn a_member_stalled_past_the_lease_ttl_loses_nothing_and_order_holds() {
    run(false, Ending::Stall);
}

#[test]
fn a_member_joining_mid_stream_gets_partitions_without_breaking_order() {
    run(true, Ending::None);
}
