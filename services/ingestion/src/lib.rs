//! Tessera's ingestion service: accepts events and delivers them down the pipeline
