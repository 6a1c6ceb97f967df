//! Writes as data: from the observation, the plan and the materials to publish, the ordered list
//! of writes of one pass (the write order of docs/design.md: new materials saved first with the CA key, marked pending;
//! then the dSSM namespace's copies, then each TMM namespace's; then the restart marks on the TMM
//! targets; then the CA key Secret marked complete). Pure: dry-run prints this list and the
//! executor (`reconcile`) performs it, in order, stopping at the first failure.

use std::collections::BTreeMap;
use std::fmt;

use crate::contract;
use crate::materials::{annotations, ca_key_secret_keys, Bundle, SecretObs};
use crate::model::observation::{secret_obs, Observation};
use crate::model::rotation::{self, Phase};
use crate::model::targets::TmmTarget;
use crate::pki::{self, SecretBytes};
use crate::plan::{Action, CaKeySecretState, Plan};

/// Where copies live and what is restarted.
#[derive(Debug, Clone)]
pub struct Destinations {
    pub dssm_ns: String,
    /// dSSM's first, then every TMM namespace that differs, each once.
    pub namespaces: Vec<String>,
    pub targets: Vec<TmmTarget>,
}

/// What the writes publish.
#[derive(Clone, Copy)]
pub enum ToPublish<'a> {
    /// The bundle to publish, with the new CA key when it is new material (saved first).
    Bundle {
        bundle: &'a Bundle,
        ca_key: Option<&'a SecretBytes>,
    },
    /// Dry run of new materials, not issued yet (issuing is slow and random): `reused_ca` is the
    /// CA certificate they will be issued under, when the stored CA is reused.
    ToBeIssued { reused_ca: Option<&'a [u8]> },
}

impl ToPublish<'_> {
    pub fn bundle(&self) -> Option<&Bundle> {
        match self {
            ToPublish::Bundle { bundle, .. } => Some(bundle),
            ToPublish::ToBeIssued { .. } => None,
        }
    }

    /// The CA certificate published, when known (a new CA is not).
    fn ca_cert(&self) -> Option<&[u8]> {
        match self {
            ToPublish::Bundle { bundle, .. } => Some(&bundle.ca_cert),
            ToPublish::ToBeIssued { reused_ca } => *reused_ca,
        }
    }
}

/// The resourceVersion a replace relies on (409 Conflict when someone wrote in between).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// The Secret does not exist (409 AlreadyExists when someone created it).
    Create,
    /// The Secret as observed.
    Replace { resource_version: String },
    /// The Secret as the write at this index of the list left it.
    ReplaceWritten { index: usize },
}

/// Secret data, by key. Holds private keys: `Debug` shows key names only, and the values are
/// wiped when the write goes.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretData(pub BTreeMap<String, Vec<u8>>);

impl fmt::Debug for SecretData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl Drop for SecretData {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.0.values_mut().for_each(Zeroize::zeroize);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretWrite {
    pub namespace: String,
    pub name: &'static str,
    pub precondition: Precondition,
    /// None only in a dry run of new materials (not issued yet): never performed.
    pub data: Option<SecretData>,
    /// Our annotations it sets (revision, state, fingerprints, notAfter, phase, rotation record).
    pub annotations: BTreeMap<String, String>,
    /// What changes, for people: never key material.
    pub summary: String,
}

/// A TMM target told that new materials wait for a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub target: TmmTarget,
    pub revision: u64,
    /// Some copy held another CA: old and new pods cannot talk (no rolling restart).
    pub ca_changed: bool,
}

impl Mark {
    /// The annotations the mark sets on the workload.
    pub fn changes(&self) -> Vec<(&'static str, Option<String>)> {
        let mut v = vec![(annotations::RESTART_NEEDED, Some(self.revision.to_string()))];
        if self.ca_changed {
            v.push((annotations::CA_CHANGED, Some("true".into())));
        }
        v
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Secret(SecretWrite),
    Mark(Mark),
}

impl Write {
    /// One line naming the object and what changes; dry-run prints it after "would write" /
    /// "would mark", the executor after "wrote" / "marked".
    pub fn line(&self) -> String {
        match self {
            Write::Secret(s) => {
                let how = match &s.precondition {
                    Precondition::Create => "create".to_string(),
                    Precondition::Replace { resource_version } => {
                        format!("replace resourceVersion {resource_version}")
                    }
                    Precondition::ReplaceWritten { index } => {
                        format!("replace what write {} left", index + 1)
                    }
                };
                format!("secret {}/{}: {how}, {}", s.namespace, s.name, s.summary)
            }
            Write::Mark(m) => {
                let changes: Vec<String> = m
                    .changes()
                    .into_iter()
                    .map(|(k, v)| format!("{k}={}", v.unwrap_or_default()))
                    .collect();
                format!("{}: {}", m.target, changes.join(", "))
            }
        }
    }

    /// ("write", "wrote") or ("mark", "marked").
    pub fn verbs(&self) -> (&'static str, &'static str) {
        match self {
            Write::Secret(_) => ("write", "wrote"),
            Write::Mark(_) => ("mark", "marked"),
        }
    }
}

/// On the CA key Secret while a rotation is pending: whether it changes the CA.
pub const PENDING_CA_CHANGED: &str = annotations::CA_CHANGED;
/// On the CA key Secret while a rotation is pending: the action that made it.
pub const PENDING_ACTION: &str = annotations::ACTION;

/// What one pass publishes, where, and what it relies on besides the plan.
pub struct Publication<'a> {
    pub destinations: &'a Destinations,
    pub obs: &'a Observation,
    pub plan: &'a Plan,
    pub revision: u64,
    pub content: ToPublish<'a>,
    /// A rolling CA rotation starts from this deployed bundle: only the CA key Secret is written, with
    /// the rotation record (`rotation::drive` writes the copies phase by phase).
    pub phased_from: Option<&'a Bundle>,
}

