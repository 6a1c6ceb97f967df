//! The one vocabulary of the materials: the five files, the two Secrets and their keys, where
//! each copy lives, what was observed of it, and the annotations dssm-certs writes. The names
//! themselves are the compatibility contract's (`contract`); this module says how they fit.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Serialize;

pub use crate::contract::{
    CA_CERT, CA_KEY, CA_KEY_SECRET, CERTS_SECRET, DH_PARAMS, KEYS_SECRET, LEAF_CERT, LEAF_KEY,
};
use crate::pki::SecretBytes;

/// The five files of the manual procedure, in the order reports list them.
pub const FILES: [&str; 5] = [CA_CERT, LEAF_CERT, LEAF_KEY, CA_KEY, DH_PARAMS];

/// The four keys TMM and dSSM mount, each with the Secret that holds it.
pub const MOUNTED: [(&str, &str); 4] = [
    (CERTS_SECRET, CA_CERT),
    (CERTS_SECRET, LEAF_CERT),
    (KEYS_SECRET, LEAF_KEY),
    (CERTS_SECRET, DH_PARAMS),
];

/// The Secret that holds `file` in a namespace's copy (the CA key lives in the CA key Secret).
pub fn secret_of(file: &str) -> &'static str {
    match file {
        LEAF_KEY => KEYS_SECRET,
        CA_KEY => CA_KEY_SECRET,
        _ => CERTS_SECRET,
    }
}

/// Keys of the CA key Secret (dSSM namespace only, never mounted by pods).
pub mod ca_key_secret_keys {
    pub const CA_CERT: &str = crate::contract::CA_CERT;
    pub const CA_KEY: &str = crate::contract::CA_KEY;
    pub const PENDING_CERT: &str = "pending-dssm-cert.crt";
    pub const PENDING_KEY: &str = "pending-dssm-key.key";
    pub const PENDING_DH: &str = "pending-dhparam2048.pem";
}

/// Saved in the CA key Secret while a CA rotation runs: the materials it replaces.
pub mod saved_keys {
    pub const PREVIOUS_CA_CERT: &str = "previous-dssm-ca.crt";
    pub const PREVIOUS_CERT: &str = "previous-dssm-cert.crt";
    pub const PREVIOUS_KEY: &str = "previous-dssm-key.key";
}

/// Annotations (and the label) dssm-certs writes.
pub mod annotations {
    pub const REVISION: &str = "dssm-certs.f5.com/revision";
    pub const STATE: &str = "dssm-certs.f5.com/state";
    pub const CA_SHA256: &str = "dssm-certs.f5.com/ca-sha256";
    pub const CERT_SHA256: &str = "dssm-certs.f5.com/cert-sha256";
    pub const NOT_AFTER: &str = "dssm-certs.f5.com/not-after";
    /// On the certificate Secret (`dssm-certs-secret`, every copy): the SHA-256 of the leaf
    /// key's SubjectPublicKeyInfo (DER, upper-case hex). The agent checks that the key matches
    /// the certificate against it, so that it never reads `dssm-keys-secret`.
    pub const KEY_SPKI_SHA256: &str = "dssm-certs.f5.com/key-spki-sha256";
    pub const RESTART_NEEDED: &str = "dssm-certs.f5.com/restart-needed";
    /// What every dssm-certs annotation starts with: a write keeps only these of the old ones.
    pub const PREFIX: &str = "dssm-certs.f5.com/";
    /// On the CA key Secret while new materials are pending: the plan's action that made them.
    pub const ACTION: &str = "dssm-certs.f5.com/action";
    /// Whether the write changed the CA: on the CA key Secret while new materials are pending,
    /// then on every TMM target until the restart is done.
    pub const CA_CHANGED: &str = "dssm-certs.f5.com/ca-changed";
    /// On a TMM target while a scale-to-zero restart stopped it: the count to come back to (a
    /// Deployment's replicas; a DaemonSet's desiredNumberScheduled, for the wait).
    pub const TMM_REPLICAS: &str = "dssm-certs.f5.com/tmm-replicas";
    /// On a TMM target once its part of the current restart is done, valued with the
    /// `restart-needed` revision it answered: a resumed restart skips it.
    pub const TMM_RESTARTED: &str = "dssm-certs.f5.com/tmm-restarted";
    /// On a TMM target while the tool rolls it: `TOKEN@TIME`, the restart's token and when the
    /// roll began. A resumed run finds it and waits for that roll (its pods are the ones newer
    /// than TIME) instead of starting another.
    pub const TMM_ROLL: &str = "dssm-certs.f5.com/tmm-roll";
    /// A DaemonSet cannot be scaled. It is stopped as operators do it: a pod-template
    /// nodeSelector that no node carries, so the DaemonSet controller deletes every daemon pod
    /// and schedules none. Only this key is added, and restoring removes only it: the
    /// operator's own nodeSelector is never touched.
    pub const STOP_NODE_SELECTOR: &str = "dssm-certs.f5.com/stopped";
    /// On the CA key Secret while a CA rotation runs: its record as JSON (`rotation::Record`).
    pub const ROTATION: &str = "dssm-certs.f5.com/rotation";
    /// On every copy of the Secrets while a CA rotation runs: its phase, for readers that may
    /// not read the CA key Secret (`check`, the agent's metric).
    pub const ROTATION_PHASE: &str = "dssm-certs.f5.com/rotation-phase";
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    pub const MANAGER: &str = "dssm-certs";
}

