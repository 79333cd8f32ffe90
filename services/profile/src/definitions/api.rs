//! `DefinitionService`: computed traits and audiences declared through the API, and the
//! conversions between their proto and config forms.

use tessera_core::FieldViolation;
use tessera_proto::convert::to_timestamp;
use tessera_proto::profile::v1 as pb;
use tessera_proto::profile::v1::definition_service_server::{
    DefinitionService, DefinitionServiceServer,
};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use super::{Declared, DefinitionKind, Registry, Spec, StoredDefinition};
use crate::audience::{Audience, Condition};
use crate::computed::{ComputedTrait, Kind};
use crate::error::ProfileError;

/// The gRPC handlers.
#[derive(Debug, Clone)]
pub(crate) struct DefinitionApi(pub(crate) Registry);

/// The service, ready to serve.
pub(crate) fn server(registry: Registry) -> DefinitionServiceServer<DefinitionApi> {
    DefinitionServiceServer::new(DefinitionApi(registry))
}

fn kind_from_pb(kind: i32) -> Result<Kind, &'static str> {
    match pb::ComputedTraitKind::try_from(kind) {
        Ok(pb::ComputedTraitKind::Count) => Ok(Kind::Count),
        Ok(pb::ComputedTraitKind::Sum) => Ok(Kind::Sum),
        Ok(pb::ComputedTraitKind::Avg) => Ok(Kind::Avg),
        Ok(pb::ComputedTraitKind::Min) => Ok(Kind::Min),
        Ok(pb::ComputedTraitKind::Max) => Ok(Kind::Max),
        Ok(pb::ComputedTraitKind::First) => Ok(Kind::First),
        Ok(pb::ComputedTraitKind::Last) => Ok(Kind::Last),
        Ok(pb::ComputedTraitKind::MostFrequent) => Ok(Kind::MostFrequent),
        Ok(pb::ComputedTraitKind::Unique) => Ok(Kind::Unique),
        Ok(pb::ComputedTraitKind::UniqueCount) => Ok(Kind::UniqueCount),
        Ok(pb::ComputedTraitKind::Unspecified) => Err("required"),
        Err(_) => Err("unknown kind"),
    }
}

fn kind_to_pb(kind: Kind) -> pb::ComputedTraitKind {
    match kind {
        Kind::Count => pb::ComputedTraitKind::Count,
        Kind::Sum => pb::ComputedTraitKind::Sum,
        Kind::Avg => pb::ComputedTraitKind::Avg,
        Kind::Min => pb::ComputedTraitKind::Min,
        Kind::Max => pb::ComputedTraitKind::Max,
        Kind::First => pb::ComputedTraitKind::First,
        Kind::Last => pb::ComputedTraitKind::Last,
        Kind::MostFrequent => pb::ComputedTraitKind::MostFrequent,
        Kind::Unique => pb::ComputedTraitKind::Unique,
        Kind::UniqueCount => pb::ComputedTraitKind::UniqueCount,
    }
}

impl TryFrom<pb::ComputedTraitDefinition> for ComputedTrait {
    type Error = Vec<FieldViolation>;

    fn try_from(definition: pb::ComputedTraitDefinition) -> Result<Self, Self::Error> {
        let pb::ComputedTraitDefinition {
            name,
            kind,
            events,
            types,
            property,
            window_seconds,
            // Output only.
            version: _,
            source: _,
            create_time: _,
            update_time: _,
        } = definition;
        let kind = kind_from_pb(kind).map_err(|e| vec![FieldViolation::new("kind", e)])?;
        Ok(Self {
            name,
            kind,
            events,
            types,
            property: (!property.is_empty()).then_some(property),
            window_seconds: (window_seconds > 0).then_some(window_seconds),
        })
    }
}

impl TryFrom<pb::AudienceDefinition> for Audience {
    type Error = Vec<FieldViolation>;

    fn try_from(definition: pb::AudienceDefinition) -> Result<Self, Self::Error> {
        let pb::AudienceDefinition {
            name,
            condition_json,
            // Output only.
            version: _,
            source: _,
            create_time: _,
            update_time: _,
        } = definition;
        let condition: Condition = serde_json::from_str(&condition_json).map_err(|e| {
            vec![FieldViolation::new(
                "condition_json",
                format!("not a condition: {e}"),
            )]
        })?;
        Ok(Self { name, condition })
    }
}

