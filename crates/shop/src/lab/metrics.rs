//! What the lab measures, computed from one record per order: latencies, throughput,
//! success, availability coupling, the consistency window, what an outage did (success
//! during it, the time until everything caught up after it) and whether a saturation
//! step was sustainable. Pure functions over plain data, so each one is tested on
//! hand-made records.

use serde::{Deserialize, Serialize};

/// One order as the lab saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderRecord {
    /// When it was placed, seconds since the run started.
    pub placed_at_s: f64,
    /// How long `place` took (what the caller waits), ms.
    pub placement_ms: f64,
    /// From before `place` until the order was terminal, ms (`None`: it did not end
    /// within the run's patience, or placing it failed).
    pub completion_ms: Option<f64>,
    /// Whether it completed (false: failed, or did not end).
    pub completed: bool,
    /// Why it failed, when it did.
    pub reason: Option<String>,
    /// From before `place` until every service had done its part for it (the order
    /// ended, the stock moved, the shipment and the e-mails exist), ms; completed
    /// orders only.
    pub consistent_ms: Option<f64>,
}

/// Whether a failure reason says a dependency was unreachable (down, timed out, not
/// answering) rather than a business refusal (declined, out of stock).
pub fn is_availability_failure(reason: &str) -> bool {
    let r = reason.to_ascii_lowercase();
    [
        "unavailable",
        "timed out",
        "did not answer",
        "deadline",
        "down",
    ]
    .iter()
    .any(|w| r.contains(w))
}

/// The `q` quantile (0..=1) of `values` by nearest rank; 0 when empty.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = (q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// The figures of one (pattern, scenario) run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Orders placed (accepted or not).
    pub orders: usize,
    /// Placement latency p50 / p99, ms.
    pub placement_p50_ms: f64,
    /// Placement latency p99, ms.
    pub placement_p99_ms: f64,
    /// Completion latency p50 (orders that ended), ms.
    pub completion_p50_ms: f64,
    /// Completion latency p99, ms.
    pub completion_p99_ms: f64,
    /// Completed orders per second of the run.
    pub throughput_per_s: f64,
    /// Completed / placed.
    pub success_rate: f64,
    /// Orders that failed because a dependency was unreachable / placed: the price of
    /// depending on it synchronously.
    pub availability_coupling: f64,
    /// Consistency window p50 (placement until every service agrees), ms.
    pub consistency_p50_ms: f64,
    /// Consistency window p99, ms.
    pub consistency_p99_ms: f64,
}

/// Computes the figures of `records` from a run of `run_s` seconds.
pub fn figures(records: &[OrderRecord], run_s: f64) -> Figures {
    let n = records.len();
    let col = |f: fn(&OrderRecord) -> Option<f64>| records.iter().filter_map(f).collect::<Vec<_>>();
    let placement = col(|r| Some(r.placement_ms));
    let completion = col(|r| r.completion_ms);
    let consistent = col(|r| r.consistent_ms);
    let completed = records.iter().filter(|r| r.completed).count();
    let coupled = records
        .iter()
        .filter(|r| !r.completed && r.reason.as_deref().is_some_and(is_availability_failure))
        .count();
    let share = |k: usize| if n == 0 { 0.0 } else { k as f64 / n as f64 };
    Figures {
        orders: n,
        placement_p50_ms: quantile(&placement, 0.5),
        placement_p99_ms: quantile(&placement, 0.99),
        completion_p50_ms: quantile(&completion, 0.5),
        completion_p99_ms: quantile(&completion, 0.99),
        throughput_per_s: if run_s > 0.0 {
            completed as f64 / run_s
        } else {
            0.0
        },
        success_rate: share(completed),
        availability_coupling: share(coupled),
        consistency_p50_ms: quantile(&consistent, 0.5),
        consistency_p99_ms: quantile(&consistent, 0.99),
    }
}

/// The completion latency at each percentile 1..=100 (index `i` holds p`i + 1`), ms, of
/// the orders that ended; empty when none did. The latency CDF of a run.
pub fn percentiles(records: &[OrderRecord]) -> Vec<f64> {
    let mut v: Vec<f64> = records.iter().filter_map(|r| r.completion_ms).collect();
    if v.is_empty() {
        return Vec::new();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    (1..=100)
        .map(|p| {
            let rank = (p as f64 / 100.0 * v.len() as f64).ceil() as usize;
            v[rank.clamp(1, v.len()) - 1]
        })
        .collect()
}

/// When an order stopped changing, ms after it was placed: a completed order when every
/// service agreed on it, a failed one when it ended (or when placing it failed); `None`
/// when it never got there (it did not end, or a completed order's parts never all
/// happened).
pub fn settled_ms(r: &OrderRecord) -> Option<f64> {
    if r.completed {
        r.consistent_ms
    } else if r.completion_ms.is_some() {
        r.completion_ms
    } else if r.reason.is_some() {
        Some(r.placement_ms)
    } else {
        None
    }
}

/// What an outage did to a run (dependency-down, side-effect-down).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutageFigures {
    /// When the dependency went down, seconds since the run started.
    pub start_s: f64,
    /// When it came back, seconds since the run started.
    pub end_s: f64,
    /// Orders placed while it was down.
    pub orders_during: usize,
    /// Completed / placed, of the orders placed while it was down (1 when none were).
    pub success_rate_during: f64,
    /// From the end of the outage until the last order placed before or during it had
    /// settled (see [`settled_ms`]), ms; 0 when all had settled by the end; `None` when
    /// one never did.
    pub catch_up_ms: Option<f64>,
}

