//! Protobuf decoding of the request message of every public RPC, then the conversions and checks
//! its handler makes. The first byte picks the message: high bit clear, the ingestion service's
//! (IngestionService, SourceService, TrackingPlanService, DebuggerService); set, the profile
//! service's (ProfileService, DefinitionService, DestinationService).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&selector, message)) = data.split_first() else {
        return;
    };
    if selector & 0x80 == 0 {
        tessera_ingestion::fuzzing::grpc_request(selector, message);
    } else {
        tessera_profile::fuzzing::grpc_request(selector & 0x7f, message);
    }
});
