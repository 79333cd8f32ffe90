//! The Segment-compatible tracking API over real HTTP on loopback, on SQLite and on Postgres:
//! every route, authentication, validation, body encodings, limits and status codes.

use serde_json::{Value, json};
use tessera_ingestion::IngestionSettings;

use crate::http_harness::{Api, KEY, basic, gzip};

fn track(id: &str) -> Value {
    json!({"type": "track", "messageId": id, "userId": "u1", "event": "Clicked"})
}

async fn every_route_stores_its_type(api: Api) {
    let routes = [
        (
            "identify",
            json!({"userId": "u1", "traits": {"plan": "pro"}}),
        ),
        ("track", json!({"userId": "u1", "event": "Clicked"})),
        ("page", json!({"anonymousId": "a1", "name": "Home"})),
        ("screen", json!({"userId": "u1", "name": "Settings"})),
        ("group", json!({"userId": "u1", "groupId": "g1"})),
        ("alias", json!({"userId": "u1", "previousId": "a1"})),
    ];
    for (kind, body) in routes {
        let short = &kind[..1];
        for path in [format!("/v1/{kind}"), format!("/v1/{short}")] {
            let mut body = body.clone();
            let id = format!("{kind}-{path}");
            body["messageId"] = json!(id);
            // The route decides the type, whatever the body says.
            body["type"] = json!("track");
            api.post_json(&path, &body).await.assert_success();
            assert_eq!(api.payload(&id).await["type"], kind, "{path}");
        }
    }
    for path in ["/v1/batch", "/v1/b", "/v1/import"] {
        let id = format!("batch-{path}");
        api.post_json(path, &json!({"batch": [track(&id)]}))
            .await
            .assert_success();
        assert_eq!(api.payload(&id).await["event"], "Clicked");
    }
    // A GET is no tracking call.
    let get = api.raw("GET", "/v1/track", &[], b"").await;
    assert_eq!(get.status, 405);
    // The browser's preflight is answered for every route.
    let preflight = api.raw("OPTIONS", "/v1/t", &[], b"").await;
    assert_eq!(preflight.status, 204);
    assert_eq!(preflight.header("access-control-allow-origin"), Some("*"));
}

async fn the_write_key_is_required(api: Api) {
    let body = serde_json::to_vec(&json!({"batch": [track("m1")]})).unwrap();
    let json_type = ("Content-Type", "application/json");
    // In the body instead of the header: accepted, for a batch and for a single message.
    let mut with_key = json!({"batch": [track("in-body")], "writeKey": KEY});
    api.post(
        "/v1/batch",
        &[json_type],
        &serde_json::to_vec(&with_key).unwrap(),
    )
    .await
    .assert_success();
    with_key =
        json!({"userId": "u1", "event": "E", "messageId": "single-in-body", "writeKey": KEY});
    api.post(
        "/v1/t",
        &[("Content-Type", "text/plain")],
        &serde_json::to_vec(&with_key).unwrap(),
    )
    .await
    .assert_success();

    let missing = api.post("/v1/batch", &[json_type], &body).await;
    let wrong = api
        .post(
            "/v1/batch",
            &[json_type, ("Authorization", &basic("not-a-key"))],
            &body,
        )
        .await;
    let wrong_in_body = api
        .post(
            "/v1/batch",
            &[json_type],
            &serde_json::to_vec(&json!({"batch": [track("m1")], "writeKey": "nope"})).unwrap(),
        )
        .await;
    let bearer = api
        .post(
            "/v1/batch",
            &[json_type, ("Authorization", "Bearer abc")],
            &body,
        )
        .await;
    let (_, key) = api.create_source("web", 0).await;
    api.post(
        "/v1/batch",
        &[json_type, ("Authorization", &basic(&key))],
        &serde_json::to_vec(&json!({"batch": [track("web-1")]})).unwrap(),
    )
    .await
    .assert_success();
    api.disable_source("web").await;
    let disabled = api
        .post(
            "/v1/batch",
            &[json_type, ("Authorization", &basic(&key))],
            &body,
        )
        .await;
    for reply in [missing, wrong, wrong_in_body, bearer, disabled] {
        assert_eq!(reply.status, 401, "{}", reply.text());
        assert_eq!(reply.json()["code"], "unauthenticated");
        assert!(
            reply.json()["message"]
                .as_str()
                .unwrap()
                .contains("write key")
        );
    }
    assert_eq!(
        api.message_ids().await,
        vec!["in-body", "single-in-body", "web-1"]
    );
}

