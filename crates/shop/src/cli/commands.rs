//! The client commands: each resolves its settings, calls the shop through
//! [`ShopClient`], and prints tables (or JSON with `--json`).

use std::path::PathBuf;
use std::time::Duration;

use super::client::{ShopClient, base_url};
use super::table::Table;
use super::up::{ServeConfig, UpConfig};
use super::{
    CheckArgs, CliError, DEFAULT_WAIT, DlqArgs, DlqCommand, FaultArgs, OrderArgs, OrdersArgs,
    Resolved, SagasArgs, ServeArgs, StatusArgs, UpArgs, parse_duration, parse_pattern,
};
use crate::api::ReplayRequest;
use crate::faults::{FaultConfig, FaultStatus};
use crate::model::Item;
use crate::order::{NewOrder, Order, OrderStatus, Pattern, TimelineEntry};

fn client(r: &Resolved) -> Result<ShopClient, CliError> {
    ShopClient::new(&r.url, r.timeout)
}

fn config_error(r: &Resolved, cause: String) -> CliError {
    CliError::Config {
        path: r.config_path.clone().unwrap_or_default(),
        cause,
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| CliError::Usage(e.to_string()))?;
    println!("{s}");
    Ok(())
}

/// `HH:MM:SS.mmm` of an RFC 3339 timestamp.
fn clock(at: &switchyard::Timestamp) -> String {
    let s = at.to_string();
    s.get(11..23).map(str::to_string).unwrap_or(s)
}

/// The timeline of `order` as a table: time, +ms since accepted, service, what, detail.
pub fn timeline(order: &Order) -> Table {
    let start = order.created_at.unix_micros();
    let mut t = Table::new(["TIME", "+MS", "SERVICE", "WHAT", "DETAIL"]);
    for TimelineEntry {
        at,
        service,
        what,
        detail,
    } in &order.history
    {
        let since = at.unix_micros().saturating_sub(start) as f64 / 1000.0;
        t.row([
            clock(at),
            format!("{since:.1}"),
            service.clone(),
            what.clone(),
            detail.clone().unwrap_or_default(),
        ]);
    }
    t
}

/// The order's summary lines and timeline.
pub fn describe(order: &Order) -> String {
    let items: Vec<String> = order
        .items
        .iter()
        .map(|i| format!("{} x{}", i.sku, i.qty))
        .collect();
    let mut out = format!(
        "order     {}\nstatus    {}{}\npattern   {}\ncustomer  {}\nitems     {}\namount    {}.{:02}\n\n",
        order.id,
        order.status,
        order
            .reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default(),
        order.pattern,
        order.customer,
        items.join(", "),
        order.amount_cents / 100,
        order.amount_cents % 100,
    );
    out.push_str(&timeline(order).render());
    out
}

/// The exit status of a shown order: failed → [`CliError::OrderFailed`], still
/// accepted → [`CliError::InFlight`] (if `in_flight_is_error`).
fn outcome(order: &Order, in_flight_is_error: bool) -> Result<(), CliError> {
    match order.status {
        OrderStatus::Failed => Err(CliError::OrderFailed {
            id: order.id.clone(),
            reason: order
                .reason
                .clone()
                .unwrap_or_else(|| "no reason given".into()),
        }),
        OrderStatus::Accepted if in_flight_is_error => Err(CliError::InFlight {
            id: order.id.clone(),
        }),
        _ => Ok(()),
    }
}

/// The request `shop order` sends.
pub fn new_order(r: &Resolved, a: &OrderArgs) -> Result<NewOrder, CliError> {
    let d = &r.file.order;
    let pattern: Pattern = match (a.pattern, &d.pattern) {
        (Some(p), _) => p,
        (None, Some(p)) => {
            parse_pattern(p).map_err(|e| config_error(r, format!("order.pattern: {e}")))?
        }
        (None, None) => {
            return Err(CliError::Usage(
                "--pattern is required (sync, choreography, request-reply, orchestration, hybrid)"
                    .into(),
            ));
        }
    };
    if a.qtys.len() > a.skus.len().max(1) {
        return Err(CliError::Usage(format!(
            "{} --qty for {} --sku; give one --qty per --sku",
            a.qtys.len(),
            a.skus.len().max(1)
        )));
    }
    let skus = if a.skus.is_empty() {
        vec!["sku-001".to_string()]
    } else {
        a.skus.clone()
    };
    let items = skus
        .into_iter()
        .enumerate()
        .map(|(i, sku)| Item::new(sku, a.qtys.get(i).copied().unwrap_or(1)))
        .collect();
    let order_id = a
        .order_id
        .clone()
        .unwrap_or_else(|| format!("o-{}", switchyard::MessageId::new()));
    Ok(NewOrder {
        order_id: Some(order_id),
        customer: a
            .customer
            .clone()
            .or_else(|| d.customer.clone())
            .unwrap_or_else(|| "ada".into()),
        items,
        payment_token: a
            .token
            .clone()
            .or_else(|| d.token.clone())
            .unwrap_or_else(|| "tok_ok".into()),
        pattern,
    })
}

