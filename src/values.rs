//! `values`: the TMM Helm values of the manual procedure's "Next step", for the configured dSSM namespace:
//! one YAML document per TMM namespace (every TMM instance points at the same dSSM).

use crate::contract;
use crate::model::targets::TmmTarget;

pub fn tmm_values(dssm_namespace: &str) -> String {
    format!(
        r#"tmm:

  sessiondb:
    useExternalStorage: "true"

  customEnvVars:
  - name: REDIS_CA_FILE
    value: "{ca}"
  - name: REDIS_AUTH_CERT
    value: "{cert}"
  - name: REDIS_AUTH_KEY
    value: "{key}"
  - name: SESSIONDB_EXTERNAL_STORAGE
    value: "true"
  - name: SESSIONDB_DISCOVERY_SENTINEL
    value: "true"
  - name: SESSIONDB_EXTERNAL_SERVICE
    value: "{service}.{dssm_namespace}"
"#,
        ca = contract::TMM_CA_PATH,
        cert = contract::TMM_CERT_PATH,
        key = contract::TMM_KEY_PATH,
        service = contract::SENTINEL_SERVICE,
    )
}

/// The snippet once per TMM namespace, as `---`-separated documents, each headed by a comment
/// naming the namespace and its TMM workloads (the Helm release of that TMM instance).
pub fn tmm_values_for(dssm_namespace: &str, targets: &[TmmTarget]) -> String {
    crate::model::targets::namespaces(targets)
        .iter()
        .map(|ns| {
            let workloads: Vec<String> = targets
                .iter()
                .filter(|t| &t.namespace == ns)
                .map(|t| format!("{}/{}", t.kind.as_str(), t.name))
                .collect();
            format!(
                "# TMM in namespace {ns} ({}): the values of its Helm release\n{}",
                workloads.join(", "),
                tmm_values(dssm_namespace)
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}
