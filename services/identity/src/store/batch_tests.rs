//! The set-based merge of a batch of pairs against merging them one transaction each and
//! against a reference union-find that applies the rules, on both backends: a generated graph
//! (user ids, emails, one pair split apart by an unmerge) and generated pairs whose components
//! break the rules (two user ids, too many emails or anonymous ids, the split pair).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use tessera_core::Identifier;
use tessera_store::{Database, DbSettings};
use tessera_testkit::{TestDb, TestSqlite};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::Record;
use crate::store::open_matching;
use crate::{Identity, IdentitySettings, MIGRATIONS, SCHEMA};

/// Profiles in the generated graph.
const PROFILES: usize = 240;

/// A small deterministic generator (xorshift64*), so every run tests the same data set.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Profile `n`'s identifiers: its anonymous id, a user id for one in five, an email for one in
/// three.
fn identifiers(n: usize) -> Vec<(&'static str, String)> {
    let mut ids = vec![("anonymous_id", format!("a{n}"))];
    if n.is_multiple_of(5) {
        ids.push(("user_id", format!("u{n}")));
    }
    if n.is_multiple_of(3) {
        ids.push(("email", format!("e{n}@example.com")));
    }
    ids
}

/// Pairs of profile numbers, strongest first: groups of 1 to 8 profiles joined by chains and a
/// few extra edges, plus edges across groups, shuffled.
fn pairs(seed: u64) -> Vec<(usize, usize)> {
    let mut g = Gen(seed);
    let mut out = Vec::new();
    let mut start = 0;
    while start < PROFILES {
        let size = (1 + g.below(8)).min(PROFILES - start);
        for k in 1..size {
            out.push((start + g.below(k), start + k));
        }
        for _ in 0..size / 3 {
            out.push((start + g.below(size), start + g.below(size)));
        }
        start += size;
    }
    for _ in 0..PROFILES / 6 {
        out.push((g.below(PROFILES), g.below(PROFILES)));
    }
    out.retain(|(a, b)| a != b);
    for i in (1..out.len()).rev() {
        out.swap(i, g.below(i + 1));
    }
    out
}

/// Disjoint sets of profile numbers, the reference's own (roots are plain numbers).
struct Sets(Vec<usize>);

impl Sets {
    fn find(&mut self, mut n: usize) -> usize {
        while self.0[n] != n {
            self.0[n] = self.0[self.0[n]];
            n = self.0[n];
        }
        n
    }

    fn union(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        self.0[a.max(b)] = a.min(b);
    }
}

/// The outcome of each pair as the rules decide it on a union-find over the pairs taken in
/// order: merged, or the first rule it breaks (`split`, then limited types in name order: more
/// values than the limit and than either side holds).
fn reference(
    pairs: &[(usize, usize)],
    limits: &BTreeMap<String, usize>,
    split: (usize, usize),
) -> (Vec<String>, Sets) {
    let mut components = Sets((0..PROFILES).collect());
    let mut held: HashMap<usize, HashMap<String, HashSet<String>>> = HashMap::new();
    for n in 0..PROFILES {
        let mut own: HashMap<String, HashSet<String>> = HashMap::new();
        for (kind, value) in identifiers(n) {
            own.entry(kind.to_owned()).or_default().insert(value);
        }
        held.insert(n, own);
    }
    let mut out = Vec::new();
    for &(a, b) in pairs {
        let (ra, rb) = (components.find(a), components.find(b));
        if ra == rb {
            out.push("same_profile".to_owned());
            continue;
        }
        let (sa, sb) = (components.find(split.0), components.find(split.1));
        if (sa == ra && sb == rb) || (sa == rb && sb == ra) {
            out.push("split".to_owned());
            continue;
        }
        let refused = limits.iter().find_map(|(kind, max)| {
            let of = |root: usize| held[&root].get(kind).cloned().unwrap_or_default();
            let (va, vb) = (of(ra), of(rb));
            let union = va.union(&vb).count();
            (union > *max && union > va.len().max(vb.len())).then(|| format!("limit:{kind}"))
        });
        if let Some(reason) = refused {
            out.push(reason);
            continue;
        }
        components.union(a, b);
        let root = components.find(a);
        let mut merged: HashMap<String, HashSet<String>> = HashMap::new();
        for side in [ra, rb] {
            for (kind, values) in held.remove(&side).unwrap_or_default() {
                merged.entry(kind).or_default().extend(values);
            }
        }
        held.insert(root, merged);
        out.push("merged".to_owned());
    }
    (out, components)
}