/// `shop order`.
pub async fn order(r: &Resolved, a: OrderArgs) -> Result<(), CliError> {
    let wait = match (a.wait, &r.file.order.wait) {
        (Some(w), _) => w,
        (None, Some(w)) => {
            parse_duration(w).map_err(|e| config_error(r, format!("order.wait: {e}")))?
        }
        (None, None) => DEFAULT_WAIT,
    }
    .min(crate::api::MAX_WAIT);
    let req = new_order(r, &a)?;
    let c = client(r)?;
    let id = req.order_id.clone().unwrap_or_default();
    if !a.json {
        eprintln!(
            "placing order {id} ({}) at {}{}",
            req.pattern,
            c.url(),
            if wait.is_zero() {
                String::new()
            } else {
                format!(
                    ", waiting up to {} for its outcome…",
                    humantime::format_duration(wait)
                )
            }
        );
    }
    let order = c.place(&req, wait).await?;
    if a.json {
        print_json(&order)?;
    } else {
        print!("{}", describe(&order));
    }
    outcome(&order, !wait.is_zero())
}

/// `shop status`.
pub async fn status(r: &Resolved, a: StatusArgs) -> Result<(), CliError> {
    let order = client(r)?
        .order(
            &a.order_id,
            a.wait.unwrap_or(Duration::ZERO).min(crate::api::MAX_WAIT),
        )
        .await?;
    if a.json {
        print_json(&order)
    } else {
        print!("{}", describe(&order));
        Ok(())
    }
}

/// `shop orders`.
pub async fn orders(r: &Resolved, a: OrdersArgs) -> Result<(), CliError> {
    let c = client(r)?;
    let list = c.orders(a.status, a.limit).await?;
    if a.json {
        return print_json(&list);
    }
    let mut t = Table::new([
        "ORDER", "STATUS", "PATTERN", "CUSTOMER", "AMOUNT", "CREATED", "REASON",
    ]);
    for o in &list.orders {
        t.row([
            o.id.clone(),
            o.status.to_string(),
            o.pattern.to_string(),
            o.customer.clone(),
            format!("{}.{:02}", o.amount_cents / 100, o.amount_cents % 100),
            o.created_at.to_string(),
            o.reason.clone().unwrap_or_default(),
        ]);
    }
    if t.is_empty() {
        println!("no orders");
    } else {
        print!("{t}");
    }
    if a.counts {
        let n = c.counts().await?;
        println!(
            "\naccepted {}  completed {}  failed {}",
            n.accepted, n.completed, n.failed
        );
    }
    Ok(())
}

fn print_fault(service: &str, url: &str, s: &FaultStatus) {
    let mut t = Table::new(["SERVICE", "URL", "LATENCY", "ERROR RATE", "DOWN FOR"]);
    t.row([
        service.to_string(),
        url.to_string(),
        format!("{}ms", s.latency_ms),
        format!("{}", s.error_rate),
        format!("{}ms", s.down_remaining_ms),
    ]);
    print!("{t}");
}

