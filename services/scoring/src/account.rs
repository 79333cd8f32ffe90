//! Account-level scoring: the facts account-level plans read (the account's traits and what is
//! derived from its members) and the account's scores.
//!
//! Account plans' `trait` tests read the account's traits and these derived member facts,
//! which hide traits of the same names:
//!
//! - `member_count`: how many people belong to the account;
//! - `member_roles`: the distinct roles of its members, normalized (below), sorted;
//! - `roles.<role>`: how many members hold `<role>` (normalized: `roles.decision maker`);
//! - `buying_roles`: the buying roles of [`BUYING_ROLES`] held by at least one member, in that
//!   order;
//! - `buying_roles_covered`: how many of them: 0 to 4.
//!
//! A role is normalized by trimming it, lowering its case and reading `_` and `-` as spaces
//! (`Decision_Maker` is `decision maker`), since group calls come from many sources.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::domain::{ProfileFacts, Score};
use crate::plans::{Evaluation, Level, Plans};

/// The buying committee of a B2B deal: each buying role, with the (normalized) member roles
/// that fill it. `buying_roles_covered` counts the roles at least one member fills.
pub const BUYING_ROLES: [(&str, &[&str]); 4] = [
    ("decision maker", &["decision maker", "economic buyer"]),
    ("technical evaluator", &["technical evaluator"]),
    ("champion", &["champion"]),
    ("finance", &["finance", "procurement"]),
];

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
    /// The buying roles of [`BUYING_ROLES`] at least one member fills, in that order.
    pub fn buying_roles(&self) -> Vec<&'static str> {
        let roles: BTreeSet<String> = self
            .members
            .iter()
            .map(|m| normalize_role(&m.role))
            .collect();
        BUYING_ROLES
            .iter()
            .filter(|(_, filled_by)| filled_by.iter().any(|r| roles.contains(*r)))
            .map(|(name, _)| *name)
            .collect()
    }

    /// What account plans' `trait` tests read: the traits, then the derived member facts over
    /// them.
    pub fn facts(&self) -> BTreeMap<String, Value> {
        let mut facts = self.traits.clone();
        let mut by_role: BTreeMap<String, u64> = BTreeMap::new();
        for member in &self.members {
            let role = normalize_role(&member.role);
            if !role.is_empty() {
                *by_role.entry(role).or_default() += 1;
            }
        }
        // Traits named like a derived count go, so a stale `roles.x` trait cannot pass for one.
        facts.retain(|name, _| !name.starts_with(ROLES_PREFIX));
        for (role, count) in &by_role {
            facts.insert(format!("{ROLES_PREFIX}{role}"), json!(count));
        }
        let buying = self.buying_roles();
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
/// with each plan's evaluation.
pub fn score_account(
    account: &AccountProfile,
    as_of: OffsetDateTime,
    plans: &Plans,
) -> (Vec<Score>, Vec<Evaluation>) {
    // Account plans read `trait` tests only (other conditions are refused at account level).
    let facts = ProfileFacts {
        profile_id: account.account_id.clone(),
        traits: account.facts(),
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
        assert_eq!(account(vec![]).buying_roles(), Vec::<&str>::new());
        let a = account(vec![
            member("p1", "Economic Buyer"),
            member("p2", "decision maker"),
            member("p3", "intern"),
            member("p4", ""),
            member("p5", "procurement"),
        ]);
        // Two members fill the decision maker's role: it counts once.
        assert_eq!(a.buying_roles(), ["decision maker", "finance"]);
        let facts = a.facts();
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
        assert_eq!(all.facts()[BUYING_ROLES_COVERED], json!(4));
    }

    #[test]
    fn derived_facts_hide_traits_of_the_same_names() {
        let mut a = account(vec![member("p1", "champion")]);
        a.traits.insert(BUYING_ROLES_COVERED.to_owned(), json!(4));
        a.traits.insert(MEMBER_COUNT.to_owned(), json!(1000));
        a.traits.insert("roles.finance".to_owned(), json!(3));
        let facts = a.facts();
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
        );
        assert_eq!(scores.len(), 1);
        assert_eq!(scores[0].value, 0.0);
        assert!(evaluations[0].rules.iter().all(|r| !r.matched));
        // No plans, no scores.
        let (scores, evaluations) = score_account(&account(vec![]), NOW, &Plans::default());
        assert!(scores.is_empty() && evaluations.is_empty());
    }
}
