//! JSON Schemas as Gemini takes them (`parametersJsonSchema`, `responseJsonSchema`): what
//! Gemini documents goes through as written, annotations that constrain nothing are left out
//! (`$schema`, `examples`, `default` ...), `const` becomes a one-value `enum`, and a keyword
//! Gemini cannot express (`pattern`, `allOf`, `minLength` ...) is refused with where it stands,
//! never dropped: a schema that held no longer would let the model answer what the app forbade.
//!
//! The schema is read and written in one pass over its text (no tree is built), so converting
//! costs at most its size, whatever its shape.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// Keywords that hold a value Gemini reads as it is.
const VALUE_KEYWORDS: &[&str] = &[
    "type",
    "format",
    "title",
    "description",
    "enum",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "required",
    "$id",
    "$ref",
    "$anchor",
    "propertyOrdering",
    "nullable",
];

/// Keywords whose value is a schema.
const SCHEMA_KEYWORDS: &[&str] = &["items", "additionalProperties"];

/// Keywords whose value is a list of schemas.
const SCHEMA_LIST_KEYWORDS: &[&str] = &["anyOf", "oneOf", "prefixItems"];

/// Keywords whose value maps names to schemas.
const SCHEMA_MAP_KEYWORDS: &[&str] = &["properties", "$defs", "definitions"];

/// Annotations: they describe, they do not constrain.
const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$comment",
    "examples",
    "default",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$vocabulary",
];

/// `schema` (JSON text) as Gemini takes it. The error names the keyword and where it stands.
pub fn for_gemini(schema: &str) -> Result<String, String> {
    let problem = RefCell::new(None);
    let path = RefCell::new(Vec::new());
    let mut out = String::with_capacity(schema.len());
    let mut de = serde_json::Deserializer::from_str(schema);
    let seed = SchemaSeed {
        out: &mut out,
        path: &path,
        problem: &problem,
    };
    let result = seed.deserialize(&mut de).and_then(|()| de.end());
    match (result, problem.into_inner()) {
        (_, Some(p)) => Err(p),
        (Err(e), None) => Err(format!("the schema is not valid JSON: {e}")),
        (Ok(()), None) => Ok(out),
    }
}

/// Writes one schema (an object, or `true` / `false`) to `out`. `path` is where it stands (the
/// steps from the root, shared by all seeds: entering a child pushes a step, leaving pops it),
/// joined only when something is refused.
struct SchemaSeed<'o, 'p> {
    out: &'o mut String,
    path: &'p RefCell<Vec<String>>,
    problem: &'p RefCell<Option<String>>,
}

impl SchemaSeed<'_, '_> {
    fn refuse<E: de::Error>(&self, why: String) -> E {
        let path = self.path.borrow();
        let place = if path.is_empty() {
            String::new()
        } else {
            format!(" (at {})", path.join("."))
        };
        *self.problem.borrow_mut() = Some(format!("{why}{place}"));
        E::custom("refused")
    }

    /// The seed of a child at `step`; [`Self::up`] once it is read.
    fn child(&mut self, step: &str) -> SchemaSeed<'_, '_> {
        self.path.borrow_mut().push(step.to_string());
        SchemaSeed {
            out: self.out,
            path: self.path,
            problem: self.problem,
        }
    }

    fn up(&self) {
        self.path.borrow_mut().pop();
    }
}

fn push_key(out: &mut String, first: &mut bool, key: &str) {
    if !*first {
        out.push(',');
    }
    *first = false;
    // A key is a string: serializing it cannot fail.
    out.push_str(&serde_json::to_string(key).unwrap_or_default());
    out.push(':');
}

impl<'de> DeserializeSeed<'de> for SchemaSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for SchemaSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON Schema (an object, or true or false)")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.out.push_str(if v { "true" } else { "false" });
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        self.out.push('{');
        let mut first = true;
        while let Some(key) = map.next_key::<String>()? {
            let k = key.as_str();
            if VALUE_KEYWORDS.contains(&k) {
                let v: &RawValue = map.next_value()?;
                push_key(self.out, &mut first, k);
                self.out.push_str(v.get());
            } else if k == "const" {
                let v: &RawValue = map.next_value()?;
                push_key(self.out, &mut first, "enum");
                self.out.push('[');
                self.out.push_str(v.get());
                self.out.push(']');
            } else if SCHEMA_KEYWORDS.contains(&k) {
                push_key(self.out, &mut first, k);
                map.next_value_seed(self.child(k))?;
                self.up();
            } else if SCHEMA_LIST_KEYWORDS.contains(&k) {
                push_key(self.out, &mut first, k);
                map.next_value_seed(ListSeed(self.child(k)))?;
                self.up();
            } else if SCHEMA_MAP_KEYWORDS.contains(&k) {
                push_key(self.out, &mut first, k);
                map.next_value_seed(MapSeed(self.child(k)))?;
                self.up();
            } else if ANNOTATIONS.contains(&k) {
                map.next_value::<IgnoredAny>()?;
            } else {
                let shown: String = k.chars().take(40).collect();
                return Err(self.refuse(format!(
                    "the JSON Schema keyword `{shown}` cannot be expressed for Gemini (it takes type, format, enum, const, items, prefixItems, minItems, maxItems, minimum, maximum, properties, required, additionalProperties, anyOf, oneOf, $ref, $defs, title, description)"
                )));
            }
        }
        self.out.push('}');
        Ok(())
    }
}

