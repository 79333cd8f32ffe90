//! Serving: the gRPC port (every registered service plus health and reflection) and the admin
//! HTTP port (`/healthz`, `/metrics` and any HTTP routes a service adds), with graceful shutdown.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic_health::ServingStatus;
use tower_http::classify::{GrpcCode, GrpcErrorsAsFailures, SharedClassifier};
use tower_http::trace::TraceLayer;

use crate::access::{Access, AccessLayer};
use crate::tls::{RequireClientCertLayer, Tls};
use crate::trace_context::{Port, server_span};

pub use tokio_util::sync::CancellationToken as Shutdown;

/// Limits and timings of the server edge.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeSettings {
    /// The longest a request may take before it fails with a timeout (CANCELLED), in
    /// milliseconds; the caller's own deadline (`grpc-timeout`) applies too, whichever is
    /// shorter. Methods a service declares long-running
    /// ([`GrpcServices::without_request_timeout`]) are bounded by the caller's deadline only.
    pub request_timeout_ms: u64,
    /// The most requests served at once per connection.
    pub concurrency_limit_per_connection: usize,
    /// The largest HTTP request body accepted on the HTTP port, in bytes.
    pub max_http_body_bytes: usize,
    /// How long to report NOT_SERVING before closing the listeners on shutdown, in milliseconds,
    /// so load balancers stop sending new requests first.
    pub drain_ms: u64,
    /// How long an HTTP client may take to send a request's headers, in milliseconds, before
    /// it is disconnected (slow-loris clients and dead peers cannot hold connections open).
    pub http_header_timeout_ms: u64,
}

impl Default for EdgeSettings {
    fn default() -> Self {
        Self {
            request_timeout_ms: 30_000,
            concurrency_limit_per_connection: 256,
            max_http_body_bytes: 4 * 1024 * 1024,
            drain_ms: 0,
            http_header_timeout_ms: 10_000,
        }
    }
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The HTTP server failed.
    #[error("http server: {0}")]
    Http(#[from] std::io::Error),
    /// The reflection service could not be built.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// The gRPC services one process serves, collected before serving.
#[derive(Default)]
pub struct GrpcServices {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    access: Option<Access>,
    long_running: HashSet<String>,
}

impl std::fmt::Debug for GrpcServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServices")
            .field("names", &self.names)
            .field("long_running", &self.long_running)
            .finish()
    }
}

impl GrpcServices {
    /// Adds a generated tonic server; its health status is reported under its full name.
    pub fn add<S>(&mut self, service: S) -> &mut Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Requires access tokens on the external services, by [`crate::access::GRPC_RULES`], and
    /// audit-logs their admin, privacy and write calls.
    pub fn require_tokens(&mut self, access: Access) -> &mut Self {
        self.access = Some(access);
        self
    }

    /// The full names of the services added so far.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }

    /// Serves the method `path` (`/package.Service/Method`) without the server's request
    /// timeout (`request_timeout_ms`): only the caller's own deadline (`grpc-timeout`) bounds
    /// it. For calls that last as long as their work, which the server cannot bound better
    /// than the caller: a unary call that waits for a job, a client-streamed bulk load (its
    /// response comes after the last message). Every other method keeps the timeout. On
    /// shutdown such a call still in flight gets `request_timeout_ms` to end, then fails with
    /// UNAVAILABLE, so a shutdown never waits for it longer than for any other call.
    pub fn without_request_timeout(&mut self, path: impl Into<String>) -> &mut Self {
        let path = path.into();
        debug_assert!(
            path.starts_with('/') && path[1..].split('/').count() == 2,
            "{path} is not a gRPC method path"
        );
        self.long_running.insert(path);
        self
    }

    /// The methods served without the server's request timeout, by path.
    pub fn long_running(&self) -> impl Iterator<Item = &str> {
        self.long_running.iter().map(String::as_str)
    }
}

/// The process-wide Prometheus recorder, installed on first use.
/// The buckets of every `*_seconds` histogram, in seconds.
const DURATION_BUCKETS: [f64; 17] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Durations are histograms with fixed buckets, not per-process summaries, so
            // Prometheus can aggregate them across replicas (`histogram_quantile` over the
            // `_bucket` series); the buckets span a fast cache hit to a slow delivery round.
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &DURATION_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new())
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be global (a test harness); ours still renders
            // whatever is recorded through it.
            let _ = metrics::set_global_recorder(recorder);
            spawn_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// How often recorded histogram samples are folded into their buckets.
