//! Where a CA rotation stands: its three phases, the record kept on the CA key Secret, and the
//! materials saved for every phase. Pure: the driver (`reconcile::rotation`) does the writing
//! and the restarts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::contract;
use crate::materials::{annotations, ca_key_secret_keys, saved_keys, Bundle, SecretObs};
use crate::pki::SecretBytes;

/// The phase a rotation is in, as the copies of the certs Secret announce it: the furthest any
/// copy announces (in switch, the TMM copies are written before dSSM's). `dssm_ns`'s copy
/// decides whether a rotation runs at all.
pub fn phase_on_copies(
    obs: &crate::model::observation::Observation,
    dssm_ns: &str,
) -> Option<Phase> {
    let announced = |c: &crate::materials::CopyObs| match &c.certs {
        SecretObs::Present { annotations, .. } => Phase::ALL.into_iter().find(|p| {
            annotations
                .get(annotations::ROTATION_PHASE)
                .map(String::as_str)
                == Some(p.name())
        }),
        SecretObs::Missing => None,
    };
    let dssm = obs.copies.iter().find(|c| c.namespace == dssm_ns)?;
    let dssm_phase = announced(dssm)?;
    obs.copies
        .iter()
        .filter_map(announced)
        .max()
        .map(|p| p.max(dssm_phase))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Trust,
    Switch,
    Drop,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Trust, Phase::Switch, Phase::Drop];

    pub fn next(self) -> Option<Phase> {
        match self {
            Phase::Trust => Some(Phase::Switch),
            Phase::Switch => Some(Phase::Drop),
            Phase::Drop => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Trust => "trust",
            Phase::Switch => "switch",
            Phase::Drop => "drop",
        }
    }

    /// 1, 2, 3: the value of the `dssm_rotation_phase` metric (0 when no rotation runs).
    pub fn number(self) -> i64 {
        self as i64 + 1
    }

    pub fn describe(self) -> &'static str {
        match self {
            Phase::Trust => "dssm-ca.crt = old CA + new CA, leaf unchanged",
            Phase::Switch => "new leaf signed by the new CA, both CAs trusted",
            Phase::Drop => "dssm-ca.crt = new CA only",
        }
    }
}

/// What rotates (one kind today; a record names it so that others can join).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Ca,
}

/// Where a rotation stands, persisted on the CA key Secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub kind: Kind,
    pub phase: Phase,
    /// The revision the copies carry during the whole rotation.
    pub revision: u64,
    /// Workloads ("namespace/kind/name") already rolled through `phase`, so a resumed run
    /// need not roll them again.
    #[serde(default)]
    pub rolled: Vec<String>,
}

impl Record {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a record serializes")
    }

    pub fn parse(s: &str) -> Result<Record, RecordError> {
        serde_json::from_str(s).map_err(|source| RecordError::Unreadable { source })
    }
}

/// Why a recorded CA rotation cannot be resumed: its record or its saved materials.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("annotation {}: {source}", annotations::ROTATION)]
    Unreadable {
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{namespace}/{}: a CA rotation is recorded but the key {key} is missing",
        contract::CA_KEY_SECRET
    )]
    MissingKey { namespace: String, key: String },
}

/// The record on the CA key Secret, if a rotation runs.
pub fn record_of(ca_key_secret: &SecretObs) -> Option<Result<Record, RecordError>> {
    match ca_key_secret {
        SecretObs::Present { annotations, .. } => annotations
            .get(annotations::ROTATION)
            .map(|s| Record::parse(s)),
        SecretObs::Missing => None,
    }
}

/// The materials of both sides of a CA rotation, as saved in the CA key Secret.
pub struct Saved {
    pub old_ca: Vec<u8>,
    pub old_leaf: Vec<u8>,
    pub old_key: SecretBytes,
    pub new_ca: Vec<u8>,
    pub new_ca_key: SecretBytes,
    pub new_leaf: Vec<u8>,
    pub new_key: SecretBytes,
    pub dhparams: Vec<u8>,
}

impl std::fmt::Debug for Saved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Saved").finish_non_exhaustive()
    }
}

impl Saved {
    /// Reads them from the CA key Secret's data; names the missing key.
    pub fn read(data: &BTreeMap<String, Vec<u8>>, ns: &str) -> Result<Saved, RecordError> {
        let get = |k: &str| {
            data.get(k).cloned().ok_or_else(|| RecordError::MissingKey {
                namespace: ns.to_string(),
                key: k.to_string(),
            })
        };
        Ok(Saved {
            old_ca: get(saved_keys::PREVIOUS_CA_CERT)?,
            old_leaf: get(saved_keys::PREVIOUS_CERT)?,
            old_key: SecretBytes::new(get(saved_keys::PREVIOUS_KEY)?),
            new_ca: get(ca_key_secret_keys::CA_CERT)?,
            new_ca_key: SecretBytes::new(get(ca_key_secret_keys::CA_KEY)?),
            new_leaf: get(ca_key_secret_keys::PENDING_CERT)?,
            new_key: SecretBytes::new(get(ca_key_secret_keys::PENDING_KEY)?),
            dhparams: get(ca_key_secret_keys::PENDING_DH)?,
        })
    }

    /// Old CA first, then the new one.
    pub fn both_cas(&self) -> Vec<u8> {
        let mut b = self.old_ca.clone();
        if !b.ends_with(b"\n") {
            b.push(b'\n');
        }
        b.extend_from_slice(&self.new_ca);
        b
    }

    /// What every copy holds during `phase`.
    pub fn bundle(&self, phase: Phase) -> Bundle {
        let (ca_cert, leaf_cert, leaf_key) = match phase {
            Phase::Trust => (self.both_cas(), &self.old_leaf, &self.old_key),
            Phase::Switch => (self.both_cas(), &self.new_leaf, &self.new_key),
            Phase::Drop => (self.new_ca.clone(), &self.new_leaf, &self.new_key),
        };
        Bundle {
            ca_cert,
            leaf_cert: leaf_cert.clone(),
            leaf_key: SecretBytes::new(leaf_key.expose().to_vec()),
            dhparams: self.dhparams.clone(),
        }
    }
}
