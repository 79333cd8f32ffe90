//! The gRPC SourceService: the admin API of sources.

use tessera_proto::ingestion::v1 as pb;
use tessera_proto::ingestion::v1::source_service_server::{SourceService, SourceServiceServer};
use tonic::{Request, Response, Status};

use super::convert::{plan_mode, rate_limit};
use super::error::SourceError;
use super::store::SourceChange;
use crate::Ingestion;

pub(crate) fn server(ingestion: Ingestion) -> SourceServiceServer<Ingestion> {
    SourceServiceServer::new(ingestion)
}

fn invalid(violation: tessera_core::FieldViolation) -> SourceError {
    SourceError::Invalid(vec![violation])
}

#[tonic::async_trait]
impl SourceService for Ingestion {
    async fn create_source(
        &self,
        request: Request<pb::CreateSourceRequest>,
    ) -> Result<Response<pb::CreateSourceResponse>, Status> {
        let target = tessera_server::access::AuditTarget::of(&request);
        let pb::CreateSourceRequest {
            name,
            rate_limit_per_second,
            tracking_plan_mode,
        } = request.into_inner();
        target.set(format!("source {name}"));
        let mode = plan_mode(tracking_plan_mode).map_err(invalid)?;
        let (record, key) = self
            .add_source(
                &name,
                rate_limit(rate_limit_per_second),
                mode.unwrap_or_default(),
            )
            .await?;
        Ok(Response::new(pb::CreateSourceResponse {
            source: Some((&record).into()),
            write_key: key.expose().to_owned(),
        }))
    }

    async fn list_sources(
        &self,
        request: Request<pb::ListSourcesRequest>,
    ) -> Result<Response<pb::ListSourcesResponse>, Status> {
        let pb::ListSourcesRequest {} = request.into_inner();
        let sources = self.all_sources().await?;
        Ok(Response::new(pb::ListSourcesResponse {
            sources: sources.iter().map(Into::into).collect(),
        }))
    }

    async fn get_source(
        &self,
        request: Request<pb::GetSourceRequest>,
    ) -> Result<Response<pb::GetSourceResponse>, Status> {
        let pb::GetSourceRequest { name } = request.into_inner();
        let record = self.source_named(&name).await?;
        Ok(Response::new(pb::GetSourceResponse {
            source: Some((&record).into()),
        }))
    }

    async fn disable_source(
        &self,
        request: Request<pb::DisableSourceRequest>,
    ) -> Result<Response<pb::DisableSourceResponse>, Status> {
        tessera_server::access::AuditTarget::of(&request)
            .set(format!("source {name}", name = request.get_ref().name));
        let pb::DisableSourceRequest { name } = request.into_inner();
        let record = self.set_source_enabled(&name, false).await?;
        Ok(Response::new(pb::DisableSourceResponse {
            source: Some((&record).into()),
        }))
    }

    async fn enable_source(
        &self,
        request: Request<pb::EnableSourceRequest>,
    ) -> Result<Response<pb::EnableSourceResponse>, Status> {
        tessera_server::access::AuditTarget::of(&request)
            .set(format!("source {name}", name = request.get_ref().name));
        let pb::EnableSourceRequest { name } = request.into_inner();
        let record = self.set_source_enabled(&name, true).await?;
        Ok(Response::new(pb::EnableSourceResponse {
            source: Some((&record).into()),
        }))
    }

    async fn rotate_write_key(
        &self,
        request: Request<pb::RotateWriteKeyRequest>,
    ) -> Result<Response<pb::RotateWriteKeyResponse>, Status> {
        tessera_server::access::AuditTarget::of(&request)
            .set(format!("source {name}", name = request.get_ref().name));
        let pb::RotateWriteKeyRequest { name } = request.into_inner();
        let (record, key) = self.rekey_source(&name).await?;
        Ok(Response::new(pb::RotateWriteKeyResponse {
            source: Some((&record).into()),
            write_key: key.expose().to_owned(),
        }))
    }

    async fn update_source(
        &self,
        request: Request<pb::UpdateSourceRequest>,
    ) -> Result<Response<pb::UpdateSourceResponse>, Status> {
        tessera_server::access::AuditTarget::of(&request)
            .set(format!("source {}", request.get_ref().name));
        let pb::UpdateSourceRequest {
            name,
            rate_limit_per_second,
            tracking_plan_mode,
        } = request.into_inner();
        let change = SourceChange {
            rate_limit_per_second: rate_limit_per_second.map(rate_limit),
            plan_mode: plan_mode(tracking_plan_mode).map_err(invalid)?,
        };
        let record = self.change_source(&name, change).await?;
        Ok(Response::new(pb::UpdateSourceResponse {
            source: Some((&record).into()),
        }))
    }
}

/// The checks CreateSource and UpdateSource make of a request before touching the store, for
/// the fuzz target `grpc_requests` (`fuzz/`).
pub(crate) fn fuzz_request(name: &str, tracking_plan_mode: i32, rate_limit_per_second: u32) {
    let _ = super::check_name(name);
    let _ = plan_mode(tracking_plan_mode);
    let _ = rate_limit(rate_limit_per_second);
}
