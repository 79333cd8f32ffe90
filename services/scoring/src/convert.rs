//! Conversions between the protobuf messages and the domain types, with request validation.

use prost_types::Timestamp;
use tessera_core::FieldViolation;
use tessera_proto::convert::{from_timestamp, to_timestamp};
use tessera_proto::scoring::v1 as pb;
use time::OffsetDateTime;

use crate::MAX_PROFILES_PER_REQUEST;
use crate::domain::{Factor, ProfileFacts, Score};
use crate::error::ScoringError;

/// A validated `ScoreProfilesRequest`.
#[derive(Debug)]
pub(crate) struct ScoreRequest {
    pub(crate) profiles: Vec<ProfileFacts>,
    pub(crate) as_of: Option<OffsetDateTime>,
}

impl TryFrom<pb::ScoreProfilesRequest> for ScoreRequest {
    type Error = ScoringError;

    fn try_from(request: pb::ScoreProfilesRequest) -> Result<Self, Self::Error> {
        let pb::ScoreProfilesRequest { profiles, as_of } = request;
        if profiles.len() > MAX_PROFILES_PER_REQUEST {
            return Err(ScoringError::TooManyProfiles {
                count: profiles.len(),
                max: MAX_PROFILES_PER_REQUEST,
            });
        }
        let mut violations = Vec::new();
        let as_of = timestamp(as_of.as_ref(), "as_of", &mut violations);
        let mut out = Vec::with_capacity(profiles.len());
        for (i, facts) in profiles.into_iter().enumerate() {
            match ProfileFacts::try_from(facts) {
                Ok(facts) => out.push(facts),
                Err(errors) => violations.extend(
                    errors
                        .into_iter()
                        .map(|v| v.prefixed(&format!("profiles[{i}]"))),
                ),
            }
        }
        if violations.is_empty() {
            Ok(Self {
                profiles: out,
                as_of,
            })
        } else {
            Err(ScoringError::InvalidArgument(violations))
        }
    }
}

impl TryFrom<pb::ProfileFacts> for ProfileFacts {
    type Error = Vec<FieldViolation>;

    fn try_from(facts: pb::ProfileFacts) -> Result<Self, Self::Error> {
        let pb::ProfileFacts {
            profile_id,
            event_count,
            last_seen,
            activity_log2,
            activity_half_life_seconds,
        } = facts;
        let mut violations = Vec::new();
        if profile_id.is_empty() {
            violations.push(FieldViolation::new("profile_id", "required"));
        }
        if event_count < 0 {
            violations.push(FieldViolation::new("event_count", "must not be negative"));
        }
        let last_seen = timestamp(last_seen.as_ref(), "last_seen", &mut violations);
        if activity_log2.is_some_and(|a| !a.is_finite()) {
            violations.push(FieldViolation::new(
                "activity_log2",
                "must be a finite number",
            ));
        }
        if !activity_half_life_seconds.is_finite() || activity_half_life_seconds < 0.0 {
            violations.push(FieldViolation::new(
                "activity_half_life_seconds",
                "must be a finite number, 0 (the default) or more",
            ));
        }
        if !violations.is_empty() {
            return Err(violations);
        }
        Ok(Self {
            profile_id,
            event_count,
            last_seen,
            activity_log2,
            activity_half_life_seconds,
        })
    }
}

fn timestamp(
    ts: Option<&Timestamp>,
    field: &str,
    violations: &mut Vec<FieldViolation>,
) -> Option<OffsetDateTime> {
    let ts = ts?;
    let t = from_timestamp(ts);
    if t.is_none() {
        violations.push(FieldViolation::new(field, "timestamp out of range"));
    }
    t
}

impl From<Score> for pb::Score {
    fn from(score: Score) -> Self {
        let Score {
            name,
            value,
            computed_at,
            model_version,
            factors,
        } = score;
        Self {
            name: name.to_owned(),
            value,
            computed_at: Some(to_timestamp(computed_at)),
            model_version: model_version.to_owned(),
            factors: factors.into_iter().map(pb::ScoreFactor::from).collect(),
        }
    }
}

impl From<Factor> for pb::ScoreFactor {
    fn from(factor: Factor) -> Self {
        let Factor {
            name,
            value,
            description,
        } = factor;
        Self {
            name: name.to_owned(),
            value,
            description,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(id: &str) -> pb::ProfileFacts {
        pb::ProfileFacts {
            profile_id: id.to_owned(),
            event_count: 1,
            last_seen: Some(Timestamp {
                seconds: 1_780_000_000,
                nanos: 0,
            }),
            activity_log2: Some(300.0),
            activity_half_life_seconds: 0.0,
        }
    }

    #[test]
    fn invalid_facts_name_their_fields() {
        let mut bad = facts("");
        bad.activity_log2 = Some(f64::NAN);
        bad.activity_half_life_seconds = f64::INFINITY;
        let request = pb::ScoreProfilesRequest {
            profiles: vec![facts("ok"), bad],
            as_of: None,
        };
        let Err(ScoringError::InvalidArgument(violations)) = ScoreRequest::try_from(request) else {
            panic!("expected invalid argument");
        };
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "profiles[1].profile_id",
                "profiles[1].activity_log2",
                "profiles[1].activity_half_life_seconds"
            ]
        );
    }

    #[test]
    fn too_many_profiles_are_refused() {
        let request = pb::ScoreProfilesRequest {
            profiles: vec![facts("p"); MAX_PROFILES_PER_REQUEST + 1],
            as_of: None,
        };
        assert!(matches!(
            ScoreRequest::try_from(request),
            Err(ScoringError::TooManyProfiles { .. })
        ));
    }
}
