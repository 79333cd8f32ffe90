//! The identity service's identifier normalization (email, E.164 phone, blocklists, custom
//! types). The first byte picks the rules and the type; the rest is the value.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tessera_identity::fuzzing::normalize_identifier(data);
});
