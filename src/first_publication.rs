//! A first publication: none of our Secrets exist yet. The dSSM and TMM pods that mount them
//! cannot have started (kubelet keeps a pod ContainerCreating while a Secret it mounts is
//! missing), so there is nothing to restart and nothing a pre-flight could wait for: a
//! pre-flight would wait for pods that only the publication can start. `reconcile` publishes,
//! restarts nothing, waits for those pods to come up Ready, and proves mTLS with the probe.
//!
//! Pods that run although the Secrets are missing (they do not mount them, or mount them
//! `optional: true`) are not restarted: restarting a pod that does not mount the Secrets gives it
//! nothing, and one whose Redis started without TLS files cannot be rolled the Redis-aware way.
//! They are named, with what to do, in the output and in a Warning Event.
//!
//! It is decided per namespace and workload, from the pods (`find`). In a namespace without the
//! Secrets (a TMM namespace or target added to a running install, a run killed between
//! namespaces), the pods that wait for them are left out of the pre-flight and their target is
//! not marked: published, then waited for as here. A pod there that started with them mounted
//! (phase Running) runs on Secrets deleted since (by an operator forcing a new key, or lost by a
//! restore): its process keeps the old files and key, so that is no first publication but a
//! rollout like any other, pre-flight, marks and restart included; with a new CA, which those
//! pods do not trust, the rolling strategy refuses before any write.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

use crate::cluster::events::{EventType, Reason};
use crate::cluster::{Cluster, ClusterError, Observation, ResourceExt};
use crate::contract;
use crate::materials::SecretObs;
use crate::model::targets::TmmTarget;
use crate::plan::Action;
use crate::restart::{self, RestartError};
use crate::writes::Write;

/// How a pod's volumes reach our two Secrets (`dssm-certs-secret`, `dssm-keys-secret`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mount {
    /// At least one of them, not optional: kubelet waits for it.
    Required,
    /// Only as `optional: true`: the pod runs without them.
    Optional,
    /// Not at all.
    Absent,
}

/// How `pod` mounts our Secrets: through `secret` volumes or projected volumes' `secret`
/// sources (pkg/volume/secret, pkg/volume/projected).
pub fn mount_of(pod: &Pod) -> Mount {
    let ours = |name: Option<&str>| {
        name.is_some_and(|n| n == contract::CERTS_SECRET || n == contract::KEYS_SECRET)
    };
    let mut found = Mount::Absent;
    let volumes = pod.spec.iter().flat_map(|s| s.volumes.iter().flatten());
    for v in volumes {
        let direct = v
            .secret
            .iter()
            .map(|s| (s.secret_name.as_deref(), s.optional));
        let projected = v
            .projected
            .iter()
            .flat_map(|p| p.sources.iter().flatten())
            .filter_map(|s| s.secret.as_ref())
            .map(|s| (Some(s.name.as_str()), s.optional));
        for (name, optional) in direct.chain(projected) {
            if !ours(name) {
                continue;
            }
            if optional != Some(true) {
                return Mount::Required;
            }
            found = Mount::Optional;
        }
    }
    found
}

/// This pass publishes into a fresh install: a publication while neither `dssm-certs-secret`
/// nor `dssm-keys-secret` exists in any namespace (the CA key Secret may: a hand install applied
/// it), or the resumption of a publication a run could not finish, whose copies already written
/// hold the very materials it saved (the pods that mount them started on them). Whether it is a
/// first publication also depends on the pods (`Found::first`): pods running on Secrets that
/// were deleted make it a rollout like any other.
pub fn is_fresh(obs: &Observation, namespaces: &[String], action: Action) -> bool {
    match action {
        Action::Publish => missing_in(obs, namespaces).len() == namespaces.len(),
        Action::Resume => matches!(
            &obs.ca_key_secret,
            SecretObs::Present { annotations, .. }
                if annotations.get(crate::writes::PENDING_ACTION).map(String::as_str)
                    == Some(crate::writes::action_name(Action::Publish))
        ),
        _ => false,
    }
}

