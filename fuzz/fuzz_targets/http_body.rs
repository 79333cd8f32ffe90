//! The tracking API's body parsing: gzip (first byte `0x80`), JSON, the envelope, the batch and
//! each message's conversion into a domain event. The first byte's low bits pick the route.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tessera_ingestion::fuzzing::http_body(data);
});
