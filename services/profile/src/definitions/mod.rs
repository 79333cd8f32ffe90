//! Computed traits and audiences declared at run time (`DefinitionService`), beside those of
//! config.
//!
//! A definition through the API has exactly the config form ([`ComputedTrait`], [`Audience`])
//! and is validated by the same code. Stored ones carry a version (optimistic concurrency) and
//! every change bumps one store-wide revision. The definitions in effect are config's plus the
//! stored ones ([`compose`]), held in a [`SharedDefinitions`] that the store and the service
//! share and that is swapped as a whole: every write transaction reads the revision and swaps
//! in the stored definitions when they changed, and the sweeper polls it, so every replica
//! folds with the same definitions. A change changes [`Definitions::fingerprint`], which starts
//! the background recompute of every profile (new audiences fill up, deleted ones empty).

pub(crate) mod api;
pub mod store;

use std::collections::HashSet;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tessera_core::FieldViolation;
use tessera_store::Database;
use time::OffsetDateTime;

use crate::audience::{Audience, Audiences};
use crate::computed::ComputedTrait;
use crate::error::ProfileError;
use crate::store::Definitions;

pub use api::{audience_definition, computed_trait_definition};
pub use store::DefinitionStore;

/// The kind of a definition; names are unique per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DefinitionKind {
    /// A computed trait (`[[profile.computed_traits]]`).
    ComputedTrait,
    /// An audience (`[[profile.audiences]]`).
    Audience,
}

impl DefinitionKind {
    /// The kind as stored (`computed_trait`, `audience`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ComputedTrait => "computed_trait",
            Self::Audience => "audience",
        }
    }

    /// The kind as errors name it.
    pub fn label(self) -> &'static str {
        match self {
            Self::ComputedTrait => "computed trait",
            Self::Audience => "audience",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "computed_trait" => Some(Self::ComputedTrait),
            "audience" => Some(Self::Audience),
            _ => None,
        }
    }
}

/// A definition in its config form.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    /// A computed trait.
    ComputedTrait(ComputedTrait),
    /// An audience.
    Audience(Audience),
}

impl Spec {
    /// Its kind.
    pub fn kind(&self) -> DefinitionKind {
        match self {
            Self::ComputedTrait(_) => DefinitionKind::ComputedTrait,
            Self::Audience(_) => DefinitionKind::Audience,
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        match self {
            Self::ComputedTrait(c) => &c.name,
            Self::Audience(a) => &a.name,
        }
    }

    /// The JSON stored (the config form).
    fn to_json(&self) -> String {
        match self {
            Self::ComputedTrait(c) => serde_json::to_string(c),
            Self::Audience(a) => serde_json::to_string(a),
        }
        // Strings, numbers and JSON values always serialize.
        .unwrap_or_default()
    }

    fn from_json(kind: DefinitionKind, json: &str) -> Result<Self, serde_json::Error> {
        Ok(match kind {
            DefinitionKind::ComputedTrait => Self::ComputedTrait(serde_json::from_str(json)?),
            DefinitionKind::Audience => Self::Audience(serde_json::from_str(json)?),
        })
    }

    /// Checks the definition with the same code as config: the field that makes it unusable
    /// (`name`, `kind`, `property`, `window_seconds`, `condition`) and why.
    pub fn validate(&self) -> Result<(), FieldViolation> {
        match self {
            Self::ComputedTrait(c) => match c.violation() {
                Some((field, reason)) => Err(FieldViolation::new(field, reason)),
                None => Ok(()),
            },
            Self::Audience(a) => {
                if a.name.is_empty() || a.name.len() > 200 {
                    return Err(FieldViolation::new("name", "1 to 200 bytes"));
                }
                Audiences::compile(vec![a.clone()])
                    .map(|_| ())
                    .map_err(|reason| FieldViolation::new("condition", reason))
            }
        }
    }
}

/// A definition stored through the API.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDefinition {
    /// The definition.
    pub spec: Spec,
    /// 1 when created, one more on every update.
    pub version: i64,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When it was last changed.
    pub updated_at: OffsetDateTime,
}

