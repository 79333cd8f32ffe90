//! Conversions between the protobuf messages and the domain types, with request validation.

use std::collections::BTreeMap;

use prost_types::Timestamp;
use tessera_core::FieldViolation;
use tessera_proto::convert::{from_timestamp, to_timestamp, value_to_json};
use tessera_proto::scoring::v1 as pb;
use time::OffsetDateTime;

use crate::MAX_PROFILES_PER_REQUEST;
use crate::account::{AccountMember, AccountProfile};
use crate::domain::{AccountFacts, Factor, ProfileFacts, Score};
use crate::error::ScoringError;
use crate::plans::{CompiledPlan, Evaluation, GradeBand, Level, Plan, RuleOutcome};

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

/// A validated `ScoreProfileRequest`.
#[derive(Debug)]
pub(crate) struct ScoreOneRequest {
    pub(crate) profile: ProfileFacts,
    pub(crate) as_of: Option<OffsetDateTime>,
}

impl TryFrom<pb::ScoreProfileRequest> for ScoreOneRequest {
    type Error = ScoringError;

    fn try_from(request: pb::ScoreProfileRequest) -> Result<Self, Self::Error> {
        let pb::ScoreProfileRequest { profile, as_of } = request;
        let mut violations = Vec::new();
        let as_of = timestamp(as_of.as_ref(), "as_of", &mut violations);
        let profile = match profile.map(ProfileFacts::try_from) {
            Some(Ok(profile)) => Some(profile),
            Some(Err(errors)) => {
                violations.extend(errors.into_iter().map(|v| v.prefixed("profile")));
                None
            }
            None => {
                violations.push(FieldViolation::new("profile", "required"));
                None
            }
        };
        match profile {
            Some(profile) if violations.is_empty() => Ok(Self { profile, as_of }),
            Some(_) | None => Err(ScoringError::InvalidArgument(violations)),
        }
    }
}

/// A validated `ScoreAccountsRequest`.
#[derive(Debug)]
pub(crate) struct ScoreAccountsRequest {
    pub(crate) accounts: Vec<AccountProfile>,
    pub(crate) as_of: Option<OffsetDateTime>,
}

impl TryFrom<pb::ScoreAccountsRequest> for ScoreAccountsRequest {
    type Error = ScoringError;

    fn try_from(request: pb::ScoreAccountsRequest) -> Result<Self, Self::Error> {
        let pb::ScoreAccountsRequest { accounts, as_of } = request;
        if accounts.len() > MAX_PROFILES_PER_REQUEST {
            return Err(ScoringError::InvalidArgument(vec![FieldViolation::new(
                "accounts",
                format!(
                    "at most {MAX_PROFILES_PER_REQUEST} accounts per call, got {}",
                    accounts.len()
                ),
            )]));
        }
        let mut violations = Vec::new();
        let as_of = timestamp(as_of.as_ref(), "as_of", &mut violations);
        let accounts = accounts
            .into_iter()
            .enumerate()
            .map(|(i, account)| {
                let pb::AccountProfileFacts {
                    account_id,
                    traits,
                    members,
                } = account;
                if account_id.is_empty() {
                    violations.push(FieldViolation::new(
                        format!("accounts[{i}].account_id"),
                        "required",
                    ));
                }
                let members = members
                    .into_iter()
                    .enumerate()
                    .map(|(j, member)| {
                        let pb::AccountMemberFacts {
                            profile_id,
                            role,
                            title,
                        } = member;
                        if profile_id.is_empty() {
                            violations.push(FieldViolation::new(
                                format!("accounts[{i}].members[{j}].profile_id"),
                                "required",
                            ));
                        }
                        AccountMember {
                            profile_id,
                            role,
                            title,
                        }
                    })
                    .collect();
                AccountProfile {
                    account_id,
                    traits: json_map(traits),
                    members,
                }
            })
            .collect();
        if violations.is_empty() {
            Ok(Self { accounts, as_of })
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
            traits,
            computed_traits,
            audiences,
            accounts,
            purchases,
            // Traced by the service handler before conversion; no score reads them.
            trace_parent: _,
            trace_state: _,
            activity_classes,
        } = facts;
        let mut violations = Vec::new();
        let activity_classes = activity_classes
            .into_iter()
            .enumerate()
            .map(|(i, class)| {
                let pb::ActivityClass {
                    event,
                    log2,
                    half_life_seconds,
                    weight,
                } = class;
                let field = |name: &str| format!("activity_classes[{i}].{name}");
                if event.is_empty() {
                    violations.push(FieldViolation::new(field("event"), "required"));
                }
                if !log2.is_finite() {
                    violations.push(FieldViolation::new(
                        field("log2"),
                        "must be a finite number",
                    ));
                }
                if !half_life_seconds.is_finite() || half_life_seconds <= 0.0 {
                    violations.push(FieldViolation::new(
                        field("half_life_seconds"),
                        "must be a positive number of seconds",
                    ));
                }
                if !weight.is_finite() || weight < 0.0 {
                    violations.push(FieldViolation::new(
                        field("weight"),
                        "must be a finite number of at least 0",
                    ));
                }
                crate::domain::ActivityClass {
                    event,
                    log2,
                    half_life_seconds,
                    weight,
                }
            })
            .collect();
        let purchases = purchases.and_then(|p| {
            purchase_history(p)
                .map_err(|problem| violations.push(FieldViolation::new("purchases", problem)))
                .ok()
        });
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
        let accounts = accounts
            .into_iter()
            .enumerate()
            .map(|(i, account)| {
                let pb::AccountFacts {
                    account_id,
                    role,
                    title,
                    traits,
                } = account;
                if account_id.is_empty() {
                    violations.push(FieldViolation::new(
                        format!("accounts[{i}].account_id"),
                        "required",
                    ));
                }
                AccountFacts {
                    account_id,
                    role,
                    title,
                    traits: json_map(traits),
                }
            })
            .collect();
        if !violations.is_empty() {
            return Err(violations);
        }
        Ok(Self {
            profile_id,
            event_count,
            last_seen,
            activity_log2,
            activity_half_life_seconds,
            traits: json_map(traits),
            computed: json_map(computed_traits),
            audiences: audiences.into_iter().collect(),
            accounts,
            purchases,
            activity_classes,
        })
    }
}

