//! The server edge shared by every Tessera service, written once: gRPC health and reflection,
//! request tracing and metrics, timeouts and concurrency limits, the admin HTTP port with
//! `/healthz` and `/metrics`, telemetry (logs, OTLP traces) and graceful shutdown.

/// The router type of the HTTP port; services add their HTTP APIs to it.
pub use axum::Router as HttpRouter;

pub mod access;
mod auth;
mod edge;
mod error;
mod telemetry;
pub mod tls;
pub mod trace_context;

pub use auth::basic_auth_user;
pub use edge::{
    EdgeSettings, GrpcServices, Listeners, ServeError, Shutdown, metrics_handle, serve, serve_with,
    shutdown_on_signal,
};
pub use error::{http_status, internal, invalid_argument, status, status_with_retry};
pub use telemetry::{TelemetryError, TelemetryGuard, TelemetrySettings, init_telemetry};
