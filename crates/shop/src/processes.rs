//! `shop up` in the distributed mode: every service its own OS process (`shop serve
//! <service>`, this same binary), `--replicas` instances of the ones asked for, all
//! sharing the broker and the database of `--bus` / `--store`. The backing services
//! start first on free ports and register there in the registry on NATS; the Order
//! service finds them through it (several per name with replicas: its client balances
//! over them). Ctrl-C or SIGTERM
//! stops every process (SIGTERM by pid, then a wait).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::api::ServiceInfo;
use crate::cli::up::{EXIT_WITH_PARENT, LaunchError, Launched, Shutdown, UpConfig};
use crate::serve::ORDER_NEEDS;

/// How long a service process may take to print its URL table, and to stop.
const PATIENCE: Duration = Duration::from_secs(60);

/// Why the processes could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// This binary's path is unknown (it re-runs itself for every service).
    #[error("cannot find the shop binary to start the services with: {0}")]
    Exe(#[source] std::io::Error),
    /// A service process could not be started.
    #[error("starting `shop serve {service}` failed: {source}")]
    Spawn {
        /// The service.
        service: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A service process exited or went quiet before it served.
    #[error(
        "`shop serve {service}` did not start (no URL table within {PATIENCE:?}); its log is above"
    )]
    NotServing {
        /// The service.
        service: String,
    },
    /// `--replicas` names something that is not a backing service.
    #[error("--replicas {0}: only {ORDER_NEEDS:?} run as several processes")]
    Replicas(String),
}

/// How a service process is started: `<program> <prefix…> serve <service> …`. `shop
/// up` runs this same binary; a program that embeds the shop's commands (see
/// [`crate::cli::main_from`]) passes its own.
#[derive(Debug, Clone)]
pub struct ServiceCommand {
    /// The program.
    pub program: std::path::PathBuf,
    /// Arguments before `serve` (the embedding program's own subcommand).
    pub prefix: Vec<std::ffi::OsString>,
    /// Environment added for every service process (e.g. `RUST_LOG`).
    pub env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    /// Where the lines a service prints after its URL table go, prefixed with its name:
    /// this process's standard output (`shop up`) or its standard error (a program whose
    /// standard output is for results).
    pub echo: Echo,
}

/// See [`ServiceCommand::echo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl ServiceCommand {
    /// This binary (`shop`), its output on standard output.
    pub fn this_binary() -> Result<Self, ProcessError> {
        Ok(ServiceCommand {
            program: std::env::current_exe().map_err(ProcessError::Exe)?,
            prefix: Vec::new(),
            env: Vec::new(),
            echo: Echo::Stdout,
        })
    }
}

/// One started service process.
struct Running {
    name: String,
    child: Child,
}

/// Starts `shop serve <service>` and reads its URL table; its later output goes on to
/// this process's output.
async fn start(
    command: &ServiceCommand,
    c: &UpConfig,
    service: &str,
    listen: &str,
    extra: &[String],
) -> Result<(Running, Vec<ServiceInfo>), ProcessError> {
    let patterns: Vec<&str> = c.patterns.iter().map(|p| p.as_str()).collect();
    // Listening on every interface: the others (all on this machine) call it on loopback.
    let everywhere = c
        .host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified());
    let advertise: &[&str] = if everywhere && service != "order" {
        &["--advertise", "127.0.0.1"]
    } else {
        &[]
    };
    let mut child = Command::new(&command.program)
        .args(&command.prefix)
        .envs(command.env.iter().map(|(k, v)| (k, v)))
        .arg("serve")
        .arg(service)
        .args(["--listen", listen, "--bus", &c.bus, "--store", &c.store])
        .arg("--data-dir")
        .arg(&c.data_dir)
        .arg("--patterns")
        .arg(patterns.join(","))
        .args(extra)
        .args(advertise)
        // Its stdin is a pipe this process never writes to: when this process is gone
        // (even killed), the service sees the end of its input and stops.
        .env(EXIT_WITH_PARENT, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ProcessError::Spawn {
            service: service.to_string(),
            source,
        })?;
    let not_serving = || ProcessError::NotServing {
        service: service.to_string(),
    };
    let stdout = child.stdout.take().ok_or_else(not_serving)?;
    let mut lines = BufReader::new(stdout).lines();
    let mut urls = Vec::new();
    let table = async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("is running;") {
                return true;
            }
            if let [name, protocol, url] = line.split_whitespace().collect::<Vec<_>>()[..]
                && url.starts_with("http://")
            {
                urls.push(ServiceInfo::new(name, url, protocol));
            }
        }
        false
    };
    if !tokio::time::timeout(PATIENCE, table).await.unwrap_or(false) {
        return Err(not_serving());
    }
    let prefix = service.to_string();
    let echo = command.echo;
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            match echo {
                Echo::Stdout => println!("[{prefix}] {line}"),
                Echo::Stderr => eprintln!("[{prefix}] {line}"),
            }
        }
    });
    Ok((
        Running {
            name: service.to_string(),
            child,
        },
        urls,
    ))
}

