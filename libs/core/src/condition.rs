//! The test of one named value that audiences (profile service) and scoring plans (scoring
//! service) share: `{"name": "plan", "op": "eq", "value": "pro"}`. One definition, so a test
//! means the same wherever users write it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A test on one named value (a trait, computed trait, score or account field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Test {
    /// The value's name.
    pub name: String,
    /// The comparison.
    pub op: Op,
    /// The value compared with (a list for `in`; unused by `exists` and `missing`).
    #[serde(default)]
    pub value: Value,
}

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Equal (numbers by value).
    Eq,
    /// Not equal, or absent.
    Ne,
    /// Greater than (numbers).
    Gt,
    /// Greater than or equal (numbers).
    Gte,
    /// Less than (numbers).
    Lt,
    /// Less than or equal (numbers).
    Lte,
    /// Equal to one of a list.
    In,
    /// A string containing the value, or a list holding it.
    Contains,
    /// Present (and not null).
    Exists,
    /// Absent (or null).
    Missing,
}

impl Test {
    /// What makes the test unusable: no name, a number comparison with something else than a
    /// number, `in` without a list. `None` when it is usable.
    pub fn problem(&self) -> Option<String> {
        let (name, op) = (&self.name, self.op);
        if name.is_empty() {
            return Some("a test needs a name".to_owned());
        }
        match op {
            Op::Gt | Op::Gte | Op::Lt | Op::Lte if !self.value.is_number() => {
                Some(format!("{name}: {op:?} compares with a number"))
            }
            Op::In if !self.value.is_array() => Some(format!("{name}: in takes a list")),
            Op::Eq
            | Op::Ne
            | Op::Gt
            | Op::Gte
            | Op::Lt
            | Op::Lte
            | Op::In
            | Op::Contains
            | Op::Exists
            | Op::Missing => None,
        }
    }

    /// Whether the test holds for `actual` (absent or null: only `ne` and `missing` hold).
    /// Numbers compare by value, whatever their JSON form.
    pub fn holds(&self, actual: Option<&Value>) -> bool {
        let actual = actual.filter(|v| !v.is_null());
        let compare = |f: fn(f64, f64) -> bool| {
            actual
                .and_then(Value::as_f64)
                .zip(self.value.as_f64())
                .is_some_and(|(a, b)| f(a, b))
        };
        let equal = |a: &Value, b: &Value| match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => (x - y).abs() < f64::EPSILON,
            _ => a == b,
        };
        match self.op {
            Op::Eq => actual.is_some_and(|a| equal(a, &self.value)),
            Op::Ne => !actual.is_some_and(|a| equal(a, &self.value)),
            Op::Gt => compare(|a, b| a > b),
            Op::Gte => compare(|a, b| a >= b),
            Op::Lt => compare(|a, b| a < b),
            Op::Lte => compare(|a, b| a <= b),
            Op::In => actual.is_some_and(|a| {
                self.value
                    .as_array()
                    .is_some_and(|list| list.iter().any(|v| equal(a, v)))
            }),
            Op::Contains => match actual {
                Some(Value::String(s)) => self.value.as_str().is_some_and(|v| s.contains(v)),
                Some(Value::Array(list)) => list.iter().any(|v| equal(v, &self.value)),
                Some(_) | None => false,
            },
            Op::Exists => actual.is_some(),
            Op::Missing => actual.is_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn test(op: Op, value: Value) -> Test {
        Test {
            name: "x".into(),
            op,
            value,
        }
    }

    #[test]
    fn tests_compare_numbers_by_value_and_treat_null_as_absent() {
        assert!(test(Op::Eq, json!(3)).holds(Some(&json!(3.0))));
        assert!(test(Op::Gte, json!(3)).holds(Some(&json!(4))));
        assert!(!test(Op::Gt, json!(3)).holds(Some(&json!("4"))));
        assert!(test(Op::In, json!(["a", "b"])).holds(Some(&json!("b"))));
        assert!(test(Op::Contains, json!("@x.io")).holds(Some(&json!("ann@x.io"))));
        assert!(test(Op::Contains, json!(2)).holds(Some(&json!([1, 2]))));
        assert!(test(Op::Ne, json!(1)).holds(None));
        assert!(test(Op::Missing, json!(null)).holds(Some(&Value::Null)));
        assert!(!test(Op::Exists, json!(null)).holds(Some(&Value::Null)));
        assert!(test(Op::Gt, json!("a")).problem().is_some());
        assert!(test(Op::In, json!(1)).problem().is_some());
        assert!(test(Op::Eq, json!(1)).problem().is_none());
    }
}