/// A definition in effect: declared in config, or stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Declared {
    /// Declared in config (read-only through the API).
    Config(Spec),
    /// Stored through the API.
    Stored(StoredDefinition),
}

impl Declared {
    /// The definition.
    pub fn spec(&self) -> &Spec {
        match self {
            Self::Config(spec) => spec,
            Self::Stored(stored) => &stored.spec,
        }
    }
}

/// The definitions in effect (config's and the stored ones), shared by the store, which folds
/// events with them, and the service, which evaluates them when reading; swapped as a whole.
#[derive(Debug)]
pub struct SharedDefinitions {
    config: Definitions,
    current: ArcSwap<Definitions>,
}

impl Default for SharedDefinitions {
    fn default() -> Self {
        Self::new(Definitions::default())
    }
}

impl SharedDefinitions {
    /// Config's definitions, in effect until stored ones are installed.
    pub fn new(config: Definitions) -> Self {
        Self {
            current: ArcSwap::from_pointee(config.clone()),
            config,
        }
    }

    /// The definitions in effect now.
    pub fn current(&self) -> Arc<Definitions> {
        self.current.load_full()
    }

    /// Config's definitions.
    pub fn config(&self) -> &Definitions {
        &self.config
    }

    /// Whether config declares a definition of `kind` named `name`.
    pub fn in_config(&self, kind: DefinitionKind, name: &str) -> bool {
        match kind {
            DefinitionKind::ComputedTrait => self.config.declared().iter().any(|c| c.name == name),
            DefinitionKind::Audience => self
                .config
                .audiences
                .declared()
                .iter()
                .any(|a| a.name == name),
        }
    }

    /// Puts config's and `stored` (read at `revision`) in effect, unless definitions of that
    /// revision or a later one are in effect already; returns those in effect.
    pub fn install(&self, revision: i64, stored: &[StoredDefinition]) -> Arc<Definitions> {
        let current = self.current();
        if revision <= current.revision {
            return current;
        }
        let next = Arc::new(compose(&self.config, revision, stored));
        self.current.rcu(|current| {
            if current.revision >= revision {
                Arc::clone(current)
            } else {
                Arc::clone(&next)
            }
        });
        let now = self.current();
        if now.revision == revision {
            // Replicas agree when they show the same revision.
            metrics::gauge!("tessera_profile_definitions_revision").set(revision as f64);
            tracing::info!(
                revision,
                computed_traits = now.declared().len(),
                audiences = now.audiences.declared().len(),
                "definitions changed"
            );
        }
        now
    }
}

/// Config's definitions plus `stored` (at `revision`). A stored definition that config now
/// declares too, or that no longer validates, is left out (and logged): config wins.
pub fn compose(config: &Definitions, revision: i64, stored: &[StoredDefinition]) -> Definitions {
    let mut computed = config.declared().to_vec();
    let mut audiences = config.audiences.declared().to_vec();
    let mut computed_names: HashSet<String> = computed.iter().map(|c| c.name.clone()).collect();
    let mut audience_names: HashSet<String> = audiences.iter().map(|a| a.name.clone()).collect();
    for definition in stored {
        let spec = &definition.spec;
        if let Err(violation) = spec.validate() {
            tracing::error!(
                kind = spec.kind().as_str(),
                name = spec.name(),
                field = %violation.field,
                reason = %violation.description,
                "a stored definition is invalid, leaving it out"
            );
            continue;
        }
        let fresh = match spec {
            Spec::ComputedTrait(c) => computed_names.insert(c.name.clone()),
            Spec::Audience(a) => audience_names.insert(a.name.clone()),
        };
        if !fresh {
            tracing::warn!(
                kind = spec.kind().as_str(),
                name = spec.name(),
                "a stored definition has the name of one in config, leaving it out"
            );
            continue;
        }
        match spec {
            Spec::ComputedTrait(c) => computed.push(c.clone()),
            Spec::Audience(a) => audiences.push(a.clone()),
        }
    }
    let audiences = Audiences::compile(audiences).unwrap_or_else(|reason| {
        // Each compiles alone and names are unique, so this is a bug: keep config's.
        tracing::error!(%reason, "the stored audiences do not compile, keeping config's");
        config.audiences.clone()
    });
    let mut defs = Definitions::new(computed, audiences)
        .with_catalog(config.catalog.clone())
        .with_history(config.history)
        .with_engagement(config.engagement.clone())
        .with_account_computed(config.account_computed.clone());
    defs.revision = revision;
    defs
}

