//! Every type error at once: a document is checked against the JSON Schema that
//! schemars derives from the spec's own types (with boon) before it is deserialised,
//! because serde stops at the first error. `replicas: -2`, an unknown key and
//! `duration: soon` are then three problems, each with its field path.

use std::borrow::Cow;

use boon::{Compiler, ErrorKind, InstanceToken, SchemaIndex, Schemas, ValidationError};
use serde_json::Value;

use crate::{Duration, FieldError};

/// Where the schema is registered with the validator: a name, never fetched.
const LOCATION: &str = "https://baton.dev/schemas/spec.json";

/// A compiled schema and its source (to name the fields an object may have).
pub struct Shape {
    schema: Value,
    schemas: Schemas,
    index: SchemaIndex,
}

impl Shape {
    /// The schema of `T`. An error is a bug in the types' schema, not in a document.
    pub fn of<T: schemars::JsonSchema>() -> Result<Shape, String> {
        let schema = serde_json::to_value(schemars::schema_for!(T)).map_err(|e| e.to_string())?;
        let mut compiler = Compiler::new();
        compiler
            .add_resource(LOCATION, schema.clone())
            .map_err(|e| e.to_string())?;
        let mut schemas = Schemas::new();
        let index = compiler
            .compile(LOCATION, &mut schemas)
            .map_err(|e| e.to_string())?;
        Ok(Shape {
            schema,
            schemas,
            index,
        })
    }

    /// Every place where `doc` does not have the shape of the type, ordered by path.
    pub fn errors(&self, doc: &Value) -> Vec<FieldError> {
        let mut out = Vec::new();
        if let Err(e) = self.schemas.validate(doc, self.index) {
            self.collect(&e, doc, &mut out);
        }
        // The validator visits an object's keys in no fixed order.
        out.sort_by_cached_key(|e| order(&e.field));
        out.dedup();
        out
    }

    fn collect(&self, e: &ValidationError, doc: &Value, out: &mut Vec<FieldError>) {
        let at = &e.instance_location.tokens;
        match &e.kind {
            ErrorKind::Group | ErrorKind::Schema { .. } | ErrorKind::Reference { .. } => {
                for c in &e.causes {
                    self.collect(c, doc, out);
                }
            }
            ErrorKind::AnyOf | ErrorKind::OneOf(None) => self.alternatives(e, doc, out),
            ErrorKind::Required { want } => {
                for name in want {
                    out.push(error(&child(at, name), "is required".into()));
                }
            }
            ErrorKind::AdditionalProperties { got } => {
                let known = self.properties(e.schema_url);
                for name in got {
                    let reason = if known.is_empty() {
                        "is not a field here".to_string()
                    } else {
                        format!("is not a field here; expected one of {}", known.join(", "))
                    };
                    out.push(error(&child(at, name), reason));
                }
            }
            kind => out.push(error(at, leaf(kind, value_at(doc, at)))),
        }
    }

    /// A value that matches none of several forms: a duration, an optional value, or
    /// one variant of an enum. Descends into the one form the value was meant to have,
    /// when that shows; otherwise says which forms there are.
    fn alternatives(&self, e: &ValidationError, doc: &Value, out: &mut Vec<FieldError>) {
        let at = &e.instance_location.tokens;
        let value = value_at(doc, at);
        if e.schema_url.ends_with("/$defs/Duration") {
            if let Some(reason) = duration_problem(value) {
                out.push(error(at, reason));
            }
            return;
        }
        // An optional value that is there: only its own form counts.
        let present: Vec<&ValidationError> = e
            .causes
            .iter()
            .filter(|c| !only_not_null(c, at.len()))
            .collect();
        if let [one] = present[..] {
            return self.collect(one, doc, out);
        }
        // A branch that fails at this very place (wrong type, missing or foreign key)
        // is a form the value does not have; one failing deeper is the form it meant.
        let meant: Vec<&ValidationError> = present
            .into_iter()
            .filter(|c| !fails_at(c, at.len()))
            .collect();
        if let [one] = meant[..] {
            return self.collect(one, doc, out);
        }
        let forms = self.forms(e.schema_url);
        let keys: Vec<&str> = forms
            .iter()
            .filter_map(|f| f.strip_prefix("key "))
            .collect();
        let reason = if !keys.is_empty() && keys.len() == forms.len() {
            format!(
                "must have exactly one of the keys {}, got {}",
                keys.join(", "),
                show(value)
            )
        } else if forms.is_empty() {
            format!("{} does not have any of the expected forms", show(value))
        } else {
            format!("expected {}, got {}", forms.join(" or "), show(value))
        };
        out.push(error(at, reason));
    }

