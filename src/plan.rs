//! The planner: from what was observed in the cluster and the clock, exactly one action with its
//! reasons. Pure: no I/O, table-tested.

use serde::Serialize;

use crate::checks::{self, Anchors, Thresholds};
use crate::contract;
use crate::materials::{
    annotations, ca_key_secret_keys, saved_keys, Bundle, CopyObs, Owner, SecretObs,
};
use crate::pki::{self, Certificate, PrivateKey, SecretBytes};

/// What one copy amounts to.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // short-lived, a handful per pass
pub enum CopyState {
    Missing,
    Invalid(String),
    Valid {
        bundle: Bundle,
        ca: Certificate,
        leaf: Certificate,
    },
}

/// The CA key Secret, read.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum CaKeySecretState {
    Missing,
    Invalid(String),
    Valid {
        ca: Certificate,
        ca_cert: Vec<u8>,
        revision: u64,
        /// A rotation written here but not yet to every copy.
        pending: Option<Bundle>,
        /// The CAs a copy may hold: this one, and the rotation's previous CA while recorded.
        anchors: Anchors,
    },
}

impl CaKeySecretState {
    /// The CAs a copy may hold, when a CA is stored.
    pub fn anchors(&self) -> Option<&Anchors> {
        match self {
            CaKeySecretState::Valid { anchors, .. } => Some(anchors),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Everything is valid, identical, managed by us and not due.
    Nothing,
    /// Valid materials made by hand: kept as they are until due.
    Adopt,
    /// Nothing exists yet: generate and write everything.
    Publish,
    /// Copies differ: copy the winning one over the others.
    Repair,
    /// The leaf is due: a new leaf under the same CA.
    RenewLeaf,
    /// The CA is due, the leaf would outlive it, or no CA key is available: new CA and leaf.
    RotateCa,
    /// Unusable materials everywhere: the deployment is already broken; replace them.
    ReplaceInvalid,
    /// A rotation was interrupted: finish it from the saved materials.
    Resume,
}

impl Action {
    pub fn writes(self) -> bool {
        !matches!(self, Action::Nothing | Action::Adopt)
    }
    pub fn needs_new_materials(self) -> bool {
        matches!(
            self,
            Action::Publish | Action::RenewLeaf | Action::RotateCa | Action::ReplaceInvalid
        )
    }
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub action: Action,
    pub reasons: Vec<String>,
    /// Repair and Resume: the bundle to write.
    pub bundle_to_write: Option<Bundle>,
    /// Repair: the namespace whose copy wins.
    pub repair_from: Option<String>,
    /// New materials: reuse the CA in the CA key Secret (RenewLeaf, ReplaceInvalid with a usable CA).
    pub reuse_kept_ca: bool,
    /// DH params to keep when renewing (valid ones found in a copy).
    pub reusable_dhparams: Option<Vec<u8>>,
    /// Copies that differ from the target, or are missing or invalid.
    pub out_of_sync: bool,
    pub invalid: Vec<String>,
}

/// Flags that steer the planner.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Renew the leaf this long before notAfter instead of at 1/3 of its lifetime left.
    pub renew_before: Option<i64>,
    /// Rotate the CA this long before its notAfter instead of at 1/3 of its lifetime left.
    pub ca_renew_before: Option<i64>,
    /// Lifetime of a new leaf (cut to its CA's end), to know when a renewed leaf would be due.
    pub leaf_days: u32,
    /// `rotate`: renew now.
    pub force_leaf: bool,
    /// `rotate --ca`: replace the CA now.
    pub force_ca: bool,
}

/// Reads one copy: complete, parseable, key matching, chaining, in validity.
pub fn evaluate_copy(c: &CopyObs, now: i64) -> CopyState {
    evaluate_copy_against(c, now, None)
}

/// [`evaluate_copy`], and with `anchors` a copy holding any other CA is invalid.
pub fn evaluate_copy_against(c: &CopyObs, now: i64, anchors: Option<&Anchors>) -> CopyState {
    if c.certs == SecretObs::Missing && c.keys == SecretObs::Missing {
        return CopyState::Missing;
    }
    let ns = &c.namespace;
    let need = |s: &SecretObs, secret: &str, key: &str| -> Result<Vec<u8>, String> {
        match s {
            SecretObs::Missing => Err(format!("{ns}/{secret}: missing")),
            _ => s
                .get(key)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| format!("{ns}/{secret}: has no key {key}")),
        }
    };
    let bundle = (|| {
        Ok::<_, String>(Bundle {
            ca_cert: need(&c.certs, contract::CERTS_SECRET, contract::CA_CERT)?,
            leaf_cert: need(&c.certs, contract::CERTS_SECRET, contract::LEAF_CERT)?,
            dhparams: need(&c.certs, contract::CERTS_SECRET, contract::DH_PARAMS)?,
            leaf_key: SecretBytes::new(need(&c.keys, contract::KEYS_SECRET, contract::LEAF_KEY)?),
        })
    })();
    let bundle = match bundle {
        Ok(b) => b,
        Err(e) => return CopyState::Invalid(e),
    };
    match validate_against(&bundle, ns, now, anchors) {
        Ok((ca, leaf)) => CopyState::Valid { bundle, ca, leaf },
        Err(e) => CopyState::Invalid(e),
    }
}

/// A bundle TLS can work with right now, or why not: the checks' verdicts (the same `check`
/// reports), with the CA of the bundle that signs the leaf and the leaf.
pub fn validate_bundle(
    b: &Bundle,
    ns: &str,
    now: i64,
) -> Result<(Certificate, Certificate), String> {
    validate_against(b, ns, now, None)
}

fn validate_against(
    b: &Bundle,
    ns: &str,
    now: i64,
    anchors: Option<&Anchors>,
) -> Result<(Certificate, Certificate), String> {
    // Thresholds only grade residual time, which never makes a copy unusable.
    let mut found = checks::judge_copy(&b.to_read_copy(ns), now, Thresholds::default());
    if let Some(a) = anchors {
        checks::judge_anchors(&mut found, a);
    }
    let broken: Vec<String> = found.breaking().map(|f| f.describe()).collect();
    match (found.issuing_ca(), found.leaf()) {
        (Some(ca), Some(leaf)) if broken.is_empty() => Ok((ca.clone(), leaf.clone())),
        _ => Err(broken.join("; ")),
    }
}

