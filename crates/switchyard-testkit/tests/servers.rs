//! The real servers the distributed-mode tests run against: started on a free loopback
//! port, usable, restartable (NATS), and gone after a stop.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use switchyard_testkit::require_binary;
use switchyard_testkit::servers::{NatsServer, POSTGRES_USER, Postgres};

/// Whether a process with `pid` exists (`kill -0`).
fn alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Connects to the NATS server on `port` and does the protocol's handshake: INFO from
/// the server, then CONNECT and PING from us, PONG back.
fn nats_pong(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut info = String::new();
    r.read_line(&mut info).unwrap();
    assert!(info.contains("\"jetstream\":true"), "{info}");
    s.write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n")
        .unwrap();
    let mut pong = String::new();
    r.read_line(&mut pong).unwrap();
    pong.trim() == "PONG"
}

#[test]
fn nats_server_starts_with_jetstream_restarts_and_stops_by_pid() {
    let Some(mut nats) = NatsServer::start().unwrap() else {
        return;
    };
    assert!(nats.url().starts_with("nats://127.0.0.1:"));
    assert!(nats_pong(nats.port()));
    let first = nats.pid();
    nats.restart().unwrap();
    assert_ne!(nats.pid(), first, "a new process");
    assert!(!alive(first), "the old one is gone");
    assert!(nats_pong(nats.port()), "same port after the restart");
    nats.kill().unwrap();
    assert!(!nats_pong(nats.port()), "nothing listens after a kill");
    let pid = nats.pid();
    drop(nats);
    assert!(!alive(pid));
}

#[test]
fn postgres_starts_on_loopback_takes_writes_and_stops_by_pid() {
    let Some(pg) = Postgres::start().unwrap() else {
        return;
    };
    let Some(psql) = require_binary("psql", "`apt-get install postgresql-client`") else {
        return;
    };
    let sql = |q: &str| {
        let o = Command::new(&psql)
            .args(["-h", "127.0.0.1", "-p", &pg.port().to_string()])
            .args(["-U", POSTGRES_USER, "-d", "postgres", "-tAc", q])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{q}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    sql("create table t (id int primary key, v text)");
    sql("insert into t values (1, 'one'), (2, 'two')");
    assert_eq!(sql("select count(*) from t"), "2");
    assert!(pg.url().starts_with("postgres://switchyard@127.0.0.1:"));
    let pid = pg.pid();
    assert!(alive(pid));
    drop(pg);
    assert!(!alive(pid), "the postmaster stopped");
}
