//! Compiles every `.proto` file under `proto/` with the pure-Rust `protox` compiler, so building
//! Tessera needs no `protoc` binary, and exports the descriptor set for gRPC reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "tessera/common/v1/common.proto",
        "tessera/ingestion/v1/ingestion.proto",
        "tessera/ingestion/v1/sources.proto",
        "tessera/ingestion/v1/debugger.proto",
        "tessera/ingestion/v1/tracking_plans.proto",
        "tessera/ingestion/v1/event_log.proto",
        "tessera/identity/v1/identity.proto",
        "tessera/profile/v1/profile.proto",
        "tessera/profile/v1/destinations.proto",
        "tessera/profile/v1/definitions.proto",
        "tessera/scoring/v1/scoring.proto",
    ];
    println!("cargo:rerun-if-changed={}", root.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let fds = protox::compile(files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // compile_fds takes an already-built set, so write the set for reflection ourselves.
    std::fs::write(out.join("tessera_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // Written by hand, so a cached profile can be sent as the bytes it is cached as (see
        // src/profile_response.rs); the wire format is the .proto's.
        .extern_path(
            ".tessera.profile.v1.GetProfileResponse",
            "crate::profile_response::GetProfileResponse",
        )
        .extern_path(
            ".tessera.profile.v1.BatchProfileResult",
            "crate::profile_response::BatchProfileResult",
        )
        .compile_fds(fds)?;
    Ok(())
}