/// The outage figures of `records` for an outage from `start_s` to `end_s` (seconds
/// since the run started).
pub fn outage_figures(records: &[OrderRecord], start_s: f64, end_s: f64) -> OutageFigures {
    let during: Vec<&OrderRecord> = records
        .iter()
        .filter(|r| r.placed_at_s >= start_s && r.placed_at_s < end_s)
        .collect();
    let completed = during.iter().filter(|r| r.completed).count();
    let mut catch_up = Some(0.0f64);
    for r in records.iter().filter(|r| r.placed_at_s < end_s) {
        catch_up = match (catch_up, settled_ms(r)) {
            (Some(c), Some(s)) => Some(c.max(r.placed_at_s * 1000.0 + s - end_s * 1000.0)),
            _ => None,
        };
    }
    OutageFigures {
        start_s,
        end_s,
        orders_during: during.len(),
        success_rate_during: if during.is_empty() {
            1.0
        } else {
            completed as f64 / during.len() as f64
        },
        catch_up_ms: catch_up,
    }
}

/// One step of the saturation scenario: orders arriving at a fixed rate for a while.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaturationStep {
    /// The arrival rate asked for, orders/s.
    pub offered_per_s: f64,
    /// The arrival rate the load generator kept, orders/s (below the offered rate when
    /// the machine could not keep up even placing them).
    pub arrivals_per_s: f64,
    /// Orders of this step that completed, per second of its arrivals.
    pub achieved_per_s: f64,
    /// Orders placed in this step.
    pub orders: usize,
    /// Of them, completed.
    pub completed: usize,
    /// Of them, failed (ended without completing, or placing them failed).
    pub failed: usize,
    /// Of them, not ended within the latency limit after the step's last arrival.
    pub stalled: usize,
    /// Completion latency p99, ms (`None` when more than 1 % did not end within the
    /// limit: the p99 is beyond it).
    pub completion_p99_ms: Option<f64>,
    /// Whether the shop sustained this rate: p99 within the limit, at most 1 % failed,
    /// and arrivals kept at 90 % of the offered rate or more.
    pub sustainable: bool,
    /// Why not, when it did not.
    pub limited_by: Option<String>,
}

/// Judges one saturation step: `records` are the orders placed in it (those that did
/// not end within the limit have no `completion_ms`), `offered_per_s` the rate asked for,
/// `step_s` how long its arrivals took (the step, or longer when the load generator fell
/// behind), `p99_limit_ms` the completion latency p99 allowed.
pub fn assess_step(
    records: &[OrderRecord],
    offered_per_s: f64,
    step_s: f64,
    p99_limit_ms: f64,
) -> SaturationStep {
    let n = records.len();
    let completed = records.iter().filter(|r| r.completed).count();
    let stalled = records
        .iter()
        .filter(|r| r.completion_ms.is_none() && r.reason.is_none())
        .count();
    let failed = n - completed - stalled;
    // Orders that did not end count as slower than any that did.
    let mut latencies: Vec<f64> = records
        .iter()
        .filter(|r| r.completion_ms.is_some() || r.reason.is_none())
        .map(|r| r.completion_ms.unwrap_or(f64::INFINITY))
        .collect();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let p99 = if latencies.is_empty() {
        Some(0.0)
    } else {
        Some(quantile(&latencies, 0.99)).filter(|v| v.is_finite())
    };
    let rate = |k: usize| if step_s > 0.0 { k as f64 / step_s } else { 0.0 };
    let arrivals_per_s = rate(n);
    let limited_by = if n == 0 {
        Some("no order was placed".to_string())
    } else if let Some(p) = p99.filter(|p| *p > p99_limit_ms) {
        Some(format!(
            "completion p99 {p:.0} ms over the {p99_limit_ms:.0} ms limit"
        ))
    } else if p99.is_none() {
        Some(format!(
            "{stalled} of {n} orders did not end within {p99_limit_ms:.0} ms"
        ))
    } else if failed as f64 > n as f64 * 0.01 {
        Some(format!("{failed} of {n} orders failed"))
    } else if arrivals_per_s < offered_per_s * 0.9 {
        Some(format!(
            "arrivals fell behind: {arrivals_per_s:.0} of {offered_per_s:.0}/s placed"
        ))
    } else {
        None
    };
    SaturationStep {
        offered_per_s,
        arrivals_per_s,
        achieved_per_s: rate(completed),
        orders: n,
        completed,
        failed,
        stalled,
        completion_p99_ms: p99,
        sustainable: limited_by.is_none(),
        limited_by,
    }
}