/// Reads the CA key Secret.
pub fn evaluate_ca_key_secret(s: &SecretObs, ns: &str, now: i64) -> CaKeySecretState {
    let SecretObs::Present {
        data, annotations, ..
    } = s
    else {
        return CaKeySecretState::Missing;
    };
    let at = |k: &str| format!("{ns}/{}[{k}]", contract::CA_KEY_SECRET);
    let (Some(cert), Some(key)) = (
        data.get(ca_key_secret_keys::CA_CERT),
        data.get(ca_key_secret_keys::CA_KEY),
    ) else {
        return CaKeySecretState::Invalid(format!(
            "{ns}/{}: lacks {} or {}",
            contract::CA_KEY_SECRET,
            ca_key_secret_keys::CA_CERT,
            ca_key_secret_keys::CA_KEY
        ));
    };
    let ca = match pki::parse_certificate(cert, &at(ca_key_secret_keys::CA_CERT)) {
        Ok(c) => c,
        Err(e) => return CaKeySecretState::Invalid(e.to_string()),
    };
    match PrivateKey::from_pem(key, &at(ca_key_secret_keys::CA_KEY)) {
        Ok(k) if ca.matches_key(&k) => {}
        Ok(_) => {
            return CaKeySecretState::Invalid(format!(
                "{} does not match {}",
                at(ca_key_secret_keys::CA_KEY),
                at(ca_key_secret_keys::CA_CERT)
            ))
        }
        Err(e) => return CaKeySecretState::Invalid(e.to_string()),
    }
    let revision = annotations
        .get(annotations::REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let pending = (annotations.get(annotations::STATE).map(String::as_str) == Some("pending"))
        .then(|| {
            Some(Bundle {
                ca_cert: cert.clone(),
                leaf_cert: data.get(ca_key_secret_keys::PENDING_CERT)?.clone(),
                leaf_key: SecretBytes::new(data.get(ca_key_secret_keys::PENDING_KEY)?.clone()),
                dhparams: data.get(ca_key_secret_keys::PENDING_DH)?.clone(),
            })
        })
        .flatten()
        .filter(|b| validate_bundle(b, ns, now).is_ok());
    // Saved only while a CA rotation runs; completing it removes them.
    let previous = (data.get(saved_keys::PREVIOUS_CA_CERT))
        .and_then(|p| pki::inspect::parse_certificates(p, "previous CA").ok())
        .unwrap_or_default();
    CaKeySecretState::Valid {
        anchors: Anchors {
            ca_key_secret: format!("{ns}/{}", contract::CA_KEY_SECRET),
            stored: ca.clone(),
            previous,
        },
        ca,
        ca_cert: cert.clone(),
        revision,
        pending,
    }
}

/// When `c` is due: at `renew_before` before notAfter, or when 1/3 of its lifetime is left.
pub fn renewal_time(c: &Certificate, renew_before: Option<i64>) -> i64 {
    let lifetime = c.not_after - c.not_before;
    c.not_after - renew_before.unwrap_or(lifetime / 3)
}

fn base(action: Action, reasons: Vec<String>) -> Plan {
    Plan {
        action,
        reasons,
        bundle_to_write: None,
        repair_from: None,
        reuse_kept_ca: false,
        reusable_dhparams: None,
        out_of_sync: false,
        invalid: Vec::new(),
    }
}

/// What the copies amount to, read once per pass.
struct Seen<'a> {
    copies: &'a [CopyObs],
    states: Vec<(String, CopyState)>,
    invalid: Vec<String>,
    in_sync: bool,
    kept_ca: Option<&'a Certificate>,
    anchors: Option<&'a Anchors>,
}

/// The copy whose materials the pass keeps or renews.
struct Winner<'a> {
    ns: &'a String,
    bundle: &'a Bundle,
    ca: &'a Certificate,
    leaf: &'a Certificate,
    /// The stored CA (whose key we hold) is this copy's CA and signs its leaf.
    kept_ca_signs: bool,
}

impl<'a> Seen<'a> {
    fn new(copies: &'a [CopyObs], ca_key_secret: &'a CaKeySecretState, now: i64) -> Self {
        let states: Vec<(String, CopyState)> = copies
            .iter()
            .map(|c| {
                let state = evaluate_copy_against(c, now, ca_key_secret.anchors());
                (c.namespace.clone(), state)
            })
            .collect();
        let invalid = states
            .iter()
            .filter_map(|(_, s)| match s {
                CopyState::Invalid(e) => Some(e.clone()),
                _ => None,
            })
            .collect();
        let mut seen = Seen {
            copies,
            states,
            invalid,
            in_sync: false,
            kept_ca: match ca_key_secret {
                CaKeySecretState::Valid { ca, .. } => Some(ca),
                _ => None,
            },
            anchors: ca_key_secret.anchors(),
        };
        let valid = seen.valid();
        seen.in_sync = !valid.is_empty()
            && valid.len() == seen.states.len()
            && valid.iter().all(|v| v.1 == valid[0].1);
        seen
    }

    fn valid(&self) -> Vec<(&String, &Bundle, &Certificate, &Certificate)> {
        self.states
            .iter()
            .filter_map(|(ns, s)| match s {
                CopyState::Valid { bundle, ca, leaf } => Some((ns, bundle, ca, leaf)),
                _ => None,
            })
            .collect()
    }

    /// The winning copy: the valid one chaining to the stored CA, else the dSSM namespace's (the
    /// first copy), else (with a stored CA) any valid one: valid copies hold no CA but the stored
    /// and the rotation's previous. Without a stored CA only the dSSM copy can win: nothing from
    /// another namespace is trusted into the dSSM namespace. None when no copy can win.
    fn winner(&self) -> Option<Winner<'_>> {
        let valid = self.valid();
        let dssm = valid.iter().find(|v| v.0 == &self.copies[0].namespace);
        let (ns, bundle, ca, leaf) = *match self.kept_ca {
            Some(kept_ca) => (valid.iter().find(|v| v.3.is_signed_by(kept_ca)))
                .or(dssm)
                .or(valid.first())?,
            None => dssm?,
        };
        let kept_ca_signs = self
            .kept_ca
            .is_some_and(|s| leaf.is_signed_by(s) && s.der() == ca.der());
        Some(Winner {
            ns,
            bundle,
            ca,
            leaf,
            kept_ca_signs,
        })
    }

    /// New materials under the stored CA when it can still sign them.
    fn new_materials(
        &self,
        action: Action,
        reasons: Vec<String>,
        now: i64,
        policy: Policy,
    ) -> Plan {
        let mut p = base(action, reasons);
        p.reuse_kept_ca = self.kept_ca.is_some_and(|ca| ca_usable(ca, now, policy));
        p
    }
}

