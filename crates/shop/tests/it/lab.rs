//! The lab's figures hold what must hold by construction: a synchronous dependency's
//! outage fails sync orders and not choreography ones (which wait for it instead), and
//! the choreography's handlers redeliver meanwhile; every outage is caught up after;
//! the saturation scenario finds a maximum above zero for every pattern; every run
//! keeps every invariant; the charts are valid SVG and PNG; results.json validates
//! against docs/lab-results.schema.json. Quick runs; no timed asserts.

use std::time::Duration;

use shop::lab::{self, LabConfig, RunResult, SaturationConfig, Scenario};
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
        scenarios: vec![
            Scenario::Baseline,
            Scenario::DependencyDown,
            Scenario::Saturation,
        ],
        data_dir: Some(dir.path().to_path_buf()),
        // A first step any machine sustains, however busy (tests run side by side): the
        // mechanism is under test here, not this machine's figures.
        saturation: SaturationConfig {
            start_per_s: 10.0,
            factor: 4.0,
            max_steps: 3,
            step_for: Duration::from_millis(400),
            p99_limit: Duration::from_secs(5),
        },
        ..LabConfig::quick(42)
    };
    let mut seen = Vec::new();
    let results = lab::run(&config, |i, n, p, s| seen.push((i, n, p, s)))
        .await
        .unwrap();
    assert_eq!(results.len(), 6);
    assert_eq!(seen.len(), 6, "progress for every run");
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
        assert_eq!(base.completion_percentiles_ms.len(), 100, "the latency CDF");
        assert!(base.outage.is_none() && base.saturation.is_none());
        // Every order placed before the outage ended had settled at some point after it.
        let down = find(&results, p, Scenario::DependencyDown);
        let outage = down.outage.as_ref().expect("outage figures");
        assert!(outage.end_s > outage.start_s, "{outage:?}");
        assert!(outage.catch_up_ms.is_some(), "{outage:?}");
        // The saturation scenario sustained its first step at least.
        let sat = find(&results, p, Scenario::Saturation);
        let s = sat.saturation.as_ref().expect("saturation figures");
        assert!(s.max_sustainable_per_s > 0.0, "{s:?}");
        assert!(s.steps[0].sustainable, "{s:?}");
        assert_eq!(s.steps[0].offered_per_s, config.saturation.start_per_s);
        assert!(
            s.steps.len() == config.saturation.max_steps || !s.steps[s.steps.len() - 1].sustainable,
            "it stops at the first step not sustained: {s:?}"
        );
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
    // Payment's handler failed while it was down: its events were redelivered.
    assert!(choreo.redeliveries > 0, "{choreo:?}");
    assert_eq!(
        choreo.outage.as_ref().map(|o| o.success_rate_during),
        Some(1.0)
    );
    // Choreography orders placed during the outage waited for Payment to come back.
    let outage_ms = config.outage.as_secs_f64() * 1000.0;
    assert!(
        choreo.figures.consistency_p99_ms >= outage_ms / 2.0,
        "{:?}",
        choreo.figures
    );

    // The charts of these results: every one, as valid SVG and PNG.
    let charts_dir = dir.path().join("charts");
    let written = lab::charts::write(&charts_dir, &results).unwrap();
    for name in [
        "latency-cdf",
        "consistency",
        "saturation",
        "outage-success",
        "catch-up",
    ] {
        for ext in ["svg", "png"] {
            let path = charts_dir.join(format!("{name}.{ext}"));
            assert!(written.contains(&path), "{} not written", path.display());
        }
    }
    for path in &written {
        assert_valid_chart(path);
    }
}

/// `path` is a well-formed SVG document with text and shapes, or a PNG that decodes to
/// an image of the charts' size.
fn assert_valid_chart(path: &std::path::Path) {
    let bytes = std::fs::read(path).unwrap();
    assert!(!bytes.is_empty(), "{} is empty", path.display());
    match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => {
            let text = String::from_utf8(bytes).unwrap();
            let doc = roxmltree::Document::parse(&text)
                .unwrap_or_else(|e| panic!("{} is not well-formed XML: {e}", path.display()));
            let root = doc.root_element();
            assert_eq!(root.tag_name().name(), "svg", "{}", path.display());
            let count = |tag: &str| {
                root.descendants()
                    .filter(|n| n.tag_name().name() == tag)
                    .count()
            };
            assert!(count("text") > 0, "{} has no text", path.display());
            assert!(
                count("rect") + count("polyline") + count("path") > 0,
                "{} draws nothing",
                path.display()
            );
        }
        Some("png") => {
            let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
            let mut reader = decoder.read_info().unwrap();
            let mut buf = vec![0; reader.output_buffer_size()];
            let info = reader.next_frame(&mut buf).unwrap();
            assert_eq!((info.width, info.height), (900, 540), "{}", path.display());
            // Not a blank canvas: more than one color.
            let first = &buf[..3];
            assert!(
                buf.chunks(3).any(|px| px != first),
                "{} is blank",
                path.display()
            );
        }
        other => panic!("unexpected chart file {other:?}"),
    }
}

/// docs/lab-results.schema.json (JSON Schema 2020-12), compiled.
fn results_schema() -> (boon::Schemas, boon::SchemaIndex) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/lab-results.schema.json"
    );
    let schema: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler
        .add_resource("file:///lab-results.schema.json", schema)
        .unwrap();
    let index = compiler
        .compile("file:///lab-results.schema.json", &mut schemas)
        .unwrap_or_else(|e| panic!("the schema does not compile: {e:#}"));
    (schemas, index)
}

