//! Conversions between the SourceService's protobuf messages and the domain.

use tessera_core::FieldViolation;
use tessera_proto::ingestion::v1 as pb;

use super::PlanMode;
use super::store::SourceRecord;

impl From<&SourceRecord> for pb::Source {
    fn from(r: &SourceRecord) -> Self {
        let SourceRecord {
            id,
            name,
            key_prefix,
            enabled,
            rate_limit_per_second,
            plan_mode,
            created_at,
            key_rotated_at,
        } = r;
        Self {
            id: id.to_string(),
            name: name.clone(),
            write_key_prefix: key_prefix.clone(),
            enabled: *enabled,
            rate_limit_per_second: rate_limit_per_second.unwrap_or(0),
            tracking_plan_mode: pb::TrackingPlanMode::from(*plan_mode).into(),
            create_time: Some(tessera_proto::convert::to_timestamp(*created_at)),
            key_rotate_time: key_rotated_at.map(tessera_proto::convert::to_timestamp),
        }
    }
}

impl From<PlanMode> for pb::TrackingPlanMode {
    fn from(mode: PlanMode) -> Self {
        match mode {
            PlanMode::Allow => Self::Allow,
            PlanMode::Warn => Self::Warn,
            PlanMode::Block => Self::Block,
        }
    }
}

/// The plan mode of a request's `tracking_plan_mode`: `None` when unspecified.
pub(super) fn plan_mode(value: i32) -> Result<Option<PlanMode>, FieldViolation> {
    match pb::TrackingPlanMode::try_from(value) {
        Ok(pb::TrackingPlanMode::Unspecified) => Ok(None),
        Ok(pb::TrackingPlanMode::Allow) => Ok(Some(PlanMode::Allow)),
        Ok(pb::TrackingPlanMode::Warn) => Ok(Some(PlanMode::Warn)),
        Ok(pb::TrackingPlanMode::Block) => Ok(Some(PlanMode::Block)),
        Err(_) => Err(FieldViolation::new(
            "tracking_plan_mode",
            format!("unknown mode {value}"),
        )),
    }
}

/// A request's `rate_limit_per_second`: 0 means no limit.
pub(super) fn rate_limit(value: u32) -> Option<u32> {
    (value > 0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_modes_round_trip() {
        for mode in [PlanMode::Allow, PlanMode::Warn, PlanMode::Block] {
            let wire = i32::from(pb::TrackingPlanMode::from(mode));
            assert_eq!(plan_mode(wire), Ok(Some(mode)));
            assert_eq!(PlanMode::parse(mode.as_str()), Some(mode));
        }
        assert_eq!(plan_mode(0), Ok(None));
        assert_eq!(plan_mode(42).unwrap_err().field, "tracking_plan_mode");
        assert_eq!(rate_limit(0), None);
        assert_eq!(rate_limit(5), Some(5));
    }
}
