//! The seeds' "Restarting" procedure, made safe: an explicit, resumable sequence of steps. The
//! TMM replica count is recorded on the Deployment before it is scaled to zero, so that any later
//! run (after a crash, a SIGTERM, a timeout) restores it; every wait watches and has a timeout;
//! on any failure after scaling down TMM is scaled back before the error is returned.

pub mod dssm;

pub use crate::model::pods::*;
pub use crate::restart_state::{Order, Strategy};

use std::collections::BTreeMap;
use std::time::Duration;

use crate::cluster::ResourceExt;
use k8s_openapi::api::core::v1::Pod;

use crate::cluster::pods::PodsIn;
use crate::cluster::{Cluster, ClusterError};
use crate::materials::annotations;
use crate::materials::annotations::STOP_NODE_SELECTOR;
use crate::model::targets::{Kind, RollPlan, TmmTarget, Workload};
use crate::restart_state::{next, Mode, Observed, RestartState, Step};
use k8s_openapi::jiff::Timestamp;

#[derive(Debug, Clone)]
pub struct Options {
    /// Restart even when the pre-flight finds the cluster unhealthy (recorded in an Event).
    pub force: bool,
    pub order: Order,
    pub strategy: Strategy,
    /// Bound of every wait.
    pub wait_timeout: Duration,
    /// Where to verify the result with an mTLS PING (default: the Sentinel Service).
    pub probe_endpoint: Option<String>,
    /// The name the served certificate is checked against (default: the endpoint's host).
    pub probe_server_name: Option<String>,
    /// Where the rolling restart reaches each dSSM pod's Redis.
    pub redis: crate::restart::dssm::RedisAccess,
    /// Restart a TMM target whose only pod cannot surge (no Ready pod until its replacement
    /// is): refused before anything is written otherwise.
    pub allow_tmm_gap: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("timed out after {secs}s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    #[error("interrupted by a signal; {}", if *replicas >= 0 { format!("TMM was restored to {replicas} replicas") } else { "TMM was not touched by this process".to_string() })]
    Interrupted { replicas: i32 },
    #[error("the pods restarted, but the mTLS probe failed: {0}")]
    Probe(String),
    #[error("rolling restart of dSSM: {0}")]
    Rollout(String),
    #[error("pre-flight refused the restart, nothing was touched: {0}. Fix that first, or pass --force to restart anyway (recorded in an Event)")]
    Preflight(String),
    #[error("--strategy rolling is refused: the CA changed (annotation {ann} on {0}), so pods with the old and the new materials would refuse each other; use --strategy scale-to-zero", ann = annotations::CA_CHANGED)]
    RollingAfterCaChange(String),
}

/// Lists pods matching `selector`, then watches them until `done` holds for the current set;
/// `what` names the wait when it times out.
pub async fn wait_pods(
    pods: &PodsIn,
    selector: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&BTreeMap<String, Pod>) -> bool,
) -> Result<BTreeMap<String, Pod>, RestartError> {
    match tokio::time::timeout(timeout, pods.watch_until(selector, done)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(RestartError::Timeout {
            what: what.to_string(),
            secs: timeout.as_secs(),
        }),
    }
}

impl Cluster {
    /// Pre-flight (docs/design.md, "The rules every pass keeps"), before any disruptive step and before new materials are written:
    /// every dSSM pod Ready and TMM's rollout complete, waited for (watching) up to `timeout`,
    /// since a rollout that is finishing is not a reason to refuse. Still not so: a Warning Event
    /// `RestartRefused` on the Deployment names the blocking object and nothing is touched.
    /// `force` restarts anyway and says so in an Event.
    pub async fn preflight(&self, force: bool, timeout: Duration) -> Result<(), RestartError> {
        self.preflight_except(force, timeout, false, &[]).await
    }

