//! Hostile input at the gRPC edge, against a real `tessera dev`: malformed protobuf (invalid
//! UTF-8, wrong wire types, truncation, nesting past the decoder's recursion limit) sent with a
//! raw codec, messages past the size limits, non-finite numbers, 10,000 traits, empty and missing
//! required fields, and calls without a token, with too small a token or with a key that is not
//! the source's. Each gets a clear status naming the problem, the process keeps answering, and
//! nothing of a refused request is stored.

use bytes::{Buf as _, BufMut as _};
use prost_types::value::Kind;
use tessera_proto::common::v1::{Event, EventType, Identifier};
use tessera_proto::ingestion::v1::debugger_service_client::DebuggerServiceClient;
use tessera_proto::ingestion::v1::ingestion_service_client::IngestionServiceClient;
use tessera_proto::ingestion::v1::source_service_client::SourceServiceClient;
use tessera_proto::ingestion::v1::{
    CreateSourceRequest, DisableSourceRequest, EventStatus, IngestEventsRequest, ListEventsRequest,
    StreamIngestEventsRequest,
};
use tessera_proto::profile::v1::definition_service_client::DefinitionServiceClient;
use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;
use tessera_proto::profile::v1::{
    AudienceDefinition, CreateAudienceRequest, GetAudienceRequest, GetProfileRequest,
    get_profile_request,
};
use tessera_tests::auth::with_token;
use tessera_tests::events::{identify, send, track};
use tessera_tests::{Channel, Tessera, TesseraBuilder, tessera_bin};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;

const INGEST: &str = "/tessera.ingestion.v1.IngestionService/IngestEvents";
const STREAM_INGEST: &str = "/tessera.ingestion.v1.IngestionService/StreamIngestEvents";
const GET_PROFILE: &str = "/tessera.profile.v1.ProfileService/GetProfile";
const CREATE_AUDIENCE: &str = "/tessera.profile.v1.DefinitionService/CreateAudience";
const CREATE_SOURCE: &str = "/tessera.ingestion.v1.SourceService/CreateSource";

