//! Tessera's identity service: the identity graph
