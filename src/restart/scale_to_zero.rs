//! The manual procedure's strategy (`--strategy scale-to-zero`): TMM stopped and waited for,
//! every dSSM pod evicted at once, TMM started again and waited for.

use super::*;

impl Restarter<'_> {
    pub(super) async fn restart_dssm(
        &self,
        timeout: Duration,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        let pods = self.cluster.pods_in(&self.cluster.dssm_ns);
        let sel = self.cluster.dssm_selector.clone();
        let before = pods.list(&sel).await?;
        let old: BTreeMap<String, String> = before
            .iter()
            .filter(|p| !terminating(p))
            .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
            .collect();
        let wanted = self
            .cluster
            .statefulset_replicas(&self.cluster.dssm_ns, &statefulset_owners(&before))
            .await?;
        let deadline = tokio::time::Instant::now() + timeout;
        for name in old.keys() {
            pods.evict(name, deadline).await?;
        }
        {
            use crate::model::restarts::{count, Kind};
            for p in before.iter().filter(|p| old.contains_key(&p.name_any())) {
                match crate::restart::dssm::pod_kind(p) {
                    crate::redis::rollout::PodKind::Sentinel => count(Kind::SentinelRestart, 1),
                    crate::redis::rollout::PodKind::Db => count(Kind::DbRestart, 1),
                }
            }
        }
        let _ = writeln!(
            out,
            "evicted {} dSSM pods in {} ({sel})",
            old.len(),
            self.cluster.dssm_ns
        );
        let wait_what = format!(
            "the {} dSSM pods in {} to come back Running and Ready",
            old.len(),
            self.cluster.dssm_ns
        );
        let ns = self.cluster.dssm_ns.clone();
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
            self.cluster.dssm_ns
        );
        Ok(())
    }

    /// Says once per run that TMM goes down: the manual procedure interrupts traffic.
    fn announce_scale_to_zero(run: &mut Run, out: &mut (dyn std::io::Write + Send)) {
        if !run.scaled {
            run.scaled = true;
            let _ = writeln!(
                out,
                "strategy scale-to-zero (the manual procedure): TMM goes to 0 replicas and every \
                 dSSM pod restarts at once; this interrupts traffic"
            );
        }
    }

    /// Records a target's count on it before it is stopped (unless an interrupted run did:
    /// then its count is the truth).
    pub(super) async fn record_step(
        &self,
        target: usize,
        run: &mut Run,
        workloads: &[Workload],
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        Self::announce_scale_to_zero(run, out);
        let n = workloads[target].replicas().to_string();
        self.cluster
            .annotate_target(
                &self.cluster.targets[target],
                &[(annotations::TMM_REPLICAS, Some(&n))],
            )
            .await?;
        Ok(())
    }

    /// Stops a target whose count is recorded: a Deployment to 0, a DaemonSet by a nodeSelector
    /// no node has.
    pub(super) async fn stop_step(
        &self,
        target: usize,
        run: &mut Run,
        workloads: &[Workload],
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        Self::announce_scale_to_zero(run, out);
        let t = &self.cluster.targets[target];
        let replicas = workloads[target].recorded().unwrap_or(0);
        self.cluster.stop_target(t).await?;
        let _ = match t.kind {
            Kind::Deployment => writeln!(out, "scaled {t} to 0 (was {replicas})"),
            Kind::DaemonSet => writeln!(
                out,
                "stopped {t} (was {replicas}): nodeSelector {STOP_NODE_SELECTOR}=true"
            ),
        };
        Ok(())
    }

    /// Waits until no pod of any stopped target is left (all targets at once: they terminate
    /// in parallel).
    pub(super) async fn wait_terminated(
        &self,
        targets: &[usize],
        run: &mut Run,
        workloads: &[Workload],
        timeout: Duration,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        Self::announce_scale_to_zero(run, out);
        let waits = targets.iter().map(|i| {
            let t = &self.cluster.targets[*i];
            let sel = selector_query(workloads[*i].selector());
            let pods = self.cluster.pods_in(&t.namespace);
            async move {
                let what = format!("the TMM pods in {} to terminate ({t})", t.namespace);
                // A Failed or Succeeded (evicted) pod stays listed but runs nothing:
                // it does not hold the scale-down up until the timeout.
                wait_pods(&pods, &sel, &what, timeout, |p| p.values().all(ended)).await
            }
        });
        futures::future::try_join_all(waits).await?;
        for i in targets {
            let t = &self.cluster.targets[*i];
            let _ = writeln!(out, "no TMM pod left in {} ({t})", t.namespace);
        }
        run.seen.terminated = true;
        Ok(())
    }

    /// TMM available again: every target started waited for at once (they start together,
    /// and the slowest decides when traffic is back anyway).
    pub(super) async fn wait_available(
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
                .map(|i| self.wait_tmm_available(&self.cluster.targets[*i], count(*i), timeout)),
        )
        .await?;
        for i in targets {
            let _ = writeln!(
                out,
                "{} has {} available replicas",
                self.cluster.targets[*i],
                count(*i)
            );
        }
        run.seen.available = true;
        Ok(())
    }
}
