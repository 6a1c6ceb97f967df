//! `reconcile` and `rotate`: one pass of observe → plan (pure, `plan`) → writes (pure, `writes`)
//! → print them (dry run) or perform them in order, stopping at the first failure. The order is
//! docs/design.md's write order, so that a crash between any two writes is finished by the next run from the saved
//! materials.

pub mod rotation;

use crate::restart::Restarter;
use std::io::Write;
use std::sync::atomic::AtomicBool;

use k8s_openapi::api::core::v1::Secret;

use crate::cluster::events::{EventType, Reason};
use crate::cluster::lease::HolderCheck;
use crate::cluster::{Cluster, ClusterError, Observation};
use crate::contract;
use crate::generate::{self, DhSource, ExistingCa, GenerateError, GenerateOptions};
use crate::inspect::Thresholds;
use crate::materials::{annotations, ca_key_secret_keys, Bundle, SecretObs};
use crate::pki::{self, SecretBytes};
use crate::plan::{self, Action, CaKeySecretState, Plan, Policy};
use crate::writes::{self, Destinations, Precondition, ToPublish, Write as Write_};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// After the writes (this run's or an earlier one's), bringing the pods onto the new Secrets
    /// failed.
    #[error("the new Secrets are written, but bringing the pods onto them failed: {0}. A TMM target this run had scaled down was given back its replicas (the output says so, or why not); what was written stays recorded on the cluster, and `dssm-certs restart` (or the next reconcile) finishes from it once the cause is fixed")]
    Restart(#[from] crate::restart::RestartError),
    /// The pre-flight could not finish (an API error, a timeout): it refused nothing, and
    /// nothing was written.
    #[error("the pre-flight could not finish, nothing was written: {0}")]
    PreflightFailed(#[source] crate::restart::RestartError),
    #[error("{0}")]
    Refused(String),
    /// A recorded CA rotation that cannot be resumed (its record or saved materials).
    #[error(transparent)]
    Rotation(#[from] crate::model::rotation::RecordError),
    #[error(transparent)]
    Revision(#[from] writes::RevisionExhausted),
    /// A recorded CA rotation whose saved materials cannot make a phase's proof.
    #[error(transparent)]
    ProofMaterials(#[from] rotation::ProofMaterialsError),
    #[error("pre-flight refused the rotation, nothing was written: {0}. Fix that first, or pass --force to go ahead anyway (recorded in an Event)")]
    Preflight(String),
    #[error("pre-flight refused phase {number} of 3 ({phase}) of the CA rotation before its first write: {why}. The rotation stays recorded at this phase, and every process still trusts the others; the next run resumes it once that is fixed")]
    PhasePreflight {
        number: i64,
        phase: &'static str,
        why: String,
    },
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
    /// A first publication (nothing restarted): the pods it found, to wait for.
    pub first_start: Option<crate::first_publication::Found>,
}

/// What one pass came to. Returned once per pass and taken apart at once: not boxed.
#[allow(clippy::large_enum_variant)]
enum Pass {
    /// It did all it had to: nothing to write, a dry run, or the writes under the Lease.
    Done(Outcome),
    /// It must write and this process does not hold the Lease: take it, then pass again.
    NeedsLease,
}

/// Whether a pass goes on to write, after the plan.
enum Next {
    /// Nothing to write (or a recorded CA rotation, which `rotation::drive` resumes).
    Nothing,
    Write,
    /// A write is due, and the Lease must be taken first.
    NeedsLease,
}

const PASSES: u32 = 3;

/// Runs a reconcile. A pass with nothing to write takes no Lease and writes nothing (not even
/// the Lease); a pass that must write takes the Lease, then observes and plans again under it,
/// retrying from a fresh observation after a 409 Conflict.
pub async fn reconcile(
    cluster: &Cluster,
    opts: &Options,
    out: &mut (dyn Write + Send),
) -> Result<Outcome, ReconcileError> {
    // A stop asked for in an earlier pass (the agent's Lease lost) does not stop this one.
    crate::stop::clear();
    let mut first = Vec::new();
    let mut restart_pending = false;
    match pass_once(cluster, opts, &mut first, Lease::NotHeld).await {
        Ok(Pass::NeedsLease) => {}
        Ok(Pass::Done(outcome))
            if !opts.dry_run && opts.restart.is_some() && outcome.restart_pending =>
        {
            // Materials were written by an earlier run that did not restart: do it now, under
            // the Lease.
            let _ = out.write_all(&first);
            let _ = writeln!(out, "a restart is pending on the TMM targets");
            restart_pending = true;
        }
        Ok(Pass::Done(outcome)) => {
            let _ = out.write_all(&first);
            return Ok(outcome);
        }
        Err(e) => {
            let _ = out.write_all(&first);
            return Err(e);
        }
    }
    // A pending restart may mean TMM is down under a dead holder: wait out its Lease.
    let wait = if restart_pending {
        HolderCheck::WatchOneDuration
    } else {
        HolderCheck::BelieveAtOnce
    };
    let lease = cluster.acquire_lease_waiting(wait).await?;
    let result = lease
        .guard(async {
            let outcome = write_passes(cluster, opts, out).await?;
            if let (Some(found), Some(r)) = (&outcome.first_start, &opts.restart) {
                crate::first_publication::await_start(cluster, r, found, out).await?;
                return Ok(outcome);
            }
            let ca_key_secret = cluster
                .get_secret(&cluster.dssm_ns, contract::CA_KEY_SECRET)
                .await?;
            let recorded = ca_key_secret.is_some_and(|s| {
                s.metadata
                    .annotations
                    .is_some_and(|a| a.contains_key(crate::materials::annotations::ROTATION))
            });
            if recorded {
                crate::reconcile::rotation::drive(cluster, opts.restart.as_ref(), out).await?;
            } else if let Some(r) = &opts.restart {
                if needs_restart(cluster).await? {
                    Restarter::new(cluster).restart(r, out).await?;
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
        match pass_once(cluster, opts, out, Lease::Held).await {
            Err(ReconcileError::Cluster(e)) if e.is_conflict() && pass < PASSES => {
                tracing::warn!(error = %e, "conflict: observing again");
                let _ = writeln!(out, "conflict ({e}); observing again");
            }
            Err(ReconcileError::Cluster(e)) if e.is_conflict() => break,
            Ok(Pass::Done(outcome)) => {
                result = Ok(outcome);
                break;
            }
            // Under the Lease, `must_write` never asks for it.
            Ok(Pass::NeedsLease) => unreachable!("a pass under the Lease asked for it"),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    result
}

/// Whether this pass runs under the Lease: without it a pass only looks, and says when it
/// would write (`Pass::NeedsLease`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lease {
    Held,
    NotHeld,
}

/// One pass: observe → plan (pure) → writes (pure) → print (dry run) or perform them.
async fn pass_once(
    cluster: &Cluster,
    opts: &Options,
    out: &mut (dyn Write + Send),
    lease: Lease,
) -> Result<Pass, ReconcileError> {
    let unix = time::OffsetDateTime::now_utc().unix_timestamp();
    let obs = cluster.observe().await?;
    let (ca_key_secret, plan) = plan_off_runtime(cluster, &obs, opts.policy, unix).await;
    report_plan(&plan, out);
    let mut outcome = Outcome {
        plan: plan.clone(),
        written: Vec::new(),
        revision: None,
        restart_pending: obs.restart_pending(),
        first_start: None,
    };
    match must_write(&obs, &plan, opts, lease, out)? {
        Next::NeedsLease => return Ok(Pass::NeedsLease),
        Next::Nothing => {
            if !opts.dry_run && !plan.action.writes() {
                report_events(cluster, &obs, &plan, unix, opts.thresholds).await;
            }
            return Ok(Pass::Done(outcome));
        }
        Next::Write => {}
    }
    // Everything that can refuse the pass is checked before the first write.
    refuse_foreign(cluster, &obs)?;
    let phased_from = rolling_start(cluster, &obs, &plan, &ca_key_secret, opts, unix)?;
    // Pods waiting for Secrets missing in their namespace only start on this publication: no
    // restart and no pre-flight for them (`first_publication`).
    let found = publication_pods(cluster, &obs, &plan, opts).await?;
    let destinations = destinations(cluster);
    let revision = writes::revision(&obs, &plan, &ca_key_secret)?;
    outcome.revision = Some(revision);
    let input = |content| writes::Publication {
        destinations: &destinations,
        obs: &obs,
        plan: &plan,
        revision,
        content,
        phased_from: phased_from.as_ref(),
    };
    // Targets whose pods only start on the published Secrets are not marked.
    let list_of = |content| {
        let mut list = writes::writes(&input(content));
        if let Some(f) = &found {
            f.adjust(&mut list, new_ca(&plan));
        }
        list
    };
    let preview = list_of(content(&plan, &ca_key_secret, None));
    let phased = phased_from.is_some();
    outcome.first_start =
        before_writes(cluster, opts, &plan, &preview, found.clone(), phased, out).await?;
    if opts.dry_run {
        print_dry_run(&preview, revision, out);
        return Ok(Pass::Done(outcome));
    }
    // New materials are made outside the pure writes: slow and random.
    let made = match &plan.bundle_to_write {
        Some(_) => None,
        None => Some(new_materials(cluster, &obs, &ca_key_secret, &plan, opts, out).await?),
    };
    let content = content(&plan, &ca_key_secret, made.as_ref());
    let list = list_of(content);
    let done = perform(cluster, &obs, &list, out).await?;
    outcome.written = list.iter().map(Write_::line).collect();
    if phased_from.is_some() {
        // The copies are written phase by phase by `rotation::drive`.
        return Ok(Pass::Done(outcome));
    }
    let bundle = content.bundle().expect("written from a bundle");
    let leaf_note = made.as_ref().and_then(|m| m.leaf_note.as_deref());
    report_written(cluster, &obs, &plan, revision, bundle, leaf_note, &done).await?;
    Ok(Pass::Done(outcome))
}

/// Before the first write: refuses a change of trust the rolling restart cannot roll, then
/// pre-flights the restart to follow, or, when nothing is restarted (only pods that start on the
/// publication), returns the pods to wait for once published.
async fn before_writes(
    cluster: &Cluster,
    opts: &Options,
    plan: &Plan,
    preview: &[Write_],
    found: Option<crate::first_publication::Found>,
    phased: bool,
    out: &mut (dyn Write + Send),
) -> Result<Option<crate::first_publication::Found>, ReconcileError> {
    if let Some(why) = found
        .as_ref()
        .and_then(|f| f.refuse_new_ca(new_ca(plan), rolling(opts)))
    {
        return Err(ReconcileError::Refused(why));
    }
    refuse_rolling_ca_change(cluster, plan, preview, opts, phased)?;
    let restarts = preview.iter().any(|w| matches!(w, Write_::Mark(_)));
    match found {
        Some(f) if f.first() || !restarts => {
            let _ = writeln!(out, "{}", f.describe());
            Ok(Some(f))
        }
        f => {
            if let Some(f) = f.as_ref().filter(|f| !f.running.is_empty()) {
                let _ = writeln!(out, "{}", f.describe());
            }
            preflight(cluster, opts, f.as_ref()).await?;
            Ok(None)
        }
    }
}

/// With a restart to follow and a namespace without our Secrets (or a first publication
/// resumed): the pods there, sorted by what the publication does for them.
async fn publication_pods(
    cluster: &Cluster,
    obs: &Observation,
    plan: &Plan,
    opts: &Options,
) -> Result<Option<crate::first_publication::Found>, ReconcileError> {
    use crate::first_publication::{find, is_fresh, missing_in};
    let namespaces = cluster.namespaces();
    let missing = missing_in(obs, &namespaces);
    let fresh = is_fresh(obs, &namespaces, plan.action);
    if opts.restart.is_none() || (missing.is_empty() && !fresh) {
        return Ok(None);
    }
    Ok(Some(find(cluster, &missing, fresh).await?))
}

/// New materials under a CA that no stored one is: pods on unseen materials cannot trust it.
fn new_ca(plan: &Plan) -> bool {
    plan.action.needs_new_materials() && !plan.reuse_kept_ca
}

fn rolling(opts: &Options) -> bool {
    opts.restart
        .as_ref()
        .is_some_and(|r| r.strategy == crate::restart::Strategy::Rolling)
}

/// What the writes publish: the plan's bundle (repair, resume), the new materials, or in a dry
/// run new materials not issued yet.
fn content<'a>(
    plan: &'a Plan,
    ca_key_secret: &'a CaKeySecretState,
    made: Option<&'a NewMaterials>,
) -> ToPublish<'a> {
    match (made, &plan.bundle_to_write, ca_key_secret) {
        (Some(m), _, _) => ToPublish::Bundle {
            bundle: &m.bundle,
            ca_key: Some(&m.ca_key),
        },
        (None, Some(bundle), _) => ToPublish::Bundle {
            bundle,
            ca_key: None,
        },
        (None, None, CaKeySecretState::Valid { ca_cert, .. }) if plan.reuse_kept_ca => {
            ToPublish::ToBeIssued {
                reused_ca: Some(ca_cert),
            }
        }
        (None, None, _) => ToPublish::ToBeIssued { reused_ca: None },
    }
}

/// Planning runs DH_check and signature checks: off the async runtime.
async fn plan_off_runtime(
    cluster: &Cluster,
    obs: &Observation,
    policy: Policy,
    unix: i64,
) -> (CaKeySecretState, Plan) {
    let (ca_key_secret, copies) = (obs.ca_key_secret.clone(), obs.copies.clone());
    let ns = cluster.dssm_ns.clone();
    tokio::task::spawn_blocking(move || {
        let ca_key_secret = plan::evaluate_ca_key_secret(&ca_key_secret, &ns, unix);
        let plan = plan::plan(&copies, &ca_key_secret, unix, policy);
        (ca_key_secret, plan)
    })
    .await
    .expect("planning panicked")
}

fn report_plan(plan: &Plan, out: &mut (dyn Write + Send)) {
    let action = serde_json::to_value(plan.action).unwrap_or_default();
    let _ = writeln!(out, "plan: {}", action.as_str().unwrap_or(""));
    for r in &plan.reasons {
        // Reasons quote certificate subjects: escaped as `check` escapes them.
        let _ = writeln!(out, "  - {}", crate::checks::printable(r));
    }
}

/// Whether this pass goes on to write: refuses a missing TMM target before any write (the
/// Lease's too), leaves a recorded CA rotation to `rotation::drive`, and asks for the Lease
/// (`Next::NeedsLease`) before a real write.
fn must_write(
    obs: &Observation,
    plan: &Plan,
    opts: &Options,
    lease: Lease,
    out: &mut (dyn Write + Send),
) -> Result<Next, ReconcileError> {
    let record = crate::reconcile::rotation::record_of(&obs.ca_key_secret);
    if plan.action.writes() || record.is_some() {
        if let Some(t) = obs.missing_target() {
            return Err(ClusterError::NoWorkload(t.clone()).into());
        }
    }
    // A recorded CA rotation is resumed at its phase (`rotation::drive`), whatever the plan.
    if let Some(record) = record {
        let record = record?;
        let _ = writeln!(
            out,
            "a CA rotation is in progress: phase {} of 3 ({}); resuming it",
            record.phase.number(),
            record.phase.name()
        );
        if !opts.dry_run && lease == Lease::NotHeld {
            return Ok(Next::NeedsLease);
        }
        return Ok(Next::Nothing);
    }
    Ok(
        match (plan.action.writes(), opts.dry_run || lease == Lease::Held) {
            (false, _) => Next::Nothing,
            (true, false) => Next::NeedsLease,
            (true, true) => Next::Write,
        },
    )
}

/// A Secret we may write but another manager owns is refused before the first write.
fn refuse_foreign(cluster: &Cluster, obs: &Observation) -> Result<(), ReconcileError> {
    let mut secrets = vec![(cluster.dssm_ns.clone(), contract::CA_KEY_SECRET)];
    for ns in cluster.namespaces() {
        secrets.push((ns.clone(), contract::CERTS_SECRET));
        secrets.push((ns, contract::KEYS_SECRET));
    }
    for (ns, name) in secrets {
        let s = obs.raw.get(&(ns.clone(), name.to_string()));
        if let SecretObs::Present {
            owner: crate::materials::Owner::Other(owner),
            ..
        } = crate::cluster::secret_obs(s)
        {
            let what = format!("secret {ns}/{name}");
            return Err(ClusterError::NotOurs { what, owner }.into());
        }
    }
    Ok(())
}

/// With the rolling strategy a new CA goes out in three phases (`rotation`): old and new pods
/// must always trust each other. The phases start from the deployed (dSSM) copy, returned here.
fn rolling_start(
    cluster: &Cluster,
    obs: &Observation,
    plan: &Plan,
    ca_key_secret: &CaKeySecretState,
    opts: &Options,
    unix: i64,
) -> Result<Option<Bundle>, ReconcileError> {
    let rolling = opts
        .restart
        .as_ref()
        .is_some_and(|r| r.strategy == crate::restart::Strategy::Rolling);
    if !rolling || plan.action != Action::RotateCa {
        return Ok(None);
    }
    let dssm_copy = obs.copies.iter().find(|c| c.namespace == cluster.dssm_ns);
    match dssm_copy.map(|c| plan::evaluate_copy_against(c, unix, ca_key_secret.anchors())) {
        Some(plan::CopyState::Valid { bundle, .. }) => Ok(Some(bundle)),
        _ => Err(ReconcileError::Refused(format!(
            "the plan is a CA rotation ({}), and --strategy rolling rolls a new CA out in \
             phases starting from the deployed copy in {}, which is not valid. Nothing was \
             written. Run this once with --strategy scale-to-zero (it interrupts TMM traffic: \
             use a maintenance window)",
            plan.reasons.join("; "),
            cluster.dssm_ns
        ))),
    }
}

/// A pass whose writes change which CAs the pods trust in one step (a new CA outside a phased
/// rotation, or copies of another CA replaced) cannot be rolled out pod by pod: old and new pods
/// would refuse each other. Under the rolling strategy that is refused here, before anything is
/// written, rather than after the writes by the restart (which would then refuse every run).
fn refuse_rolling_ca_change(
    cluster: &Cluster,
    plan: &Plan,
    preview: &[Write_],
    opts: &Options,
    phased: bool,
) -> Result<(), ReconcileError> {
    let rolling = opts
        .restart
        .as_ref()
        .is_some_and(|r| r.strategy == crate::restart::Strategy::Rolling);
    let ca_change = preview
        .iter()
        .any(|w| matches!(w, Write_::Mark(m) if m.ca_changed));
    if !rolling || phased || !ca_change {
        return Ok(());
    }
    Err(ReconcileError::Refused(format!(
        "the plan ({}) replaces the CA that the pods in {} trust in one step, and --strategy \
         rolling restarts pods one at a time: pods on the old and the new materials would refuse \
         each other's certificates. Nothing was written. Run `dssm-certs rotate --ca` for a \
         phased CA rotation nobody notices, or run this once with --strategy scale-to-zero in a \
         maintenance window (it interrupts TMM traffic)",
        plan.reasons.join("; "),
        cluster.namespaces().join(", ")
    )))
}

/// New files reach the pods through kubelet whatever we do next: a restart that the pre-flight
/// would refuse must be refused before the Secrets are written, not after.
/// Pods that only start on this publication (`found`) are left out: they cannot be Ready
/// before it, and the restart after the writes waits for them.
async fn preflight(
    cluster: &Cluster,
    opts: &Options,
    found: Option<&crate::first_publication::Found>,
) -> Result<(), ReconcileError> {
    let (Some(r), false) = (&opts.restart, opts.dry_run) else {
        return Ok(());
    };
    let skip_dssm = found.is_some_and(|f| f.dssm_waits);
    let skip = found.map(|f| f.starting.as_slice()).unwrap_or_default();
    Restarter::new(cluster)
        .preflight_except(r.force, r.wait_timeout, skip_dssm, skip)
        .await
        .map_err(preflight_error)?;
    if r.strategy == crate::restart::Strategy::Rolling {
        Restarter::new(cluster)
            .check_tmm_gaps(r.allow_tmm_gap)
            .await
            .map_err(preflight_error)?;
        // Redis is reached with the deployed dSSM copy: none is deployed when the dSSM
        // namespace lost its Secrets (the roll after the writes checks with the new one).
        if found.is_none_or(|f| f.has_dssm_copy) {
            Restarter::new(cluster)
                .check_dssm_rollout(&r.redis)
                .await
                .map_err(|e| ReconcileError::Preflight(e.to_string()))?;
        }
    }
    Ok(())
}

/// A refusal of the pre-flight, or a pre-flight that could not finish: either way before the
/// first write.
fn preflight_error(e: crate::restart::RestartError) -> ReconcileError {
    match e {
        crate::restart::RestartError::Preflight(why) => ReconcileError::Preflight(why),
        other => ReconcileError::PreflightFailed(other),
    }
}

/// Where this cluster's copies live and what it restarts.
pub(crate) fn destinations(cluster: &Cluster) -> Destinations {
    Destinations {
        dssm_ns: cluster.dssm_ns.clone(),
        namespaces: cluster.namespaces(),
        targets: cluster.targets.clone(),
    }
}

/// The dry run prints the list the executor would perform, one line per write.
fn print_dry_run(list: &[Write_], revision: u64, out: &mut (dyn Write + Send)) {
    let _ = writeln!(
        out,
        "dry run: would write (revision {revision}), in this order:"
    );
    for w in list {
        let _ = writeln!(out, "  would {} {}", w.verbs().0, w.line());
    }
}

/// Performs `list` in order, stopping at the first failure (a 409 Conflict: the caller observes
/// again). Returns the Secret each write left (None for a mark).
pub(crate) async fn perform(
    cluster: &Cluster,
    obs: &Observation,
    list: &[Write_],
    out: &mut (dyn Write + Send),
) -> Result<Vec<Option<Secret>>, ReconcileError> {
    // A signal waits for the list: stopped between a namespace's two Secrets, its pods would
    // mount a leaf with a key that does not match it until the next run.
    let _busy = crate::stop::busy();
    let mut done: Vec<Option<Secret>> = Vec::with_capacity(list.len());
    for w in list {
        match w {
            Write_::Secret(s) => {
                let base = match &s.precondition {
                    Precondition::Create => None,
                    Precondition::Replace { .. } => {
                        obs.raw.get(&(s.namespace.clone(), s.name.to_string()))
                    }
                    Precondition::ReplaceWritten { index } => done[*index].as_ref(),
                };
                let data = s.data.as_ref().map(|d| d.0.clone()).ok_or_else(|| {
                    ReconcileError::Refused(format!(
                        "secret {}/{}: no materials to write",
                        s.namespace, s.name
                    ))
                })?;
                let written = cluster
                    .write_secret(&s.namespace, s.name, data, s.annotations.clone(), base)
                    .await?;
                done.push(Some(written));
            }
            Write_::Mark(m) => {
                let changes = m.changes();
                let changes: Vec<(&str, Option<&str>)> =
                    changes.iter().map(|(k, v)| (*k, v.as_deref())).collect();
                cluster.annotate_target(&m.target, &changes).await?;
                done.push(None);
            }
        }
        let _ = writeln!(out, "{} {}", w.verbs().1, w.line());
    }
    Ok(done)
}

/// Writes `bundle` into the copies that do not hold it yet, in the write order of docs/design.md (`rotation`'s
/// phases). Returns what was written.
pub(crate) async fn write_copies(
    cluster: &Cluster,
    obs: &Observation,
    bundle: &Bundle,
    revision: u64,
    phase: Option<crate::reconcile::rotation::Phase>,
    out: &mut (dyn Write + Send),
) -> Result<Vec<Secret>, ReconcileError> {
    let list: Vec<Write_> =
        writes::copies(&destinations(cluster), obs, Some(bundle), revision, phase)
            .into_iter()
            .map(Write_::Secret)
            .collect();
    let done = perform(cluster, obs, &list, out).await?;
    Ok(done.into_iter().flatten().collect())
}

/// `write_copies`, into the copies of `namespaces` only (a CA rotation's phase writes dSSM's
/// and TMM's copies at different steps).
pub(crate) async fn write_copies_in(
    cluster: &Cluster,
    obs: &Observation,
    bundle: &Bundle,
    revision: u64,
    phase: crate::reconcile::rotation::Phase,
    namespaces: &[String],
    out: &mut (dyn Write + Send),
) -> Result<Vec<Secret>, ReconcileError> {
    let mut destinations = destinations(cluster);
    destinations.namespaces.retain(|ns| namespaces.contains(ns));
    let list: Vec<Write_> = writes::copies(&destinations, obs, Some(bundle), revision, Some(phase))
        .into_iter()
        .map(Write_::Secret)
        .collect();
    let done = perform(cluster, obs, &list, out).await?;
    Ok(done.into_iter().flatten().collect())
}

/// Events on the copies written: what changed, to which revision, and why.
async fn report_written(
    cluster: &Cluster,
    obs: &Observation,
    plan: &Plan,
    revision: u64,
    bundle: &Bundle,
    leaf_note: Option<&str>,
    done: &[Option<Secret>],
) -> Result<(), ReconcileError> {
    let leaf = pki::parse_certificate(&bundle.leaf_cert, contract::LEAF_CERT)
        .map_err(|e| ReconcileError::Refused(e.to_string()))?;
    let reason = match plan.action {
        Action::Resume => match &obs.ca_key_secret {
            SecretObs::Present { annotations: a, .. } => {
                match a.get(writes::PENDING_ACTION).map(String::as_str) {
                    Some("rotate-ca") | Some("replace-invalid") => Reason::CaRotated,
                    Some("publish") => Reason::Published,
                    _ => Reason::Renewed,
                }
            }
            _ => Reason::Renewed,
        },
        a => reason_for(a),
    };
    let note = format!(
        "{}: revision {revision}, leaf valid until {}{}; {}",
        writes::action_name(plan.action),
        pki::format_time(leaf.not_after),
        leaf_note.map(|n| format!(" ({n})")).unwrap_or_default(),
        plan.reasons.join("; ")
    );
    let copies = done
        .iter()
        .flatten()
        .filter(|s| s.metadata.name.as_deref() != Some(contract::CA_KEY_SECRET));
    for s in copies {
        let reason = reason.clone();
        cluster
            .event(s, EventType::Normal, reason, note.clone())
            .await;
    }
    Ok(())
}

fn reason_for(a: Action) -> Reason {
    match a {
        Action::Publish => Reason::Published,
        Action::RenewLeaf => Reason::Renewed,
        Action::RotateCa | Action::ReplaceInvalid => Reason::CaRotated,
        Action::Repair => Reason::Repaired,
        _ => Reason::Reconciled,
    }
}

/// Where new materials' DH params come from: `--dhparam` when given (even with valid params
/// deployed), else the deployed params while valid, else fresh ones.
fn dh_source(explicit: Option<&DhSource>, deployed: Option<&Vec<u8>>) -> DhSource {
    match (explicit, deployed) {
        (Some(explicit), _) => explicit.clone(),
        (None, Some(pem)) => {
            DhSource::Pem(pem.clone(), format!("the deployed {}", contract::DH_PARAMS))
        }
        (None, None) => DhSource::Generate,
    }
}

/// New materials, made like `generate` (slow and random: outside the pure writes).
struct NewMaterials {
    bundle: Bundle,
    ca_key: SecretBytes,
    leaf_note: Option<String>,
}

async fn new_materials(
    cluster: &Cluster,
    obs: &Observation,
    ca_key_secret: &CaKeySecretState,
    plan: &Plan,
    opts: &Options,
    out: &mut (dyn Write + Send),
) -> Result<NewMaterials, ReconcileError> {
    let mut g = opts.generate.clone();
    g.existing_ca = None;
    if plan.reuse_kept_ca {
        if let (CaKeySecretState::Valid { ca_cert, .. }, SecretObs::Present { data, .. }) =
            (ca_key_secret, &obs.ca_key_secret)
        {
            let at = |k: &str| format!("{}/{}[{k}]", cluster.dssm_ns, contract::CA_KEY_SECRET);
            g.existing_ca = Some(ExistingCa {
                cert: ca_cert.clone(),
                key: SecretBytes::new(
                    data.get(ca_key_secret_keys::CA_KEY)
                        .cloned()
                        .unwrap_or_default(),
                ),
                cert_name: at(ca_key_secret_keys::CA_CERT),
                key_name: at(ca_key_secret_keys::CA_KEY),
            });
        }
    }
    g.dhparam = dh_source(opts.dhparam.as_ref(), plan.reusable_dhparams.as_ref());
    let now = time::OffsetDateTime::now_utc();
    let m = tokio::task::spawn_blocking(move || {
        let cancel = AtomicBool::new(false);
        generate::make_materials(&g, now, &cancel)
    })
    .await
    .expect("material generation panicked")?;
    if let Some(note) = &m.leaf_note {
        let _ = writeln!(out, "note: {}", crate::checks::printable(note));
    }
    Ok(NewMaterials {
        bundle: Bundle {
            ca_cert: m.ca_cert,
            leaf_cert: m.leaf_cert,
            leaf_key: m.leaf_key,
            dhparams: m.dhparams.pem().to_vec(),
        },
        ca_key: m.ca_key,
        leaf_note: m.leaf_note,
    })
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
                            EventType::Warning,
                            Reason::CertificateExpiringSoon,
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
            .event(
                anchor,
                EventType::Warning,
                Reason::InvalidMaterials,
                plan.invalid.join("; "),
            )
            .await;
    }
    if plan.out_of_sync {
        cluster
            .event(
                anchor,
                EventType::Warning,
                Reason::CopiesOutOfSync,
                "the copies in the dSSM and TMM namespaces differ".into(),
            )
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The choice the integration tests cannot afford to make for real for `generate` (a
    /// 2048-bit safe-prime search takes up to a minute): tests/reconcile.rs passes a FILE.
    #[test]
    fn an_explicit_dhparam_wins_over_the_deployed_params_which_win_over_fresh_ones() {
        let deployed = b"deployed".to_vec();
        let file = DhSource::File("mine.pem".into());
        let table = [
            (
                Some(&DhSource::Generate),
                Some(&deployed),
                DhSource::Generate,
            ),
            (Some(&file), Some(&deployed), file.clone()),
            (Some(&DhSource::Ffdhe2048), None, DhSource::Ffdhe2048),
            (
                None,
                Some(&deployed),
                DhSource::Pem(deployed.clone(), "the deployed dhparam2048.pem".into()),
            ),
            (None, None, DhSource::Generate),
        ];
        for (explicit, on_cluster, want) in table {
            assert_eq!(dh_source(explicit, on_cluster), want, "{explicit:?}");
        }
    }
}