/// Declares, changes and lists definitions: validation, the config rules and the store; the
/// gRPC service is a thin face over it.
#[derive(Debug, Clone)]
pub struct Registry {
    store: Arc<dyn DefinitionStore>,
    shared: Arc<SharedDefinitions>,
}

impl Registry {
    /// The registry of `db` (migrated with [`crate::MIGRATIONS`]) whose definitions in effect
    /// are `shared`.
    pub fn new(db: Database, shared: Arc<SharedDefinitions>) -> Self {
        Self {
            store: store::open(db),
            shared,
        }
    }

    /// The definitions in effect.
    pub fn shared(&self) -> &Arc<SharedDefinitions> {
        &self.shared
    }

    /// Brings the definitions in effect up to date with the store (one read of the revision
    /// when nothing changed); returns whether they changed.
    pub async fn refresh(&self) -> Result<bool, ProfileError> {
        let before = self.shared.current().revision;
        if self.store.revision().await? <= before {
            return Ok(false);
        }
        let (revision, stored) = self.store.snapshot().await?;
        Ok(self.shared.install(revision, &stored).revision != before)
    }

    /// Validates `spec` and refuses names config holds.
    fn check(&self, spec: &Spec) -> Result<(), ProfileError> {
        spec.validate()
            .map_err(|v| ProfileError::InvalidArgument(vec![v]))?;
        if self.shared.in_config(spec.kind(), spec.name()) {
            return Err(ProfileError::DeclaredInConfig {
                kind: spec.kind().label(),
                name: spec.name().to_owned(),
            });
        }
        Ok(())
    }

    /// Stores a new definition (version 1); returns it and the new revision. In effect here
    /// at once, on the other replicas within their next poll.
    pub async fn create(
        &self,
        spec: Spec,
        now: OffsetDateTime,
    ) -> Result<(StoredDefinition, i64), ProfileError> {
        self.check(&spec)?;
        let created = self.store.create(&spec, now).await?;
        changed(spec.kind(), "create");
        self.after_change().await;
        Ok(created)
    }

    /// Replaces a stored definition at `expected_version`; returns it and the new revision.
    pub async fn update(
        &self,
        spec: Spec,
        expected_version: i64,
        now: OffsetDateTime,
    ) -> Result<(StoredDefinition, i64), ProfileError> {
        self.check(&spec)?;
        let updated = self.store.update(&spec, expected_version, now).await?;
        changed(spec.kind(), "update");
        self.after_change().await;
        Ok(updated)
    }

    /// Deletes a stored definition (at `expected_version` when given); returns the new
    /// revision.
    pub async fn delete(
        &self,
        kind: DefinitionKind,
        name: &str,
        expected_version: Option<i64>,
        now: OffsetDateTime,
    ) -> Result<i64, ProfileError> {
        if self.shared.in_config(kind, name) {
            return Err(ProfileError::DeclaredInConfig {
                kind: kind.label(),
                name: name.to_owned(),
            });
        }
        let revision = self.store.delete(kind, name, expected_version, now).await?;
        changed(kind, "delete");
        self.after_change().await;
        Ok(revision)
    }

