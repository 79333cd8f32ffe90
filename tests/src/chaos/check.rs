//! The invariants checked after each round.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use tessera_proto::convert::value_to_json;
use tessera_proto::profile::v1::Profile;

fn time(t: Option<&prost_types::Timestamp>) -> Value {
    t.map_or(Value::Null, |t| json!([t.seconds, t.nanos]))
}

/// What must be equal between the run under faults and the reference: everything derived from
/// the events, without what differs by nature between two deployments (profile and event ids,
/// versions, update and scoring times) and with scores apart (compared with a tolerance: they
/// decay with the time they were computed at). Which profiles were merged into this one is left
/// out too: events of one user travel through different partitions, so whether an anonymous
/// event made a profile of its own before the identify that links it (and was merged) or
/// arrived after it (and joined directly) depends on timing, in any run; the partition itself is
/// compared, by the identifiers.
pub fn canonical(p: &Profile) -> Value {
    let Profile {
        profile_id: _,
        identifiers,
        traits,
        event_count,
        first_seen,
        last_seen,
        scores: _,
        version: _,
        updated_at: _,
        merged_profile_ids: _,
        computed_traits,
        computed_valid_until,
        audiences,
        consent,
        accounts,
        interests,
    } = p;
    let identifiers: BTreeSet<String> = identifiers
        .iter()
        .map(|i| format!("{}:{}", i.r#type, i.value))
        .collect();
    let traits: BTreeMap<&String, Value> = traits
        .iter()
        .map(|(name, t)| {
            let value = t.value.as_ref().map_or(Value::Null, value_to_json);
            (
                name,
                json!([value, time(t.observed_at.as_ref()), t.class, t.pii]),
            )
        })
        .collect();
    let computed: BTreeMap<&String, Value> = computed_traits
        .iter()
        .map(|(name, c)| (name, c.value.as_ref().map_or(Value::Null, value_to_json)))
        .collect();
    let consent: BTreeMap<&String, Value> = consent
        .iter()
        .map(|(k, c)| (k, json!([c.granted, time(c.observed_at.as_ref())])))
        .collect();
    let accounts: BTreeMap<&String, Value> = accounts
        .iter()
        .map(|(k, a)| (k, json!([a.role, a.title, time(a.last_seen.as_ref())])))
        .collect();
    let audiences: BTreeSet<&String> = audiences.iter().collect();
    json!({
        "identifiers": identifiers,
        "traits": traits,
        "event_count": event_count,
        "first_seen": time(first_seen.as_ref()),
        "last_seen": time(last_seen.as_ref()),
        "computed_traits": computed,
        "computed_valid_until": time(computed_valid_until.as_ref()),
        "audiences": audiences,
        "consent": consent,
        "accounts": accounts,
        "interests": format!("{interests:?}"),
    })
}

/// Relative tolerance on scores: engagement decays between the two runs' scoring times (a
/// 7-day half-life moves 0.01 % a minute).
const SCORE_TOLERANCE: f64 = 1e-3;

/// The differences between the scores of two profiles, if any.
pub fn score_difference(faulted: &Profile, reference: &Profile) -> Option<String> {
    let names: BTreeSet<&String> = faulted
        .scores
        .keys()
        .chain(reference.scores.keys())
        .collect();
    let mut out = Vec::new();
    for name in names {
        match (faulted.scores.get(name), reference.scores.get(name)) {
            (Some(a), Some(b)) => {
                let scale = a.value.abs().max(b.value.abs()).max(1.0);
                if (a.value - b.value).abs() > SCORE_TOLERANCE * scale {
                    out.push(format!("{name}: {} vs {}", a.value, b.value));
                }
            }
            (a, b) => out.push(format!(
                "{name}: {:?} vs {:?}",
                a.map(|s| s.value),
                b.map(|s| s.value)
            )),
        }
    }
    (!out.is_empty()).then(|| out.join("; "))
}

/// A short description of how two canonical profiles differ (the differing top-level fields).
pub fn difference(faulted: &Value, reference: &Value) -> String {
    let (Some(a), Some(b)) = (faulted.as_object(), reference.as_object()) else {
        return format!("{faulted} vs {reference}");
    };
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, v)| {
            let mut left = v.to_string();
            let mut right = b.get(k).map(Value::to_string).unwrap_or_default();
            left.truncate(300);
            right.truncate(300);
            format!("{k}: {left} vs {right}")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Invariant: each acknowledged message is in the event log of the source exactly once, and
/// nothing else is. Returns the violations.
pub async fn event_log(db_url: &str, source: &str, acked: &BTreeSet<String>) -> Vec<String> {
    let pool = match sqlx::PgPool::connect(db_url).await {
        Ok(p) => p,
        Err(e) => return vec![format!("could not read the event log: {e}")],
    };
    let rows: Result<Vec<(String, i64)>, _> = sqlx::query_as(
        "SELECT e.message_id, count(*) FROM ingestion.events e \
         JOIN ingestion.sources s ON e.source_id = s.source_id::text \
         WHERE s.name = $1 GROUP BY e.message_id",
    )
    .bind(source)
    .fetch_all(&pool)
    .await;
    pool.close().await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => return vec![format!("could not read the event log: {e}")],
    };
    let logged: BTreeMap<String, i64> = rows.into_iter().collect();
    let mut out = Vec::new();
    let missing: Vec<&String> = acked.iter().filter(|m| !logged.contains_key(*m)).collect();
    if !missing.is_empty() {
        out.push(format!(
            "{} acknowledged messages missing from the event log: {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        ));
    }
    let twice: Vec<(&String, &i64)> = logged.iter().filter(|(_, n)| **n != 1).collect();
    if !twice.is_empty() {
        out.push(format!(
            "{} messages logged more than once: {:?}",
            twice.len(),
            &twice[..twice.len().min(10)]
        ));
    }
    let unacked: Vec<&String> = logged.keys().filter(|m| !acked.contains(*m)).collect();
    if !unacked.is_empty() {
        out.push(format!(
            "{} messages logged but never acknowledged: {:?}",
            unacked.len(),
            &unacked[..unacked.len().min(10)]
        ));
    }
    out
}

/// A graph-log decision as the report shows it: seq, kind:rule, event, profile, other profile.
type GraphLogRow = (i64, String, Option<String>, Option<String>, Option<String>);

/// Invariant: no merge was decided twice (a profile merged away more than once in the graph
/// log, or a merge row without its decision).
pub async fn merges(db_url: &str) -> Vec<String> {
    let pool = match sqlx::PgPool::connect(db_url).await {
        Ok(p) => p,
        Err(e) => return vec![format!("could not read the identity graph: {e}")],
    };
    let twice: Result<Vec<(String, i64)>, _> = sqlx::query_as(
        "SELECT other_profile_id::text, count(*) FROM identity.graph_log \
         WHERE kind = 'merge' GROUP BY other_profile_id HAVING count(*) > 1",
    )
    .fetch_all(&pool)
    .await;
    let counts: Result<(i64, i64), _> = sqlx::query_as(
        "SELECT (SELECT count(*) FROM identity.merges), \
                (SELECT count(*) FROM identity.graph_log WHERE kind = 'merge')",
    )
    .fetch_one(&pool)
    .await;
    let mut out = Vec::new();
    match twice {
        Ok(rows) if rows.is_empty() => {}
        Ok(rows) => {
            // The decisions about the first of them, to tell what happened.
            let history: Vec<GraphLogRow> = sqlx::query_as(
                "SELECT seq, kind || ':' || coalesce(rule, ''), event_id::text, \
                     profile_id::text, other_profile_id::text FROM identity.graph_log \
                     WHERE other_profile_id::text = $1 OR profile_id::text = $1 ORDER BY seq",
            )
            .bind(&rows[0].0)
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
            out.push(format!(
                "profiles merged more than once: {rows:?}; the graph log of the first: {history:?}"
            ));
        }
        Err(e) => out.push(format!("could not read the graph log: {e}")),
    }
    pool.close().await;
    match counts {
        Ok((rows, logged)) if rows == logged => {}
        Ok((rows, logged)) => out.push(format!(
            "{rows} merges in identity.merges but {logged} merge decisions in the graph log"
        )),
        Err(e) => out.push(format!("could not count merges: {e}")),
    }
    out
}