/// The definition a create or update carries in `field`, converted and validated as config is.
fn spec_of<T, D>(field: &str, definition: Option<T>, wrap: fn(D) -> Spec) -> Result<Spec, Status>
where
    D: TryFrom<T, Error = Vec<FieldViolation>>,
{
    let invalid = |violations: Vec<FieldViolation>| {
        let violations: Vec<_> = violations.into_iter().map(|v| v.prefixed(field)).collect();
        Status::from(ProfileError::InvalidArgument(violations))
    };
    let definition = definition.ok_or_else(|| {
        Status::from(ProfileError::InvalidArgument(vec![FieldViolation::new(
            field, "required",
        )]))
    })?;
    let spec = wrap(D::try_from(definition).map_err(invalid)?);
    spec.validate().map_err(|mut violation| {
        // The condition travels as JSON.
        if violation.field == "condition" {
            violation.field = "condition_json".to_owned();
        }
        invalid(vec![violation])
    })?;
    Ok(spec)
}

/// `expected_version` of an update: the version the caller read.
fn expected_version(version: i64) -> Result<i64, Status> {
    if version < 1 {
        return Err(ProfileError::InvalidArgument(vec![FieldViolation::new(
            "expected_version",
            "the version read, at least 1",
        )])
        .into());
    }
    Ok(version)
}

/// `expected_version` of a delete: 0 deletes any version.
fn delete_version(version: i64) -> Result<Option<i64>, Status> {
    match version {
        0 => Ok(None),
        v if v > 0 => Ok(Some(v)),
        _ => Err(ProfileError::InvalidArgument(vec![FieldViolation::new(
            "expected_version",
            "0, or the version read",
        )])
        .into()),
    }
}

/// The name a get or delete carries.
fn name_of(name: String) -> Result<String, Status> {
    if name.is_empty() {
        return Err(
            ProfileError::InvalidArgument(vec![FieldViolation::new("name", "required")]).into(),
        );
    }
    Ok(name)
}

/// Version, source and audit times of a definition in effect.
fn provenance(
    declared: &Declared,
) -> (
    i64,
    pb::DefinitionSource,
    Option<prost_types::Timestamp>,
    Option<prost_types::Timestamp>,
) {
    match declared {
        Declared::Config(_) => (0, pb::DefinitionSource::Config, None, None),
        Declared::Stored(StoredDefinition {
            version,
            created_at,
            updated_at,
            spec: _,
        }) => (
            *version,
            pb::DefinitionSource::Api,
            Some(to_timestamp(*created_at)),
            Some(to_timestamp(*updated_at)),
        ),
    }
}

fn computed_to_pb(declared: Declared) -> pb::ComputedTraitDefinition {
    let (version, source, create_time, update_time) = provenance(&declared);
    let mut out = pb::ComputedTraitDefinition {
        version,
        source: source.into(),
        create_time,
        update_time,
        ..Default::default()
    };
    let spec = match declared {
        Declared::Config(spec) => spec,
        Declared::Stored(stored) => stored.spec,
    };
    match spec {
        Spec::ComputedTrait(ComputedTrait {
            name,
            kind,
            events,
            types,
            property,
            window_seconds,
        }) => {
            out.name = name;
            out.kind = kind_to_pb(kind).into();
            out.events = events;
            out.types = types;
            out.property = property.unwrap_or_default();
            out.window_seconds = window_seconds.unwrap_or(0);
        }
        Spec::Audience(_) => {}
    }
    out
}

fn audience_to_pb(declared: Declared) -> pb::AudienceDefinition {
    let (version, source, create_time, update_time) = provenance(&declared);
    let mut out = pb::AudienceDefinition {
        version,
        source: source.into(),
        create_time,
        update_time,
        ..Default::default()
    };
    let spec = match declared {
        Declared::Config(spec) => spec,
        Declared::Stored(stored) => stored.spec,
    };
    match spec {
        Spec::Audience(Audience { name, condition }) => {
            out.name = name;
            out.condition_json = serde_json::to_string(&condition).unwrap_or_default();
        }
        Spec::ComputedTrait(_) => {}
    }
    out
}