/// Validates `results` against docs/lab-results.schema.json.
fn assert_matches_schema(results: &serde_json::Value) {
    let (schemas, index) = results_schema();
    if let Err(e) = schemas.validate(results, index) {
        panic!("results.json does not match the schema: {e:#}");
    }
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
                    "baseline,side-effect-down,saturation",
                    "--seed",
                    "9",
                    "--saturation-from",
                    "10",
                    "--p99-limit",
                    "5s",
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
        "MAX SUSTAINABLE",
        "REDELIVERED",
        "CAUGHT UP",
        "seed 9",
    ] {
        assert!(stdout.contains(text), "{text} missing:\n{stdout}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["settings"]["seed"], 9);
    assert!(json["machine"]["cores"].as_u64().unwrap() >= 1);
    assert_matches_schema(&json);
    assert_eq!(json["runs"].as_array().unwrap().len(), 3);
    let run = &json["runs"][1];
    assert_eq!(run["pattern"], "hybrid");
    assert_eq!(run["scenario"], "side-effect-down");
    assert_eq!(run["invariants_hold"], true);
    // Notification down does not fail hybrid orders: their e-mails follow later.
    assert_eq!(run["figures"]["success_rate"], 1.0);
    assert_eq!(run["outage"]["success_rate_during"], 1.0);
    let sat = &json["runs"][2]["saturation"];
    assert!(
        sat["max_sustainable_per_s"].as_f64().unwrap() > 0.0,
        "{sat}"
    );
    // The charts went with it; the stderr of a non-terminal carries no progress bar.
    for name in ["latency-cdf", "saturation", "outage-success", "catch-up"] {
        for ext in ["svg", "png"] {
            assert_valid_chart(&out_dir.join(format!("{name}.{ext}")));
        }
    }
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !stderr.contains("runs,"),
        "no progress bar off a terminal:\n{stderr}"
    );
}

/// The schema rejects what it does not describe (it is not a rubber stamp).
#[test]
fn the_results_schema_rejects_unknown_fields_and_wrong_types() {
    let (schemas, index) = results_schema();
    let valid = serde_json::json!({
        "schema_version": 1,
        "machine": {"cores": 2, "os": "linux", "arch": "x86_64"},
        "wall_s": 1.0,
        "settings": {
            "patterns": ["sync"], "scenarios": ["baseline"], "run_for": 1.0, "outage": 0.5,
            "concurrency": 8, "seed": 1, "data_dir": null, "breaker_open_for": 0.5,
            "saturation": {"start_per_s": 100.0, "factor": 2.0, "max_steps": 7,
                           "step_for": 0.4, "p99_limit": 1.0},
            "bus": "embedded", "store": "embedded"
        },
        "runs": []
    });
    assert!(schemas.validate(&valid, index).is_ok());
    let mut extra = valid.clone();
    extra["machine"]["gpu"] = serde_json::json!("none");
    assert!(schemas.validate(&extra, index).is_err(), "unknown field");
    let mut url = valid.clone();
    url["settings"]["store"] = serde_json::json!("postgres://shop:secret@db/shop");
    assert!(
        schemas.validate(&url, index).is_err(),
        "a store URL is not recorded"
    );
    let mut wrong = valid.clone();
    wrong["settings"]["seed"] = serde_json::json!("one");
    assert!(schemas.validate(&wrong, index).is_err(), "wrong type");
    let mut pattern = valid;
    pattern["settings"]["patterns"] = serde_json::json!(["carrier-pigeon"]);
    assert!(
        schemas.validate(&pattern, index).is_err(),
        "unknown pattern"
    );
}

/// The lab in the distributed mode: every run's shop on a real nats-server (its own
/// namespace) and PostgreSQL (a database of its own, dropped after the run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lab_runs_on_nats_and_postgres() {
    let Some((nats, pg)) = crate::support::nats_and_postgres() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = LabConfig {
        patterns: vec![Pattern::Sync, Pattern::Choreography],
        scenarios: vec![Scenario::Baseline, Scenario::DependencyDown],
        data_dir: Some(dir.path().to_path_buf()),
        bus: shop::app::BusBackend::Nats(nats.url()),
        store: shop::app::StoreBackend::Postgres(pg.url()),
        ..LabConfig::quick(7)
    };
    let results = lab::run(&config, |_, _, _, _| {}).await.unwrap();
    assert_eq!(results.len(), 4);
    for r in &results {
        assert!(
            r.invariants_hold,
            "{:?}/{:?}: {:?}",
            r.pattern, r.scenario, r.violations
        );
        assert!(r.figures.orders > 0, "{r:?}");
        assert_eq!(r.stuck, 0, "{r:?}");
    }
    // The choreography keeps taking orders while Payment is down; sync does not.
    let sync = find(&results, Pattern::Sync, Scenario::DependencyDown);
    let choreo = find(&results, Pattern::Choreography, Scenario::DependencyDown);
    assert!(
        sync.figures.success_rate < choreo.figures.success_rate,
        "sync {} vs choreography {}",
        sync.figures.success_rate,
        choreo.figures.success_rate
    );
    let json = serde_json::to_value(&config).unwrap();
    assert_eq!(
        (json["bus"].as_str(), json["store"].as_str()),
        (Some("nats"), Some("postgres"))
    );
    assert!(
        !json.to_string().contains("postgres://"),
        "no URL in the results"
    );
}
