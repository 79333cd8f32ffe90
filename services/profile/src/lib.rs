//! Tessera's profile service: unified profiles