    /// `preflight`, leaving out what only a publication can start (pods waiting for Secrets
    /// missing in their namespace): the dSSM pods and the budgets over them when `skip_dssm`,
    /// and the TMM targets in `skip`. The restart after the writes pre-flights them all again.
    pub async fn preflight_except(
        &self,
        force: bool,
        timeout: Duration,
        skip_dssm: bool,
        skip: &[crate::model::targets::TmmTarget],
    ) -> Result<(), RestartError> {
        let mut blocking = Vec::new();
        if !skip_dssm {
            blocking.extend(self.dssm_not_ready_after(timeout).await?);
            blocking.extend(self.blocking_pdbs().await?);
        }
        blocking.extend(self.tmm_rollouts_incomplete(timeout, skip).await?);
        if blocking.is_empty() {
            return Ok(());
        }
        let why = blocking.join("; ");
        if force {
            let note = format!("--force: restarting although {why}");
            self.event_on_targets(true, "PreflightOverridden", &note)
                .await;
            return Ok(());
        }
        self.event_on_targets(true, "RestartRefused", &format!("pre-flight: {why}"))
            .await;
        Err(RestartError::Preflight(why))
    }

    /// Every dSSM pod Ready and each StatefulSet at its replicas, waited for up to `timeout`;
    /// what still is not then.
    async fn dssm_not_ready_after(&self, timeout: Duration) -> Result<Vec<String>, RestartError> {
        let pods = self.pods_in(&self.dssm_ns);
        let (ns, sel) = (self.dssm_ns.clone(), self.dssm_selector.clone());
        let what = format!("pods ({sel}) in {ns}");
        let mut blocking = Vec::new();
        let owners = statefulset_owners(&pods.list(&sel).await?);
        let wanted = self.statefulset_replicas(&ns, &owners).await?;
        let verdict = |now: &BTreeMap<String, Pod>| {
            let now: Vec<Pod> = now.values().cloned().collect();
            dssm_not_ready(&now, &ns, &sel).or_else(|| statefulsets_short(&now, &ns, &wanted))
        };
        match wait_pods(&pods, &sel, &what, timeout, |now| verdict(now).is_none()).await {
            Ok(_) => {}
            Err(RestartError::Timeout { .. }) => {
                let list = pods.list(&sel).await?;
                let now = list.into_iter().map(|p| (p.name_any(), p)).collect();
                blocking.extend(verdict(&now));
            }
            Err(e) => return Err(e),
        }
        Ok(blocking)
    }

    /// PodDisruptionBudgets over dSSM pods that allow no disruption now: every eviction would be
    /// refused (429) until the deadline.
    async fn blocking_pdbs(&self) -> Result<Vec<String>, ClusterError> {
        let pdbs = self.pdbs_in(&self.dssm_ns).await?;
        let dssm = self
            .pods_in(&self.dssm_ns)
            .list(&self.dssm_selector)
            .await?;
        Ok(pdbs
            .iter()
            .filter(|b| {
                b.status
                    .as_ref()
                    .and_then(|s| s.disruptions_allowed)
                    .unwrap_or(0)
                    == 0
                    && b.spec
                        .as_ref()
                        .and_then(|s| s.selector.as_ref())
                        .is_some_and(|sel| dssm.iter().any(|p| selects(sel, p.labels())))
            })
            .map(|b| {
                format!(
                    "poddisruptionbudget {}/{} allows no disruption now",
                    self.dssm_ns,
                    b.name_any()
                )
            })
            .collect())
    }

    /// Every target's rollout complete, each waited for (watching) up to `timeout`; what is
    /// still incomplete then is returned. A missing target is an error naming it.
    async fn tmm_rollouts_incomplete(
        &self,
        timeout: Duration,
        skip: &[crate::model::targets::TmmTarget],
    ) -> Result<Vec<String>, ClusterError> {
        let mut blocking = Vec::new();
        for t in self.targets.iter().filter(|t| !skip.contains(t)) {
            let done = self.watch_target(t, move |w| w.rollout_incomplete(t).is_none());
            if tokio::time::timeout(timeout, done).await.is_err() {
                blocking.extend(self.require_workload(t).await?.rollout_incomplete(t));
            }
        }
        Ok(blocking)
    }

    /// A restart record (a recorded count on any TMM target) whose Lease is free or expired
    /// is an orphan: its holder died mid-restart. Take the Lease, restore every recorded target
    /// first, give the Lease back. A live holder's record is left to it (`Locked`). The restart
    /// itself is finished by the next `reconcile`/`restart`, which finds the `restart-needed`
    /// marks.
    pub async fn recover_orphan(&self, patient: bool) -> Result<Option<i32>, ClusterError> {
        let mut recorded = false;
        for t in &self.targets {
            recorded |= self
                .get_workload(t)
                .await?
                .is_some_and(|w| w.recorded().is_some());
        }
        if !recorded {
            return Ok(None);
        }
        let lease = self.acquire_lease_waiting(patient).await?;
        let restored = lease.guard(self.restore_tmm()).await;
        lease.release().await;
        restored
    }