/// The proto form of a computed trait as declared (for a create or update request).
pub fn computed_trait_definition(computed: ComputedTrait) -> pb::ComputedTraitDefinition {
    pb::ComputedTraitDefinition {
        source: pb::DefinitionSource::Unspecified.into(),
        ..computed_to_pb(Declared::Config(Spec::ComputedTrait(computed)))
    }
}

/// The proto form of an audience as declared (for a create or update request).
pub fn audience_definition(audience: Audience) -> pb::AudienceDefinition {
    pb::AudienceDefinition {
        source: pb::DefinitionSource::Unspecified.into(),
        ..audience_to_pb(Declared::Config(Spec::Audience(audience)))
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

#[tonic::async_trait]
impl DefinitionService for DefinitionApi {
    async fn create_computed_trait(
        &self,
        request: Request<pb::CreateComputedTraitRequest>,
    ) -> Result<Response<pb::CreateComputedTraitResponse>, Status> {
        let target = tessera_server::access::AuditTarget::of(&request);
        let pb::CreateComputedTraitRequest { computed_trait } = request.into_inner();
        let spec = spec_of("computed_trait", computed_trait, Spec::ComputedTrait)?;
        target.set(format!("computed_trait {}", spec.name()));
        let (stored, revision) = self.0.create(spec, now()).await?;
        Ok(Response::new(pb::CreateComputedTraitResponse {
            computed_trait: Some(computed_to_pb(Declared::Stored(stored))),
            revision,
        }))
    }

    async fn update_computed_trait(
        &self,
        request: Request<pb::UpdateComputedTraitRequest>,
    ) -> Result<Response<pb::UpdateComputedTraitResponse>, Status> {
        let target = tessera_server::access::AuditTarget::of(&request);
        let pb::UpdateComputedTraitRequest {
            computed_trait,
            expected_version: version,
        } = request.into_inner();
        let spec = spec_of("computed_trait", computed_trait, Spec::ComputedTrait)?;
        target.set(format!("computed_trait {}", spec.name()));
        let version = expected_version(version)?;
        let (stored, revision) = self.0.update(spec, version, now()).await?;
        Ok(Response::new(pb::UpdateComputedTraitResponse {
            computed_trait: Some(computed_to_pb(Declared::Stored(stored))),
            revision,
        }))
    }

    async fn delete_computed_trait(
        &self,
        request: Request<pb::DeleteComputedTraitRequest>,
    ) -> Result<Response<pb::DeleteComputedTraitResponse>, Status> {
        let target = tessera_server::access::AuditTarget::of(&request);
        let pb::DeleteComputedTraitRequest {
            name,
            expected_version,
        } = request.into_inner();
        let name = name_of(name)?;
        target.set(format!("computed_trait {name}"));
        let version = delete_version(expected_version)?;
        let revision = self
            .0
            .delete(DefinitionKind::ComputedTrait, &name, version, now())
            .await?;
        Ok(Response::new(pb::DeleteComputedTraitResponse { revision }))
    }

    async fn get_computed_trait(
        &self,
        request: Request<pb::GetComputedTraitRequest>,
    ) -> Result<Response<pb::GetComputedTraitResponse>, Status> {
        let pb::GetComputedTraitRequest { name } = request.into_inner();
        let name = name_of(name)?;
        let declared = self.0.get(DefinitionKind::ComputedTrait, &name).await?;
        Ok(Response::new(pb::GetComputedTraitResponse {
            computed_trait: Some(computed_to_pb(declared)),
        }))
    }

    async fn list_computed_traits(
        &self,
        request: Request<pb::ListComputedTraitsRequest>,
    ) -> Result<Response<pb::ListComputedTraitsResponse>, Status> {
        let pb::ListComputedTraitsRequest {} = request.into_inner();
        let (declared, revision) = self.0.list(DefinitionKind::ComputedTrait).await?;
        Ok(Response::new(pb::ListComputedTraitsResponse {
            computed_traits: declared.into_iter().map(computed_to_pb).collect(),
            revision,
        }))
    }

    async fn create_audience(
        &self,
        request: Request<pb::CreateAudienceRequest>,
    ) -> Result<Response<pb::CreateAudienceResponse>, Status> {
        let target = tessera_server::access::AuditTarget::of(&request);
        let pb::CreateAudienceRequest { audience } = request.into_inner();
        let spec = spec_of("audience", audience, Spec::Audience)?;
        target.set(format!("audience {}", spec.name()));
        let (stored, revision) = self.0.create(spec, now()).await?;
        Ok(Response::new(pb::CreateAudienceResponse {
            audience: Some(audience_to_pb(Declared::Stored(stored))),
            revision,
        }))
    }

    async fn update_audience(
        &self,
        request: Request<pb::UpdateAudienceRequest>,
    ) -> Result<Response<pb::UpdateAudienceResponse>, Status> {
        let target = tessera_server::access::AuditTarget::of(&request);
        let pb::UpdateAudienceRequest {
            audience,
            expected_version: version,
        } = request.into_inner();
        let spec = spec_of("audience", audience, Spec::Audience)?;
        target.set(format!("audience {}", spec.name()));
        let version = expected_version(version)?;
        let (stored, revision) = self.0.update(spec, version, now()).await?;
        Ok(Response::new(pb::UpdateAudienceResponse {
            audience: Some(audience_to_pb(Declared::Stored(stored))),
            revision,
        }))
    }

    async fn delete_audience(
        &self,
        request: Request<pb::DeleteAudienceRequest>,
    ) -> Result<Response<pb::DeleteAudienceResponse>, Status> {
        let target = tessera_server::access::AuditTarget::of(&request);
        let pb::DeleteAudienceRequest {
            name,
            expected_version,
        } = request.into_inner();
        let name = name_of(name)?;
        target.set(format!("audience {name}"));
        let version = delete_version(expected_version)?;
        let revision = self
            .0
            .delete(DefinitionKind::Audience, &name, version, now())
            .await?;
        Ok(Response::new(pb::DeleteAudienceResponse { revision }))
    }

    async fn get_audience(
        &self,
        request: Request<pb::GetAudienceRequest>,
    ) -> Result<Response<pb::GetAudienceResponse>, Status> {
        let pb::GetAudienceRequest { name } = request.into_inner();
        let name = name_of(name)?;
        let declared = self.0.get(DefinitionKind::Audience, &name).await?;
        Ok(Response::new(pb::GetAudienceResponse {
            audience: Some(audience_to_pb(declared)),
        }))
    }

    async fn list_audience_definitions(
        &self,
        request: Request<pb::ListAudienceDefinitionsRequest>,
    ) -> Result<Response<pb::ListAudienceDefinitionsResponse>, Status> {
        let pb::ListAudienceDefinitionsRequest {} = request.into_inner();
        let (declared, revision) = self.0.list(DefinitionKind::Audience).await?;
        Ok(Response::new(pb::ListAudienceDefinitionsResponse {
            audiences: declared.into_iter().map(audience_to_pb).collect(),
            revision,
        }))
    }
}

/// The conversions and checks a DefinitionService request goes through before the store, for
/// the fuzz target `grpc_requests` (`fuzz/`): `computed` a computed trait's create or update,
/// `audience` an audience's, `version` an update's or delete's expected version.
pub(crate) fn fuzz_request(
    computed: Option<pb::ComputedTraitDefinition>,
    audience: Option<pb::AudienceDefinition>,
    version: Option<i64>,
) {
    if let Some(c) = computed {
        let _ = spec_of("computed_trait", Some(c), Spec::ComputedTrait);
    }
    if let Some(a) = audience {
        let _ = spec_of("audience", Some(a), Spec::Audience);
    }
    if let Some(v) = version {
        let _ = expected_version(v);
        let _ = delete_version(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_definition_names_its_field() {
        let status = spec_of::<_, ComputedTrait>(
            "computed_trait",
            Some(pb::ComputedTraitDefinition {
                name: "total".to_owned(),
                kind: pb::ComputedTraitKind::Sum.into(),
                ..Default::default()
            }),
            Spec::ComputedTrait,
        )
        .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let status = spec_of::<_, ComputedTrait>(
            "computed_trait",
            Some(pb::ComputedTraitDefinition {
                name: "n".to_owned(),
                ..Default::default()
            }),
            Spec::ComputedTrait,
        )
        .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let spec = spec_of::<_, Audience>(
            "audience",
            Some(pb::AudienceDefinition {
                name: "pro".to_owned(),
                condition_json: r#"{"trait": {"name": "plan", "op": "eq", "value": "pro"}}"#
                    .to_owned(),
                ..Default::default()
            }),
            Spec::Audience,
        )
        .unwrap();
        assert_eq!(spec.name(), "pro");
    }
}