async fn each_invalid_message_is_named_and_the_valid_ones_kept(api: Api) {
    let batch = json!({"batch": [
        track("ok-1"),
        {"type": "track", "messageId": "no-event", "userId": "u1"},
        {"messageId": "no-type", "userId": "u1"},
        {"type": "group", "messageId": "no-group", "userId": "u1"},
        {"type": "alias", "messageId": "no-previous", "anonymousId": "a1"},
        {"type": "identify", "messageId": "no-ids", "traits": {"plan": "pro"}},
        {"type": "page", "messageId": "bad-time", "userId": "u1", "timestamp": "yesterday"},
        {"type": "screen", "messageId": "bad-id", "userId": {"id": 1}},
        {"type": "track", "messageId": "bad-props", "userId": "u1", "event": "E", "properties": [1]},
        "not an object",
        track("ok-2"),
    ]});
    let reply = api.post_json("/v1/batch", &batch).await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["code"], "invalid_messages");
    assert_eq!(
        (body["accepted"].as_u64(), body["refused"].as_u64()),
        (Some(2), Some(9))
    );
    let expected: Vec<(Option<u64>, String)> = [
        (1, "batch[1].event"),
        (2, "batch[2].type"),
        (3, "batch[3].groupId"),
        (4, "batch[4].previousId"),
        (4, "batch[4].userId"),
        (5, "batch[5].userId"),
        (6, "batch[6].timestamp"),
        (7, "batch[7].userId"),
        (8, "batch[8].properties"),
        (9, "batch[9]"),
    ]
    .into_iter()
    .map(|(i, f)| (Some(i), f.to_owned()))
    .collect();
    assert_eq!(reply.errors(), expected);
    assert_eq!(api.message_ids().await, vec!["ok-1", "ok-2"]);
    // A library re-sending the batch on the 400 adds nothing: the valid ones are duplicates.
    assert_eq!(api.post_json("/v1/batch", &batch).await.status, 400);
    assert_eq!(api.message_ids().await, vec!["ok-1", "ok-2"]);

    // A single invalid message: 400, nothing stored, fields named without a batch prefix.
    let reply = api
        .post_json("/v1/alias", &json!({"messageId": "a", "userId": "u1"}))
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.errors(), vec![(Some(0), "previousId".to_owned())]);
    let reply = api.post_json("/v1/track", &json!({"userId": "u1"})).await;
    assert_eq!(reply.errors(), vec![(Some(0), "event".to_owned())]);
    assert_eq!(api.message_ids().await.len(), 2);
}

async fn malformed_requests_name_the_problem(api: Api) {
    let auth = basic(KEY);
    let headers = [
        ("Content-Type", "application/json"),
        ("Authorization", auth.as_str()),
    ];
    let reply = api.post("/v1/batch", &headers, b"{\"batch\": [").await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["code"], "malformed_body");
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{}",
        reply.text()
    );
    let reply = api.post("/v1/batch", &headers, b"[1, 2]").await;
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("JSON object"));
    let reply = api.post("/v1/batch", &headers, b"").await;
    assert_eq!(reply.status, 400);
    for (body, field) in [
        (json!({"messages": []}), "batch"),
        (json!({"batch": {"type": "track"}}), "batch"),
        (json!({"batch": [], "sentAt": "noon"}), "sentAt"),
        (json!({"batch": [], "context": []}), "context"),
        (json!({"batch": [], "writeKey": 5}), "writeKey"),
    ] {
        let reply = api.post_json("/v1/batch", &body).await;
        assert_eq!(reply.status, 400, "{body}");
        assert_eq!(reply.json()["code"], "invalid_request");
        assert_eq!(reply.errors(), vec![(None, field.to_owned())], "{body}");
    }
    let reply = api
        .post(
            "/v1/batch",
            &[
                ("Authorization", auth.as_str()),
                ("Content-Encoding", "gzip"),
            ],
            b"this is not gzip",
        )
        .await;
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("gzip"));
    let reply = api
        .post(
            "/v1/batch",
            &[("Authorization", auth.as_str()), ("Content-Encoding", "br")],
            b"{}",
        )
        .await;
    assert_eq!(reply.status, 415);
    assert!(api.stored().await.is_empty());
}