    /// Restores every recorded TMM target (a Deployment to its count, a DaemonSet without the
    /// stop nodeSelector) and removes its record. Returns the pods restored in all, None when
    /// no target had a record. Only the Lease holder may call it. Every target is tried; the
    /// first error is returned after.
    pub async fn restore_tmm(&self) -> Result<Option<i32>, ClusterError> {
        let mut restored = None;
        let mut first_error = None;
        for t in &self.targets {
            match self.restore_target(t).await {
                Ok(Some(n)) => restored = Some(restored.unwrap_or(0) + n),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(target_workload = %t, error = %e, "could not restore");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(restored),
        }
    }

    async fn restore_target(&self, t: &TmmTarget) -> Result<Option<i32>, ClusterError> {
        let Some(w) = self.get_workload(t).await? else {
            return Ok(None);
        };
        let Some(n) = w.recorded() else {
            return Ok(None);
        };
        if w.stopped() || matches!(w, Workload::DaemonSet(_)) {
            self.start_target(t, n).await?;
        }
        self.annotate_target(t, &[(annotations::TMM_REPLICAS, None)])
            .await?;
        Ok(Some(n))
    }

    /// Waits until `t` is rolled out with at least `replicas` pods available.
    async fn wait_tmm_available(
        &self,
        t: &TmmTarget,
        replicas: i32,
        timeout: Duration,
    ) -> Result<(), RestartError> {
        let cond =
            move |w: &Workload| w.rollout_incomplete(t).is_none() && w.available() >= replicas;
        if tokio::time::timeout(timeout, self.watch_target(t, cond))
            .await
            .is_ok()
        {
            Ok(())
        } else {
            Err(RestartError::Timeout {
                what: format!("{t} to have {replicas} available pods"),
                secs: timeout.as_secs(),
            })
        }
    }

    /// One target's restart without leaving it no Ready pod, proven by its pods: where its
    /// controller can roll it (`RollPlan::Controller`), `kubectl rollout restart` and the
    /// rollout waited for; where it cannot surge, the tool replaces the pods one at a time.
    /// The roll is recorded on the workload with `token` first: a resumed run with the same
    /// token waits for that roll instead of starting another.
    pub async fn roll_target(
        &self,
        t: &TmmTarget,
        token: &str,
        timeout: Duration,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        let w = self.require_workload(t).await?;
        let replicas = w.replicas();
        let recorded = recorded_roll(&w, token);
        let since = recorded.unwrap_or_else(|| {
            Timestamp::from_second(Timestamp::now().as_second()).expect("now is a valid time")
        });
        let record = format!("{token}@{since}");
        if recorded.is_some() {
            let _ = writeln!(
                out,
                "{t}: resuming the roll recorded at {since}, not starting another"
            );
        }
        match w.roll_plan() {
            RollPlan::Controller => {
                if recorded.is_none() {
                    self.rollout_restart_target(t, &since.to_string(), &record)
                        .await?;
                    let _ = writeln!(out, "rolling restart of {t} ({replicas} pods)");
                }
                let done = self.watch_target(t, move |w| w.rollout_incomplete(t).is_none());
                if tokio::time::timeout(timeout, done).await.is_err() {
                    return Err(RestartError::Timeout {
                        what: format!("the rollout of {t}"),
                        secs: timeout.as_secs(),
                    });
                }
            }
            RollPlan::OneByOne { why } | RollPlan::Gap { why } => {
                if recorded.is_none() {
                    self.annotate_target(t, &[(annotations::TMM_ROLL, Some(&record))])
                        .await?;
                }
                let _ = writeln!(
                    out,
                    "{t}: {why}; its {replicas} pods are replaced one at a time, each \
                     replacement Ready before the next leaves"
                );
                self.replace_one_by_one(t, &w, since, timeout, out).await?;
            }
        }
        self.prove_rolled(t, &w, since, timeout, out).await
    }

    /// Waits until every live pod of `t` is newer than `since`, Ready, of one template, and
    /// there are as many as it asks for: the roll happened, whatever the replica counts say.
    async fn prove_rolled(
        &self,
        t: &TmmTarget,
        w: &Workload,
        since: Timestamp,
        timeout: Duration,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        let want = self.require_workload(t).await?.replicas().max(w.replicas());
        let api = self.pods_in(&t.namespace);
        let sel = selector_query(w.selector());
        let what = format!("every pod of {t} to be newer than {since}, Ready and of one template");
        wait_pods(&api, &sel, &what, timeout, |now| {
            let pods: Vec<Pod> = now.values().cloned().collect();
            roll_unproven(&pods, since, want).is_none()
        })
        .await?;
        let _ = writeln!(
            out,
            "{t} rolled out: its {want} pods are newer than {since} and Ready"
        );
        Ok(())
    }

    /// Evicts the pods of `t` older than `since` one at a time (PDBs respected), each only once
    /// every pod is Ready and the one before is replaced: at least replicas − 1 stay Ready.
    async fn replace_one_by_one(
        &self,
        t: &TmmTarget,
        w: &Workload,
        since: Timestamp,
        timeout: Duration,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        let api = self.pods_in(&t.namespace);
        let sel = selector_query(w.selector());
        let want = usize::try_from(w.replicas().max(1)).unwrap_or(1);
        let deadline = tokio::time::Instant::now() + timeout;
        let ready_live = |now: &BTreeMap<String, Pod>| {
            now.values()
                .filter(|p| !terminating(p) && !ended(p) && pod_ready(p))
                .count()
        };
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let what = format!("every pod of {t} Ready before the next is replaced");
            let now = wait_pods(&api, &sel, &what, left, |now| ready_live(now) >= want).await?;
            let Some(old) = now
                .values()
                .find(|p| !terminating(p) && !ended(p) && created(p) < Some(since))
            else {
                return Ok(());
            };
            let (name, uid) = (old.name_any(), old.uid().unwrap_or_default());
            api.evict(&name, deadline).await?;
            let _ = writeln!(out, "  evicted pod {}/{name}", t.namespace);
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let what = format!("pod {}/{name} to be replaced by a Ready pod", t.namespace);
            wait_pods(&api, &sel, &what, left, |now| {
                let gone = !now.values().any(|p| {
                    p.uid().as_deref() == Some(uid.as_str()) && !terminating(p) && !ended(p)
                });
                gone && ready_live(now) >= want
            })
            .await?;
        }
    }

