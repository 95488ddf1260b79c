//! The child side of the saga crash case: the test binary re-run with environment
//! variables naming the saga's input and where to die; it SIGKILLs itself at that point.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use switchyard::saga::Orchestrator;

use crate::StoreFactory;
use crate::child::DIR_VAR;
use crate::saga_cases::{
    CRASH_SAGA, KillPoint, SAGA_FACTORY_VAR, SAGA_FAIL_VAR, SAGA_KILL_VAR, SAGA_MODE_VAR, Script,
    Target, Trip, fast, kill_self, trip,
};

/// Entry point of the `saga_conformance_child` test: does nothing unless the parent set
/// the mode variable (for this factory), otherwise runs the crash saga and exits.
pub fn saga_child_entry<S: StoreFactory>(factory: &S) {
    let Ok(mode) = std::env::var(SAGA_MODE_VAR) else {
        return;
    };
    if std::env::var(SAGA_FACTORY_VAR).ok().as_deref() != Some(std::any::type_name::<S>()) {
        return;
    }
    assert_eq!(mode, "run", "unknown saga child mode");
    // The harness printed a status line without a newline; start markers on a fresh line.
    println!();
    let dir = PathBuf::from(std::env::var(DIR_VAR).expect("child needs a directory"));
    let fail_at = std::env::var(SAGA_FAIL_VAR)
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let kill = std::env::var(SAGA_KILL_VAR)
        .ok()
        .and_then(|v| KillPoint::decode(&v))
        .expect("the child needs a kill point");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let orch_store = factory.open(&dir.join("orch")).unwrap();
        let target_store = factory.open(&dir.join("target")).unwrap();
        let kill_effect = match kill {
            KillPoint::Effect(n) => Some(n),
            KillPoint::Transition(_) => None,
        };
        let target = Target::new(target_store.clone(), kill_effect);
        let transitions = Arc::new(AtomicU64::new(0));
        let builder = Orchestrator::builder("travel", orch_store.clone())
            .saga(trip(target, Script::default()))
            .on_transition(move |rec| {
                let n = transitions.fetch_add(1, Ordering::SeqCst) + 1;
                let last = rec.history.last().map(|t| t.kind);
                let kinds: Vec<String> = rec
                    .history
                    .iter()
                    .map(|t| format!("{:?}", t.kind))
                    .collect();
                println!("TRANSITION {n} {}", kinds.join(","));
                if let KillPoint::Transition(k) = kill
                    && k == n
                {
                    kill_self(&format!("after transition {n} ({last:?})"));
                }
            });
        let orchestrator = fast(builder).build().unwrap();
        let running = tokio::spawn(orchestrator.clone().run(std::future::pending()));
        orchestrator
            .start_with_id("trip", CRASH_SAGA, &Trip { fail_at })
            .await
            .unwrap();
        let rec = tokio::time::timeout(Duration::from_secs(60), orchestrator.wait(CRASH_SAGA))
            .await
            .unwrap()
            .unwrap();
        println!("SETTLED {}", rec.state);
        running.abort();
    });
    std::process::exit(0);
}
