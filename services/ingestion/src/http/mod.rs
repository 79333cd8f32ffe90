//! The Segment-compatible HTTP tracking API (being built: see issue 3).

use crate::Ingestion;

/// The HTTP routes of the tracking API.
pub(crate) fn routes(_ingestion: Ingestion) -> tessera_server::HttpRouter {
    tessera_server::HttpRouter::new()
}
