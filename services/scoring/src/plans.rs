//! Scoring plans: declarative, versioned rules worth points, evaluated over a profile's facts.
//!
//! A plan (`[[scoring.plans]]`) is a list of rules, each a condition (the audience condition
//! language: `all`, `any`, `not`, and `trait`, `computed`, `score` tests, plus `audience` and
//! `account`) worth some points, possibly negative. A plan's score is recomputed from the facts
//! every time (never accumulated):
//!
//! 1. `uncapped` = the points of the rules that count: a rule counts when its condition holds,
//!    except that of the rules sharing a `group` (exclusive bands such as employee counts) only
//!    the first that matches, in declaration order, counts;
//! 2. `raw` = `min(uncapped, cap)` when the plan has a `cap`;
//! 3. `max` = the sum of the positive points of the ungrouped rules plus each group's largest
//!    positive points, capped by `cap`: the most the plan can reach;
//! 4. `value` = `clamp(100 · raw / max, 0, 100)`: 0 to 100 whatever the plan's scale, and a
//!    profile whose negative rules outweigh its positive ones scores 0;
//! 5. the grade is the first band (highest first; default A ≥ 75, B ≥ 50, C ≥ 25, D) whose
//!    `min` the value reaches.
//!
//! Plans are evaluated after `engagement`, in declaration order, and a `score` test reads the
//! scores of the same call: `engagement` and the plans declared before it (checked at start).

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::account::{BUYING_ROLES_COVERED, BUYING_ROLES_LIST, BuyingCommittee, normalize_role};
use crate::domain::{AccountFacts, ENGAGEMENT, Factor, ProfileFacts, Score};

/// The most plans one server may hold.
const MAX_PLANS: usize = 100;
/// The most rules one plan may hold.
const MAX_RULES: usize = 500;
/// The most conditions one rule may hold.
const MAX_CONDITIONS: usize = 100;
/// The deepest a rule's condition tree may nest.
const MAX_DEPTH: usize = 16;
/// The longest plan, rule, group or grade name, in bytes.
const MAX_NAME: usize = 200;
/// Factor names every plan score carries besides its rules', so no rule may take them.
const RESERVED_FACTORS: [&str; 3] = ["raw_points", "max_points", "grade"];
/// The prefix of the names an `account` test reads from the person's membership rather than
/// from the account's traits (`member.role`, `member.title`).
const MEMBER_PREFIX: &str = "member.";

/// One plan as declared (`[[scoring.plans]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The plan's name, unique among plans: the name of its score.
    pub name: String,
    /// The plan's version, carried by its scores (`<name>@<version>`): change it whenever the
    /// rules change, so stored scores say which rules made them.
    pub version: String,
    /// What the plan scores: a person (the default) or an account.
    #[serde(default)]
    pub level: Level,
    /// What the plan is for.
    #[serde(default)]
    pub description: String,
    /// The rules, at least one, and at least one with positive points.
    pub rules: Vec<Rule>,
    /// The most raw points counted, if capped (more than 0).
    #[serde(default)]
    pub cap: Option<f64>,
    /// The grade bands, highest first; the last must start at 0.
    #[serde(default = "default_grades")]
    pub grades: Vec<GradeBand>,
}

/// What a plan scores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// A person: scored on every profile write.
    #[default]
    Person,
    /// An account (B2B group): its `trait` tests read the account's traits and the facts
    /// derived from its members ([`crate::account`]); scored by `ScoreAccounts`.
    Account,
}

/// One rule of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The rule's name, unique in its plan: the factor's name when it counts.
    pub name: String,
    /// What the rule means, for people reading a score; the condition (as JSON) when empty.
    #[serde(default)]
    pub description: String,
    /// The points it is worth when it counts; may be negative.
    pub points: f64,
    /// Rules sharing a group are exclusive bands: only the first that matches counts.
    #[serde(default)]
    pub group: Option<String>,
    /// When it matches.
    pub condition: Condition,
}

/// A rule's condition: the audience condition language, with `audience` and `account`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Condition {
    /// Every condition holds (true when empty).
    All(Vec<Condition>),
    /// Some condition holds (false when empty).
    Any(Vec<Condition>),
    /// The condition does not hold.
    Not(Box<Condition>),
    /// A test on one of the profile's traits.
    Trait(Test),
    /// A test on one of the profile's declared computed traits.
    Computed(Test),
    /// A test on a score computed before this plan in the same call.
    Score(Test),
    /// The profile belongs to the named audience.
    Audience(String),
    /// A test on any of the person's accounts: `member.role` and `member.title` read the
    /// person's membership, any other name the account's traits. False without accounts.
    Account(Test),
    /// Event conditions of audiences: refused in plans (facts carry no event counts), kept so
    /// the error can say what to write instead.
    Performed(Value),
}

pub use tessera_core::condition::{Op, Test};

/// One grade band: the scores from `min` up to the next band's `min`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GradeBand {
    /// The grade, for example `A`.
    pub grade: String,
    /// The lowest normalized score (0 to 100) with this grade.
    pub min: f64,
}

/// The default grades: A ≥ 75, B ≥ 50, C ≥ 25, else D.
pub fn default_grades() -> Vec<GradeBand> {
    [("A", 75.0), ("B", 50.0), ("C", 25.0), ("D", 0.0)]
        .into_iter()
        .map(|(grade, min)| GradeBand {
            grade: grade.to_owned(),
            min,
        })
        .collect()
}

/// Why a declared plan is unusable; names the plan's place in the config and, when it has
/// one, its rule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("scoring.plans[{index}] ({name:?}): {reason}")]
pub struct InvalidPlan {
    /// The plan's position in `[[scoring.plans]]`.
    pub index: usize,
    /// The plan's name, as declared.
    pub name: String,
    /// What is wrong.
    pub reason: String,
}

/// A validated plan, with what scoring derives from it.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledPlan {
    plan: Plan,
    max_points: f64,
    model_version: String,
    /// The rules that cannot be evaluated, by index, and why: a stored plan naming a buying
    /// role the committee no longer has, or testing a coverage above its size
    /// ([`Plans::check_committee`]).
    not_evaluable: BTreeMap<usize, String>,
}

impl CompiledPlan {
    /// The plan as declared (rule descriptions filled in).
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The most points the plan can reach: the denominator of normalization.
    pub fn max_points(&self) -> f64 {
        self.max_points
    }

    /// The model version its scores carry: `<name>@<version>`.
    pub fn model_version(&self) -> &str {
        &self.model_version
    }

    /// What the plan scores.
    pub fn level(&self) -> Level {
        self.plan.level
    }

    /// Why the rule at `index` cannot be evaluated (it never matches), if it cannot.
    pub fn not_evaluable(&self, index: usize) -> Option<&str> {
        self.not_evaluable.get(&index).map(String::as_str)
    }

    /// How the plan scores `facts`; `scores` are the scores computed before it (`score` tests
    /// read them).
    pub fn evaluate(&self, facts: &ProfileFacts, scores: &[Score]) -> Evaluation {
        let context = Context { facts, scores };
        let mut groups_taken: HashSet<&str> = HashSet::new();
        let mut uncapped = 0.0;
        let rules = self
            .plan
            .rules
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                let not_evaluable = self.not_evaluable.get(&index).cloned();
                let matched = not_evaluable.is_none() && holds(&rule.condition, &context);
                let counted = matched
                    && rule
                        .group
                        .as_deref()
                        .is_none_or(|group| groups_taken.insert(group));
                if counted {
                    uncapped += rule.points;
                }
                RuleOutcome {
                    name: rule.name.clone(),
                    description: rule.description.clone(),
                    points: rule.points,
                    group: rule.group.clone(),
                    matched,
                    counted,
                    not_evaluable,
                }
            })
            .collect();
        let raw_points = self.plan.cap.map_or(uncapped, |cap| uncapped.min(cap));
        let value = normalize(raw_points, self.max_points);
        Evaluation {
            plan: self.plan.name.clone(),
            model_version: self.model_version.clone(),
            value,
            grade: grade(&self.plan.grades, value).clone(),
            raw_points,
            uncapped_points: uncapped,
            max_points: self.max_points,
            rules,
        }
    }
}

/// How one plan scored one profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// The plan's name.
    pub plan: String,
    /// The plan's model version.
    pub model_version: String,
    /// The normalized score, 0 to 100.
    pub value: f64,
    /// The grade of `value`.
    pub grade: GradeBand,
    /// The points of the rules that counted, capped.
    pub raw_points: f64,
    /// The points of the rules that counted, before the cap.
    pub uncapped_points: f64,
    /// The most points the plan can reach.
    pub max_points: f64,
    /// Every rule's outcome, in declaration order.
    pub rules: Vec<RuleOutcome>,
}

