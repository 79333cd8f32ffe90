//! End-to-end tests of Tessera as separate processes and as tessera dev
