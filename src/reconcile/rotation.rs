//! The CA rotation nobody notices: three phases, each written to every copy, rolled through
//! every consumer and proven by new mutual-TLS handshakes before the next starts, so that no
//! process is ever more than one phase away from another:
//!
//! - **trust**: `dssm-ca.crt` = old CA + new CA (old first), the leaf unchanged;
//! - **switch**: the new leaf and key, signed by the new CA, the bundle unchanged;
//! - **drop**: `dssm-ca.crt` = the new CA only.
//!
//! The old CA goes first: with two CAs of the same subject, OpenSSL picks the first by name when
//! the leaf has no authority key identifier (hand-made v1 leaves have none), so the old leaves
//! in use keep verifying; new leaves carry an AKI. Cross-signing the new CA with the old was not
//! needed (tests/rotation_load.rs decides the bundle order with Redis and openssl).
//!
//! The record of where a rotation stands is a small JSON annotation on the CA key Secret, with
//! the materials of every phase saved next to it: any run (rotate, reconcile, the agent) that
//! finds it resumes at that phase, from the saved materials.

use crate::restart::Restarter;
use std::collections::BTreeMap;
use std::io::Write;

use crate::cluster::events::{EventType, Reason};
use crate::cluster::Cluster;
use crate::contract;
use crate::materials::{annotations, ca_key_secret_keys, saved_keys, SecretObs};
use crate::model::restarts::Restarts;
use crate::pki::{self, PrivateKey, SecretBytes};
use crate::reconcile::{write_copies, write_copies_in, ReconcileError};
use crate::redis::ClientMaterials;
use crate::restart_state::{copies_due, next_in_rotation, Copies, RotationStep, Seen};

pub use crate::model::rotation::*;

