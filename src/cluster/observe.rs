//! One observation: every copy of the Secrets, the CA key Secret and every TMM workload, read
//! in one pass, with the raw Secrets kept for writing back (and wiped when it goes).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;

use super::secrets::secret_obs;
use super::{Cluster, ClusterError};
use crate::contract;
use crate::materials::{annotations, CopyObs, SecretObs};

/// What one observation found, with the raw Secrets for writing back.
#[derive(Clone)]
pub struct Observation {
    /// dSSM namespace first, then TMM's when it differs.
    pub copies: Vec<CopyObs>,
    pub store: SecretObs,
    pub raw: BTreeMap<(String, String), Secret>,
    /// Every TMM target and its workload (None: not found).
    pub workloads: Vec<(crate::targets::TmmTarget, Option<crate::targets::Workload>)>,
    /// False when the CA key Secret could not be read (403, the agent's read-only account):
    /// `store` is then `Missing` and means "not available", not "absent".
    pub store_readable: bool,
}

impl Observation {
    /// Some TMM target says new materials wait for a restart, or holds a restart record.
    pub fn restart_pending(&self) -> bool {
        self.workloads.iter().any(|(_, w)| {
            w.as_ref().is_some_and(|w| {
                w.recorded().is_some() || w.annotations().contains_key(annotations::RESTART_NEEDED)
            })
        })
    }

    /// Some TMM target holds a restart record (it is stopped, or being stopped).
    pub fn restart_recorded(&self) -> bool {
        self.workloads
            .iter()
            .any(|(_, w)| w.as_ref().is_some_and(|w| w.recorded().is_some()))
    }

    /// The first TMM target that does not exist.
    pub fn missing_target(&self) -> Option<&crate::targets::TmmTarget> {
        self.workloads
            .iter()
            .find(|(_, w)| w.is_none())
            .map(|(t, _)| t)
    }
}

/// The raw Secrets hold private keys: `Debug` names them and their keys, never their data.
/// What was read holds the leaf key (and the CA key): wiped when the observation goes.
impl Drop for Observation {
    fn drop(&mut self) {
        self.wipe();
    }
}

impl Observation {
    /// Overwrites every Secret value read with zeros (`zeroize`: not optimised away).
    fn wipe(&mut self) {
        use zeroize::Zeroize;
        for secret in self.raw.values_mut() {
            for value in secret.data.iter_mut().flat_map(|d| d.values_mut()) {
                value.0.zeroize();
            }
        }
        let copies = self
            .copies
            .iter_mut()
            .flat_map(|c| [&mut c.certs, &mut c.keys]);
        for obs in copies.chain([&mut self.store]) {
            if let SecretObs::Present { data, .. } = obs {
                data.values_mut().for_each(Zeroize::zeroize);
            }
        }
    }
}

impl std::fmt::Debug for Observation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let raw: Vec<String> = self
            .raw
            .iter()
            .map(|((ns, name), s)| {
                let keys: Vec<&String> = s.data.iter().flat_map(|d| d.keys()).collect();
                format!("{ns}/{name} {keys:?}")
            })
            .collect();
        f.debug_struct("Observation")
            .field("copies", &self.copies)
            .field("store", &self.store)
            .field("raw", &raw)
            .field(
                "workloads",
                &self
                    .workloads
                    .iter()
                    .map(|(t, w)| (t.to_string(), w.is_some()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Cluster {
    /// Reads every Secret of every copy, the CA key Secret and every TMM workload: 2 reads per
    /// namespace, 1 per target, plus 1.
    pub async fn observe(&self) -> Result<Observation, ClusterError> {
        self.observe_inner(false).await
    }

    /// `observe` for the agent, which never reads the key Secret (`dssm-keys-secret`: the
    /// shared key of dSSM and every TMM), and whose own ServiceAccount may not read the CA key
    /// Secret: a 403 on that one Secret leaves the store out (`store_readable: false`) instead
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
        let (store, store_readable) = match self
            .get_secret(&self.dssm_ns, contract::CA_KEY_SECRET)
            .await
        {
            Err(ClusterError::Forbidden { .. }) if ca_key_may_be_forbidden => (None, false),
            r => (r?, true),
        };
        let store_obs = secret_obs(store.as_ref());
        if let Some(s) = store {
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
            store: store_obs,
            raw,
            workloads,
            store_readable,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    #[test]
    fn debug_of_an_observation_never_shows_secret_data() {
        let key = b"-----BEGIN PRIVATE KEY-----\nTOPSECRETKEYBYTES\n".to_vec();
        let mut secret = Secret::default();
        secret.metadata.name = Some(contract::KEYS_SECRET.into());
        secret.data = Some(
            [(contract::LEAF_KEY.to_string(), ByteString(key.clone()))]
                .into_iter()
                .collect(),
        );
        let obs = Observation {
            copies: vec![CopyObs {
                namespace: "spk-utilities".into(),
                certs: SecretObs::Missing,
                keys: secret_obs(Some(&secret)),
            }],
            store: SecretObs::Missing,
            raw: [(
                (
                    "spk-utilities".to_string(),
                    contract::KEYS_SECRET.to_string(),
                ),
                secret,
            )]
            .into_iter()
            .collect(),
            workloads: Vec::new(),
            store_readable: true,
        };
        let shown = format!("{obs:?}");
        let as_numbers = format!("{:?}", &key[..8]);
        let as_numbers = as_numbers.trim_matches(['[', ']']);
        assert!(!shown.contains("TOPSECRET"), "{shown}");
        assert!(!shown.contains(as_numbers), "{shown}");
        assert!(
            shown.contains(contract::LEAF_KEY),
            "the key name is shown: {shown}"
        );

        // Dropping an observation wipes what it read (the drop runs `wipe`).
        let mut obs = obs;
        obs.wipe();
        let raw = obs.raw.values().next().unwrap().data.as_ref().unwrap();
        assert!(raw[contract::LEAF_KEY].0.iter().all(|b| *b == 0));
        let SecretObs::Present { data, .. } = &obs.copies[0].keys else {
            panic!("present")
        };
        assert!(data[contract::LEAF_KEY].iter().all(|b| *b == 0));
    }
}