/// Asks a process to stop (SIGTERM by pid) and waits for it; `Err` if it had to be
/// killed or exited badly.
async fn stop(mut p: Running) -> Result<(), String> {
    // `Child::wait` closes the child's standard input, which the service reads as "the
    // shop is gone": held open until it exited, so the SIGTERM alone stops it (a second
    // signal would make it exit at once, without a clean stop).
    let _stdin = p.child.stdin.take();
    if let Some(pid) = p.child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    match tokio::time::timeout(PATIENCE, p.child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("`shop serve {}` exited {status}", p.name)),
        Ok(Err(e)) => Err(format!("waiting for `shop serve {}`: {e}", p.name)),
        Err(_) => {
            let _ = p.child.kill().await;
            Err(format!(
                "`shop serve {}` did not stop within {PATIENCE:?}; killed",
                p.name
            ))
        }
    }
}

/// Starts every service as its own process of this binary (see the [module
/// docs](self)).
pub async fn up(c: UpConfig, shutdown: Shutdown) -> Result<Launched, LaunchError> {
    up_with(ServiceCommand::this_binary()?, c, shutdown).await
}

/// [`up`] with the service processes started by `command`.
pub async fn up_with(
    command: ServiceCommand,
    c: UpConfig,
    shutdown: Shutdown,
) -> Result<Launched, LaunchError> {
    for (name, _) in &c.replicas {
        if !ORDER_NEEDS.contains(&name.as_str()) {
            return Err(ProcessError::Replicas(name.clone()).into());
        }
    }
    let mut running = Vec::new();
    let mut services = Vec::new();
    let free = format!("{}:0", c.host);
    let started = async {
        for service in ORDER_NEEDS {
            let n = c
                .replicas
                .iter()
                .find(|(name, _)| name == service)
                .map_or(1, |(_, n)| (*n).max(1));
            for replica in 1..=n {
                let (p, urls) = start(&command, &c, service, &free, &[]).await?;
                running.push(p);
                for mut u in urls {
                    if n > 1 {
                        u.name = format!("{}-{replica}", u.name);
                    }
                    services.push(u);
                }
            }
        }
        // The Order service finds them in the registry on NATS, where each registered.
        tracing::info!(services = ?services, "backing services started");
        let rest = c.addr(0)?.to_string();
        let grpc = c.addr(1)?.to_string();
        let extra = ["--grpc-listen".to_string(), grpc];
        let (order, urls) = start(&command, &c, "order", &rest, &extra).await?;
        running.push(order);
        services.splice(0..0, urls);
        Ok::<_, LaunchError>(())
    };
    if let Err(e) = started.await {
        for p in running {
            let _ = stop(p).await;
        }
        return Err(e);
    }
    Ok(Launched {
        services,
        stopped: Box::pin(async move {
            shutdown.await;
            // The Order service first (no new orders), then the others.
            let mut failures = Vec::new();
            for p in running.into_iter().rev() {
                if let Err(e) = stop(p).await {
                    failures.push(e);
                }
            }
            if failures.is_empty() {
                Ok(())
            } else {
                Err(failures.join("; "))
            }
        }),
    })
}
