//! Probabilistic matching end to end in `tessera dev`: identifies with person traits go through
//! ingestion, identity and profile; the profile service indexes every profile for matching; a
//! model is trained without labels; the batch job merges the near-duplicates, and the profile
//! service applies the merges, so both anonymous ids read as one profile.

use std::time::Duration;

use serde_json::json;
use tessera_proto::identity::v1::identity_service_client::IdentityServiceClient;
use tessera_proto::identity::v1::{RunBatchMatchRequest, TrainMatchModelRequest};
use tessera_tests::TesseraBuilder;
use tessera_tests::events::{get_by, identify, send, wait_for};

const GIVEN: [&str; 30] = [
    "olivia",
    "liam",
    "emma",
    "noah",
    "ava",
    "oliver",
    "sophia",
    "elijah",
    "isabella",
    "james",
    "mia",
    "william",
    "amelia",
    "benjamin",
    "harper",
    "lucas",
    "evelyn",
    "henry",
    "abigail",
    "alexander",
    "emily",
    "jack",
    "charlotte",
    "daniel",
    "grace",
    "thomas",
    "chloe",
    "samuel",
    "zoe",
    "joshua",
];
const SURNAMES: [&str; 40] = [
    "nguyen", "smith", "jones", "brown", "taylor", "wilson", "johnson", "white", "martin",
    "anderson", "thompson", "walker", "harris", "clarke", "robinson", "ryan", "lee", "kelly",
    "king", "campbell", "mitchell", "young", "wright", "hughes", "edwards", "hall", "allen",
    "scott", "green", "baker", "adams", "nelson", "carter", "murphy", "cooper", "ward", "morris",
    "turner", "parker", "bennett",
];
const SUBURBS: [&str; 16] = [
    "carlton",
    "fitzroy",
    "brunswick",
    "richmond",
    "st kilda",
    "footscray",
    "coburg",
    "preston",
    "kew",
    "hawthorn",
    "box hill",
    "doncaster",
    "ringwood",
    "frankston",
    "geelong",
    "ballarat",
];

/// A deterministic generator (SplitMix64) seeded per person.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        usize::try_from((z ^ (z >> 31)) % n as u64).unwrap_or(0)
    }
}

/// Person `n`'s traits, each field drawn independently.
fn person(n: usize) -> serde_json::Value {
    let mut rng = Rng(n as u64);
    json!({
        "firstName": GIVEN[rng.below(GIVEN.len())],
        "lastName": SURNAMES[rng.below(SURNAMES.len())],
        "date_of_birth": format!("{}{:02}{:02}", 1940 + rng.below(65), 1 + rng.below(12), 1 + rng.below(28)),
        "street_number": (1 + rng.below(400)).to_string(),
        "address_1": format!("{} street", SURNAMES[rng.below(SURNAMES.len())]),
        "suburb": SUBURBS[rng.below(SUBURBS.len())],
        "postcode": (3000 + rng.below(1000)).to_string(),
        "state": "vic",
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn near_duplicates_become_one_profile_after_training_and_the_batch() {
    let data = tempfile::tempdir().unwrap();
    let tessera = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .start()
        .await;
    let channel = tessera.channel().await;
    let key = tessera.dev_write_key().to_owned();

    // 120 people, and a second record of person 7 as another system typed it.
    let mut events: Vec<_> = (0..120)
        .map(|n| identify(&format!("m{n}"), "", &format!("a{n}"), person(n)))
        .collect();
    let original_traits = person(7);
    let mut copy = original_traits.clone();
    let mut surname: Vec<char> = original_traits["lastName"]
        .as_str()
        .unwrap_or_default()
        .chars()
        .collect();
    surname.swap(1, 2); // two letters swapped
    copy["lastName"] = json!(surname.into_iter().collect::<String>());
    let given = original_traits["firstName"].as_str().unwrap_or_default();
    copy["firstName"] = json!(format!(" {} ", given.to_uppercase())); // case and spacing
    events.push(identify("m-copy", "", "a-copy", copy));
    for chunk in events.chunks(50) {
        send(&channel, &key, chunk.to_vec()).await.expect("send");
    }
    // Every profile exists (and was sent to identity for indexing) before training.
    for n in 0..120 {
        wait_for(
            &channel,
            "anonymous_id",
            &format!("a{n}"),
            Duration::from_secs(30),
            |_| true,
        )
        .await;
    }
    let copy_before = wait_for(
        &channel,
        "anonymous_id",
        "a-copy",
        Duration::from_secs(30),
        |_| true,
    )
    .await;
    let original = get_by(&channel, "anonymous_id", "a7")
        .await
        .expect("original");
    assert_ne!(
        copy_before.profile_id, original.profile_id,
        "apart before matching"
    );

    let mut identity = IdentityServiceClient::new(channel.clone());
    let model = identity
        .train_match_model(TrainMatchModelRequest {})
        .await
        .expect("train")
        .into_inner();
    assert_eq!(model.model_version, 1);
    assert_eq!(model.profiles, 121);
    assert!(model.converged);
    let batch = identity
        .run_batch_match(RunBatchMatchRequest {})
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(batch.merges, 1, "{batch:?}");

    // Identity answers the survivor at once; the merge reaches the profile service through
    // identity's outbox, after which the survivor holds both profiles.
    let merged = wait_for(
        &channel,
        "anonymous_id",
        "a-copy",
        Duration::from_secs(30),
        |p| {
            p.profile_id == original.profile_id
                && p.merged_profile_ids.contains(&copy_before.profile_id)
        },
    )
    .await;
    assert_eq!(
        merged.event_count, 2,
        "both identifies count on the survivor"
    );
    let neighbour = get_by(&channel, "anonymous_id", "a8")
        .await
        .expect("neighbour");
    assert_ne!(
        neighbour.profile_id, original.profile_id,
        "nobody else merged"
    );
}
