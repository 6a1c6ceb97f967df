//! Rendered manifests as JSON values, and the check that each one is a faithful Kubernetes object.

use serde_json::Value;

/// Every document of a multi-document YAML stream (empty documents left out).
pub fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Parses `v` into its k8s-openapi type and back: nothing may be lost or changed (an unknown or
/// misspelt field would be).
pub fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) {
    let typed: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v:#}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        &back, v,
        "{} {} lost or changed fields",
        v["kind"], v["metadata"]["name"]
    );
}

/// Merges `over` into `base` as Helm merges value files: objects key by key, anything else replaced.
pub fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o,
    }
}