/// One rule's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleOutcome {
    /// The rule's name.
    pub name: String,
    /// The rule's description.
    pub description: String,
    /// The rule's points.
    pub points: f64,
    /// The rule's group.
    pub group: Option<String>,
    /// Whether its condition holds.
    pub matched: bool,
    /// Whether its points count.
    pub counted: bool,
    /// Why the rule could not be evaluated (then it neither matched nor counted): it names a
    /// buying role the committee does not have, or tests a coverage above the committee's size.
    pub not_evaluable: Option<String>,
}

impl Evaluation {
    /// The score: one factor per rule that counted, then `raw_points`, `max_points`, `grade`.
    pub fn to_score(&self, as_of: OffsetDateTime) -> Score {
        let mut factors: Vec<Factor> = self
            .rules
            .iter()
            .filter(|r| r.counted)
            .map(|r| Factor {
                name: r.name.clone(),
                value: r.points,
                description: r.description.clone(),
            })
            .collect();
        let capped = if self.raw_points < self.uncapped_points {
            format!(" (capped from {})", self.uncapped_points)
        } else {
            String::new()
        };
        factors.push(Factor {
            name: "raw_points".to_owned(),
            value: self.raw_points,
            description: format!("points of the rules that match now{capped}"),
        });
        factors.push(Factor {
            name: "max_points".to_owned(),
            value: self.max_points,
            description: "the most points the plan can reach; the score is raw_points / \
                          max_points × 100, clamped to 0–100"
                .to_owned(),
        });
        factors.push(Factor {
            name: "grade".to_owned(),
            value: self.grade.min,
            description: format!(
                "grade {}: a score of {} or more",
                self.grade.grade, self.grade.min
            ),
        });
        Score {
            name: self.plan.clone(),
            value: self.value,
            computed_at: as_of,
            model_version: self.model_version.clone(),
            factors,
        }
    }
}

/// The declared plans, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plans {
    plans: Vec<CompiledPlan>,
}

impl Plans {
    /// Validates `plans`, or says what is wrong with the first unusable one.
    pub fn compile(plans: Vec<Plan>) -> Result<Self, InvalidPlan> {
        if plans.len() > MAX_PLANS {
            return Err(InvalidPlan {
                index: MAX_PLANS,
                name: String::new(),
                reason: format!("at most {MAX_PLANS} plans"),
            });
        }
        // The scores a plan's `score` tests may read: those computed before it (the
        // customer-value scores are absent, and their tests false, without a model or
        // purchases).
        let mut known: Vec<String> = vec![
            ENGAGEMENT.to_owned(),
            crate::clv::live::CHURN_RISK.to_owned(),
            crate::clv::live::PREDICTED_VALUE.to_owned(),
        ];
        let mut names = HashSet::new();
        let mut out = Vec::with_capacity(plans.len());
        for (index, plan) in plans.into_iter().enumerate() {
            let invalid = |reason: String| InvalidPlan {
                index,
                name: plan.name.clone(),
                reason,
            };
            check_plan(&plan, &known).map_err(invalid)?;
            if !names.insert(plan.name.clone()) {
                return Err(invalid("the name is declared twice".to_owned()));
            }
            let compiled = compile_plan(plan);
            // Person plans may read earlier person plans' scores; an account's scores are
            // never a person's.
            if compiled.level() == Level::Person {
                known.push(compiled.plan.name.clone());
            }
            out.push(compiled);
        }
        Ok(Self { plans: out })
    }

    /// Every plan, in declaration order.
    pub fn iter(&self) -> impl Iterator<Item = &CompiledPlan> {
        self.plans.iter()
    }

    /// Whether no plan is declared.
    pub fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }

    /// Scores `facts` with every person-level plan in declaration order, appending each score
    /// to `scores` (which holds `engagement` already), and answers the evaluations.
    pub fn evaluate(
        &self,
        facts: &ProfileFacts,
        as_of: OffsetDateTime,
        scores: &mut Vec<Score>,
    ) -> Vec<Evaluation> {
        self.evaluate_level(Level::Person, facts, as_of, scores)
    }

    /// Scores `facts` with every plan of `level` in declaration order, appending each score to
    /// `scores`, and answers the evaluations. An account's facts are its traits and derived
    /// member facts, as `traits` ([`crate::account::score_account`]).
    pub fn evaluate_level(
        &self,
        level: Level,
        facts: &ProfileFacts,
        as_of: OffsetDateTime,
        scores: &mut Vec<Score>,
    ) -> Vec<Evaluation> {
        let mut out = Vec::new();
        for plan in self.plans.iter().filter(|p| p.level() == level) {
            let evaluation = plan.evaluate(facts, scores);
            scores.push(evaluation.to_score(as_of));
            out.push(evaluation);
        }
        out
    }
}

impl Plans {
    /// Marks the rules that name a buying role `committee` does not have, or test a coverage
    /// above its size, as not evaluable (they never match, and their evaluation says why) and
    /// answers them with their plans' names, in scoring order. Config's plans never have any:
    /// they are refused at start ([`crate::PlanBook::new`]); a stored plan can, when the
    /// committee changed after it was stored.
    pub fn check_committee(
        &mut self,
        committee: &BuyingCommittee,
    ) -> Vec<(String, CommitteeMismatch)> {
        let mut found = Vec::new();
        for compiled in &mut self.plans {
            compiled.not_evaluable.clear();
            for mismatch in committee_mismatches(&compiled.plan, committee) {
                // One reason per rule: the first mismatch found in it.
                compiled
                    .not_evaluable
                    .entry(mismatch.rule_index())
                    .or_insert_with(|| mismatch.to_string());
                found.push((compiled.plan.name.clone(), mismatch));
            }
        }
        found
    }
}

/// Why a rule of an account plan could never match with a buying committee.
#[derive(Debug, Clone, PartialEq)]
pub enum CommitteeMismatch {
    /// A `buying_roles` test names a role the committee does not have.
    UnknownRole(UnknownBuyingRole),
    /// A `buying_roles_covered` test needs more roles than the committee has.
    UnreachableCoverage(UnreachableCoverage),
}

impl CommitteeMismatch {
    /// The rule's position in the plan.
    pub fn rule_index(&self) -> usize {
        match self {
            Self::UnknownRole(unknown) => unknown.rule_index,
            Self::UnreachableCoverage(coverage) => coverage.rule_index,
        }
    }

    /// The rule's name.
    pub fn rule(&self) -> &str {
        match self {
            Self::UnknownRole(unknown) => &unknown.rule,
            Self::UnreachableCoverage(coverage) => &coverage.rule,
        }
    }

    /// The path of the rule's condition in the plan at `plan` (a request field): for example
    /// `plan_json.rules[2].condition`.
    pub fn field(&self, plan: &str) -> String {
        format!("{plan}.rules[{}].condition", self.rule_index())
    }
}

impl std::fmt::Display for CommitteeMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownRole(unknown) => unknown.fmt(f),
            Self::UnreachableCoverage(coverage) => coverage.fmt(f),
        }
    }
}

impl std::error::Error for CommitteeMismatch {}

/// What rules of `plan` could never match with `committee`, rule by rule in declaration
/// order: the buying roles they name that it lacks ([`unknown_buying_roles`]), then the
/// coverage thresholds above its size ([`unreachable_coverage`]).
pub fn committee_mismatches(plan: &Plan, committee: &BuyingCommittee) -> Vec<CommitteeMismatch> {
    let mut found: Vec<CommitteeMismatch> = unknown_buying_roles(plan, committee)
        .into_iter()
        .map(CommitteeMismatch::UnknownRole)
        .chain(
            unreachable_coverage(plan, committee)
                .into_iter()
                .map(CommitteeMismatch::UnreachableCoverage),
        )
        .collect();
    // Stable: a rule's unknown roles stay before its coverage tests.
    found.sort_by_key(CommitteeMismatch::rule_index);
    found
}

/// A rule of an account plan testing `buying_roles_covered` against a threshold the committee
/// cannot reach (`gte 5` with four roles): a test that never holds.
#[derive(Debug, Clone, PartialEq)]
pub struct UnreachableCoverage {
    /// The rule's position in the plan.
    pub rule_index: usize,
    /// The rule's name.
    pub rule: String,
    /// The test's comparison: `gte`, `gt` or `eq`.
    pub op: Op,
    /// The threshold as the rule writes it.
    pub threshold: f64,
    /// How many buying roles the committee has: the most `buying_roles_covered` can be.
    pub committee_size: usize,
}

impl std::fmt::Display for UnreachableCoverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let op = match self.op {
            Op::Gte => "gte",
            Op::Gt => "gt",
            Op::Eq => "eq",
            Op::Ne | Op::Lt | Op::Lte | Op::In | Op::Contains | Op::Exists | Op::Missing => "?",
        };
        write!(
            f,
            "rule {:?}: buying_roles_covered {op} {} needs more buying roles than the buying \
             committee has ({}; buying_roles_covered is 0 to {}), so the test could never hold",
            self.rule, self.threshold, self.committee_size, self.committee_size
        )
    }
}

