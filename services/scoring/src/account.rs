//! Account-level scoring: the facts account-level plans read (the account's traits and what is
//! derived from its members) and the account's scores.
//!
//! Account plans' `trait` tests read the account's traits and these derived member facts,
//! which hide traits of the same names:
//!
//! - `member_count`: how many people belong to the account;
//! - `member_roles`: the distinct roles of its members, normalized (below), sorted;
//! - `roles.<role>`: how many members hold `<role>` (normalized: `roles.decision maker`);
//! - `buying_roles`: the roles of the [`BuyingCommittee`] (`[[scoring.buying_roles]]`, else
//!   [`DEFAULT_BUYING_ROLES`]) that at least one member fills, in the committee's order;
//! - `buying_roles_covered`: how many of them: 0 to the number of roles in the committee (4 with
//!   the default one).
//!
//! A role is normalized by trimming it, lowering its case and reading `_` and `-` as spaces
//! (`Decision_Maker` is `decision maker`), since group calls come from many sources. The
//! committee's names and member roles are normalized the same way when it is declared.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::domain::{ProfileFacts, Score};
use crate::plans::{Evaluation, Level, Plans};

/// The buying committee of a B2B deal when `[[scoring.buying_roles]]` is not declared: each
/// buying role, with the (normalized) member roles that fill it.
pub const DEFAULT_BUYING_ROLES: [(&str, &[&str]); 4] = [
    ("decision maker", &["decision maker", "economic buyer"]),
    ("technical evaluator", &["technical evaluator"]),
    ("champion", &["champion"]),
    ("finance", &["finance", "procurement"]),
];

/// The most buying roles a committee may declare.
pub const MAX_BUYING_ROLES: usize = 50;
/// The most member roles one buying role may be filled by.
pub const MAX_FILLED_BY: usize = 50;
/// The longest buying role or member role, normalized, in bytes.
pub const MAX_ROLE_NAME: usize = 200;

/// The names of the derived member facts; `roles.` is a prefix.
pub const MEMBER_COUNT: &str = "member_count";
/// The distinct member roles.
pub const MEMBER_ROLES: &str = "member_roles";
/// The prefix of per-role member counts.
pub const ROLES_PREFIX: &str = "roles.";
/// The buying roles covered, by name.
pub const BUYING_ROLES_LIST: &str = "buying_roles";
/// How many buying roles are covered.
pub const BUYING_ROLES_COVERED: &str = "buying_roles_covered";

/// One buying role (`[[scoring.buying_roles]]`): its name, and the member roles that fill it.
/// In a [`BuyingCommittee`] both are normalized, and `filled_by` holds each role once.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuyingRole {
    /// The buying role, as `buying_roles` lists it: `decision maker`.
    pub name: String,
    /// The member roles (`AccountMember::role`) that fill it: `["decision maker", "vp"]`. A
    /// member whose role is the buying role's name fills it only when the name is listed here.
    pub filled_by: Vec<String>,
}

/// The buying committee `buying_roles` and `buying_roles_covered` are counted against:
/// validated, normalized buying roles in declared order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuyingCommittee {
    roles: Vec<BuyingRole>,
}

impl Default for BuyingCommittee {
    /// The committee of [`DEFAULT_BUYING_ROLES`].
    fn default() -> Self {
        Self {
            roles: DEFAULT_BUYING_ROLES
                .iter()
                .map(|(name, filled_by)| BuyingRole {
                    name: (*name).to_owned(),
                    filled_by: filled_by.iter().map(|r| (*r).to_owned()).collect(),
                })
                .collect(),
        }
    }
}

/// Why a declared buying committee is unusable; names the buying role's place in
/// `[[scoring.buying_roles]]` when one is at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("scoring.buying_roles{}: {reason}", place(*.index, .name))]
pub struct InvalidBuyingRoles {
    /// The buying role's position, or `None` when the list as a whole is at fault.
    pub index: Option<usize>,
    /// The buying role's name, as declared; empty when the list is at fault.
    pub name: String,
    /// What is wrong.
    pub reason: String,
}

