//! Pre-flight: before any disruptive step and before new materials are written, every dSSM
//! pod Ready, no PodDisruptionBudget blocking an eviction, TMM's rollouts complete, and no TMM
//! target that would be left without a Ready pod.

use super::*;

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
            self.event_on_targets(EventType::Warning, Reason::PreflightOverridden, &note)
                .await;
            return Ok(());
        }
        self.event_on_targets(
            EventType::Warning,
            Reason::RestartRefused,
            &format!("pre-flight: {why}"),
        )
        .await;
        Err(RestartError::Preflight(why))
    }

    /// Every dSSM pod Ready and each StatefulSet at its replicas, waited for up to `timeout`;
    /// what still is not then.
    pub(super) async fn dssm_not_ready_after(
        &self,
        timeout: Duration,
    ) -> Result<Vec<String>, RestartError> {
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
    pub(super) async fn blocking_pdbs(&self) -> Result<Vec<String>, ClusterError> {
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
    pub(super) async fn tmm_rollouts_incomplete(
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
        self.event_on_targets(
            EventType::Warning,
            Reason::RestartRefused,
            &format!("pre-flight: {why}"),
        )
        .await;
        Err(RestartError::Preflight(why))
    }
}