impl std::error::Error for UnreachableCoverage {}

/// The `buying_roles_covered` tests of the rules of `plan` that no account can pass with
/// `committee`: `gte` above its size, `gt` at or above it, `eq` above it (each under `all`,
/// `any` and `not` too, as a role named there is checked). Coverage is a count of roles; the
/// condition language has no fractional coverage to check against 0..=1.
pub fn unreachable_coverage(plan: &Plan, committee: &BuyingCommittee) -> Vec<UnreachableCoverage> {
    if plan.level != Level::Account {
        return Vec::new();
    }
    let size = committee.roles().len();
    let mut found = Vec::new();
    for (rule_index, rule) in plan.rules.iter().enumerate() {
        let mut tests = Vec::new();
        coverage_tests(&rule.condition, &mut tests);
        for test in tests {
            let Some(threshold) = test.value.as_f64() else {
                continue;
            };
            // Exact for any committee (at most MAX_BUYING_ROLES roles).
            #[allow(clippy::cast_precision_loss)]
            let most = size as f64;
            let unreachable = match test.op {
                Op::Gte | Op::Eq => threshold > most,
                Op::Gt => threshold >= most,
                Op::Ne | Op::Lt | Op::Lte | Op::In | Op::Contains | Op::Exists | Op::Missing => {
                    false
                }
            };
            if unreachable {
                found.push(UnreachableCoverage {
                    rule_index,
                    rule: rule.name.clone(),
                    op: test.op,
                    threshold,
                    committee_size: size,
                });
            }
        }
    }
    found
}

/// The `buying_roles_covered` tests of `condition`, in order.
fn coverage_tests<'c>(condition: &'c Condition, out: &mut Vec<&'c Test>) {
    match condition {
        Condition::All(all) | Condition::Any(all) => {
            all.iter().for_each(|c| coverage_tests(c, out));
        }
        Condition::Not(inner) => coverage_tests(inner, out),
        Condition::Trait(test) if test.name == BUYING_ROLES_COVERED => out.push(test),
        Condition::Trait(_)
        | Condition::Computed(_)
        | Condition::Score(_)
        | Condition::Audience(_)
        | Condition::Account(_)
        | Condition::Performed(_) => {}
    }
}

/// A rule of an account plan naming, in a `buying_roles` test, a buying role the committee
/// does not have: a rule that could never match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownBuyingRole {
    /// The rule's position in the plan.
    pub rule_index: usize,
    /// The rule's name.
    pub rule: String,
    /// The buying role as the rule names it.
    pub role: String,
    /// The committee's buying roles, in its order.
    pub known: Vec<String>,
}

impl std::fmt::Display for UnknownBuyingRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let known: Vec<String> = self.known.iter().map(|k| format!("{k:?}")).collect();
        write!(
            f,
            "rule {:?}: buying role {:?} is not in the buying committee{}, so the rule could \
             never match (known buying roles: {})",
            self.rule,
            self.role,
            self.hint(),
            known.join(", ")
        )
    }
}

impl std::error::Error for UnknownBuyingRole {}

impl UnknownBuyingRole {
    /// The path of the rule's condition in the plan at `plan` (a request field): for example
    /// `plan_json.rules[2].condition`.
    pub fn field(&self, plan: &str) -> String {
        format!("{plan}.rules[{}].condition", self.rule_index)
    }

    /// When the role is a known one spelled otherwise: `buying_roles` lists normalized names
    /// and tests compare exactly.
    fn hint(&self) -> String {
        let normalized = normalize_role(&self.role);
        if normalized != self.role && self.known.contains(&normalized) {
            format!(" as written (`buying_roles` lists normalized names: write {normalized:?})")
        } else {
            String::new()
        }
    }
}

/// The buying roles the rules of `plan` name that `committee` does not have, rule by rule
/// (each role once per rule). Only account plans read `buying_roles`; a role named there is
/// any string in the value of a `trait` test on it (`contains "finance"`, or a list compared
/// with `eq`, `ne` or `in`). Member roles (`member_roles`, `roles.<role>`, `member.role`) are
/// free-form, not the committee's, and not checked.
pub fn unknown_buying_roles(plan: &Plan, committee: &BuyingCommittee) -> Vec<UnknownBuyingRole> {
    if plan.level != Level::Account {
        return Vec::new();
    }
    let known: Vec<String> = committee.roles().iter().map(|r| r.name.clone()).collect();
    let mut found = Vec::new();
    for (rule_index, rule) in plan.rules.iter().enumerate() {
        let mut named = Vec::new();
        buying_roles_named(&rule.condition, &mut named);
        let mut seen = HashSet::new();
        for role in named {
            if !known.iter().any(|k| k == role) && seen.insert(role) {
                found.push(UnknownBuyingRole {
                    rule_index,
                    rule: rule.name.clone(),
                    role: role.to_owned(),
                    known: known.clone(),
                });
            }
        }
    }
    found
}

/// The buying roles `condition` names, in order.
fn buying_roles_named<'c>(condition: &'c Condition, out: &mut Vec<&'c str>) {
    fn strings<'v>(value: &'v Value, out: &mut Vec<&'v str>) {
        match value {
            Value::String(s) => out.push(s),
            Value::Array(list) => list.iter().for_each(|v| strings(v, out)),
            Value::Null | Value::Bool(_) | Value::Number(_) | Value::Object(_) => {}
        }
    }
    match condition {
        Condition::All(all) | Condition::Any(all) => {
            all.iter().for_each(|c| buying_roles_named(c, out));
        }
        Condition::Not(inner) => buying_roles_named(inner, out),
        Condition::Trait(test) if test.name == BUYING_ROLES_LIST => strings(&test.value, out),
        Condition::Trait(_)
        | Condition::Computed(_)
        | Condition::Score(_)
        | Condition::Audience(_)
        | Condition::Account(_)
        | Condition::Performed(_) => {}
    }
}

/// `raw` as a share of `max`, 0 to 100.
pub fn normalize(raw: f64, max: f64) -> f64 {
    if max > 0.0 && raw.is_finite() {
        (100.0 * raw / max).clamp(0.0, 100.0)
    } else {
        0.0
    }
}

/// The first band (highest first) whose `min` `value` reaches; the last band otherwise.
fn grade(bands: &[GradeBand], value: f64) -> &GradeBand {
    bands
        .iter()
        .find(|band| value >= band.min)
        .or(bands.last())
        .expect("validated: a plan has grade bands")
}

fn compile_plan(mut plan: Plan) -> CompiledPlan {
    for rule in &mut plan.rules {
        if rule.description.is_empty() {
            rule.description = format!(
                "matches {}",
                serde_json::to_string(&rule.condition).unwrap_or_default()
            );
        }
    }
    let mut positive = 0.0;
    let mut groups: BTreeMap<&str, f64> = BTreeMap::new();
    for rule in &plan.rules {
        match &rule.group {
            Some(group) => {
                let best = groups.entry(group).or_insert(0.0);
                *best = best.max(rule.points);
            }
            None => positive += rule.points.max(0.0),
        }
    }
    positive += groups.values().sum::<f64>();
    let max_points = plan.cap.map_or(positive, |cap| positive.min(cap));
    let model_version = format!("{}@{}", plan.name, plan.version);
    CompiledPlan {
        plan,
        max_points,
        model_version,
        not_evaluable: BTreeMap::new(),
    }
}

fn check_plan(plan: &Plan, known: &[String]) -> Result<(), String> {
    let valid_name = |s: &str| {
        !s.is_empty()
            && s.len() <= MAX_NAME
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    };
    if !valid_name(&plan.name) {
        return Err(format!(
            "a plan name is 1 to {MAX_NAME} letters, digits, `_`, `-` or `.`"
        ));
    }
    if plan.name == ENGAGEMENT {
        return Err(format!("{ENGAGEMENT} is the built-in score's name"));
    }
    if plan.version.trim().is_empty() || plan.version.len() > MAX_NAME {
        return Err(format!("version must be 1 to {MAX_NAME} bytes"));
    }
    if plan.rules.is_empty() {
        return Err("a plan needs at least one rule".to_owned());
    }
    if plan.rules.len() > MAX_RULES {
        return Err(format!("at most {MAX_RULES} rules"));
    }
    if plan.rules.iter().all(|r| r.points <= 0.0) {
        return Err(
            "a plan needs a rule with positive points (its score is a share of them)".to_owned(),
        );
    }
    if let Some(cap) = plan.cap
        && !(cap.is_finite() && cap > 0.0)
    {
        return Err("cap must be a number above 0".to_owned());
    }
    check_grades(&plan.grades)?;
    let mut rule_names = HashSet::new();
    for rule in &plan.rules {
        let invalid = |reason: String| format!("rule {:?}: {reason}", rule.name);
        if rule.name.is_empty() || rule.name.len() > MAX_NAME {
            return Err(invalid(format!("a rule name is 1 to {MAX_NAME} bytes")));
        }
        if RESERVED_FACTORS.contains(&rule.name.as_str()) {
            return Err(invalid(format!(
                "the names {RESERVED_FACTORS:?} are the score's own factors"
            )));
        }
        if !rule_names.insert(rule.name.as_str()) {
            return Err(invalid("the name is used twice in the plan".to_owned()));
        }
        if !rule.points.is_finite() {
            return Err(invalid("points must be a finite number".to_owned()));
        }
        if rule
            .group
            .as_ref()
            .is_some_and(|g| g.is_empty() || g.len() > MAX_NAME)
        {
            return Err(invalid(format!("a group name is 1 to {MAX_NAME} bytes")));
        }
        let mut count = 0;
        check_condition(&rule.condition, plan.level, known, 0, &mut count).map_err(invalid)?;
    }
    Ok(())
}