async fn gzip_is_read_whatever_the_content_type(api: Api) {
    let auth = basic(KEY);
    let types = [
        Some("application/json"),
        Some("application/json; charset=utf-8"),
        Some("text/plain"),
        Some("text/plain;charset=UTF-8"),
        Some("application/x-www-form-urlencoded"),
        Some("application/octet-stream"),
        None,
    ];
    let mut expected = Vec::new();
    for (i, content_type) in types.into_iter().enumerate() {
        for gzipped in [true, false] {
            let id = format!("m{i}-{gzipped}");
            let json = serde_json::to_vec(&json!({"batch": [track(&id)]})).unwrap();
            let body = if gzipped { gzip(&json) } else { json };
            let mut headers = vec![("Authorization", auth.as_str())];
            if let Some(t) = content_type {
                headers.push(("Content-Type", t));
            }
            if gzipped {
                headers.push(("Content-Encoding", "gzip"));
            }
            api.post("/v1/batch", &headers, &body)
                .await
                .assert_success();
            expected.push(id);
        }
    }
    assert_eq!(api.message_ids().await, expected);
}

async fn oversize_is_413_naming_the_limit(api: Api) {
    let auth = basic(KEY);
    let big = |id: &str, kb: usize| {
        json!({"type": "track", "messageId": id, "userId": "u1", "event": "E",
               "properties": {"blob": "x".repeat(kb * 1024)}})
    };
    // One message over 32 KB in a batch: 413 naming it; the others are stored.
    let reply = api
        .post_json(
            "/v1/batch",
            &json!({"batch": [track("small"), big("big", 33)]}),
        )
        .await;
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert_eq!(reply.json()["code"], "message_too_large");
    assert_eq!(reply.errors(), vec![(Some(1), "batch[1]".to_owned())]);
    assert!(reply.text().contains("32 KB"));
    // A single message over 32 KB.
    let reply = api.post_json("/v1/track", &big("big-single", 33)).await;
    assert_eq!(reply.status, 413);
    // Just under the limit is fine.
    api.post_json("/v1/batch", &json!({"batch": [big("31k", 31)]}))
        .await
        .assert_success();

    // A request over 500 KB, though each message is under 32 KB.
    let batch: Vec<Value> = (0..17).map(|i| big(&format!("b{i}"), 30)).collect();
    let reply = api.post_json("/v1/batch", &json!({"batch": batch})).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.json()["code"], "request_too_large");
    assert_eq!(reply.json()["limit"], "500 KB per request");
    // The same sent chunked, without a Content-Length.
    let body = serde_json::to_vec(&json!({"batch": batch})).unwrap();
    let mut chunked = Vec::new();
    for part in body.chunks(64 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let headers = vec![
        ("Authorization".to_owned(), auth.clone()),
        ("Transfer-Encoding".to_owned(), "chunked".to_owned()),
    ];
    let reply = api.raw("POST", "/v1/batch", &headers, &chunked).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.json()["code"], "request_too_large");

    // More than 2,500 messages, though small.
    let batch: Vec<Value> = (0..2501)
        .map(|i| json!({"type": "track", "userId": "u", "event": "E", "messageId": i}))
        .collect();
    let reply = api.post_json("/v1/batch", &json!({"batch": batch})).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.json()["code"], "too_many_messages");
    assert_eq!(reply.json()["limit"], "2500 messages per request");

    // A gzip bomb: 16 MB of JSON whitespace in about 16 KB; decoding stops past 500 KB.
    let mut bomb_json = b"{\"batch\":[".to_vec();
    bomb_json.resize(16 * 1024 * 1024, b' ');
    let bomb = gzip(&bomb_json);
    drop(bomb_json);
    assert!(bomb.len() < 500 * 1024);
    let reply = api
        .post(
            "/v1/batch",
            &[
                ("Authorization", auth.as_str()),
                ("Content-Encoding", "gzip"),
            ],
            &bomb,
        )
        .await;
    assert_eq!(reply.status, 413);
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("decompressed")
    );

    assert_eq!(api.message_ids().await, vec!["small", "31k"]);
}

async fn a_source_over_its_rate_limit_gets_429(api: Api) {
    let (_, key) = api.create_source("limited", 5).await;
    let auth = basic(&key);
    let headers = [
        ("Content-Type", "application/json"),
        ("Authorization", auth.as_str()),
    ];
    let batch = |from: usize| {
        let messages: Vec<Value> = (from..from + 5).map(|i| track(&format!("r{i}"))).collect();
        serde_json::to_vec(&json!({"batch": messages})).unwrap()
    };
    api.post("/v1/batch", &headers, &batch(0))
        .await
        .assert_success();
    let reply = api.post("/v1/batch", &headers, &batch(5)).await;
    assert_eq!(reply.status, 429, "{}", reply.text());
    assert_eq!(reply.json()["code"], "rate_limited");
    let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        api.stored().await.len(),
        5,
        "the refused batch was not stored"
    );
    // Another source is not affected.
    api.post_json("/v1/batch", &json!({"batch": [track("other")]}))
        .await
        .assert_success();
}