    /// The forms the `oneOf` / `anyOf` at `url` allows: `key setWeight` for an enum
    /// variant written as a key, a constant, or a type.
    fn forms(&self, url: &str) -> Vec<String> {
        let Some(node) = self.node(url) else {
            return Vec::new();
        };
        let branches = node
            .get("oneOf")
            .or_else(|| node.get("anyOf"))
            .and_then(Value::as_array);
        let mut out = Vec::new();
        for b in branches.into_iter().flatten() {
            let b = match b.get("$ref").and_then(Value::as_str) {
                Some(r) => self.schema.pointer(r.trim_start_matches('#')).unwrap_or(b),
                None => b,
            };
            let required = b.get("required").and_then(Value::as_array);
            if let Some(c) = b.get("const") {
                out.push(c.to_string());
            } else if let Some(values) = b.get("enum").and_then(Value::as_array) {
                out.extend(values.iter().map(Value::to_string));
            } else if let Some([key]) = required.map(Vec::as_slice) {
                out.push(format!("key {}", key.as_str().unwrap_or_default()));
            } else if let Some(t) = b.get("type").and_then(Value::as_str) {
                out.push(a(t));
            }
        }
        out
    }

    /// The schema node a validator URL points at.
    fn node(&self, url: &str) -> Option<&Value> {
        let pointer = url.split_once('#').map_or("", |(_, p)| p);
        self.schema.pointer(pointer)
    }

    /// The fields of the object schema at `url` (for an unknown field's error).
    fn properties(&self, url: &str) -> Vec<String> {
        self.node(url.trim_end_matches("/additionalProperties"))
            .and_then(|s| s.get("properties"))
            .and_then(Value::as_object)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// Whether a branch only says that the value is not null: the other branch of an
/// optional value.
fn only_not_null(e: &ValidationError, depth: usize) -> bool {
    matches!(&e.kind, ErrorKind::Type { want, .. }
        if e.instance_location.tokens.len() == depth && want.iter().all(|t| t == boon::Type::Null))
}

/// Whether the error tree of a branch holds a failure of the value itself (at depth
/// `depth`) rather than of something inside it.
fn fails_at(e: &ValidationError, depth: usize) -> bool {
    let here = e.instance_location.tokens.len() == depth;
    match &e.kind {
        ErrorKind::Group | ErrorKind::Schema { .. } | ErrorKind::Reference { .. } => {
            e.causes.iter().any(|c| fails_at(c, depth))
        }
        ErrorKind::Type { .. }
        | ErrorKind::Required { .. }
        | ErrorKind::AdditionalProperties { .. }
        | ErrorKind::Enum { .. }
        | ErrorKind::Const { .. } => here,
        _ => false,
    }
}

/// The reason for one failed keyword, in the spec's words.
fn leaf(kind: &ErrorKind, value: Option<&Value>) -> String {
    match kind {
        ErrorKind::Type { want, .. } => {
            let want: Vec<String> = want
                .iter()
                .filter(|t| *t != boon::Type::Null)
                .map(|t| a(&t.to_string()))
                .collect();
            format!("expected {}, got {}", want.join(" or "), show(value))
        }
        ErrorKind::Minimum { got, want } if want.as_f64() == Some(0.0) => {
            format!("must not be negative, got {got}")
        }
        ErrorKind::Minimum { got, want } => format!("must be at least {want}, got {got}"),
        ErrorKind::Maximum { got, want } => format!("must be at most {want}, got {got}"),
        ErrorKind::ExclusiveMinimum { got, want } => format!("must be above {want}, got {got}"),
        ErrorKind::ExclusiveMaximum { got, want } => format!("must be below {want}, got {got}"),
        ErrorKind::MinItems { want: 1, .. } => "must not be empty".into(),
        ErrorKind::MinItems { want, .. } => format!("must have at least {want} items"),
        ErrorKind::MaxItems { want, .. } => format!("must have at most {want} items"),
        ErrorKind::MinLength { want, .. } => format!("must be at least {want} characters"),
        ErrorKind::Enum { want } => format!(
            "expected one of {}, got {}",
            want.iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            show(value)
        ),
        ErrorKind::Const { want } => format!("expected {want}, got {}", show(value)),
        other => other.to_string(),
    }
}

/// Why a value is not a duration, in the words of its own parser and bounds.
fn duration_problem(value: Option<&Value>) -> Option<String> {
    let v = value?;
    match serde_json::from_value::<Duration>(v.clone()) {
        Err(e) => Some(e.to_string()),
        Ok(d) => crate::validate::too_long(d),
    }
}

fn value_at<'a>(doc: &'a Value, at: &[InstanceToken]) -> Option<&'a Value> {
    at.iter().try_fold(doc, |v, t| match t {
        InstanceToken::Prop(p) => v.get(p.as_ref()),
        InstanceToken::Item(i) => v.get(*i),
    })
}

