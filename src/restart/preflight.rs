//! Pre-flight: before any disruptive step and before new materials are written, every dSSM
//! pod Ready, no PodDisruptionBudget blocking an eviction, TMM's rollouts complete, and no TMM
//! target that would be left without a Ready pod.

use super::*;
use crate::model::targets::blocking_budgets;

impl Restarter<'_> {
    /// A pre-flight refusal: told on every TMM target as a Warning Event, then returned.
    async fn refuse(&self, why: String) -> RestartError {
        self.cluster
            .event_on_targets(
                EventType::Warning,
                Reason::RestartRefused,
                &format!("pre-flight: {why}"),
            )
            .await;
        RestartError::Preflight(why)
    }

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
            self.cluster
                .event_on_targets(EventType::Warning, Reason::PreflightOverridden, &note)
                .await;
            return Ok(());
        }
        Err(self.refuse(why).await)
    }

    /// Every dSSM pod Ready and each StatefulSet at its replicas, waited for up to `timeout`;
    /// what still is not then.
    pub(super) async fn dssm_not_ready_after(
        &self,
        timeout: Duration,
    ) -> Result<Vec<String>, RestartError> {
        let pods = self.cluster.pods_in(&self.cluster.dssm_ns);
        let (ns, sel) = (
            self.cluster.dssm_ns.clone(),
            self.cluster.dssm_selector.clone(),
        );
        let what = format!("pods ({sel}) in {ns}");
        let mut blocking = Vec::new();
        let owners = statefulset_owners(&pods.list(&sel).await?);
        let wanted = self.cluster.statefulset_replicas(&ns, &owners).await?;
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
    pub(super) async fn blocking_pdbs(&self) -> Result<Vec<String>, ClusterError> {
        let pdbs = self.cluster.pdbs_in(&self.cluster.dssm_ns).await?;
        let dssm = self
            .cluster
            .pods_in(&self.cluster.dssm_ns)
            .list(&self.cluster.dssm_selector)
            .await?;
        Ok(blocking_budgets(&self.cluster.dssm_ns, &pdbs, &dssm))
    }

    /// PodDisruptionBudgets over the live pods of `t` (a target the tool replaces itself, one
    /// eviction at a time) that allow no disruption now: its first eviction would be refused
    /// until the deadline.
    async fn tmm_blocking_pdbs(
        &self,
        t: &TmmTarget,
        w: &Workload,
    ) -> Result<Vec<String>, ClusterError> {
        let pods = self
            .cluster
            .pods_in(&t.namespace)
            .list(&selector_query(w.selector()))
            .await?;
        let live: Vec<Pod> = pods
            .into_iter()
            .filter(|p| !terminating(p) && !ended(p))
            .collect();
        if live.is_empty() {
            return Ok(Vec::new());
        }
        let pdbs = self.cluster.pdbs_in(&t.namespace).await?;
        Ok(blocking_budgets(&t.namespace, &pdbs, &live))
    }

    /// Every target's rollout complete, each waited for (watching) up to `timeout`; what is
    /// still incomplete then is returned. A missing target is an error naming it.
    pub(super) async fn tmm_rollouts_incomplete(
        &self,
        timeout: Duration,
        skip: &[crate::model::targets::TmmTarget],
    ) -> Result<Vec<String>, ClusterError> {
        let mut blocking = Vec::new();
        for t in self.cluster.targets.iter().filter(|t| !skip.contains(t)) {
            let done = self
                .cluster
                .watch_target(t, move |w| w.rollout_incomplete(t).is_none());
            if tokio::time::timeout(timeout, done).await.is_err() {
                blocking.extend(
                    self.cluster
                        .require_workload(t)
                        .await?
                        .rollout_incomplete(t),
                );
            }
        }
        Ok(blocking)
    }

    /// Refuses, before anything is written, a rolling restart that would leave a TMM target
    /// with no Ready pod (one pod that cannot surge), unless the operator allows the gap; and
    /// one whose pods the tool must evict one at a time while a PodDisruptionBudget over them
    /// allows no disruption (every eviction would be refused until the deadline, after the
    /// new materials were written).
    pub async fn check_tmm_gaps(&self, allow: bool) -> Result<(), RestartError> {
        let mut gaps = Vec::new();
        let mut budgets = Vec::new();
        for t in &self.cluster.targets {
            let w = self.cluster.require_workload(t).await?;
            let plan = w.roll_plan();
            if let RollPlan::Gap { why } = &plan {
                gaps.push(format!("{t}: {why}"));
            }
            if plan != RollPlan::Controller {
                for b in self.tmm_blocking_pdbs(t, &w).await? {
                    budgets.push(format!(
                        "{t} is replaced one pod at a time by evictions, and {b}"
                    ));
                }
            }
        }
        let why = if !gaps.is_empty() && !allow {
            format!(
                "{}: replacing its pod leaves no TMM pod Ready until the new one is (pass \
                 --allow-tmm-gap to accept that gap, or {})",
                gaps.join("; "),
                crate::model::targets::NO_GAP_HINT
            )
        } else if !budgets.is_empty() {
            format!(
                "{}: every eviction would be refused (let the budget allow one disruption, or \
                 wait until the pods it selects are healthy)",
                budgets.join("; ")
            )
        } else {
            return Ok(());
        };
        Err(self.refuse(why).await)
    }
}
