//! # Retry with backoff, dead-letter, replay
//!
//! The failure path of an asynchronous consumer, end to end, on the durable embedded bus:
//!
//! 1. A producer publishes `PaymentRequested` events to the topic `payments`. One of them
//!    is a *poison* message (an amount over the payment limit); two can never be read by
//!    this consumer (an event type it does not know, and a malformed payload).
//! 2. The consumer group `payments` decodes each message with `switchyard::codec::decode`.
//!    Good payments are acknowledged. The poison one fails with a *retryable* error, so it
//!    is nacked and redelivered with exponential backoff and jitter (4 attempts, 100 ms,
//!    ×2, ±20 %) until its attempts are exhausted and the bus moves it to `payments.dlq`.
//!    The two unreadable ones fail with a *terminal* error and are dead-lettered at once,
//!    without retries. Only the poison message's subject (its order id) waits; the other
//!    orders go through meanwhile.
//! 3. The dead-letter queue is listed: reason, attempts, first and last failure.
//! 4. The cause is fixed (the limit is raised) and the dead letters that the fix can help
//!    are replayed to the group, where the payment now succeeds. The unreadable two stay
//!    in the DLQ until their producer is fixed.
//!
//! Run with:
//!
//! ```text
//! cargo run --release --example retry_to_dlq               # data in ./data/retry_to_dlq
//! cargo run --release --example retry_to_dlq -- /tmp/dlq   # or in a directory of your choice
//! RUST_LOG=debug cargo run --release --example retry_to_dlq
//! ```
//!
//! The data directory is wiped at start, so every run starts from an empty bus. The
//! narrative goes to stdout, the bus's own logs (through `tracing`, level `info` unless
//! `RUST_LOG` says otherwise) to stderr. It finishes in about a second. Expected output
//! (abridged; times vary with the jitter):
//!
//! ```text
//! 1. publish 7 messages to `payments`
//!    order-1001  payment.requested.v1  12.50 USD
//!    order-1003  payment.requested.v1  2500.00 USD   (poison: over the 1000.00 USD limit)
//!    order-1006  payment.requested.v2  (unknown type)
//!    order-1007  payment.requested.v1  (malformed payload)
//!    ...
//! 2. consume with group `payments` (payment limit 1000.00 USD)
//!    redelivery policy: 4 attempts, backoff 100 ms x2 per attempt, +-20% jitter
//!    order-1001  attempt 1  +0 ms                 ok: charged 12.50 USD
//!    order-1003  attempt 1  +0 ms                 retryable: amount 2500.00 USD is over the limit of 1000.00 USD -> nack
//!    order-1006  attempt 1  +0 ms                 terminal: unknown event type `payment.requested.v2` (...) -> dead_letter
//!    order-1007  attempt 1  +0 ms                 terminal: malformed payload for `payment.requested.v1`: (...) -> dead_letter
//!    order-1003  attempt 2  +118 ms (waited 118)  retryable: ... -> nack
//!    order-1003  attempt 3  +306 ms (waited 187)  retryable: ... -> nack
//!    order-1003  attempt 4  +748 ms (waited 442)  retryable: ... -> nack: attempts exhausted, to payments.dlq
//! 3. dead-letter queue `payments.dlq`: 3 entries
//!    order-1006  payment.requested.v2  group payments  attempts 1  failed at 15:35:28.586
//!                reason: unknown event type `payment.requested.v2` (...)
//!    order-1003  payment.requested.v1  group payments  attempts 4  failed first 15:35:28.586, last 15:35:29.335 (748 ms later)
//!                reason: amount 2500.00 USD is over the limit of 1000.00 USD
//!    ...
//! 4. fix the cause: raise the payment limit to 5000.00 USD, replay for group `payments`
//!    replayed 1 dead letter (order-1003)
//!    order-1003  attempt 1  +0 ms (replayed)      ok: charged 2500.00 USD
//! 5. dead-letter queue `payments.dlq`: 2 entries
//!    ...
//! done: 5 payments charged; 2 messages stay in the DLQ until their producer is fixed
//! ```

use std::collections::HashMap;
use std::error::Error;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchyard::bus::{REPLAY_GROUP_EXTENSION, dlq_topic};
use switchyard::codec::{self, Event};
use switchyard::envelope::JSON_CONTENT_TYPE;
use switchyard::{
    Bus, DeadLetter, Envelope, MessageId, RedeliveryPolicy, ReplayFilter, SubscribeOptions,
    Subscription, Timestamp,
};
use switchyard_embedded::EmbeddedBus;
use tracing_subscriber::EnvFilter;

