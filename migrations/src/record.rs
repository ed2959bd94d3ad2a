//! Reading a JSON record against a frozen shape, field by field.
//!
//! Migrations read past records through this, not through today's model types: a shape
//! written here is the layout as a past schema wrote it, and stays so when the model
//! changes. It follows serde's rules for the derived types it stands in for (absent
//! `Vec`/`bool`/`Option` fields take their default, `null` is only an absent `Option`,
//! unknown fields are refused), so it accepts exactly what the schema's code accepted.

use serde_json::{Map, Value};

/// A JSON object whose fields are taken one by one; [`Record::finish`] refuses any field
/// that was not taken.
pub(crate) struct Record(Map<String, Value>);

impl Record {
    /// The record in `bytes`, which must be one JSON object.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, String> {
        match serde_json::from_slice(bytes) {
            Ok(Value::Object(fields)) => Ok(Record(fields)),
            Ok(other) => Err(format!("expected a JSON object, found {}", kind(&other))),
            Err(e) => Err(format!("not JSON: {e}")),
        }
    }

    /// A required string.
    pub(crate) fn string(&mut self, field: &str) -> Result<String, String> {
        match self.0.remove(field) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(expected(field, "a string", &other)),
            None => Err(format!("missing field `{field}`")),
        }
    }

    /// An optional string: absent or `null` is `None`.
    pub(crate) fn opt_string(&mut self, field: &str) -> Result<Option<String>, String> {
        match self.0.remove(field) {
            Some(Value::String(s)) => Ok(Some(s)),
            None | Some(Value::Null) => Ok(None),
            Some(other) => Err(expected(field, "a string or null", &other)),
        }
    }

    /// A list of strings, empty when absent.
    pub(crate) fn strings(&mut self, field: &str) -> Result<Vec<String>, String> {
        match self.0.remove(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(expected(field, "an array of strings", &other)),
                })
                .collect(),
            Some(other) => Err(expected(field, "an array of strings", &other)),
        }
    }

    /// A flag, false when absent.
    pub(crate) fn flag(&mut self, field: &str) -> Result<bool, String> {
        match self.0.remove(field) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(b),
            Some(other) => Err(expected(field, "a boolean", &other)),
        }
    }

    /// One of the `variants` (a unit enum), `None` when absent.
    pub(crate) fn variant(
        &mut self,
        field: &str,
        variants: &[&str],
    ) -> Result<Option<String>, String> {
        match self.0.remove(field) {
            None => Ok(None),
            Some(Value::String(s)) if variants.contains(&s.as_str()) => Ok(Some(s)),
            Some(other) => Err(format!(
                "field `{field}`: expected one of {variants:?}, found {other}"
            )),
        }
    }

    /// Refuses the record if it holds a field that was not taken.
    pub(crate) fn finish(self) -> Result<(), String> {
        match self.0.keys().next() {
            None => Ok(()),
            Some(field) => Err(format!("unknown field `{field}`")),
        }
    }
}

fn expected(field: &str, what: &str, found: &Value) -> String {
    format!("field `{field}`: expected {what}, found {}", kind(found))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
