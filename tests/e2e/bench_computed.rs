//! `tessera bench --computed-samples` against `tessera dev`: it refuses an audience of its name
//! that means something else, declares the computed trait and the audience it reads through the
//! definitions API, and reports how long first orders took to show in the computed trait, the
//! audience and the engagement score, with samples seen in each (and again, reusing the
//! definitions, on a second run).

use std::process::Stdio;

use tessera_proto::profile::v1 as pb;
use tessera_proto::profile::v1::definition_service_client::DefinitionServiceClient;
use tessera_tests::{E2E_TOKEN, TesseraBuilder, tessera_bin};
use tokio::process::Command;

/// Runs a short `tessera bench` against `target` with the order samples: exit code, stdout,
/// stderr.
async fn bench(target: &str, write_key: &str, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(tessera_bin())
        .arg("bench")
        .args([
            "--target",
            target,
            "--write-key",
            write_key,
            "--token",
            E2E_TOKEN,
        ])
        .args(["--rate", "200", "--batch", "20", "--users", "100"])
        .args([
            "--visibility-samples",
            "3",
            "--computed-timeout",
            "60",
            "--json",
        ])
        .args(extra)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run tessera bench");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Checks that the report measured every order measure with samples seen.
fn assert_measured(out: &str, err: &str) {
    for label in ["ack -> trait", "ack -> audience", "ack -> score"] {
        assert!(out.contains(label), "no {label:?} in\n{out}\n{err}");
    }
    let json: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("a JSON line")).expect("JSON report");
    let computed = &json["computed"];
    let followed = computed["followed"].as_u64().unwrap();
    assert!(followed > 0, "no first order followed:\n{out}\n{err}");
    for (measure, name) in [
        ("computed_trait", "order_count"),
        ("audience", "bench_buyers"),
        ("score", "engagement"),
    ] {
        let m = &computed[measure];
        assert_eq!(m["name"], name, "{computed}");
        let seen = m["seen"].as_u64().unwrap();
        assert!(seen > 0, "no order seen in the {measure}:\n{out}\n{err}");
        assert_eq!(
            seen + m["not_seen"].as_u64().unwrap(),
            followed,
            "every followed order is seen or not: {computed}"
        );
        assert_eq!(m["latency"]["count"].as_u64(), Some(seen), "{computed}");
        assert!(m["latency"]["p99_ms"].as_f64().unwrap() > 0.0, "{computed}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bench_measures_first_orders_into_a_computed_trait_an_audience_and_a_score() {
    let data = tempfile::tempdir().unwrap();
    let tessera = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .start()
        .await;
    let target = tessera.grpc_url();
    let key = tessera.dev_write_key().to_owned();
    let mut definitions = DefinitionServiceClient::new(tessera.channel().await);

    // An audience of the bench's name with another condition is refused before anything is
    // sent or declared.
    definitions
        .create_audience(pb::CreateAudienceRequest {
            audience: Some(pb::AudienceDefinition {
                name: "bench_buyers".to_owned(),
                condition_json: r#"{"trait": {"name": "plan", "op": "eq", "value": "pro"}}"#
                    .to_owned(),
                ..Default::default()
            }),
        })
        .await
        .expect("create a conflicting audience");
    let (code, out, err) = bench(
        &target,
        &key,
        &["--events", "20", "--computed-samples", "5"],
    )
    .await;
    assert_ne!(code, 0, "a conflicting audience is refused:\n{out}\n{err}");
    assert!(
        err.contains("bench_buyers") && err.contains("another condition"),
        "{err}"
    );
    assert!(!out.contains("ack -> trait"), "nothing was sent: {out}");
    let missing = definitions
        .get_computed_trait(pb::GetComputedTraitRequest {
            name: "order_count".to_owned(),
        })
        .await
        .expect_err("nothing declared by a refused run");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    definitions
        .delete_audience(pb::DeleteAudienceRequest {
            name: "bench_buyers".to_owned(),
            expected_version: 0,
        })
        .await
        .expect("delete it");

    // The first run declares the trait and the audience, then measures.
    let (code, out, err) = bench(
        &target,
        &key,
        &["--duration", "10", "--computed-samples", "8"],
    )
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("declared the computed trait order_count")
            && err.contains("declared the audience bench_buyers"),
        "{err}"
    );
    assert_measured(&out, &err);
    let order_count = definitions
        .get_computed_trait(pb::GetComputedTraitRequest {
            name: "order_count".to_owned(),
        })
        .await
        .expect("order_count is declared")
        .into_inner()
        .computed_trait
        .unwrap();
    assert_eq!(order_count.kind, i32::from(pb::ComputedTraitKind::Count));
    assert_eq!(order_count.events, ["Order Completed"]);
    assert_eq!(order_count.source, i32::from(pb::DefinitionSource::Api));

    // A second run finds them and measures again, declaring nothing, after a warm-up whose
    // load is not measured.
    let (code, out, err) = bench(
        &target,
        &key,
        &[
            "--duration",
            "6",
            "--computed-samples",
            "4",
            "--warmup",
            "2",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!err.contains("declared"), "{err}");
    assert!(err.contains("warm-up of 2 s done"), "{err}");
    assert!(out.contains("warm-up 2s"), "the report says so: {out}");
    assert!(
        out.contains("(1200 accepted"),
        "only the measured 6 s at 200/s count: {out}"
    );
    assert_measured(&out, &err);
    // Without the option the report has no order measures.
    let (code, out, err) = bench(&target, &key, &["--events", "20"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!out.contains("ack -> trait"), "{out}");
}
