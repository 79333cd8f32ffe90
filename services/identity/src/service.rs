//! The gRPC face of the identity service: decode, call [`Identity`], encode. Errors become
//! statuses through the one mapping in [`crate::error`].

use tessera_proto::identity::v1 as pb;
use tessera_proto::identity::v1::identity_service_server::IdentityService;
use tonic::{Request, Response, Status};

use crate::{Identity, IdentityError, convert};

/// `IdentityService` over an [`Identity`].
pub(crate) struct IdentityGrpc {
    identity: Identity,
}

impl IdentityGrpc {
    pub(crate) fn new(identity: Identity) -> Self {
        Self { identity }
    }
}

#[tonic::async_trait]
impl IdentityService for IdentityGrpc {
    async fn resolve_identities(
        &self,
        request: Request<pb::ResolveIdentitiesRequest>,
    ) -> Result<Response<pb::ResolveIdentitiesResponse>, Status> {
        let pb::ResolveIdentitiesRequest { records } = request.into_inner();
        // Checked before normalizing, so an oversized batch costs nothing.
        let max = self.identity.max_batch();
        if records.len() > max {
            return Err(IdentityError::BatchTooLarge {
                len: records.len(),
                max,
            }
            .into());
        }
        let records = convert::records_from_pb(self.identity.rules(), records)?;
        let resolutions = self.identity.resolve(records).await?;
        Ok(Response::new(pb::ResolveIdentitiesResponse {
            resolutions: resolutions.into_iter().map(Into::into).collect(),
        }))
    }

    async fn get_profile_graph(
        &self,
        request: Request<pb::GetProfileGraphRequest>,
    ) -> Result<Response<pb::GetProfileGraphResponse>, Status> {
        let (lookup, max) = convert::graph_request_from_pb(request.into_inner())?;
        let profile = match lookup {
            convert::GraphLookup::Profile(id) => id,
            convert::GraphLookup::Identifier(identifier) => {
                self.identity.lookup(identifier).await?
            }
        };
        let graph = self.identity.profile_graph(profile, max).await?;
        Ok(Response::new(graph.into()))
    }

    async fn get_rules(
        &self,
        _request: Request<pb::GetRulesRequest>,
    ) -> Result<Response<pb::GetRulesResponse>, Status> {
        Ok(Response::new(pb::GetRulesResponse {
            version: self.identity.rules_version(),
            rules: Some(convert::rules_to_pb(self.identity.rules())),
        }))
    }

    async fn lookup_identifier(
        &self,
        request: Request<pb::LookupIdentifierRequest>,
    ) -> Result<Response<pb::LookupIdentifierResponse>, Status> {
        let identifier = convert::lookup_from_pb(request.into_inner())?;
        let profile_id = self.identity.lookup(identifier).await?;
        Ok(Response::new(pb::LookupIdentifierResponse {
            profile_id: profile_id.to_string(),
        }))
    }
}