    /// Refuses, before anything is written, a rolling restart that would leave a TMM target
    /// with no Ready pod (one pod that cannot surge), unless the operator allows the gap.
    pub async fn check_tmm_gaps(&self, allow: bool) -> Result<(), RestartError> {
        let mut gaps = Vec::new();
        for t in &self.targets {
            if let RollPlan::Gap { why } = self.require_workload(t).await?.roll_plan() {
                gaps.push(format!("{t}: {why}"));
            }
        }
        if gaps.is_empty() || allow {
            return Ok(());
        }
        let why = format!(
            "{}: replacing its pod leaves no TMM pod Ready until the new one is (pass \
             --allow-tmm-gap to accept that gap, or {})",
            gaps.join("; "),
            crate::model::targets::NO_GAP_HINT
        );
        self.event_on_targets(true, "RestartRefused", &format!("pre-flight: {why}"))
            .await;
        Err(RestartError::Preflight(why))
    }

    async fn restart_dssm(
        &self,
        timeout: Duration,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        let pods = self.pods_in(&self.dssm_ns);
        let sel = self.dssm_selector.clone();
        let before = pods.list(&sel).await?;
        let old: BTreeMap<String, String> = before
            .iter()
            .filter(|p| !terminating(p))
            .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
            .collect();
        let wanted = self
            .statefulset_replicas(&self.dssm_ns, &statefulset_owners(&before))
            .await?;
        let deadline = tokio::time::Instant::now() + timeout;
        for name in old.keys() {
            pods.evict(name, deadline).await?;
        }
        let _ = writeln!(
            out,
            "evicted {} dSSM pods in {} ({sel})",
            old.len(),
            self.dssm_ns
        );
        let wait_what = format!(
            "the {} dSSM pods in {} to come back Running and Ready",
            old.len(),
            self.dssm_ns
        );
        let ns = self.dssm_ns.clone();
        wait_pods(&pods, &sel, &wait_what, timeout, |now| {
            let all: Vec<Pod> = now.values().cloned().collect();
            old.iter().all(|(name, uid)| {
                now.get(name).is_some_and(|p| {
                    p.uid().as_deref() != Some(uid.as_str()) && !terminating(p) && pod_ready(p)
                })
            }) && statefulsets_short(&all, &ns, &wanted).is_none()
        })
        .await?;
        let _ = writeln!(
            out,
            "dSSM pods in {} are back, Running and Ready",
            self.dssm_ns
        );
        Ok(())
    }