/// `shop fault`.
pub async fn fault(r: &Resolved, a: FaultArgs) -> Result<(), CliError> {
    let url = match &a.service_url {
        Some(u) => base_url(u, "--service-url")?,
        None => {
            let shop = client(r)?;
            let list = shop.services().await?;
            match list.services.iter().find(|s| s.name == a.service) {
                Some(s) => s.url.clone(),
                None => {
                    return Err(CliError::UnknownService {
                        url: shop.url().to_string(),
                        service: a.service.clone(),
                        known: list
                            .services
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
            }
        }
    };
    let target = ShopClient::new(&url, r.timeout)?;
    let status = if a.clear {
        target.clear_fault().await?
    } else if a.latency.is_none() && a.error_rate.is_none() && a.down.is_none() {
        target.fault_status().await?
    } else {
        let cfg = FaultConfig {
            latency_ms: a.latency.map(|d| d.as_millis() as u64).unwrap_or(0),
            error_rate: a.error_rate.unwrap_or(0.0),
            down_ms: a.down.map(|d| d.as_millis() as u64).unwrap_or(0),
        };
        cfg.validate()
            .map_err(|p| CliError::Usage(p.detail.unwrap_or(p.title)))?;
        target.set_fault(&cfg).await?
    };
    print_fault(&a.service, &url, &status);
    Ok(())
}

/// `shop sagas`.
pub async fn sagas(r: &Resolved, a: SagasArgs) -> Result<(), CliError> {
    let list = client(r)?.sagas(a.state.as_deref(), a.limit).await?;
    if a.json {
        return print_json(&list);
    }
    let mut t = Table::new(["SAGA", "DEFINITION", "STATE", "STEP", "UPDATED", "ERROR"]);
    for s in &list.sagas {
        t.row([
            s.id.clone(),
            s.saga.clone(),
            s.state.as_str().to_string(),
            format!("{}/{}", s.cursor.min(s.steps.len()), s.steps.len()),
            s.updated_at.to_string(),
            s.error.clone().unwrap_or_default(),
        ]);
    }
    if t.is_empty() {
        println!("no sagas");
    } else {
        print!("{t}");
    }
    Ok(())
}

/// `shop dlq list|replay`.
pub async fn dlq(r: &Resolved, a: DlqArgs) -> Result<(), CliError> {
    let c = client(r)?;
    match a.command {
        DlqCommand::List { topic, limit, json } => {
            let list = c.dead_letters(topic.as_deref(), limit).await?;
            if json {
                return print_json(&list);
            }
            let mut t = Table::new([
                "TOPIC",
                "GROUP",
                "ID",
                "TYPE",
                "SUBJECT",
                "ATTEMPTS",
                "LAST FAILURE",
                "REASON",
            ]);
            for d in &list.dead_letters {
                t.row([
                    d.topic.clone(),
                    d.group.clone(),
                    d.id.clone(),
                    d.event_type.clone(),
                    d.subject.clone().unwrap_or_default(),
                    d.attempts.to_string(),
                    d.last_failure.to_string(),
                    d.reason.clone(),
                ]);
            }
            if t.is_empty() {
                println!("no dead letters");
            } else {
                print!("{t}");
            }
            Ok(())
        }
        DlqCommand::Replay { topic, group, ids } => {
            let out = c
                .replay(&ReplayRequest {
                    topic,
                    group,
                    ids: (!ids.is_empty()).then_some(ids),
                })
                .await?;
            println!("replayed {} message(s) of {}", out.replayed, out.topic);
            Ok(())
        }
    }
}

/// `shop check`.
pub async fn check(r: &Resolved, a: CheckArgs) -> Result<(), CliError> {
    let report = client(r)?.check().await?;
    if a.json {
        print_json(&report)?;
    } else {
        let mut t = Table::new(["CHECK", "OK", "DETAIL"]);
        for c in &report.checks {
            t.row([
                c.name.clone(),
                if c.ok { "ok" } else { "FAILED" }.to_string(),
                c.detail.clone(),
            ]);
        }
        print!("{t}");
    }
    let failed = report.checks.iter().filter(|c| !c.ok).count();
    if report.ok && failed == 0 {
        Ok(())
    } else {
        Err(CliError::CheckFailed(failed.max(1)))
    }
}

fn patterns_of(r: &Resolved, given: &[Pattern]) -> Result<Vec<Pattern>, CliError> {
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    match &r.file.up.patterns {
        Some(list) => list
            .iter()
            .map(|p| parse_pattern(p).map_err(|e| config_error(r, format!("up.patterns: {e}"))))
            .collect(),
        None => Ok(Pattern::ALL.to_vec()),
    }
}

/// The settings of `shop up`.
pub fn up_config(r: &Resolved, a: UpArgs) -> Result<UpConfig, CliError> {
    let f = &r.file.up;
    let config = UpConfig {
        data_dir: a
            .data_dir
            .or_else(|| f.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from("./shop-data")),
        host: a
            .host
            .or_else(|| f.host.clone())
            .unwrap_or_else(|| "127.0.0.1".into()),
        port: a.port.or(f.port).unwrap_or(7000),
        patterns: patterns_of(r, &a.patterns)?,
        bus: a
            .bus
            .or_else(|| f.bus.clone())
            .unwrap_or_else(|| "embedded".into()),
        store: a
            .store
            .or_else(|| f.store.clone())
            .unwrap_or_else(|| "embedded".into()),
        demo: !a.no_demo && f.demo.unwrap_or(true),
        replicas: a.replicas,
    };
    config.addr(6)?;
    Ok(config)
}

/// The settings of `shop serve`.
pub fn serve_config(r: &Resolved, a: ServeArgs) -> Result<ServeConfig, CliError> {
    let f = &r.file.up;
    let listen = match a.listen {
        Some(l) => l,
        None => {
            let host = f.host.clone().unwrap_or_else(|| "127.0.0.1".into());
            format!("{host}:0")
                .parse()
                .map_err(|_| config_error(r, format!("up.host `{host}` is not an IP address")))?
        }
    };
    Ok(ServeConfig {
        service: a.service,
        data_dir: a
            .data_dir
            .or_else(|| f.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from("./shop-data")),
        listen,
        grpc_listen: a.grpc_listen,
        registry: a.registry,
        patterns: patterns_of(r, &a.patterns)?,
        patterns_explicit: !a.patterns.is_empty() || r.file.up.patterns.is_some(),
        bus: a
            .bus
            .or_else(|| f.bus.clone())
            .unwrap_or_else(|| "embedded".into()),
        store: a
            .store
            .or_else(|| f.store.clone())
            .unwrap_or_else(|| "embedded".into()),
        advertise: a.advertise,
    })
}
