//! The source debugger end to end: against `tessera dev`, a live tail shows events sent over
//! gRPC and over the Segment HTTP API, ListEvents lists them until they are delivered, and
//! SIGTERM ends the tail cleanly without holding up the shutdown.

use std::time::Duration;

use tessera_proto::ingestion::v1::debugger_service_client::DebuggerServiceClient;
use tessera_proto::ingestion::v1::{ListEventsRequest, TailEventsRequest};
use tessera_tests::TesseraBuilder;
use tessera_tests::events::{send, track};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// POSTs one track call to the Segment-compatible `/v1/track`, with the write key in the body;
/// returns the response's status line.
async fn http_track(http_addr: &str, write_key: &str, message_id: &str) -> String {
    let body = serde_json::json!({
        "writeKey": write_key,
        "messageId": message_id,
        "userId": "debug-user",
        "event": "Debugged",
    })
    .to_string();
    let request = format!(
        "POST /v1/track HTTP/1.1\r\nHost: {http_addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(http_addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_debugger_tails_and_lists_what_tessera_dev_accepts() {
    let data = tempfile::tempdir().unwrap();
    let mut tessera = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .start()
        .await;
    let key = tessera.dev_write_key().to_owned();
    let channel = tessera.channel().await;
    let mut debugger = DebuggerServiceClient::new(channel.clone());
    let mut tail = debugger
        .tail_events(TailEventsRequest {
            source_name: "default".into(),
            filter: None,
        })
        .await
        .expect("tail the default source")
        .into_inner();

    send(
        &channel,
        &key,
        vec![track(
            "dbg-grpc",
            "debug-user",
            "",
            "Debugged",
            serde_json::json!({}),
        )],
    )
    .await
    .expect("accepted over grpc");
    let status = http_track(&tessera.http_addr, &key, "dbg-http").await;
    assert!(status.contains(" 200 "), "{status}");

    let mut seen = Vec::new();
    while seen.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(10), tail.message())
            .await
            .expect("tailed within 10 s")
            .expect("a message")
            .expect("the tail is open");
        let event = message.event.expect("an event");
        assert_eq!(event.event.expect("the stored event").user_id, "debug-user");
        seen.push(event.message_id);
    }
    assert_eq!(seen, ["dbg-grpc", "dbg-http"]);

    // Listed newest first; the pipeline delivers them, and the listing says so.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let page = debugger
            .list_events(ListEventsRequest {
                source_name: "default".into(),
                page_size: 10,
                page_token: String::new(),
                filter: None,
            })
            .await
            .expect("list")
            .into_inner();
        let ids: Vec<_> = page.events.iter().map(|e| e.message_id.as_str()).collect();
        assert_eq!(ids, ["dbg-http", "dbg-grpc"]);
        if page.events.iter().all(|e| e.delivered) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never delivered: {page:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // SIGTERM: the open tail ends cleanly and does not hold up the graceful exit.
    let (ended, exited) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(30), tail.message()),
        tessera.terminate()
    );
    let ended = ended.expect("the tail ends on shutdown");
    assert!(
        matches!(ended, Ok(None)),
        "a clean end of stream: {ended:?}"
    );
    assert!(exited, "tessera exits cleanly with a tail open");
}
