//! Integration tests of the identity service: the storage conformance suite, the rules and
//! probabilistic matching on both backends, concurrent replicas on one Postgres, and the gRPC
//! face.

/// Generates one test per backend (`sqlite::name`, `postgres::name`, and
/// `postgres_owner_cache::name`: Postgres with the owner cache in Redis) for each listed async
/// function, which takes the fresh [`support::Backend`].
macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    super::$test(&crate::support::Backend::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    super::$test(&crate::support::Backend::postgres().await).await;
                }
            )*
        }
        mod postgres_owner_cache {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    super::$test(&crate::support::Backend::postgres_cached().await).await;
                }
            )*
        }
    };
}

mod concurrency;
mod conformance;
mod event_time;
mod forget;
mod grpc;
mod matching;
mod rewrite;
mod rules;
mod support;