/// The one decision of a pass: the first step that applies, in this order.
pub fn plan(
    copies: &[CopyObs],
    ca_key_secret: &CaKeySecretState,
    now: i64,
    policy: Policy,
) -> Plan {
    let seen = Seen::new(copies, ca_key_secret, now);
    let mut p = interrupted(ca_key_secret)
        .or_else(|| first_install(&seen, now, policy))
        .or_else(|| nothing_usable(&seen, now, policy))
        .unwrap_or_else(|| match seen.winner() {
            Some(w) => due(&w, now, policy)
                .or_else(|| drift(&seen, &w, now, policy))
                .unwrap_or_else(|| steady(&seen, &w, policy)),
            None => untrusted_source(&seen, now, policy),
        });
    p.out_of_sync = !seen.in_sync;
    p.invalid = seen.invalid.clone();
    p
}

/// Step 1: An interrupted rotation is finished before anything else, from what was saved.
fn interrupted(ca_key_secret: &CaKeySecretState) -> Option<Plan> {
    let CaKeySecretState::Valid {
        pending: Some(b),
        revision,
        ..
    } = ca_key_secret
    else {
        return None;
    };
    let mut p = base(
        Action::Resume,
        vec![format!(
            "rotation to revision {revision} was interrupted: finishing it from the materials \
             saved in {}",
            contract::CA_KEY_SECRET
        )],
    );
    p.bundle_to_write = Some(b.clone());
    Some(p)
}

/// Step 2: Nothing there yet.
fn first_install(seen: &Seen, now: i64, policy: Policy) -> Option<Plan> {
    let all_missing = (seen.states.iter()).all(|(_, s)| matches!(s, CopyState::Missing));
    all_missing.then(|| {
        let reasons = vec!["no dSSM Secrets exist yet".into()];
        seen.new_materials(Action::Publish, reasons, now, policy)
    })
}

/// Step 3: Nothing usable: the deployment is already broken.
fn nothing_usable(seen: &Seen, now: i64, policy: Policy) -> Option<Plan> {
    seen.valid().is_empty().then(|| {
        let mut reasons = vec!["no copy holds usable materials".to_string()];
        reasons.extend(seen.invalid.iter().cloned());
        seen.new_materials(Action::ReplaceInvalid, reasons, now, policy)
    })
}

/// Step 3b: No CA is stored and the dSSM copy is missing or broken: the valid copies are all in
/// other namespaces, and their CA is never trusted into the dSSM namespace (whoever can write a
/// TMM namespace would choose whom Redis trusts). New materials, nothing reused from them.
fn untrusted_source(seen: &Seen, now: i64, policy: Policy) -> Plan {
    let dssm = &seen.copies[0].namespace;
    let mut reasons = vec![format!(
        "the copy in {dssm} is missing or unusable and no CA is stored in {}: a copy from \
         another namespace is never trusted into {dssm}; new materials under a new CA",
        contract::CA_KEY_SECRET
    )];
    reasons.extend(seen.invalid.iter().cloned());
    seen.new_materials(Action::ReplaceInvalid, reasons, now, policy)
}

/// A leaf issued less than this long ago is not renewed by a policy (only by `rotate`) when its
/// successor would be due as soon too: a policy that makes new certificates due at birth must
/// not renew on every pass (back-to-back restarts inside the agent's window).
pub const MIN_AGE_TO_RENEW: i64 = 3600;

/// Renewing would only make another leaf due at once: `leaf` is younger than
/// [`MIN_AGE_TO_RENEW`] and a leaf renewed now would be due within that time too.
fn renewal_would_loop(w: &Winner, now: i64, policy: Policy) -> bool {
    let young = now - w.leaf.not_before < MIN_AGE_TO_RENEW;
    young
        && leaf_renewal_time(&next_leaf(w.ca, now, policy), policy.renew_before)
            < now + MIN_AGE_TO_RENEW
}

/// Step 4: Due, or asked for? The CA is rotated only for its own reasons (small
/// policies, each with its reason); a due leaf is otherwise renewed under the same CA.
fn due(w: &Winner, now: i64, policy: Policy) -> Option<Plan> {
    let forced = policy.force_leaf || policy.force_ca;
    if !forced && renewal_would_loop(w, now, policy) {
        return None;
    }
    let keep_dh = Some(w.bundle.dhparams.clone());
    let rotate_reasons = ca_rotation_reasons(w, now, policy);
    if !rotate_reasons.is_empty() {
        let mut p = base(Action::RotateCa, rotate_reasons);
        p.reusable_dhparams = keep_dh;
        return Some(p);
    }
    if !(leaf_due(w.leaf, now, policy) || policy.force_leaf) {
        return None;
    }
    let reason = if !leaf_due(w.leaf, now, policy) {
        "renewal requested (rotate)".to_string()
    } else {
        format!(
            "the leaf expires at {}: less than {} left",
            pki::format_time(w.leaf.not_after),
            renew_window(w.leaf, policy.renew_before, "--renew-before")
        )
    };
    let mut reasons = vec![
        reason,
        "the CA is not due: the leaf is renewed under it".into(),
    ];
    reasons.extend(next_leaf(w.ca, now, policy).note());
    let mut p = base(Action::RenewLeaf, reasons);
    p.reuse_kept_ca = true;
    p.reusable_dhparams = keep_dh;
    Some(p)
}

