//! Access tokens: the store on both backends, and the gRPC port's enforcement of each scope with
//! its audit log.

use std::collections::BTreeSet;
use std::time::Duration;

use tessera_proto::ingestion::v1::ListSourcesRequest;
use tessera_proto::ingestion::v1::source_service_client::SourceServiceClient;
use tessera_proto::profile::v1::definition_service_client::DefinitionServiceClient;
use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;
use tessera_proto::profile::v1::{
    DeleteComputedTraitRequest, DeleteProfileRequest, ExportProfileRequest, GetProfileRequest,
    ListComputedTraitsRequest,
};
use tessera_server::GrpcServices;
use tessera_server::access::{
    Access, AccessError, ConfigToken, MIGRATIONS, SCHEMA, Scope, Secret, TokenStore,
};
use tessera_store::{Database, DbSettings};
use tessera_testkit::{GrpcTestServer, TestDb, TestSqlite};
use tonic::Code;
use tonic::transport::Channel;

async fn postgres_store(db: &TestDb) -> TokenStore {
    let db = Database::connect(db.url(), SCHEMA, &DbSettings::default())
        .await
        .unwrap();
    db.migrate(MIGRATIONS).await.unwrap();
    TokenStore::new(db)
}

async fn sqlite_store(dir: &TestSqlite) -> TokenStore {
    let db = Database::connect(&dir.url("auth.db"), SCHEMA, &DbSettings::default())
        .await
        .unwrap();
    db.migrate(MIGRATIONS).await.unwrap();
    TokenStore::new(db)
}

fn scopes(list: &[Scope]) -> BTreeSet<Scope> {
    list.iter().copied().collect()
}