fn place(index: Option<usize>, name: &str) -> String {
    index.map_or_else(String::new, |i| format!("[{i}] ({name:?})"))
}

impl BuyingCommittee {
    /// Validates and normalizes `declared`, or says what is wrong with the first unusable
    /// buying role. An empty list is refused: leaving `[[scoring.buying_roles]]` out is how to
    /// get the default committee, and a plan that does not want coverage does not test it.
    pub fn new(declared: &[BuyingRole]) -> Result<Self, InvalidBuyingRoles> {
        let whole = |reason: String| InvalidBuyingRoles {
            index: None,
            name: String::new(),
            reason,
        };
        if declared.is_empty() {
            return Err(whole(
                "declare at least one buying role, or leave [[scoring.buying_roles]] out for \
                 the default committee (decision maker, technical evaluator, champion, finance)"
                    .to_owned(),
            ));
        }
        if declared.len() > MAX_BUYING_ROLES {
            return Err(whole(format!(
                "{} buying roles declared, at most {MAX_BUYING_ROLES}",
                declared.len()
            )));
        }
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut roles = Vec::with_capacity(declared.len());
        for (index, role) in declared.iter().enumerate() {
            let invalid = |reason: String| InvalidBuyingRoles {
                index: Some(index),
                name: role.name.clone(),
                reason,
            };
            let name = normalize_role(&role.name);
            if name.is_empty() || name.len() > MAX_ROLE_NAME {
                return Err(invalid(format!(
                    "name must be 1 to {MAX_ROLE_NAME} bytes once normalized (trimmed, lower \
                     case, `_` and `-` read as spaces)"
                )));
            }
            if let Some(first) = seen.insert(name.clone(), index) {
                return Err(invalid(format!(
                    "name {name:?} is declared twice (first as scoring.buying_roles[{first}]; \
                     names are compared normalized)"
                )));
            }
            if role.filled_by.is_empty() {
                return Err(invalid(
                    "filled_by is empty: list the member roles that fill this buying role \
                     (the name itself too, if members hold it)"
                        .to_owned(),
                ));
            }
            if role.filled_by.len() > MAX_FILLED_BY {
                return Err(invalid(format!(
                    "filled_by lists {} member roles, at most {MAX_FILLED_BY}",
                    role.filled_by.len()
                )));
            }
            let mut filled_by: Vec<String> = Vec::with_capacity(role.filled_by.len());
            for (i, member_role) in role.filled_by.iter().enumerate() {
                let member_role = normalize_role(member_role);
                if member_role.is_empty() || member_role.len() > MAX_ROLE_NAME {
                    return Err(invalid(format!(
                        "filled_by[{i}] must be 1 to {MAX_ROLE_NAME} bytes once normalized"
                    )));
                }
                // Two spellings of one role are one role.
                if !filled_by.contains(&member_role) {
                    filled_by.push(member_role);
                }
            }
            roles.push(BuyingRole { name, filled_by });
        }
        Ok(Self { roles })
    }

    /// The buying roles, normalized, in declared order.
    pub fn roles(&self) -> &[BuyingRole] {
        &self.roles
    }

    /// The buying roles filled by at least one of `member_roles` (normalized), in declared
    /// order, each once.
    pub fn covered(&self, member_roles: &BTreeSet<&str>) -> Vec<&str> {
        self.roles
            .iter()
            .filter(|role| {
                role.filled_by
                    .iter()
                    .any(|r| member_roles.contains(r.as_str()))
            })
            .map(|role| role.name.as_str())
            .collect()
    }
}

/// What scoring knows about one account.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AccountProfile {
    /// The account id.
    pub account_id: String,
    /// The account's traits by name.
    pub traits: BTreeMap<String, Value>,
    /// Its members.
    pub members: Vec<AccountMember>,
}

/// One person of an account.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AccountMember {
    /// The person's live profile id.
    pub profile_id: String,
    /// Their role in the account, as sent; empty when not given.
    pub role: String,
    /// Their title in the account; empty when not given.
    pub title: String,
}