/// The namespaces (of `namespaces`) where `dssm-certs-secret` or `dssm-keys-secret` is missing:
/// pods there that mount them cannot start, and pods there that run started on Secrets since
/// deleted.
pub fn missing_in(obs: &Observation, namespaces: &[String]) -> Vec<String> {
    namespaces
        .iter()
        .filter(|ns| {
            [contract::CERTS_SECRET, contract::KEYS_SECRET]
                .iter()
                .any(|name| !obs.raw.contains_key(&(ns.to_string(), name.to_string())))
        })
        .cloned()
        .collect()
}

/// The pods found before publishing, by what the publication does for them.
#[derive(Debug, Default, Clone)]
pub struct Found {
    /// Waiting for the Secrets: they start once published.
    pub waiting: Vec<String>,
    /// Running without the Secrets mounted (optional, or not mounted), with why.
    pub without: Vec<String>,
    /// Started with the Secrets mounted although they are missing now (deleted, or lost by a
    /// restore): their processes keep the old files (and the old key) until restarted.
    pub running: Vec<String>,
    /// Some dSSM pods wait for Secrets missing in the dSSM namespace.
    pub dssm_waits: bool,
    /// TMM targets in a namespace without the Secrets, whose pods wait for them and none runs
    /// on them: they start on the publication, nothing to restart or pre-flight there.
    pub starting: Vec<TmmTarget>,
    /// How many pods each dSSM StatefulSet asks for: read before publishing, because with
    /// OrderedReady (the API default) only ordinal 0 exists until it is Ready.
    pub statefulsets: Vec<(String, i32)>,
    /// Every namespace lacked the Secrets (or a first publication is resumed).
    pub fresh: bool,
    /// The dSSM namespace holds both Secrets.
    pub has_dssm_copy: bool,
}

/// Sorts live pods of a namespace without the Secrets: mounting them and started (phase
/// Running: kubelet starts containers only after the mounts) → running on deleted Secrets;
/// mounting them and not started → waiting; Running without mounting them (optional or not at
/// all) → without. Others (starting for another reason) are only waited for.
pub fn sort_pods(pods: &[Pod], found: &mut Found) {
    for p in pods {
        if restart::ended(p) || restart::terminating(p) {
            continue;
        }
        let name = format!("pod {}/{}", p.namespace().unwrap_or_default(), p.name_any());
        let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        match mount_of(p) {
            Mount::Required if running || restart::pod_ready(p) => found.running.push(name),
            Mount::Required => found.waiting.push(name),
            Mount::Optional if running => found
                .without
                .push(format!("{name} (mounts them optional: true)")),
            Mount::Absent if running => found.without.push(format!("{name} (does not mount them)")),
            _ => {}
        }
    }
}

impl Found {
    /// A first publication: no pod runs on Secrets that were deleted, so nothing is restarted
    /// and nothing marked. Pods running on deleted Secrets keep their old files, and the key
    /// meant to be dropped, in memory until restarted: that is a rollout like any other.
    pub fn first(&self) -> bool {
        self.fresh && self.running.is_empty()
    }

    /// Whether the marks for `target` can be left out: its pods only start on this publication,
    /// and no pod elsewhere runs on deleted Secrets (a restart follows then, and rolls every
    /// target: the marks say so).
    pub fn starts(&self, target: &TmmTarget) -> bool {
        self.first() || (self.running.is_empty() && self.starting.contains(target))
    }

    /// The writes for this publication: no mark on the targets that only start on it; pods on
    /// deleted Secrets with a new CA (`new_ca`) mean a change of trust the marks carry.
    pub fn adjust(&self, list: &mut Vec<Write>, new_ca: bool) {
        list.retain(|w| !matches!(w, Write::Mark(m) if self.starts(&m.target)));
        if new_ca && !self.running.is_empty() {
            for w in list.iter_mut() {
                if let Write::Mark(m) = w {
                    m.ca_changed = true;
                }
            }
        }
    }