    /// The whole procedure, for every TMM target: `restart_state::next` decides each step from
    /// what the targets carry and what this run saw, so a run resumes an interrupted one
    /// (skipping the targets it finished). On a failure after TMM was stopped, every target is
    /// restored before the error is returned.
    pub async fn restart(
        &self,
        opts: &Options,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        let mut run = Run {
            // Called with marks present (reconcile) or by the `restart` command: either way,
            // every target without a mark of its own restarts.
            seen: Observed {
                manual: true,
                may_restart: true,
                ..Observed::default()
            },
            counts: BTreeMap::new(),
            scaled: false,
        };
        let result = self.run_restart(opts, &mut run, out).await;
        match &result {
            Err(RestartError::Preflight(_) | RestartError::RollingAfterCaChange(_)) | Ok(()) => {}
            Err(e) => {
                if run.scaled {
                    // TMM is never left at zero.
                    let _ = writeln!(out, "restart failed ({e}); restoring every TMM target");
                    if let Err(r) = self.restore_tmm().await {
                        let _ = writeln!(out, "could not restore TMM: {r}");
                    }
                }
                self.event_on_targets(true, "RestartFailed", &e.to_string())
                    .await;
            }
        }
        result
    }

    /// Reads the state, takes the step `next` decides, until it says `Done`.
    async fn run_restart(
        &self,
        opts: &Options,
        run: &mut Run,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        let mode = Mode {
            strategy: opts.strategy,
            order: opts.order,
        };
        let mut first = true;
        loop {
            let workloads = self.require_workloads().await?;
            let state =
                crate::restart_state::observed(None, &self.targets, &workloads, &self.dssm_ns);
            run.seen.stopped = workloads.iter().map(Workload::stopped).collect();
            if state.resuming() {
                // A recorded restart is resumed whatever the cluster looks like (TMM is at
                // zero): no pre-flight.
                run.seen.preflight = true;
            }
            if first {
                self.announce_resume(&state, out);
                first = false;
            }
            let step = next(&state, &run.seen, mode);
            tracing::debug!(?step, "restart step");
            if step == Step::Done {
                return Ok(());
            }
            self.take_step(step, opts, run, &workloads, out).await?;
        }
    }

    fn announce_resume(&self, state: &RestartState, out: &mut (dyn std::io::Write + Send)) {
        for (t, s) in self.targets.iter().zip(&state.targets) {
            if let Some(n) = s.recorded {
                let _ = writeln!(
                    out,
                    "resuming an interrupted restart: TMM had {n} replicas ({t})"
                );
            }
        }
    }

    /// One step of a restart without a CA rotation (those are taken by `rotation::drive`).
    async fn take_step(
        &self,
        step: Step,
        opts: &Options,
        run: &mut Run,
        workloads: &[Workload],
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        let timeout = opts.wait_timeout;
        match step {
            Step::Preflight => {
                self.preflight(opts.force, timeout).await?;
                if opts.strategy == Strategy::Rolling {
                    self.check_tmm_gaps(opts.allow_tmm_gap).await?;
                }
                run.seen.preflight = true;
            }
            Step::RefuseRolling { target } => {
                let t = self.targets[target].to_string();
                return Err(RestartError::RollingAfterCaChange(t));
            }
            Step::Record { .. } | Step::Stop { .. } | Step::WaitTerminated { .. } => {
                self.stop_step(step, run, workloads, timeout, out).await?
            }
            Step::RestartDssm => {
                self.restart_dssm(timeout, out).await?;
                run.seen.dssm_restarted = true;
            }
            Step::Start { target, token } => {
                self.start_step(target, &token, run, workloads, out).await?
            }
            Step::WaitAvailable { targets } => {
                self.wait_available(&targets, run, workloads, timeout, out)
                    .await?
            }
            Step::RollDssm { .. } => {
                let proof = crate::restart::dssm::PhaseProof::default();
                self.roll_dssm(&opts.redis, proof, timeout, out).await?;
                run.seen.dssm_restarted = true;
            }
            Step::RollTarget { target, token, .. } => {
                let t = &self.targets[target];
                self.roll_target(t, &token, timeout, out).await?;
                let done = [
                    (annotations::TMM_RESTARTED, Some(token.as_str())),
                    (annotations::TMM_ROLL, None),
                ];
                self.annotate_target(t, &done).await?;
            }
            Step::Finish => self.finish_step(opts, run, out).await?,
            Step::Done
            | Step::WritePhase { .. }
            | Step::AwaitRestart { .. }
            | Step::AdvancePhase { .. }
            | Step::FinishRotation => {
                // No rotation record is read by `run_restart`: `next` never decides these.
                unreachable!("a rotation step outside a rotation: {step:?}")
            }
        }
        Ok(())
    }