/// Why the CA must be replaced now (empty: it need not be).
fn ca_rotation_reasons(w: &Winner, now: i64, policy: Policy) -> Vec<String> {
    let renew = leaf_due(w.leaf, now, policy) || policy.force_leaf;
    let mut reasons = Vec::new();
    if policy.force_ca {
        reasons.push("CA rotation requested (rotate --ca)".to_string());
    }
    if let Some(r) = ca_due(w.ca, now, policy) {
        reasons.push(r);
        if renew {
            reasons.push(
                "the leaf is due as well: it is renewed under the new CA, since a leaf renewed \
                 under the old one would be cut to the old CA's end"
                    .to_string(),
            );
        }
    }
    if renew && !w.kept_ca_signs {
        reasons.push(format!(
            "the leaf is due but no CA key for {:?} is stored in {}: a new CA is needed",
            w.ca.subject,
            contract::CA_KEY_SECRET
        ));
    }
    // Only a leaf that is due on its own: `rotate` asked for a leaf under this CA.
    if leaf_due(w.leaf, now, policy) && w.kept_ca_signs && reasons.is_empty() {
        reasons.extend(ca_due_before_renewed_leaf(w.ca, now, policy));
    }
    reasons
}

/// Step 5: Valid and not due, but the copies differ. Repair copies only materials that chain to the
/// stored CA: a copy of another CA (applied by hand, or by an attacker with write access to the
/// TMM namespace) is never spread into the dSSM namespace.
fn drift(seen: &Seen, w: &Winner, now: i64, policy: Policy) -> Option<Plan> {
    if seen.in_sync {
        return None;
    }
    if seen.kept_ca.is_some() && !w.kept_ca_signs {
        let mut reasons = vec![format!(
            "the copies differ and none chains to the CA stored in {}: new materials under that \
             CA, never a copy of a foreign CA",
            contract::CA_KEY_SECRET
        )];
        reasons.extend(seen.invalid.iter().cloned());
        let mut p = seen.new_materials(Action::ReplaceInvalid, reasons, now, policy);
        p.reusable_dhparams = Some(w.bundle.dhparams.clone());
        return Some(p);
    }
    let mut reasons = vec![format!("the copies differ: {}'s valid copy wins", w.ns)];
    reasons.extend(seen.invalid.iter().cloned());
    let mut p = base(Action::Repair, reasons);
    let mut source = w.bundle.clone();
    if seen.anchors.is_some() {
        // Its CAs are the stored ones (a valid copy holds no other): written from their DER,
        // never the copy's bytes.
        source.ca_cert = trust_bundle(&source.ca_cert);
    }
    // The leaf from its DER and the DH params as OpenSSL re-encodes them (PKCS#3): nothing of
    // the winning copy's bytes around them is spread to the others.
    let leaf = trust_bundle(&source.leaf_cert);
    if !leaf.is_empty() {
        source.leaf_cert = leaf;
    }
    if let Ok(dh) = pki::dhparams::DhParams::validate(&source.dhparams, "DH params") {
        source.dhparams = dh.pem().to_vec();
    }
    p.bundle_to_write = Some(source);
    p.repair_from = Some(w.ns.clone());
    Some(p)
}

/// The CA bundle `pem` re-encoded from each certificate's DER, in its order: nothing of the
/// copy's bytes but the certificates themselves.
fn trust_bundle(pem: &[u8]) -> Vec<u8> {
    let cas = pki::inspect::parse_certificates(pem, "CA bundle").unwrap_or_default();
    cas.iter().flat_map(|c| c.to_pem()).collect()
}

/// Step 6: Fine. Made by hand? Then we only watch it.
fn steady(seen: &Seen, w: &Winner, policy: Policy) -> Plan {
    let hand_made = seen.copies.iter().any(|c| {
        [&c.certs, &c.keys]
            .iter()
            .any(|s| s.owner() != Some(&Owner::Us))
    });
    let until = format!(
        "valid; the leaf is due for renewal at {}",
        pki::format_time(
            renewal_time(w.leaf, policy.renew_before)
                .min(renewal_time(w.ca, policy.ca_renew_before))
        )
    );
    if hand_made {
        base(
            Action::Adopt,
            vec![format!(
                "materials made by hand are {until}; kept untouched until then"
            )],
        )
    } else {
        base(Action::Nothing, vec![until])
    }
}

fn renew_window(c: &Certificate, renew_before: Option<i64>, flag: &str) -> String {
    match renew_before {
        Some(s) => format!("{}d ({flag})", s / 86_400),
        None => format!(
            "1/3 of its lifetime ({}d)",
            (c.not_after - c.not_before) / 3 / 86_400
        ),
    }
}

fn leaf_due(leaf: &Certificate, now: i64, policy: Policy) -> bool {
    now >= renewal_time(leaf, policy.renew_before)
}

/// Policy: the CA is due by its own renew-before.
fn ca_due(ca: &Certificate, now: i64, policy: Policy) -> Option<String> {
    (now >= renewal_time(ca, policy.ca_renew_before)).then(|| {
        format!(
            "the CA expires at {}: less than {} left",
            pki::format_time(ca.not_after),
            renew_window(ca, policy.ca_renew_before, "--ca-renew-before")
        )
    })
}

/// The leaf a renewal under `ca` would get now: `leaf_days`, cut to the CA's end.
fn next_leaf(ca: &Certificate, now: i64, policy: Policy) -> pki::LeafValidity {
    let now = time::OffsetDateTime::from_unix_timestamp(now).expect("a sane clock");
    pki::LeafValidity::new(ca.not_before, ca.not_after, policy.leaf_days.max(1), now)
        .expect("at least one day")
}

/// When a leaf of `v` would be due.
fn leaf_renewal_time(v: &pki::LeafValidity, renew_before: Option<i64>) -> i64 {
    v.not_after - renew_before.unwrap_or((v.not_after - v.not_before) / 3)
}

/// Policy: a leaf renewed under `ca` now would be due before (or when) the CA is: renewing it
/// would only lead to a CA rotation soon after (an adopted hand-made cluster, CA = leaf = 365
/// days, would renew a leaf that is due at once). Rotate the CA instead.
fn ca_due_before_renewed_leaf(ca: &Certificate, now: i64, policy: Policy) -> Option<String> {
    let next = next_leaf(ca, now, policy);
    let leaf_at = leaf_renewal_time(&next, policy.renew_before);
    let ca_at = renewal_time(ca, policy.ca_renew_before);
    if leaf_at <= now && next.cut_to_ca() {
        // (A leaf due at birth even uncut, `--renew-before` ≥ `--days`, is not the CA's doing.)
        Some(format!(
            "a leaf renewed under this CA would be cut to the CA's end, {}, and be due at once: \
             the CA is rotated instead",
            pki::format_time(ca.not_after)
        ))
    } else if ca_at <= leaf_at {
        Some(format!(
            "the CA is due at {}, before a leaf renewed under it would be ({}): the CA is rotated \
             now instead of renewing twice",
            pki::format_time(ca_at),
            pki::format_time(leaf_at)
        ))
    } else {
        None
    }
}