async fn an_unreachable_event_log_is_503(api: Api) {
    // Authenticate once so the key is cached, then lose the database.
    api.post_json("/v1/batch", &json!({"batch": [track("before")]}))
        .await
        .assert_success();
    api.db.close().await;
    let reply = api
        .post_json("/v1/batch", &json!({"batch": [track("after")]}))
        .await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["code"], "unavailable");
    assert_eq!(reply.header("retry-after"), Some("1"));
    let message = reply.json()["message"].as_str().unwrap().to_owned();
    assert!(
        !message.contains("pool") && !message.contains("sqlx"),
        "no internal error text: {message}"
    );
}

async fn the_same_batch_twice_counts_once(api: Api) {
    let batch = json!({"batch": [track("d1"), track("d2"),
        {"type": "identify", "messageId": "d3", "userId": "u1", "traits": {"plan": "pro"}}]});
    api.post_json("/v1/batch", &batch).await.assert_success();
    api.post_json("/v1/batch", &batch).await.assert_success();
    // The same messages again, alone and gzipped.
    let auth = basic(KEY);
    api.post(
        "/v1/batch",
        &[
            ("Authorization", auth.as_str()),
            ("Content-Encoding", "gzip"),
        ],
        &gzip(&serde_json::to_vec(&batch).unwrap()),
    )
    .await
    .assert_success();
    api.post_json("/v1/track", &track("d1"))
        .await
        .assert_success();
    assert_eq!(api.message_ids().await, vec!["d1", "d2", "d3"]);
}