/// The client materials a phase's proof needs could not be built from what the rotation saved.
#[derive(Debug, thiserror::Error)]
pub enum ProofMaterialsError {
    #[error(transparent)]
    Key(#[from] pki::KeyError),
    #[error(transparent)]
    Issue(#[from] pki::IssueError),
}

fn materials(
    ca: Vec<u8>,
    leaf: &[u8],
    key: &SecretBytes,
    what: &str,
) -> Result<ClientMaterials, ProofMaterialsError> {
    Ok(ClientMaterials {
        ca_cert: ca,
        leaf_cert: leaf.to_vec(),
        leaf_key: PrivateKey::from_pem(key.expose(), what)?,
    })
}

/// What new handshakes must show once every dSSM process runs `phase`, beyond serving and
/// accepting the dSSM copy: in trust, a leaf of the new CA is already accepted (so TMM pods
/// that switch first are served); in switch, the old leaf is still accepted (TMM pods not yet
/// rolled); in drop, the old leaf is refused.
pub fn phase_proof(
    saved: &Saved,
    phase: Phase,
    ns: &str,
) -> Result<crate::restart::dssm::PhaseProof, ProofMaterialsError> {
    let old = |ca: Vec<u8>| {
        materials(
            ca,
            &saved.old_leaf,
            &saved.old_key,
            &format!(
                "{ns}/{}[{}]",
                contract::CA_KEY_SECRET,
                saved_keys::PREVIOUS_KEY
            ),
        )
    };
    Ok(match phase {
        Phase::Trust => crate::restart::dssm::PhaseProof {
            accepts: vec![probe_leaf_of_new_ca(saved, ns)?],
            refuses: vec![],
            keep_sentinels: false,
        },
        Phase::Switch => crate::restart::dssm::PhaseProof {
            accepts: vec![old(saved.both_cas())?],
            refuses: vec![],
            keep_sentinels: false,
        },
        // Dropping the old CA needs no sentinel restart: they present the new leaf since switch,
        // and trusting the old CA too until their next restart is harmless once its key is
        // gone (it went when the rotation started).
        Phase::Drop => crate::restart::dssm::PhaseProof {
            accepts: vec![],
            refuses: vec![old(saved.both_cas())?],
            keep_sentinels: true,
        },
    })
}

/// A throwaway one-day leaf of the new CA (never written anywhere): proves that the processes
/// trust the new CA before any of them serves a leaf of it.
fn probe_leaf_of_new_ca(saved: &Saved, ns: &str) -> Result<ClientMaterials, ProofMaterialsError> {
    let at = |k: &str| format!("{ns}/{}[{k}]", contract::CA_KEY_SECRET);
    let ca_key = PrivateKey::from_pem(saved.new_ca_key.expose(), &at(ca_key_secret_keys::CA_KEY))?;
    let key = PrivateKey::generate(pki::KeyAlgorithm::EcdsaP256)?;
    let subject = pki::issue::Subject::parse("O=dssm-certs, CN=rotation probe")?;
    let dns = [contract::SENTINEL_SERVICE.to_string()];
    let req = pki::LeafRequest {
        subject: &subject,
        days: 1,
        dns_names: &dns,
    };
    let (cert_name, key_name) = (
        at(ca_key_secret_keys::CA_CERT),
        at(ca_key_secret_keys::CA_KEY),
    );
    let signer = pki::CaSigner {
        cert_pem: &saved.new_ca,
        key: &ca_key,
        cert_name: &cert_name,
        key_name: &key_name,
    };
    let leaf = pki::issue_leaf(&req, &key, &signer, time::OffsetDateTime::now_utc())?;
    Ok(ClientMaterials {
        ca_cert: saved.both_cas(),
        leaf_cert: leaf.pem.into_bytes(),
        leaf_key: key,
    })
}

/// Resumes the recorded CA rotation, phase after phase, until it is complete. Each phase: its
/// materials into every copy (dSSM namespace first), then every consumer rolled (dSSM the
/// Redis-aware way, then TMM), proven by new handshakes, then the next phase recorded; which
/// step comes next is `restart_state::next`'s decision from the record. Without restart options
/// (`--no-restart`) it writes the current phase and stops: nothing moves on until that phase
/// has been rolled.
pub async fn drive(
    cluster: &Cluster,
    restart: Option<&crate::restart::Options>,
    out: &mut (dyn Write + Send),
) -> Result<(), ReconcileError> {
    let start = crate::model::restarts::so_far();
    let result = drive_from(cluster, restart, start, out).await;
    if result.is_ok() {
        let _ = writeln!(out, "{}", Restarts::since(start));
    }
    result
}

/// `drive`'s steps; `start` is the restart count when the run began (the last Event says
/// what this run restarted).
async fn drive_from(
    cluster: &Cluster,
    restart: Option<&crate::restart::Options>,
    start: Restarts,
    out: &mut (dyn Write + Send),
) -> Result<(), ReconcileError> {
    let mut seen = Seen {
        may_restart: restart.is_some(),
        ..Seen::default()
    };
    let mut written: Option<(Phase, Copies)> = None;
    // The phase whose pre-flight passed in this run: each phase is checked at its first step
    // here, whether this run starts it or resumes it.
    let mut checked: Option<Phase> = None;
    loop {
        let obs = cluster.observe().await?;
        let SecretObs::Present { data, .. } = &obs.ca_key_secret else {
            return Ok(());
        };
        let Some(record) = record_of(&obs.ca_key_secret) else {
            return Ok(());
        };
        let record = record?;
        let saved = Saved::read(data, &cluster.dssm_ns)?;
        let workloads = cluster.require_workloads().await?;
        let state = crate::restart_state::observed(
            Some(record.clone()),
            &cluster.targets,
            &workloads,
            &cluster.dssm_ns,
        );
        seen.phase_written = written == Some((record.phase, copies_due(&state, &record)));
        let step = next_in_rotation(&state, &record, &seen);
        tracing::debug!(?step, "rotation step");
        let phase = record.phase;
        if let (Some(r), true) = (restart, acts(&step) && checked != Some(phase)) {
            phase_preflight(cluster, r, phase, out).await?;
            checked = Some(phase);
        }
        match (step, restart) {
            (RotationStep::WritePhase { phase, copies }, _) => {
                write_phase(cluster, &obs, &saved, (phase, copies), record.revision, out).await?;
                written = Some((phase, copies));
            }
            // Without restart options (`--no-restart`) a phase is never rolled here:
            // `may_restart` is false, so `next_in_rotation` says AwaitRestart.
            (RotationStep::AwaitRestart { phase }, _)
            | (RotationStep::RollDssm { phase } | RotationStep::RollTarget { phase, .. }, None) => {
                return await_restart(cluster, &record, phase, out).await;
            }
            (RotationStep::RollDssm { .. }, Some(r)) => {
                // In drop, the sentinels are not restarted (`phase_proof`).
                let proof = phase_proof(&saved, phase, &cluster.dssm_ns)?;
                Restarter::new(cluster)
                    .roll_dssm(&r.redis, proof, r.wait_timeout, out)
                    .await?;
                record_rolled(cluster, record, state.dssm.clone()).await?;
            }
            (RotationStep::RollTarget { target, token, .. }, Some(r)) => {
                let t = &cluster.targets[target];
                roll_target_in_phase(cluster, r, t, &token, phase, out).await?;
                record_rolled(cluster, record, state.targets[target].id.clone()).await?;
            }
            (RotationStep::AdvancePhase { to, .. }, _) => {
                phase_rolled(cluster, &obs, phase, None, out).await;
                advance_phase(cluster, &obs, record, to).await?;
            }
            (RotationStep::FinishRotation, _) => {
                let restarts = Restarts::since(start);
                phase_rolled(cluster, &obs, phase, Some(restarts), out).await;
                return finish_rotation(cluster, &obs, &saved, &record, out).await;
            }
        }
    }
}

/// Whether `step` writes or rolls (then the phase's pre-flight must have passed in this run).
fn acts(step: &RotationStep) -> bool {
    matches!(
        step,
        RotationStep::WritePhase { .. }
            | RotationStep::RollDssm { .. }
            | RotationStep::RollTarget { .. }
    )
}

/// Records that the rotation moved on to phase `to`, nothing rolled in it yet.
async fn advance_phase(
    cluster: &Cluster,
    obs: &crate::cluster::Observation,
    mut record: Record,
    to: Phase,
) -> Result<(), ReconcileError> {
    record.phase = to;
    record.rolled.clear();
    save_record(cluster, obs, &record).await
}

/// Before a phase's first write, and on every resume: every dSSM pod Ready (and the rest of the
/// restart's pre-flight: PDBs, TMM rollouts), every DB reached with one primary, and every
/// sentinel in quorum (`SENTINEL CKQUORUM`) and knowing the master name. Otherwise the phase is
/// refused before it writes anything: a phase rolled into a dSSM that cannot elect a primary or
/// has a pod down could leave no quorum, or processes two phases apart.
async fn phase_preflight(
    cluster: &Cluster,
    r: &crate::restart::Options,
    phase: Phase,
    out: &mut (dyn Write + Send),
) -> Result<(), ReconcileError> {
    let refuse = |why: String| ReconcileError::PhasePreflight {
        number: phase.number(),
        phase: phase.name(),
        why,
    };
    Restarter::new(cluster)
        .preflight(r.force, r.wait_timeout)
        .await
        .map_err(|e| match e {
            crate::restart::RestartError::Preflight(why) => refuse(why),
            other => other.into(),
        })?;
    Restarter::new(cluster)
        .check_dssm_rollout(&r.redis)
        .await
        .map_err(|e| refuse(e.to_string()))?;
    Restarter::new(cluster)
        .check_sentinels(&r.redis)
        .await
        .map_err(|e| refuse(e.to_string()))?;
    let _ = writeln!(
        out,
        "pre-flight for phase {} ({}): every dSSM pod Ready, every sentinel in quorum and knowing {:?}",
        phase.number(),
        phase.name(),
        r.redis.master
    );
    Ok(())
}

/// The drop phase rolled everywhere: the copies stop announcing a phase (metadata only: the
/// files stay as they are), the CA key Secret keeps the new CA only, the targets lose their marks.
async fn finish_rotation(
    cluster: &Cluster,
    obs: &crate::cluster::Observation,
    saved: &Saved,
    record: &Record,
    out: &mut (dyn Write + Send),
) -> Result<(), ReconcileError> {
    let bundle = saved.bundle(record.phase);
    write_copies(cluster, obs, &bundle, record.revision, None, out).await?;
    let obs = cluster.observe().await?;
    finish(cluster, &obs, record.revision).await?;
    cluster
        .annotate_targets(&[
            (annotations::RESTART_NEEDED, None),
            (annotations::TMM_RESTARTED, None),
            (annotations::TMM_ROLL, None),
        ])
        .await?;
    let _ = writeln!(
        out,
        "CA rotation complete: every process runs the new CA only"
    );
    Ok(())
}

/// A phase's materials into `copies`, said on the output first.
async fn write_phase(
    cluster: &Cluster,
    obs: &crate::cluster::Observation,
    saved: &Saved,
    (phase, copies): (Phase, Copies),
    revision: u64,
    out: &mut (dyn Write + Send),
) -> Result<(), ReconcileError> {
    let _ = writeln!(
        out,
        "CA rotation, phase {} of 3 ({}): {} ({})",
        phase.number(),
        phase.name(),
        phase.describe(),
        copies_line(copies)
    );
    let bundle = saved.bundle(phase);
    let namespaces = copy_namespaces(cluster, copies);
    write_copies_in(cluster, obs, &bundle, revision, phase, &namespaces, out).await?;
    Ok(())
}

/// The namespaces whose copies a rotation step writes, dSSM's first.
fn copy_namespaces(cluster: &Cluster, copies: Copies) -> Vec<String> {
    match copies {
        Copies::Dssm => vec![cluster.dssm_ns.clone()],
        Copies::Tmm => crate::model::targets::namespaces(&cluster.targets),
        Copies::All => cluster.namespaces(),
    }
}

fn copies_line(copies: Copies) -> &'static str {
    match copies {
        Copies::Dssm => "the dSSM copies only",
        Copies::Tmm => "the TMM copies first; TMM rolls once, then the dSSM copies",
        Copies::All => "every copy; the DBs reload, sentinels and TMM are not restarted",
    }
}

/// Without restart options: every target is marked, and the phase waits for a run that rolls it.
async fn await_restart(
    cluster: &Cluster,
    record: &Record,
    phase: Phase,
    out: &mut (dyn Write + Send),
) -> Result<(), ReconcileError> {
    let revision = record.revision.to_string();
    cluster
        .annotate_targets(&[(annotations::RESTART_NEEDED, Some(&revision))])
        .await?;
    let _ = writeln!(
        out,
        "phase {} written; it moves on once a run with a restart has rolled it",
        phase.name()
    );
    Ok(())
}

/// Rolls one TMM target through `phase`: each phase rolls TMM anew, so the roll's record names
/// the phase as well.
async fn roll_target_in_phase(
    cluster: &Cluster,
    r: &crate::restart::Options,
    t: &crate::model::targets::TmmTarget,
    token: &str,
    phase: Phase,
    out: &mut (dyn Write + Send),
) -> Result<(), ReconcileError> {
    let token = format!("{token}/{}", phase.name());
    Restarter::new(cluster)
        .roll_target_counted(t, &token, r.wait_timeout, out)
        .await?;
    Ok(())
}

/// Records a workload rolled through the record's phase in `rolled`, so a resumed phase skips
/// it (a target added midway is rolled in the phase it joins).
async fn record_rolled(
    cluster: &Cluster,
    mut record: Record,
    rolled: String,
) -> Result<(), ReconcileError> {
    record.rolled.push(rolled);
    // Saved from a fresh read: the record was written since the last one (a 409 otherwise).
    save_record(cluster, &cluster.observe().await?, &record).await
}

/// Every workload runs `phase`: said on the output and in an Event on the dSSM certs Secret.
async fn phase_rolled(
    cluster: &Cluster,
    obs: &crate::cluster::Observation,
    phase: Phase,
    restarts: Option<Restarts>,
    out: &mut (dyn Write + Send),
) {
    let note = format!(
        "CA rotation phase {} ({}) {}, proven by new mutual-TLS handshakes",
        phase.name(),
        phase.describe(),
        match phase {
            Phase::Trust => "rolled through every dSSM pod (TMM untouched)",
            Phase::Switch => "rolled through TMM, then every dSSM pod",
            Phase::Drop => "reloaded by every DB (sentinels and TMM not restarted)",
        }
    );
    let _ = writeln!(out, "{note}");
    // The last phase's Event says what the run restarted.
    let note = match restarts {
        Some(r) => format!("{note}; this run's {r}"),
        None => note,
    };
    let key = (cluster.dssm_ns.clone(), contract::CERTS_SECRET.to_string());
    if let Some(certs) = obs.raw.get(&key) {
        // One reason per phase: the recorder folds repeats of a reason into a series.
        cluster
            .event(certs, EventType::Normal, phase_reason(phase), note)
            .await;
    }
}

async fn save_record(
    cluster: &Cluster,
    obs: &crate::cluster::Observation,
    record: &Record,
) -> Result<(), ReconcileError> {
    let key = (cluster.dssm_ns.clone(), contract::CA_KEY_SECRET.to_string());
    let Some(ca_key_secret) = obs.raw.get(&key) else {
        return Err(ReconcileError::Refused(format!(
            "secret {}/{} vanished during a CA rotation",
            key.0, key.1
        )));
    };
    let data = secret_data(ca_key_secret);
    let mut ann = ca_key_secret
        .metadata
        .annotations
        .clone()
        .unwrap_or_default();
    ann.retain(|k, _| k.starts_with(annotations::PREFIX));
    ann.insert(annotations::ROTATION.to_string(), record.to_json());
    cluster
        .write_secret(&key.0, &key.1, data, ann, Some(ca_key_secret))
        .await?;
    Ok(())
}

fn secret_data(s: &k8s_openapi::api::core::v1::Secret) -> BTreeMap<String, Vec<u8>> {
    s.data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect()
}

/// The rotation is over: the CA key Secret keeps the new CA and its key only, the record goes.
async fn finish(
    cluster: &Cluster,
    obs: &crate::cluster::Observation,
    revision: u64,
) -> Result<(), ReconcileError> {
    let key = (cluster.dssm_ns.clone(), contract::CA_KEY_SECRET.to_string());
    let Some(ca_key_secret) = obs.raw.get(&key) else {
        return Ok(());
    };
    let mut data = secret_data(ca_key_secret);
    data.retain(|k, _| k == ca_key_secret_keys::CA_CERT || k == ca_key_secret_keys::CA_KEY);
    let ann = BTreeMap::from([
        (annotations::REVISION.to_string(), revision.to_string()),
        (annotations::STATE.to_string(), "complete".to_string()),
    ]);
    cluster
        .write_secret(&key.0, &key.1, data, ann, Some(ca_key_secret))
        .await?;
    Ok(())
}

/// The reason of the Event that says a phase is done.
fn phase_reason(phase: Phase) -> Reason {
    match phase {
        Phase::Trust => Reason::CaRotationTrusted,
        Phase::Switch => Reason::CaRotationSwitched,
        Phase::Drop => Reason::CaRotationDropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::materials::Bundle;

    #[test]
    fn the_record_round_trips_and_names_its_annotation_when_unreadable() {
        let r = Record {
            kind: Kind::Ca,
            phase: Phase::Switch,
            revision: 7,
            rolled: vec!["spk-utilities/statefulsets/dSSM".into()],
        };
        let json = r.to_json();
        assert_eq!(
            json,
            r#"{"kind":"ca","phase":"switch","revision":7,"rolled":["spk-utilities/statefulsets/dSSM"]}"#
        );
        assert_eq!(Record::parse(&json).unwrap(), r);
        let e = Record::parse("{\"kind\":\"ca\",\"phase\":\"sideways\"}").unwrap_err();
        assert!(e.to_string().contains(annotations::ROTATION), "{e}");
        assert!(
            std::error::Error::source(&e).is_some(),
            "the JSON error is kept as its source"
        );
    }

    #[test]
    fn the_phase_metric_is_0_outside_a_rotation_and_1_2_3_inside() {
        let m = crate::metrics::Metrics::new();
        let mut report =
            crate::inspect::Report::new(vec![], 0, crate::inspect::Thresholds::default());
        m.record(&report);
        assert!(
            m.encode().contains("\ndssm_rotation_phase 0\n"),
            "{}",
            m.encode()
        );
        report.rotation_phase = Some(Phase::Switch);
        m.record(&report);
        assert!(
            m.encode().contains("\ndssm_rotation_phase 2\n"),
            "{}",
            m.encode()
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["rotation_phase"], "switch");
        assert!(crate::inspect::render_table(&report)
            .starts_with("CA rotation in progress: phase 2 of 3 (switch: "));
    }

    #[test]
    fn phases_are_trust_switch_drop_and_no_two_consecutive_ones_disagree_on_trust() {
        let saved = Saved {
            old_ca: b"OLD-CA\n".to_vec(),
            old_leaf: b"OLD-LEAF".to_vec(),
            old_key: SecretBytes::new(b"OLD-KEY".to_vec()),
            new_ca: b"NEW-CA\n".to_vec(),
            new_ca_key: SecretBytes::new(b"NEW-CA-KEY".to_vec()),
            new_leaf: b"NEW-LEAF".to_vec(),
            new_key: SecretBytes::new(b"NEW-KEY".to_vec()),
            dhparams: b"DH".to_vec(),
        };
        let phases: Vec<Phase> = std::iter::successors(Some(Phase::Trust), |p| p.next()).collect();
        assert_eq!(phases, Phase::ALL);
        assert_eq!(
            Phase::ALL.map(Phase::number),
            [1, 2, 3],
            "the metric's values"
        );
        let b: Vec<Bundle> = Phase::ALL.iter().map(|p| saved.bundle(*p)).collect();
        assert_eq!(b[0].ca_cert, b"OLD-CA\nNEW-CA\n", "old CA first");
        assert_eq!(b[0].leaf_cert, b"OLD-LEAF");
        assert_eq!(b[1].ca_cert, b[0].ca_cert);
        assert_eq!(b[1].leaf_cert, b"NEW-LEAF");
        assert_eq!(b[1].leaf_key.expose(), b"NEW-KEY");
        assert_eq!(b[2].ca_cert, b"NEW-CA\n");
        assert_eq!(b[2].leaf_cert, b"NEW-LEAF");
        // Each step changes one thing: processes one phase apart still trust each other's leaf.
        let trusted_by = |bundle: &Bundle, leaf: &[u8]| {
            let ca = if leaf.starts_with(b"OLD") {
                "OLD-CA"
            } else {
                "NEW-CA"
            };
            String::from_utf8_lossy(&bundle.ca_cert).contains(ca)
        };
        let before = Bundle {
            ca_cert: saved.old_ca.clone(),
            leaf_cert: saved.old_leaf.clone(),
            leaf_key: SecretBytes::new(vec![]),
            dhparams: vec![],
        };
        let all = [&[before][..], &b[..]].concat();
        for w in all.windows(2) {
            for (x, y) in [(&w[0], &w[1]), (&w[1], &w[0])] {
                assert!(
                    trusted_by(x, &y.leaf_cert),
                    "adjacent phases trust each other"
                );
            }
        }
        // Two phases apart they do not: that is why each phase is rolled before the next.
        assert!(!trusted_by(&all[0], &all[3].leaf_cert));
        // The restart order (`restart_state::next_in_rotation`): at each moment, the bundles a
        // process of each kind may run (TMM, sentinels, DBs), and every pair trusts each
        // other's leaf. TMM rolls once (switch), sentinels twice (trust, switch); in drop the
        // DBs reload and sentinels and TMM keep switch's bundle in memory.
        let (before, trust, switch, drop) = (&all[0], &all[1], &all[2], &all[3]);
        let moments: [(&str, [Vec<&Bundle>; 3]); 5] = [
            (
                "trust, dSSM rolling",
                [vec![before], vec![before, trust], vec![before, trust]],
            ),
            (
                "switch, TMM rolling",
                [vec![before, switch], vec![trust], vec![trust]],
            ),
            (
                "switch, dSSM rolling",
                [vec![switch], vec![trust, switch], vec![trust, switch]],
            ),
            (
                "drop, DBs reloading",
                [vec![switch], vec![switch], vec![switch, drop]],
            ),
            (
                "after, as pods restart on their own",
                [vec![switch, drop], vec![switch, drop], vec![drop]],
            ),
        ];
        // TMM pods talk to dSSM, never to each other; dSSM processes talk to each other.
        for (when, [tmm, sentinels, dbs]) in moments {
            let dssm: Vec<&Bundle> = [sentinels, dbs].concat();
            for x in tmm.iter().chain(&dssm) {
                for y in &dssm {
                    assert!(trusted_by(x, &y.leaf_cert), "{when}: a pair distrusts");
                    assert!(trusted_by(y, &x.leaf_cert), "{when}: a pair distrusts");
                }
            }
        }
    }
}
