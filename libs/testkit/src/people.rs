//! Synthetic people for matching tests: each field drawn independently from a generator
//! seeded by the person's number, so distinct people differ in several fields and every run
//! sees the same population.

use serde_json::{Value, json};

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
const STREETS: [&str; 16] = [
    "main street",
    "high street",
    "church road",
    "station street",
    "park avenue",
    "king street",
    "queen street",
    "victoria road",
    "george street",
    "elizabeth street",
    "william street",
    "bridge road",
    "albert street",
    "railway parade",
    "hill street",
    "river road",
];

/// SplitMix64: small, deterministic across versions.
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

/// Person `n`'s traits as a JSON object: `firstName`, `lastName`, `date_of_birth`
/// (YYYYMMDD), `street_number`, `address_1`, `suburb`, `postcode`, `state`.
pub fn person(n: usize) -> Value {
    let mut rng = Rng(n as u64);
    json!({
        "firstName": GIVEN[rng.below(GIVEN.len())],
        "lastName": SURNAMES[rng.below(SURNAMES.len())],
        "date_of_birth": format!(
            "{}{:02}{:02}",
            1940 + rng.below(65),
            1 + rng.below(12),
            1 + rng.below(28)
        ),
        "street_number": (1 + rng.below(400)).to_string(),
        "address_1": STREETS[rng.below(STREETS.len())],
        "suburb": SUBURBS[rng.below(SUBURBS.len())],
        "postcode": (3000 + rng.below(1000)).to_string(),
        "state": "vic",
    })
}

/// Person `n` as another system typed them: two letters of the surname swapped.
pub fn typo(n: usize) -> Value {
    let mut traits = person(n);
    let mut surname: Vec<char> = traits["lastName"]
        .as_str()
        .unwrap_or_default()
        .chars()
        .collect();
    surname.swap(1, 2);
    traits["lastName"] = Value::String(surname.into_iter().collect());
    traits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn people_are_stable_and_typos_change_only_the_surname() {
        assert_eq!(person(7), person(7));
        assert_ne!(person(7), person(8));
        let (original, copy) = (person(7), typo(7));
        assert_ne!(original["lastName"], copy["lastName"]);
        assert_eq!(original["firstName"], copy["firstName"]);
        assert_eq!(original["date_of_birth"], copy["date_of_birth"]);
    }
}