/// A fresh identity service over `db` holding the generated graph, with profiles `split.0` and
/// `split.1` merged by hand and unmerged again; answers each profile number's id.
async fn graph(db: &Database, split: (usize, usize)) -> (Identity, Vec<Uuid>) {
    db.migrate(MIGRATIONS).await.expect("migrate");
    let identity = Identity::new(db.clone(), IdentitySettings::default())
        .await
        .expect("identity");
    let rules = identity.rules();
    let at = OffsetDateTime::now_utc() - time::Duration::hours(1);
    let mut ids = Vec::with_capacity(PROFILES);
    // Runs of seven records: profiles of one run share their creation time (the smaller id
    // survives among them).
    for run in (0..PROFILES).collect::<Vec<_>>().chunks(7) {
        let records = run
            .iter()
            .map(|&n| {
                let identifiers = identifiers(n)
                    .into_iter()
                    .map(|(kind, value)| Identifier::new(kind, value))
                    .collect();
                Record::new(&rules.rules, format!("e{n}"), identifiers, at).expect("record")
            })
            .collect();
        for resolution in identity.resolve(records).await.expect("resolve") {
            ids.push(resolution.profile_id);
        }
    }
    identity
        .merge_profiles((ids[split.0], ids[split.1]), "test")
        .await
        .expect("merge")
        .expect("merged");
    let younger = identity
        .profile_graph(ids[split.0], 1)
        .await
        .expect("graph")
        .merged_profile_ids
        .first()
        .copied()
        .expect("a merged profile");
    identity
        .unmerge_profile(younger, "test")
        .await
        .expect("unmerge");
    (identity, ids)
}

/// Each profile's creation time and id, by profile number.
async fn ages(db: &Database, ids: &[Uuid]) -> Vec<(i64, Uuid)> {
    let rows: HashMap<Uuid, i64> = match db {
        Database::Postgres(pool) => sqlx::query_as::<_, (Uuid, OffsetDateTime)>(
            "SELECT profile_id, created_at FROM profiles",
        )
        .fetch_all(pool)
        .await
        .expect("profiles")
        .into_iter()
        .map(|(id, at)| (id, (at.unix_timestamp_nanos() / 1_000) as i64))
        .collect(),
        Database::Sqlite(pool) => {
            sqlx::query_as::<_, (String, i64)>("SELECT profile_id, created_at FROM profiles")
                .fetch_all(pool)
                .await
                .expect("profiles")
                .into_iter()
                .map(|(id, at)| (Uuid::parse_str(&id).expect("uuid"), at))
                .collect()
        }
    };
    ids.iter().map(|id| (rows[id], *id)).collect()
}

async fn count(db: &Database, sql: &'static str) -> i64 {
    match db {
        Database::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        Database::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
    }
    .expect("count")
}

fn outcome(result: &Result<crate::domain::Merge, String>) -> String {
    match result {
        Ok(_) => "merged".to_owned(),
        Err(reason) => reason.clone(),
    }
}

/// The partition of profile numbers, as sets of numbers, by each number's anonymous id now.
async fn partition(identity: &Identity) -> BTreeSet<BTreeSet<usize>> {
    let mut by_profile: HashMap<Uuid, BTreeSet<usize>> = HashMap::new();
    for n in 0..PROFILES {
        let profile = identity
            .lookup(Identifier::new("anonymous_id", format!("a{n}")))
            .await
            .expect("lookup");
        by_profile.entry(profile).or_default().insert(n);
    }
    by_profile.into_values().collect()
}

