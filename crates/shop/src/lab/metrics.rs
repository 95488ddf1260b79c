//! What the lab measures, computed from one record per order: latencies, throughput,
//! success, availability coupling and the consistency window. Pure functions over plain
//! data, so each one is tested on hand-made records.

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
}