    /// The definitions of `kind` in effect (config's in declaration order, then the stored
    /// ones by name, as stored now) and the revision they were read at.
    pub async fn list(&self, kind: DefinitionKind) -> Result<(Vec<Declared>, i64), ProfileError> {
        let (revision, stored) = self.store.snapshot().await?;
        let config = self.shared.config();
        let mut out: Vec<Declared> = match kind {
            DefinitionKind::ComputedTrait => config
                .declared()
                .iter()
                .map(|c| Declared::Config(Spec::ComputedTrait(c.clone())))
                .collect(),
            DefinitionKind::Audience => config
                .audiences
                .declared()
                .iter()
                .map(|a| Declared::Config(Spec::Audience(a.clone())))
                .collect(),
        };
        out.extend(
            stored
                .into_iter()
                .filter(|d| d.spec.kind() == kind && !self.shared.in_config(kind, d.spec.name()))
                .map(Declared::Stored),
        );
        Ok((out, revision))
    }

    /// The definition of `kind` named `name` in effect.
    pub async fn get(&self, kind: DefinitionKind, name: &str) -> Result<Declared, ProfileError> {
        self.list(kind)
            .await?
            .0
            .into_iter()
            .find(|d| d.spec().name() == name)
            .ok_or_else(|| ProfileError::DefinitionNotFound {
                kind: kind.label(),
                name: name.to_owned(),
            })
    }

    /// Puts a change in effect here at once (the other replicas poll); a failure only delays
    /// it to the next write or poll.
    async fn after_change(&self) {
        if let Err(e) = self.refresh().await {
            tracing::warn!(error = %e, "reading the changed definitions failed");
        }
    }
}

/// Counts a change made through the API.
fn changed(kind: DefinitionKind, op: &'static str) {
    metrics::counter!("tessera_profile_definition_changes_total", "kind" => kind.as_str(), "op" => op)
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audience::Condition;
    use crate::computed::Kind;

    fn trait_def(name: &str) -> ComputedTrait {
        ComputedTrait {
            name: name.to_owned(),
            kind: Kind::Count,
            events: vec!["Order Completed".to_owned()],
            types: Vec::new(),
            property: None,
            window_seconds: None,
        }
    }

    fn stored(spec: Spec) -> StoredDefinition {
        StoredDefinition {
            spec,
            version: 1,
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn stored_definitions_join_config_which_wins_on_a_clash() {
        let config = Definitions::new(vec![trait_def("orders")], Audiences::default());
        let defs = compose(
            &config,
            3,
            &[
                stored(Spec::ComputedTrait(ComputedTrait {
                    kind: Kind::Sum,
                    ..trait_def("orders")
                })),
                stored(Spec::ComputedTrait(trait_def("visits"))),
                stored(Spec::Audience(Audience {
                    name: "all".to_owned(),
                    condition: Condition::All(Vec::new()),
                })),
            ],
        );
        assert_eq!(defs.revision, 3);
        let names: Vec<_> = defs.declared().iter().map(|c| (&*c.name, c.kind)).collect();
        assert_eq!(names, [("orders", Kind::Count), ("visits", Kind::Count)]);
        assert_eq!(defs.audiences.declared().len(), 1);
        assert_ne!(defs.fingerprint(), config.fingerprint());
    }

    #[test]
    fn validation_names_the_field() {
        let bad = Spec::ComputedTrait(ComputedTrait {
            kind: Kind::Sum,
            ..trait_def("total")
        });
        assert_eq!(bad.validate().unwrap_err().field, "property");
        let unnamed = Spec::Audience(Audience {
            name: String::new(),
            condition: Condition::All(Vec::new()),
        });
        assert_eq!(unnamed.validate().unwrap_err().field, "name");
    }

    #[test]
    fn install_only_moves_forward() {
        let shared = SharedDefinitions::default();
        let two = shared.install(2, &[stored(Spec::ComputedTrait(trait_def("a")))]);
        assert_eq!(two.revision, 2);
        assert_eq!(
            shared.install(1, &[]).revision,
            2,
            "an older read is ignored"
        );
        assert_eq!(shared.current().declared().len(), 1);
        assert_eq!(shared.install(3, &[]).declared().len(), 0);
    }
}
