//! The gRPC TrackingPlanService, and the proto ⇄ domain conversions of plans.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;
use tessera_core::{Event, FieldViolation};
use tessera_proto::ingestion::v1 as pb;
use tessera_proto::ingestion::v1::tracking_plan_service_server::{
    TrackingPlanService, TrackingPlanServiceServer,
};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use super::store::{Doomed, PlanRecord, Quarantined};
use super::{CompiledPlan, Plan, PlanError, Unplanned, Verdict, judge, violations_from_json};
use crate::Ingestion;
use crate::sources::Source;

pub(crate) fn server(ingestion: Ingestion) -> TrackingPlanServiceServer<Ingestion> {
    TrackingPlanServiceServer::new(ingestion)
}

/// The page size of ListQuarantined when none is asked for, and the largest.
const DEFAULT_PAGE_SIZE: i32 = 50;
const MAX_PAGE_SIZE: i32 = 500;

/// How many quarantined messages a replay reads at a time.
const REPLAY_PAGE: i64 = 500;

/// A JSON Schema given as JSON text.
fn schema(text: &str, field: &str, errors: &mut Vec<FieldViolation>) -> Option<Value> {
    match serde_json::from_str(text) {
        Ok(value) => Some(value),
        Err(e) => {
            errors.push(FieldViolation::new(field, format!("not valid JSON: {e}")));
            None
        }
    }
}

fn schemas(
    kind: &str,
    texts: HashMap<String, String>,
    errors: &mut Vec<FieldViolation>,
) -> BTreeMap<String, Value> {
    texts
        .into_iter()
        .filter_map(|(name, text)| {
            let field = format!("plan.{kind}[{name:?}]");
            schema(&text, &field, errors).map(|s| (name, s))
        })
        .collect()
}

/// A plan as put; every violation names its field (schemas as `plan.track_events["Name"]`).
fn plan_from_pb(plan: Option<pb::TrackingPlan>) -> Result<Plan, Vec<FieldViolation>> {
    let Some(pb::TrackingPlan {
        track_events,
        pages,
        screens,
        identify_traits,
        group_traits,
        unplanned,
        // Output only.
        version: _,
        update_time: _,
    }) = plan
    else {
        return Err(vec![FieldViolation::new("plan", "required")]);
    };
    let mut errors = Vec::new();
    let optional = |text: String, field: &str, errors: &mut Vec<FieldViolation>| {
        if text.trim().is_empty() {
            None
        } else {
            schema(&text, field, errors)
        }
    };
    let plan = Plan {
        track_events: schemas("track_events", track_events, &mut errors),
        pages: schemas("pages", pages, &mut errors),
        screens: schemas("screens", screens, &mut errors),
        identify_traits: optional(identify_traits, "plan.identify_traits", &mut errors),
        group_traits: optional(group_traits, "plan.group_traits", &mut errors),
        unplanned: match pb::UnplannedEvents::try_from(unplanned) {
            Ok(pb::UnplannedEvents::Unspecified | pb::UnplannedEvents::Allow) => Unplanned::Allow,
            Ok(pb::UnplannedEvents::Block) => Unplanned::Block,
            Err(_) => {
                errors.push(FieldViolation::new(
                    "plan.unplanned",
                    format!("unknown value {unplanned}"),
                ));
                Unplanned::Allow
            }
        },
    };
    if errors.is_empty() {
        Ok(plan)
    } else {
        Err(errors)
    }
}

