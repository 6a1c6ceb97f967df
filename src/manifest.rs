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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_follow_dns_1123_labels() {
        for ok in [
            "spk-utilities",
            "cnf-gateway",
            "a",
            "a1-b2",
            &"x".repeat(63),
        ] {
            validate_namespace(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Spk",
            "a_b",
            "a.b",
            "a b",
            &"x".repeat(64),
            "ns\nkind: x",
        ] {
            let err = validate_namespace(bad).expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")));
        }
    }

    #[test]
    fn secret_data_is_base64_of_the_exact_bytes() {
        let y = secret_yaml(
            "dssm-keys-secret",
            Some("ns1"),
            &[("dssm-key.key", b"\x00\xffkey\n")],
        );
        assert_eq!(
            y,
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: dssm-keys-secret\n  namespace: ns1\ntype: Opaque\ndata:\n  dssm-key.key: AP9rZXkK\n"
        );
        assert!(!secret_yaml("s", None, &[]).contains("namespace"));
    }
}
