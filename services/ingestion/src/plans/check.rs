//! The tracking plan as a document, compiled, and checking a message against it. Plain Rust:
//! nothing here knows of gRPC or the database.

use std::collections::{BTreeMap, HashMap};

use jsonschema::Validator;
use serde_json::{Map, Value};
use tessera_core::{Event, EventType, FieldViolation};

/// What happens to a track event whose name has no schema.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Unplanned {
    /// Accepted unchecked.
    #[default]
    Allow,
    /// A violation.
    Block,
}

/// A tracking plan as put and stored: JSON Schemas, not yet compiled.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Plan {
    /// Schemas of track `properties`, by event name.
    #[serde(default)]
    pub(crate) track_events: BTreeMap<String, Value>,
    /// Schemas of page `properties`, by page name.
    #[serde(default)]
    pub(crate) pages: BTreeMap<String, Value>,
    /// Schemas of screen `properties`, by screen name.
    #[serde(default)]
    pub(crate) screens: BTreeMap<String, Value>,
    /// The schema of identify `traits`.
    #[serde(default)]
    pub(crate) identify_traits: Option<Value>,
    /// The schema of group `traits`.
    #[serde(default)]
    pub(crate) group_traits: Option<Value>,
    /// What happens to track events without a schema.
    #[serde(default)]
    pub(crate) unplanned: Unplanned,
}

/// One compiled schema and the name it is reported under.
struct Schema {
    /// For example `track_events["Order Completed"]`.
    name: String,
    validator: Validator,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schema").field("name", &self.name).finish()
    }
}

/// A plan with every schema compiled, ready to check messages.
#[derive(Debug)]
pub(crate) struct CompiledPlan {
    version: i64,
    track: HashMap<String, Schema>,
    pages: HashMap<String, Schema>,
    screens: HashMap<String, Schema>,
    identify: Option<Schema>,
    group: Option<Schema>,
    unplanned: Unplanned,
}

/// One way a message breaks the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PlanViolation {
    /// The field in the message, for example `properties.price` or `traits.email`.
    pub(crate) field: String,
    /// The schema, for example `track_events["Order Completed"]`.
    pub(crate) schema: String,
    /// The failing rule's path in the schema, for example `/properties/price/type`.
    pub(crate) schema_path: String,
    /// What is wrong.
    pub(crate) message: String,
}

impl PlanViolation {
    /// A one-line description naming the schema and the failing rule.
    pub(crate) fn describe(&self) -> String {
        if self.schema_path.is_empty() {
            format!("{} (schema {})", self.message, self.schema)
        } else {
            format!(
                "{} (schema {}, rule {})",
                self.message, self.schema, self.schema_path
            )
        }
    }

    /// The form recorded on a stored event in `warn` mode.
    pub(crate) fn to_json(&self) -> Value {
        serde_json::json!({
            "field": self.field,
            "schema": self.schema,
            "schemaPath": self.schema_path,
            "message": self.message,
        })
    }
}

fn compile_one(name: String, schema: &Value, errors: &mut Vec<FieldViolation>) -> Option<Schema> {
    match jsonschema::validator_for(schema) {
        Ok(validator) => Some(Schema { name, validator }),
        Err(e) => {
            errors.push(FieldViolation::new(
                format!("plan.{name}"),
                format!("not a valid JSON Schema: {e}"),
            ));
            None
        }
    }
}

fn compile_map(
    kind: &str,
    schemas: &BTreeMap<String, Value>,
    errors: &mut Vec<FieldViolation>,
) -> HashMap<String, Schema> {
    schemas
        .iter()
        .filter_map(|(key, schema)| {
            let name = format!("{kind}[{key:?}]");
            compile_one(name, schema, errors).map(|s| (key.clone(), s))
        })
        .collect()
}

impl CompiledPlan {
    /// Compiles every schema of `plan`; the violations name each schema that does not compile
    /// (as `plan.track_events["Name"]`, `plan.identify_traits`, ...).
    pub(crate) fn compile(plan: &Plan, version: i64) -> Result<Self, Vec<FieldViolation>> {
        let Plan {
            track_events,
            pages,
            screens,
            identify_traits,
            group_traits,
            unplanned,
        } = plan;
        let mut errors = Vec::new();
        let compiled = Self {
            version,
            track: compile_map("track_events", track_events, &mut errors),
            pages: compile_map("pages", pages, &mut errors),
            screens: compile_map("screens", screens, &mut errors),
            identify: identify_traits
                .as_ref()
                .and_then(|s| compile_one("identify_traits".to_owned(), s, &mut errors)),
            group: group_traits
                .as_ref()
                .and_then(|s| compile_one("group_traits".to_owned(), s, &mut errors)),
            unplanned: *unplanned,
        };
        if errors.is_empty() {
            Ok(compiled)
        } else {
            Err(errors)
        }
    }

    /// The plan's version.
    pub(crate) fn version(&self) -> i64 {
        self.version
    }

