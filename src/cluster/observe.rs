//! One observation: every copy of the Secrets, the CA key Secret and every TMM workload, read
//! in one pass, with the raw Secrets kept for writing back (and wiped when it goes).

use std::collections::BTreeMap;

use super::secrets::secret_obs;
use super::{Cluster, ClusterError};
use crate::contract;
use crate::materials::CopyObs;
pub use crate::model::observation::Observation;

impl Cluster {
    /// Reads every Secret of every copy, the CA key Secret and every TMM workload: 2 reads per
    /// namespace, 1 per target, plus 1.
    pub async fn observe(&self) -> Result<Observation, ClusterError> {
        self.observe_inner(false).await
    }

    /// `observe` for the agent, which never reads the key Secret (`dssm-keys-secret`: the
    /// shared key of dSSM and every TMM), and whose own ServiceAccount may not read the CA key
    /// Secret: a 403 on that one Secret leaves the CA key Secret out (`ca_key_secret_readable: false`) instead
    /// of failing. Each copy's `keys` is `Missing` here and means "not read": the key match is
    /// judged from the certificate Secret's `key-spki-sha256` annotation.
    pub async fn observe_for_agent(&self) -> Result<Observation, ClusterError> {
        self.observe_inner(true).await
    }

    async fn observe_inner(&self, agent: bool) -> Result<Observation, ClusterError> {
        let ca_key_may_be_forbidden = agent;
        let mut raw = BTreeMap::new();
        let mut copies = Vec::new();
        for ns in self.namespaces() {
            let certs = self.get_secret(&ns, contract::CERTS_SECRET).await?;
            let keys = if agent {
                None
            } else {
                self.get_secret(&ns, contract::KEYS_SECRET).await?
            };
            copies.push(CopyObs {
                namespace: ns.clone(),
                certs: secret_obs(certs.as_ref()),
                keys: secret_obs(keys.as_ref()),
            });
            for (name, s) in [
                (contract::CERTS_SECRET, certs),
                (contract::KEYS_SECRET, keys),
            ] {
                if let Some(s) = s {
                    raw.insert((ns.clone(), name.to_string()), s);
                }
            }
        }
        let (ca_key_secret, ca_key_secret_readable) = match self
            .get_secret(&self.dssm_ns, contract::CA_KEY_SECRET)
            .await
        {
            Err(ClusterError::Forbidden { .. }) if ca_key_may_be_forbidden => (None, false),
            r => (r?, true),
        };
        let ca_key_secret_obs = secret_obs(ca_key_secret.as_ref());
        if let Some(s) = ca_key_secret {
            raw.insert(
                (self.dssm_ns.clone(), contract::CA_KEY_SECRET.to_string()),
                s,
            );
        }
        let mut workloads = Vec::new();
        for t in &self.targets {
            workloads.push((t.clone(), self.get_workload(t).await?));
        }
        Ok(Observation {
            copies,
            ca_key_secret: ca_key_secret_obs,
            raw,
            workloads,
            ca_key_secret_readable,
        })
    }
}
