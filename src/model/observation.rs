//! One observation: every copy of the Secrets, the CA key Secret and every TMM workload, read
//! in one pass by `cluster::observe`, with the Secrets as read kept for writing back (their
//! resourceVersion makes the write conditional) and wiped when it goes. Each Secret is decoded
//! here, once (`secret_obs`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;

use crate::materials::{annotations, CopyObs, Owner, SecretObs};

/// What one observation found, with the raw Secrets for writing back.
#[derive(Clone)]
pub struct Observation {
    /// dSSM namespace first, then TMM's when it differs.
    pub copies: Vec<CopyObs>,
    pub ca_key_secret: SecretObs,
    pub raw: BTreeMap<(String, String), Secret>,
    /// Every TMM target and its workload (None: not found).
    pub workloads: Vec<(
        crate::model::targets::TmmTarget,
        Option<crate::model::targets::Workload>,
    )>,
    /// False when the CA key Secret could not be read (403, the agent's read-only account):
    /// `ca_key_secret` is then `Missing` and means "not available", not "absent".
    pub ca_key_secret_readable: bool,
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
    pub fn missing_target(&self) -> Option<&crate::model::targets::TmmTarget> {
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
        for obs in copies.chain([&mut self.ca_key_secret]) {
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
            .field("ca_key_secret", &self.ca_key_secret)
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

pub fn owner_of(s: &Secret) -> Owner {
    let labels = s.labels();
    match labels.get(annotations::MANAGED_BY).map(String::as_str) {
        Some(annotations::MANAGER) => Owner::Us,
        Some(other) => Owner::Other(format!(
            "{other} (label {}={other})",
            annotations::MANAGED_BY
        )),
        None => match s.owner_references().first() {
            Some(o) => Owner::Other(format!("{} {} (owner reference)", o.kind, o.name)),
            None => Owner::Nobody,
        },
    }
}

pub fn secret_obs(s: Option<&Secret>) -> SecretObs {
    match s {
        None => SecretObs::Missing,
        Some(s) => SecretObs::Present {
            data: s
                .data
                .as_ref()
                .map(|d| d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
                .unwrap_or_default(),
            owner: owner_of(s),
            annotations: s.annotations().clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract;
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
            ca_key_secret: SecretObs::Missing,
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
            ca_key_secret_readable: true,
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