/// The same lifecycle on either backend: create, check, rotate, revoke, audit.
async fn lifecycle(store: TokenStore) {
    let (info, secret) = store
        .create("reader", &scopes(&[Scope::ProfilesRead]))
        .await
        .unwrap();
    assert!(secret.0.starts_with("tat_"));
    assert_eq!(info.scopes, scopes(&[Scope::ProfilesRead]));
    assert!(matches!(
        store.create("reader", &scopes(&[Scope::Admin])).await,
        Err(AccessError::Exists(name)) if name == "reader"
    ));
    assert!(matches!(
        store.create("two words", &scopes(&[Scope::Admin])).await,
        Err(AccessError::InvalidName(_))
    ));
    assert!(matches!(
        store.create("none", &BTreeSet::new()).await,
        Err(AccessError::NoScopes)
    ));

    // A short cache, so rotation and revocation show within the test.
    let access = Access::new(Some(store.clone()), Vec::new(), Duration::from_millis(200));
    let caller = access.authenticate(&secret.0).await.unwrap().unwrap();
    assert_eq!(caller.name, "reader");
    assert_eq!(caller.token_id, info.id);
    assert!(access.authenticate("tat_nope").await.unwrap().is_none());

    let (rotated, new_secret) = store.rotate("reader").await.unwrap();
    assert!(rotated.rotated_at.is_some());
    assert_ne!(new_secret, secret);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(access.authenticate(&secret.0).await.unwrap().is_none());
    assert!(access.authenticate(&new_secret.0).await.unwrap().is_some());

    // Rotating by id works too; an unknown name is refused by name.
    let (_, newest) = store.rotate(&info.id).await.unwrap();
    assert!(matches!(
        store.rotate("nobody").await,
        Err(AccessError::NotFound(name)) if name == "nobody"
    ));

    // A second replica over the same database: both have checked (and cached) the token; a
    // revocation through either reaches both within the cache's time to live.
    let replica = Access::new(Some(store.clone()), Vec::new(), Duration::from_millis(200));
    assert!(access.authenticate(&newest.0).await.unwrap().is_some());
    assert!(replica.authenticate(&newest.0).await.unwrap().is_some());
    let revoked = store.revoke("reader").await.unwrap();
    assert!(revoked.revoked_at.is_some());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(access.authenticate(&newest.0).await.unwrap().is_none());
    assert!(replica.authenticate(&newest.0).await.unwrap().is_none());
    assert!(
        store.rotate("reader").await.is_err(),
        "revoked stays revoked"
    );
    let listed = store.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].revoked_at, revoked.revoked_at);

    let caller = tessera_server::access::Caller {
        token_id: "t1".to_owned(),
        name: "ops".to_owned(),
        scopes: scopes(&[Scope::Admin]),
    };
    access
        .audit(
            &caller,
            "/a.B/C",
            Some("src".to_owned()),
            "Ok",
            "req-1".to_owned(),
        )
        .await;
    access
        .audit(
            &caller,
            "/a.B/D",
            None,
            "PermissionDenied",
            "req-2".to_owned(),
        )
        .await;
    let log = store.audit_log(10).await.unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(
        (log[0].action.as_str(), log[0].outcome.as_str()),
        ("/a.B/D", "PermissionDenied")
    );
    assert_eq!(
        (
            log[1].token_name.as_str(),
            log[1].token_id.as_str(),
            log[1].request_id.as_str()
        ),
        ("ops", "t1", "req-1")
    );
    assert_eq!(log[1].target.as_deref(), Some("src"));
    assert_eq!(log[0].target, None);
    assert_eq!(store.audit_log(1).await.unwrap().len(), 1);

    // Retention: records written before the cut go, later ones stay.
    let cut = time::OffsetDateTime::now_utc();
    assert_eq!(
        store
            .prune_audit(cut - time::Duration::days(1))
            .await
            .unwrap(),
        0
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    access
        .audit(&caller, "/a.B/E", None, "Ok", "req-3".to_owned())
        .await;
    let after = store.audit_log(10).await.unwrap();
    let kept = after.iter().find(|r| r.request_id == "req-3").unwrap().at;
    assert_eq!(store.prune_audit(kept).await.unwrap(), 2);
    let left = store.audit_log(10).await.unwrap();
    assert_eq!(
        left.iter()
            .map(|r| r.request_id.as_str())
            .collect::<Vec<_>>(),
        ["req-3"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn token_lifecycle_on_postgres() {
    let db = TestDb::new().await;
    lifecycle(postgres_store(&db).await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_lifecycle_on_sqlite() {
    let dir = TestSqlite::new();
    lifecycle(sqlite_store(&dir).await).await;
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// The code of one call per scope. No service is registered: a call the token allows reaches
/// the router and is UNIMPLEMENTED; a refused one never gets there.
async fn calls(channel: &Channel, token: Option<&str>) -> [(Scope, Code); 5] {
    let code = |r: Result<tonic::Response<_>, tonic::Status>| match r {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    };
    let mut profiles = ProfileServiceClient::new(channel.clone());
    let mut definitions = DefinitionServiceClient::new(channel.clone());
    let mut sources = SourceServiceClient::new(channel.clone());
    [
        (
            Scope::ProfilesRead,
            code(
                profiles
                    .get_profile(with_token(GetProfileRequest::default(), token))
                    .await
                    .map(|_| tonic::Response::new(())),
            ),
        ),
        (
            Scope::ProfilesRead,
            code(
                definitions
                    .list_computed_traits(with_token(ListComputedTraitsRequest::default(), token))
                    .await
                    .map(|_| tonic::Response::new(())),
            ),
        ),
        (
            Scope::ProfilesWrite,
            code(
                definitions
                    .delete_computed_trait(with_token(DeleteComputedTraitRequest::default(), token))
                    .await
                    .map(|_| tonic::Response::new(())),
            ),
        ),
        (
            Scope::Admin,
            code(
                sources
                    .list_sources(with_token(ListSourcesRequest::default(), token))
                    .await
                    .map(|_| tonic::Response::new(())),
            ),
        ),
        (
            Scope::Privacy,
            code(
                profiles
                    .export_profile(with_token(ExportProfileRequest::default(), token))
                    .await
                    .map(|_| tonic::Response::new(())),
            ),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn each_scope_allows_what_it_names_and_nothing_else() {
    let db = TestDb::new().await;
    let store = postgres_store(&db).await;
    let mut secrets = Vec::new();
    for scope in Scope::ALL {
        let name = scope.as_str().replace(':', "-");
        let (_, secret) = store.create(&name, &scopes(&[scope])).await.unwrap();
        secrets.push((scope, secret));
    }
    let config = ConfigToken {
        name: "everything".to_owned(),
        secret: Secret("tat_configured-token-with-every-scope".to_owned()),
        scopes: scopes(&Scope::ALL),
    };
    let access = Access::new(
        Some(store.clone()),
        vec![config.clone()],
        Duration::from_secs(5),
    );
    let mut services = GrpcServices::default();
    services.require_tokens(access);
    let server = GrpcTestServer::start(services).await;
    let channel = server.channel().await;

    for (scope, secret) in &secrets {
        for (needed, code) in calls(&channel, Some(&secret.0)).await {
            if needed == *scope {
                assert_eq!(
                    code,
                    Code::Unimplemented,
                    "{scope} calling a {needed} method"
                );
            } else {
                assert_eq!(
                    code,
                    Code::PermissionDenied,
                    "{scope} calling a {needed} method"
                );
            }
        }
    }
    for (needed, code) in calls(&channel, Some(&config.secret.0)).await {
        assert_eq!(
            code,
            Code::Unimplemented,
            "the configured token calling {needed}"
        );
    }
    for (needed, code) in calls(&channel, None).await {
        assert_eq!(code, Code::Unauthenticated, "no token calling {needed}");
    }
    for (needed, code) in calls(&channel, Some("tat_unknown")).await {
        assert_eq!(
            code,
            Code::Unauthenticated,
            "an unknown token calling {needed}"
        );
    }

    // The refusal names the missing scope.
    let reader = &secrets[0].1;
    let err = ProfileServiceClient::new(channel.clone())
        .delete_profile(with_token(DeleteProfileRequest::default(), Some(&reader.0)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "the access token lacks the scope `privacy`, which \
         /tessera.profile.v1.ProfileService/DeleteProfile requires"
    );

    // Admin, privacy and write calls are audited, allowed or refused; reads are not.
    let log = store.audit_log(100).await.unwrap();
    let entry = |token: &str, action: &str, outcome: &str| {
        log.iter()
            .any(|r| r.token_name == token && r.action.ends_with(action) && r.outcome == outcome)
    };
    assert!(entry("admin", "SourceService/ListSources", "Unimplemented"));
    assert!(entry(
        "privacy",
        "ProfileService/ExportProfile",
        "Unimplemented"
    ));
    assert!(entry(
        "profiles-write",
        "DefinitionService/DeleteComputedTrait",
        "Unimplemented"
    ));
    assert!(entry(
        "profiles-read",
        "ProfileService/DeleteProfile",
        "PermissionDenied"
    ));
    assert!(entry(
        "profiles-read",
        "SourceService/ListSources",
        "PermissionDenied"
    ));
    assert!(entry(
        "everything",
        "ProfileService/ExportProfile",
        "Unimplemented"
    ));
    assert!(
        log.iter().all(|r| !r.action.ends_with("GetProfile")
            && !r.action.ends_with("ListComputedTraits")),
        "reads are not audited: {log:?}"
    );
    assert!(log.iter().all(|r| !r.request_id.is_empty()));
}
