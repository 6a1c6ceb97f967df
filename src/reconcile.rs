//! `reconcile` and `rotate`: one pass of observe → plan → act → report against the cluster, with
//! the write order of DESIGN §5 so that a crash between any two writes is finished by the next
//! run from the saved materials.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::AtomicBool;

use k8s_openapi::api::core::v1::Secret;

use crate::check::Thresholds;
use crate::cluster::{Cluster, ClusterError, Observation};
use crate::contract;
use crate::generate::{self, DhSource, ExistingCa, GenerateError, GenerateOptions};
use crate::materials::{annotations, store_keys, Bundle, SecretObs};
use crate::pki::{self, SecretBytes};
use crate::plan::{self, Action, Plan, Policy, StoreState};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error("new materials are written, but the restart failed: {0}. TMM was restored; run `dssm-certs restart` (or the next reconcile) once the cause is fixed")]
    Restart(#[from] crate::restart::RestartError),
    #[error("{0}")]
    Refused(String),
    #[error("pre-flight refused the rotation, nothing was written: {0}. Fix that first, or pass --force to go ahead anyway (recorded in an Event)")]
    Preflight(String),
    /// Internal: the pass must write, so it needs the Lease first.
    #[error("the pass needs the lease")]
    NeedsLease,
    #[error(
        "the Secrets kept changing under us ({attempts} passes ended in a 409 Conflict); try again"
    )]
    KeptConflicting { attempts: u32 },
}

/// What a reconcile needs besides the cluster.
#[derive(Debug, Clone)]
pub struct Options {
    pub dry_run: bool,
    pub policy: Policy,
    /// None: reuse valid deployed DH params, else generate fresh ones.
    pub dhparam: Option<DhSource>,
    /// New materials are made like `generate` with these (existing_ca and dhparam are filled in).
    pub generate: GenerateOptions,
    pub thresholds: Thresholds,
    /// Restart TMM and dSSM after writing (None: only mark the Deployment).
    pub restart: Option<crate::restart::Options>,
}

/// What a pass did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub plan: Plan,
    pub written: Vec<String>,
    pub revision: Option<u64>,
    /// The Deployment says a restart is needed or was interrupted.
    pub restart_pending: bool,
}

const PASSES: u32 = 3;

fn sha256(b: &[u8]) -> String {
    pki::inspect::hex_upper(&openssl::sha::sha256(b), "")
}

fn store_revision(obs: &Observation) -> u64 {
    let from = |s: &SecretObs| match s {
        SecretObs::Present { annotations: a, .. } => a
            .get(annotations::REVISION)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0),
        SecretObs::Missing => 0,
    };
    obs.copies
        .iter()
        .flat_map(|c| [from(&c.certs), from(&c.keys)])
        .chain([from(&obs.store)])
        .max()
        .unwrap_or(0)
}

/// Runs a reconcile. A pass with nothing to write takes no Lease and writes nothing (not even
/// the Lease); a pass that must write takes the Lease, then observes and plans again under it,
/// retrying from a fresh observation after a 409 Conflict.
pub async fn reconcile(
    cluster: &Cluster,
    opts: &Options,
    out: &mut (dyn Write + Send),
) -> Result<Outcome, ReconcileError> {
    let mut first = Vec::new();
    let mut restart_pending = false;
    match pass_once(cluster, opts, &mut first, false).await {
        Err(ReconcileError::NeedsLease) => {}
        Ok(outcome) if !opts.dry_run && opts.restart.is_some() && outcome.restart_pending => {
            // Materials were written by an earlier run that did not restart: do it now, under
            // the Lease.
            let _ = out.write_all(&first);
            let _ = writeln!(out, "a restart is pending on the TMM targets");
            restart_pending = true;
        }
        other => {
            let _ = out.write_all(&first);
            return other;
        }
    }
    // A pending restart may mean TMM is down under a dead holder: wait out its Lease.
    let lease = cluster.acquire_lease_waiting(restart_pending).await?;
    let result = lease
        .guard(async {
            let outcome = write_passes(cluster, opts, out).await?;
            let store = cluster
                .get_secret(&cluster.dssm_ns, contract::CA_KEY_SECRET)
                .await?;
            let recorded = store.is_some_and(|s| {
                s.metadata
                    .annotations
                    .is_some_and(|a| a.contains_key(crate::materials::annotations::ROTATION))
            });
            if recorded {
                crate::rotation::drive(cluster, opts.restart.as_ref(), out).await?;
            } else if let Some(r) = &opts.restart {
                if needs_restart(cluster).await? {
                    cluster.restart(r, out).await?;
                }
            }
            Ok(outcome)
        })
        .await;
    lease.release().await;
    result
}