type BoxError = Box<dyn Error>;

const TOPIC: &str = "payments";
const GROUP: &str = "payments";
const SOURCE: &str = "/examples/checkout";
const DEFAULT_DATA_DIR: &str = "./data/retry_to_dlq";
/// Longest wait for the next delivery before the example gives up (it never should).
const STALL: Duration = Duration::from_secs(5);

/// A payment was requested for an order: the typed event this consumer handles.
#[derive(Debug, Serialize, Deserialize)]
struct PaymentRequested {
    order_id: String,
    amount_cents: u64,
}

impl Event for PaymentRequested {
    const TYPE: &'static str = "payment.requested.v1";

    /// Payments of one order are handled in order; other orders don't wait for it.
    fn subject(&self) -> Option<String> {
        Some(self.order_id.clone())
    }
}

/// Why handling failed. The kind, not the message, decides what happens next.
enum Failure {
    /// Might succeed later: nack, so the bus redelivers with backoff until attempts run out.
    Retryable(String),
    /// Will never succeed as it is (undecodable): dead-letter now, no retries.
    Terminal(String),
}

/// The consumer's business logic: charge a payment if it is within the limit.
struct PaymentHandler {
    limit_cents: u64,
}

impl PaymentHandler {
    fn handle(&self, envelope: &Envelope) -> Result<String, Failure> {
        // An unknown type or a malformed payload is a `DecodeError`: never worth a retry.
        let payment: PaymentRequested =
            codec::decode(envelope).map_err(|e| Failure::Terminal(e.to_string()))?;
        if payment.amount_cents > self.limit_cents {
            return Err(Failure::Retryable(format!(
                "amount {} is over the limit of {}",
                usd(payment.amount_cents),
                usd(self.limit_cents)
            )));
        }
        Ok(format!("charged {}", usd(payment.amount_cents)))
    }
}

/// What became of one message in the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Acknowledged.
    Acked,
    /// Nacked; the bus redelivers it later.
    Retrying,
    /// In the dead-letter queue (attempts exhausted, or dead-lettered explicitly).
    DeadLettered,
}

/// One subscriber of the group, printing every attempt with its timing.
struct Consumer {
    sub: Subscription,
    max_attempts: u32,
    /// When the current round of attempts of each message started, and when it last ran.
    attempts: HashMap<MessageId, (Instant, Instant)>,
}

impl Consumer {
    /// Handles deliveries until `count` messages reached a final state (acked or
    /// dead-lettered); returns how many of them were acked.
    async fn run_until_settled(
        &mut self,
        handler: &PaymentHandler,
        count: usize,
    ) -> Result<usize, BoxError> {
        let (mut finished, mut acked) = (0, 0);
        while finished < count {
            match self.handle_next(handler).await? {
                Outcome::Acked => {
                    finished += 1;
                    acked += 1;
                }
                Outcome::DeadLettered => finished += 1,
                Outcome::Retrying => {}
            }
        }
        Ok(acked)
    }

