//! Tessera's scoring service: explainable scores
