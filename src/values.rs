//! `values`: the TMM Helm values of the seeds' "Next step", for the configured dSSM namespace.

use crate::contract;

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