/// The value of `annotations::KEY_SPKI_SHA256` for a SubjectPublicKeyInfo (DER).
pub fn spki_sha256(spki_der: &[u8]) -> String {
    crate::pki::inspect::hex_upper(&openssl::sha::sha256(spki_der), "")
}

/// Where one file of the materials is: the object a finding names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Place {
    /// A file of a `--dir` copy.
    File { path: String },
    /// A key of a Secret.
    Secret {
        namespace: String,
        secret: &'static str,
        key: &'static str,
    },
    /// Several copies at once (drift).
    Copies { copies: Vec<String> },
}

impl Place {
    pub fn secret(namespace: &str, file: &'static str) -> Self {
        Place::Secret {
            namespace: namespace.to_string(),
            secret: secret_of(file),
            key: file,
        }
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::File { path } => f.write_str(path),
            Place::Secret {
                namespace,
                secret,
                key,
            } => write!(f, "{namespace}/{secret}[{key}]"),
            Place::Copies { copies } => f.write_str(&copies.join(" and ")),
        }
    }
}

/// Who manages a Secret, from its `app.kubernetes.io/managed-by` label and ownerReferences.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Owner {
    /// Labelled by us.
    Us,
    /// Made by hand (the manual procedure): we may adopt and later replace it.
    Nobody,
    /// Another manager (Helm, cert-manager, an owner reference): we never write it.
    Other(String),
}

/// One observed Secret.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretObs {
    Missing,
    Present {
        data: BTreeMap<String, Vec<u8>>,
        owner: Owner,
        annotations: BTreeMap<String, String>,
    },
}

impl fmt::Debug for SecretObs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretObs::Missing => f.write_str("Missing"),
            SecretObs::Present { data, owner, .. } => f
                .debug_struct("Present")
                .field("keys", &data.keys().collect::<Vec<_>>())
                .field("owner", owner)
                .finish(),
        }
    }
}

impl SecretObs {
    pub fn owner(&self) -> Option<&Owner> {
        match self {
            SecretObs::Missing => None,
            SecretObs::Present { owner, .. } => Some(owner),
        }
    }

    pub fn get(&self, key: &str) -> Option<&[u8]> {
        match self {
            SecretObs::Missing => None,
            SecretObs::Present { data, .. } => data.get(key).map(Vec::as_slice),
        }
    }
}

/// The two Secrets of one namespace.
#[derive(Debug, Clone)]
pub struct CopyObs {
    pub namespace: String,
    pub certs: SecretObs,
    pub keys: SecretObs,
}

impl CopyObs {
    /// This copy as the checks read it; `ca_key_secret` (the CA key Secret) adds the CA key.
    pub fn to_read_copy(&self, ca_key_secret: Option<&SecretObs>) -> ReadCopy {
        let ns = &self.namespace;
        let entry = |obs: &SecretObs, file: &'static str| Entry {
            file,
            place: Place::secret(ns, file),
            found: obs
                .get(file)
                .map_or(Found::Missing, |b| Found::Bytes(b.to_vec())),
        };
        let mut entries: Vec<Entry> = MOUNTED
            .iter()
            .map(|(secret, file)| {
                entry(
                    if *secret == KEYS_SECRET {
                        &self.keys
                    } else {
                        &self.certs
                    },
                    file,
                )
            })
            .collect();
        if let Some(ca_key_secret) = ca_key_secret {
            entries.push(entry(ca_key_secret, ca_key_secret_keys::CA_KEY));
        }
        ReadCopy {
            label: format!("namespace/{ns}"),
            entries,
        }
    }
}

/// The materials TMM and dSSM mount: what every copy must hold, byte for byte. `ca_cert` is the
/// whole CA bundle (one CA, or old + new during a CA rotation).
#[derive(Clone, PartialEq, Eq)]
pub struct Bundle {
    pub ca_cert: Vec<u8>,
    pub leaf_cert: Vec<u8>,
    /// Wiped when dropped.
    pub leaf_key: SecretBytes,
    pub dhparams: Vec<u8>,
}

impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bundle").finish_non_exhaustive()
    }
}

impl Bundle {
    /// The bundle as one namespace's copy holds it, for the checks.
    pub fn to_read_copy(&self, namespace: &str) -> ReadCopy {
        let entries = MOUNTED
            .iter()
            .map(|(_, file)| {
                let bytes = match *file {
                    CA_CERT => &self.ca_cert[..],
                    LEAF_CERT => &self.leaf_cert[..],
                    LEAF_KEY => self.leaf_key.expose(),
                    _ => &self.dhparams[..],
                };
                Entry {
                    file,
                    place: Place::secret(namespace, file),
                    found: Found::Bytes(bytes.to_vec()),
                }
            })
            .collect();
        ReadCopy {
            label: format!("namespace/{namespace}"),
            entries,
        }
    }
}

/// What was found under one name: bytes, nothing, or an error reading it.
#[derive(Clone)]
pub enum Found {
    Missing,
    Unreadable(String),
    Bytes(Vec<u8>),
}

impl fmt::Debug for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Missing => f.write_str("Missing"),
            Found::Unreadable(e) => write!(f, "Unreadable({e})"),
            // may be a private key
            Found::Bytes(b) => write!(f, "Bytes([{} bytes])", b.len()),
        }
    }
}

/// Wiped when dropped: the bytes may be a private key.
impl Drop for Found {
    fn drop(&mut self) {
        if let Found::Bytes(b) = self {
            zeroize::Zeroize::zeroize(b);
        }
    }
}

/// One file of a copy, as read.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The contract's file name (the Secret key in a cluster).
    pub file: &'static str,
    pub place: Place,
    pub found: Found,
}

/// One copy of the materials as read: a folder, or one namespace's Secrets. What the checks
/// judge.
#[derive(Debug, Clone)]
pub struct ReadCopy {
    /// e.g. `dir:/path` or `namespace/spk-ingress`
    pub label: String,
    pub entries: Vec<Entry>,
}

impl ReadCopy {
    pub fn get(&self, file: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.file == file)
    }

    /// The bytes of `file`, when read.
    pub fn bytes(&self, file: &str) -> Option<&[u8]> {
        match self.get(file) {
            Some(Entry {
                found: Found::Bytes(b),
                ..
            }) => Some(b),
            _ => None,
        }
    }
}

/// Reads the five files of the manual procedure from `dir`.
pub fn read_dir(dir: &Path) -> ReadCopy {
    let entries = FILES
        .into_iter()
        .map(|file| {
            let path = dir.join(file);
            let found = match crate::limits::read_bounded(&path) {
                Ok(b) => Found::Bytes(b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Found::Missing,
                Err(e) => Found::Unreadable(e.to_string()),
            };
            Entry {
                file,
                place: Place::File {
                    path: path.display().to_string(),
                },
                found,
            }
        })
        .collect();
    ReadCopy {
        label: format!("dir:{}", dir.display()),
        entries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_has_one_secret_and_places_read_like_kubectl_paths() {
        assert_eq!(secret_of(LEAF_KEY), KEYS_SECRET);
        assert_eq!(secret_of(CA_KEY), CA_KEY_SECRET);
        for f in [CA_CERT, LEAF_CERT, DH_PARAMS] {
            assert_eq!(secret_of(f), CERTS_SECRET);
        }
        assert_eq!(
            Place::secret("spk-ingress", LEAF_KEY).to_string(),
            "spk-ingress/dssm-keys-secret[dssm-key.key]"
        );
        assert_eq!(ca_key_secret_keys::CA_KEY, CA_KEY);
    }

    #[test]
    fn found_bytes_never_show_in_debug() {
        let f = Found::Bytes(b"-----BEGIN PRIVATE KEY-----secret".to_vec());
        assert!(!format!("{f:?}").contains("PRIVATE"));
        let obs = SecretObs::Present {
            data: BTreeMap::from([(LEAF_KEY.to_string(), b"PRIVATE".to_vec())]),
            owner: Owner::Us,
            annotations: BTreeMap::new(),
        };
        assert!(!format!("{obs:?}").contains("PRIVATE\""));
        let b = Bundle {
            ca_cert: vec![],
            leaf_cert: vec![],
            leaf_key: SecretBytes::new(b"PRIVATE".to_vec()),
            dhparams: vec![],
        };
        assert!(!format!("{:?}", b.to_read_copy("ns")).contains("PRIVATE"));
    }
}