fn plan_to_pb(plan: Plan, version: i64, updated_at: Option<OffsetDateTime>) -> pb::TrackingPlan {
    let Plan {
        track_events,
        pages,
        screens,
        identify_traits,
        group_traits,
        unplanned,
    } = plan;
    let texts = |m: BTreeMap<String, Value>| -> HashMap<String, String> {
        m.into_iter().map(|(k, v)| (k, v.to_string())).collect()
    };
    pb::TrackingPlan {
        track_events: texts(track_events),
        pages: texts(pages),
        screens: texts(screens),
        identify_traits: identify_traits.map(|v| v.to_string()).unwrap_or_default(),
        group_traits: group_traits.map(|v| v.to_string()).unwrap_or_default(),
        unplanned: match unplanned {
            Unplanned::Allow => pb::UnplannedEvents::Allow,
            Unplanned::Block => pb::UnplannedEvents::Block,
        }
        .into(),
        version,
        update_time: updated_at.map(tessera_proto::convert::to_timestamp),
    }
}

fn record_to_pb(record: PlanRecord) -> Result<pb::TrackingPlan, PlanError> {
    let PlanRecord {
        version,
        plan,
        updated_at,
    } = record;
    Ok(plan_to_pb(
        serde_json::from_str(&plan)?,
        version,
        Some(updated_at),
    ))
}

fn quarantined_to_pb(q: Quarantined) -> Result<pb::QuarantinedEvent, PlanError> {
    let Quarantined {
        id,
        message_id,
        payload,
        violations,
        plan_version,
        received_at,
    } = q;
    let event: Event = serde_json::from_str(&payload)?;
    Ok(pb::QuarantinedEvent {
        id,
        message_id,
        receive_time: Some(tessera_proto::convert::to_timestamp(received_at)),
        plan_version,
        violations: violations_from_json(&violations)
            .into_iter()
            .map(|v| {
                let FieldViolation { field, description } = v;
                tessera_proto::common::v1::FieldViolation { field, description }
            })
            .collect(),
        event: Some(tessera_proto::convert::event_to_pb(&event)),
    })
}

/// The opaque token of the page after quarantine entry `id`.
fn page_token(id: i64) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("id:{id}"))
}

/// The id a page token continues after; 0 for the first page.
fn after_id(token: &str) -> Result<i64, FieldViolation> {
    use base64::Engine as _;
    if token.is_empty() {
        return Ok(0);
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| text.strip_prefix("id:")?.parse::<i64>().ok())
        .filter(|id| *id > 0)
        .ok_or_else(|| {
            FieldViolation::new(
                "page_token",
                "not a token returned as next_page_token by ListQuarantined",
            )
        })
}

/// What a replay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Replayed {
    pub(crate) stored: u64,
    pub(crate) duplicates: u64,
    pub(crate) still_failing: u64,
}

impl Ingestion {
    /// The enabled-or-not source called `name`, as the front doors see it.
    async fn plan_source(&self, name: &str) -> Result<Source, PlanError> {
        Ok(Source::from(&self.source_named(name).await?))
    }

    /// The current plan of the source called `name`; empty at version 0 before the first put.
    pub(crate) async fn tracking_plan(&self, name: &str) -> Result<pb::TrackingPlan, PlanError> {
        let source = self.plan_source(name).await?;
        match self.plans.store.get(source.id).await? {
            Some(record) => record_to_pb(record),
            None => Ok(plan_to_pb(Plan::default(), 0, None)),
        }
    }

    /// Replaces the plan of the source called `name` once every schema compiles.
    pub(crate) async fn put_tracking_plan(
        &self,
        name: &str,
        plan: Plan,
    ) -> Result<pb::TrackingPlan, PlanError> {
        CompiledPlan::compile(&plan, 0).map_err(PlanError::Invalid)?;
        let source = self.plan_source(name).await?;
        let text = serde_json::to_string(&plan)?;
        let record = self
            .plans
            .store
            .put(source.id, &text, OffsetDateTime::now_utc())
            .await?;
        // This replica enforces the new version at once; others within PLAN_CACHE_TTL.
        self.plans.current.invalidate(&source.id).await;
        tracing::info!(source = %source.id, version = record.version, "tracking plan put");
        record_to_pb(record)
    }

