//! The source debugger over gRPC: ListEvents pages and filters, TailEvents streams events
//! accepted after it started, also by another replica, and ends on shutdown.

use std::time::Duration;

use tessera_ingestion::{Ingestion, IngestionSettings, MIGRATIONS, SCHEMA};
use tessera_proto::common::v1::{Event, EventType};
use tessera_proto::ingestion::v1::debugger_service_client::DebuggerServiceClient;
use tessera_proto::ingestion::v1::{
    EventFilter, IngestEventsRequest, ListEventsRequest, TailEventsRequest, TailEventsResponse,
};
use tessera_server::{GrpcServices, Shutdown};
use tessera_store::{Database, DbSettings};
use tessera_testkit::GrpcTestServer;
use tonic::Streaming;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::track;

/// One ingestion replica: its server, and the stop signal of its delivery (and tails).
struct Replica {
    server: GrpcTestServer,
    stop: Shutdown,
    _delivery: tokio::task::JoinHandle<()>,
}

/// The fixture of the debugger tests: one replica on a fresh database, and a channel to it.
async fn fixture(backend: crate::Backend) -> ((crate::TestDatabase, Replica), Channel) {
    let db = crate::TestDatabase::new(backend).await;
    let replica = replica(&db.url()).await;
    let channel = replica.server.channel().await;
    ((db, replica), channel)
}

async fn replica(url: &str) -> Replica {
    replica_with(url, IngestionSettings::default()).await
}

async fn replica_with(url: &str, settings: IngestionSettings) -> Replica {
    let db = Database::connect(url, SCHEMA, &DbSettings::default())
        .await
        .unwrap();
    db.migrate(MIGRATIONS).await.unwrap();
    let ingestion = Ingestion::new(db, settings).await.unwrap();
    crate::sources::with_test_source(&ingestion).await;
    // Peers that never answer: these tests look at the log, not at delivery.
    let nowhere = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
    let stop = Shutdown::new();
    let delivery = ingestion.spawn_delivery(nowhere.clone(), nowhere, stop.clone());
    let mut services = GrpcServices::default();
    ingestion.register(&mut services);
    Replica {
        server: GrpcTestServer::start(services).await,
        stop,
        _delivery: delivery,
    }
}

fn debugger(channel: Channel) -> DebuggerServiceClient<Channel> {
    DebuggerServiceClient::new(channel)
}

fn identify(message_id: &str, user_id: &str) -> Event {
    Event {
        message_id: message_id.to_owned(),
        r#type: EventType::Identify.into(),
        user_id: user_id.to_owned(),
        ..Event::default()
    }
}

async fn ingest(channel: Channel, events: Vec<Event>) {
    crate::sources::client(channel)
        .ingest_events(IngestEventsRequest { events })
        .await
        .expect("ingest");
}

fn list(page_size: i32, page_token: &str, filter: Option<EventFilter>) -> ListEventsRequest {
    ListEventsRequest {
        source_name: "default".into(),
        page_size,
        page_token: page_token.to_owned(),
        filter,
    }
}

fn message_ids(events: &[tessera_proto::ingestion::v1::DebugEvent]) -> Vec<String> {
    events.iter().map(|e| e.message_id.clone()).collect()
}

/// The message ids of every page of `ListEvents`, following `next_page_token` to the end.
async fn walk_pages(
    client: &mut DebuggerServiceClient<Channel>,
    page_size: i32,
    filter: Option<EventFilter>,
) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_events(list(page_size, &token, filter.clone()))
            .await
            .unwrap()
            .into_inner();
        pages.push(message_ids(&page.events));
        if page.next_page_token.is_empty() {
            return pages;
        }
        token = page.next_page_token;
    }
}

