//! Integration tests of the identity service: the storage conformance suite, the rules and
//! probabilistic matching on both backends, concurrent replicas on one Postgres, and the gRPC
//! face.

/// Generates one test per backend (`sqlite::name`, `postgres::name`) for each listed async
/// function, which takes the fresh [`support::Backend`].
macro_rules! on_both_backends {
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
