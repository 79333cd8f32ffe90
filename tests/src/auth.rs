//! The access token every process the harness starts accepts (`auth.bootstrap_token`, every
//! scope), and channels whose calls carry it.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;

/// The bootstrap token (every scope) of every process the harness starts.
pub const E2E_TOKEN: &str = "tat_e2e-harness-bootstrap-token-with-every-scope";

/// A channel whose calls carry an access token (`authorization: Bearer`), unless the call
/// sets `authorization` itself (a write key as Basic auth).
pub type Channel = InterceptedService<tonic::transport::Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to calls without an `authorization`.
#[derive(Debug, Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0
            && !request.metadata().contains_key("authorization")
        {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// `channel` with [`E2E_TOKEN`] on every call.
pub fn authorized(channel: tonic::transport::Channel) -> Channel {
    with_token(channel, Some(E2E_TOKEN))
}

/// `channel` with `token` on every call (none: calls carry no token).
pub fn with_token(channel: tonic::transport::Channel, token: Option<&str>) -> Channel {
    let value = token.map(|t| format!("Bearer {t}").parse().expect("an ASCII token"));
    InterceptedService::new(channel, Bearer(value))
}
