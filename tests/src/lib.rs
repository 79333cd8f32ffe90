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
