//! The gRPC DebuggerService.

use tessera_proto::ingestion::v1 as pb;
use tessera_proto::ingestion::v1::debugger_service_server::{
    DebuggerService, DebuggerServiceServer,
};
use tonic::{Request, Response, Status};

use super::{DebuggerError, before_seq, debug_event, event_filter, page_size, page_token, tail};
use crate::Ingestion;

pub(crate) fn server(ingestion: Ingestion) -> DebuggerServiceServer<Ingestion> {
    DebuggerServiceServer::new(ingestion)
}

impl Ingestion {
    /// A page of the events of a source, newest first, and the token of the next page.
    async fn debug_list(
        &self,
        request: pb::ListEventsRequest,
    ) -> Result<pb::ListEventsResponse, DebuggerError> {
        let pb::ListEventsRequest {
            source_name,
            page_size: requested,
            page_token: token,
            filter,
        } = request;
        let mut violations = Vec::new();
        let size = page_size(requested).map_err(|v| violations.push(v)).ok();
        let before = before_seq(&token).map_err(|v| violations.push(v)).ok();
        let filter = event_filter(filter, "filter")
            .map_err(|vs| violations.extend(vs))
            .ok();
        let (Some(size), Some(before), Some(filter)) = (size, before, filter) else {
            return Err(DebuggerError::Invalid(violations));
        };
        let source = self.source_named(&source_name).await?;
        // One more than the page, to know whether another page follows.
        let page = self
            .log
            .list_page(
                &source.id.to_string(),
                &filter,
                before,
                size + 1,
                self.settings.debugger_page_scan,
            )
            .await?;
        let mut logged = page.events;
        let more = i64::try_from(logged.len()).unwrap_or(i64::MAX) > size;
        logged.truncate(usize::try_from(size).unwrap_or(usize::MAX));
        // A short page that stopped above the log's start continues below where it looked.
        let next_page_token = match (more, logged.last()) {
            (true, Some(last)) => page_token(last.cursor.seq),
            _ if page.floor > 1 => page_token(page.floor),
            _ => String::new(),
        };
        let events = logged
            .into_iter()
            .map(debug_event)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(pb::ListEventsResponse {
            events,
            next_page_token,
        })
    }

    /// Opens a tail of a source from the log's current head.
    async fn debug_tail(
        &self,
        request: pb::TailEventsRequest,
    ) -> Result<tail::TailStream, DebuggerError> {
        let pb::TailEventsRequest {
            source_name,
            filter,
        } = request;
        let filter = event_filter(filter, "filter").map_err(DebuggerError::Invalid)?;
        let source = self.source_named(&source_name).await?;
        let permit = self
            .debugger
            .tails
            .clone()
            .try_acquire_owned()
            .map_err(|_| DebuggerError::TooManyTails)?;
        let from = self.log.head().await?;
        Ok(tail::spawn(
            self.log.clone(),
            &self.debugger,
            source.id.to_string(),
            filter,
            from,
            permit,
        ))
    }
}

#[tonic::async_trait]
impl DebuggerService for Ingestion {
    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        Ok(Response::new(self.debug_list(request.into_inner()).await?))
    }

    type TailEventsStream = tail::TailStream;

    async fn tail_events(
        &self,
        request: Request<pb::TailEventsRequest>,
    ) -> Result<Response<Self::TailEventsStream>, Status> {
        let stream = self.debug_tail(request.into_inner()).await?;
        Ok(Response::new(stream))
    }
}
