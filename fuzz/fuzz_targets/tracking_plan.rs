//! Tracking-plan compilation (JSON Schema) and checking a message against it: the bytes before
//! the first `0xFF` are the plan, the rest the message.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tessera_ingestion::fuzzing::tracking_plan(data);
});
