//! End-to-end tests: the walking skeleton through real processes, real gRPC, Postgres and Redis.

mod access;
mod change_stream;
mod cli;
mod computed_traits;
mod customer_value;
mod debugger;
mod definitions;
mod dev_mode;
mod faults;
mod faults_under_load;
mod flow;
mod gdpr;
mod import;
mod matching;
mod mtls;
mod pii_logs;
mod profile_api;
mod python_client;
mod replicas;
mod restarts;
mod sdk_python;
mod separate_processes;
mod sources;
mod tracing;
mod tracking_plans;
mod unmerge;
