//! The fault-injection suite's short version: one round of every fault against the four
//! services as separate processes, under load, with every invariant checked after each round
//! (see `tessera_tests::chaos` and docs/reliability.md; the full run is
//! `cargo run -p tessera-tests --bin tessera-chaos`).

use tessera_tests::chaos::{self, Options};

#[tokio::test(flavor = "multi_thread")]
async fn short_run_holds_every_invariant() {
    let logs = tempfile::Builder::new()
        .prefix("tessera-chaos")
        .tempdir()
        .expect("temp dir");
    let report = chaos::run(Options::short(logs.path().to_owned()), |r| {
        eprintln!(
            "round {} {}: {} acknowledged, {} failed attempts, settled after {:?}, {} \
             violations ({})",
            r.round,
            r.fault.name(),
            r.acked,
            r.failures.values().sum::<usize>(),
            r.settled_after,
            r.violations.len(),
            r.detail
        );
    })
    .await;
    eprintln!("{}", report.markdown());
    assert_eq!(
        report.rounds.len(),
        chaos::Fault::all().len(),
        "one round of every fault"
    );
    assert!(report.messages() > 0, "the load was acknowledged");
    if report.violations() > 0 {
        // Keep the processes' logs for the investigation.
        let kept = logs.keep();
        panic!(
            "{} invariant violations (process logs kept in {}):\n{}",
            report.violations(),
            kept.display(),
            report.markdown()
        );
    }
}