/// New materials are waiting for pods to pick them up, or a restart was interrupted, on any
/// TMM target.
async fn needs_restart(cluster: &Cluster) -> Result<bool, ClusterError> {
    for t in &cluster.targets {
        if cluster.get_workload(t).await?.is_some_and(|w| {
            w.recorded().is_some() || w.annotations().contains_key(annotations::RESTART_NEEDED)
        }) {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn write_passes(
    cluster: &Cluster,
    opts: &Options,
    out: &mut (dyn Write + Send),
) -> Result<Outcome, ReconcileError> {
    let mut result = Err(ReconcileError::KeptConflicting { attempts: PASSES });
    for pass in 1..=PASSES {
        match pass_once(cluster, opts, out, true).await {
            Err(ReconcileError::Cluster(e)) if e.is_conflict() && pass < PASSES => {
                tracing::warn!(error = %e, "conflict: observing again");
                let _ = writeln!(out, "conflict ({e}); observing again");
            }
            Err(ReconcileError::Cluster(e)) if e.is_conflict() => break,
            other => {
                result = other;
                break;
            }
        }
    }
    result
}

async fn pass_once(
    cluster: &Cluster,
    opts: &Options,
    out: &mut (dyn Write + Send),
    lease_held: bool,
) -> Result<Outcome, ReconcileError> {
    let now = time::OffsetDateTime::now_utc();
    let unix = now.unix_timestamp();
    let obs = cluster.observe().await?;
    // Planning runs DH_check and signature checks: off the async runtime.
    let (store, plan) = {
        let (store, copies) = (obs.store.clone(), obs.copies.clone());
        let (ns, policy) = (cluster.dssm_ns.clone(), opts.policy);
        tokio::task::spawn_blocking(move || {
            let store = plan::evaluate_store(&store, &ns, unix);
            let plan = plan::plan(&copies, &store, unix, policy);
            (store, plan)
        })
        .await
        .expect("planning panicked")
    };
    let _ = writeln!(
        out,
        "plan: {}",
        serde_json::to_value(plan.action)
            .unwrap()
            .as_str()
            .unwrap_or("")
    );
    for r in &plan.reasons {
        let _ = writeln!(out, "  - {r}");
    }
    let restart_pending = obs.restart_pending();
    let mut outcome = Outcome {
        plan: plan.clone(),
        written: Vec::new(),
        revision: None,
        restart_pending,
    };
    // A missing TMM target (or its namespace) is refused before any write, the Lease's too.
    if plan.action.writes() || crate::rotation::record_of(&obs.store).is_some() {
        if let Some(t) = obs.missing_target() {
            return Err(ClusterError::NoWorkload(t.clone()).into());
        }
    }
    // A recorded CA rotation is resumed at its phase (`rotation::drive`), whatever the plan.
    if let Some(record) = crate::rotation::record_of(&obs.store) {
        let record = record.map_err(ReconcileError::Refused)?;
        let _ = writeln!(
            out,
            "a CA rotation is in progress: phase {} of 3 ({}); resuming it",
            record.phase.number(),
            record.phase.name()
        );
        if !opts.dry_run && !lease_held {
            return Err(ReconcileError::NeedsLease);
        }
        return Ok(outcome);
    }
    if plan.action.writes() && !opts.dry_run && !lease_held {
        return Err(ReconcileError::NeedsLease);
    }
    if !plan.action.writes() {
        if !opts.dry_run {
            report_events(cluster, &obs, &plan, unix, opts.thresholds).await;
        }
        return Ok(outcome);
    }

    // Everything that can refuse the pass is checked before the first write.
    let targets = targets(cluster);
    for (ns, name) in &targets {
        if let Some(s) = obs.raw.get(&(ns.clone(), name.to_string())) {
            if let SecretObs::Present {
                owner: crate::materials::Owner::Other(owner),
                ..
            } = crate::cluster::secret_obs(Some(s))
            {
                return Err(ClusterError::NotOurs {
                    what: format!("secret {ns}/{name}"),
                    owner,
                }
                .into());
            }
        }
    }

    // With the rolling strategy a new CA goes out in three phases (`rotation`): old and new
    // pods must always trust each other. The phases start from the deployed (dSSM) copy.
    let rolling = opts
        .restart
        .as_ref()
        .is_some_and(|r| r.strategy == crate::restart::Strategy::Rolling);
    let phased_from = if rolling && plan.action == Action::RotateCa {
        let dssm_copy = obs.copies.iter().find(|c| c.namespace == cluster.dssm_ns);
        match dssm_copy.map(|c| plan::evaluate_copy(c, unix)) {
            Some(plan::CopyState::Valid { bundle, .. }) => Some(bundle),
            _ => {
                return Err(ReconcileError::Refused(format!(
                    "the plan is a CA rotation ({}), and --strategy rolling rolls a new CA out in                      phases starting from the deployed copy in {}, which is not valid. Nothing was                      written. Run this once with --strategy scale-to-zero (it interrupts TMM                      traffic: use a maintenance window)",
                    plan.reasons.join("; "),
                    cluster.dssm_ns
                )))
            }
        }
    } else {
        None
    };

    // New files reach the pods through kubelet whatever we do next: a restart that the
    // pre-flight would refuse must be refused before the Secrets are written, not after.
    if let (Some(r), false) = (&opts.restart, opts.dry_run) {
        cluster
            .preflight(r.force, r.wait_timeout)
            .await
            .map_err(|e| match e {
                crate::restart::RestartError::Preflight(why) => ReconcileError::Preflight(why),
                other => other.into(),
            })?;
        if rolling {
            cluster
                .check_dssm_rollout(&r.redis)
                .await
                .map_err(|e| ReconcileError::Preflight(e.to_string()))?;
        }
    }

    let revision = match (&plan.action, &store) {
        (Action::Resume, StoreState::Valid { revision, .. }) => *revision,
        _ => store_revision(&obs) + 1,
    };
    outcome.revision = Some(revision);
    if opts.dry_run {
        let _ = writeln!(out, "dry run: would write (revision {revision}):");
        if plan.action.needs_new_materials() {
            let _ = writeln!(
                out,
                "  secret {}/{} (new materials, marked pending)",
                cluster.dssm_ns,
                contract::CA_KEY_SECRET
            );
        }
        for (ns, name) in targets
            .iter()
            .filter(|(_, n)| *n != contract::CA_KEY_SECRET)
        {
            let _ = writeln!(out, "  secret {ns}/{name}");
        }
        for t in &cluster.targets {
            let _ = writeln!(
                out,
                "  {t}: annotation {}={revision}",
                annotations::RESTART_NEEDED
            );
        }
        return Ok(outcome);
    }

    // The bundle to publish, and the CA key that goes with it (new materials only).
    let mut leaf_note = None;
    let (bundle, ca_key) = match plan.action {
        Action::Repair | Action::Resume => (
            plan.source
                .clone()
                .expect("repair and resume carry their bundle"),
            None,
        ),
        _ => {
            let m = new_materials(cluster, &obs, &store, &plan, opts).await?;
            if let Some(note) = &m.leaf_note {
                let _ = writeln!(out, "note: {note}");
            }
            leaf_note = m.leaf_note.clone();
            let bundle = Bundle {
                ca_cert: m.ca_cert.clone(),
                leaf_cert: m.leaf_cert.clone(),
                leaf_key: m.leaf_key.clone(),
                dhparams: m.dhparams.pem().to_vec(),
            };
            (bundle, Some(m.ca_key))
        }
    };
    let leaf = pki::parse_certificate(&bundle.leaf_cert, contract::LEAF_CERT)
        .map_err(|e| ReconcileError::Refused(e.to_string()))?;

    // 1. New materials are saved first, marked pending, with the CA key.
    let store_secret = obs
        .raw
        .get(&(cluster.dssm_ns.clone(), contract::CA_KEY_SECRET.to_string()));
    let mut saved_store: Option<Secret> = None;
    if let Some(key) = &ca_key {
        let mut data = BTreeMap::new();
        data.insert(store_keys::CA_CERT.to_string(), bundle.ca_cert.clone());
        data.insert(store_keys::CA_KEY.to_string(), key.expose().to_vec());
        data.insert(
            store_keys::PENDING_CERT.to_string(),
            bundle.leaf_cert.clone(),
        );
        data.insert(
            store_keys::PENDING_KEY.to_string(),
            bundle.leaf_key.expose().to_vec(),
        );
        data.insert(store_keys::PENDING_DH.to_string(), bundle.dhparams.clone());
        if let Some(old) = &phased_from {
            use crate::materials::saved_keys;
            data.insert(saved_keys::PREVIOUS_CA_CERT.into(), old.ca_cert.clone());
            data.insert(saved_keys::PREVIOUS_CERT.into(), old.leaf_cert.clone());
            data.insert(
                saved_keys::PREVIOUS_KEY.into(),
                old.leaf_key.expose().to_vec(),
            );
        }
        let mut ann = BTreeMap::from([
            (annotations::REVISION.to_string(), revision.to_string()),
            (annotations::STATE.to_string(), "pending".to_string()),
            (
                annotations::ACTION.to_string(),
                action_name(plan.action).to_string(),
            ),
            // Saved with the materials: a run that resumes after every copy was written can no
            // longer see the old CA in the copies, and must not forget that it changed.
            (
                PENDING_CA_CHANGED.to_string(),
                copies_hold_another_ca(&obs, &bundle.ca_cert).to_string(),
            ),
        ]);
        if phased_from.is_some() {
            let record = crate::rotation::Record {
                kind: crate::rotation::Kind::Ca,
                phase: crate::rotation::Phase::Trust,
                revision,
                rolled: Vec::new(),
            };
            ann.insert(
                crate::materials::annotations::ROTATION.to_string(),
                record.to_json(),
            );
        }
        let s = cluster
            .write_secret(
                &cluster.dssm_ns,
                contract::CA_KEY_SECRET,
                data,
                ann,
                store_secret,
            )
            .await?;
        outcome.written.push(format!(
            "secret {}/{}",
            cluster.dssm_ns,
            contract::CA_KEY_SECRET
        ));
        let _ = writeln!(
            out,
            "wrote secret {}/{} (revision {revision}, pending)",
            cluster.dssm_ns,
            contract::CA_KEY_SECRET
        );
        saved_store = Some(s);
        if phased_from.is_some() {
            // The copies are written phase by phase by `rotation::drive`.
            let _ = writeln!(
                out,
                "recorded a CA rotation in three phases (trust, switch, drop) on secret {}/{}",
                cluster.dssm_ns,
                contract::CA_KEY_SECRET
            );
            return Ok(outcome);
        }
    }

    // 2. The dSSM copies, then 3. the TMM copies.
    let written_secrets = write_copies(cluster, &obs, &bundle, revision, None, out).await?;
    for s in &written_secrets {
        outcome.written.push(format!(
            "secret {}/{}",
            s.metadata.namespace.as_deref().unwrap_or_default(),
            s.metadata.name.as_deref().unwrap_or_default()
        ));
    }

    // 4. TMM and dSSM must restart to use new files: say so on the Deployment.
    // A resumed rotation marks the restart even when every copy was already written: the run
    // that wrote them may have died before marking it.
    if !outcome.written.is_empty() || plan.action == Action::Resume {
        // Did any copy hold another CA? Then old and new pods cannot talk: no rolling restart.
        // A resumed rotation also reads what the interrupted run saved.
        let saved_ca_change = plan.action == Action::Resume
            && matches!(&obs.store, SecretObs::Present { annotations: a, .. }
                if a.get(PENDING_CA_CHANGED).map(String::as_str) == Some("true"));
        let ca_changed = copies_hold_another_ca(&obs, &bundle.ca_cert) || saved_ca_change;
        let revision_text = revision.to_string();
        let mut marks = vec![(annotations::RESTART_NEEDED, Some(revision_text.as_str()))];
        if ca_changed {
            marks.push((annotations::CA_CHANGED, Some("true")));
        }
        for t in marked_targets(cluster, &plan, &outcome.written) {
            cluster.annotate_target(t, &marks).await?;
            let _ = writeln!(
                out,
                "marked {t}: {}={revision}",
                annotations::RESTART_NEEDED
            );
        }
    }

    // 5. The rotation is complete: the store keeps the CA, the pending copy goes.
    let store_now = saved_store.or_else(|| {
        if plan.action == Action::Resume {
            store_secret.cloned()
        } else {
            None
        }
    });
    if let Some(s) = store_now {
        let mut data: BTreeMap<String, Vec<u8>> = s
            .data
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        data.retain(|k, _| k == store_keys::CA_CERT || k == store_keys::CA_KEY);
        let ann = BTreeMap::from([
            (annotations::REVISION.to_string(), revision.to_string()),
            (annotations::STATE.to_string(), "complete".to_string()),
        ]);
        cluster
            .write_secret(
                &cluster.dssm_ns,
                contract::CA_KEY_SECRET,
                data,
                ann,
                Some(&s),
            )
            .await?;
        let _ = writeln!(
            out,
            "wrote secret {}/{} (revision {revision}, complete)",
            cluster.dssm_ns,
            contract::CA_KEY_SECRET
        );
    }

    // 6. Events on what changed.
    let reason = match plan.action {
        Action::Resume => match &obs.store {
            SecretObs::Present { annotations: a, .. } => {
                match a.get(annotations::ACTION).map(String::as_str) {
                    Some("rotate-ca") | Some("replace-invalid") => "CARotated",
                    Some("publish") => "Published",
                    _ => "Renewed",
                }
            }
            _ => "Renewed",
        },
        a => reason_for(a),
    };
    for s in &written_secrets {
        cluster
            .event(
                s,
                false,
                reason,
                format!(
                    "{}: revision {revision}, leaf valid until {}{}; {}",
                    action_name(plan.action),
                    pki::format_time(leaf.not_after),
                    leaf_note
                        .as_ref()
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default(),
                    plan.reasons.join("; ")
                ),
            )
            .await;
    }
    Ok(outcome)
}

/// Writes `bundle` into the dSSM namespace's two Secrets, then the TMM namespace's (DESIGN §5
/// write order). A copy that already holds the bundle, managed by us, is kept. Returns what was
/// written.
pub(crate) async fn write_copies(
    cluster: &Cluster,
    obs: &Observation,
    bundle: &Bundle,
    revision: u64,
    phase: Option<crate::rotation::Phase>,
    out: &mut (dyn Write + Send),
) -> Result<Vec<Secret>, ReconcileError> {
    let leaf = pki::parse_certificate(&bundle.leaf_cert, contract::LEAF_CERT)
        .map_err(|e| ReconcileError::Refused(e.to_string()))?;
    let mut copy_ann = BTreeMap::from([
        (annotations::REVISION.to_string(), revision.to_string()),
        (annotations::CA_SHA256.to_string(), sha256(&bundle.ca_cert)),
        (
            annotations::CERT_SHA256.to_string(),
            sha256(&bundle.leaf_cert),
        ),
        (
            annotations::NOT_AFTER.to_string(),
            pki::format_time(leaf.not_after),
        ),
    ]);
    if let Some(p) = phase {
        copy_ann.insert(
            crate::materials::annotations::ROTATION_PHASE.to_string(),
            p.name().to_string(),
        );
    }
    let phase_name = phase.map(|p| p.name());
    let certs_data = BTreeMap::from([
        (contract::CA_CERT.to_string(), bundle.ca_cert.clone()),
        (contract::LEAF_CERT.to_string(), bundle.leaf_cert.clone()),
        (contract::DH_PARAMS.to_string(), bundle.dhparams.clone()),
    ]);
    let keys_data = BTreeMap::from([(
        contract::LEAF_KEY.to_string(),
        bundle.leaf_key.expose().to_vec(),
    )]);
    let mut written = Vec::new();
    for ns in cluster.namespaces() {
        for (name, data) in [
            (contract::CERTS_SECRET, &certs_data),
            (contract::KEYS_SECRET, &keys_data),
        ] {
            let existing = obs.raw.get(&(ns.clone(), name.to_string()));
            let same = existing.is_some_and(|s| {
                crate::cluster::secret_obs(Some(s)) != SecretObs::Missing
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
                        .and_then(|a| a.get(crate::materials::annotations::ROTATION_PHASE))
                        .map(String::as_str)
                        == phase_name
            });
            if same {
                continue;
            }
            let s = cluster
                .write_secret(&ns, name, data.clone(), copy_ann.clone(), existing)
                .await?;
            let _ = writeln!(out, "wrote secret {ns}/{name} (revision {revision})");
            written.push(s);
        }
    }
    Ok(written)
}

/// On the CA key Secret while a rotation is pending: whether it changes the CA.
const PENDING_CA_CHANGED: &str = annotations::CA_CHANGED;

/// Whether any deployed copy holds a CA other than `ca_cert`.
fn copies_hold_another_ca(obs: &Observation, ca_cert: &[u8]) -> bool {
    obs.raw.iter().any(|((_, name), s)| {
        name == contract::CERTS_SECRET
            && s.data
                .as_ref()
                .and_then(|d| d.get(contract::CA_CERT))
                .is_some_and(|c| c.0 != ca_cert)
    })
}

fn action_name(a: Action) -> &'static str {
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

fn reason_for(a: Action) -> &'static str {
    match a {
        Action::Publish => "Published",
        Action::RenewLeaf => "Renewed",
        Action::RotateCa | Action::ReplaceInvalid => "CARotated",
        Action::Repair => "Repaired",
        _ => "Reconciled",
    }
}

/// The TMM targets a write concerns: all of them when new materials were made, a rotation
/// resumed or the dSSM copies changed (dSSM restarts, and every TMM must follow); else only
/// those whose namespace got a copy (a target added later, drift in one namespace).
fn marked_targets<'a>(
    cluster: &'a Cluster,
    plan: &Plan,
    written: &[String],
) -> Vec<&'a crate::targets::TmmTarget> {
    let in_ns = |ns: &str| {
        written
            .iter()
            .any(|w| w.starts_with(&format!("secret {ns}/")))
    };
    let all = plan.action != Action::Repair || in_ns(&cluster.dssm_ns);
    cluster
        .targets
        .iter()
        .filter(|t| all || in_ns(&t.namespace))
        .collect()
}