/// The saturation scenario's result for one pattern.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saturation {
    /// The completion latency p99 a sustainable step kept within, ms.
    pub p99_limit_ms: f64,
    /// The maximum sustainable throughput: the highest completed-orders rate of a
    /// sustainable step, orders/s (0 when even the first step was not sustained).
    pub max_sustainable_per_s: f64,
    /// Every step run, in order; the last one is the first not sustained, unless the
    /// steps ran out first.
    pub steps: Vec<SaturationStep>,
}

/// The highest completed-orders rate among the sustainable `steps` (0 when none was).
pub fn max_sustainable(steps: &[SaturationStep]) -> f64 {
    steps
        .iter()
        .filter(|s| s.sustainable)
        .map(|s| s.achieved_per_s)
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn rec(placement: f64, completion: Option<f64>, reason: Option<&str>) -> OrderRecord {
        OrderRecord {
            placed_at_s: 0.0,
            placement_ms: placement,
            completion_ms: completion,
            completed: completion.is_some() && reason.is_none(),
            reason: reason.map(str::to_string),
            consistent_ms: completion.filter(|_| reason.is_none()).map(|c| c + 5.0),
        }
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0, "unsorted input");
    }

    #[test]
    fn availability_failures_are_told_from_business_refusals() {
        assert!(is_availability_failure(
            "payment unavailable: connect refused"
        ));
        assert!(is_availability_failure("payment did not answer: timed out"));
        assert!(is_availability_failure(
            "injected fault: service down for another 2s"
        ));
        assert!(!is_availability_failure(
            "payment declined: the card was declined"
        ));
        assert!(!is_availability_failure(
            "out of stock: `sku-rare` has 5 units"
        ));
    }

    #[test]
    fn figures_of_a_run_with_an_outage() {
        // 4 completed, 3 failed while Payment was down, 1 declined; 2 s run.
        let mut r = vec![
            rec(10.0, Some(20.0), None),
            rec(12.0, Some(22.0), None),
            rec(14.0, Some(30.0), None),
            rec(16.0, Some(40.0), None),
            rec(1.0, Some(1.0), Some("payment unavailable: down")),
            rec(1.0, Some(1.0), Some("payment unavailable: down")),
            rec(1.0, Some(1.0), Some("payment unavailable: down")),
            rec(2.0, Some(2.0), Some("payment declined")),
        ];
        let f = figures(&r, 2.0);
        assert_eq!(f.orders, 8);
        assert_eq!(f.success_rate, 0.5);
        assert_eq!(f.throughput_per_s, 2.0);
        assert_eq!(f.availability_coupling, 3.0 / 8.0);
        assert_eq!(f.placement_p50_ms, 2.0);
        assert_eq!(f.placement_p99_ms, 16.0);
        assert_eq!(f.consistency_p50_ms, 27.0);
        assert_eq!(f.consistency_p99_ms, 45.0);
        // An order that never ended counts as placed, not completed, and has no latency.
        r.push(OrderRecord {
            completion_ms: None,
            completed: false,
            reason: None,
            ..rec(3.0, None, None)
        });
        let f = figures(&r, 2.0);
        assert_eq!(f.orders, 9);
        assert_eq!(f.success_rate, 4.0 / 9.0);
        assert_eq!(figures(&[], 1.0), Figures::default());
    }

    fn at(placed_at_s: f64, settled: Option<f64>, completed: bool) -> OrderRecord {
        OrderRecord {
            placed_at_s,
            placement_ms: 1.0,
            completion_ms: settled,
            completed,
            reason: (!completed && settled.is_some()).then(|| "payment unavailable".into()),
            consistent_ms: settled.filter(|_| completed),
        }
    }

    #[test]
    fn percentiles_are_the_latency_cdf() {
        let r: Vec<OrderRecord> = (1..=200)
            .map(|i| rec(1.0, Some(f64::from(i)), None))
            .chain([rec(1.0, None, Some("placing failed"))])
            .collect();
        let p = percentiles(&r);
        assert_eq!(p.len(), 100);
        assert_eq!(p[0], 2.0, "p1 of 1..=200");
        assert_eq!(p[49], 100.0, "p50");
        assert_eq!(p[99], 200.0, "p100");
        assert!(p.windows(2).all(|w| w[0] <= w[1]));
        assert!(percentiles(&[]).is_empty());
    }

    #[test]
    fn an_outage_is_caught_up_when_the_last_order_before_its_end_settled() {
        // Outage from 1 s to 2 s. Settled: before it (0.5 s + 10 ms), during it (one
        // completed 2,500 ms after placement at 1.5 s: settled 2 s after the end), one
        // failed fast during it, one after it (ignored).
        let r = vec![
            at(0.5, Some(10.0), true),
            at(1.5, Some(2_500.0), true),
            at(1.6, Some(5.0), false),
            at(2.5, Some(9_000.0), true),
        ];
        let o = outage_figures(&r, 1.0, 2.0);
        assert_eq!(o.orders_during, 2);
        assert_eq!(o.success_rate_during, 0.5);
        assert_eq!(o.catch_up_ms, Some(2_000.0));
        // Everything settled before the end: 0, not negative.
        assert_eq!(outage_figures(&r[..1], 1.0, 2.0).catch_up_ms, Some(0.0));
        // An order from before the end that never settled: never caught up.
        let mut stuck = r.clone();
        stuck.push(at(1.9, None, false));
        assert_eq!(outage_figures(&stuck, 1.0, 2.0).catch_up_ms, None);
        // A placement that failed settles when placing returned.
        let refused = OrderRecord {
            placement_ms: 300.0,
            completion_ms: None,
            reason: Some("payment unavailable".into()),
            ..at(1.9, None, false)
        };
        assert_eq!(settled_ms(&refused), Some(300.0));
        let o = outage_figures(&[refused], 1.0, 2.0);
        assert!((o.catch_up_ms.unwrap() - 200.0).abs() < 1e-6, "{o:?}");
        assert_eq!(outage_figures(&[], 1.0, 2.0).success_rate_during, 1.0);
    }

    #[test]
    fn a_saturation_step_is_sustainable_within_the_limit_and_not_beyond() {
        // 100 orders in 0.5 s at 200/s offered, all completed within 50 ms.
        let ok: Vec<OrderRecord> = (0..100)
            .map(|i| rec(1.0, Some(f64::from(i % 50)), None))
            .collect();
        let s = assess_step(&ok, 200.0, 0.5, 1_000.0);
        assert!(s.sustainable, "{s:?}");
        assert_eq!(
            (s.orders, s.completed, s.failed, s.stalled),
            (100, 100, 0, 0)
        );
        assert_eq!(s.achieved_per_s, 200.0);
        assert_eq!(s.arrivals_per_s, 200.0);
        assert_eq!(s.completion_p99_ms, Some(49.0));
        // p99 over the limit.
        let slow: Vec<OrderRecord> = (0..100)
            .map(|i| rec(1.0, Some(if i < 95 { 10.0 } else { 1_500.0 }), None))
            .collect();
        let s = assess_step(&slow, 200.0, 0.5, 1_000.0);
        assert!(!s.sustainable);
        assert!(s.limited_by.as_deref().unwrap().contains("p99"), "{s:?}");
        // Two of 100 never ended: the p99 is beyond the limit, unknown.
        let mut stalled = ok.clone();
        for r in &mut stalled[..2] {
            r.completion_ms = None;
            r.completed = false;
            r.consistent_ms = None;
        }
        let s = assess_step(&stalled, 200.0, 0.5, 1_000.0);
        assert_eq!(s.stalled, 2);
        assert_eq!(s.completion_p99_ms, None);
        assert!(!s.sustainable);
        // Failures over 1 %.
        let mut failing = ok.clone();
        for r in &mut failing[..3] {
            r.completed = false;
            r.reason = Some("out of stock".into());
        }
        let s = assess_step(&failing, 200.0, 0.5, 1_000.0);
        assert_eq!(s.failed, 3);
        assert!(!s.sustainable, "{s:?}");
        // The generator kept only half the offered rate.
        let s = assess_step(&ok, 400.0, 0.5, 1_000.0);
        assert!(!s.sustainable);
        assert!(s.limited_by.as_deref().unwrap().contains("arrivals"));
        assert!(!assess_step(&[], 100.0, 0.5, 1_000.0).sustainable);
        // The max is the best sustainable achieved rate.
        let steps = [
            assess_step(&ok, 200.0, 0.5, 1_000.0),
            assess_step(&ok, 100.0, 0.25, 1_000.0),
            assess_step(&slow, 800.0, 0.125, 1_000.0),
        ];
        assert_eq!(max_sustainable(&steps), 400.0);
        assert_eq!(max_sustainable(&steps[2..]), 0.0);
    }
}