    async fn handle_next(&mut self, handler: &PaymentHandler) -> Result<Outcome, BoxError> {
        let delivery = tokio::time::timeout(STALL, self.sub.next())
            .await
            .map_err(|_| format!("no delivery for {STALL:?}: the example is stuck"))??;
        let envelope = delivery.envelope_arc();
        let attempt = delivery.attempt();
        tracing::debug!(id = %envelope.id, attempt, "handling");

        // Attempt 1 starts the clock (again, for a replayed message: it is a new delivery round).
        let now = Instant::now();
        let (first, previous) = match self.attempts.get(&envelope.id) {
            Some(&(first, previous)) if attempt > 1 => (first, previous),
            _ => (now, now),
        };
        self.attempts.insert(envelope.id, (first, now));
        let timing = if attempt == 1 {
            format!("+{} ms", ms(now - first))
        } else {
            format!("+{} ms (waited {})", ms(now - first), ms(now - previous))
        };
        let note = if envelope.extension(REPLAY_GROUP_EXTENSION).is_some() {
            " (replayed)"
        } else {
            ""
        };
        let head = format!(
            "   {:<11} attempt {attempt}  {:<22}",
            subject(&envelope),
            timing + note
        );

        let outcome = match handler.handle(&envelope) {
            Ok(done) => {
                println!("{head}ok: {done}");
                delivery.ack().await?;
                Outcome::Acked
            }
            Err(Failure::Retryable(reason)) => {
                // No explicit delay: the group's redelivery policy picks the backoff. After
                // the last attempt the same nack moves the message to the DLQ.
                let outcome = if attempt >= self.max_attempts {
                    println!(
                        "{head}retryable: {reason} -> nack: attempts exhausted, to {}",
                        dlq_topic(TOPIC)
                    );
                    Outcome::DeadLettered
                } else {
                    println!("{head}retryable: {reason} -> nack");
                    Outcome::Retrying
                };
                delivery.nack(None, reason).await?;
                outcome
            }
            Err(Failure::Terminal(reason)) => {
                println!("{head}terminal: {reason} -> dead_letter");
                delivery.dead_letter(reason).await?;
                Outcome::DeadLettered
            }
        };
        Ok(outcome)
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_target(false)
        .without_time()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();

    let dir = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from(DEFAULT_DATA_DIR), PathBuf::from);
    reset_data_dir(&dir).await?;
    let bus = EmbeddedBus::open(&dir)?;
    println!("switchyard: retry with backoff -> dead-letter queue -> replay");
    println!("bus: embedded, data in {}", dir.display());

    // 1. Publish. Each `publish` returns once the message is on disk (fsync).
    let mut handler = PaymentHandler {
        limit_cents: 100_000,
    };
    let messages = outgoing(handler.limit_cents)?;
    println!("\n1. publish {} messages to `{TOPIC}`", messages.len());
    for (envelope, note) in messages.iter() {
        bus.publish(TOPIC, envelope.clone()).await?;
        println!(
            "   {:<11} {:<21} {note}",
            subject(envelope),
            envelope.event_type
        );
    }

    // 2. Consume with a short redelivery policy so the backoff fits in a second.
    let policy = RedeliveryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(100),
        multiplier: 2.0,
        jitter: 0.2,
        max_backoff: Duration::from_secs(2),
    };
    println!(
        "\n2. consume with group `{GROUP}` (payment limit {})",
        usd(handler.limit_cents)
    );
    println!(
        "   redelivery policy: {} attempts, backoff {} ms x{} per attempt, +-{}% jitter",
        policy.max_attempts,
        policy.initial_backoff.as_millis(),
        policy.multiplier,
        policy.jitter * 100.0
    );
    let options = SubscribeOptions {
        redelivery: policy.clone(),
        ..SubscribeOptions::default()
    };
    let mut consumer = Consumer {
        sub: bus.subscribe(TOPIC, GROUP, options).await?,
        max_attempts: policy.max_attempts,
        attempts: HashMap::new(),
    };
    let mut charged = consumer.run_until_settled(&handler, messages.len()).await?;

    // 3. What failed, why, how often, and when.
    let dead = bus.dead_letters(TOPIC, 100).await?;
    print_dead_letters(3, &dead);

    // 4. Fix the cause, then replay what the fix can help: the entries that decode. An
    //    unknown type or a malformed payload needs a fixed producer, not a retry.
    handler.limit_cents = 500_000;
    let fixable: Vec<&DeadLetter> = dead
        .iter()
        .filter(|d| d.group == GROUP && codec::decode::<PaymentRequested>(&d.envelope).is_ok())
        .collect();
    println!(
        "\n4. fix the cause: raise the payment limit to {}, replay for group `{GROUP}`",
        usd(handler.limit_cents)
    );
    let replayed = bus
        .replay_dead_letters(
            TOPIC,
            ReplayFilter {
                group: Some(GROUP.to_string()),
                ids: Some(fixable.iter().map(|d| d.envelope.id).collect()),
            },
        )
        .await?;
    let names: Vec<&str> = fixable.iter().map(|d| subject(&d.envelope)).collect();
    println!(
        "   replayed {replayed} dead letter{} ({})",
        plural(replayed),
        names.join(", ")
    );
    charged += consumer.run_until_settled(&handler, replayed).await?;

    // 5. What is left.
    let left = bus.dead_letters(TOPIC, 100).await?;
    print_dead_letters(5, &left);
    bus.close().await?;

    println!(
        "\ndone: {charged} payments charged; {} message{} stay in the DLQ until their producer is fixed",
        left.len(),
        plural(left.len())
    );
    Ok(())
}