async fn lists_events_newest_first_in_pages_with_filters(channel: Channel) {
    // Separate requests, so the order of acceptance is the order of the ids.
    for i in 1..=5 {
        ingest(
            channel.clone(),
            vec![track(
                &format!("t{i}"),
                "u1",
                if i % 2 == 0 { "Even" } else { "Odd" },
            )],
        )
        .await;
    }
    ingest(channel.clone(), vec![identify("i1", "u1")]).await;
    let mut client = debugger(channel);

    let pages = walk_pages(&mut client, 2, None).await;
    assert_eq!(
        pages,
        [vec!["i1", "t5"], vec!["t4", "t3"], vec!["t2", "t1"]]
    );

    let first = client
        .list_events(list(0, "", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.events.len(), 6, "the default page holds them all");
    assert!(first.next_page_token.is_empty());
    let newest = &first.events[0];
    assert!(!newest.event_id.is_empty());
    assert!(newest.receive_time.is_some());
    assert!(
        !newest.delivered,
        "nothing is delivered: the peers never answer"
    );
    let event = newest.event.as_ref().expect("the stored event");
    assert_eq!(event.r#type, EventType::Identify as i32);
    assert_eq!(event.user_id, "u1");
    assert!(
        event.received_at.is_some(),
        "as stored, with its receive time"
    );

    let tracks = Some(EventFilter {
        r#type: EventType::Track.into(),
        event_name: String::new(),
    });
    let got = client
        .list_events(list(0, "", tracks))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(message_ids(&got.events), ["t5", "t4", "t3", "t2", "t1"]);
    let even = Some(EventFilter {
        r#type: EventType::Unspecified.into(),
        event_name: "Even".into(),
    });
    let got = client
        .list_events(list(1, "", even.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(message_ids(&got.events), ["t4"]);
    let got = client
        .list_events(list(1, &got.next_page_token, even))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(message_ids(&got.events), ["t2"]);
    assert!(got.next_page_token.is_empty());
}

async fn rejects_unknown_sources_and_bad_pages(channel: Channel) {
    let mut client = debugger(channel);
    let unknown = client
        .list_events(ListEventsRequest {
            source_name: "nope".into(),
            ..list(0, "", None)
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let tail = client
        .tail_events(TailEventsRequest {
            source_name: "nope".into(),
            filter: None,
        })
        .await
        .unwrap_err();
    assert_eq!(tail.code(), tonic::Code::NotFound);

    let bad = client
        .list_events(list(
            501,
            "not-a-token",
            Some(EventFilter {
                r#type: 42,
                event_name: String::new(),
            }),
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let details = bad.get_error_details();
    let fields: Vec<_> = details
        .bad_request()
        .expect("BadRequest details")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(fields, ["page_size", "page_token", "filter.type"]);
    let negative = client.list_events(list(-1, "", None)).await.unwrap_err();
    assert_eq!(negative.code(), tonic::Code::InvalidArgument);
}

/// The next message of a tail, failing after 20 s (Postgres shows a row once every older
/// transaction of the cluster has ended, which other tests can delay).
async fn next(tail: &mut Streaming<TailEventsResponse>) -> TailEventsResponse {
    tokio::time::timeout(Duration::from_secs(20), tail.message())
        .await
        .expect("an event within 20 s")
        .expect("a message")
        .expect("the stream is open")
}

async fn open_tail(channel: Channel, filter: Option<EventFilter>) -> Streaming<TailEventsResponse> {
    debugger(channel)
        .tail_events(TailEventsRequest {
            source_name: "default".into(),
            filter,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn tails_events_accepted_after_it_started(channel: Channel) {
    ingest(channel.clone(), vec![track("old", "u1", "E")]).await;
    // Let the old event settle before the tail starts, so it is behind the head.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut tail = open_tail(channel.clone(), None).await;
    let mut tracks = open_tail(
        channel.clone(),
        Some(EventFilter {
            r#type: EventType::Track.into(),
            event_name: String::new(),
        }),
    )
    .await;
    ingest(channel.clone(), vec![identify("new1", "u1")]).await;
    ingest(channel.clone(), vec![track("new2", "u1", "E")]).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let message = next(&mut tail).await;
        assert_eq!(message.skipped, 0);
        let event = message.event.unwrap();
        assert_eq!(event.event.as_ref().unwrap().message_id, event.message_id);
        // An event accepted just before the tail started may show too.
        if event.message_id != "old" {
            got.push(event.message_id);
        }
    }
    assert_eq!(got, ["new1", "new2"]);
    // The filtered tail may show the old track event too (accepted just before it started),
    // never the identify.
    let mut first = next(&mut tracks).await.event.unwrap().message_id;
    if first == "old" {
        first = next(&mut tracks).await.event.unwrap().message_id;
    }
    assert_eq!(first, "new2", "the filter applies");
}

on_both_backends!(
    fixture;
    lists_events_newest_first_in_pages_with_filters,
    rejects_unknown_sources_and_bad_pages,
    tails_events_accepted_after_it_started,
);

/// Each page looks through at most `debugger_page_scan` log positions: where the filter matches
/// nothing there the page comes back short, even empty, with a token to look further down, and
/// walking the tokens finds every match.
#[tokio::test(flavor = "multi_thread")]
async fn a_page_looks_through_a_bounded_range_of_the_log() {
    let db = tessera_testkit::TestDb::new().await;
    let settings = IngestionSettings {
        debugger_page_scan: 3,
        ..IngestionSettings::default()
    };
    let replica = replica_with(db.url(), settings).await;
    let channel = replica.server.channel().await;
    // The log: one "Rare", five "Common", one "Rare" (one request each, in this order).
    let names = [
        "Rare", "Common", "Common", "Common", "Common", "Common", "Rare",
    ];
    for (i, name) in names.into_iter().enumerate() {
        ingest(channel.clone(), vec![track(&format!("t{i}"), "u1", name)]).await;
    }
    let rare = Some(EventFilter {
        event_name: "Rare".into(),
        ..EventFilter::default()
    });
    let pages = walk_pages(&mut debugger(channel), 10, rare).await;
    // Positions 5-7, 2-4, then 1.
    assert_eq!(pages, [vec!["t6"], vec![], vec!["t0"]]);
}

/// Two replicas on one database: a tail on one shows what the other accepts, found by polling.
#[tokio::test(flavor = "multi_thread")]
async fn a_tail_shows_events_accepted_by_another_replica() {
    let db = tessera_testkit::TestDb::new().await;
    let a = replica(db.url()).await;
    let b = replica(db.url()).await;
    let mut tail = open_tail(a.server.channel().await, None).await;
    ingest(b.server.channel().await, vec![track("via-b", "u2", "E")]).await;
    let event = next(&mut tail).await.event.unwrap();
    assert_eq!(event.message_id, "via-b");
    assert_eq!(event.event.unwrap().user_id, "u2");
}

/// Shutdown ends open tails cleanly (OK, end of stream), so they never hold up the drain.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_ends_open_tails() {
    let dir = tessera_testkit::TestSqlite::new();
    let replica = replica(&dir.url("ingestion.db")).await;
    let mut tail = open_tail(replica.server.channel().await, None).await;
    replica.stop.cancel();
    let end = tokio::time::timeout(Duration::from_secs(10), tail.message())
        .await
        .expect("the tail ends within 10 s");
    assert!(matches!(end, Ok(None)), "a clean end: {end:?}");
}

/// Each replica serves a bounded number of tails; one more is refused with a retry hint, and a
/// closed tail frees its place.
#[tokio::test(flavor = "multi_thread")]
async fn tails_per_replica_are_bounded() {
    let dir = tessera_testkit::TestSqlite::new();
    let replica = replica(&dir.url("ingestion.db")).await;
    let channel = replica.server.channel().await;
    let mut open = Vec::new();
    for _ in 0..64 {
        open.push(open_tail(channel.clone(), None).await);
    }
    let refused = debugger(channel.clone())
        .tail_events(TailEventsRequest {
            source_name: "default".into(),
            filter: None,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(refused.get_error_details().retry_info().is_some());
    drop(open.pop());
    // The closed tail's task notices within a poll and frees its place.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let again = debugger(channel.clone())
            .tail_events(TailEventsRequest {
                source_name: "default".into(),
                filter: None,
            })
            .await;
        match again {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted);
                assert!(tokio::time::Instant::now() < deadline, "never freed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
