//! Integration tests of the profile service: the storage conformance suite (SQLite and
//! Postgres) and the service over gRPC with the real scoring service, Redis and Postgres,
//! including probabilistic matching through the identity double, scoring plans, and webhook
//! destinations against a local receiver.

mod definitions;
mod engagement;
mod identifier_epoch;
mod matching;
mod merges;
mod purchase_histories;
mod scoring_plans;
mod service;
mod store_suite;
mod support;
mod webhooks;