/// The messages the producer sends, each with a note for the printout: five payments (one
/// over `limit_cents`), one of a type this consumer doesn't know, one with a broken payload.
fn outgoing(limit_cents: u64) -> Result<Vec<(Envelope, String)>, BoxError> {
    let mut out = Vec::new();
    for (order, amount_cents) in [
        ("order-1001", 1_250),
        ("order-1002", 4_999),
        ("order-1003", 250_000),
        ("order-1004", 89_900),
        ("order-1005", 1_999),
    ] {
        let event = PaymentRequested {
            order_id: order.to_string(),
            amount_cents,
        };
        let note = if amount_cents > limit_cents {
            format!(
                "{}   (poison: over the {} limit)",
                usd(amount_cents),
                usd(limit_cents)
            )
        } else {
            usd(amount_cents)
        };
        out.push((codec::encode(&event, SOURCE)?, note));
    }
    // A newer producer already sends v2, which this consumer has never heard of.
    let unknown = Envelope::new(
        "payment.requested.v2",
        SOURCE,
        JSON_CONTENT_TYPE,
        r#"{"order_id":"order-1006","amount":{"value":"10.00","currency":"USD"}}"#,
    )
    .with_subject("order-1006");
    out.push((unknown, "(unknown type)".to_string()));
    // A buggy producer sends the amount as a string.
    let malformed = Envelope::new(
        PaymentRequested::TYPE,
        SOURCE,
        JSON_CONTENT_TYPE,
        r#"{"order_id":"order-1007","amount_cents":"12.50"}"#,
    )
    .with_subject("order-1007");
    out.push((malformed, "(malformed payload)".to_string()));
    Ok(out)
}

fn print_dead_letters(step: u32, dead: &[DeadLetter]) {
    println!(
        "\n{step}. dead-letter queue `{}`: {} entr{}",
        dlq_topic(TOPIC),
        dead.len(),
        if dead.len() == 1 { "y" } else { "ies" }
    );
    for d in dead {
        let failed = if d.attempts <= 1 {
            format!("failed at {}", clock(d.last_failure))
        } else {
            let span_ms = d
                .last_failure
                .unix_micros()
                .saturating_sub(d.first_failure.unix_micros())
                / 1000;
            format!(
                "failed first {}, last {} ({span_ms} ms later)",
                clock(d.first_failure),
                clock(d.last_failure)
            )
        };
        println!(
            "   {:<11} {:<21} group {}  attempts {}  {failed}",
            subject(&d.envelope),
            d.envelope.event_type,
            d.group,
            d.attempts,
        );
        println!("   {:<11} reason: {}", "", d.reason);
    }
}

/// Empties the data directory so every run starts from an empty bus. Refuses a directory
/// that is not a bus's (so a mistyped argument can't wipe anything else), and one that a
/// running bus holds (opening it fails with `Locked`).
async fn reset_data_dir(dir: &Path) -> Result<(), BoxError> {
    let mut entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot read data directory {}: {e}", dir.display()).into()),
    };
    let empty = entries.next().is_none();
    let is_bus = dir.join("LOCK").is_file() && dir.join("topics").is_dir();
    if !empty && !is_bus {
        return Err(format!(
            "{} is not an embedded bus data directory; refusing to wipe it (pass another path)",
            dir.display()
        )
        .into());
    }
    if is_bus {
        EmbeddedBus::open(dir)?.close().await?;
    }
    std::fs::remove_dir_all(dir)
        .map_err(|e| format!("cannot wipe data directory {}: {e}", dir.display()))?;
    Ok(())
}

fn subject(envelope: &Envelope) -> &str {
    envelope.subject.as_deref().unwrap_or("-")
}

fn usd(cents: u64) -> String {
    format!("{}.{:02} USD", cents / 100, cents % 100)
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The time of day (UTC) of a timestamp, to the millisecond: `15:30:00.101`.
fn clock(t: Timestamp) -> String {
    let rfc3339 = t.to_string();
    rfc3339
        .split_once('T')
        .map(|(_, time)| time.trim_end_matches('Z'))
        .map(|time| time.get(..12).unwrap_or(time).to_string())
        .unwrap_or(rfc3339)
}