/// A purchase history as the models read it, or what is wrong with it.
pub(crate) fn purchase_history(
    p: pb::PurchaseHistory,
) -> Result<crate::domain::PurchaseHistory, &'static str> {
    let pb::PurchaseHistory {
        first_day,
        last_day,
        days,
        repeat_revenue,
        revenue,
    } = p;
    let usable = days >= 1
        && last_day >= first_day
        && repeat_revenue.is_finite()
        && repeat_revenue >= 0.0
        && revenue.is_finite()
        && revenue >= 0.0;
    if !usable {
        return Err(
            "days at least 1, last_day not before first_day, repeat_revenue and revenue finite \
             and not negative",
        );
    }
    Ok(crate::domain::PurchaseHistory {
        first_day,
        last_day,
        days,
        repeat_revenue,
        revenue,
    })
}

fn json_map(
    map: std::collections::HashMap<String, prost_types::Value>,
) -> BTreeMap<String, serde_json::Value> {
    map.into_iter()
        .map(|(name, value)| (name, value_to_json(&value)))
        .collect()
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
            name,
            value,
            computed_at: Some(to_timestamp(computed_at)),
            model_version,
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
            name,
            value,
            description,
        }
    }
}

/// A plan in effect, with its stored version (`None`: declared in config).
pub(crate) fn plan_to_pb(compiled: &CompiledPlan, stored_version: Option<i64>) -> pb::Plan {
    let plan = compiled.plan();
    pb::Plan {
        name: plan.name.clone(),
        version: plan.version.clone(),
        level: match plan.level {
            Level::Person => pb::PlanLevel::Person,
            Level::Account => pb::PlanLevel::Account,
        } as i32,
        description: plan.description.clone(),
        rules: plan
            .rules
            .iter()
            .enumerate()
            .map(|(index, rule)| pb::PlanRule {
                name: rule.name.clone(),
                description: not_evaluable(rule.description.clone(), compiled.not_evaluable(index)),
                points: rule.points,
                group: rule.group.clone().unwrap_or_default(),
                condition_json: serde_json::to_string(&rule.condition).unwrap_or_default(),
            })
            .collect(),
        cap: plan.cap,
        max_points: compiled.max_points(),
        grades: plan.grades.iter().map(pb::GradeBand::from).collect(),
        // Every plan is scored now: person plans on profiles, account plans on accounts.
        scored: true,
        model_version: compiled.model_version().to_owned(),
        source: match stored_version {
            None => pb::PlanSource::Config,
            Some(_) => pb::PlanSource::Api,
        } as i32,
        stored_version: stored_version.unwrap_or(0),
        plan_json: serde_json::to_string(plan).unwrap_or_default(),
    }
}