fn check_grades(grades: &[GradeBand]) -> Result<(), String> {
    let Some(last) = grades.last() else {
        return Err("grades needs at least one band".to_owned());
    };
    let mut names = HashSet::new();
    for pair in grades.windows(2) {
        if pair[1].min >= pair[0].min {
            return Err(format!(
                "grades go from the highest min to the lowest: {} ({}) is not below {} ({})",
                pair[1].grade, pair[1].min, pair[0].grade, pair[0].min
            ));
        }
    }
    for band in grades {
        if band.grade.is_empty() || band.grade.len() > MAX_NAME {
            return Err(format!("a grade is 1 to {MAX_NAME} bytes"));
        }
        if !names.insert(band.grade.as_str()) {
            return Err(format!("grade {:?} is declared twice", band.grade));
        }
        if !(0.0..=100.0).contains(&band.min) {
            return Err(format!("grade {:?}: min must be from 0 to 100", band.grade));
        }
    }
    if last.min != 0.0 {
        return Err(format!(
            "the last grade ({}) must have min 0, so every score has a grade",
            last.grade
        ));
    }
    Ok(())
}

fn check_condition(
    condition: &Condition,
    level: Level,
    known: &[String],
    depth: usize,
    count: &mut usize,
) -> Result<(), String> {
    *count += 1;
    if depth > MAX_DEPTH {
        return Err(format!("conditions nest deeper than {MAX_DEPTH}"));
    }
    if *count > MAX_CONDITIONS {
        return Err(format!("more than {MAX_CONDITIONS} conditions"));
    }
    let person_only = |what: &str| match level {
        Level::Person => Ok(()),
        Level::Account => Err(format!(
            "{what} conditions are not available at account level"
        )),
    };
    match condition {
        Condition::All(all) | Condition::Any(all) => {
            for c in all {
                check_condition(c, level, known, depth + 1, count)?;
            }
            Ok(())
        }
        Condition::Not(inner) => check_condition(inner, level, known, depth + 1, count),
        Condition::Trait(test) => check_test(test),
        Condition::Computed(test) => {
            person_only("computed")?;
            check_test(test)
        }
        Condition::Account(test) => {
            person_only("account")?;
            check_test(test)
        }
        Condition::Score(test) => {
            person_only("score")?;
            check_test(test)?;
            if known.contains(&test.name) {
                Ok(())
            } else {
                Err(format!(
                    "score {:?} is not computed before this plan (known: {})",
                    test.name,
                    known.join(", ")
                ))
            }
        }
        Condition::Audience(name) => {
            person_only("audience")?;
            if name.is_empty() {
                Err("audience needs a name".to_owned())
            } else {
                Ok(())
            }
        }
        Condition::Performed(_) => Err("performed conditions are not available in plans: \
                                        declare a computed trait (a count of the event) and \
                                        test it with `computed`"
            .to_owned()),
    }
}

fn check_test(test: &Test) -> Result<(), String> {
    if let Some(problem) = test.problem() {
        return Err(problem);
    }
    match test.op {
        Op::Eq | Op::Ne | Op::Contains if test.value.is_null() => {
            Err(format!("{}: {:?} needs a value", test.name, test.op))
        }
        Op::Eq
        | Op::Ne
        | Op::Gt
        | Op::Gte
        | Op::Lt
        | Op::Lte
        | Op::In
        | Op::Contains
        | Op::Exists
        | Op::Missing => Ok(()),
    }
}

/// What a condition reads.
struct Context<'a> {
    facts: &'a ProfileFacts,
    scores: &'a [Score],
}

fn holds(condition: &Condition, cx: &Context<'_>) -> bool {
    match condition {
        Condition::All(all) => all.iter().all(|c| holds(c, cx)),
        Condition::Any(any) => any.iter().any(|c| holds(c, cx)),
        Condition::Not(inner) => !holds(inner, cx),
        Condition::Trait(test) => test.holds(cx.facts.traits.get(&test.name)),
        Condition::Computed(test) => test.holds(cx.facts.computed.get(&test.name)),
        Condition::Score(test) => {
            let value = cx
                .scores
                .iter()
                .find(|s| s.name == test.name)
                .and_then(|s| serde_json::Number::from_f64(s.value))
                .map(Value::Number);
            test.holds(value.as_ref())
        }
        Condition::Audience(name) => cx.facts.audiences.contains(name),
        Condition::Account(test) => cx
            .facts
            .accounts
            .iter()
            .any(|account| account_holds(test, account)),
        // Refused when plans are compiled.
        Condition::Performed(_) => false,
    }
}