    /// Pods that run on deleted Secrets with new materials under a new CA: they trust a CA we
    /// cannot see (their files are gone from the API), so pods restarted one at a time would
    /// refuse the others. Refused under the rolling strategy, before any write.
    pub fn refuse_new_ca(&self, new_ca: bool, rolling: bool) -> Option<String> {
        (new_ca && rolling && !self.running.is_empty()).then(|| {
            format!(
                "{} run on dssm-certs-secret/dssm-keys-secret that were deleted since they \
                 started (their processes keep the old files and key), and no stored CA can \
                 sign the new leaf: the new CA cannot be rolled out pod by pod, since pods on \
                 the old and the new materials would refuse each other. Nothing was written. \
                 Run this once with --strategy scale-to-zero in a maintenance window (it \
                 interrupts TMM traffic), or restore the deleted Secrets",
                self.running.join(", ")
            )
        })
    }

    /// What the output says about the pods before the writes.
    pub fn describe(&self) -> String {
        let mut s = if !self.running.is_empty() {
            format!(
                "not a first publication: {} run on dssm-certs-secret/dssm-keys-secret deleted \
                 since they started (their processes keep the old files and key): the \
                 published Secrets are rolled out as any new materials, pre-flight and restart \
                 included; {} pods waiting for them start once they are published",
                self.running.join(", "),
                self.waiting.len()
            )
        } else if self.first() {
            format!(
                "first publication: none of our Secrets exist yet; {} pods are waiting for \
                 them and start once they are published; nothing is restarted",
                self.waiting.len()
            )
        } else {
            format!(
                "first publication into namespaces without our Secrets: {} pods are waiting \
                 for them and start once they are published, and are not restarted",
                self.waiting.len()
            )
        };
        if !self.without.is_empty() {
            s.push_str(&format!(
                ". Running without them, and not restarted: {}. Their processes keep running \
                 without the published materials until they restart: run `dssm-certs restart` \
                 (or delete those pods) once you have checked that they should use them",
                self.without.join(", ")
            ));
        }
        s
    }
}

/// The dSSM pods and every TMM target's pods in `missing` (the namespaces without our
/// Secrets), sorted; `fresh`: every namespace is without them (or a publication is resumed).
pub async fn find(
    cluster: &Cluster,
    missing: &[String],
    fresh: bool,
) -> Result<Found, ClusterError> {
    let mut found = Found {
        fresh,
        has_dssm_copy: !missing.contains(&cluster.dssm_ns),
        ..Found::default()
    };
    let dssm = cluster
        .pods_in(&cluster.dssm_ns)
        .list(&cluster.dssm_selector)
        .await?;
    if missing.contains(&cluster.dssm_ns) {
        let before = found.waiting.len();
        sort_pods(&dssm, &mut found);
        found.dssm_waits = found.waiting.len() > before;
    }
    found.statefulsets = cluster
        .statefulset_replicas(&cluster.dssm_ns, &restart::statefulset_owners(&dssm))
        .await?;
    for t in cluster
        .targets
        .iter()
        .filter(|t| missing.contains(&t.namespace))
    {
        let w = cluster.require_workload(t).await?;
        let sel = restart::selector_query(w.selector());
        let pods = cluster.pods_in(&t.namespace).list(&sel).await?;
        let mut of_target = Found::default();
        sort_pods(&pods, &mut of_target);
        if of_target.running.is_empty() && !of_target.waiting.is_empty() {
            found.starting.push(t.clone());
        }
        found.waiting.extend(of_target.waiting);
        found.running.extend(of_target.running);
        found.without.extend(of_target.without);
    }
    Ok(found)
}