const METRICS_UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds recorded histogram samples into their buckets every few seconds. The recorder keeps
/// each sample until upkeep or a scrape of `/metrics` drains it, so without this a service
/// nobody scrapes grows by every request it times (the profile service gained about 20 MB in a
/// 30-minute soak). A plain thread, not a task: the handle may be made before any runtime runs,
/// and the thread lives as long as the process, as the recorder does.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(METRICS_UPKEEP_EVERY);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "metrics upkeep thread not started, histograms drain only when scraped");
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
pub fn shutdown_on_signal(shutdown: Shutdown) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            () = term => {}
        }
        tracing::info!("shutdown signal received");
        shutdown.cancel();
    });
}

/// Serves `services` on `grpc` and the admin routes plus `http_routes` on `http` until
/// `shutdown` is cancelled; then reports NOT_SERVING, waits `drain_ms`, and lets in-flight
/// requests finish.
pub async fn serve(
    settings: &EdgeSettings,
    grpc: TcpListener,
    http: TcpListener,
    services: GrpcServices,
    http_routes: axum::Router,
    shutdown: Shutdown,
) -> Result<(), ServeError> {
    let listeners = Listeners {
        grpc,
        http,
        probe: None,
    };
    serve_with(settings, listeners, None, services, http_routes, shutdown).await
}

/// The ports one process serves.
#[derive(Debug)]
pub struct Listeners {
    /// Every gRPC service, health and reflection.
    pub grpc: TcpListener,
    /// The HTTP APIs, `/healthz` and `/metrics`.
    pub http: TcpListener,
    /// Plaintext gRPC health only (`grpc.health.v1`), for probes that cannot speak TLS
    /// (Kubernetes' gRPC probes).
    pub probe: Option<TcpListener>,
}

/// [`serve`] on `listeners`, the gRPC port with `tls` when given: mutual TLS, where the
/// internal services answer only clients with a certificate of the CA (see [`crate::tls`]).
pub async fn serve_with(
    settings: &EdgeSettings,
    listeners: Listeners,
    tls: Option<&Tls>,
    services: GrpcServices,
    http_routes: axum::Router,
    shutdown: Shutdown,
) -> Result<(), ServeError> {
    let Listeners { grpc, http, probe } = listeners;
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in &services.names {
        reporter
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tessera_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let access = services.access;
    let long_running = Arc::new(services.long_running);
    let request_timeout = Duration::from_millis(settings.request_timeout_ms);
    let mut routes = services.routes;
    routes.add_service(health.clone()).add_service(reflection);

    let draining = Arc::new(AtomicBool::new(false));
    let drained = Shutdown::new();
    {
        let (shutdown, drained, draining) = (shutdown.clone(), drained.clone(), draining.clone());
        let names = services.names.clone();
        let drain = Duration::from_millis(settings.drain_ms);
        tokio::spawn(async move {
            shutdown.cancelled().await;
            draining.store(true, Ordering::SeqCst);
            for name in names {
                reporter
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            reporter
                .set_service_status("", ServingStatus::NotServing)
                .await;
            tokio::time::sleep(drain).await;
            drained.cancel();
        });
    }

    // Answers about the call, not failures of the server: the request trace logs failures at
    // ERROR, and a refused call (no token, another scope, over a rate limit, a stale version)
    // is the caller's doing. Counted per code in the RPC metrics all the same.
    let classifier = GrpcErrorsAsFailures::new()
        .with_success(GrpcCode::NotFound)
        .with_success(GrpcCode::InvalidArgument)
        .with_success(GrpcCode::AlreadyExists)
        .with_success(GrpcCode::Unauthenticated)
        .with_success(GrpcCode::PermissionDenied)
        .with_success(GrpcCode::ResourceExhausted)
        .with_success(GrpcCode::FailedPrecondition)
        .with_success(GrpcCode::OutOfRange)
        .with_success(GrpcCode::Cancelled);
    // The request timeout is Tessera's own layer, not tonic's `Server::timeout` (one timeout
    // for every method): long-running methods are exempt. tonic still applies the caller's
    // `grpc-timeout` to every call. Inside the trace and the metrics, so a timed-out call is
    // counted with its code.
    let grpc_router = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(settings.concurrency_limit_per_connection)
        .layer(
            TraceLayer::new(SharedClassifier::new(classifier))
                .make_span_with(|r: &http::Request<_>| server_span(Port::Grpc, r)),
        )
        .layer(tower::layer::layer_fn(GrpcMetrics::new))
        .layer(tower::layer::layer_fn({
            let drained = drained.clone();
            move |inner| RequestTimeout {
                inner,
                timeout: request_timeout,
                long_running: Arc::clone(&long_running),
                drained: drained.clone(),
            }
        }))
        .layer(RequireClientCertLayer::new(tls))
        .layer(AccessLayer::new(access))
        .add_routes(routes.routes());
    // TCP_NODELAY on every accepted connection: without it a small response (most unary
    // answers) can wait for the peer's delayed ACK, ~40 ms per call on Linux. tonic sets it
    // only on listeners it binds itself. With TLS the handshakes are Tessera's own (not tonic's
    // ServerTlsConfig, fixed once built), so a certificate or CA replaced on disk is used for
    // new connections without a restart; the reload task follows the files while serving.
    let grpc_server = {
        let tls = tls.cloned();
        let drained = drained.clone();
        async move {
            match tls {
                Some(tls) => {
                    tls.spawn_reload(drained.clone());
                    let incoming = tls.incoming(grpc, drained.clone());
                    grpc_router
                        .serve_with_incoming_shutdown(incoming, drained.cancelled_owned())
                        .await
                }
                None => {
                    grpc_router
                        .serve_with_incoming_shutdown(
                            tonic::transport::server::TcpIncoming::from(grpc)
                                .with_nodelay(Some(true)),
                            drained.cancelled_owned(),
                        )
                        .await
                }
            }
        }
    };
    let probe_server = {
        let drained = drained.clone();
        async move {
            match probe {
                Some(probe) => {
                    tonic::transport::Server::builder()
                        .add_service(health)
                        .serve_with_incoming_shutdown(
                            tonic::transport::server::TcpIncoming::from(probe)
                                .with_nodelay(Some(true)),
                            drained.cancelled_owned(),
                        )
                        .await
                }
                None => Ok(()),
            }
        }
    };

    let metrics = metrics_handle();
    let max_body = settings.max_http_body_bytes;
    let admin = axum::Router::new()
        .route(
            "/healthz",
            axum::routing::get(move || {
                let draining = draining.load(Ordering::SeqCst);
                async move {
                    if draining {
                        (http::StatusCode::SERVICE_UNAVAILABLE, "draining")
                    } else {
                        (http::StatusCode::OK, "ok")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let body = metrics.render();
                async move { body.into_response() }
            }),
        )
        .merge(http_routes)
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            settings.max_http_body_bytes,
        ))
        .layer(axum::middleware::map_response(move |response| {
            json_payload_too_large(response, max_body)
        }))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|r: &http::Request<_>| server_span(Port::Http, r)),
        )
        .layer(axum::middleware::from_fn(http_metrics));
    let http_server = serve_http(
        http,
        admin,
        drained.clone(),
        Duration::from_millis(settings.http_header_timeout_ms),
    );

    let (grpc_result, http_result, probe_result) =
        tokio::join!(grpc_server, http_server, probe_server);
    grpc_result?;
    http_result?;
    probe_result?;
    Ok(())
}

