//! Storage for Tessera's services: the system of record (Postgres, or SQLite for `tessera dev`)
//! chosen by URL scheme with per-service migrations, and the hot-profile cache (Redis, or an
//! in-process cache) with versioned entries, and the near cache each replica keeps in front of
//! Redis.

mod cache;
mod db;
mod near;

pub use cache::{Cache, CacheError, MemoryCache, RedisCache, RedisLink, Versioned, open_cache};
pub use db::{
    Backend, Database, DbSettings, Migrations, POOL_SAMPLE_EVERY, PoolUse, StoreError, error_code,
};
pub use near::{InvalidNearCache, NearCacheSettings, NearCacheStats};
