//! Wire compatibility: requests captured from unmodified client libraries
//! (`tests/fixtures/sdk-wire/`) replayed byte for byte, headers and body, on SQLite and on
//! Postgres.

use std::path::PathBuf;

use base64::Engine;
use serde_json::Value;
use tessera_ingestion::IngestionSettings;

use crate::Backend;
use crate::http_harness::Api;

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/sdk-wire")
        .join(format!("{name}.json"));
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// One captured request: method, path, headers in their order and case, the raw body bytes,
/// and the messages of its decoded body.
struct Captured {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    raw: Vec<u8>,
    messages: Vec<Value>,
}

fn requests(fixture: &Value) -> Vec<Captured> {
    fixture["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Captured {
            method: r["method"].as_str().unwrap().to_owned(),
            path: r["path"].as_str().unwrap().to_owned(),
            headers: r["headers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| {
                    (
                        h[0].as_str().unwrap().to_owned(),
                        h[1].as_str().unwrap().to_owned(),
                    )
                })
                .collect(),
            raw: base64::engine::general_purpose::STANDARD
                .decode(r["raw_body_base64"].as_str().unwrap())
                .unwrap(),
            messages: r["body"]["batch"].as_array().unwrap().clone(),
        })
        .collect()
}

/// Replays every request of the fixture twice; each is answered exactly `200
/// {"success":true}`, every message is stored once, as sent; returns the stored payloads by
/// message id.
async fn replay(api: &Api, name: &str) -> Vec<(String, Value)> {
    let captured = requests(&fixture(name));
    let sent: Vec<Value> = captured.iter().flat_map(|c| c.messages.clone()).collect();
    for round in 0..2 {
        for c in &captured {
            let reply = api.raw(&c.method, &c.path, &c.headers, &c.raw).await;
            assert_eq!(
                (reply.status, reply.text().as_str()),
                (200, r#"{"success":true}"#),
                "{name} round {round}"
            );
        }
    }
    let stored = api.stored().await;
    assert_eq!(
        stored.len(),
        sent.len(),
        "every message once, despite the replay"
    );
    for (message, (_, message_id, payload)) in sent.iter().zip(&stored) {
        assert_eq!(message["messageId"].as_str().unwrap(), message_id);
        assert_eq!(payload["type"], message["type"], "{message_id}");
        for field in [
            "userId",
            "event",
            "groupId",
            "previousId",
            "name",
            "category",
            "traits",
            "properties",
        ] {
            let want = message.get(field).filter(|v| !v.is_null());
            assert_eq!(payload.get(field), want, "{name} {message_id} {field}");
        }
        assert!(payload.get("anonymousId").is_none(), "null is absent");
        assert_eq!(
            payload["context"]["library"], message["context"]["library"],
            "{message_id}"
        );
        assert!(payload["receivedAt"].is_string() && payload["timestamp"].is_string());
    }
    stored.into_iter().map(|(_, m, p)| (m, p)).collect()
}

async fn segment_python_batch(backend: Backend) {
    let api = Api::start(backend, IngestionSettings::default()).await;
    let stored = replay(&api, "segment-python-batch").await;
    // analytics-python sends `timestamp` and the batch's `sentAt`: the timestamp is the
    // original, the batch's sentAt applies to every message.
    for (_, p) in &stored {
        assert_eq!(p["originalTimestamp"], "2026-11-28T12:51:49.224Z");
        assert_eq!(p["sentAt"], "2026-11-28T12:51:49.724629Z");
    }
    let kinds: Vec<&str> = stored
        .iter()
        .map(|(_, p)| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["identify", "track", "group", "alias", "page", "screen"]
    );
}

async fn rudder_node_batch_gzip(backend: Backend) {
    let api = Api::start(backend, IngestionSettings::default()).await;
    let stored = replay(&api, "rudder-node-batch-gzip").await;
    // rudder-sdk-node sends originalTimestamp and a sentAt per message, gzip as a form post.
    let (_, identify) = &stored[0];
    assert_eq!(identify["originalTimestamp"], "2026-11-28T12:51:59.835Z");
    assert_eq!(identify["sentAt"], "2026-11-28T12:51:59.836Z");
    assert_eq!(identify["context"]["traits"]["email"], "jane@example.com");
    let kinds: Vec<&str> = stored
        .iter()
        .map(|(_, p)| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["identify", "track", "group", "alias", "page", "screen"]
    );
}

on_both_backends!(crate::backend; segment_python_batch, rudder_node_batch_gzip);