    /// Starts a stopped target with its recorded count, forgets the count and marks it done.
    async fn start_step(
        &self,
        target: usize,
        token: &str,
        run: &mut Run,
        workloads: &[Workload],
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        let t = &self.targets[target];
        let replicas = workloads[target].recorded().unwrap_or(1);
        self.start_target(t, replicas).await?;
        self.annotate_target(
            t,
            &[
                (annotations::TMM_REPLICAS, None),
                (annotations::TMM_RESTARTED, Some(token)),
            ],
        )
        .await?;
        run.counts.insert(target, replicas);
        let _ = match t.kind {
            Kind::Deployment => writeln!(out, "scaled {t} back to {replicas}"),
            Kind::DaemonSet => writeln!(out, "started {t} again ({replicas} nodes)"),
        };
        Ok(())
    }

    /// Every target loses its marks (an Event says what was restored), then the probe
    /// verifies with the materials TMM now holds.
    async fn finish_step(
        &self,
        opts: &Options,
        run: &mut Run,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        let note = if run.scaled || opts.strategy == Strategy::ScaleToZero {
            let counts: Vec<String> = run
                .counts
                .iter()
                .map(|(i, n)| format!("{}: {n}", self.targets[*i]))
                .collect();
            format!("TMM and dSSM restarted (restored {})", counts.join(", "))
        } else {
            "rolling restart of dSSM and TMM, no interruption".to_string()
        };
        self.finish_restart(&note).await?;
        run.seen.finished = true;
        self.verify_with_probe(opts, out).await
    }

    /// The scale-to-zero steps that take TMM down: record a target's count on it (unless an
    /// interrupted run did: then its count is the truth), stop it, and wait until no pod of
    /// any stopped target is left.
    async fn stop_step(
        &self,
        step: Step,
        run: &mut Run,
        workloads: &[Workload],
        timeout: Duration,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        if !run.scaled {
            run.scaled = true;
            let _ = writeln!(
                out,
                "strategy scale-to-zero (the seeds' procedure): TMM goes to 0 replicas and every \
                 dSSM pod restarts at once; this interrupts traffic"
            );
        }
        match step {
            Step::Record { target } => {
                let n = workloads[target].replicas().to_string();
                self.annotate_target(
                    &self.targets[target],
                    &[(annotations::TMM_REPLICAS, Some(&n))],
                )
                .await?;
            }
            Step::Stop { target } => {
                let t = &self.targets[target];
                let replicas = workloads[target].recorded().unwrap_or(0);
                self.stop_target(t).await?;
                let _ = match t.kind {
                    Kind::Deployment => writeln!(out, "scaled {t} to 0 (was {replicas})"),
                    Kind::DaemonSet => writeln!(
                        out,
                        "stopped {t} (was {replicas}): nodeSelector {STOP_NODE_SELECTOR}=true"
                    ),
                };
            }
            Step::WaitTerminated { targets } => {
                // All targets at once: they terminate in parallel.
                let waits = targets.iter().map(|i| {
                    let t = &self.targets[*i];
                    let sel = selector_query(workloads[*i].selector());
                    let pods = self.pods_in(&t.namespace);
                    async move {
                        let what = format!("the TMM pods in {} to terminate ({t})", t.namespace);
                        // A Failed or Succeeded (evicted) pod stays listed but runs nothing:
                        // it does not hold the scale-down up until the timeout.
                        wait_pods(&pods, &sel, &what, timeout, |p| p.values().all(ended)).await
                    }
                });
                futures::future::try_join_all(waits).await?;
                for i in &targets {
                    let t = &self.targets[*i];
                    let _ = writeln!(out, "no TMM pod left in {} ({t})", t.namespace);
                }
                run.seen.terminated = true;
            }
            _ => unreachable!("not a stop step: {step:?}"),
        }
        Ok(())
    }