/// A stored CA can sign the leaf of a Publish or ReplaceInvalid: valid, not due, and not due
/// before the new leaf would be.
fn ca_usable(ca: &Certificate, now: i64, policy: Policy) -> bool {
    now >= ca.not_before
        && now < ca.not_after
        && ca_due(ca, now, policy).is_none()
        && ca_due_before_renewed_leaf(ca, now, policy).is_none()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pki::{issue_ca, issue_leaf, CaSigner, KeyAlgorithm, LeafRequest, Subject};
    use std::collections::BTreeMap;
    use time::{Duration, OffsetDateTime};

    pub(crate) struct Made {
        pub bundle: Bundle,
        pub ca_key: Vec<u8>,
    }

    const DAY: i64 = 86_400;

    /// Materials issued `ago_days` before now, with these lifetimes.
    pub(crate) fn made(ago_days: i64, ca_days: u32, days: u32) -> Made {
        made_at(ago_days, ca_days, ago_days, days)
    }

    /// A CA issued `ca_ago` days ago and a leaf issued under it `leaf_ago` days ago.
    fn made_at(ca_ago: i64, ca_days: u32, leaf_ago: i64, days: u32) -> Made {
        let ca_at = OffsetDateTime::now_utc() - Duration::days(ca_ago);
        let at = OffsetDateTime::now_utc() - Duration::days(leaf_ago);
        let ca_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let ca = issue_ca(&Subject::parse("CN=CA").unwrap(), ca_days, &ca_key, ca_at).unwrap();
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let leaf = issue_leaf(
            &LeafRequest {
                subject: &Subject::parse("CN=Server").unwrap(),
                days,
                dns_names: &[],
            },
            &key,
            &CaSigner {
                cert_pem: ca.as_bytes(),
                key: &ca_key,
                cert_name: "ca",
                key_name: "ca key",
            },
            at,
        )
        .unwrap();
        Made {
            bundle: Bundle {
                ca_cert: ca.into_bytes(),
                leaf_cert: leaf.pem.into_bytes(),
                leaf_key: SecretBytes::new(key.to_pkcs8_pem()),
                dhparams: crate::pki::dhparams::FFDHE2048_PEM.as_bytes().to_vec(),
            },
            ca_key: ca_key.to_pkcs8_pem(),
        }
    }

    fn copy(ns: &str, b: Option<&Bundle>, owner: Owner) -> CopyObs {
        let Some(b) = b else {
            return CopyObs {
                namespace: ns.into(),
                certs: SecretObs::Missing,
                keys: SecretObs::Missing,
            };
        };
        let s = |pairs: &[(&str, &Vec<u8>)]| SecretObs::Present {
            data: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), (*v).clone()))
                .collect(),
            owner: owner.clone(),
            annotations: BTreeMap::new(),
        };
        CopyObs {
            namespace: ns.into(),
            certs: s(&[
                (contract::CA_CERT, &b.ca_cert),
                (contract::LEAF_CERT, &b.leaf_cert),
                (contract::DH_PARAMS, &b.dhparams),
            ]),
            keys: s(&[(contract::LEAF_KEY, &b.leaf_key.expose().to_vec())]),
        }
    }

    fn ca_key_secret(m: &Made, pending: Option<&Bundle>) -> CaKeySecretState {
        let mut data = BTreeMap::from([
            (
                ca_key_secret_keys::CA_CERT.to_string(),
                m.bundle.ca_cert.clone(),
            ),
            (ca_key_secret_keys::CA_KEY.to_string(), m.ca_key.clone()),
        ]);
        let mut ann = BTreeMap::from([(annotations::REVISION.to_string(), "4".to_string())]);
        if let Some(p) = pending {
            data.insert(ca_key_secret_keys::PENDING_CERT.into(), p.leaf_cert.clone());
            data.insert(
                ca_key_secret_keys::PENDING_KEY.into(),
                p.leaf_key.expose().to_vec(),
            );
            data.insert(ca_key_secret_keys::PENDING_DH.into(), p.dhparams.clone());
            ann.insert(annotations::STATE.into(), "pending".into());
        }
        let obs = SecretObs::Present {
            data,
            owner: Owner::Us,
            annotations: ann,
        };
        evaluate_ca_key_secret(&obs, "dssm", now())
    }

    fn now() -> i64 {
        OffsetDateTime::now_utc().unix_timestamp()
    }

    fn policy() -> Policy {
        Policy {
            renew_before: None,
            ca_renew_before: None,
            leaf_days: 365,
            force_leaf: false,
            force_ca: false,
        }
    }

    /// Long: a table, one row per situation, read in one place.
    #[test]
    fn the_planner_picks_exactly_one_action_for_each_situation() {
        let fresh = made(1, 1000, 365);
        let other = made(1, 1000, 365);
        let just_made = made(0, 1000, 365);
        let leaf_due = made(300, 1000, 365); // 65 of 365 days left < 1/3
        let ca_due = made(700, 1000, 990); // the CA has 300 of 1000 days left < 1/3
        let short_ca = made(1, 120, 100); // a new 365-day leaf would outlive this CA
        let short_ca_due = made(80, 120, 100);
        let mut garbage = fresh.bundle.clone();
        garbage.leaf_cert = b"garbage".to_vec();
        let mut mismatched = fresh.bundle.clone();
        mismatched.leaf_key = other.bundle.leaf_key.clone();
        let us = Owner::Us;
        let hand = Owner::Nobody;

        type Case<'a> = (&'a str, Vec<CopyObs>, CaKeySecretState, Policy, Action);
        let cases: Vec<Case<'_>> = vec![
            (
                "nothing anywhere",
                vec![copy("d", None, us.clone()), copy("t", None, us.clone())],
                CaKeySecretState::Missing,
                policy(),
                Action::Publish,
            ),
            (
                "valid, ours, not due",
                vec![
                    copy("d", Some(&fresh.bundle), us.clone()),
                    copy("t", Some(&fresh.bundle), us.clone()),
                ],
                ca_key_secret(&fresh, None),
                policy(),
                Action::Nothing,
            ),
            (
                "valid, made by hand",
                vec![
                    copy("d", Some(&fresh.bundle), hand.clone()),
                    copy("t", Some(&fresh.bundle), hand.clone()),
                ],
                CaKeySecretState::Missing,
                policy(),
                Action::Adopt,
            ),
            (
                "leaf due, CA key stored",
                vec![
                    copy("d", Some(&leaf_due.bundle), us.clone()),
                    copy("t", Some(&leaf_due.bundle), us.clone()),
                ],
                ca_key_secret(&leaf_due, None),
                policy(),
                Action::RenewLeaf,
            ),
            (
                "leaf due, no CA key",
                vec![copy("d", Some(&leaf_due.bundle), hand.clone())],
                CaKeySecretState::Missing,
                policy(),
                Action::RotateCa,
            ),
            (
                // The copy's CA is not the stored one: foreign, replaced under the stored CA.
                "leaf due, another CA's key stored",
                vec![copy("d", Some(&leaf_due.bundle), us.clone())],
                ca_key_secret(&other, None),
                policy(),
                Action::ReplaceInvalid,
            ),
            (
                "CA due",
                vec![copy("d", Some(&ca_due.bundle), us.clone())],
                ca_key_secret(&ca_due, None),
                policy(),
                Action::RotateCa,
            ),
            (
                "leaf due, new leaf would outlive the CA",
                vec![copy("d", Some(&short_ca_due.bundle), us.clone())],
                ca_key_secret(&short_ca_due, None),
                Policy {
                    leaf_days: 365,
                    ..policy()
                },
                Action::RotateCa,
            ),
            (
                "not due with a short CA",
                vec![copy("d", Some(&short_ca.bundle), us.clone())],
                ca_key_secret(&short_ca, None),
                policy(),
                Action::Nothing,
            ),
            (
                "--renew-before makes it due",
                vec![copy("d", Some(&fresh.bundle), us.clone())],
                ca_key_secret(&fresh, None),
                Policy {
                    renew_before: Some(400 * DAY),
                    ..policy()
                },
                Action::RenewLeaf,
            ),
            (
                "copies differ",
                vec![
                    copy("d", Some(&fresh.bundle), us.clone()),
                    copy("t", Some(&other.bundle), us.clone()),
                ],
                CaKeySecretState::Missing,
                policy(),
                Action::Repair,
            ),
            (
                "TMM copy missing",
                vec![
                    copy("d", Some(&fresh.bundle), us.clone()),
                    copy("t", None, us.clone()),
                ],
                ca_key_secret(&fresh, None),
                policy(),
                Action::Repair,
            ),
            (
                "dSSM copy garbage",
                vec![
                    copy("d", Some(&garbage), us.clone()),
                    copy("t", Some(&fresh.bundle), us.clone()),
                ],
                ca_key_secret(&fresh, None),
                policy(),
                Action::Repair,
            ),
            (
                "everything unusable",
                vec![
                    copy("d", Some(&garbage), us.clone()),
                    copy("t", Some(&mismatched), us.clone()),
                ],
                CaKeySecretState::Missing,
                policy(),
                Action::ReplaceInvalid,
            ),
            (
                "interrupted rotation",
                vec![
                    copy("d", Some(&other.bundle), us.clone()),
                    copy("t", Some(&fresh.bundle), us.clone()),
                ],
                ca_key_secret(&other, Some(&other.bundle)),
                policy(),
                Action::Resume,
            ),
            (
                // The trust-boundary issue: a policy that makes a new leaf due at birth renewed
                // on every pass.
                "due by policy, issued minutes ago, and so would its successor be",
                vec![copy("d", Some(&just_made.bundle), us.clone())],
                ca_key_secret(&just_made, None),
                Policy {
                    renew_before: Some(400 * DAY),
                    ca_renew_before: Some(999 * DAY),
                    ..policy()
                },
                Action::Nothing,
            ),
            (
                "due by policy, issued minutes ago, its successor not due: renewed",
                vec![copy("d", Some(&just_made.bundle), us.clone())],
                ca_key_secret(&just_made, None),
                Policy {
                    renew_before: Some(400 * DAY),
                    leaf_days: 730,
                    ..policy()
                },
                Action::RenewLeaf,
            ),
            (
                "rotate",
                vec![copy("d", Some(&fresh.bundle), us.clone())],
                ca_key_secret(&fresh, None),
                Policy {
                    force_leaf: true,
                    ..policy()
                },
                Action::RenewLeaf,
            ),
            (
                "rotate --ca",
                vec![copy("d", Some(&fresh.bundle), us.clone())],
                ca_key_secret(&fresh, None),
                Policy {
                    force_leaf: true,
                    force_ca: true,
                    ..policy()
                },
                Action::RotateCa,
            ),
        ];
        for (name, copies, st, pol, want) in cases {
            let p = plan(&copies, &st, now(), pol);
            assert_eq!(p.action, want, "{name}: {:?}", p.reasons);
            assert!(!p.reasons.is_empty(), "{name}: a plan always says why");
        }
    }

    /// The lifetimes issue: a renewal is a CA rotation only when the CA itself is due. Long: a
    /// table of lifetimes, one row per case.
    #[test]
    fn a_due_leaf_is_renewed_under_its_ca_unless_the_ca_is_due_or_would_be_first() {
        // (name, materials, policy, action, a reason must contain)
        type Case<'a> = (&'a str, Made, Policy, Action, &'a str);
        let cases: Vec<Case<'_>> = vec![
            (
                "leaf due, CA not due: leaf under the same CA",
                made_at(300, 3650, 300, 365),
                policy(),
                Action::RenewLeaf,
                "the CA is not due: the leaf is renewed under it",
            ),
            (
                "leaf due, CA due: CA rotation",
                made(700, 1000, 990),
                policy(),
                Action::RotateCa,
                "the leaf is due as well",
            ),
            (
                "leaf not due, CA due: CA rotation",
                made_at(700, 1000, 10, 365),
                policy(),
                Action::RotateCa,
                "the CA expires at",
            ),
            (
                "the cut leaf would be born due: CA rotation",
                made_at(100, 120, 100, 110),
                Policy {
                    renew_before: Some(30 * DAY),
                    ca_renew_before: Some(10 * DAY),
                    ..policy()
                },
                Action::RotateCa,
                "be due at once",
            ),
            (
                "CA due before a renewed leaf would be: CA rotation now, not twice",
                made_at(2263, 3650, 300, 365),
                policy(),
                Action::RotateCa,
                "before a leaf renewed under it would be",
            ),
            (
                "hand-made 365/365 at 2/3 of its life: CA rotation, saying why",
                made(244, 365, 365),
                policy(),
                Action::RotateCa,
                "renewed under the new CA, since a leaf renewed under the old one would be cut",
            ),
            (
                "leaf due under a CA that ends before --days: renewed, cut, and said so",
                made_at(300, 600, 300, 365),
                Policy {
                    ca_renew_before: Some(30 * DAY),
                    ..policy()
                },
                Action::RenewLeaf,
                "leaf valid until the CA's end",
            ),
            (
                "with default policies a cut renewal would be due before its CA: CA rotation",
                made_at(300, 600, 300, 365),
                policy(),
                Action::RotateCa,
                "before a leaf renewed under it would be",
            ),
            (
                "rotate under a fresh 365-day CA: a leaf under the same CA, cut",
                made(1, 365, 365),
                Policy {
                    force_leaf: true,
                    ..policy()
                },
                Action::RenewLeaf,
                "short of --days 365",
            ),
            (
                "--ca-renew-before makes only the CA due",
                made(1, 3650, 365),
                Policy {
                    ca_renew_before: Some(3650 * DAY),
                    ..policy()
                },
                Action::RotateCa,
                "(--ca-renew-before)",
            ),
            (
                "--renew-before does not make the CA due",
                made_at(1, 3650, 1, 365),
                Policy {
                    renew_before: Some(400 * DAY),
                    ..policy()
                },
                Action::RenewLeaf,
                "(--renew-before)",
            ),
        ];
        for (name, m, pol, want, because) in cases {
            let copies = vec![copy("d", Some(&m.bundle), Owner::Us)];
            let p = plan(&copies, &ca_key_secret(&m, None), now(), pol);
            assert_eq!(p.action, want, "{name}: {:?}", p.reasons);
            assert!(
                p.reasons.iter().any(|r| r.contains(because)),
                "{name}: no reason says {because:?}: {:?}",
                p.reasons
            );
        }
    }

    #[test]
    fn repair_prefers_the_copy_that_chains_to_the_stored_ca_and_never_an_invalid_one() {
        let a = made(1, 1000, 365);
        let b = made(1, 1000, 365);
        let copies = vec![
            copy("dssm", Some(&a.bundle), Owner::Us),
            copy("tmm", Some(&b.bundle), Owner::Us),
        ];
        let p = plan(&copies, &CaKeySecretState::Missing, now(), policy());
        assert_eq!(
            p.repair_from.as_deref(),
            Some("dssm"),
            "without a stored CA the dSSM copy wins"
        );
        let p = plan(&copies, &ca_key_secret(&b, None), now(), policy());
        assert_eq!(
            p.repair_from.as_deref(),
            Some("tmm"),
            "the copy chaining to the stored CA wins"
        );
        assert!(p.bundle_to_write == Some(b.bundle.clone()));

        let mut broken = b.bundle.clone();
        broken.leaf_key = a.bundle.leaf_key.clone();
        let copies = vec![
            copy("dssm", Some(&broken), Owner::Us),
            copy("tmm", Some(&b.bundle), Owner::Us),
        ];
        let p = plan(&copies, &ca_key_secret(&b, None), now(), policy());
        assert_eq!(p.action, Action::Repair);
        assert_eq!(p.repair_from.as_deref(), Some("tmm"));
        assert!(
            p.invalid.iter().any(|e| e.contains("does not match")),
            "{:?}",
            p.invalid
        );
    }

    /// The hostile-input issue: with the dSSM copy broken, a TMM-namespace copy signed by
    /// another CA was copied into the dSSM namespace.
    #[test]
    fn drift_repair_never_copies_materials_of_a_foreign_ca() {
        let ours = made(1, 1000, 365);
        let foreign = made(1, 1000, 365);
        let mut broken = ours.bundle.clone();
        broken.leaf_key = foreign.bundle.leaf_key.clone();
        let copies = vec![
            copy("dssm", Some(&broken), Owner::Us),
            copy("tmm", Some(&foreign.bundle), Owner::Us),
        ];
        let p = plan(&copies, &ca_key_secret(&ours, None), now(), policy());
        assert_eq!(p.action, Action::ReplaceInvalid, "{:?}", p.reasons);
        assert!(p.bundle_to_write.is_none() && p.repair_from.is_none());
        assert!(p.reuse_kept_ca, "new materials under the stored CA");
        assert!(
            (p.reasons.iter()).any(|r| r.contains("is neither the stored CA")),
            "{:?}",
            p.reasons
        );
        // Both valid, one foreign: the same.
        let copies = vec![
            copy("dssm", Some(&foreign.bundle), Owner::Us),
            copy("tmm", Some(&other_leaf_same_ca(&ours)), Owner::Us),
        ];
        let p = plan(&copies, &ca_key_secret(&ours, None), now(), policy());
        assert_eq!(p.action, Action::Repair, "the copy under our CA wins");
        assert_eq!(p.repair_from.as_deref(), Some("tmm"));
    }

    /// The trust-boundary issue: a TMM-namespace copy whose bundle holds one more CA (with the
    /// stored CA's subject, as the manual procedure's CAs all have) was a repair source whenever the dSSM copy
    /// was missing or broken, and its whole bundle was written everywhere.
    #[test]
    fn a_tmm_copy_with_an_appended_ca_never_reaches_another_namespace() {
        let ours = made(1, 1000, 365);
        let foreign = made(1, 1000, 365); // "CN=CA" too
        let mut appended = ours.bundle.clone();
        appended.ca_cert = [&ours.bundle.ca_cert[..], &foreign.bundle.ca_cert[..]].concat();
        appended.dhparams = [crate::pki::dhparams::FFDHE2048_PEM.as_bytes(), b"\n"].concat();
        let mut broken = ours.bundle.clone();
        broken.leaf_key = foreign.bundle.leaf_key.clone();
        let dssm_copies: [(&str, Option<&Bundle>); 3] = [
            ("missing", None),
            ("broken", Some(&broken)),
            ("present", Some(&ours.bundle)),
        ];
        for (stored, st) in [
            ("stored", ca_key_secret(&ours, None)),
            ("none", CaKeySecretState::Missing),
        ] {
            for (what, dssm) in dssm_copies {
                let name = format!("CA {stored}, dSSM copy {what}");
                let copies = vec![
                    copy("dssm", dssm, Owner::Us),
                    copy("tmm", Some(&appended), Owner::Us),
                ];
                let p = plan(&copies, &st, now(), policy());
                if let Some(src) = &p.bundle_to_write {
                    let cas = pki::inspect::parse_certificates(&src.ca_cert, "x").unwrap();
                    assert_eq!(cas.len(), 1, "{name}: {:?}", p.reasons);
                    assert_eq!(
                        cas[0].der(),
                        pki::parse_certificate(&ours.bundle.ca_cert, "x")
                            .unwrap()
                            .der(),
                        "{name}"
                    );
                    assert_ne!(p.repair_from.as_deref(), Some("tmm"), "{name}");
                }
                assert_ne!(
                    p.reusable_dhparams.as_deref(),
                    Some(&appended.dhparams[..]),
                    "{name}: DH params of a foreign copy reused"
                );
                if stored == "stored" {
                    assert!(
                        (p.invalid.iter())
                            .any(|e| e.contains("CA #2 (subject \"CN=CA\", SHA-256 ")
                                && e.contains("is neither the stored CA")),
                        "{name}: {:?}",
                        p.invalid
                    );
                }
                if what != "present" {
                    assert_eq!(p.action, Action::ReplaceInvalid, "{name}: {:?}", p.reasons);
                    assert_eq!(p.reuse_kept_ca, stored == "stored", "{name}");
                } else {
                    assert_eq!(p.action, Action::Repair, "{name}: {:?}", p.reasons);
                }
            }
        }
    }

    /// What a repair writes when the dSSM copy is missing and the TMM copy `noisy` (under
    /// `ours`' stored CA) wins.
    fn repaired_from(ours: &Made, noisy: &Bundle) -> Bundle {
        let copies = vec![
            copy("dssm", None, Owner::Us),
            copy("tmm", Some(noisy), Owner::Us),
        ];
        let p = plan(&copies, &ca_key_secret(ours, None), now(), policy());
        assert_eq!(p.action, Action::Repair, "{:?}", p.reasons);
        p.bundle_to_write.unwrap()
    }

    /// A repair writes the stored CAs from their DER: text around the PEM blocks of the winning
    /// copy's bundle is not copied.
    #[test]
    fn a_repair_writes_the_ca_bundle_from_the_stored_certificates_not_the_copys_bytes() {
        let ours = made(1, 1000, 365);
        let mut noisy = ours.bundle.clone();
        noisy.ca_cert = [b"junk before\n", &ours.bundle.ca_cert[..], b"junk after\n"].concat();
        let src = repaired_from(&ours, &noisy);
        assert!(!src.ca_cert.windows(4).any(|w| w == b"junk"));
        assert_eq!(
            pki::parse_certificate(&src.ca_cert, "x").unwrap().der(),
            pki::parse_certificate(&ours.bundle.ca_cert, "x")
                .unwrap()
                .der()
        );
    }

    /// Issue 24: a repair spread the winning copy's leaf and DH files byte for byte, text
    /// around them included; it writes what was parsed, re-encoded.
    #[test]
    fn a_repair_writes_the_leaf_and_dh_params_re_encoded_not_the_copys_bytes() {
        let ours = made(1, 1000, 365);
        let mut noisy = ours.bundle.clone();
        noisy.leaf_cert = [
            b"junk before\n",
            &ours.bundle.leaf_cert[..],
            b"junk after\n",
        ]
        .concat();
        noisy.dhparams = [b"junk before\n", &ours.bundle.dhparams[..]].concat();
        let src = repaired_from(&ours, &noisy);
        for (name, bytes) in [("leaf", &src.leaf_cert), ("DH params", &src.dhparams)] {
            assert!(
                !bytes.windows(4).any(|w| w == b"junk"),
                "{name} kept the copy's bytes"
            );
        }
        assert_eq!(
            pki::parse_certificate(&src.leaf_cert, "x").unwrap().der(),
            pki::parse_certificate(&ours.bundle.leaf_cert, "x")
                .unwrap()
                .der()
        );
        let canonical = pki::dhparams::DhParams::validate(&ours.bundle.dhparams, "x").unwrap();
        assert_eq!(src.dhparams, canonical.pem());
    }

    /// A second leaf under `m`'s CA.
    fn other_leaf_same_ca(m: &Made) -> Bundle {
        let ca_key = PrivateKey::from_pem(&m.ca_key, "ca key").unwrap();
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let leaf = issue_leaf(
            &LeafRequest {
                subject: &Subject::parse("CN=Server").unwrap(),
                days: 100,
                dns_names: &[],
            },
            &key,
            &CaSigner {
                cert_pem: &m.bundle.ca_cert,
                key: &ca_key,
                cert_name: "ca",
                key_name: "ca key",
            },
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        Bundle {
            leaf_cert: leaf.pem.into_bytes(),
            leaf_key: SecretBytes::new(key.to_pkcs8_pem()),
            ..m.bundle.clone()
        }
    }

    #[test]
    fn a_pending_rotation_with_broken_materials_is_not_resumed() {
        let a = made(1, 1000, 365);
        let mut bad = a.bundle.clone();
        bad.leaf_cert = b"truncated".to_vec();
        let copies = vec![copy("d", Some(&a.bundle), Owner::Us)];
        let p = plan(&copies, &ca_key_secret(&a, Some(&bad)), now(), policy());
        assert_ne!(p.action, Action::Resume);
    }
}