fn account_holds(test: &Test, account: &AccountFacts) -> bool {
    match test.name.strip_prefix(MEMBER_PREFIX) {
        Some(field @ ("role" | "title")) => {
            let value = if field == "role" {
                &account.role
            } else {
                &account.title
            };
            let value = (!value.is_empty()).then(|| Value::String(value.clone()));
            test.holds(value.as_ref())
        }
        Some(_) | None => test.holds(account.traits.get(&test.name)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::json;
    use tessera_core::activity;
    use time::macros::datetime;

    use super::*;
    use crate::domain::score_profile;

    const NOW: OffsetDateTime = datetime!(2026-06-01 12:00:00 UTC);
    const READY: &str = include_str!("../plans/ready-plans.toml");

    #[derive(Deserialize)]
    struct File {
        scoring: crate::ScoringSettings,
    }

    fn parse(text: &str) -> Vec<Plan> {
        toml::from_str::<File>(text)
            .expect("plans parse")
            .scoring
            .plans
    }

    fn compile(text: &str) -> Result<Plans, InvalidPlan> {
        Plans::compile(parse(text))
    }

    fn facts(traits: Value) -> ProfileFacts {
        ProfileFacts {
            profile_id: "p1".to_owned(),
            traits: traits
                .as_object()
                .map(|m| m.clone().into_iter().collect())
                .unwrap_or_default(),
            ..ProfileFacts::default()
        }
    }

    /// `n` events just now: engagement 100 · (1 − e^(−n/5)).
    fn with_events(mut facts: ProfileFacts, n: usize) -> ProfileFacts {
        let h = activity::DEFAULT_HALF_LIFE_SECONDS;
        for _ in 0..n {
            facts.activity_log2 = Some(activity::add_event(facts.activity_log2, NOW, h));
        }
        facts.event_count = n as i64;
        facts.last_seen = (n > 0).then_some(NOW);
        facts
    }

    fn score<'s>(scores: &'s [Score], name: &str) -> &'s Score {
        scores
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no score {name}"))
    }

    fn rule_factors(score: &Score) -> Vec<(&str, f64)> {
        score
            .factors
            .iter()
            .filter(|f| !RESERVED_FACTORS.contains(&f.name.as_str()))
            .map(|f| (f.name.as_str(), f.value))
            .collect()
    }

    fn grade_of(score: &Score) -> &str {
        let grade = score.factor("grade").expect("a grade factor");
        grade
            .description
            .strip_prefix("grade ")
            .and_then(|d| d.split(':').next())
            .expect("grade <letter>: ...")
    }

    #[test]
    fn the_ready_plans_compile_and_score_a_b2b_lead_as_documented() {
        let plans = compile(READY).expect("the ready plans are valid");
        let names: Vec<_> = plans.iter().map(|p| p.plan().name.as_str()).collect();
        assert_eq!(
            names,
            [
                "icp_fit_b2b",
                "icp_fit_b2c",
                "lead_score",
                "icp_fit_b2b_account"
            ]
        );
        let max: Vec<_> = plans.iter().map(CompiledPlan::max_points).collect();
        assert_eq!(max, [100.0, 100.0, 100.0, 100.0]);

        // Firmographics on the account (as group calls send them), the role on the membership.
        let mut ann = with_events(facts(json!({"email": "ann@bigco.com"})), 4);
        ann.accounts = vec![
            AccountFacts {
                account_id: "small-side-project".to_owned(),
                role: "founder".to_owned(),
                traits: BTreeMap::from([("employees".to_owned(), json!(3))]),
                ..AccountFacts::default()
            },
            AccountFacts {
                account_id: "bigco".to_owned(),
                role: "decision maker".to_owned(),
                title: "VP Data".to_owned(),
                traits: BTreeMap::from([
                    ("industry".to_owned(), json!("software")),
                    ("employees".to_owned(), json!(500)),
                    ("annual_revenue".to_owned(), json!(20_000_000)),
                    ("country".to_owned(), json!("US")),
                    ("technologies".to_owned(), json!(["dbt", "snowflake"])),
                ]),
            },
        ];
        ann.computed = BTreeMap::from([("demo_requests".to_owned(), json!(1))]);
        ann.audiences = BTreeSet::from(["pricing_page_visitors".to_owned()]);
        let scores = score_profile(&ann, NOW, &plans, &crate::domain::ValueModels::default());
        let order: Vec<_> = scores.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            order,
            ["engagement", "icp_fit_b2b", "icp_fit_b2c", "lead_score"]
        );

        let b2b = score(&scores, "icp_fit_b2b");
        assert_eq!(
            rule_factors(b2b),
            [
                ("target_industry", 20.0),
                // The first account matches the "under 10" band too, but the group's first
                // matching band counts: 500 employees.
                ("employees_200_999", 20.0),
                ("revenue_10m_plus", 10.0),
                ("served_country", 10.0),
                ("uses_snowflake", 10.0),
                ("decision_maker", 20.0),
            ]
        );
        assert_eq!(b2b.value, 90.0);
        assert_eq!(grade_of(b2b), "A");
        assert_eq!(b2b.model_version, "icp_fit_b2b@1");
        assert_eq!(b2b.computed_at, NOW);
        let described = b2b.factor("uses_snowflake").unwrap();
        assert_eq!(
            described.description,
            "the company's technologies include Snowflake (our integration)"
        );

        // Engagement of 4 fresh events is 55: highly engaged, in this same call.
        assert!(score(&scores, "engagement").value > 50.0);
        let lead = score(&scores, "lead_score");
        assert_eq!(
            rule_factors(lead),
            [
                ("fit_a", 40.0),
                ("highly_engaged", 30.0),
                ("requested_demo", 30.0),
                ("pricing_page", 10.0),
            ]
        );
        // 110 points capped at 100.
        assert_eq!(lead.factor("raw_points").unwrap().value, 100.0);
        assert!(
            lead.factor("raw_points")
                .unwrap()
                .description
                .contains("110")
        );
        assert_eq!(lead.value, 100.0);
        assert_eq!(grade_of(lead), "hot");

        // The B2C plan finds nothing it reads but engagement.
        let b2c = score(&scores, "icp_fit_b2c");
        assert_eq!(rule_factors(b2c), [("highly_engaged", 25.0)]);
        assert_eq!(b2c.value, 25.0);
        assert_eq!(grade_of(b2c), "C");
    }

    #[test]
    fn the_ready_account_plan_scores_firmographics_and_buying_role_coverage() {
        use crate::account::{AccountMember, AccountProfile, score_account};
        let plans = compile(READY).unwrap();
        let member = |id: &str, role: &str| AccountMember {
            profile_id: id.to_owned(),
            role: role.to_owned(),
            title: String::new(),
        };
        let mut bigco = AccountProfile {
            account_id: "bigco".to_owned(),
            traits: BTreeMap::from([
                ("industry".to_owned(), json!("software")),
                ("employees".to_owned(), json!(500)),
                ("annual_revenue".to_owned(), json!(20_000_000)),
                ("country".to_owned(), json!("US")),
            ]),
            members: vec![member("p1", "technical evaluator")],
        };
        let (scores, evaluations) = score_account(&bigco, NOW, &plans, &Default::default());
        assert_eq!(scores.len(), 1, "the account plan only");
        let fit = &scores[0];
        assert_eq!(fit.name, "icp_fit_b2b_account");
        assert_eq!(fit.model_version, "icp_fit_b2b_account@1");
        assert_eq!(
            rule_factors(fit),
            [
                ("target_industry", 20.0),
                ("employees_200_999", 20.0),
                ("revenue_10m_plus", 10.0),
                ("served_country", 10.0),
                ("buying_committee_1", 10.0),
            ]
        );
        assert_eq!(fit.value, 70.0);
        assert_eq!(grade_of(fit), "B");
        assert_eq!(evaluations[0].plan, "icp_fit_b2b_account");

        // An economic buyer and a champion join: three buying roles, grade A.
        bigco.members.push(member("p2", "Economic Buyer"));
        bigco.members.push(member("p3", "champion"));
        let (scores, _) = score_account(&bigco, NOW, &plans, &Default::default());
        assert_eq!(scores[0].value, 90.0);
        assert_eq!(
            scores[0].factor("buying_committee_3_plus").unwrap().value,
            30.0
        );
        assert_eq!(grade_of(&scores[0]), "A");

        // The person plans do not read the account plan's score, nor does it score people.
        let person = score_profile(
            &facts(json!({"industry": "software"})),
            NOW,
            &plans,
            &crate::domain::ValueModels::default(),
        );
        assert!(person.iter().all(|s| s.name != "icp_fit_b2b_account"));
    }

    #[test]
    fn the_ready_b2c_plan_scores_a_consumer() {
        let plans = compile(READY).unwrap();
        let mut bob = with_events(
            facts(
                json!({"age": 31, "country": "GB", "newsletter": true, "email": "bob@gmail.com"}),
            ),
            1,
        );
        bob.computed = BTreeMap::from([("order_count".to_owned(), json!(2))]);
        let scores = score_profile(&bob, NOW, &plans, &crate::domain::ValueModels::default());
        let b2c = score(&scores, "icp_fit_b2c");
        assert_eq!(
            rule_factors(b2c),
            [
                ("age_25_44", 20.0),
                ("shipping_country", 15.0),
                ("buyer", 15.0),
                ("newsletter", 10.0),
            ]
        );
        assert_eq!(b2c.value, 60.0);
        assert_eq!(grade_of(b2c), "B");
        // A served country, but a free email address: the B2B fit's points cancel out.
        let b2b = score(&scores, "icp_fit_b2b");
        assert_eq!(
            rule_factors(b2b),
            [("served_country", 10.0), ("free_email", -10.0)]
        );
        assert_eq!(b2b.factor("raw_points").unwrap().value, 0.0);
        assert_eq!(b2b.value, 0.0);
        assert_eq!(grade_of(b2b), "D");
    }

    #[test]
    fn a_score_is_recomputed_from_the_facts_not_accumulated() {
        let plans = compile(READY).unwrap();
        let mut person =
            facts(json!({"industry": "fintech", "employees": 2000, "role": "champion"}));
        let first = score(
            &score_profile(&person, NOW, &plans, &crate::domain::ValueModels::default()),
            "icp_fit_b2b",
        )
        .clone();
        assert_eq!(first.value, 20.0 + 25.0 + 15.0);
        // Scoring the same facts again gives the same score, not twice the points.
        let again = score(
            &score_profile(&person, NOW, &plans, &crate::domain::ValueModels::default()),
            "icp_fit_b2b",
        )
        .clone();
        assert_eq!(again, first);
        // A trait that changes so a rule no longer matches takes its points away.
        person
            .traits
            .insert("industry".to_owned(), json!("agriculture"));
        let later = score(
            &score_profile(&person, NOW, &plans, &crate::domain::ValueModels::default()),
            "icp_fit_b2b",
        )
        .clone();
        assert_eq!(later.value, 25.0 + 15.0);
        assert!(later.factor("target_industry").is_none());
    }

    const PLAN: &str = r#"
        [[scoring.plans]]
        name = "p"
        version = "2026-06"

        [[scoring.plans.rules]]
        name = "big"
        points = 30
        group = "size"
        condition = { trait = { name = "employees", op = "gte", value = 1000 } }

        [[scoring.plans.rules]]
        name = "medium"
        points = 20
        group = "size"
        condition = { trait = { name = "employees", op = "gte", value = 100 } }

        [[scoring.plans.rules]]
        name = "pro"
        description = "on the pro plan"
        points = 50
        condition = { trait = { name = "plan", op = "eq", value = "pro" } }

        [[scoring.plans.rules]]
        name = "churned"
        points = -60
        condition = { trait = { name = "churned", op = "eq", value = true } }

        [[scoring.plans.rules]]
        name = "dev"
        points = 20
        condition = { audience = "developers" }
    "#;

    #[test]
    fn groups_count_their_first_match_and_normalization_uses_the_best_reachable() {
        let plans = compile(PLAN).unwrap();
        let plan = plans.iter().next().unwrap();
        // 30 (the size group's best) + 50 + 20; the negative rule adds nothing to the maximum.
        assert_eq!(plan.max_points(), 100.0);
        assert_eq!(plan.model_version(), "p@2026-06");
        let evaluation = plan.evaluate(&facts(json!({"employees": 5000, "plan": "pro"})), &[]);
        let outcomes: Vec<_> = evaluation
            .rules
            .iter()
            .map(|r| (r.name.as_str(), r.matched, r.counted))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("big", true, true),
                ("medium", true, false),
                ("pro", true, true),
                ("churned", false, false),
                ("dev", false, false),
            ]
        );
        assert_eq!(evaluation.raw_points, 80.0);
        assert_eq!(evaluation.value, 80.0);
        let score = evaluation.to_score(NOW);
        let names: Vec<_> = score.factors.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["big", "pro", "raw_points", "max_points", "grade"]);
        assert_eq!(score.factor("pro").unwrap().description, "on the pro plan");
        // Without a description a factor says what its condition is.
        assert!(
            score
                .factor("big")
                .unwrap()
                .description
                .contains("employees"),
            "{:?}",
            score.factor("big")
        );

        // An audience membership counts; negative points can take the score below 0: 0.
        let mut churned = facts(json!({"employees": 150, "churned": true}));
        churned.audiences.insert("developers".to_owned());
        let evaluation = plan.evaluate(&churned, &[]);
        assert_eq!(evaluation.uncapped_points, 20.0 + 20.0 - 60.0);
        assert_eq!(evaluation.value, 0.0);
        assert_eq!(evaluation.grade.grade, "D");
    }

    #[test]
    fn a_cap_bounds_the_points_and_the_maximum() {
        let mut plans = parse(PLAN);
        plans[0].cap = Some(50.0);
        let plans = Plans::compile(plans).unwrap();
        let plan = plans.iter().next().unwrap();
        assert_eq!(plan.max_points(), 50.0);
        let e = plan.evaluate(&facts(json!({"employees": 100, "plan": "pro"})), &[]);
        assert_eq!(
            (e.uncapped_points, e.raw_points, e.value),
            (70.0, 50.0, 100.0)
        );
        let e = plan.evaluate(&facts(json!({"employees": 100})), &[]);
        assert_eq!((e.raw_points, e.value), (20.0, 40.0));
    }

    #[test]
    fn normalization_and_grade_bands() {
        assert_eq!(normalize(30.0, 60.0), 50.0);
        assert_eq!(normalize(90.0, 60.0), 100.0);
        assert_eq!(normalize(-5.0, 60.0), 0.0);
        assert_eq!(normalize(5.0, 0.0), 0.0);
        assert_eq!(normalize(f64::NAN, 10.0), 0.0);
        let bands = default_grades();
        let graded = |v: f64| grade(&bands, v).grade.clone();
        assert_eq!(
            [100.0, 75.0, 74.99, 50.0, 49.0, 25.0, 24.9, 0.0].map(graded),
            ["A", "A", "B", "B", "C", "C", "D", "D"]
        );
        let custom = vec![
            GradeBand {
                grade: "hot".into(),
                min: 80.0,
            },
            GradeBand {
                grade: "cold".into(),
                min: 0.0,
            },
        ];
        assert_eq!(grade(&custom, 80.0).grade, "hot");
        assert_eq!(grade(&custom, 79.0).grade, "cold");
    }

    #[test]
    fn tests_compare_like_audience_tests() {
        let t = |name: &str, op: Op, value: Value| Test {
            name: name.to_owned(),
            op,
            value,
        };
        let f = facts(json!({
            "n": 5, "s": "hello world", "list": ["a", "b"], "null": null, "f": 2.0
        }));
        let cx = Context {
            facts: &f,
            scores: &[],
        };
        let check = |test: Test| holds(&Condition::Trait(test), &cx);
        assert!(check(t("n", Op::Eq, json!(5.0))));
        assert!(check(t("f", Op::Eq, json!(2))));
        assert!(!check(t("n", Op::Eq, json!("5"))));
        assert!(check(t("n", Op::Ne, json!(6))));
        assert!(check(t("absent", Op::Ne, json!(6))), "ne holds when absent");
        assert!(check(t("n", Op::Gt, json!(4))) && !check(t("n", Op::Gt, json!(5))));
        assert!(check(t("n", Op::Gte, json!(5))) && !check(t("n", Op::Gte, json!(6))));
        assert!(check(t("n", Op::Lt, json!(6))) && !check(t("n", Op::Lt, json!(5))));
        assert!(check(t("n", Op::Lte, json!(5))) && !check(t("n", Op::Lte, json!(4))));
        assert!(!check(t("s", Op::Gt, json!(1))), "a string is not a number");
        assert!(check(t("n", Op::In, json!([1, 5]))) && !check(t("n", Op::In, json!([1]))));
        assert!(check(t("s", Op::Contains, json!("lo wo"))));
        assert!(check(t("list", Op::Contains, json!("b"))));
        assert!(!check(t("list", Op::Contains, json!("c"))));
        assert!(!check(t("n", Op::Contains, json!("5"))));
        assert!(check(t("n", Op::Exists, Value::Null)));
        assert!(!check(t("null", Op::Exists, Value::Null)), "null is absent");
        assert!(check(t("null", Op::Missing, Value::Null)));
        assert!(check(t("absent", Op::Missing, Value::Null)));
        assert!(
            !check(t("absent", Op::Lt, json!(1))),
            "absent compares with nothing"
        );
        let all = Condition::All(vec![
            Condition::Trait(t("n", Op::Eq, json!(5))),
            Condition::Not(Box::new(Condition::Trait(t("s", Op::Missing, Value::Null)))),
            Condition::Any(vec![
                Condition::Trait(t("n", Op::Eq, json!(1))),
                Condition::Trait(t("list", Op::Contains, json!("a"))),
            ]),
        ]);
        assert!(holds(&all, &cx));
        assert!(holds(&Condition::All(vec![]), &cx) && !holds(&Condition::Any(vec![]), &cx));
    }

    #[test]
    fn account_tests_read_any_account_and_the_membership() {
        let mut f = facts(json!({"industry": "software"}));
        let test = |name: &str, op: Op, value: Value| {
            Condition::Account(Test {
                name: name.to_owned(),
                op,
                value,
            })
        };
        let industry = test("industry", Op::Eq, json!("software"));
        let missing = test("industry", Op::Missing, Value::Null);
        let cx = |f: &ProfileFacts, c: &Condition| {
            holds(
                c,
                &Context {
                    facts: f,
                    scores: &[],
                },
            )
        };
        // A person's own traits are not an account's.
        assert!(!cx(&f, &industry));
        assert!(!cx(&f, &missing), "no account: no account condition holds");
        f.accounts = vec![
            AccountFacts {
                account_id: "a".into(),
                role: "champion".into(),
                ..AccountFacts::default()
            },
            AccountFacts {
                account_id: "b".into(),
                traits: BTreeMap::from([("industry".to_owned(), json!("software"))]),
                ..AccountFacts::default()
            },
        ];
        assert!(cx(&f, &industry), "the second account matches");
        assert!(cx(&f, &missing), "the first account has no industry");
        assert!(cx(&f, &test("member.role", Op::Eq, json!("champion"))));
        assert!(!cx(&f, &test("member.role", Op::Eq, json!("finance"))));
        // An empty title is no title.
        assert!(!cx(&f, &test("member.title", Op::Exists, Value::Null)));
        assert!(cx(&f, &test("member.title", Op::Missing, Value::Null)));
    }

    #[test]
    fn score_tests_read_engagement_and_earlier_plans_of_the_same_call() {
        let plans = compile(
            r#"
            [[scoring.plans]]
            name = "engaged"
            version = "1"
            rules = [
              { name = "active", points = 10, condition = { score = { name = "engagement", op = "gt", value = 30 } } },
            ]

            [[scoring.plans]]
            name = "second"
            version = "1"
            rules = [
              { name = "after", points = 10, condition = { score = { name = "engaged", op = "eq", value = 100 } } },
            ]
            "#,
        )
        .unwrap();
        // No stored score is sent: 3 events now make this call's engagement 45.
        let scores = score_profile(
            &with_events(facts(json!({})), 3),
            NOW,
            &plans,
            &crate::domain::ValueModels::default(),
        );
        assert_eq!(score(&scores, "engaged").value, 100.0);
        assert_eq!(score(&scores, "second").value, 100.0);
        let scores = score_profile(
            &with_events(facts(json!({})), 1),
            NOW,
            &plans,
            &crate::domain::ValueModels::default(),
        );
        assert_eq!(score(&scores, "engaged").value, 0.0);
        assert_eq!(score(&scores, "second").value, 0.0);
    }

    #[test]
    fn account_level_plans_do_not_score_people() {
        let plans = compile(
            r#"
            [[scoring.plans]]
            name = "account_fit"
            version = "1"
            level = "account"
            rules = [
              { name = "software", points = 10, condition = { trait = { name = "industry", op = "eq", value = "software" } } },
            ]
            "#,
        )
        .unwrap();
        assert_eq!(plans.iter().next().unwrap().level(), Level::Account);
        let scores = score_profile(
            &facts(json!({"industry": "software"})),
            NOW,
            &plans,
            &crate::domain::ValueModels::default(),
        );
        assert_eq!(scores.len(), 1, "engagement only");
    }

    #[test]
    fn unusable_plans_are_refused_with_the_reason() {
        let refused = |text: &str| compile(text).unwrap_err().to_string();
        let rule = |condition: &str| {
            format!(
                r#"[[scoring.plans]]
                name = "p"
                version = "1"
                rules = [ {{ name = "r", points = 10, condition = {condition} }} ]"#
            )
        };
        let cases = [
            (
                PLAN.to_owned() + PLAN,
                "scoring.plans[1] (\"p\"): the name is declared twice",
            ),
            (
                r#"[[scoring.plans]]
                name = "p"
                version = "1"
                rules = []"#
                    .to_owned(),
                "at least one rule",
            ),
            (
                rule(r#"{ trait = { name = "age", op = "gt", value = "old" } }"#),
                "rule \"r\": age: Gt compares with a number",
            ),
            (
                rule(r#"{ trait = { name = "plan", op = "in", value = "pro" } }"#),
                "in takes a list",
            ),
            (
                rule(r#"{ trait = { name = "plan", op = "eq" } }"#),
                "Eq needs a value",
            ),
            (
                rule(r#"{ performed = { event = "Order Completed" } }"#),
                "declare a computed trait",
            ),
            (
                rule(r#"{ score = { name = "later", op = "gt", value = 1 } }"#),
                "score \"later\" is not computed before this plan (known: engagement, churn_risk, predicted_value)",
            ),
            (rule(r#"{ audience = "" }"#), "audience needs a name"),
            (
                r#"[[scoring.plans]]
                name = "p"
                version = "1"
                rules = [ { name = "r", points = -5, condition = { all = [] } } ]"#
                    .to_owned(),
                "positive points",
            ),
            (
                r#"[[scoring.plans]]
                name = "engagement"
                version = "1"
                rules = [ { name = "r", points = 5, condition = { all = [] } } ]"#
                    .to_owned(),
                "built-in",
            ),
            (
                r#"[[scoring.plans]]
                name = "has space"
                version = "1"
                rules = [ { name = "r", points = 5, condition = { all = [] } } ]"#
                    .to_owned(),
                "a plan name is",
            ),
            (
                r#"[[scoring.plans]]
                name = "p"
                version = ""
                rules = [ { name = "r", points = 5, condition = { all = [] } } ]"#
                    .to_owned(),
                "version",
            ),
            (
                r#"[[scoring.plans]]
                name = "p"
                version = "1"
                rules = [
                  { name = "r", points = 5, condition = { all = [] } },
                  { name = "r", points = 5, condition = { all = [] } },
                ]"#
                .to_owned(),
                "rule \"r\": the name is used twice",
            ),
            (
                r#"[[scoring.plans]]
                name = "p"
                version = "1"
                rules = [ { name = "grade", points = 5, condition = { all = [] } } ]"#
                    .to_owned(),
                "the score's own factors",
            ),
            (
                r#"[[scoring.plans]]
                name = "p"
                version = "1"
                cap = 0
                rules = [ { name = "r", points = 5, condition = { all = [] } } ]"#
                    .to_owned(),
                "cap must be",
            ),
            (
                r#"[[scoring.plans]]
                name = "p"
                version = "1"
                grades = [ { grade = "A", min = 50 }, { grade = "B", min = 60 }, { grade = "C", min = 0 } ]
                rules = [ { name = "r", points = 5, condition = { all = [] } } ]"#
                    .to_owned(),
                "from the highest min to the lowest",
            ),
            (
                r#"[[scoring.plans]]
                name = "p"
                version = "1"
                grades = [ { grade = "A", min = 50 }, { grade = "B", min = 10 } ]
                rules = [ { name = "r", points = 5, condition = { all = [] } } ]"#
                    .to_owned(),
                "must have min 0",
            ),
            (
                r#"[[scoring.plans]]
                name = "p"
                version = "1"
                level = "account"
                rules = [ { name = "r", points = 5, condition = { audience = "x" } } ]"#
                    .to_owned(),
                "not available at account level",
            ),
        ];
        for (text, expected) in cases {
            let message = refused(&text);
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
        let mut deep = Condition::All(vec![]);
        for _ in 0..20 {
            deep = Condition::Not(Box::new(deep));
        }
        let mut plans = parse(PLAN);
        plans[0].rules[0].condition = deep;
        assert!(Plans::compile(plans).unwrap_err().reason.contains("deeper"));
        // Unknown operators and keys fail to parse, naming what is wrong.
        let bad_op = toml::from_str::<File>(&rule(
            r#"{ trait = { name = "age", op = "greater", value = 1 } }"#,
        ))
        .err()
        .unwrap()
        .to_string();
        assert!(bad_op.contains("greater"), "{bad_op}");
        assert!(
            toml::from_str::<File>(&rule(r#"{ trait = { name = "a", op = "eq", vlue = 1 } }"#))
                .is_err(),
            "unknown keys are refused"
        );
    }

    fn committee(roles: &[(&str, &[&str])]) -> BuyingCommittee {
        let declared: Vec<_> = roles
            .iter()
            .map(|(name, filled_by)| crate::account::BuyingRole {
                name: (*name).to_owned(),
                filled_by: filled_by.iter().map(|r| (*r).to_owned()).collect(),
            })
            .collect();
        BuyingCommittee::new(&declared).unwrap()
    }

    /// An account plan reading `buying_roles` in every way a rule can name a role.
    const ROLES_PLAN: &str = r#"
        [[scoring.plans]]
        name = "coverage"
        version = "1"
        level = "account"
        rules = [
          { name = "decider", points = 10, condition = { trait = { name = "buying_roles", op = "contains", value = "decision maker" } } },
          { name = "no_finance", points = 5, condition = { not = { trait = { name = "buying_roles", op = "contains", value = "finance" } } } },
          { name = "pair", points = 5, condition = { any = [
            { trait = { name = "member_count", op = "gte", value = 100 } },
            { trait = { name = "buying_roles", op = "eq", value = ["champion", "security reviewer", "champion"] } },
          ] } },
          { name = "members", points = 5, condition = { all = [
            { trait = { name = "member_roles", op = "contains", value = "intern" } },
            { trait = { name = "roles.ciso", op = "gte", value = 1 } },
            { trait = { name = "buying_roles_covered", op = "gte", value = 2 } },
            { trait = { name = "buying_roles", op = "exists" } },
          ] } },
        ]
    "#;

    #[test]
    fn rules_naming_a_buying_role_the_committee_lacks_are_found() {
        let plan = &parse(ROLES_PLAN)[0];
        let found = |c: &BuyingCommittee| -> Vec<(usize, String, String)> {
            unknown_buying_roles(plan, c)
                .into_iter()
                .map(|u| (u.rule_index, u.rule, u.role))
                .collect()
        };
        // The default committee has every role but the security reviewer. Member roles
        // (`member_roles`, `roles.<role>`) and counts are not the committee's: not checked.
        assert_eq!(
            found(&BuyingCommittee::default()),
            [(2, "pair".to_owned(), "security reviewer".to_owned())]
        );
        // A committee of other roles: each role once per rule, under `not` and `any` too.
        let custom = committee(&[
            ("security reviewer", &["ciso"]),
            ("champion", &["champion"]),
        ]);
        assert_eq!(
            found(&custom),
            [
                (0, "decider".to_owned(), "decision maker".to_owned()),
                (1, "no_finance".to_owned(), "finance".to_owned()),
            ]
        );
        let all = committee(&[
            ("decision maker", &["vp"]),
            ("finance", &["cfo"]),
            ("champion", &["champion"]),
            ("security reviewer", &["ciso"]),
        ]);
        assert_eq!(found(&all), []);

        // The message names the rule, the role and the known roles; the field, the condition.
        let unknown = &unknown_buying_roles(plan, &custom)[0];
        assert_eq!(
            unknown.to_string(),
            "rule \"decider\": buying role \"decision maker\" is not in the buying committee, \
             so the rule could never match (known buying roles: \"security reviewer\", \
             \"champion\")"
        );
        assert_eq!(unknown.field("plan_json"), "plan_json.rules[0].condition");

        // A known role spelled otherwise never matches either (tests compare exactly): named.
        let mut spelled = parse(ROLES_PLAN);
        spelled[0].rules.truncate(1);
        spelled[0].rules[0].condition = Condition::Trait(Test {
            name: BUYING_ROLES_LIST.to_owned(),
            op: Op::Contains,
            value: json!("Decision_Maker"),
        });
        assert_eq!(
            unknown_buying_roles(&spelled[0], &BuyingCommittee::default())[0].to_string(),
            "rule \"decider\": buying role \"Decision_Maker\" is not in the buying committee as \
             written (`buying_roles` lists normalized names: write \"decision maker\"), so the \
             rule could never match (known buying roles: \"decision maker\", \"technical \
             evaluator\", \"champion\", \"finance\")"
        );

        // Person plans cannot read `buying_roles` (a person's `trait` or an account's
        // `account` test reads stored traits): not checked.
        let mut person = parse(ROLES_PLAN);
        person[0].level = Level::Person;
        assert_eq!(unknown_buying_roles(&person[0], &custom), []);
    }

    #[test]
    fn a_rule_naming_a_role_the_committee_lacks_is_not_evaluable() {
        let mut plans = compile(ROLES_PLAN).unwrap();
        // Without finance, `not contains "finance"` would hold for every account: it must not.
        let custom = committee(&[
            ("decision maker", &["vp"]),
            ("champion", &["champion"]),
            ("security reviewer", &["ciso"]),
        ]);
        let found = plans.check_committee(&custom);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "coverage");
        assert_eq!(found[0].1.rule(), "no_finance");
        let plan = plans.iter().next().unwrap();
        assert_eq!(plan.not_evaluable(0), None);
        let reason = plan.not_evaluable(1).expect("marked");
        assert!(reason.contains("\"finance\""), "{reason}");
        // The maximum is the plan's as declared: the rule is a mistake to fix, not a change.
        assert_eq!(plan.max_points(), 25.0);
        let account = crate::account::AccountProfile {
            account_id: "acme".to_owned(),
            members: vec![crate::account::AccountMember {
                profile_id: "p1".to_owned(),
                role: "VP".to_owned(),
                title: String::new(),
            }],
            ..Default::default()
        };
        let (scores, evaluations) = crate::account::score_account(&account, NOW, &plans, &custom);
        let outcomes: Vec<_> = evaluations[0]
            .rules
            .iter()
            .map(|r| {
                (
                    r.name.as_str(),
                    r.matched,
                    r.counted,
                    r.not_evaluable.is_some(),
                )
            })
            .collect();
        assert_eq!(
            outcomes,
            [
                ("decider", true, true, false),
                ("no_finance", false, false, true),
                ("pair", false, false, false),
                ("members", false, false, false),
            ]
        );
        assert_eq!(scores[0].value, 40.0);

        // Checking again with a committee that has the role makes the rule evaluable again.
        assert_eq!(plans.check_committee(&BuyingCommittee::default()).len(), 1);
        let plan = plans.iter().next().unwrap();
        assert_eq!(plan.not_evaluable(1), None);
        assert!(plan.not_evaluable(2).is_some(), "the security reviewer");
    }

    /// An account plan testing `buying_roles_covered` with each comparison, at the edge of a
    /// three-role committee.
    const COVERAGE_PLAN: &str = r#"
        [[scoring.plans]]
        name = "coverage"
        version = "1"
        level = "account"
        rules = [
          { name = "three", points = 10, condition = { trait = { name = "buying_roles_covered", op = "gte", value = 3 } } },
          { name = "four", points = 10, condition = { trait = { name = "buying_roles_covered", op = "gte", value = 4 } } },
          { name = "above_three", points = 5, condition = { any = [
            { trait = { name = "member_count", op = "gte", value = 100 } },
            { not = { trait = { name = "buying_roles_covered", op = "gt", value = 3 } } },
          ] } },
          { name = "exactly_five", points = 5, condition = { trait = { name = "buying_roles_covered", op = "eq", value = 5 } } },
          { name = "few", points = 5, condition = { trait = { name = "buying_roles_covered", op = "lte", value = 9 } } },
        ]
    "#;

    #[test]
    fn coverage_thresholds_above_the_committee_size_are_found() {
        let plan = &parse(COVERAGE_PLAN)[0];
        let three = committee(&[
            ("decision maker", &["vp"]),
            ("champion", &["champion"]),
            ("finance", &["cfo"]),
        ]);
        let found = |c: &BuyingCommittee| -> Vec<(usize, String, f64, usize)> {
            unreachable_coverage(plan, c)
                .into_iter()
                .map(|u| (u.rule_index, u.rule, u.threshold, u.committee_size))
                .collect()
        };
        // `gte 3` is reachable with three roles, `gte 4`, `gt 3` (under `not` and `any` too)
        // and `eq 5` are not; `lte 9` always holds, it is not a threshold to reach.
        assert_eq!(
            found(&three),
            [
                (1, "four".to_owned(), 4.0, 3),
                (2, "above_three".to_owned(), 3.0, 3),
                (3, "exactly_five".to_owned(), 5.0, 3),
            ]
        );
        // The default committee has four roles: only `eq 5` is out of reach.
        assert_eq!(
            found(&BuyingCommittee::default()),
            [(3, "exactly_five".to_owned(), 5.0, 4)]
        );
        let mismatch = &committee_mismatches(plan, &three)[0];
        assert_eq!(
            mismatch.to_string(),
            "rule \"four\": buying_roles_covered gte 4 needs more buying roles than the buying \
             committee has (3; buying_roles_covered is 0 to 3), so the test could never hold"
        );
        assert_eq!(mismatch.field("plan_json"), "plan_json.rules[1].condition");
        // Person plans have no coverage fact: not checked.
        let mut person = parse(COVERAGE_PLAN);
        person[0].level = Level::Person;
        assert_eq!(unreachable_coverage(&person[0], &three), []);
    }

    #[test]
    fn a_coverage_rule_the_shrunk_committee_cannot_reach_is_not_evaluable() {
        let mut plans = compile(COVERAGE_PLAN).unwrap();
        let two = committee(&[("decision maker", &["vp"]), ("champion", &["champion"])]);
        let found = plans.check_committee(&two);
        let rules: Vec<&str> = found.iter().map(|(_, m)| m.rule()).collect();
        assert_eq!(rules, ["three", "four", "above_three", "exactly_five"]);
        let plan = plans.iter().next().unwrap();
        assert!(plan.not_evaluable(0).unwrap().contains("gte 3"));
        assert_eq!(plan.not_evaluable(4), None);
        // Both roles covered: `not gt 3` would hold, but the rule is not evaluable.
        let account = crate::account::AccountProfile {
            account_id: "acme".to_owned(),
            members: ["VP", "champion"]
                .iter()
                .enumerate()
                .map(|(i, role)| crate::account::AccountMember {
                    profile_id: format!("p{i}"),
                    role: (*role).to_owned(),
                    title: String::new(),
                })
                .collect(),
            ..Default::default()
        };
        let (_, evaluations) = crate::account::score_account(&account, NOW, &plans, &two);
        let outcomes: Vec<_> = evaluations[0]
            .rules
            .iter()
            .map(|r| (r.name.as_str(), r.matched, r.not_evaluable.is_some()))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("three", false, true),
                ("four", false, true),
                ("above_three", false, true),
                ("exactly_five", false, true),
                ("few", true, false),
            ]
        );
        // A committee of five roles reaches every threshold again.
        let five = committee(&[
            ("decision maker", &["vp"]),
            ("champion", &["champion"]),
            ("finance", &["cfo"]),
            ("security reviewer", &["ciso"]),
            ("user", &["power user"]),
        ]);
        assert_eq!(plans.check_committee(&five), []);
        assert_eq!(plans.iter().next().unwrap().not_evaluable(0), None);
    }

    #[test]
    fn the_ready_plans_name_no_buying_role_and_count_any_committees_coverage() {
        // Their coverage rules count `buying_roles_covered`, whatever the committee's roles, and
        // the person plan reads the member's own role (`member.role`), not a buying role: a
        // committee without any default role leaves every rule evaluable.
        let custom = committee(&[
            ("security reviewer", &["ciso"]),
            ("sponsor", &["vp", "director"]),
            ("user", &["power user"]),
        ]);
        let mut plans = compile(READY).unwrap();
        for plan in plans.iter() {
            assert_eq!(
                unknown_buying_roles(plan.plan(), &custom),
                [],
                "{}",
                plan.plan().name
            );
        }
        assert_eq!(plans.check_committee(&custom), []);
        let account = crate::account::AccountProfile {
            account_id: "bigco".to_owned(),
            traits: BTreeMap::from([("employees".to_owned(), json!(500))]),
            members: ["CISO", "Director", "decision maker", "intern"]
                .iter()
                .enumerate()
                .map(|(i, role)| crate::account::AccountMember {
                    profile_id: format!("p{i}"),
                    role: (*role).to_owned(),
                    title: String::new(),
                })
                .collect(),
        };
        let (scores, _) = crate::account::score_account(&account, NOW, &plans, &custom);
        // 20 (200+ employees) + 20 (two of the configured roles covered).
        assert_eq!(
            rule_factors(&scores[0]),
            [("employees_200_999", 20.0), ("buying_committee_2", 20.0)]
        );
    }
}