    /// Every way `event` breaks the plan; none when it follows it or has no schema.
    pub(crate) fn check(&self, event: &Event) -> Vec<PlanViolation> {
        let (schema, field, instance) = match event.kind {
            EventType::Track => match self.track.get(&event.event) {
                Some(schema) => (schema, "properties", &event.properties),
                None if self.unplanned == Unplanned::Block => {
                    return vec![PlanViolation {
                        field: "event".to_owned(),
                        schema: "unplanned".to_owned(),
                        schema_path: String::new(),
                        message: format!(
                            "the track event {:?} has no schema in the tracking plan, and \
                             unplanned events are blocked",
                            event.event
                        ),
                    }];
                }
                None => return Vec::new(),
            },
            EventType::Page => match self.pages.get(&event.name) {
                Some(schema) => (schema, "properties", &event.properties),
                None => return Vec::new(),
            },
            EventType::Screen => match self.screens.get(&event.name) {
                Some(schema) => (schema, "properties", &event.properties),
                None => return Vec::new(),
            },
            EventType::Identify => match &self.identify {
                Some(schema) => (schema, "traits", &event.traits),
                None => return Vec::new(),
            },
            EventType::Group => match &self.group {
                Some(schema) => (schema, "traits", &event.traits),
                None => return Vec::new(),
            },
            EventType::Alias => return Vec::new(),
        };
        validate(schema, field, instance)
    }
}

fn validate(schema: &Schema, field: &str, instance: &Map<String, Value>) -> Vec<PlanViolation> {
    let instance = Value::Object(instance.clone());
    schema
        .validator
        .iter_errors(&instance)
        .map(|e| PlanViolation {
            field: field_path(field, &e.instance_path().to_string()),
            schema: schema.name.clone(),
            schema_path: e.schema_path().to_string(),
            message: e.to_string(),
        })
        .collect()
}

/// `properties` + the JSON pointer `/items/0/sku` → `properties.items[0].sku`.
fn field_path(root: &str, pointer: &str) -> String {
    let mut path = root.to_owned();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            path.push('[');
            path.push_str(&segment);
            path.push(']');
        } else {
            path.push('.');
            path.push_str(&segment);
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn plan() -> Plan {
        serde_json::from_value(json!({
            "trackEvents": {
                "Order Completed": {
                    "type": "object",
                    "properties": {"price": {"type": "number"}, "items": {"type": "array",
                        "items": {"type": "object", "required": ["sku"]}}},
                    "required": ["price"]
                }
            },
            "identifyTraits": {"properties": {"email": {"type": "string", "format": "email"}}},
        }))
        .unwrap()
    }

    fn track(name: &str, properties: Value) -> Event {
        let mut e = Event::new(EventType::Track);
        e.event = name.to_owned();
        e.properties = properties.as_object().unwrap().clone();
        e
    }

    #[test]
    fn violations_name_the_field_the_schema_and_the_rule() {
        let plan = CompiledPlan::compile(&plan(), 3).unwrap();
        let ok = track(
            "Order Completed",
            json!({"price": 9.5, "items": [{"sku": "a"}]}),
        );
        assert_eq!(plan.check(&ok), vec![]);

        let bad = track("Order Completed", json!({"price": "9.5", "items": [{}]}));
        let mut found = plan.check(&bad);
        found.sort_by(|a, b| a.field.cmp(&b.field));
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].field, "properties.items[0]");
        assert_eq!(found[0].schema_path, "/properties/items/items/required");
        assert_eq!(found[1].field, "properties.price");
        assert_eq!(found[1].schema, "track_events[\"Order Completed\"]");
        assert_eq!(found[1].schema_path, "/properties/price/type");
        assert!(found[1].describe().contains("is not of type \"number\""));

        let missing = plan.check(&track("Order Completed", json!({})));
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].field, "properties");
        assert_eq!(missing[0].schema_path, "/required");
    }

    #[test]
    fn unplanned_events_pass_unless_blocked() {
        let mut p = plan();
        let compiled = CompiledPlan::compile(&p, 1).unwrap();
        assert_eq!(compiled.check(&track("Other", json!({"x": 1}))), vec![]);
        p.unplanned = Unplanned::Block;
        let compiled = CompiledPlan::compile(&p, 2).unwrap();
        let found = compiled.check(&track("Other", json!({})));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].field, "event");
        // Identify traits are checked; alias never.
        let mut identify = Event::new(EventType::Identify);
        identify.traits = json!({"email": 5}).as_object().unwrap().clone();
        assert_eq!(compiled.check(&identify)[0].field, "traits.email");
        assert_eq!(compiled.check(&Event::new(EventType::Alias)), vec![]);
    }

    #[test]
    fn bad_schemas_are_named() {
        let p: Plan = serde_json::from_value(json!({
            "trackEvents": {"Good": {"type": "object"}, "Bad": {"type": 12}},
            "groupTraits": {"minProperties": "three"},
        }))
        .unwrap();
        let errors = CompiledPlan::compile(&p, 1).unwrap_err();
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["plan.track_events[\"Bad\"]", "plan.group_traits"]);
    }

    #[test]
    fn remote_references_are_not_fetched() {
        let p: Plan = serde_json::from_value(json!({
            "trackEvents": {"Remote": {"$ref": "https://example.com/schema.json"}},
        }))
        .unwrap();
        assert!(CompiledPlan::compile(&p, 1).is_err());
    }

    #[test]
    fn pointers_become_field_paths() {
        assert_eq!(field_path("properties", ""), "properties");
        assert_eq!(field_path("properties", "/a/0/b~1c"), "properties.a[0].b/c");
    }
}