    /// Checks the quarantine of the source called `name` against its current plan and mode:
    /// what passes is stored as if just received (at its original receive time, deduplicated
    /// by message id) and leaves the quarantine.
    pub(crate) async fn replay_quarantined(&self, name: &str) -> Result<Replayed, PlanError> {
        let source = self.plan_source(name).await?;
        let source_id = source.id.to_string();
        self.plans.current.invalidate(&source.id).await;
        let plan = self.plans.current(source.id).await?;
        let mut replayed = Replayed::default();
        let mut after = 0;
        loop {
            let page = self
                .plans
                .store
                .list_quarantined(source.id, after, REPLAY_PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = last.id;
            let mut done = Vec::new();
            let mut passed = Vec::new();
            for q in page {
                let event: Event = serde_json::from_str(&q.payload)?;
                match judge(plan.as_deref(), source.plan_mode, event) {
                    Verdict::Pass(event) => {
                        // Each keeps its own receive time, for the clock-skew correction.
                        passed.push((event, q.received_at));
                        done.push(q.id);
                    }
                    Verdict::Block(..) => replayed.still_failing += 1,
                }
            }
            if !passed.is_empty() {
                for stored in self.store_received(&source_id, passed).await? {
                    if stored.is_new {
                        replayed.stored += 1;
                    } else {
                        replayed.duplicates += 1;
                    }
                }
            }
            // A crash before this delete replays them again: the log drops the duplicates.
            self.plans
                .store
                .delete_quarantined(source.id, Doomed::Ids(&done))
                .await?;
        }
        tracing::info!(
            source = %source.id,
            stored = replayed.stored,
            duplicates = replayed.duplicates,
            still_failing = replayed.still_failing,
            "quarantine replayed"
        );
        Ok(replayed)
    }
}

#[tonic::async_trait]
impl TrackingPlanService for Ingestion {
    async fn get_tracking_plan(
        &self,
        request: Request<pb::GetTrackingPlanRequest>,
    ) -> Result<Response<pb::GetTrackingPlanResponse>, Status> {
        let pb::GetTrackingPlanRequest { source_name } = request.into_inner();
        let plan = self.tracking_plan(&source_name).await?;
        Ok(Response::new(pb::GetTrackingPlanResponse {
            plan: Some(plan),
        }))
    }

    async fn put_tracking_plan(
        &self,
        request: Request<pb::PutTrackingPlanRequest>,
    ) -> Result<Response<pb::PutTrackingPlanResponse>, Status> {
        tessera_server::access::AuditTarget::of(&request)
            .set(format!("source {}", request.get_ref().source_name));
        let pb::PutTrackingPlanRequest { source_name, plan } = request.into_inner();
        let plan = plan_from_pb(plan).map_err(PlanError::Invalid)?;
        let plan = Ingestion::put_tracking_plan(self, &source_name, plan).await?;
        Ok(Response::new(pb::PutTrackingPlanResponse {
            plan: Some(plan),
        }))
    }

