//! Harness for Tessera's end-to-end tests: start the `tessera` binary as real processes, find
//! their ports, talk to them over gRPC, and put a cuttable TCP proxy in front of a dependency.

pub mod auth;
pub mod chaos;
pub mod events;
pub mod http;
pub mod process;
pub mod proxy;
pub mod servers;

pub use auth::{Channel, E2E_TOKEN, authorized};
pub use process::{Tessera, TesseraBuilder, key_in, sources_command, tessera_bin};
pub use proxy::Proxy;

/// The keys of `redis` matching `pattern`, read with `SCAN`: `KEYS` walks the whole keyspace
/// in one command, which times out on a Redis shared with a large benchmark's entries.
pub async fn keys_matching(
    redis: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(10_000)
            .query_async(redis)
            .await
            .expect("scan the test Redis");
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort_unstable();
    keys.dedup();
    keys
}