/// Sends and receives message bytes as they are, so a test can send what no generated client
/// would encode.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        Self
    }

    fn decoder(&mut self) -> Self {
        Self
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// A request carrying `write_key` when given.
fn request<T>(message: T, write_key: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = write_key {
        request
            .metadata_mut()
            .insert("x-tessera-write-key", key.parse().unwrap());
    }
    request
}

/// One unary call of `path` with `body` as the request message's bytes.
async fn raw_unary(
    channel: &Channel,
    path: &'static str,
    body: Vec<u8>,
    write_key: Option<&str>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.unary(
        request(body, write_key),
        PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// One client-streaming call of `path` with `chunks` as the request messages' bytes.
async fn raw_stream(
    channel: &Channel,
    path: &'static str,
    chunks: Vec<Vec<u8>>,
    write_key: Option<&str>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let chunks = tonic::codegen::tokio_stream::iter(chunks);
    grpc.client_streaming(
        request(chunks, write_key),
        PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

// Hand-encoding of protobuf fields: a varint, a tag, a length-delimited field.
fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn bytes_field(number: u32, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 8);
    varint(u64::from(number) << 3 | 2, &mut out);
    varint(value.len() as u64, &mut out);
    out.extend_from_slice(value);
    out
}

fn varint_field(number: u32, value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    varint(u64::from(number) << 3, &mut out);
    varint(value, &mut out);
    out
}

/// A valid track event as `common.v1.Event` bytes, with `extra` fields appended.
fn event_bytes(message_id: &[u8], extra: &[u8]) -> Vec<u8> {
    let mut event = bytes_field(1, message_id);
    event.extend(varint_field(2, 2));
    event.extend(bytes_field(3, b"hostile-user"));
    event.extend(bytes_field(5, b"Hostile"));
    event.extend_from_slice(extra);
    event
}

/// A `google.protobuf.Struct` of `{"a": {"a": ... }}` nested `depth` structs deep.
fn nested_struct(depth: usize) -> Vec<u8> {
    let mut inner = Vec::new();
    for _ in 0..depth {
        // Value { struct_value = 5: Struct { fields = 1: entry { key = 1, value = 2 } } }
        let value = bytes_field(5, &inner);
        let mut entry = bytes_field(1, b"a");
        entry.extend(bytes_field(2, &value));
        inner = bytes_field(1, &entry);
    }
    inner
}

/// Asserts `result` failed with `code` and a message that mentions `needle`.
#[track_caller]
fn assert_refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("the request was accepted");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{needle:?} not in {:?}",
        status.message()
    );
    // Nothing of the server's insides: no Rust or database error text.
    for leak in ["panicked", "sqlx", "SQLITE", "postgres", "/src/"] {
        assert!(!status.message().contains(leak), "{status:?}");
    }
}

/// The message ids of every event stored for `source`, by the debugger.
async fn stored_message_ids(channel: &Channel, source: &str) -> Vec<String> {
    let mut debugger = DebuggerServiceClient::new(channel.clone());
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = debugger
            .list_events(ListEventsRequest {
                source_name: source.to_owned(),
                page_size: 500,
                page_token,
                filter: None,
            })
            .await
            .expect("list events")
            .into_inner();
        ids.extend(page.events.into_iter().map(|e| e.message_id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        page_token = page.next_page_token;
    }
}

/// The process still takes a valid event, `message_id`, and answers a read.
async fn still_serving(channel: &Channel, key: &str, message_id: &str) {
    let statuses = send(
        channel,
        key,
        vec![track(
            message_id,
            "ok-user",
            "",
            "Ok",
            serde_json::json!({}),
        )],
    )
    .await
    .expect("a valid event after a hostile one");
    assert_eq!(statuses, vec![EventStatus::Accepted as i32]);
    let read = DefinitionServiceClient::new(channel.clone())
        .get_audience(GetAudienceRequest {
            name: "no_such_audience".to_owned(),
        })
        .await;
    assert_eq!(read.unwrap_err().code(), Code::NotFound);
}

async fn dev(data: &tempfile::TempDir) -> Tessera {
    TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_protobuf_is_invalid_argument_naming_the_field() {
    let data = tempfile::tempdir().unwrap();
    let tessera = dev(&data).await;
    let channel = tessera.channel().await;
    let key = tessera.dev_write_key().to_owned();
    let mut sent_ok = Vec::new();

    // Invalid UTF-8 in a string field of an event.
    let bad_utf8 = bytes_field(1, &event_bytes(b"\xff\xfe-bad", b""));
    assert_refused(
        raw_unary(&channel, INGEST, bad_utf8.clone(), Some(&key)).await,
        Code::InvalidArgument,
        "events.message_id",
    );
    still_serving(&channel, &key, "ok-1").await;
    sent_ok.push("ok-1");
    // The same through the stream, as its first chunk.
    assert_refused(
        raw_stream(&channel, STREAM_INGEST, vec![bad_utf8], Some(&key)).await,
        Code::InvalidArgument,
        "events.message_id",
    );
    // A wrong wire type: `events` (a message) sent as a varint.
    assert_refused(
        raw_unary(&channel, INGEST, varint_field(1, 7), Some(&key)).await,
        Code::InvalidArgument,
        "not valid protobuf",
    );
    // Truncated: a length that runs past the end of the message.
    let mut truncated = bytes_field(1, &event_bytes(b"m-trunc", b""));
    truncated.truncate(truncated.len() - 3);
    assert_refused(
        raw_unary(&channel, INGEST, truncated, Some(&key)).await,
        Code::InvalidArgument,
        "not valid protobuf",
    );
    // Properties nested past prost's recursion limit (100).
    let deep = bytes_field(
        1,
        &event_bytes(b"m-deep", &bytes_field(10, &nested_struct(150))),
    );
    assert_refused(
        raw_unary(&channel, INGEST, deep, Some(&key)).await,
        Code::InvalidArgument,
        "recursion limit",
    );
    still_serving(&channel, &key, "ok-2").await;
    sent_ok.push("ok-2");

    // The read and write RPCs of the profile service and the admin API.
    assert_refused(
        raw_unary(&channel, GET_PROFILE, bytes_field(1, b"\xc3\x28"), None).await,
        Code::InvalidArgument,
        // The oneof that holds profile_id: prost names the oneof.
        "lookup: the request message is not valid protobuf",
    );
    let audience = [
        bytes_field(1, b"hostile"),
        bytes_field(2, b"{\"not\xff\":1}"),
    ]
    .concat();
    assert_refused(
        raw_unary(&channel, CREATE_AUDIENCE, bytes_field(1, &audience), None).await,
        Code::InvalidArgument,
        "audience.condition_json",
    );
    assert_refused(
        raw_unary(&channel, CREATE_SOURCE, varint_field(1, 1), None).await,
        Code::InvalidArgument,
        "not valid protobuf",
    );
    still_serving(&channel, &key, "ok-3").await;
    sent_ok.push("ok-3");

    let mut stored = stored_message_ids(&channel, "default").await;
    stored.sort();
    assert_eq!(stored, sent_ok, "only the valid events are stored");
    let missing = DefinitionServiceClient::new(channel.clone())
        .get_audience(GetAudienceRequest {
            name: "hostile".to_owned(),
        })
        .await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_and_non_finite_values_and_missing_fields_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let tessera = dev(&data).await;
    let channel = tessera.channel().await;
    let key = tessera.dev_write_key().to_owned();

    // NaN and infinities cannot be stored as JSON: refused, naming the field, not nulled.
    let mut nan = track("m-nan", "u-nan", "", "Priced", serde_json::json!({}));
    nan.properties = Some(prost_types::Struct {
        fields: [(
            "price".to_owned(),
            prost_types::Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        )]
        .into(),
    });
    assert_refused(
        send(&channel, &key, vec![nan]).await,
        Code::InvalidArgument,
        "events[0].properties.price",
    );
    let mut infinite = identify("m-inf", "u-inf", "", serde_json::json!({}));
    let list = prost_types::ListValue {
        values: vec![prost_types::Value {
            kind: Some(Kind::NumberValue(f64::NEG_INFINITY)),
        }],
    };
    infinite.traits = Some(prost_types::Struct {
        fields: [(
            "scores".to_owned(),
            prost_types::Value {
                kind: Some(Kind::ListValue(list)),
            },
        )]
        .into(),
    });
    assert_refused(
        send(&channel, &key, vec![infinite]).await,
        Code::InvalidArgument,
        "events[0].traits.scores[0]",
    );

    // 10,000 traits, and a 1 MB string: within the message limit, over an event's 32 KB.
    let many: serde_json::Map<_, _> = (0..10_000)
        .map(|i| (format!("trait_{i}"), serde_json::json!(i)))
        .collect();
    let wide = identify("m-wide", "u-wide", "", serde_json::Value::Object(many));
    assert_refused(
        send(&channel, &key, vec![wide]).await,
        Code::InvalidArgument,
        "events[0].traits",
    );
    let long = track(
        "m-long",
        "u-long",
        "",
        "Long",
        serde_json::json!({ "text": "x".repeat(1024 * 1024) }),
    );
    assert_refused(
        send(&channel, &key, vec![long]).await,
        Code::InvalidArgument,
        "events[0].properties",
    );
    // More events than a batch may hold.
    let flood: Vec<Event> = (0..2_501)
        .map(|i| {
            track(
                &format!("m-flood-{i}"),
                "u-flood",
                "",
                "F",
                serde_json::json!({}),
            )
        })
        .collect();
    assert_refused(
        send(&channel, &key, flood).await,
        Code::ResourceExhausted,
        "2501",
    );
    // A request message over the service's limit (16 MiB for ProfileService).
    let huge = GetProfileRequest {
        lookup: Some(get_profile_request::Lookup::ProfileId(
            "p".repeat(17 * 1024 * 1024),
        )),
        as_of: None,
        read_mask: None,
    };
    assert_refused(
        ProfileServiceClient::new(channel.clone())
            .get_profile(huge)
            .await,
        Code::ResourceExhausted,
        "larger than the server accepts",
    );
    // Over IngestionService's 96 MiB.
    let mut huge = bytes_field(1, &event_bytes(b"m-huge", b""));
    huge.extend(bytes_field(
        1,
        &event_bytes(b"m-huge-2", &bytes_field(5, &vec![b'x'; 97 * 1024 * 1024])),
    ));
    assert_refused(
        raw_unary(&channel, INGEST, huge, Some(&key)).await,
        Code::ResourceExhausted,
        "larger than the server accepts",
    );
    still_serving(&channel, &key, "ok-1").await;

    // Empty and missing required fields.
    assert_refused(
        send(&channel, &key, vec![Event::default()]).await,
        Code::InvalidArgument,
        "events[0].type",
    );
    let no_user = Event {
        message_id: "m-no-user".to_owned(),
        r#type: EventType::Identify.into(),
        ..Event::default()
    };
    assert_refused(
        send(&channel, &key, vec![no_user]).await,
        Code::InvalidArgument,
        "events[0].user_id",
    );
    assert_refused(
        ProfileServiceClient::new(channel.clone())
            .get_profile(GetProfileRequest::default())
            .await,
        Code::InvalidArgument,
        "lookup",
    );
    assert_refused(
        ProfileServiceClient::new(channel.clone())
            .get_profile(GetProfileRequest {
                lookup: Some(get_profile_request::Lookup::Identifier(Identifier {
                    r#type: "Not A Type".to_owned(),
                    value: String::new(),
                })),
                as_of: None,
                read_mask: None,
            })
            .await,
        Code::InvalidArgument,
        "identifier.type",
    );
    let mut definitions = DefinitionServiceClient::new(channel.clone());
    assert_refused(
        definitions
            .create_audience(CreateAudienceRequest { audience: None })
            .await,
        Code::InvalidArgument,
        "audience",
    );
    // A condition nested 10,000 deep: the JSON parser's own limit refuses it.
    let deep = format!("{}{}", "{\"not\":".repeat(10_000), "}".repeat(10_000));
    assert_refused(
        definitions
            .create_audience(CreateAudienceRequest {
                audience: Some(AudienceDefinition {
                    name: "deep".to_owned(),
                    condition_json: deep,
                    ..AudienceDefinition::default()
                }),
            })
            .await,
        Code::InvalidArgument,
        "audience.condition_json",
    );
    // Wrong types for a field: a string where the condition wants a number.
    let wrong = r#"{"trait":{"name":"age","op":"gt","value":"ten"}}"#;
    assert_refused(
        definitions
            .create_audience(CreateAudienceRequest {
                audience: Some(AudienceDefinition {
                    name: "wrong".to_owned(),
                    condition_json: wrong.to_owned(),
                    ..AudienceDefinition::default()
                }),
            })
            .await,
        Code::InvalidArgument,
        "audience.condition_json",
    );
    still_serving(&channel, &key, "ok-2").await;

    let mut stored = stored_message_ids(&channel, "default").await;
    stored.sort();
    assert_eq!(stored, ["ok-1", "ok-2"], "only the valid events are stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_without_the_right_credentials_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let tessera = dev(&data).await;
    let channel = tessera.channel().await;
    let key = tessera.dev_write_key().to_owned();
    let event = || vec![track("m-auth", "u-auth", "", "A", serde_json::json!({}))];
    let mut ingest = IngestionServiceClient::new(channel.clone());

    // No write key, a made-up one, and an access token where the write key goes.
    assert_refused(
        ingest
            .ingest_events(request(IngestEventsRequest { events: event() }, None))
            .await,
        Code::Unauthenticated,
        "",
    );
    assert_refused(
        send(&channel, "tsk_not-a-key", event()).await,
        Code::Unauthenticated,
        "",
    );
    assert_refused(
        send(&channel, tessera_tests::auth::E2E_TOKEN, event()).await,
        Code::Unauthenticated,
        "",
    );
    // The stream too, before reading a chunk.
    assert_refused(
        ingest
            .stream_ingest_events(request(
                tonic::codegen::tokio_stream::iter(vec![StreamIngestEventsRequest {
                    events: event(),
                }]),
                Some("tsk_not-a-key"),
            ))
            .await,
        Code::Unauthenticated,
        "",
    );
    // Another source's key once that source is disabled.
    let mut sources = SourceServiceClient::new(channel.clone());
    let other = sources
        .create_source(CreateSourceRequest {
            name: "other".to_owned(),
            ..CreateSourceRequest::default()
        })
        .await
        .expect("create source")
        .into_inner()
        .write_key;
    sources
        .disable_source(DisableSourceRequest {
            name: "other".to_owned(),
        })
        .await
        .expect("disable source");
    assert_refused(
        send(&channel, &other, event()).await,
        Code::Unauthenticated,
        "",
    );

    // The APIs that take an access token: none, the write key instead, too small a scope.
    let anonymous = with_token(tessera.raw_channel().await, None);
    let by_id = || GetProfileRequest {
        lookup: Some(get_profile_request::Lookup::ProfileId("p".to_owned())),
        as_of: None,
        read_mask: None,
    };
    assert_refused(
        ProfileServiceClient::new(anonymous)
            .get_profile(by_id())
            .await,
        Code::Unauthenticated,
        "",
    );
    let keyed = with_token(tessera.raw_channel().await, Some(&key));
    assert_refused(
        ProfileServiceClient::new(keyed).get_profile(by_id()).await,
        Code::Unauthenticated,
        "",
    );
    let reader = reader_token(&data).await;
    let reader = with_token(tessera.raw_channel().await, Some(&reader));
    assert_refused(
        DefinitionServiceClient::new(reader.clone())
            .create_audience(CreateAudienceRequest {
                audience: Some(AudienceDefinition {
                    name: "by_reader".to_owned(),
                    condition_json: r#"{"all":[]}"#.to_owned(),
                    ..AudienceDefinition::default()
                }),
            })
            .await,
        Code::PermissionDenied,
        "",
    );
    assert_refused(
        SourceServiceClient::new(reader)
            .create_source(CreateSourceRequest {
                name: "by-reader".to_owned(),
                ..CreateSourceRequest::default()
            })
            .await,
        Code::PermissionDenied,
        "",
    );

    still_serving(&channel, &key, "ok-1").await;
    assert_eq!(stored_message_ids(&channel, "default").await, ["ok-1"]);
    assert!(stored_message_ids(&channel, "other").await.is_empty());
    let missing = DefinitionServiceClient::new(channel.clone())
        .get_audience(GetAudienceRequest {
            name: "by_reader".to_owned(),
        })
        .await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);
}

/// A stored token with only `profiles:read`, made with `tessera tokens create` on the dev
/// process's database.
async fn reader_token(data: &tempfile::TempDir) -> String {
    let db = format!("sqlite://{}", data.path().join("auth.db").display());
    let out = tokio::process::Command::new(tessera_bin())
        .args([
            "tokens",
            "create",
            "--name",
            "reader",
            "--scope",
            "profiles:read",
        ])
        .args(["--database-url", &db])
        .env_clear()
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run tessera tokens create");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let secret = stdout
        .lines()
        .find_map(|l| l.strip_prefix("tessera: access token reader: "))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| panic!("no secret in {stdout}"));
    // Token checks are cached for up to token_cache_ms (5 s by default) per replica; a new
    // token is looked up on first use, so no wait is needed.
    secret
}

#[tokio::test(flavor = "multi_thread")]
async fn nul_characters_are_refused_by_name_on_postgres() {
    // Postgres cannot store a NUL character in JSON: before the check, the whole batch failed at
    // the store with an internal error.
    let db = tessera_testkit::TestDb::new().await;
    let ingestion = TesseraBuilder::new("ingestion")
        .env("DATABASE_URL", db.url())
        .start()
        .await;
    let channel = ingestion.channel().await;
    let key = ingestion.create_source("nul").await;
    let nul = track(
        "m-nul",
        "u-nul",
        "",
        "Noted",
        serde_json::json!({"note": {"lines": ["ok", "a\u{0}b"]}}),
    );
    let valid = track("m-valid", "u-nul", "", "Noted", serde_json::json!({}));
    assert_refused(
        send(&channel, &key, vec![valid, nul]).await,
        Code::InvalidArgument,
        "events[1].properties.note.lines[1]",
    );
    let mut nul_id = track("m-nul-id", "u\u{0}", "", "Noted", serde_json::json!({}));
    nul_id.anonymous_id = "a".to_owned();
    assert_refused(
        send(&channel, &key, vec![nul_id]).await,
        Code::InvalidArgument,
        "events[0].user_id",
    );
    // All or nothing: the valid event of the refused batch was not stored either.
    still_ingesting(&channel, &key).await;
    assert_eq!(stored_message_ids(&channel, "nul").await, ["ok-pg"]);
}

/// The process still takes a valid event (`ok-pg`).
async fn still_ingesting(channel: &Channel, key: &str) {
    let statuses = send(
        channel,
        key,
        vec![track("ok-pg", "ok-user", "", "Ok", serde_json::json!({}))],
    )
    .await
    .expect("a valid event after a hostile one");
    assert_eq!(statuses, vec![EventStatus::Accepted as i32]);
}