/// `role` normalized: trimmed, lower case, `_` and `-` read as spaces, spaces collapsed.
pub fn normalize_role(role: &str) -> String {
    role.to_lowercase()
        .replace(['_', '-'], " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

impl AccountProfile {
    /// How many members hold each role, normalized; members without a role are not counted.
    fn members_by_role(&self) -> BTreeMap<String, u64> {
        let mut by_role: BTreeMap<String, u64> = BTreeMap::new();
        for member in &self.members {
            let role = normalize_role(&member.role);
            if !role.is_empty() {
                *by_role.entry(role).or_default() += 1;
            }
        }
        by_role
    }

    /// The buying roles of `committee` at least one member fills, in the committee's order.
    pub fn buying_roles<'c>(&self, committee: &'c BuyingCommittee) -> Vec<&'c str> {
        let by_role = self.members_by_role();
        committee.covered(&by_role.keys().map(String::as_str).collect())
    }

    /// What account plans' `trait` tests read: the traits, then the derived member facts over
    /// them, buying roles counted against `committee`.
    pub fn facts(&self, committee: &BuyingCommittee) -> BTreeMap<String, Value> {
        let mut facts = self.traits.clone();
        let by_role = self.members_by_role();
        // Traits named like a derived count go, so a stale `roles.x` trait cannot pass for one.
        facts.retain(|name, _| !name.starts_with(ROLES_PREFIX));
        for (role, count) in &by_role {
            facts.insert(format!("{ROLES_PREFIX}{role}"), json!(count));
        }
        let buying = committee.covered(&by_role.keys().map(String::as_str).collect());
        facts.insert(MEMBER_COUNT.to_owned(), json!(self.members.len()));
        facts.insert(
            MEMBER_ROLES.to_owned(),
            json!(by_role.keys().collect::<Vec<_>>()),
        );
        facts.insert(BUYING_ROLES_COVERED.to_owned(), json!(buying.len()));
        facts.insert(BUYING_ROLES_LIST.to_owned(), json!(buying));
        facts
    }
}