    async fn list_quarantined(
        &self,
        request: Request<pb::ListQuarantinedRequest>,
    ) -> Result<Response<pb::ListQuarantinedResponse>, Status> {
        let pb::ListQuarantinedRequest {
            source_name,
            page_size,
            page_token: token,
        } = request.into_inner();
        let mut violations = Vec::new();
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            1..=MAX_PAGE_SIZE => page_size,
            _ => {
                violations.push(FieldViolation::new(
                    "page_size",
                    format!("must be between 0 and {MAX_PAGE_SIZE}"),
                ));
                0
            }
        };
        let after = after_id(&token).map_err(|v| violations.push(v)).ok();
        let (Some(after), true) = (after, violations.is_empty()) else {
            return Err(PlanError::Invalid(violations).into());
        };
        let source = self.plan_source(&source_name).await?;
        let size = i64::from(size);
        // One more than the page, to know whether another page follows.
        let mut page = self
            .plans
            .store
            .list_quarantined(source.id, after, size + 1)
            .await
            .map_err(PlanError::from)?;
        let more = i64::try_from(page.len()).unwrap_or(i64::MAX) > size;
        page.truncate(usize::try_from(size).unwrap_or(usize::MAX));
        let next_page_token = match (more, page.last()) {
            (true, Some(last)) => page_token(last.id),
            _ => String::new(),
        };
        let events = page
            .into_iter()
            .map(quarantined_to_pb)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(pb::ListQuarantinedResponse {
            events,
            next_page_token,
        }))
    }

    async fn replay_quarantined(
        &self,
        request: Request<pb::ReplayQuarantinedRequest>,
    ) -> Result<Response<pb::ReplayQuarantinedResponse>, Status> {
        tessera_server::access::AuditTarget::of(&request)
            .set(format!("source {}", request.get_ref().source_name));
        let pb::ReplayQuarantinedRequest { source_name } = request.into_inner();
        let Replayed {
            stored,
            duplicates,
            still_failing,
        } = Ingestion::replay_quarantined(self, &source_name).await?;
        Ok(Response::new(pb::ReplayQuarantinedResponse {
            stored,
            duplicates,
            still_failing,
        }))
    }

    async fn delete_quarantined(
        &self,
        request: Request<pb::DeleteQuarantinedRequest>,
    ) -> Result<Response<pb::DeleteQuarantinedResponse>, Status> {
        tessera_server::access::AuditTarget::of(&request)
            .set(format!("source {}", request.get_ref().source_name));
        let pb::DeleteQuarantinedRequest {
            source_name,
            ids,
            all,
        } = request.into_inner();
        let which = match (ids.is_empty(), all) {
            (false, false) => Doomed::Ids(&ids),
            (true, true) => Doomed::All,
            (true, false) => {
                return Err(PlanError::Invalid(vec![FieldViolation::new(
                    "ids",
                    "name at least one id, or set all",
                )])
                .into());
            }
            (false, true) => {
                return Err(PlanError::Invalid(vec![FieldViolation::new(
                    "all",
                    "set either ids or all, not both",
                )])
                .into());
            }
        };
        let source = self.plan_source(&source_name).await?;
        let deleted = self
            .plans
            .store
            .delete_quarantined(source.id, which)
            .await
            .map_err(PlanError::from)?;
        Ok(Response::new(pb::DeleteQuarantinedResponse { deleted }))
    }
}

/// The checks PutTrackingPlan and ListQuarantined make of a request before touching the
/// store, for the fuzz target `grpc_requests` (`fuzz/`).
pub(crate) fn fuzz_put(request: pb::PutTrackingPlanRequest) {
    let pb::PutTrackingPlanRequest {
        source_name: _,
        plan,
    } = request;
    if let Ok(plan) = plan_from_pb(plan) {
        let _ = CompiledPlan::compile(&plan, 0);
    }
}

/// See [`fuzz_put`].
pub(crate) fn fuzz_list(request: &pb::ListQuarantinedRequest) {
    if let Ok(id) = after_id(&request.page_token)
        && id > 0
    {
        assert_eq!(after_id(&page_token(id)).ok(), Some(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_bad_ones_name_the_field() {
        assert_eq!(after_id(&page_token(42)).unwrap(), 42);
        assert_eq!(after_id("").unwrap(), 0);
        for bad in ["x", "!!", &page_token(0)] {
            assert_eq!(after_id(bad).unwrap_err().field, "page_token", "{bad}");
        }
    }

    #[test]
    fn bad_json_and_missing_plans_name_the_field() {
        assert_eq!(plan_from_pb(None).unwrap_err()[0].field, "plan");
        let plan = pb::TrackingPlan {
            track_events: HashMap::from([("Signed Up".to_owned(), "{".to_owned())]),
            identify_traits: "not json".to_owned(),
            ..Default::default()
        };
        let fields: Vec<_> = plan_from_pb(Some(plan))
            .unwrap_err()
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(
            fields,
            ["plan.track_events[\"Signed Up\"]", "plan.identify_traits"]
        );
    }
}