async fn batch_merges_decide_as_one_at_a_time(batch_db: Database, single_db: Database) {
    let split = (1, 2);
    let numbers = pairs(0x9e37_79b9_7f4a_7c15);
    let (batch, batch_ids) = graph(&batch_db, split).await;
    let (single, single_ids) = graph(&single_db, split).await;
    let rules = batch.rules();
    let detail = |n: usize| Some(format!(r#"{{"pair": {n}}}"#));

    // The set-based path, in chunks (the batch job's transactions) that cut through
    // components.
    let store = open_matching(batch_db.clone(), None);
    let mut set_based = Vec::new();
    let chunk: Vec<((Uuid, Uuid), Option<String>)> = numbers
        .iter()
        .enumerate()
        .map(|(n, (a, b))| ((batch_ids[*a], batch_ids[*b]), detail(n)))
        .collect();
    for part in chunk.chunks(97) {
        let results = store
            .merge_pairs(&rules, part, "match:model-1", "probabilistic")
            .await
            .expect("merge pairs");
        set_based.extend(results.iter().map(outcome));
    }

    // One pair per transaction, each decided on what the previous ones committed.
    let store = open_matching(single_db.clone(), None);
    let mut one_by_one = Vec::new();
    for (n, (a, b)) in numbers.iter().enumerate() {
        let result = store
            .merge_pair(
                &rules,
                (single_ids[*a], single_ids[*b]),
                "match:model-1",
                "probabilistic",
                detail(n),
            )
            .await
            .expect("merge pair");
        one_by_one.push(outcome(&result));
    }

    let limits: BTreeMap<String, usize> = rules
        .rules
        .limited_types()
        .map(|kind| {
            let max = rules.rules.limit(kind).expect("a limit").max;
            (kind.to_owned(), max as usize)
        })
        .collect();
    let (expected, mut components) = reference(&numbers, &limits, split);
    for reason in ["merged", "same_profile", "split", "limit:user_id"] {
        assert!(
            expected.iter().any(|r| r == reason),
            "the data set exercises {reason}: {expected:?}"
        );
    }
    assert!(
        expected
            .iter()
            .any(|r| r == "limit:anonymous_id" || r == "limit:email"),
        "the data set exercises a per-type limit"
    );
    assert_eq!(set_based, expected, "set-based against the reference");
    assert_eq!(one_by_one, expected, "one at a time against the reference");

    let mut want: HashMap<usize, BTreeSet<usize>> = HashMap::new();
    for n in 0..PROFILES {
        want.entry(components.find(n)).or_default().insert(n);
    }
    let want: BTreeSet<BTreeSet<usize>> = want.into_values().collect();
    assert_eq!(partition(&batch).await, want, "set-based partition");
    assert_eq!(partition(&single).await, want, "one-at-a-time partition");

    // The oldest profile of each component survives, and every identifier of the component
    // resolves to it.
    let ages = ages(&batch_db, &batch_ids).await;
    for members in &want {
        let oldest = members.iter().map(|n| ages[*n]).min().expect("members").1;
        for n in members {
            for (kind, value) in identifiers(*n) {
                let owner = batch
                    .lookup(Identifier::new(kind, value))
                    .await
                    .expect("lookup");
                assert_eq!(
                    owner, oldest,
                    "profile {n}'s {kind} resolves to the survivor"
                );
            }
        }
    }

    // Every merge is logged with its rule and explanation and queued for the profile service,
    // as one at a time does.
    let merges = expected.iter().filter(|r| *r == "merged").count() as i64;
    for db in [&batch_db, &single_db] {
        assert_eq!(
            count(
                db,
                "SELECT count(*) FROM graph_log WHERE kind = 'merge' AND rule = 'probabilistic' \
                 AND detail IS NOT NULL"
            )
            .await,
            merges
        );
        assert_eq!(
            count(
                db,
                "SELECT count(*) FROM merges WHERE rule = 'probabilistic'"
            )
            .await,
            merges
        );
        assert_eq!(
            count(
                db,
                "SELECT count(*) FROM merge_outbox WHERE rule = 'probabilistic' \
                 AND cause = 'match:model-1'"
            )
            .await,
            merges
        );
    }
}

#[tokio::test]
async fn batch_merges_decide_as_one_at_a_time_on_sqlite() {
    let dir = TestSqlite::new();
    let connect = |name: &str| {
        let url = dir.url(name);
        async move {
            Database::connect(&url, SCHEMA, &DbSettings::default())
                .await
                .expect("connect")
        }
    };
    batch_merges_decide_as_one_at_a_time(connect("batch.db").await, connect("single.db").await)
        .await;
}

#[tokio::test]
async fn batch_merges_decide_as_one_at_a_time_on_postgres() {
    let (batch, single) = (TestDb::new().await, TestDb::new().await);
    let connect = |url: String| async move {
        Database::connect(&url, SCHEMA, &DbSettings::default())
            .await
            .expect("connect")
    };
    batch_merges_decide_as_one_at_a_time(
        connect(batch.url().to_owned()).await,
        connect(single.url().to_owned()).await,
    )
    .await;
}
