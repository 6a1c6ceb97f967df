//! The two Secret manifests of the seeds' steps 6–8, ready for `kubectl apply`.

use base64::Engine;

#[derive(Debug, thiserror::Error)]
#[error("namespace {namespace:?} is not a valid Kubernetes namespace name (lower-case letters, digits and '-', at most 63, starting and ending with a letter or digit)")]
pub struct NamespaceError {
    pub namespace: String,
}

/// A DNS-1123 label, what the API server requires of a namespace name.
pub fn validate_namespace(namespace: &str) -> Result<(), NamespaceError> {
    let ok = !namespace.is_empty()
        && namespace.len() <= 63
        && namespace
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !namespace.starts_with('-')
        && !namespace.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(NamespaceError {
            namespace: namespace.to_string(),
        })
    }
}

/// A `v1/Secret` of type Opaque whose `data` holds `entries` base64-encoded, byte for byte.
/// Names and keys come from the compatibility contract and a validated namespace, so they need
/// no YAML quoting; base64 never does.
pub fn secret_yaml(name: &str, namespace: Option<&str>, entries: &[(&str, &[u8])]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = String::from("apiVersion: v1\nkind: Secret\nmetadata:\n");
    out.push_str(&format!("  name: {name}\n"));
    if let Some(ns) = namespace {
        out.push_str(&format!("  namespace: {ns}\n"));
    }
    out.push_str("type: Opaque\ndata:\n");
    for (key, value) in entries {
        out.push_str(&format!("  {key}: {}\n", b64.encode(value)));
    }
    out
}