/// A list of schemas.
struct ListSeed<'o, 'p>(SchemaSeed<'o, 'p>);

impl<'de> DeserializeSeed<'de> for ListSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ListSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of JSON Schemas")
    }
    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        self.0.out.push('[');
        let mut i = 0usize;
        loop {
            let step = format!("{i}");
            let more = {
                let probe = self.0.child(&step);
                if i > 0 {
                    // Written before the element; taken back below if there is none.
                    probe.out.push(',');
                }
                seq.next_element_seed(probe)?
            };
            self.0.up();
            if more.is_none() {
                if i > 0 {
                    self.0.out.pop();
                }
                break;
            }
            i += 1;
        }
        self.0.out.push(']');
        Ok(())
    }
}

/// A map of names to schemas (`properties`, `$defs`).
struct MapSeed<'o, 'p>(SchemaSeed<'o, 'p>);

impl<'de> DeserializeSeed<'de> for MapSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MapSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of JSON Schemas")
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        self.0.out.push('{');
        let mut first = true;
        while let Some(name) = map.next_key::<String>()? {
            push_key(self.0.out, &mut first, &name);
            map.next_value_seed(self.0.child(&name))?;
            self.0.up();
        }
        self.0.out.push('}');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn convert(v: Value) -> Result<Value, String> {
        for_gemini(&v.to_string()).map(|s| serde_json::from_str(&s).expect("valid JSON out"))
    }

    #[test]
    fn what_gemini_takes_goes_through_and_annotations_go() {
        // A zod schema as the AI SDK sends it.
        let zod = json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "a city", "default": "Oslo"},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "units": {"const": "metric"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                "when": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
                "properties": {"type": "object", "additionalProperties": {"type": "number"}}
            },
            "required": ["city"],
            "additionalProperties": false,
            "$defs": {"x": {"type": "boolean", "examples": [true]}}
        });
        let out = convert(zod).unwrap();
        assert!(out.get("$schema").is_none());
        assert_eq!(
            out["properties"]["city"],
            json!({"type": "string", "description": "a city"})
        );
        assert_eq!(out["properties"]["units"], json!({"enum": ["metric"]}));
        assert_eq!(out["properties"]["days"]["maximum"], 7);
        assert_eq!(out["properties"]["when"]["anyOf"][1], json!({"type": "null"}));
        assert_eq!(
            out["properties"]["properties"]["additionalProperties"]["type"],
            "number"
        );
        assert_eq!(out["required"], json!(["city"]));
        assert_eq!(out["additionalProperties"], false);
        assert_eq!(out["$defs"]["x"], json!({"type": "boolean"}));
        assert_eq!(convert(json!({"anyOf": []})).unwrap(), json!({"anyOf": []}));
    }

    #[test]
    fn what_gemini_cannot_express_is_refused_with_its_place() {
        let e = convert(json!({"type": "object", "properties": {"email": {"type": "string", "pattern": "@"}}}))
            .unwrap_err();
        assert!(e.contains("`pattern`") && e.contains("properties.email"), "{e}");
        let e = convert(json!({"allOf": [{"type": "object"}]})).unwrap_err();
        assert!(e.contains("`allOf`"), "{e}");
        let e = convert(json!({"anyOf": [{"type": "string"}, {"type": "string", "minLength": 2}]})).unwrap_err();
        assert!(e.contains("anyOf.1"), "{e}");
        assert!(convert(json!([1])).is_err());
        assert!(for_gemini("{").is_err());
    }

    #[test]
    fn deep_and_wide_schemas_cost_their_size() {
        let wide = format!(
            "{{\"type\":\"object\",\"properties\":{{{}}}}}",
            (0..20_000)
                .map(|i| format!("\"p{i}\":{{\"type\":\"string\"}}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert_eq!(for_gemini(&wide).unwrap().len(), wide.len());
        // A long name above many list items: the name is not copied per item (this would take
        // 400 GB of copying if it were).
        let long = format!(
            "{{\"properties\":{{\"{}\":{{\"anyOf\":[{}]}}}}}}",
            "n".repeat(1 << 20),
            vec!["true"; 400_000].join(",")
        );
        assert_eq!(for_gemini(&long).unwrap().len(), long.len());
        let deep = format!("{}{{}}{}", "{\"items\":".repeat(200), "}".repeat(200));
        assert!(for_gemini(&deep).is_err());
    }
}
