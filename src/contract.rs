//! The compatibility contract with F5's dSSM and TMM (docs/design.md). Every name here is also a flag
//! default; never change one.

/// The Secret that holds the CA certificate, the leaf and the DH parameters.
pub const CERTS_SECRET: &str = "dssm-certs-secret";
/// The Secret that holds the leaf's private key.
pub const KEYS_SECRET: &str = "dssm-keys-secret";
/// Where dssm-certs keeps the CA key (dSSM namespace only, never mounted by pods).
pub const CA_KEY_SECRET: &str = "dssm-ca-key-secret";

pub const CA_CERT: &str = "dssm-ca.crt";
pub const CA_KEY: &str = "dssm-ca.key";
pub const LEAF_CERT: &str = "dssm-cert.crt";
pub const LEAF_KEY: &str = "dssm-key.key";
pub const DH_PARAMS: &str = "dhparam2048.pem";

/// The manifests `generate` writes, named as in the manual procedure.
pub const CERTS_MANIFEST: &str = "certs-secret.yaml";
pub const KEYS_MANIFEST: &str = "keys-secret.yaml";
/// The CA key Secret's manifest (`generate`): for the dSSM namespace only.
pub const CA_KEY_MANIFEST: &str = "ca-key-secret.yaml";

pub const TMM_DEPLOYMENT: &str = "f5-tmm";
pub const DSSM_SELECTOR: &str = "app in (f5-dssm-db, f5-dssm-sentinel)";
pub const SENTINEL_SERVICE: &str = "f5-dssm-sentinel";
pub const DB_SERVICE: &str = "f5-dssm-db";
pub const SENTINEL_PORT: u16 = 26379;

/// Where TMM mounts the materials (the manual procedure's REDIS_* environment variables).
pub const TMM_CA_PATH: &str = "/etc/ssl/certs/dssm-ca.crt";
pub const TMM_CERT_PATH: &str = "/etc/ssl/certs/dssm-cert.crt";
pub const TMM_KEY_PATH: &str = "/etc/ssl/private/dssm-key.key";

pub const DEFAULT_DAYS: u32 = 365;
/// A new CA lasts 10 years (kubeadm's choice): leaves are renewed under it many times, so CA
/// rotations stay rare. `--ca-days 365` reproduces the manual procedure.
pub const DEFAULT_CA_DAYS: u32 = 3650;

/// The subjectAltNames of the leaf: the dSSM Services, short and qualified, and the DB
/// StatefulSet's pods. Redis never checks host names, but our probe (rustls) does.
pub fn default_dns_names(dssm_namespace: Option<&str>) -> Vec<String> {
    let mut names = Vec::new();
    for service in [SENTINEL_SERVICE, DB_SERVICE] {
        names.push(service.to_string());
        if let Some(ns) = dssm_namespace {
            names.push(format!("{service}.{ns}"));
            names.push(format!("{service}.{ns}.svc"));
            names.push(format!("{service}.{ns}.svc.cluster.local"));
        }
    }
    if let Some(ns) = dssm_namespace {
        names.push(format!("*.{DB_SERVICE}.{ns}.svc.cluster.local"));
    }
    names
}

/// The Lease that makes one writer at a time (`cluster::lease`), in the dSSM namespace.
pub const LEASE_NAME: &str = "dssm-certs";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_cover_both_services_and_the_db_pods() {
        assert_eq!(
            default_dns_names(Some("spk-utilities")),
            [
                "f5-dssm-sentinel",
                "f5-dssm-sentinel.spk-utilities",
                "f5-dssm-sentinel.spk-utilities.svc",
                "f5-dssm-sentinel.spk-utilities.svc.cluster.local",
                "f5-dssm-db",
                "f5-dssm-db.spk-utilities",
                "f5-dssm-db.spk-utilities.svc",
                "f5-dssm-db.spk-utilities.svc.cluster.local",
                "*.f5-dssm-db.spk-utilities.svc.cluster.local",
            ]
        );
        assert_eq!(default_dns_names(None), ["f5-dssm-sentinel", "f5-dssm-db"]);
    }
}