/// Serves `app` on `listener` over HTTP/1.1 until `stop`, then lets the open requests finish
/// (at most 30 s). Unlike `axum::serve` it reads request headers with a deadline: a client that
/// has not sent its whole header within `header_timeout` (a slow-loris, or a dead peer) is
/// disconnected, so idle connections cannot pile up. Each connection sets TCP_NODELAY
/// (tracking-API answers are small) and gives handlers the peer address (`ConnectInfo`, e.g.
/// Segment's `context.ip`).
async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    stop: Shutdown,
    header_timeout: Duration,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    tracing::warn!(%error, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set");
        }
        let service = tower::ServiceExt::map_request(
            app.clone(),
            move |mut request: http::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                request
            },
        );
        let connection = builder.serve_connection(
            TokioIo::new(stream),
            hyper_util::service::TowerToHyperService::new(service),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP connection closed");
            }
        });
    }
    if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP requests still open 30 s after shutdown began; closing them");
    }
    Ok(())
}

/// Records `tessera_http_requests_total` (by method, route and status) and
/// `tessera_http_request_duration_seconds` (by method and route) for every HTTP request. The
/// route is the matched route's template (`/v1/spaces/{space}/…`), never the raw path, which
/// may carry an identifier such as an email; requests no route matched count as `unmatched`.
async fn http_metrics(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(
        "tessera_http_requests_total",
        "method" => method.clone(),
        "route" => route.clone(),
        "status" => status
    )
    .increment(1);
    metrics::histogram!(
        "tessera_http_request_duration_seconds",
        "method" => method,
        "route" => route
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// Records `tessera_grpc_requests_total` and `tessera_grpc_request_duration_seconds` per method
/// and status code, and reports oversized request messages as RESOURCE_EXHAUSTED.
#[derive(Debug, Clone)]
struct GrpcMetrics<S> {
    inner: S,
}

impl<S> GrpcMetrics<S> {
    fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = method_label(req.uri().path());
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut result = fut.await;
            if let Ok(resp) = &mut result {
                oversize_is_resource_exhausted(resp.headers_mut());
                decode_failure_is_invalid_argument(resp.headers_mut());
            }
            // Errors are sent trailers-only, so their code is in the headers; a response
            // without grpc-status in its headers carries OK in its trailers.
            let code = match &result {
                Ok(resp) => code_label(resp.headers().get("grpc-status")),
                Err(_) => "transport",
            };
            metrics::counter!("tessera_grpc_requests_total", "method" => method, "code" => code)
                .increment(1);
            metrics::histogram!("tessera_grpc_request_duration_seconds", "method" => method)
                .record(start.elapsed().as_secs_f64());
            result
        })
    }
}

