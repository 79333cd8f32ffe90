//! Audience conditions, tests and computed-trait definitions, parsed, checked and evaluated
//! against a profile: the bytes before the first `0xFF` are the definition, the rest the profile.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tessera_profile::fuzzing::conditions(data);
});