async fn what_real_libraries_send_is_accepted(api: Api) {
    let batch = json!({
        "batch": [
            // Python: anonymousId null, timestamp with +00:00 and milliseconds.
            {"type": "identify", "messageId": "py", "userId": "u1", "anonymousId": null,
             "traits": {"plan": "pro"}, "timestamp": "2026-11-28T12:51:49.224+00:00",
             "integrations": {}},
            // Node: originalTimestamp with Z, traits only in context.traits, a per-message sentAt.
            {"type": "identify", "messageId": "node", "userId": "u2",
             "context": {"traits": {"email": "x@example.com"}},
             "originalTimestamp": "2026-11-28T12:51:59.835Z", "sentAt": "2026-11-28T12:51:59.836Z",
             "channel": "server", "_metadata": {"nodeVersion": "20"}},
            // Numeric ids, microseconds, no messageId (one is generated).
            {"type": "track", "userId": 12345, "anonymousId": 7, "event": "Paid",
             "timestamp": "2026-11-28T12:51:49.724629+00:00"},
            // Go: nanoseconds; PHP: no fraction.
            {"type": "page", "messageId": "go", "anonymousId": "a1", "name": "Home",
             "timestamp": "2026-11-28T12:51:49.123456789Z"},
            {"type": "screen", "messageId": "php", "userId": "u1", "name": "Home",
             "timestamp": "2026-11-28T12:51:49+00:00"},
            {"type": "group", "messageId": "grp", "userId": "u1", "groupId": 42,
             "traits": {"name": "Example Inc"}},
            {"type": "alias", "messageId": "al", "userId": "u1", "previousId": "a1"},
        ],
        "context": {"library": {"name": "analytics-go", "version": "3"}},
        "integrations": {"Slack": false},
        "timestamp": "2026-11-28T12:51:59.900Z",
    });
    api.post_json("/v1/batch", &batch).await.assert_success();
    let py = api.payload("py").await;
    assert!(py.get("anonymousId").is_none());
    assert_eq!(py["originalTimestamp"], "2026-11-28T12:51:49.224Z");
    assert_eq!(
        py["sentAt"], "2026-11-28T12:51:59.9Z",
        "the envelope's timestamp is its sentAt"
    );
    assert_eq!(py["context"]["library"]["name"], "analytics-go");
    assert_eq!(py["integrations"]["Slack"], false);
    let node = api.payload("node").await;
    assert_eq!(node["context"]["traits"]["email"], "x@example.com");
    assert_eq!(node["context"]["library"]["name"], "analytics-go");
    assert_eq!(node["sentAt"], "2026-11-28T12:51:59.836Z");
    assert_eq!(node["originalTimestamp"], "2026-11-28T12:51:59.835Z");
    let stored = api.stored().await;
    let numeric = &stored[2];
    assert_eq!(numeric.2["userId"], "12345");
    assert_eq!(numeric.2["anonymousId"], "7");
    assert!(
        uuid::Uuid::parse_str(&numeric.1).is_ok(),
        "generated id {}",
        numeric.1
    );
    assert_eq!(
        numeric.2["originalTimestamp"],
        "2026-11-28T12:51:49.724629Z"
    );
    assert_eq!(
        api.payload("go").await["originalTimestamp"],
        "2026-11-28T12:51:49.123456Z"
    );
    assert_eq!(
        api.payload("php").await["originalTimestamp"],
        "2026-11-28T12:51:49Z"
    );
    assert_eq!(api.payload("grp").await["groupId"], "42");
    assert_eq!(api.payload("al").await["previousId"], "a1");
    assert_eq!(stored.len(), 7);

    // A UTF-8 byte-order mark before the JSON.
    let mut bom = b"\xEF\xBB\xBF".to_vec();
    bom.extend_from_slice(br#"{"userId": "u1", "event": "E", "messageId": "bom"}"#);
    let auth = basic(KEY);
    api.post("/v1/track", &[("Authorization", auth.as_str())], &bom)
        .await
        .assert_success();
    assert_eq!(api.payload("bom").await["event"], "E");
}

async fn clock_skew_is_corrected_from_sent_at(api: Api) {
    use time::format_description::well_known::Rfc3339;
    // The device's clock is a day behind: it sent, a second after the event, at its own
    // 2020-01-01T00:00:01Z, and the server receives it now.
    let body = json!({"batch": [{"type": "track", "messageId": "skew", "userId": "u1",
        "event": "E", "timestamp": "2020-01-01T00:00:00Z"}], "sentAt": "2020-01-01T00:00:01Z"});
    let before = time::OffsetDateTime::now_utc();
    api.post_json("/v1/batch", &body).await.assert_success();
    let stored = api.payload("skew").await;
    let time = |field: &str| {
        time::OffsetDateTime::parse(stored[field].as_str().unwrap(), &Rfc3339).unwrap()
    };
    assert_eq!(stored["originalTimestamp"], "2020-01-01T00:00:00Z");
    assert_eq!(stored["sentAt"], "2020-01-01T00:00:01Z");
    let received = time("receivedAt");
    assert!(received >= before - time::Duration::seconds(1));
    assert_eq!(time("timestamp"), received - time::Duration::seconds(1));

    // Without sentAt the client's timestamp is trusted as is (a historical import).
    let single = json!({"messageId": "old", "userId": "u1", "event": "E",
                        "timestamp": "2020-01-01T00:00:00.5+02:00"});
    api.post_json("/v1/track", &single).await.assert_success();
    let stored = api.payload("old").await;
    assert_eq!(stored["timestamp"], "2019-12-31T22:00:00.5Z");
    assert_eq!(stored["originalTimestamp"], "2019-12-31T22:00:00.5Z");
    assert!(stored["sentAt"].is_null());
}

async fn the_request_address_is_context_ip(api: Api) {
    let auth = basic(KEY);
    let json_headers = [
        ("Content-Type", "application/json"),
        ("Authorization", auth.as_str()),
    ];
    api.post_json(
        "/v1/track",
        &json!({"messageId": "ip-peer", "userId": "u1", "event": "E"}),
    )
    .await
    .assert_success();
    assert_eq!(api.payload("ip-peer").await["context"]["ip"], "127.0.0.1");

    let own = json!({"messageId": "ip-own", "userId": "u1", "event": "E",
                     "context": {"ip": "203.0.113.9"}});
    api.post_json("/v1/track", &own).await.assert_success();
    assert_eq!(
        api.payload("ip-own").await["context"]["ip"],
        "203.0.113.9",
        "the client's own wins"
    );

    let forwarded = [
        json_headers[0],
        json_headers[1],
        ("X-Forwarded-For", "198.51.100.7, 10.0.0.1"),
    ];
    let body =
        json!({"batch": [{"type": "track", "messageId": "ip-fwd", "userId": "u1", "event": "E"}]});
    api.post("/v1/batch", &forwarded, &serde_json::to_vec(&body).unwrap())
        .await
        .assert_success();
    assert_eq!(api.payload("ip-fwd").await["context"]["ip"], "198.51.100.7");
}

/// The fixture of these tests: the API on a fresh database (which it keeps alive).
/// Hostile bodies at the edge: each gets a 4xx with a JSON body naming the problem (never a
/// 5xx, a crash or a hang), nothing of it is stored, and the server goes on serving.
async fn hostile_bodies_get_a_4xx_and_the_server_stays_up(api: Api) {
    let auth = basic(KEY);
    let headers = [
        ("Content-Type", "application/json"),
        ("Authorization", auth.as_str()),
    ];
    let deep = format!(
        r#"{{"type": "track", "userId": "u1", "event": "E", "properties": {{"x": {}1{}}}}}"#,
        "[".repeat(5_000),
        "]".repeat(5_000)
    );
    let many_traits: serde_json::Map<String, Value> =
        (0..10_000).map(|i| (format!("t{i}"), json!(i))).collect();
    let many =
        serde_json::to_vec(&json!({"type": "identify", "userId": "u1", "traits": many_traits}))
            .unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("deeply nested JSON", deep.into_bytes()),
        (
            "invalid UTF-8",
            b"{\"type\": \"track\", \"userId\": \"\xff\xfe\", \"event\": \"E\"}".to_vec(),
        ),
        (
            "NaN",
            br#"{"type": "track", "userId": "u1", "event": "E", "properties": {"x": NaN}}"#
                .to_vec(),
        ),
        (
            "Infinity",
            br#"{"type": "track", "userId": "u1", "event": "E", "properties": {"x": Infinity}}"#
                .to_vec(),
        ),
        ("10,000 traits", many),
        (
            "a string over the message limit",
            serde_json::to_vec(
                &json!({"type": "track", "userId": "u1", "event": "x".repeat(40_000)}),
            )
            .unwrap(),
        ),
        (
            "the event as an array",
            br#"{"type": "track", "userId": "u1", "event": ["E"]}"#.to_vec(),
        ),
        (
            "the user id as an object",
            br#"{"type": "track", "userId": {"id": 1}, "event": "E"}"#.to_vec(),
        ),
        (
            "properties as a string",
            br#"{"type": "track", "userId": "u1", "event": "E", "properties": "p"}"#.to_vec(),
        ),
        ("a bare number", b"42".to_vec()),
    ];
    for (what, body) in &cases {
        let reply = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            api.post("/v1/track", &headers, body),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 10 s"));
        assert!(
            (400..500).contains(&reply.status),
            "{what}: {} {}",
            reply.status,
            reply.text()
        );
        let json = reply.json();
        assert!(
            json["code"].is_string() && json["message"].is_string(),
            "{what}: {}",
            reply.text()
        );
    }
    // Duplicate keys: the last one counts, as in every JSON library the SDKs use.
    let duplicate = br#"{"type": "track", "messageId": "dup-keys", "userId": "u1", "userId": "u2", "event": "E"}"#;
    let reply = api.post("/v1/track", &headers, duplicate).await;
    if reply.status == 200 {
        assert_eq!(api.payload("dup-keys").await["userId"], "u2");
    } else {
        assert!((400..500).contains(&reply.status), "{}", reply.text());
    }
    // Another source's key is no key of this source, and the server still serves.
    let other = basic("tsk_not_a_key_of_anyone");
    let reply = api
        .post(
            "/v1/track",
            &[
                ("Content-Type", "application/json"),
                ("Authorization", other.as_str()),
            ],
            &serde_json::to_vec(&track("nope")).unwrap(),
        )
        .await;
    assert_eq!(reply.status, 401, "{}", reply.text());
    api.post_json("/v1/track", &track("after-hostile"))
        .await
        .assert_success();
    assert_eq!(api.payload("after-hostile").await["event"], "Clicked");
}

async fn api(backend: crate::Backend) -> ((), Api) {
    ((), Api::start(backend, settings()).await)
}

fn settings() -> IngestionSettings {
    IngestionSettings::default()
}

on_both_backends!(
    api;
    every_route_stores_its_type,
    the_write_key_is_required,
    each_invalid_message_is_named_and_the_valid_ones_kept,
    malformed_requests_name_the_problem,
    gzip_is_read_whatever_the_content_type,
    oversize_is_413_naming_the_limit,
    a_source_over_its_rate_limit_gets_429,
    an_unreachable_event_log_is_503,
    the_same_batch_twice_counts_once,
    what_real_libraries_send_is_accepted,
    clock_skew_is_corrected_from_sent_at,
    the_request_address_is_context_ip,
    hostile_bodies_get_a_4xx_and_the_server_stays_up,
);