/// The `method` label of a call to `path` in the RPC metrics: the path when it names a method
/// Tessera serves (every method of its `.proto` files, health and reflection), `unknown`
/// otherwise, so made-up paths cannot make unbounded series. Static strings: no allocation per
/// call.
fn method_label(path: &str) -> &'static str {
    static KNOWN: OnceLock<HashSet<&'static str>> = OnceLock::new();
    KNOWN
        .get_or_init(known_methods)
        .get(path)
        .copied()
        .unwrap_or("unknown")
}

/// The path of every method Tessera serves; made once per process (a fixed set, leaked).
fn known_methods() -> HashSet<&'static str> {
    use prost::Message as _;
    let mut known: HashSet<&'static str> = [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ]
    .into();
    match prost_types::FileDescriptorSet::decode(tessera_proto::FILE_DESCRIPTOR_SET) {
        Ok(set) => {
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        let path =
                            format!("/{}.{}/{}", file.package(), service.name(), method.name());
                        known.insert(Box::leak(path.into_boxed_str()));
                    }
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "the descriptor set does not decode: RPC metrics name no method")
        }
    }
    known
}

/// The `code` label of a response whose headers hold `status` (`grpc-status`: an error sent
/// trailers-only); none means OK, sent in the trailers.
fn code_label(status: Option<&http::HeaderValue>) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    match status {
        None => "0",
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| CODES.iter().find(|code| **code == v))
            .copied()
            .unwrap_or("unknown"),
    }
}

/// Fails a call that takes longer than `timeout` with CANCELLED ("Timeout expired", as tonic's
/// `Server::timeout` did), unless its method is one of `long_running`. A long-running call
/// still in flight when the server stops taking requests (`drained`) gets `timeout` more, then
/// fails with UNAVAILABLE: the graceful shutdown waits for every call, and must not wait for a
/// job of minutes. The handler's future is dropped then; work it handed to a task of its own
/// goes on while the process does.
#[derive(Debug, Clone)]
struct RequestTimeout<S> {
    inner: S,
    timeout: Duration,
    long_running: Arc<HashSet<String>>,
    drained: Shutdown,
}

impl<S, B, R> tower::Service<http::Request<B>> for RequestTimeout<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>, Error = Infallible>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let exempt = self.long_running.contains(req.uri().path());
        let timeout = self.timeout;
        let fut = self.inner.call(req);
        if exempt {
            let drained = self.drained.clone();
            return Box::pin(async move {
                let mut fut = std::pin::pin!(fut);
                tokio::select! {
                    result = &mut fut => result,
                    () = drained.cancelled() => {
                        match tokio::time::timeout(timeout, fut).await {
                            Ok(result) => result,
                            Err(_) => Ok(tonic::Status::unavailable(
                                "the server shut down before the call ended",
                            )
                            .into_http()),
                        }
                    }
                }
            });
        }
        Box::pin(async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(result) => result,
                Err(_) => Ok(tonic::Status::cancelled("Timeout expired").into_http()),
            }
        })
    }
}

/// tonic rejects a request message above the decoding limit with OUT_OF_RANGE; the gRPC spec (and
/// Tessera's contract) says RESOURCE_EXHAUSTED, which clients treat as "too large".
fn oversize_is_resource_exhausted(headers: &mut http::HeaderMap) {
    let oversize = headers.get("grpc-status").is_some_and(|v| v == "11")
        && headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| {
                m.contains("message%20length%20too%20large")
                    || m.contains("message length too large")
            });
    if oversize {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static("request message larger than the server accepts"),
        );
    }
}