/// Every Secret a write may touch, in write order.
fn targets(cluster: &Cluster) -> Vec<(String, &'static str)> {
    let mut t = vec![(cluster.dssm_ns.clone(), contract::CA_KEY_SECRET)];
    for ns in cluster.namespaces() {
        t.push((ns.clone(), contract::CERTS_SECRET));
        t.push((ns, contract::KEYS_SECRET));
    }
    t
}

async fn new_materials(
    cluster: &Cluster,
    obs: &Observation,
    store: &StoreState,
    plan: &Plan,
    opts: &Options,
) -> Result<generate::Materials, ReconcileError> {
    let mut g = opts.generate.clone();
    g.existing_ca = None;
    if plan.reuse_store_ca {
        if let (StoreState::Valid { ca_cert, .. }, SecretObs::Present { data, .. }) =
            (store, &obs.store)
        {
            let at = |k: &str| format!("{}/{}[{k}]", cluster.dssm_ns, contract::CA_KEY_SECRET);
            g.existing_ca = Some(ExistingCa {
                cert: ca_cert.clone(),
                key: SecretBytes::new(data.get(store_keys::CA_KEY).cloned().unwrap_or_default()),
                cert_name: at(store_keys::CA_CERT),
                key_name: at(store_keys::CA_KEY),
            });
        }
    }
    g.dhparam = match (&opts.dhparam, &plan.reusable_dhparams) {
        (Some(explicit), _) => explicit.clone(),
        (None, Some(pem)) => {
            DhSource::Pem(pem.clone(), format!("the deployed {}", contract::DH_PARAMS))
        }
        (None, None) => DhSource::Generate,
    };
    let now = time::OffsetDateTime::now_utc();
    let m = tokio::task::spawn_blocking(move || {
        let cancel = AtomicBool::new(false);
        generate::make_materials(&g, now, &cancel)
    })
    .await
    .expect("material generation panicked")?;
    Ok(m)
}

