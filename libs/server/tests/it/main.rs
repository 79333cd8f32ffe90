//! The server edge as a client sees it: health, reflection-free calls, metrics, and draining.

mod access;
mod timeouts;
mod tls;

use std::time::Duration;

use tessera_server::{EdgeSettings, GrpcServices, HttpRouter, Shutdown, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A plain HTTP/1.1 GET; returns the status code and body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

async fn health(channel: &Channel, service: &str) -> i32 {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread")]
async fn reports_health_and_metrics_and_drains_before_closing() {
    let mut services = GrpcServices::default();
    tessera_scoring::Scoring::new().register(&mut services);
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let shutdown = Shutdown::new();
    let settings = EdgeSettings {
        drain_ms: 1_500,
        ..EdgeSettings::default()
    };
    let token = shutdown.clone();
    let server = tokio::spawn(async move {
        serve(&settings, grpc, http, services, HttpRouter::new(), token).await
    });
    let channel = Channel::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let name = "tessera.scoring.v1.ScoringService";
    assert_eq!(health(&channel, name).await, ServingStatus::Serving as i32);
    assert_eq!(health(&channel, "").await, ServingStatus::Serving as i32);
    assert_eq!(http_get(http_addr, "/healthz").await.0, 200);

    // Reflection lists the registered service.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    })
    .await
    .unwrap();
    drop(tx);
    let mut replies =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            channel.clone(),
        )
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let reply = replies
        .message()
        .await
        .unwrap()
        .expect("a reflection reply");
    let listed = format!("{reply:?}");
    assert!(listed.contains(name), "{listed}");

    // A call is counted in /metrics by method and code.
    let _ = tessera_proto::scoring::v1::scoring_service_client::ScoringServiceClient::new(
        channel.clone(),
    )
    .score_profiles(tessera_proto::scoring::v1::ScoreProfilesRequest::default())
    .await;
    let (status, metrics) = http_get(http_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("tessera_grpc_requests_total")
            && metrics.contains("/tessera.scoring.v1.ScoringService/ScoreProfiles"),
        "{metrics}"
    );
    // Durations are histograms (aggregatable across replicas), and HTTP requests are counted
    // by route template and status.
    assert!(
        metrics.contains("tessera_grpc_request_duration_seconds_bucket{"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"tessera_http_requests_total{method="GET",route="/healthz",status="200"}"#),
        "{metrics}"
    );
    let _ = http_get(http_addr, "/no/such/route/ann@example.com").await;
    let (_, metrics) = http_get(http_addr, "/metrics").await;
    assert!(
        metrics.contains(r#"route="unmatched",status="404""#)
            && !metrics.contains("ann@example.com"),
        "{metrics}"
    );

    // A body over the edge's limit is refused before any handler, with a JSON answer.
    let mut stream = TcpStream::connect(http_addr).await.unwrap();
    let request = format!(
        "POST /v1/batch HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        EdgeSettings::default().max_http_body_bytes + 1
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(
        response.contains("application/json") && response.contains("payload_too_large"),
        "{response}"
    );

    // Shutdown: NOT_SERVING and /healthz 503 while draining, then the server stops.
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        health(&channel, name).await,
        ServingStatus::NotServing as i32
    );
    assert_eq!(http_get(http_addr, "/healthz").await.0, 503);
    let stopped = tokio::time::timeout(Duration::from_secs(10), server).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_messages_are_resource_exhausted() {
    let mut services = GrpcServices::default();
    tessera_scoring::Scoring::new().register(&mut services);
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    let shutdown = Shutdown::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        serve(
            &EdgeSettings::default(),
            grpc,
            http,
            services,
            HttpRouter::new(),
            token,
        )
        .await
    });
    let channel = Channel::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let huge = tessera_proto::scoring::v1::ScoreProfilesRequest {
        profiles: vec![tessera_proto::scoring::v1::ProfileFacts {
            profile_id: "x".repeat(80 * 1024 * 1024),
            ..Default::default()
        }],
        as_of: None,
    };
    let err =
        tessera_proto::scoring::v1::scoring_service_client::ScoringServiceClient::new(channel)
            .max_encoding_message_size(usize::MAX)
            .score_profiles(huge)
            .await
            .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    shutdown.cancel();
}

/// Slow-loris: a client that opens a connection and never finishes its request's headers (or
/// sends nothing) is disconnected after the header timeout, while a well-behaved client is
/// served meanwhile and afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn clients_that_never_finish_their_headers_are_disconnected() {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    let shutdown = Shutdown::new();
    let settings = EdgeSettings {
        http_header_timeout_ms: 300,
        ..EdgeSettings::default()
    };
    let token = shutdown.clone();
    let server = tokio::spawn(async move {
        serve(
            &settings,
            grpc,
            http,
            GrpcServices::default(),
            HttpRouter::new(),
            token,
        )
        .await
    });
    let mut partial = TcpStream::connect(http_addr).await.unwrap();
    partial
        .write_all(b"POST /v1/track HTTP/1.1\r\nHost: test\r\nContent-")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(http_addr).await.unwrap();
    assert_eq!(http_get(http_addr, "/healthz").await.0, 200);
    for (what, stream) in [("partial headers", &mut partial), ("nothing", &mut silent)] {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("a client that sent {what} is still connected after 5 s"));
        // Closed (EOF) or reset: either way the server let go of it.
        drop(closed);
        let text = String::from_utf8_lossy(&rest);
        assert!(
            rest.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{what}: {text}"
        );
    }
    assert_eq!(http_get(http_addr, "/healthz").await.0, 200);
    shutdown.cancel();
    server.await.unwrap().unwrap();
}