/// The scores of `account` at `as_of`, one per account-level plan of `plans` in scoring order,
/// with each plan's evaluation; buying roles are counted against `committee`.
pub fn score_account(
    account: &AccountProfile,
    as_of: OffsetDateTime,
    plans: &Plans,
    committee: &BuyingCommittee,
) -> (Vec<Score>, Vec<Evaluation>) {
    // Account plans read `trait` tests only (other conditions are refused at account level).
    let facts = ProfileFacts {
        profile_id: account.account_id.clone(),
        traits: account.facts(committee),
        ..ProfileFacts::default()
    };
    let mut scores = Vec::new();
    let evaluations = plans.evaluate_level(Level::Account, &facts, as_of, &mut scores);
    (scores, evaluations)
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2026-06-01 12:00:00 UTC);

    fn member(id: &str, role: &str) -> AccountMember {
        AccountMember {
            profile_id: id.to_owned(),
            role: role.to_owned(),
            title: String::new(),
        }
    }

    fn account(members: Vec<AccountMember>) -> AccountProfile {
        AccountProfile {
            account_id: "acme".to_owned(),
            traits: BTreeMap::from([
                ("industry".to_owned(), json!("software")),
                ("employees".to_owned(), json!(500)),
            ]),
            members,
        }
    }

    #[test]
    fn coverage_counts_each_buying_role_once_whatever_the_spelling() {
        assert_eq!(normalize_role("  Decision_Maker "), "decision maker");
        assert_eq!(normalize_role("technical-evaluator"), "technical evaluator");
        assert_eq!(
            account(vec![]).buying_roles(&BuyingCommittee::default()),
            Vec::<&str>::new()
        );
        let a = account(vec![
            member("p1", "Economic Buyer"),
            member("p2", "decision maker"),
            member("p3", "intern"),
            member("p4", ""),
            member("p5", "procurement"),
        ]);
        // Two members fill the decision maker's role: it counts once.
        assert_eq!(
            a.buying_roles(&BuyingCommittee::default()),
            ["decision maker", "finance"]
        );
        let facts = a.facts(&BuyingCommittee::default());
        assert_eq!(facts[BUYING_ROLES_COVERED], json!(2));
        assert_eq!(
            facts[BUYING_ROLES_LIST],
            json!(["decision maker", "finance"])
        );
        assert_eq!(facts[MEMBER_COUNT], json!(5));
        assert_eq!(
            facts[MEMBER_ROLES],
            json!(["decision maker", "economic buyer", "intern", "procurement"])
        );
        assert_eq!(facts["roles.decision maker"], json!(1));
        assert_eq!(facts["roles.intern"], json!(1));
        assert!(!facts.contains_key("roles."), "no count for an empty role");
        assert_eq!(facts["industry"], json!("software"));

        let all = account(vec![
            member("p1", "decision maker"),
            member("p2", "technical evaluator"),
            member("p3", "champion"),
            member("p4", "finance"),
        ]);
        assert_eq!(
            all.facts(&BuyingCommittee::default())[BUYING_ROLES_COVERED],
            json!(4)
        );
    }

    fn role(name: &str, filled_by: &[&str]) -> BuyingRole {
        BuyingRole {
            name: name.to_owned(),
            filled_by: filled_by.iter().map(|r| (*r).to_owned()).collect(),
        }
    }

    #[test]
    fn the_default_committee_is_the_four_fixed_roles() {
        let default = BuyingCommittee::default();
        let names: Vec<_> = default.roles().iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "decision maker",
                "technical evaluator",
                "champion",
                "finance"
            ]
        );
        assert_eq!(
            default.roles()[0].filled_by,
            ["decision maker", "economic buyer"]
        );
        assert_eq!(default.roles()[3].filled_by, ["finance", "procurement"]);
        // Declaring the same committee, spelled loosely, is the same committee.
        let spelled_out = BuyingCommittee::new(&[
            role("Decision_Maker", &["decision maker", "Economic-Buyer"]),
            role(" Technical Evaluator ", &["technical_evaluator"]),
            role("CHAMPION", &["champion"]),
            role("finance", &["Finance", "procurement", "PROCUREMENT"]),
        ])
        .unwrap();
        assert_eq!(spelled_out, default);
    }

    #[test]
    fn a_declared_committee_counts_its_own_roles_each_once_whatever_the_spelling() {
        let committee = BuyingCommittee::new(&[
            role(
                "Decision_Maker",
                &["decision maker", "Economic-Buyer", "VP", "vp "],
            ),
            role("Security Reviewer", &["CISO", "security"]),
            role("user-champion", &["champion", "power user"]),
        ])
        .unwrap();
        // Normalized as declared, each member role once, in declared order.
        assert_eq!(
            committee.roles()[0],
            role(
                "decision maker",
                &["decision maker", "economic buyer", "vp"]
            )
        );
        assert_eq!(committee.roles()[2].name, "user champion");

        let a = account(vec![
            member("p1", "ciso"),
            member("p2", "V_P"),
            member("p3", "Economic Buyer"),
            member("p4", "technical evaluator"),
            member("p5", "procurement"),
        ]);
        // Two members fill the decision maker's role: it counts once; the committee's order,
        // not the members', sets the list's; roles of the default committee no longer count.
        assert_eq!(
            a.buying_roles(&committee),
            ["decision maker", "security reviewer"]
        );
        let facts = a.facts(&committee);
        assert_eq!(facts[BUYING_ROLES_COVERED], json!(2));
        assert_eq!(
            facts[BUYING_ROLES_LIST],
            json!(["decision maker", "security reviewer"])
        );
        // The other member facts do not depend on the committee.
        assert_eq!(facts[MEMBER_COUNT], json!(5));
        assert_eq!(facts["roles.v p"], json!(1));
        // The same account with the default committee: unchanged from before.
        let default = a.facts(&BuyingCommittee::default());
        assert_eq!(default[BUYING_ROLES_COVERED], json!(3));
        assert_eq!(
            default[BUYING_ROLES_LIST],
            json!(["decision maker", "technical evaluator", "finance"])
        );

        // A member role may fill two buying roles: one champion covers both.
        let overlapping = BuyingCommittee::new(&[
            role("champion", &["champion"]),
            role("internal sponsor", &["champion", "sponsor"]),
        ])
        .unwrap();
        let champion = account(vec![member("p1", "Champion")]);
        assert_eq!(champion.facts(&overlapping)[BUYING_ROLES_COVERED], json!(2));
        // No member fills any role: 0, an empty list.
        let facts = account(vec![member("p1", "intern")]).facts(&committee);
        assert_eq!(facts[BUYING_ROLES_COVERED], json!(0));
        assert_eq!(facts[BUYING_ROLES_LIST], json!([]));
    }

    #[test]
    fn an_unusable_committee_is_refused_naming_the_role_and_the_problem() {
        let refused = |roles: &[BuyingRole]| BuyingCommittee::new(roles).unwrap_err().to_string();
        assert!(
            refused(&[]).starts_with("scoring.buying_roles: declare at least one buying role"),
            "{}",
            refused(&[])
        );
        let many: Vec<_> = (0..=MAX_BUYING_ROLES)
            .map(|i| role(&format!("role {i}"), &["x"]))
            .collect();
        assert_eq!(
            refused(&many),
            "scoring.buying_roles: 51 buying roles declared, at most 50"
        );
        assert!(BuyingCommittee::new(&many[..MAX_BUYING_ROLES]).is_ok());
        assert_eq!(
            refused(&[role("champion", &["champion"]), role(" _- ", &["x"])]),
            "scoring.buying_roles[1] (\" _- \"): name must be 1 to 200 bytes once normalized \
             (trimmed, lower case, `_` and `-` read as spaces)"
        );
        let long = "x".repeat(MAX_ROLE_NAME + 1);
        assert!(
            refused(&[role(&long, &["x"])]).contains("name must be 1 to 200 bytes"),
            "{}",
            refused(&[role(&long, &["x"])])
        );
        assert!(BuyingCommittee::new(&[role(&long[1..], &[&long[1..]])]).is_ok());
        assert_eq!(
            refused(&[
                role("champion", &["champion"]),
                role("finance", &["finance"]),
                role("Champion", &["sponsor"]),
            ]),
            "scoring.buying_roles[2] (\"Champion\"): name \"champion\" is declared twice \
             (first as scoring.buying_roles[0]; names are compared normalized)"
        );
        assert_eq!(
            refused(&[role("finance", &[])]),
            "scoring.buying_roles[0] (\"finance\"): filled_by is empty: list the member roles \
             that fill this buying role (the name itself too, if members hold it)"
        );
        assert_eq!(
            refused(&[role("finance", &["finance", "  "])]),
            "scoring.buying_roles[0] (\"finance\"): filled_by[1] must be 1 to 200 bytes once \
             normalized"
        );
        assert!(refused(&[role("finance", &[&long])]).contains("filled_by[0] must be 1 to 200"));
        let crowd: Vec<String> = (0..=MAX_FILLED_BY).map(|i| format!("r{i}")).collect();
        let crowd: Vec<&str> = crowd.iter().map(String::as_str).collect();
        assert_eq!(
            refused(&[role("finance", &crowd)]),
            "scoring.buying_roles[0] (\"finance\"): filled_by lists 51 member roles, at most 50"
        );
    }

    #[test]
    fn derived_facts_hide_traits_of_the_same_names() {
        let mut a = account(vec![member("p1", "champion")]);
        a.traits.insert(BUYING_ROLES_COVERED.to_owned(), json!(4));
        a.traits.insert(MEMBER_COUNT.to_owned(), json!(1000));
        a.traits.insert("roles.finance".to_owned(), json!(3));
        let facts = a.facts(&BuyingCommittee::default());
        assert_eq!(facts[BUYING_ROLES_COVERED], json!(1));
        assert_eq!(facts[MEMBER_COUNT], json!(1));
        assert!(!facts.contains_key("roles.finance"));
        assert_eq!(facts["roles.champion"], json!(1));
    }

    const PLANS: &str = r#"
        [[scoring.plans]]
        name = "person_fit"
        version = "1"
        rules = [
          { name = "software", points = 10, condition = { trait = { name = "industry", op = "eq", value = "software" } } },
        ]

        [[scoring.plans]]
        name = "committee"
        version = "2"
        level = "account"

        [[scoring.plans.rules]]
        name = "full_committee"
        description = "3 or more buying roles covered"
        points = 60
        group = "coverage"
        condition = { trait = { name = "buying_roles_covered", op = "gte", value = 3 } }

        [[scoring.plans.rules]]
        name = "two_roles"
        description = "2 buying roles covered"
        points = 40
        group = "coverage"
        condition = { trait = { name = "buying_roles_covered", op = "gte", value = 2 } }

        [[scoring.plans.rules]]
        name = "one_role"
        description = "1 buying role covered"
        points = 20
        group = "coverage"
        condition = { trait = { name = "buying_roles_covered", op = "gte", value = 1 } }

        [[scoring.plans.rules]]
        name = "decider_known"
        description = "a decision maker is a member"
        points = 20
        condition = { trait = { name = "buying_roles", op = "contains", value = "decision maker" } }

        [[scoring.plans.rules]]
        name = "big"
        description = "200 employees or more"
        points = 20
        condition = { trait = { name = "employees", op = "gte", value = 200 } }
    "#;

    fn plans() -> Plans {
        #[derive(serde::Deserialize)]
        struct File {
            scoring: crate::ScoringSettings,
        }
        Plans::compile(toml::from_str::<File>(PLANS).unwrap().scoring.plans).unwrap()
    }

    #[test]
    fn account_plans_score_coverage_and_firmographics_and_explain_it() {
        let plans = plans();
        let (scores, evaluations) = score_account(
            &account(vec![member("p1", "technical evaluator")]),
            NOW,
            &plans,
            &BuyingCommittee::default(),
        );
        // Only the account plan: person plans never score accounts.
        let names: Vec<_> = scores.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["committee"]);
        let one = &scores[0];
        assert_eq!(one.model_version, "committee@2");
        assert_eq!(one.computed_at, NOW);
        // 20 (one role) + 20 (big) of 100.
        assert_eq!(one.value, 40.0);
        let factors: Vec<_> = one
            .factors
            .iter()
            .map(|f| (f.name.as_str(), f.value))
            .collect();
        assert_eq!(
            factors,
            [
                ("one_role", 20.0),
                ("big", 20.0),
                ("raw_points", 40.0),
                ("max_points", 100.0),
                ("grade", 25.0),
            ]
        );
        assert_eq!(
            one.factor("one_role").unwrap().description,
            "1 buying role covered"
        );
        let outcomes: Vec<_> = evaluations[0]
            .rules
            .iter()
            .map(|r| (r.name.as_str(), r.matched, r.counted))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("full_committee", false, false),
                ("two_roles", false, false),
                ("one_role", true, true),
                ("decider_known", false, false),
                ("big", true, true),
            ]
        );

        // A decision maker joins: two roles covered, the decider known.
        let (scores, _) = score_account(
            &account(vec![
                member("p1", "technical evaluator"),
                member("p2", "Decision Maker"),
            ]),
            NOW,
            &plans,
            &BuyingCommittee::default(),
        );
        assert_eq!(scores[0].value, 80.0);
        assert!(scores[0].factor("two_roles").is_some());
        assert!(
            scores[0].factor("one_role").is_none(),
            "bands are exclusive"
        );
        assert!(scores[0].factor("decider_known").is_some());
        assert_eq!(
            scores[0].factor("grade").unwrap().description,
            "grade A: a score of 75 or more"
        );
    }

    #[test]
    fn an_account_without_members_or_traits_scores_zero() {
        let (scores, evaluations) = score_account(
            &AccountProfile {
                account_id: "empty".to_owned(),
                ..AccountProfile::default()
            },
            NOW,
            &plans(),
            &BuyingCommittee::default(),
        );
        assert_eq!(scores.len(), 1);
        assert_eq!(scores[0].value, 0.0);
        assert!(evaluations[0].rules.iter().all(|r| !r.matched));
        // No plans, no scores.
        let (scores, evaluations) = score_account(
            &account(vec![]),
            NOW,
            &Plans::default(),
            &BuyingCommittee::default(),
        );
        assert!(scores.is_empty() && evaluations.is_empty());
    }
}
