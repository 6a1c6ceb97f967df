//! The two Secret manifests of the manual procedure's steps 6–8, ready for `kubectl apply`, and the CA key
//! Secret's, so that a hand install keeps its CA at the cluster's first renewal.

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

/// The CA key Secret (`dssm-ca-key-secret`) as the cluster code reads it: the CA certificate
/// and its key under their file names, labelled as ours. `namespace` (the dSSM namespace, when
/// known) is written in, so that kubectl refuses to apply it into any other namespace.
pub fn ca_key_secret_yaml(namespace: Option<&str>, ca_cert: &[u8], ca_key: &[u8]) -> String {
    let yaml = secret_yaml(
        crate::contract::CA_KEY_SECRET,
        namespace,
        &[
            (crate::materials::ca_key_secret_keys::CA_CERT, ca_cert),
            (crate::materials::ca_key_secret_keys::CA_KEY, ca_key),
        ],
    );
    let label = format!(
        "  labels:\n    {}: {}\n",
        crate::materials::annotations::MANAGED_BY,
        crate::materials::annotations::MANAGER
    );
    yaml.replacen("type: Opaque\n", &format!("{label}type: Opaque\n"), 1)
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

    #[test]
    fn the_ca_key_secret_is_labelled_ours_and_names_its_namespace() {
        let y = ca_key_secret_yaml(Some("spk-utilities"), b"cert", b"key");
        let s: k8s_openapi::api::core::v1::Secret = serde_yaml::from_str(&y).unwrap();
        assert_eq!(s.metadata.name.as_deref(), Some("dssm-ca-key-secret"));
        assert_eq!(s.metadata.namespace.as_deref(), Some("spk-utilities"));
        assert_eq!(
            s.metadata.labels.unwrap()["app.kubernetes.io/managed-by"],
            "dssm-certs"
        );
        let data = s.data.unwrap();
        assert_eq!(data["dssm-ca.crt"].0, b"cert");
        assert_eq!(data["dssm-ca.key"].0, b"key");
    }
}