/// The ordered writes of one pass (the write order of docs/design.md): a crash between any two is finished by the next
/// run from what the first one saved.
pub fn writes(i: &Publication) -> Vec<Write> {
    let mut list = Vec::new();
    let new_materials = i.plan.action.needs_new_materials();
    // 1. New materials are saved first, marked pending, with the CA key.
    if new_materials {
        list.push(Write::Secret(save_pending(i)));
        if i.phased_from.is_some() {
            return list;
        }
    }
    // 2. The dSSM copies, then 3. the TMM copies.
    let copies = copies(i.destinations, i.obs, i.content.bundle(), i.revision, None);
    let in_ns = |ns: &str| copies.iter().any(|c| c.namespace == ns);
    // 4. TMM and dSSM must restart to use new files: all targets when new materials were made,
    // a rotation resumed or the dSSM copies changed (dSSM restarts, and every TMM must follow);
    // else only those whose namespace got a copy. A resumed rotation marks even when every copy
    // was already written: the run that wrote them may have died before marking.
    let all = i.plan.action != Action::Repair || in_ns(&i.destinations.dssm_ns);
    let marked: Vec<TmmTarget> = if new_materials || !copies.is_empty() || resumes(i.plan) {
        (i.destinations.targets.iter())
            .filter(|t| all || in_ns(&t.namespace))
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let ca_changed = ca_changed(i);
    list.extend(copies.into_iter().map(Write::Secret));
    list.extend(marked.into_iter().map(|target| {
        Write::Mark(Mark {
            target,
            revision: i.revision,
            ca_changed,
        })
    }));
    // 5. The rotation is complete: the CA key Secret keeps the CA, the pending copy goes.
    if let Some(w) = complete(i, new_materials.then_some(0)) {
        list.push(Write::Secret(w));
    }
    list
}

fn resumes(plan: &Plan) -> bool {
    plan.action == Action::Resume
}

/// The revision the writes carry: a resumed rotation keeps its own, else one past the highest
/// found on the dSSM namespace's copy or the CA key Secret. The TMM namespaces' copies are not
/// read: whoever writes there must not choose the revision (`u64::MAX` would wrap).
pub fn revision(
    obs: &Observation,
    plan: &Plan,
    ca_key_secret: &CaKeySecretState,
) -> Result<u64, RevisionExhausted> {
    match (&plan.action, ca_key_secret) {
        (Action::Resume, CaKeySecretState::Valid { revision, .. }) => Ok(*revision),
        _ => highest_revision(obs)
            .checked_add(1)
            .ok_or(RevisionExhausted),
    }
}

/// The revision annotation found is already `u64::MAX`: there is no next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the revision annotation {} is {}, the largest possible: no next revision. Remove that \
     annotation from the dSSM namespace's Secrets and run again",
    annotations::REVISION,
    u64::MAX
)]
pub struct RevisionExhausted;

fn highest_revision(obs: &Observation) -> u64 {
    let from = |s: &SecretObs| match s {
        SecretObs::Present { annotations: a, .. } => a
            .get(annotations::REVISION)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0),
        SecretObs::Missing => 0,
    };
    // The dSSM namespace's copy comes first.
    obs.copies
        .iter()
        .take(1)
        .flat_map(|c| [from(&c.certs), from(&c.keys)])
        .chain([from(&obs.ca_key_secret)])
        .max()
        .unwrap_or(0)
}

fn precondition(obs: &Observation, ns: &str, name: &str) -> Precondition {
    match obs.raw.get(&(ns.to_string(), name.to_string())) {
        Some(s) => Precondition::Replace {
            resource_version: s.metadata.resource_version.clone().unwrap_or_default(),
        },
        None => Precondition::Create,
    }
}

/// What the pending CA key Secret holds: the CA and its key, the new leaf, key and DH params,
/// and for a phased rotation the deployed CA, leaf and key it starts from. None without a key.
fn pending_data(i: &Publication) -> Option<SecretData> {
    match i.content {
        ToPublish::Bundle {
            bundle,
            ca_key: Some(key),
        } => {
            let mut d = BTreeMap::from([
                (
                    ca_key_secret_keys::CA_CERT.to_string(),
                    bundle.ca_cert.clone(),
                ),
                (
                    ca_key_secret_keys::CA_KEY.to_string(),
                    key.expose().to_vec(),
                ),
                (
                    ca_key_secret_keys::PENDING_CERT.into(),
                    bundle.leaf_cert.clone(),
                ),
                (
                    ca_key_secret_keys::PENDING_KEY.into(),
                    bundle.leaf_key.expose().to_vec(),
                ),
                (
                    ca_key_secret_keys::PENDING_DH.to_string(),
                    bundle.dhparams.clone(),
                ),
            ]);
            if let Some(old) = i.phased_from {
                use crate::materials::saved_keys;
                d.insert(saved_keys::PREVIOUS_CA_CERT.into(), old.ca_cert.clone());
                d.insert(saved_keys::PREVIOUS_CERT.into(), old.leaf_cert.clone());
                d.insert(
                    saved_keys::PREVIOUS_KEY.into(),
                    old.leaf_key.expose().to_vec(),
                );
            }
            Some(SecretData(d))
        }
        _ => None,
    }
}