/// tonic reports a request message that does not decode (invalid UTF-8 in a `string`, a wrong
/// wire type, a truncated field, nesting past prost's recursion limit) as INTERNAL, as if the
/// server had failed. It is the caller's doing: INVALID_ARGUMENT, with a `BadRequest` detail
/// naming the field prost was decoding (`events.properties`, without indexes: prost does not
/// track them) and what was wrong with it.
fn decode_failure_is_invalid_argument(headers: &mut http::HeaderMap) {
    if headers.get("grpc-status").is_none_or(|v| v != "13") {
        return;
    }
    let Some(status) = tonic::Status::from_header_map(headers) else {
        return;
    };
    let Some(detail) = status
        .message()
        .strip_prefix("failed to decode Protobuf message: ")
    else {
        return;
    };
    let violation = decode_violation(detail);
    let status = crate::error::invalid_argument(&[violation]);
    headers.remove("grpc-message");
    headers.remove("grpc-status-details-bin");
    if status.add_header(headers).is_err() {
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static("the request message is not valid protobuf"),
        );
    }
}

/// The violation of a prost decode error's text: `Inner.field: Outer.field: what went wrong`,
/// innermost first, becomes the field `field.field` (outermost first) and what went wrong.
fn decode_violation(detail: &str) -> tessera_core::FieldViolation {
    let is_ident = |s: &str| {
        s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let mut fields = Vec::new();
    let mut rest = detail;
    while let Some((head, tail)) = rest.split_once(": ") {
        match head.split_once('.') {
            Some((message, field)) if is_ident(message) && is_ident(field) => {
                fields.push(field);
                rest = tail;
            }
            _ => break,
        }
    }
    fields.reverse();
    let field = if fields.is_empty() {
        "request".to_owned()
    } else {
        fields.join(".")
    };
    tessera_core::FieldViolation::new(
        field,
        format!("the request message is not valid protobuf: {rest}"),
    )
}

/// The body limit's own 413 is plain text; every HTTP error of Tessera is JSON that names the
/// problem, so this one is rewritten.
async fn json_payload_too_large(
    response: axum::response::Response,
    limit: usize,
) -> axum::response::Response {
    let is_json = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if response.status() != http::StatusCode::PAYLOAD_TOO_LARGE || is_json {
        return response;
    }
    let body = format!(
        r#"{{"code":"payload_too_large","message":"the request body is larger than the server accepts ({limit} bytes)"}}"#
    );
    (
        http::StatusCode::PAYLOAD_TOO_LARGE,
        [(http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_metrics_name_served_methods_and_codes_and_nothing_else() {
        for served in [
            "/tessera.profile.v1.ProfileService/GetProfile",
            "/tessera.ingestion.v1.IngestionService/IngestEvents",
            "/tessera.identity.v1.IdentityService/ResolveIdentities",
            "/grpc.health.v1.Health/Check",
        ] {
            assert_eq!(method_label(served), served);
        }
        for made_up in [
            "/tessera.profile.v1.ProfileService/Nope",
            "/x.Y/Z",
            "",
            "/tessera.profile.v1.ProfileService/GetProfile/",
        ] {
            assert_eq!(method_label(made_up), "unknown", "{made_up:?}");
        }
        let header = |v: &str| http::HeaderValue::from_str(v).unwrap();
        assert_eq!(code_label(None), "0");
        assert_eq!(code_label(Some(&header("5"))), "5");
        assert_eq!(code_label(Some(&header("16"))), "16");
        assert_eq!(code_label(Some(&header("17"))), "unknown");
        assert_eq!(code_label(Some(&header("05"))), "unknown");
    }

    fn status_of(message: &str) -> tonic::Status {
        let mut headers = http::HeaderMap::new();
        tonic::Status::internal(message)
            .add_header(&mut headers)
            .unwrap();
        decode_failure_is_invalid_argument(&mut headers);
        tonic::Status::from_header_map(&headers).unwrap()
    }

    #[test]
    fn decode_failures_are_invalid_argument_naming_the_field() {
        let status = status_of(
            "failed to decode Protobuf message: Event.message_id: IngestEventsRequest.events: \
             invalid string value: data is not UTF-8 encoded",
        );
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "events.message_id: the request message is not valid protobuf: invalid string \
             value: data is not UTF-8 encoded"
        );
        let status = status_of("failed to decode Protobuf message: invalid varint");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with("request: "), "{status:?}");
    }

    #[test]
    fn other_internal_errors_stay_internal() {
        let status = status_of("internal error");
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(status.message(), "internal error");
    }
}
