//! The edge's request timeout: every method is bounded by `request_timeout_ms` but those a
//! service declares long-running, which only the caller's own deadline bounds.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use tessera_server::{EdgeSettings, GrpcServices, HttpRouter, Shutdown, serve};
use tokio::net::TcpListener;
use tonic::transport::Channel;

/// A service whose every method sleeps for `0` and then answers an empty message.
#[derive(Debug, Clone)]
struct Slow(Duration);

impl tonic::server::NamedService for Slow {
    const NAME: &'static str = "tessera.test.v1.SlowService";
}

struct Sleep(Duration);

impl tonic::server::UnaryService<()> for Sleep {
    type Response = ();
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<tonic::Response<()>, tonic::Status>> + Send + 'static>,
    >;

    fn call(&mut self, _request: tonic::Request<()>) -> Self::Future {
        let delay = self.0;
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            Ok(tonic::Response::new(()))
        })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Slow {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let delay = self.0;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<(), ()>::default());
            Ok(grpc.unary(Sleep(delay), request).await)
        })
    }
}

const EXEMPT: &str = "/tessera.test.v1.SlowService/Exempt";
const BOUNDED: &str = "/tessera.test.v1.SlowService/Bounded";

/// Serves [`Slow`] (each call `delay`) with a 200 ms request timeout, `Exempt` long-running;
/// the server's task ends when it has stopped.
async fn slow_server(
    delay: Duration,
) -> (
    Channel,
    Shutdown,
    tokio::task::JoinHandle<Result<(), tessera_server::ServeError>>,
) {
    let mut services = GrpcServices::default();
    services.add(Slow(delay)).without_request_timeout(EXEMPT);
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    let shutdown = Shutdown::new();
    let settings = EdgeSettings {
        request_timeout_ms: 200,
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
    (channel, shutdown, server)
}

async fn call(
    channel: &Channel,
    path: &'static str,
    deadline: Option<Duration>,
) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(());
    if let Some(deadline) = deadline {
        request.set_timeout(deadline);
    }
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(path),
        tonic_prost::ProstCodec::<(), ()>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_running_method_outlives_the_request_timeout_and_others_do_not() {
    let (channel, shutdown, _server) = slow_server(Duration::from_millis(600)).await;

    let started = Instant::now();
    call(&channel, EXEMPT, None)
        .await
        .expect("a long-running method is not cut by the server's request timeout");
    assert!(started.elapsed() >= Duration::from_millis(600));

    let started = Instant::now();
    let err = call(&channel, BOUNDED, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Cancelled, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "cut at the request timeout, not when the handler ended"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_callers_deadline_still_bounds_a_long_running_method() {
    let (channel, shutdown, _server) = slow_server(Duration::from_millis(600)).await;
    let err = call(&channel, EXEMPT, Some(Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ),
        "{err:?}"
    );
    // A deadline longer than the server's timeout does not lift it for other methods.
    let err = call(&channel, BOUNDED, Some(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Cancelled, "{err:?}");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shutdown_waits_for_a_long_running_call_only_as_long_as_for_any_other() {
    let (channel, shutdown, server) = slow_server(Duration::from_secs(30)).await;
    let call = tokio::spawn(async move { call(&channel, EXEMPT, None).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    shutdown.cancel();
    let err = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call ends soon after the shutdown")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let stopped = tokio::time::timeout(Duration::from_secs(10), server).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}