    /// TMM available again: every target started waited for at once (they start together,
    /// and the slowest decides when traffic is back anyway).
    async fn wait_available(
        &self,
        targets: &[usize],
        run: &mut Run,
        workloads: &[Workload],
        timeout: Duration,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        // The count this run restored; after a crash, what the target asks for now.
        let count = |i: usize| {
            run.counts
                .get(&i)
                .copied()
                .unwrap_or(workloads[i].replicas())
        };
        futures::future::try_join_all(
            targets
                .iter()
                .map(|i| self.wait_tmm_available(&self.targets[*i], count(*i), timeout)),
        )
        .await?;
        for i in targets {
            let _ = writeln!(
                out,
                "{} has {} available replicas",
                self.targets[*i],
                count(*i)
            );
        }
        run.seen.available = true;
        Ok(())
    }

    /// The restart is done: every target loses its marks, and says so in an Event.
    async fn finish_restart(&self, note: &str) -> Result<(), ClusterError> {
        self.annotate_targets(&[
            (annotations::RESTART_NEEDED, None),
            (annotations::CA_CHANGED, None),
            (annotations::TMM_RESTARTED, None),
            (annotations::TMM_ROLL, None),
        ])
        .await?;
        self.event_on_targets(false, "Restarted", note).await;
        Ok(())
    }

    /// An mTLS PING to Sentinel with the TMM copy, where the Service is reachable from here.
    pub(crate) async fn verify_with_probe(
        &self,
        opts: &Options,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        use crate::checks::Status;
        use crate::contract;
        let endpoint = opts
            .probe_endpoint
            .clone()
            .unwrap_or_else(|| crate::probe::sentinel_endpoint(&self.dssm_ns));
        let name = opts
            .probe_server_name
            .clone()
            .unwrap_or_else(|| crate::probe::default_server_name(&endpoint));
        // Every TMM namespace holds identical copies: the first target's stands for all.
        let tmm_ns = &self.targets[0].namespace;
        let certs = self.get_secret(tmm_ns, contract::CERTS_SECRET).await?;
        let keys = self.get_secret(tmm_ns, contract::KEYS_SECRET).await?;
        let get = |s: &Option<k8s_openapi::api::core::v1::Secret>, k: &str| {
            s.as_ref()
                .and_then(|s| s.data.as_ref())
                .and_then(|d| d.get(k))
                .map(|b| b.0.clone())
        };
        let (Some(ca_cert), Some(leaf_cert), Some(key)) = (
            get(&certs, contract::CA_CERT),
            get(&certs, contract::LEAF_CERT),
            get(&keys, contract::LEAF_KEY),
        ) else {
            let _ = writeln!(
                out,
                "probe skipped: the TMM copy of the Secrets is incomplete"
            );
            return Ok(());
        };
        let report = tokio::task::spawn_blocking(move || {
            let leaf_key = crate::pki::PrivateKey::from_pem(&key, contract::LEAF_KEY)
                .map_err(|e| e.to_string())?;
            let m = crate::probe::ClientMaterials {
                ca_cert,
                leaf_cert,
                leaf_key,
            };
            let prober = crate::probe::Prober::new(&m, true).map_err(|e| e.to_string())?;
            Ok::<_, String>(prober.ping(&endpoint, &name, Duration::from_secs(5)))
        })
        .await
        .expect("the probe panicked")
        .map_err(RestartError::Probe)?;
        match report.status {
            Status::Ok => {
                let _ = writeln!(out, "probe: {}", report.message);
                Ok(())
            }
            // Not resolvable from here (outside the cluster): say so rather than fail.
            Status::Unknown => {
                let _ = writeln!(out, "probe skipped: {}", report.message);
                Ok(())
            }
            _ => Err(RestartError::Probe(report.message)),
        }
    }
}