/// The CA key Secret with the new materials, pending (and the rotation record when phased).
fn save_pending(i: &Publication) -> SecretWrite {
    let ns = &i.destinations.dssm_ns;
    let data = pending_data(i);
    let mut ann = BTreeMap::from([
        (annotations::REVISION.to_string(), i.revision.to_string()),
        (annotations::STATE.to_string(), "pending".to_string()),
        (
            PENDING_ACTION.to_string(),
            action_name(i.plan.action).to_string(),
        ),
        // Saved with the materials: a run that resumes after every copy was written can no
        // longer see the old CA in the copies, and must not forget that it changed.
        (
            PENDING_CA_CHANGED.to_string(),
            copies_hold_another_ca(i.obs, &i.content).to_string(),
        ),
    ]);
    let mut summary = format!(
        "revision {}, pending: the new materials with the CA key",
        i.revision
    );
    if i.phased_from.is_some() {
        let record = rotation::Record {
            kind: rotation::Kind::Ca,
            phase: Phase::Trust,
            revision: i.revision,
            rolled: Vec::new(),
        };
        ann.insert(annotations::ROTATION.to_string(), record.to_json());
        summary.push_str(
            ", and a CA rotation recorded in three phases (trust, switch, drop) from the deployed copy",
        );
    }
    SecretWrite {
        namespace: ns.clone(),
        name: contract::CA_KEY_SECRET,
        precondition: precondition(i.obs, ns, contract::CA_KEY_SECRET),
        data,
        annotations: ann,
        summary,
    }
}

/// The CA key Secret marked complete: it keeps the CA and its key. `written`: the index of the
/// write that saved the pending materials in this list (else a resumed rotation's, observed).
fn complete(i: &Publication, written: Option<usize>) -> Option<SecretWrite> {
    let ns = &i.destinations.dssm_ns;
    let (precondition, data) = match (written, i.content) {
        (Some(index), ToPublish::Bundle { bundle, ca_key }) => (
            Precondition::ReplaceWritten { index },
            ca_key.map(|key| {
                SecretData(BTreeMap::from([
                    (
                        ca_key_secret_keys::CA_CERT.to_string(),
                        bundle.ca_cert.clone(),
                    ),
                    (
                        ca_key_secret_keys::CA_KEY.to_string(),
                        key.expose().to_vec(),
                    ),
                ]))
            }),
        ),
        (Some(index), ToPublish::ToBeIssued { .. }) => {
            (Precondition::ReplaceWritten { index }, None)
        }
        (None, _) if resumes(i.plan) => {
            let ca_key_secret = i
                .obs
                .raw
                .get(&(ns.clone(), contract::CA_KEY_SECRET.to_string()))?;
            let d: BTreeMap<String, Vec<u8>> = (ca_key_secret.data.iter().flatten())
                .filter(|(k, _)| {
                    *k == ca_key_secret_keys::CA_CERT || *k == ca_key_secret_keys::CA_KEY
                })
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect();
            (
                precondition(i.obs, ns, contract::CA_KEY_SECRET),
                Some(SecretData(d)),
            )
        }
        (None, _) => return None,
    };
    Some(SecretWrite {
        namespace: ns.clone(),
        name: contract::CA_KEY_SECRET,
        precondition,
        data,
        annotations: BTreeMap::from([
            (annotations::REVISION.to_string(), i.revision.to_string()),
            (annotations::STATE.to_string(), "complete".to_string()),
        ]),
        summary: format!(
            "revision {}, complete: keeps the CA and its key, drops the pending copy",
            i.revision
        ),
    })
}

/// Did any copy hold another CA (a resumed rotation also reads what the interrupted run saved)?
fn ca_changed(i: &Publication) -> bool {
    let saved = resumes(i.plan)
        && matches!(&i.obs.ca_key_secret, SecretObs::Present { annotations: a, .. }
            if a.get(PENDING_CA_CHANGED).map(String::as_str) == Some("true"));
    copies_hold_another_ca(i.obs, &i.content) || saved
}

/// Whether rolling the new materials out pod by pod could break mTLS between a pod still on a
/// deployed copy and a pod already on the new one: a copy's CAs do not include the CA that issues
/// the new leaf, or the new CAs do not include the issuer of a copy's leaf. Byte differences
/// alone (a foreign CA dropped from a bundle, CRLF, another PEM encoding) change no trust between
/// old and new pods, so they are not a CA change. `new_cas` None: a new CA, not issued yet.
fn copies_hold_another_ca(obs: &Observation, content: &ToPublish) -> bool {
    let new_cas = content.ca_cert().and_then(certificates).unwrap_or_default();
    // The CAs that issue (or will issue) the new leaf: all of a reused bundle, conservatively.
    let leaf = content
        .bundle()
        .and_then(|b| pki::parse_certificate(&b.leaf_cert, contract::LEAF_CERT).ok());
    let issuers: Vec<&pki::Certificate> = match &leaf {
        Some(leaf) => new_cas.iter().filter(|ca| leaf.is_signed_by(ca)).collect(),
        None => new_cas.iter().collect(),
    };
    obs.raw.iter().any(|((_, name), s)| {
        let data = s.data.as_ref().filter(|_| name == contract::CERTS_SECRET);
        let old_cas = data
            .and_then(|d| d.get(contract::CA_CERT))
            .and_then(|c| certificates(&c.0));
        // A copy whose CA file cannot be read carries no trust a pod could lose.
        let Some(old_cas) = old_cas else {
            return false;
        };
        let trusts_new_leaf = !issuers.is_empty()
            && issuers
                .iter()
                .all(|i| old_cas.iter().any(|c| c.der() == i.der()));
        let old_leaf = data
            .and_then(|d| d.get(contract::LEAF_CERT))
            .and_then(|c| pki::parse_certificate(&c.0, contract::LEAF_CERT).ok());
        let new_trusts_old_leaf =
            old_leaf.is_none_or(|l| new_cas.iter().any(|ca| l.is_signed_by(ca)));
        !(trusts_new_leaf && new_trusts_old_leaf)
    })
}

