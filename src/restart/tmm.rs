//! TMM's part of a restart: a rolling restart of each target, proven by its pods, and the
//! scale-to-zero records (a target stopped by an interrupted run is restored).

use super::*;
use crate::cluster::lease::HolderCheck;

impl Restarter<'_> {
    /// A restart record (a recorded count on any TMM target) whose Lease is free or expired
    /// is an orphan: its holder died mid-restart. Take the Lease, restore every recorded target
    /// first, give the Lease back. A live holder's record is left to it (`Locked`). The restart
    /// itself is finished by the next `reconcile`/`restart`, which finds the `restart-needed`
    /// marks.
    pub async fn recover_orphan(&self, holder: HolderCheck) -> Result<Option<i32>, ClusterError> {
        let mut recorded = false;
        for t in &self.cluster.targets {
            recorded |= self
                .cluster
                .get_workload(t)
                .await?
                .is_some_and(|w| w.recorded().is_some());
        }
        if !recorded {
            return Ok(None);
        }
        let lease = self.cluster.acquire_lease_waiting(holder).await?;
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
        for t in &self.cluster.targets {
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

    pub(super) async fn restore_target(&self, t: &TmmTarget) -> Result<Option<i32>, ClusterError> {
        let Some(w) = self.cluster.get_workload(t).await? else {
            return Ok(None);
        };
        let Some(n) = w.recorded() else {
            return Ok(None);
        };
        if w.stopped() || matches!(w, Workload::DaemonSet(_)) {
            self.cluster.start_target(t, n).await?;
        }
        self.cluster
            .annotate_target(t, &[(annotations::TMM_REPLICAS, None)])
            .await?;
        Ok(Some(n))
    }

    /// Waits until `t` is rolled out with at least `replicas` pods available.
    pub(super) async fn wait_tmm_available(
        &self,
        t: &TmmTarget,
        replicas: i32,
        timeout: Duration,
    ) -> Result<(), RestartError> {
        let cond =
            move |w: &Workload| w.rollout_incomplete(t).is_none() && w.available() >= replicas;
        if tokio::time::timeout(timeout, self.cluster.watch_target(t, cond))
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
        let w = self.cluster.require_workload(t).await?;
        let replicas = w.replicas();
        let recorded = recorded_roll(&w, token);
        let since = match recorded {
            Some(at) => at,
            None => self.roll_start(t, token, out).await?,
        };
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
                    self.cluster
                        .rollout_restart_target(t, &since.to_string(), &record)
                        .await?;
                    let _ = writeln!(out, "rolling restart of {t} ({replicas} pods)");
                }
                let done = self
                    .cluster
                    .watch_target(t, move |w| w.rollout_incomplete(t).is_none());
                if tokio::time::timeout(timeout, done).await.is_err() {
                    return Err(RestartError::Timeout {
                        what: format!("the rollout of {t}"),
                        secs: timeout.as_secs(),
                    });
                }
            }
            RollPlan::OneByOne { why } | RollPlan::Gap { why } => {
                if recorded.is_none() {
                    self.cluster
                        .annotate_target(t, &[(annotations::TMM_ROLL, Some(&record))])
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

    /// When a new roll of `t` begins, by the API server's clock (the one that stamps the pods'
    /// creationTimestamps): a skewed clock here must neither prove a roll that never happened
    /// nor wait for pods "newer" than a time the server has not reached. Falls back to this
    /// machine's clock, and says so, only where the server stamps no managedFields.
    async fn roll_start(
        &self,
        t: &TmmTarget,
        token: &str,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<Timestamp, RestartError> {
        let nonce = Timestamp::now().as_nanosecond();
        let stamped = self
            .cluster
            .server_time(t, &format!("{token}@pending-{nonce}"))
            .await?;
        let at = stamped.unwrap_or_else(|| {
            let _ = writeln!(
                out,
                "{t}: the API server stamped no managedFields time; the roll is timed by this \
                 machine's clock"
            );
            Timestamp::now()
        });
        Ok(Timestamp::from_second(at.as_second()).expect("a stamped time is valid"))
    }

    /// Waits until every live pod of `t` is newer than `since`, Ready, of one template, and
    /// there are as many as it asks for: the roll happened, whatever the replica counts say.
    pub(super) async fn prove_rolled(
        &self,
        t: &TmmTarget,
        w: &Workload,
        since: Timestamp,
        timeout: Duration,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        let want = self
            .cluster
            .require_workload(t)
            .await?
            .replicas()
            .max(w.replicas());
        let api = self.cluster.pods_in(&t.namespace);
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
    pub(super) async fn replace_one_by_one(
        &self,
        t: &TmmTarget,
        w: &Workload,
        since: Timestamp,
        timeout: Duration,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        let api = self.cluster.pods_in(&t.namespace);
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
}