/// After publishing: every dSSM pod Ready and every TMM target rolled out, watched for up to
/// `timeout` in all, then an mTLS handshake with the published materials.
pub async fn await_start(
    cluster: &Cluster,
    opts: &restart::Options,
    found: &Found,
    out: &mut (dyn std::io::Write + Send),
) -> Result<(), RestartError> {
    let timeout = opts.wait_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let _ = writeln!(
        out,
        "waiting up to {}s for the dSSM and TMM pods to come up Ready",
        timeout.as_secs()
    );
    let pods = cluster.pods_in(&cluster.dssm_ns);
    let (ns, sel) = (cluster.dssm_ns.clone(), cluster.dssm_selector.clone());
    let what = format!("the dSSM pods ({sel}) in {ns} to become Ready");
    // With OrderedReady (the API default) only ordinal 0 exists until it is Ready: wait for as
    // many Ready pods as each StatefulSet asks for, not only for the pods there now.
    let wanted = &found.statefulsets;
    let ready = |now: &BTreeMap<String, Pod>| {
        let list: Vec<Pod> = now.values().cloned().collect();
        restart::dssm_not_ready(&list, &ns, &sel)
            .or_else(|| restart::statefulsets_short(&list, &ns, wanted))
            .is_none()
    };
    restart::wait_pods(&pods, &sel, &what, left(deadline), ready).await?;
    let _ = writeln!(out, "dSSM pods in {ns} are Running and Ready");
    for t in &cluster.targets {
        let done = cluster.watch_target(t, move |w| w.rollout_incomplete(t).is_none());
        if tokio::time::timeout(left(deadline), done).await.is_err() {
            return Err(RestartError::Timeout {
                what: format!("{t} to become available"),
                secs: timeout.as_secs(),
            });
        }
        let _ = writeln!(out, "{t} is available");
    }
    crate::restart::Restarter::new(cluster)
        .verify_with_probe(opts, out)
        .await?;
    let note = match found.without.len() {
        0 => "first publication: dSSM and TMM came up on the published Secrets".to_string(),
        n => format!(
            "first publication: dSSM and TMM are up; {n} pods run without the Secrets mounted \
             and were not restarted: {}",
            found.without.join(", ")
        ),
    };
    // Pods left running without the Secrets: a Warning, for someone to restart them.
    let event_type = if found.without.is_empty() {
        EventType::Normal
    } else {
        EventType::Warning
    };
    cluster
        .event_on_targets(event_type, Reason::Published, &note)
        .await;
    Ok(())
}

fn left(deadline: tokio::time::Instant) -> Duration {
    deadline.saturating_duration_since(tokio::time::Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(volumes: serde_json::Value, phase: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"containers": [{"name": "c"}], "volumes": volumes},
            "status": {"phase": phase, "conditions": [
                {"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        }))
        .unwrap()
    }

    #[test]
    fn pods_are_sorted_by_how_they_mount_our_secrets() {
        let certs = json!({"name": "a", "secret": {"secretName": "dssm-certs-secret"}});
        let keys_optional =
            json!({"name": "b", "secret": {"secretName": "dssm-keys-secret", "optional": true}});
        let projected = json!({"name": "c", "projected": {"sources": [
            {"secret": {"name": "dssm-keys-secret"}}]}});
        let other = json!({"name": "d", "secret": {"secretName": "something-else"}});
        let table = [
            (json!([certs.clone()]), Mount::Required),
            (json!([keys_optional.clone()]), Mount::Optional),
            (
                json!([keys_optional.clone(), certs.clone()]),
                Mount::Required,
            ),
            (json!([projected]), Mount::Required),
            (json!([other]), Mount::Absent),
            (json!([]), Mount::Absent),
        ];
        for (volumes, want) in table {
            assert_eq!(
                mount_of(&pod(volumes.clone(), "Pending", false)),
                want,
                "{volumes}"
            );
        }
        let mut found = Found::default();
        sort_pods(
            &[
                pod(json!([certs]), "Pending", false),
                pod(json!([certs.clone()]), "Running", true),
                pod(json!([keys_optional]), "Running", true),
                pod(json!([]), "Running", true),
                pod(json!([]), "Pending", false),
            ],
            &mut found,
        );
        assert_eq!(found.waiting, ["pod ns/p"]);
        // Started with them mounted: they run on Secrets deleted since.
        assert_eq!(found.running, ["pod ns/p"]);
        assert_eq!(
            found.without,
            [
                "pod ns/p (mounts them optional: true)",
                "pod ns/p (does not mount them)"
            ]
        );
    }
}