/// Warnings that hold whatever the plan: expiring soon, invalid copies, copies out of sync.
async fn report_events(cluster: &Cluster, obs: &Observation, plan: &Plan, now: i64, t: Thresholds) {
    let Some(anchor) = obs
        .raw
        .get(&(cluster.dssm_ns.clone(), contract::CERTS_SECRET.to_string()))
    else {
        return;
    };
    let copies = obs.copies.clone();
    let states = tokio::task::spawn_blocking(move || {
        copies
            .iter()
            .map(|c| (c.namespace.clone(), plan::evaluate_copy(c, now)))
            .collect::<Vec<_>>()
    })
    .await
    .expect("evaluating the copies panicked");
    for (namespace, state) in states {
        if let plan::CopyState::Valid { ca, leaf, .. } = state {
            for (what, cert) in [("CA", &ca), ("leaf", &leaf)] {
                if cert.not_after - now < t.warn {
                    cluster
                        .event(
                            anchor,
                            true,
                            "CertificateExpiringSoon",
                            format!(
                                "{namespace}: the {what} certificate expires at {}",
                                pki::format_time(cert.not_after)
                            ),
                        )
                        .await;
                }
            }
        }
    }
    if !plan.invalid.is_empty() {
        cluster
            .event(anchor, true, "InvalidMaterials", plan.invalid.join("; "))
            .await;
    }
    if plan.out_of_sync {
        cluster
            .event(
                anchor,
                true,
                "CopiesOutOfSync",
                "the copies in the dSSM and TMM namespaces differ".into(),
            )
            .await;
    }
}