/// `the string "two"`, `-2`, `an object`: the value an error is about.
fn show(value: Option<&Value>) -> String {
    match value {
        None => "nothing".into(),
        Some(Value::String(s)) => format!("the string {s:?}"),
        Some(Value::Object(_)) => "an object".into(),
        Some(Value::Array(_)) => "a list".into(),
        Some(v) => v.to_string(),
    }
}

/// `an integer`, `a string`: JSON Schema's type names as a reason says them.
fn a(t: &str) -> String {
    let t = match t {
        "array" => "list",
        "number" => "number",
        other => other,
    };
    if t.starts_with(['a', 'e', 'i', 'o', 'u']) {
        format!("an {t}")
    } else {
        format!("a {t}")
    }
}

fn child<'v>(at: &[InstanceToken<'v>], name: &str) -> Vec<InstanceToken<'v>> {
    let mut p = at.to_vec();
    p.push(InstanceToken::Prop(Cow::Owned(name.to_string())));
    p
}

fn error(at: &[InstanceToken], reason: String) -> FieldError {
    FieldError {
        field: path(at),
        reason,
    }
}

/// `spec.strategy.canary.steps[3].setWeight`, as serde_path_to_error writes it.
pub(crate) fn path(at: &[InstanceToken]) -> String {
    let mut out = String::new();
    for t in at {
        match t {
            InstanceToken::Prop(p) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(p);
            }
            InstanceToken::Item(i) => out.push_str(&format!("[{i}]")),
        }
    }
    if out.is_empty() {
        "(document)".into()
    } else {
        out
    }
}

/// A path's parts, with list indices compared as numbers (`[10]` after `[9]`).
fn order(field: &str) -> Vec<(String, usize)> {
    field
        .split(['.', '['])
        .map(|part| match part.strip_suffix(']').map(str::parse) {
            Some(Ok(i)) => (String::new(), i),
            _ => (part.to_string(), 0),
        })
        .collect()
}

/// Every problem of one document: its type errors (`shape`) with, when it could be
/// deserialised, the semantic checks' problems (`Ok`), or serde's first error (`Err`)
/// when the schema missed it. A field both name keeps the semantic check's words.
pub fn combine(
    shape: Vec<FieldError>,
    typed: Result<Vec<FieldError>, FieldError>,
) -> Vec<FieldError> {
    match typed {
        Ok(mut semantic) => {
            let extra: Vec<FieldError> = shape
                .into_iter()
                .filter(|e| !semantic.iter().any(|s| s.field == e.field))
                .collect();
            semantic.extend(extra);
            semantic
        }
        Err(first) => {
            let covered = shape.iter().any(|e| {
                first.field == "(document)"
                    || e.field == first.field
                    || e.field.starts_with(&format!("{}.", first.field))
                    || e.field.starts_with(&format!("{}[", first.field))
            });
            let mut all = shape;
            if !covered {
                all.push(first);
            }
            all
        }
    }
}