/// What one restart run keeps in memory beside the persisted state.
struct Run {
    seen: Observed,
    /// Counts restored by this run, by target index (for the wait and the Event).
    counts: BTreeMap<usize, i32>,
    /// This run took TMM down (or resumed a run that did): a failure restores it.
    scaled: bool,
}

#[cfg(test)]
mod tests {
    use super::parse_selector;
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::jiff::Timestamp;

    #[test]
    fn selectors_are_validated_like_the_api_server_and_the_empty_one_is_refused() {
        for good in [
            crate::contract::DSSM_SELECTOR,
            "app=f5-dssm-db",
            "app==x,tier!=cache",
            "app in (a,b),!legacy,release",
            "app.kubernetes.io/name notin (x)",
            "app=",
        ] {
            assert!(
                parse_selector(good).is_ok(),
                "{good}: {:?}",
                parse_selector(good)
            );
        }
        for bad in [
            "",
            "   ",
            "app in ()",
            "app in (a",
            "app in a,b",
            "app=x,",
            ",app=x",
            "app=-x",
            "a b=c",
            "app=x y",
            "Bad_Prefix/app=x",
            "app in (f5-dssm-db, f5-dssm-sentinel))",
        ] {
            assert!(parse_selector(bad).is_err(), "{bad:?} was accepted");
        }
    }

    fn tmm_pod(name: &str, created: &str, hash: &str, ready: bool, gone: bool) -> Pod {
        let mut v = serde_json::json!({
            "metadata": {"name": name, "creationTimestamp": created,
                         "labels": {"app": "f5-tmm", "pod-template-hash": hash}},
            "status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        });
        if gone {
            v["metadata"]["deletionTimestamp"] = serde_json::json!(created);
        }
        serde_json::from_value(v).unwrap()
    }

    /// Counting replicas cannot tell an old pod from a new one: the pods themselves prove a
    /// roll (newer than its start, Ready, one template, as many as asked for).
    #[test]
    fn a_roll_is_proven_by_pods_newer_than_it_of_one_template_not_by_counts() {
        use super::roll_unproven;
        let since: Timestamp = "2026-12-07T04:00:00Z".parse().unwrap();
        let (before, after) = ("2026-12-07T03:59:59Z", "2026-12-07T04:00:00Z");
        let new = |n: &str| tmm_pod(n, after, "b", true, false);
        assert_eq!(roll_unproven(&[new("a"), new("b")], since, 2), None);
        // A terminating old pod does not count against it; a live one does.
        let old_leaving = tmm_pod("o", before, "a", true, true);
        assert_eq!(
            roll_unproven(&[new("a"), new("b"), old_leaving], since, 2),
            None
        );
        let old = tmm_pod("o", before, "b", true, false);
        let why = roll_unproven(&[new("a"), old], since, 2).unwrap();
        assert!(why.contains("pod o is older"), "{why}");
        let why = roll_unproven(
            &[new("a"), tmm_pod("c", after, "b", false, false)],
            since,
            2,
        );
        assert!(why.unwrap().contains("pod c is not Ready"));
        let why = roll_unproven(&[new("a"), tmm_pod("c", after, "z", true, false)], since, 2);
        assert!(why.unwrap().contains("2 templates"));
        let why = roll_unproven(&[new("a")], since, 2);
        assert!(why.unwrap().contains("1 of 2 pods"));
    }

    #[test]
    fn a_recorded_roll_is_found_by_its_token_only() {
        use super::recorded_roll;
        use crate::model::targets::Workload;
        let with = |v: &str| {
            let d = serde_json::json!({"metadata": {"name": "f5-tmm",
                "annotations": {crate::materials::annotations::TMM_ROLL: v}},
                "spec": {"selector": {}, "template": {}}});
            Workload::Deployment(Box::new(serde_json::from_value(d).unwrap()))
        };
        let at: Timestamp = "2026-12-07T04:00:00Z".parse().unwrap();
        assert_eq!(
            recorded_roll(&with("7@2026-12-07T04:00:00Z"), "7"),
            Some(at)
        );
        assert_eq!(recorded_roll(&with("6@2026-12-07T04:00:00Z"), "7"), None);
        assert_eq!(recorded_roll(&with("7@yesterday"), "7"), None);
    }
}