/// The plan of a request's `field` (`plan_json`): the config form as JSON.
pub(crate) fn plan_from_json(json: &str, field: &str) -> Result<Plan, ScoringError> {
    let invalid = |description: String| {
        ScoringError::InvalidArgument(vec![FieldViolation::new(field, description)])
    };
    if json.trim().is_empty() {
        return Err(invalid(
            "required: the plan in its config form, as JSON".to_owned(),
        ));
    }
    serde_json::from_str(json).map_err(|e| invalid(format!("not a plan: {e}")))
}

impl From<&GradeBand> for pb::GradeBand {
    fn from(band: &GradeBand) -> Self {
        let GradeBand { grade, min } = band;
        Self {
            grade: grade.clone(),
            min: *min,
        }
    }
}

impl From<Evaluation> for pb::PlanEvaluation {
    fn from(evaluation: Evaluation) -> Self {
        let Evaluation {
            plan,
            model_version,
            value,
            grade,
            raw_points,
            uncapped_points,
            max_points,
            rules,
        } = evaluation;
        Self {
            plan,
            model_version,
            value,
            grade: grade.grade,
            raw_points,
            uncapped_points,
            max_points,
            rules: rules
                .into_iter()
                .map(pb::PlanRuleEvaluation::from)
                .collect(),
        }
    }
}

/// A rule's description, saying first why it is not evaluable when it is not (the proto has no
/// field of its own for it, so clients that show descriptions show it).
fn not_evaluable(description: String, reason: Option<&str>) -> String {
    match reason {
        Some(reason) => format!("not evaluable: {reason}; {description}"),
        None => description,
    }
}

impl From<RuleOutcome> for pb::PlanRuleEvaluation {
    fn from(outcome: RuleOutcome) -> Self {
        let RuleOutcome {
            name,
            description,
            points,
            group,
            matched,
            counted,
            not_evaluable: reason,
        } = outcome;
        Self {
            name,
            description: not_evaluable(description, reason.as_deref()),
            points,
            matched,
            counted,
            group: group.unwrap_or_default(),
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
            ..Default::default()
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
    fn one_profile_requests_name_their_fields() {
        let mut bad = facts("p");
        bad.accounts = vec![pb::AccountFacts::default()];
        let request = pb::ScoreProfileRequest {
            profile: Some(bad),
            as_of: None,
        };
        let Err(ScoringError::InvalidArgument(violations)) = ScoreOneRequest::try_from(request)
        else {
            panic!("expected invalid argument");
        };
        assert_eq!(violations[0].field, "profile.accounts[0].account_id");
        let Err(ScoringError::InvalidArgument(violations)) =
            ScoreOneRequest::try_from(pb::ScoreProfileRequest::default())
        else {
            panic!("expected invalid argument");
        };
        assert_eq!(violations[0].field, "profile");
    }

    #[test]
    fn account_requests_name_their_fields() {
        let request = pb::ScoreAccountsRequest {
            accounts: vec![
                pb::AccountProfileFacts {
                    account_id: "acme".to_owned(),
                    members: vec![pb::AccountMemberFacts {
                        profile_id: "p1".to_owned(),
                        role: "champion".to_owned(),
                        title: String::new(),
                    }],
                    ..Default::default()
                },
                pb::AccountProfileFacts {
                    members: vec![pb::AccountMemberFacts::default()],
                    ..Default::default()
                },
            ],
            as_of: Some(Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            }),
        };
        let Err(ScoringError::InvalidArgument(violations)) =
            ScoreAccountsRequest::try_from(request)
        else {
            panic!("expected invalid argument");
        };
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "as_of",
                "accounts[1].account_id",
                "accounts[1].members[0].profile_id"
            ]
        );
        let too_many = pb::ScoreAccountsRequest {
            accounts: vec![pb::AccountProfileFacts::default(); MAX_PROFILES_PER_REQUEST + 1],
            as_of: None,
        };
        let Err(ScoringError::InvalidArgument(violations)) =
            ScoreAccountsRequest::try_from(too_many)
        else {
            panic!("expected invalid argument");
        };
        assert_eq!(violations[0].field, "accounts");
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
