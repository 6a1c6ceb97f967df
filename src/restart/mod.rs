//! The manual procedure's "Restarting" step, made safe: an explicit, resumable sequence of steps. The
//! TMM replica count is recorded on the Deployment before it is scaled to zero, so that any later
//! run (after a crash, a SIGTERM, a timeout) restores it; every wait watches and has a timeout;
//! on any failure after scaling down TMM is scaled back before the error is returned.

pub mod dssm;
mod preflight;
mod scale_to_zero;
mod tmm;

pub use crate::model::pods::*;
pub use crate::restart_state::{Order, Strategy};

use std::collections::BTreeMap;
use std::time::Duration;

use crate::cluster::ResourceExt;
use k8s_openapi::api::core::v1::Pod;

use crate::cluster::events::{EventType, Reason};
use crate::cluster::pods::PodsIn;
use crate::cluster::{Cluster, ClusterError};
use crate::materials::annotations;
use crate::materials::annotations::STOP_NODE_SELECTOR;
use crate::model::restarts::Restarts;
use crate::model::targets::{Kind, RollPlan, TmmTarget, Workload};
use crate::restart_state::{next, Mode, RestartState, Seen, Step};
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
    #[error("rolling restart of dSSM: secret {namespace}/{certs} holds a leaf that does not match the key of {namespace}/{keys}", certs = crate::contract::CERTS_SECRET, keys = crate::contract::KEYS_SECRET)]
    LeafKeyMismatch { namespace: String },
    /// Where a dSSM pod's Redis listens is unknown.
    #[error("rolling restart of dSSM: {0}")]
    PodEndpoint(#[from] dssm::PodEndpointError),
    #[error("rolling restart of dSSM: {0}")]
    DssmRoll(#[source] Box<dssm::DssmRollError>),
    #[error("rolling restart of dSSM: --redis-endpoint names pod {pod}, which is not a dSSM pod in {namespace} ({selector}); pods: {}", pods.join(", "))]
    StrayEndpoint {
        pod: String,
        namespace: String,
        selector: String,
        pods: Vec<String>,
    },
    #[error("rolling restart of dSSM: secret {namespace}/{secret} has no key {key}")]
    MissingKey {
        namespace: String,
        secret: &'static str,
        key: &'static str,
    },
    #[error("rolling restart of dSSM: {0}")]
    ClientKey(#[source] crate::pki::KeyError),
    #[error("rolling restart of dSSM: {0}")]
    ClientCert(#[source] crate::pki::InspectError),
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

/// The restart orchestration: the manual procedure's steps, driven over one cluster. `Cluster`
/// offers API operations only; what to do with them, and in which order, lives here.
#[derive(Clone, Copy)]
pub struct Restarter<'a> {
    pub cluster: &'a Cluster,
}

impl<'a> Restarter<'a> {
    pub fn new(cluster: &'a Cluster) -> Self {
        Restarter { cluster }
    }
}

impl Restarter<'_> {
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
            seen: Seen {
                manual: true,
                may_restart: true,
                ..Seen::default()
            },
            counts: BTreeMap::new(),
            scaled: false,
            start: crate::model::restarts::so_far(),
        };
        let result = self.run_restart(opts, &mut run, out).await;
        if result.is_ok() {
            let _ = writeln!(out, "{}", Restarts::since(run.start));
        }
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
                self.cluster
                    .event_on_targets(EventType::Warning, Reason::RestartFailed, &e.to_string())
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
            let workloads = self.cluster.require_workloads().await?;
            let state = crate::restart_state::observed(
                None,
                &self.cluster.targets,
                &workloads,
                &self.cluster.dssm_ns,
            );
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
        for (t, s) in self.cluster.targets.iter().zip(&state.targets) {
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
                let t = self.cluster.targets[target].to_string();
                return Err(RestartError::RollingAfterCaChange(t));
            }
            Step::Record { target } => self.record_step(target, run, workloads, out).await?,
            Step::Stop { target } => self.stop_step(target, run, workloads, out).await?,
            Step::WaitTerminated { targets } => {
                self.wait_terminated(&targets, run, workloads, timeout, out)
                    .await?
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
            Step::RollDssm => {
                let proof = crate::restart::dssm::PhaseProof::default();
                self.roll_dssm(&opts.redis, proof, timeout, out).await?;
                run.seen.dssm_restarted = true;
            }
            Step::RollTarget { target, token } => {
                let t = &self.cluster.targets[target];
                self.roll_target_counted(t, &token, timeout, out).await?;
                let done = [
                    (annotations::TMM_RESTARTED, Some(token.as_str())),
                    (annotations::TMM_ROLL, None),
                ];
                self.cluster.annotate_target(t, &done).await?;
            }
            Step::Finish => self.finish_step(opts, run, out).await?,
            // `run_restart` returns on Done before taking a step.
            Step::Done => {}
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
        let t = &self.cluster.targets[target];
        let replicas = workloads[target].recorded().unwrap_or(1);
        self.cluster.start_target(t, replicas).await?;
        self.cluster
            .annotate_target(
                t,
                &[
                    (annotations::TMM_REPLICAS, None),
                    (annotations::TMM_RESTARTED, Some(token)),
                ],
            )
            .await?;
        run.counts.insert(target, replicas);
        let started = u64::try_from(replicas).unwrap_or(0);
        crate::model::restarts::count(crate::model::restarts::Kind::TmmPod, started);
        let _ = match t.kind {
            Kind::Deployment => writeln!(out, "scaled {t} back to {replicas}"),
            Kind::DaemonSet => writeln!(out, "started {t} again ({replicas} nodes)"),
        };
        Ok(())
    }

    /// `roll_target`, with the pods it replaced counted: the live pods of `t` after the roll
    /// that were not there before it.
    pub(crate) async fn roll_target_counted(
        &self,
        t: &TmmTarget,
        token: &str,
        timeout: Duration,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        let before = self.tmm_pod_uids(t).await?;
        self.roll_target(t, token, timeout, out).await?;
        let after = self.tmm_pod_uids(t).await?;
        let replaced = after.difference(&before).count();
        crate::model::restarts::count(
            crate::model::restarts::Kind::TmmPod,
            u64::try_from(replaced).unwrap_or(0),
        );
        Ok(())
    }

    /// The uids of the live pods of `t`.
    async fn tmm_pod_uids(
        &self,
        t: &TmmTarget,
    ) -> Result<std::collections::BTreeSet<String>, RestartError> {
        let w = self.cluster.require_workload(t).await?;
        let pods = self
            .cluster
            .pods_in(&t.namespace)
            .list(&selector_query(w.selector()))
            .await?;
        Ok(pods
            .iter()
            .filter(|p| !terminating(p) && !ended(p))
            .filter_map(|p| p.uid())
            .collect())
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
                .map(|(i, n)| format!("{}: {n}", self.cluster.targets[*i]))
                .collect();
            format!("TMM and dSSM restarted (restored {})", counts.join(", "))
        } else {
            "rolling restart of dSSM and TMM, no interruption".to_string()
        };
        let note = format!("{note}; {}", Restarts::since(run.start));
        self.finish_restart(&note).await?;
        run.seen.finished = true;
        self.verify_with_probe(opts, out).await
    }

    /// The restart is done: every target loses its marks, and says so in an Event.
    async fn finish_restart(&self, note: &str) -> Result<(), ClusterError> {
        self.cluster
            .annotate_targets(&[
                (annotations::RESTART_NEEDED, None),
                (annotations::CA_CHANGED, None),
                (annotations::TMM_RESTARTED, None),
                (annotations::TMM_ROLL, None),
            ])
            .await?;
        self.cluster
            .event_on_targets(EventType::Normal, Reason::Restarted, note)
            .await;
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
            .unwrap_or_else(|| crate::probe::sentinel_endpoint(&self.cluster.dssm_ns));
        let name = opts
            .probe_server_name
            .clone()
            .unwrap_or_else(|| crate::probe::default_server_name(&endpoint));
        // Every TMM namespace holds identical copies: the first target's stands for all.
        let tmm_ns = &self.cluster.targets[0].namespace;
        let certs = self
            .cluster
            .get_secret(tmm_ns, contract::CERTS_SECRET)
            .await?;
        let keys = self
            .cluster
            .get_secret(tmm_ns, contract::KEYS_SECRET)
            .await?;
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
            let prober = crate::probe::Prober::new(&m, crate::redis::ClientIdentity::Presented)
                .map_err(|e| e.to_string())?;
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
    seen: Seen,
    /// Counts restored by this run, by target index (for the wait and the Event).
    counts: BTreeMap<usize, i32>,
    /// This run took TMM down (or resumed a run that did): a failure restores it.
    scaled: bool,
    /// The restarts counted when the run began (it reports its own).
    start: Restarts,
}

#[cfg(test)]
mod tests {
    use super::parse_selector;
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::jiff::Timestamp;

    /// An unreadable key in the dSSM copy fails the roll naming it, and keeps the key error
    /// as its source (it was a String before).
    #[test]
    fn a_bad_client_key_keeps_its_cause_as_the_source() {
        let what = "spk-utilities/dssm-keys-secret[dssm-key.key]";
        let cause = crate::pki::PrivateKey::from_pem(b"not a key", what).unwrap_err();
        let e = super::RestartError::ClientKey(cause);
        assert!(
            e.to_string().starts_with("rolling restart of dSSM: "),
            "{e}"
        );
        assert!(e.to_string().contains(what), "{e}");
        let source = std::error::Error::source(&e).expect("a source");
        assert!(source.to_string().contains(what), "{source}");
    }

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
