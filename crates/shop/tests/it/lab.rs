//! The lab's figures hold what must hold by construction: a synchronous dependency's
//! outage fails sync orders and not choreography ones (which wait for it instead), and
//! every run keeps every invariant. Quick runs.

use shop::lab::{self, LabConfig, RunResult, Scenario};
use shop::order::Pattern;

use crate::support::{out, shop_command};

fn find(results: &[RunResult], p: Pattern, s: Scenario) -> &RunResult {
    results
        .iter()
        .find(|r| r.pattern == p && r.scenario == s)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_outage_fails_sync_orders_and_delays_choreography_ones() {
    let dir = tempfile::tempdir().unwrap();
    let config = LabConfig {
        patterns: vec![Pattern::Sync, Pattern::Choreography],
        scenarios: vec![Scenario::Baseline, Scenario::DependencyDown],
        data_dir: Some(dir.path().to_path_buf()),
        ..LabConfig::quick(42)
    };
    let mut seen = Vec::new();
    let results = lab::run(&config, |i, n, p, s| seen.push((i, n, p, s)))
        .await
        .unwrap();
    assert_eq!(results.len(), 4);
    assert_eq!(seen.len(), 4, "progress for every run");
    for r in &results {
        assert!(
            r.invariants_hold,
            "{:?}/{:?}: {:?}",
            r.pattern, r.scenario, r.violations
        );
        assert!(r.figures.orders > 0, "{r:?}");
        assert_eq!(r.dead_letters, 0, "{r:?}");
        assert_eq!(r.stuck, 0, "{r:?}");
    }
    for p in [Pattern::Sync, Pattern::Choreography] {
        let base = find(&results, p, Scenario::Baseline);
        assert_eq!(base.figures.success_rate, 1.0, "{base:?}");
        assert!(base.figures.throughput_per_s > 0.0);
        assert!(base.figures.consistency_p50_ms > 0.0, "{base:?}");
    }
    let sync = find(&results, Pattern::Sync, Scenario::DependencyDown);
    let choreo = find(&results, Pattern::Choreography, Scenario::DependencyDown);
    assert!(
        sync.figures.success_rate < choreo.figures.success_rate,
        "sync {:?} vs choreography {:?}",
        sync.figures,
        choreo.figures
    );
    assert!(sync.figures.availability_coupling > 0.0, "{sync:?}");
    assert!(sync.compensations > 0, "failed sync orders were undone");
    assert_eq!(choreo.figures.success_rate, 1.0, "{choreo:?}");
    assert_eq!(choreo.figures.availability_coupling, 0.0);
    // Choreography orders placed during the outage waited for Payment to come back.
    let outage_ms = config.outage.as_secs_f64() * 1000.0;
    assert!(
        choreo.figures.consistency_p99_ms >= outage_ms / 2.0,
        "{:?}",
        choreo.figures
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shop_lab_prints_the_tradeoff_table_and_writes_results_json() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let o = tokio::task::spawn_blocking({
        let out_dir = out_dir.clone();
        move || {
            shop_command()
                .args([
                    "lab",
                    "--quick",
                    "--patterns",
                    "hybrid",
                    "--scenarios",
                    "side-effect-down",
                    "--seed",
                    "9",
                    "--out",
                ])
                .arg(&out_dir)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    for text in [
        "PATTERN",
        "THROUGHPUT",
        "COUPLING",
        "side-effect-down",
        "hybrid",
        "seed 9",
    ] {
        assert!(stdout.contains(text), "{text} missing:\n{stdout}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["settings"]["seed"], 9);
    assert!(json["machine"]["cores"].as_u64().unwrap() >= 1);
    let run = &json["runs"][0];
    assert_eq!(run["pattern"], "hybrid");
    assert_eq!(run["scenario"], "side-effect-down");
    assert_eq!(run["invariants_hold"], true);
    // Notification down does not fail hybrid orders: their e-mails follow later.
    assert_eq!(run["figures"]["success_rate"], 1.0);
}