/// The certificates of a PEM bundle, None when it cannot be read.
fn certificates(pem: &[u8]) -> Option<Vec<pki::Certificate>> {
    pki::inspect::parse_certificates(pem, contract::CA_CERT).ok()
}

/// Writes of `bundle` (None: not issued yet, so every copy changes) into the dSSM namespace's two
/// Secrets, then each TMM namespace's (the write order of docs/design.md). A copy that already holds the bundle,
/// managed by us, in the same rotation phase, is kept.
pub fn copies(
    destinations: &Destinations,
    obs: &Observation,
    bundle: Option<&Bundle>,
    revision: u64,
    phase: Option<Phase>,
) -> Vec<SecretWrite> {
    let mut ann = BTreeMap::from([(annotations::REVISION.to_string(), revision.to_string())]);
    if let Some(b) = bundle {
        ann.extend(fingerprints(b));
    }
    if let Some(p) = phase {
        ann.insert(
            annotations::ROTATION_PHASE.to_string(),
            p.name().to_string(),
        );
    }
    let certs = bundle.map(|b| {
        BTreeMap::from([
            (contract::CA_CERT.to_string(), b.ca_cert.clone()),
            (contract::LEAF_CERT.to_string(), b.leaf_cert.clone()),
            (contract::DH_PARAMS.to_string(), b.dhparams.clone()),
        ])
    });
    let keys = bundle
        .map(|b| BTreeMap::from([(contract::LEAF_KEY.to_string(), b.leaf_key.expose().to_vec())]));
    let mut list = Vec::new();
    for ns in &destinations.namespaces {
        for (name, data) in [
            (contract::CERTS_SECRET, &certs),
            (contract::KEYS_SECRET, &keys),
        ] {
            let existing = obs.raw.get(&(ns.clone(), name.to_string()));
            let same = match (existing, data) {
                (Some(s), Some(data)) => holds(s, data, phase),
                _ => false,
            };
            if same {
                continue;
            }
            let files = [contract::CA_CERT, contract::LEAF_CERT, contract::DH_PARAMS];
            let files = if name == contract::CERTS_SECRET {
                files.join(", ")
            } else {
                contract::LEAF_KEY.to_string()
            };
            let phase = phase.map(|p| format!(", phase {}", p.name()));
            let mut ann = ann.clone();
            if let (contract::CERTS_SECRET, Some(b)) = (name, bundle) {
                ann.extend(key_spki(b));
            }
            list.push(SecretWrite {
                namespace: ns.clone(),
                name,
                precondition: precondition(obs, ns, name),
                data: data.clone().map(SecretData),
                annotations: ann,
                summary: format!("revision {revision}, {files}{}", phase.unwrap_or_default()),
            });
        }
    }
    list
}

/// The fingerprints and notAfter a copy announces.
fn fingerprints(b: &Bundle) -> [(String, String); 3] {
    let sha256 = |x: &[u8]| pki::inspect::hex_upper(&openssl::sha::sha256(x), "");
    // A bundle that reaches the writes was validated; an unparseable leaf has no notAfter.
    let not_after = pki::parse_certificate(&b.leaf_cert, contract::LEAF_CERT)
        .map(|l| pki::format_time(l.not_after))
        .unwrap_or_default();
    [
        (annotations::CA_SHA256.to_string(), sha256(&b.ca_cert)),
        (annotations::CERT_SHA256.to_string(), sha256(&b.leaf_cert)),
        (annotations::NOT_AFTER.to_string(), not_after),
    ]
}

/// The certificate Secret's record of its key, so that readers who may not read the key
/// Secret (the agent) can still check the pair. A bundle that reaches the writes was validated;
/// an unreadable key gets no annotation (the agent then says it cannot check).
fn key_spki(b: &Bundle) -> Option<(String, String)> {
    let key = pki::PrivateKey::from_pem(b.leaf_key.expose(), contract::LEAF_KEY).ok()?;
    Some((
        annotations::KEY_SPKI_SHA256.to_string(),
        crate::materials::spki_sha256(&key.public_key_der()),
    ))
}

/// The Secret already holds exactly `data`, managed by us, in `phase`.
fn holds(
    s: &k8s_openapi::api::core::v1::Secret,
    data: &BTreeMap<String, Vec<u8>>,
    phase: Option<Phase>,
) -> bool {
    secret_obs(Some(s)) != SecretObs::Missing
        && s.data.as_ref().is_some_and(|d| {
            d.len() == data.len()
                && data
                    .iter()
                    .all(|(k, v)| d.get(k).is_some_and(|x| &x.0 == v))
        })
        && s.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(annotations::MANAGED_BY))
            .map(String::as_str)
            == Some(annotations::MANAGER)
        && s.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(annotations::ROTATION_PHASE))
            .map(String::as_str)
            == phase.map(Phase::name)
}

pub fn action_name(a: Action) -> &'static str {
    match a {
        Action::Nothing => "nothing",
        Action::Adopt => "adopt",
        Action::Publish => "publish",
        Action::Repair => "repair",
        Action::RenewLeaf => "renew-leaf",
        Action::RotateCa => "rotate-ca",
        Action::ReplaceInvalid => "replace-invalid",
        Action::Resume => "resume",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::materials::CopyObs;
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::ByteString;

    const DSSM: &str = "spk-utilities";

    /// A CA and a leaf under it, issued now; the CA's key.
    fn made() -> (Bundle, SecretBytes) {
        let m = crate::plan::tests::made(0, 3650, 365);
        (m.bundle, SecretBytes::new(m.ca_key))
    }

    /// A new leaf issued under `old`'s CA (with its key `ca_key`), as a leaf renewal makes it.
    fn leaf_under(old: &Bundle, ca_key: &SecretBytes) -> Bundle {
        use crate::pki::{issue_leaf, CaSigner, KeyAlgorithm, LeafRequest, PrivateKey, Subject};
        let ca_key = PrivateKey::from_pem(ca_key.expose(), "ca key").unwrap();
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let leaf = issue_leaf(
            &LeafRequest {
                subject: &Subject::parse("CN=Server").unwrap(),
                days: 365,
                dns_names: &[],
            },
            &key,
            &CaSigner {
                cert_pem: &old.ca_cert,
                key: &ca_key,
                cert_name: "ca",
                key_name: "ca key",
            },
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
        Bundle {
            ca_cert: old.ca_cert.clone(),
            leaf_cert: leaf.pem.into_bytes(),
            leaf_key: SecretBytes::new(key.to_pkcs8_pem()),
            dhparams: old.dhparams.clone(),
        }
    }

    /// The dSSM namespace and one `f5-tmm` Deployment per TMM namespace.
    fn destinations(tmm: &[&str]) -> Destinations {
        let mut namespaces = vec![DSSM.to_string()];
        namespaces.extend(tmm.iter().map(|t| t.to_string()));
        Destinations {
            dssm_ns: DSSM.into(),
            namespaces,
            targets: tmm
                .iter()
                .map(|ns| TmmTarget::deployment(ns, "f5-tmm"))
                .collect(),
        }
    }

    fn secret(
        ns: &str,
        name: &str,
        rv: u32,
        data: &[(&str, &[u8])],
        ann: &[(&str, &str)],
    ) -> Secret {
        let mut s = Secret::default();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some(ns.into());
        s.metadata.resource_version = Some(rv.to_string());
        s.metadata.labels = Some(BTreeMap::from([(
            annotations::MANAGED_BY.to_string(),
            annotations::MANAGER.to_string(),
        )]));
        s.metadata.annotations = Some(
            ann.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        s.data = Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                .collect(),
        );
        s
    }

    /// Both Secrets of a copy of `b` in `ns`, at revision 1.
    fn copy_of(ns: &str, b: &Bundle, rv: u32) -> [Secret; 2] {
        let ann = [(annotations::REVISION, "1")];
        [
            secret(
                ns,
                contract::CERTS_SECRET,
                rv,
                &[
                    (contract::CA_CERT, &b.ca_cert),
                    (contract::LEAF_CERT, &b.leaf_cert),
                    (contract::DH_PARAMS, &b.dhparams),
                ],
                &ann,
            ),
            secret(
                ns,
                contract::KEYS_SECRET,
                rv + 1,
                &[(contract::LEAF_KEY, b.leaf_key.expose())],
                &ann,
            ),
        ]
    }

    fn ca_key_secret_of(b: &Bundle, key: &SecretBytes, rv: u32, ann: &[(&str, &str)]) -> Secret {
        secret(
            DSSM,
            contract::CA_KEY_SECRET,
            rv,
            &[
                (ca_key_secret_keys::CA_CERT, &b.ca_cert),
                (ca_key_secret_keys::CA_KEY, key.expose()),
            ],
            ann,
        )
    }

    fn observe(p: &Destinations, secrets: Vec<Secret>) -> Observation {
        let raw: BTreeMap<(String, String), Secret> = secrets
            .into_iter()
            .map(|s| {
                let key = (
                    s.metadata.namespace.clone().unwrap(),
                    s.metadata.name.clone().unwrap(),
                );
                (key, s)
            })
            .collect();
        let get = |ns: &str, name: &str| secret_obs(raw.get(&(ns.to_string(), name.to_string())));
        Observation {
            copies: (p.namespaces.iter())
                .map(|ns| CopyObs {
                    namespace: ns.clone(),
                    certs: get(ns, contract::CERTS_SECRET),
                    keys: get(ns, contract::KEYS_SECRET),
                })
                .collect(),
            ca_key_secret: get(DSSM, contract::CA_KEY_SECRET),
            workloads: Vec::new(),
            ca_key_secret_readable: true,
            raw,
        }
    }

    fn plan_of(action: Action, source: Option<&Bundle>) -> Plan {
        Plan {
            action,
            reasons: Vec::new(),
            bundle_to_write: source.cloned(),
            repair_from: None,
            reuse_kept_ca: false,
            reusable_dhparams: None,
            out_of_sync: false,
            invalid: Vec::new(),
        }
    }

    /// The list, one short line per write: how, which object.
    fn shape(list: &[Write]) -> Vec<String> {
        list.iter()
            .map(|w| match w {
                Write::Secret(s) => {
                    let how = match &s.precondition {
                        Precondition::Create => "create".to_string(),
                        Precondition::Replace { resource_version } => {
                            format!("replace@{resource_version}")
                        }
                        Precondition::ReplaceWritten { index } => format!("replace@#{index}"),
                    };
                    let state = s.annotations.get(annotations::STATE);
                    let state = state.map(|s| format!(" {s}")).unwrap_or_default();
                    format!("{how} {}/{}{state}", s.namespace, s.name)
                }
                Write::Mark(m) => format!(
                    "mark {} r{}{}",
                    m.target,
                    m.revision,
                    if m.ca_changed { " ca-changed" } else { "" }
                ),
            })
            .collect()
    }

    fn run(
        p: &Destinations,
        obs: &Observation,
        plan: &Plan,
        content: ToPublish,
        from: Option<&Bundle>,
    ) -> Vec<Write> {
        let ca_key_secret = crate::plan::evaluate_ca_key_secret(
            &obs.ca_key_secret,
            DSSM,
            time::OffsetDateTime::now_utc().unix_timestamp(),
        );
        writes(&Publication {
            destinations: p,
            obs,
            plan,
            revision: revision(obs, plan, &ca_key_secret).unwrap(),
            content,
            phased_from: from,
        })
    }

    /// The writes of new materials `made`.
    fn with_new(
        p: &Destinations,
        obs: &Observation,
        plan: &Plan,
        made: (&Bundle, &SecretBytes),
        from: Option<&Bundle>,
    ) -> Vec<Write> {
        let content = ToPublish::Bundle {
            bundle: made.0,
            ca_key: Some(made.1),
        };
        run(p, obs, plan, content, from)
    }

    #[test]
    fn first_install_saves_the_ca_key_first_then_dssm_then_tmm_then_marks_then_completes() {
        let p = destinations(&["spk-ingress"]);
        let obs = observe(&p, Vec::new());
        let (b, key) = made();
        let plan = plan_of(Action::Publish, None);
        let list = with_new(&p, &obs, &plan, (&b, &key), None);
        assert_eq!(
            shape(&list),
            [
                "create spk-utilities/dssm-ca-key-secret pending",
                "create spk-utilities/dssm-certs-secret",
                "create spk-utilities/dssm-keys-secret",
                "create spk-ingress/dssm-certs-secret",
                "create spk-ingress/dssm-keys-secret",
                "mark deployment spk-ingress/f5-tmm r1",
                "replace@#0 spk-utilities/dssm-ca-key-secret complete",
            ]
        );
        let Write::Secret(copy) = &list[1] else {
            panic!()
        };
        let sha = pki::inspect::hex_upper(&openssl::sha::sha256(&b.leaf_cert), "");
        assert_eq!(copy.annotations[annotations::CERT_SHA256], sha);
        assert_eq!(copy.annotations[annotations::REVISION], "1");
        assert!(!copy.annotations[annotations::NOT_AFTER].is_empty());
        let Write::Secret(done) = &list[6] else {
            panic!()
        };
        let kept: Vec<&String> = done.data.as_ref().unwrap().0.keys().collect();
        assert_eq!(
            kept,
            [ca_key_secret_keys::CA_CERT, ca_key_secret_keys::CA_KEY]
        );

        // The dry run, before anything is issued, lists the same writes in the same words.
        let dry = run(
            &p,
            &obs,
            &plan,
            ToPublish::ToBeIssued { reused_ca: None },
            None,
        );
        let lines = |l: &[Write]| l.iter().map(Write::line).collect::<Vec<_>>();
        assert_eq!(lines(&dry), lines(&list));
        assert!(dry
            .iter()
            .all(|w| !matches!(w, Write::Secret(s) if s.data.is_some())));
    }

    #[test]
    fn every_certificate_secret_written_records_its_keys_spki_and_the_key_secret_does_not() {
        // The agent checks the key against this annotation instead of reading the key Secret.
        let p = destinations(&["spk-ingress"]);
        let obs = observe(&p, Vec::new());
        let (b, key) = made();
        let list = with_new(&p, &obs, &plan_of(Action::Publish, None), (&b, &key), None);
        let leaf = pki::parse_certificate(&b.leaf_cert, "leaf").unwrap();
        let want = crate::materials::spki_sha256(leaf.spki_der());
        let mut certs = 0;
        for w in &list {
            let Write::Secret(s) = w else { continue };
            let got = s.annotations.get(annotations::KEY_SPKI_SHA256);
            match s.name {
                contract::CERTS_SECRET => {
                    certs += 1;
                    assert_eq!(got, Some(&want), "{}", s.namespace);
                }
                _ => assert_eq!(got, None, "{}/{}", s.namespace, s.name),
            }
        }
        assert_eq!(certs, 2, "both copies of dssm-certs-secret");
    }

    #[test]
    fn leaf_renewal_replaces_each_secret_at_its_observed_version_in_order() {
        let p = destinations(&["spk-ingress"]);
        let (old, key) = made();
        let mut secrets = vec![ca_key_secret_of(
            &old,
            &key,
            10,
            &[(annotations::REVISION, "1")],
        )];
        secrets.extend(copy_of(DSSM, &old, 20));
        secrets.extend(copy_of("spk-ingress", &old, 30));
        let obs = observe(&p, secrets);
        let new = leaf_under(&old, &key);
        let plan = plan_of(Action::RenewLeaf, None);
        let list = with_new(&p, &obs, &plan, (&new, &key), None);
        assert_eq!(
            shape(&list),
            [
                "replace@10 spk-utilities/dssm-ca-key-secret pending",
                "replace@20 spk-utilities/dssm-certs-secret",
                "replace@21 spk-utilities/dssm-keys-secret",
                "replace@30 spk-ingress/dssm-certs-secret",
                "replace@31 spk-ingress/dssm-keys-secret",
                "mark deployment spk-ingress/f5-tmm r2",
                "replace@#0 spk-utilities/dssm-ca-key-secret complete",
            ]
        );
        // The same CA: pods with the old and the new leaf still trust each other.
        let Write::Secret(saved) = &list[0] else {
            panic!()
        };
        assert_eq!(saved.annotations[PENDING_CA_CHANGED], "false");
        // The dry run knows the reused CA, so it says the same.
        let reused = ToPublish::ToBeIssued {
            reused_ca: Some(&old.ca_cert),
        };
        let dry = run(&p, &obs, &plan, reused, None);
        assert_eq!(
            dry.iter().map(Write::line).collect::<Vec<_>>(),
            list.iter().map(Write::line).collect::<Vec<_>>()
        );
        assert_eq!(shape(&dry), shape(&list));
    }

    #[test]
    fn drift_repair_of_one_tmm_namespace_writes_and_marks_only_that_namespace() {
        let p = destinations(&["spk-a", "spk-b"]);
        let (good, key) = made();
        let (drifted, _) = made();
        let mut secrets = vec![ca_key_secret_of(
            &good,
            &key,
            10,
            &[(annotations::REVISION, "1")],
        )];
        secrets.extend(copy_of(DSSM, &good, 20));
        secrets.extend(copy_of("spk-a", &good, 30));
        secrets.extend(copy_of("spk-b", &drifted, 40));
        let obs = observe(&p, secrets);
        let plan = plan_of(Action::Repair, Some(&good));
        let content = ToPublish::Bundle {
            bundle: &good,
            ca_key: None,
        };
        let list = run(&p, &obs, &plan, content, None);
        assert_eq!(
            shape(&list),
            [
                "replace@40 spk-b/dssm-certs-secret",
                "replace@41 spk-b/dssm-keys-secret",
                "mark deployment spk-b/f5-tmm r2 ca-changed",
            ]
        );
    }

    /// A repair that drops a foreign CA appended to a copy's bundle, or only re-encodes it,
    /// changes no trust between old and new pods: it is no CA change, so the default rolling
    /// restart can roll it. Before, any byte difference was one, and the rolling restart refused
    /// after the writes, on every later run too. Copies of another CA, or a new CA, still are.
    #[test]
    fn only_a_change_of_trust_between_old_and_new_pods_is_a_ca_change() {
        let p = destinations(&["spk-a"]);
        let (good, key) = made();
        let (other, _) = made();
        let with_bundle = |ca: Vec<u8>| Bundle {
            ca_cert: ca,
            leaf_cert: good.leaf_cert.clone(),
            leaf_key: good.leaf_key.clone(),
            dhparams: good.dhparams.clone(),
        };
        let appended = with_bundle([good.ca_cert.clone(), other.ca_cert.clone()].concat());
        let crlf = with_bundle(
            String::from_utf8(good.ca_cert.clone())
                .unwrap()
                .replace('\n', "\r\n")
                .into_bytes(),
        );
        let judge = |tmm_copy: &Bundle, content: ToPublish| {
            let mut secrets = vec![ca_key_secret_of(
                &good,
                &key,
                10,
                &[(annotations::REVISION, "1")],
            )];
            secrets.extend(copy_of(DSSM, &good, 20));
            secrets.extend(copy_of("spk-a", tmm_copy, 30));
            copies_hold_another_ca(&observe(&p, secrets), &content)
        };
        let ours = || ToPublish::Bundle {
            bundle: &good,
            ca_key: None,
        };
        assert!(!judge(&good, ours()), "same materials");
        assert!(!judge(&appended, ours()), "a foreign CA appended, dropped");
        assert!(!judge(&crlf, ours()), "CRLF line ends");
        assert!(judge(&other, ours()), "a copy of another CA");
        let reused = ToPublish::ToBeIssued {
            reused_ca: Some(&good.ca_cert),
        };
        assert!(!judge(&appended, reused), "a renewal under the stored CA");
        let new_ca = ToPublish::ToBeIssued { reused_ca: None };
        assert!(judge(&good, new_ca), "a new CA, not issued yet");
    }

    /// The trust-boundary issue: the next revision was one past the highest on any Secret, TMM
    /// namespaces' included, so their writer chose it; `u64::MAX` there wrapped to 0 (release)
    /// or panicked (debug).
    #[test]
    fn the_revision_comes_from_the_dssm_copy_and_the_store_only_and_never_wraps() {
        let p = destinations(&["spk-a"]);
        let (good, key) = made();
        let with = |tmm_rev: &str, dssm_rev: &str| {
            let mut secrets = vec![ca_key_secret_of(
                &good,
                &key,
                10,
                &[(annotations::REVISION, "3")],
            )];
            secrets.extend(copy_of(DSSM, &good, 20));
            secrets.extend(copy_of("spk-a", &good, 30));
            for s in &mut secrets {
                let ns = s.metadata.namespace.clone().unwrap();
                let rev = if ns == DSSM { dssm_rev } else { tmm_rev };
                if s.metadata.name.as_deref() != Some(contract::CA_KEY_SECRET) {
                    let a = s.metadata.annotations.as_mut().unwrap();
                    a.insert(annotations::REVISION.into(), rev.into());
                }
            }
            let obs = observe(&p, secrets);
            let ca_key_secret = crate::plan::evaluate_ca_key_secret(&obs.ca_key_secret, DSSM, 0);
            revision(&obs, &plan_of(Action::RenewLeaf, None), &ca_key_secret)
        };
        assert_eq!(
            with("18446744073709551615", "1"),
            Ok(4),
            "TMM's annotation ignored"
        );
        assert_eq!(with("1", "7"), Ok(8));
        let e = with("1", "18446744073709551615").unwrap_err().to_string();
        assert!(
            e.contains("no next revision") && e.contains(annotations::REVISION),
            "{e}"
        );
    }

    #[test]
    fn a_rolling_ca_rotation_starts_by_recording_it_on_the_ca_key_secret_only() {
        let p = destinations(&["spk-ingress"]);
        let (old, old_key) = made();
        let mut secrets = vec![ca_key_secret_of(
            &old,
            &old_key,
            10,
            &[(annotations::REVISION, "3")],
        )];
        secrets.extend(copy_of(DSSM, &old, 20));
        secrets.extend(copy_of("spk-ingress", &old, 30));
        let obs = observe(&p, secrets);
        let (new, new_key) = made();
        let plan = plan_of(Action::RotateCa, None);
        let list = with_new(&p, &obs, &plan, (&new, &new_key), Some(&old));
        assert_eq!(
            shape(&list),
            ["replace@10 spk-utilities/dssm-ca-key-secret pending"]
        );
        let Write::Secret(s) = &list[0] else { panic!() };
        let record = rotation::Record::parse(&s.annotations[annotations::ROTATION]).unwrap();
        assert_eq!((record.phase, record.revision), (Phase::Trust, 4));
        let data = &s.data.as_ref().unwrap().0;
        assert_eq!(
            data[crate::materials::saved_keys::PREVIOUS_CA_CERT],
            old.ca_cert
        );
        assert_eq!(data[ca_key_secret_keys::CA_CERT], new.ca_cert);
        assert_eq!(s.annotations[PENDING_CA_CHANGED], "true");
    }

    #[test]
    fn several_tmm_namespaces_get_their_copies_in_target_order_then_every_target_is_marked() {
        let p = destinations(&["spk-a", "spk-b", "spk-c"]);
        let (old, old_key) = made();
        let mut secrets = vec![ca_key_secret_of(
            &old,
            &old_key,
            10,
            &[(annotations::REVISION, "7")],
        )];
        for (i, ns) in [DSSM, "spk-a", "spk-b", "spk-c"].into_iter().enumerate() {
            secrets.extend(copy_of(ns, &old, 20 + 10 * i as u32));
        }
        let obs = observe(&p, secrets);
        let (new, new_key) = made();
        // Scale-to-zero: a new CA in one step (no rotation record).
        let plan = plan_of(Action::RotateCa, None);
        let list = with_new(&p, &obs, &plan, (&new, &new_key), None);
        assert_eq!(
            shape(&list),
            [
                "replace@10 spk-utilities/dssm-ca-key-secret pending",
                "replace@20 spk-utilities/dssm-certs-secret",
                "replace@21 spk-utilities/dssm-keys-secret",
                "replace@30 spk-a/dssm-certs-secret",
                "replace@31 spk-a/dssm-keys-secret",
                "replace@40 spk-b/dssm-certs-secret",
                "replace@41 spk-b/dssm-keys-secret",
                "replace@50 spk-c/dssm-certs-secret",
                "replace@51 spk-c/dssm-keys-secret",
                "mark deployment spk-a/f5-tmm r8 ca-changed",
                "mark deployment spk-b/f5-tmm r8 ca-changed",
                "mark deployment spk-c/f5-tmm r8 ca-changed",
                "replace@#0 spk-utilities/dssm-ca-key-secret complete",
            ]
        );
    }

    #[test]
    fn a_resumed_rotation_skips_copies_already_written_and_still_marks_and_completes() {
        let p = destinations(&["spk-ingress"]);
        let (old, _) = made();
        let (new, key) = made();
        let pending = [
            (annotations::REVISION, "5"),
            (annotations::STATE, "pending"),
            (PENDING_CA_CHANGED, "true"),
        ];
        let mut ca_key_secret = ca_key_secret_of(&new, &key, 10, &pending);
        let data = ca_key_secret.data.as_mut().unwrap();
        data.insert(
            ca_key_secret_keys::PENDING_CERT.into(),
            ByteString(new.leaf_cert.clone()),
        );
        data.insert(
            ca_key_secret_keys::PENDING_KEY.into(),
            ByteString(new.leaf_key.expose().to_vec()),
        );
        data.insert(
            ca_key_secret_keys::PENDING_DH.into(),
            ByteString(new.dhparams.clone()),
        );
        let mut secrets = vec![ca_key_secret];
        // The interrupted run wrote the dSSM copy, not TMM's.
        secrets.extend(copy_of(DSSM, &new, 20));
        secrets.extend(copy_of("spk-ingress", &old, 30));
        let obs = observe(&p, secrets);
        let plan = plan_of(Action::Resume, Some(&new));
        let content = ToPublish::Bundle {
            bundle: &new,
            ca_key: None,
        };
        let list = run(&p, &obs, &plan, content, None);
        assert_eq!(
            shape(&list),
            [
                "replace@30 spk-ingress/dssm-certs-secret",
                "replace@31 spk-ingress/dssm-keys-secret",
                "mark deployment spk-ingress/f5-tmm r5 ca-changed",
                "replace@10 spk-utilities/dssm-ca-key-secret complete",
            ]
        );
        let Write::Secret(done) = &list[3] else {
            panic!()
        };
        let kept: Vec<&String> = done.data.as_ref().unwrap().0.keys().collect();
        assert_eq!(
            kept,
            [ca_key_secret_keys::CA_CERT, ca_key_secret_keys::CA_KEY]
        );
    }

    #[test]
    fn lines_and_debug_never_show_key_material() {
        let p = destinations(&["spk-ingress"]);
        let obs = observe(&p, Vec::new());
        let (b, key) = made();
        let plan = plan_of(Action::Publish, None);
        let list = with_new(&p, &obs, &plan, (&b, &key), None);
        let body =
            |pem: &[u8]| String::from_utf8_lossy(pem).lines().nth(1).unwrap()[..20].to_string();
        for shown in list.iter().flat_map(|w| [w.line(), format!("{w:?}")]) {
            for secret in [body(key.expose()), body(b.leaf_key.expose())] {
                assert!(
                    !shown.contains(&secret) && !shown.contains("PRIVATE"),
                    "{shown}"
                );
            }
        }
    }
}
