//! The restart as one state machine. What is persisted on the cluster (a CA rotation's record on
//! the CA key Secret; on each TMM target its `restart-needed`, `tmm-replicas`, `tmm-restarted`
//! and `ca-changed` annotations) is read into a [`RestartState`]; what this run has seen since
//! it started (waits passed, dSSM restarted) is a [`Seen`]; [`next`] decides the one step
//! to take from both, purely. Any run that reads the state resumes where the last one stopped:
//! a crash loses only the in-memory `Seen`, and every step it forgets is safe to redo
//! (waits, a dSSM restart, a rollout restart).
//!
//! It holds several phases (a CA rotation's trust → switch → drop, each rolled through every
//! workload) and several workloads (dSSM and every TMM target, each with its own state).

use std::collections::BTreeMap;

use crate::materials::annotations;
use crate::model::rotation::{Phase, Record};
use crate::model::targets::{TmmTarget, Workload};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Order {
    /// The manual procedure's order: TMM down and back up, then the dSSM pods.
    TmmFirst,
    /// TMM stays at zero until the dSSM election is complete (the manual procedure's warning about DB
    /// entries failing during the election).
    DssmFirst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    /// The manual procedure: TMM to zero and back, every dSSM pod at once. It interrupts
    /// traffic (opt-in, for a maintenance window).
    ScaleToZero,
    /// No interruption (the default): dSSM the Redis-aware way, one pod at a time, then TMM by a
    /// rolling restart; a new CA goes out in three phases (`rotation`).
    Rolling,
}

/// The token that marks a restart no write asked for (the `restart` command) done.
pub const MANUAL: &str = "manual";

/// The name the rotation record gives the dSSM pods in its `rolled` list.
pub fn dssm_id(dssm_ns: &str) -> String {
    format!("{dssm_ns}/statefulsets/dSSM")
}

/// The restart's persisted state, from what was observed: each target's marks (read from its
/// workload, `workloads` in the order of `targets`) and the rotation record given (read with
/// the CA key Secret).
pub fn observed(
    rotation: Option<Record>,
    targets: &[TmmTarget],
    workloads: &[Workload],
    dssm_ns: &str,
) -> RestartState {
    let targets = targets
        .iter()
        .zip(workloads)
        .map(|(t, w)| TargetState::from_annotations(t.id(), &w.annotations()))
        .collect();
    RestartState {
        rotation,
        targets,
        dssm: dssm_id(dssm_ns),
    }
}

/// One TMM target's persisted part of the restart.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TargetState {
    /// `namespace/kind/name`, as the rotation record's `rolled` names it.
    pub id: String,
    /// `restart-needed`: the revision of materials that wait for a restart.
    pub needed: Option<String>,
    /// `tmm-replicas`: stopped by a scale-to-zero restart, with the count to come back to.
    pub recorded: Option<i32>,
    /// `tmm-restarted`: the token of the restart it already finished.
    pub restarted: Option<String>,
    /// `ca-changed`: the write that asked for the restart changed the CA.
    pub ca_changed: bool,
}

impl TargetState {
    /// Reads a target's annotations (unknown or malformed values count as absent).
    pub fn from_annotations(id: String, a: &BTreeMap<String, String>) -> Self {
        TargetState {
            id,
            needed: a.get(annotations::RESTART_NEEDED).cloned(),
            recorded: a
                .get(annotations::TMM_REPLICAS)
                .and_then(|v| v.parse().ok()),
            restarted: a.get(annotations::TMM_RESTARTED).cloned(),
            ca_changed: a.get(annotations::CA_CHANGED).map(String::as_str) == Some("true"),
        }
    }
}

/// Everything persisted about the restart, in target order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RestartState {
    /// A CA rotation in progress: its phase and the workloads already rolled through it.
    pub rotation: Option<Record>,
    pub targets: Vec<TargetState>,
    /// The dSSM workload's id (`dssm_id`).
    pub dssm: String,
}

impl RestartState {
    /// A manual restart: no target says which materials wait, so every target restarts.
    fn manual(&self) -> bool {
        !self.targets.iter().any(|t| t.needed.is_some())
    }

    /// Some target is stopped by a scale-to-zero restart (an interrupted one is resumed).
    pub fn resuming(&self) -> bool {
        self.targets.iter().any(|t| t.recorded.is_some())
    }

    /// The token that marks target `i` done, if it still has to restart: the `restart-needed`
    /// revision, or `manual` when nothing asked (every target) or when it is stopped.
    pub fn pending_token(&self, i: usize, manual_restart: bool) -> Option<String> {
        let t = &self.targets[i];
        let token = match &t.needed {
            Some(revision) => revision.clone(),
            None if (manual_restart && self.manual()) || t.recorded.is_some() => MANUAL.to_string(),
            None => return None,
        };
        let done = t.restarted.as_deref() == Some(token.as_str());
        (t.recorded.is_some() || !done).then_some(token)
    }

    /// Indexes of the targets still to restart, with their tokens.
    pub fn pending(&self, manual_restart: bool) -> Vec<(usize, String)> {
        (0..self.targets.len())
            .filter_map(|i| self.pending_token(i, manual_restart).map(|t| (i, t)))
            .collect()
    }
}

/// What this run saw since it started: lost in a crash, and each is safe to see again.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Seen {
    /// The pre-flight passed (or was overridden), or a recorded restart made it moot.
    pub preflight: bool,
    /// No pod of any stopped target is left.
    pub terminated: bool,
    /// Every dSSM pod restarted (scale-to-zero, or rolled in the rolling strategy).
    pub dssm_restarted: bool,
    /// Every started target has its count available again.
    pub available: bool,
    /// Per target (by index), whether it is stopped now (scaled to 0 / stop nodeSelector).
    pub stopped: Vec<bool>,
    /// This run wrote the current rotation phase's materials into the copies it writes next
    /// (`copies_due`).
    pub phase_written: bool,
    /// This run may restart (false: `--no-restart`, the phase is written and waits).
    pub may_restart: bool,
    /// `restart` command (true) or a restart asked for by a write (false).
    pub manual: bool,
    /// This run finished the restart (`Finish`): nothing more, whatever the marks say.
    pub finished: bool,
}

/// How the run restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    pub strategy: Strategy,
    pub order: Order,
}

/// The one step to take next. Indexes name targets in `RestartState::targets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to restart.
    Done,
    /// The rolling strategy after a CA change: refused (pods would refuse each other).
    RefuseRolling {
        target: usize,
    },
    Preflight,
    /// Scale-to-zero: record the target's count on it, then stop it.
    Record {
        target: usize,
    },
    Stop {
        target: usize,
    },
    /// Wait until no pod of the stopped targets is left.
    WaitTerminated {
        targets: Vec<usize>,
    },
    /// Restart every dSSM pod at once (scale-to-zero).
    RestartDssm,
    /// Roll every dSSM pod the Redis-aware way (rolling).
    RollDssm,
    /// Start a stopped target with its recorded count, forget the count and mark it done.
    Start {
        target: usize,
        token: String,
    },
    /// Wait until the targets restarted by this run have their counts available.
    WaitAvailable {
        targets: Vec<usize>,
    },
    /// A rolling restart of one target, then mark it done (`tmm-restarted`).
    RollTarget {
        target: usize,
        token: String,
    },
    /// Every target loses its marks; an Event says so; then the probe.
    Finish,
}

/// The one step to take next in a recorded CA rotation (`next_in_rotation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotationStep {
    /// Write the phase's materials into `copies`.
    WritePhase { phase: Phase, copies: Copies },
    /// Without restart (`--no-restart`): mark every target and stop there.
    AwaitRestart { phase: Phase },
    /// Roll every dSSM pod the Redis-aware way through `phase`, proven by its handshakes.
    RollDssm { phase: Phase },
    /// A rolling restart of one target through `phase`, recorded in the record's `rolled`.
    RollTarget {
        target: usize,
        token: String,
        phase: Phase,
    },
    /// Every workload rolled through `from`; record the next phase.
    AdvancePhase { from: Phase, to: Phase },
    /// The drop phase rolled everywhere; the record and the saved materials go.
    FinishRotation,
}

/// The next step of a restart, from what is persisted and what this run saw. Pure. A recorded
/// CA rotation is not decided here but by `next_in_rotation`.
pub fn next(state: &RestartState, seen: &Seen, mode: Mode) -> Step {
    if seen.finished {
        return Step::Done;
    }
    let asked = state
        .targets
        .iter()
        .any(|t| t.needed.is_some() || t.recorded.is_some());
    if !asked && !seen.manual {
        return Step::Done;
    }
    let pending = state.pending(seen.manual);
    let resuming = state.resuming();
    if !seen.preflight && !resuming {
        return Step::Preflight;
    }
    // An interrupted scale-to-zero restart is finished the way it started.
    if mode.strategy == Strategy::Rolling && !resuming {
        if let Some(t) = state.targets.iter().position(|t| t.ca_changed) {
            return Step::RefuseRolling { target: t };
        }
        return next_rolling(state, &pending, seen);
    }
    next_scale_to_zero(state, &pending, seen, mode.order)
}

fn next_rolling(state: &RestartState, pending: &[(usize, String)], seen: &Seen) -> Step {
    if !seen.dssm_restarted {
        return Step::RollDssm;
    }
    match pending.first() {
        Some((i, token)) => Step::RollTarget {
            target: *i,
            token: token.clone(),
        },
        None if marked(state) => Step::Finish,
        None => Step::Done,
    }
}

/// Some target still carries a mark that `Finish` removes.
fn marked(state: &RestartState) -> bool {
    state
        .targets
        .iter()
        .any(|t| t.needed.is_some() || t.restarted.is_some() || t.ca_changed)
}

/// TMM down (count recorded first), wait until no pod is left, [dSSM first], TMM up, [dSSM],
/// TMM available, finish.
fn next_scale_to_zero(
    state: &RestartState,
    pending: &[(usize, String)],
    seen: &Seen,
    order: Order,
) -> Step {
    let stopped = |i: usize| seen.stopped.get(i).copied().unwrap_or(false);
    for (i, _) in pending {
        if state.targets[*i].recorded.is_none() {
            return Step::Record { target: *i };
        }
        if !stopped(*i) {
            return Step::Stop { target: *i };
        }
    }
    let recorded: Vec<usize> = pending.iter().map(|(i, _)| *i).collect();
    if !recorded.is_empty() && !seen.terminated {
        return Step::WaitTerminated { targets: recorded };
    }
    if order == Order::DssmFirst && !seen.dssm_restarted && !recorded.is_empty() {
        return Step::RestartDssm;
    }
    if let Some((i, token)) = pending.first() {
        return Step::Start {
            target: *i,
            token: token.clone(),
        };
    }
    if !seen.dssm_restarted {
        return Step::RestartDssm;
    }
    if !seen.available {
        let started: Vec<usize> = state
            .targets
            .iter()
            .enumerate()
            .filter(|(_, t)| t.restarted.is_some())
            .map(|(i, _)| i)
            .collect();
        return Step::WaitAvailable { targets: started };
    }
    Step::Finish
}

/// Which copies a step of a CA rotation writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copies {
    /// The dSSM namespace's only.
    Dssm,
    /// Every TMM namespace's (a TMM namespace that is dSSM's own shares its copy).
    Tmm,
    All,
}

/// The copies the recorded phase writes next: trust, the dSSM copies only (TMM keeps the old
/// CA and leaf); switch, the TMM copies until every target is rolled, then the dSSM copies;
/// drop, every copy.
pub fn copies_due(state: &RestartState, record: &Record) -> Copies {
    match record.phase {
        Phase::Trust => Copies::Dssm,
        Phase::Switch if tmm_left(state, record).is_some() => Copies::Tmm,
        Phase::Switch => Copies::Dssm,
        Phase::Drop => Copies::All,
    }
}

/// The first TMM target not yet rolled through the recorded phase.
fn tmm_left(state: &RestartState, record: &Record) -> Option<usize> {
    state
        .targets
        .iter()
        .position(|t| !record.rolled.contains(&t.id))
}

/// A CA rotation restarts each process as few times as keeps every handshake valid:
///
/// - trust: the dSSM copies get both CAs (the leaf unchanged) and dSSM rolls; TMM is left alone;
/// - switch: the TMM copies get both CAs and the new leaf and every target rolls (once in the
///   whole rotation: every dSSM process trusts the new CA since trust), then the dSSM copies get
///   the same and dSSM rolls;
/// - drop: every copy gets the new CA only and dSSM "rolls" its DBs only (a reload); sentinels
///   and TMM keep trusting the old CA until their next restart, harmless once its key is gone.
///
/// Each roll is recorded in `rolled`; a resumed run writes the due copies again (the same
/// content) and rolls only what is not recorded.
pub fn next_in_rotation(state: &RestartState, record: &Record, seen: &Seen) -> RotationStep {
    let phase = record.phase;
    if !seen.phase_written {
        let copies = copies_due(state, record);
        return RotationStep::WritePhase { phase, copies };
    }
    if !seen.may_restart {
        return RotationStep::AwaitRestart { phase };
    }
    if phase == Phase::Switch {
        if let Some(i) = tmm_left(state, record) {
            return RotationStep::RollTarget {
                target: i,
                token: record.revision.to_string(),
                phase,
            };
        }
    }
    if !record.rolled.contains(&state.dssm) {
        return RotationStep::RollDssm { phase };
    }
    match phase.next() {
        Some(to) => RotationStep::AdvancePhase { from: phase, to },
        None => RotationStep::FinishRotation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rotation::Kind;

    const DSSM: &str = "spk-utilities/statefulsets/dSSM";
    const A: &str = "spk-ingress-a/deployment/f5-tmm";
    const B: &str = "spk-ingress-b/daemonset/tmm";

    /// One table row: the annotations of targets A and B, what the run saw, the step decided.
    type Row<'a> = (
        &'a [(&'a str, &'a str)],
        &'a [(&'a str, &'a str)],
        Seen,
        Step,
    );

    /// A target from its annotations as the current main writes them.
    fn target(id: &str, ann: &[(&str, &str)]) -> TargetState {
        let a = ann
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TargetState::from_annotations(id.to_string(), &a)
    }

    fn state(targets: Vec<TargetState>) -> RestartState {
        RestartState {
            rotation: None,
            targets,
            dssm: DSSM.into(),
        }
    }

    fn seen(f: impl FnOnce(&mut Seen)) -> Seen {
        let mut o = Seen {
            may_restart: true,
            ..Default::default()
        };
        f(&mut o);
        o
    }

    const S2Z: Mode = Mode {
        strategy: Strategy::ScaleToZero,
        order: Order::TmmFirst,
    };
    const ROLLING: Mode = Mode {
        strategy: Strategy::Rolling,
        order: Order::TmmFirst,
    };

    use crate::materials::annotations::{CA_CHANGED, RESTART_NEEDED, TMM_REPLICAS, TMM_RESTARTED};

    /// Long: a table, one row per step of a scale-to-zero restart and per crash point, read in one place.
    #[test]
    fn scale_to_zero_over_two_targets_resumes_after_a_crash_at_every_step() {
        let needed = [(RESTART_NEEDED, "7")];
        let recorded = [(RESTART_NEEDED, "7"), (TMM_REPLICAS, "3")];
        let done = [(RESTART_NEEDED, "7"), (TMM_RESTARTED, "7")];
        let tok = || "7".to_string();
        // Each row: persisted (target A, target B), what this run saw, the step decided. A
        // crash keeps the persisted columns and empties `seen`: the rows with a default `seen`
        // are the resumes.
        let rows: Vec<Row> = vec![
            (&[], &[], seen(|_| {}), Step::Done),
            (&needed, &needed, seen(|_| {}), Step::Preflight),
            (
                &needed,
                &needed,
                seen(|o| o.preflight = true),
                Step::Record { target: 0 },
            ),
            (
                &recorded,
                &needed,
                seen(|o| o.preflight = true),
                Step::Stop { target: 0 },
            ),
            // Crash after A's count was recorded: no pre-flight (TMM may be at zero), stop it.
            (&recorded, &needed, seen(|_| {}), Step::Stop { target: 0 }),
            (
                &recorded,
                &needed,
                seen(|o| o.stopped = vec![true, false]),
                Step::Record { target: 1 },
            ),
            (
                &recorded,
                &recorded,
                seen(|o| o.stopped = vec![true, false]),
                Step::Stop { target: 1 },
            ),
            (
                &recorded,
                &recorded,
                seen(|o| o.stopped = vec![true, true]),
                Step::WaitTerminated {
                    targets: vec![0, 1],
                },
            ),
            (
                &recorded,
                &recorded,
                seen(|o| {
                    o.stopped = vec![true, true];
                    o.terminated = true
                }),
                Step::Start {
                    target: 0,
                    token: tok(),
                },
            ),
            // Crash after A started: B is still stopped, A is done.
            (
                &done,
                &recorded,
                seen(|o| o.stopped = vec![false, true]),
                Step::WaitTerminated { targets: vec![1] },
            ),
            (
                &done,
                &recorded,
                seen(|o| {
                    o.stopped = vec![false, true];
                    o.terminated = true
                }),
                Step::Start {
                    target: 1,
                    token: tok(),
                },
            ),
            (
                &done,
                &done,
                seen(|o| {
                    o.preflight = true;
                    o.terminated = true
                }),
                Step::RestartDssm,
            ),
            // Crash after both started: dSSM is restarted again (safe), then the wait.
            (&done, &done, seen(|_| {}), Step::Preflight),
            (
                &done,
                &done,
                seen(|o| o.preflight = true),
                Step::RestartDssm,
            ),
            (
                &done,
                &done,
                seen(|o| {
                    o.preflight = true;
                    o.dssm_restarted = true
                }),
                Step::WaitAvailable {
                    targets: vec![0, 1],
                },
            ),
            (
                &done,
                &done,
                seen(|o| {
                    o.preflight = true;
                    o.dssm_restarted = true;
                    o.available = true
                }),
                Step::Finish,
            ),
            (
                &done,
                &done,
                seen(|o| {
                    o.preflight = true;
                    o.finished = true
                }),
                Step::Done,
            ),
        ];
        for (i, (a, b, seen, want)) in rows.into_iter().enumerate() {
            let s = state(vec![target(A, a), target(B, b)]);
            assert_eq!(next(&s, &seen, S2Z), want, "row {i}: {s:?} {seen:?}");
        }
    }

    #[test]
    fn dssm_first_restarts_dssm_while_tmm_is_down() {
        let recorded = [(RESTART_NEEDED, "7"), (TMM_REPLICAS, "2")];
        let s = state(vec![target(A, &recorded)]);
        let mode = Mode {
            strategy: Strategy::ScaleToZero,
            order: Order::DssmFirst,
        };
        let o = seen(|o| {
            o.stopped = vec![true];
            o.terminated = true
        });
        assert_eq!(next(&s, &o, mode), Step::RestartDssm);
        let o = seen(|o| {
            o.stopped = vec![true];
            o.terminated = true;
            o.dssm_restarted = true
        });
        assert_eq!(
            next(&s, &o, mode),
            Step::Start {
                target: 0,
                token: "7".into()
            }
        );
    }

    #[test]
    fn a_manual_restart_restarts_every_target_with_the_manual_token() {
        let s = state(vec![target(A, &[]), target(B, &[(TMM_RESTARTED, MANUAL)])]);
        let o = seen(|o| {
            o.manual = true;
            o.preflight = true;
            o.dssm_restarted = true
        });
        // B finished this manual restart before a crash: only A is left.
        assert_eq!(
            next(&s, &o, ROLLING),
            Step::RollTarget {
                target: 0,
                token: MANUAL.into(),
            }
        );
        // Not asked for, and nothing asked for by a write: nothing to do.
        assert_eq!(next(&s, &seen(|_| {}), ROLLING), Step::Done);
    }

    /// Long: a table, one row per step of a rolling restart, read in one place.
    #[test]
    fn rolling_restarts_dssm_then_each_pending_target_and_refuses_after_a_ca_change() {
        let needed = [(RESTART_NEEDED, "4")];
        let done = [(RESTART_NEEDED, "4"), (TMM_RESTARTED, "4")];
        let rows: Vec<Row> = vec![
            (&needed, &needed, seen(|_| {}), Step::Preflight),
            (
                &needed,
                &needed,
                seen(|o| o.preflight = true),
                Step::RollDssm,
            ),
            (
                &needed,
                &needed,
                seen(|o| {
                    o.preflight = true;
                    o.dssm_restarted = true
                }),
                Step::RollTarget {
                    target: 0,
                    token: "4".into(),
                },
            ),
            (
                &done,
                &needed,
                seen(|o| {
                    o.preflight = true;
                    o.dssm_restarted = true
                }),
                Step::RollTarget {
                    target: 1,
                    token: "4".into(),
                },
            ),
            (
                &done,
                &done,
                seen(|o| {
                    o.preflight = true;
                    o.dssm_restarted = true
                }),
                Step::Finish,
            ),
            // An older mark answered by another revision: restarted again.
            (
                &[(RESTART_NEEDED, "5"), (TMM_RESTARTED, "4")],
                &done,
                seen(|o| {
                    o.preflight = true;
                    o.dssm_restarted = true
                }),
                Step::RollTarget {
                    target: 0,
                    token: "5".into(),
                },
            ),
            (
                &needed,
                &[(RESTART_NEEDED, "4"), (CA_CHANGED, "true")],
                seen(|o| o.preflight = true),
                Step::RefuseRolling { target: 1 },
            ),
        ];
        for (i, (a, b, seen, want)) in rows.into_iter().enumerate() {
            let s = state(vec![target(A, a), target(B, b)]);
            assert_eq!(next(&s, &seen, ROLLING), want, "row {i}: {s:?} {seen:?}");
        }
        // A scale-to-zero restart interrupted (a count recorded) is finished as it started,
        // even when the next run asks for rolling.
        let s = state(vec![target(
            A,
            &[
                (RESTART_NEEDED, "4"),
                (TMM_REPLICAS, "2"),
                (CA_CHANGED, "true"),
            ],
        )]);
        assert_eq!(next(&s, &seen(|_| {}), ROLLING), Step::Stop { target: 0 });
    }

    /// Long: a table, one row per phase and workload of a CA rotation, read in one place. TMM
    /// rolls once, in switch, before dSSM; trust and drop roll dSSM only.
    #[test]
    fn a_rotation_rolls_tmm_once_in_switch_and_dssm_in_each_phase_resuming_at_each() {
        let record = |phase, rolled: &[&str]| Record {
            kind: Kind::Ca,
            phase,
            revision: 9,
            rolled: rolled.iter().map(|s| s.to_string()).collect(),
        };
        let written = seen(|o| o.phase_written = true);
        let tok = || "9".to_string();
        let write = |phase, copies| RotationStep::WritePhase { phase, copies };
        let roll = |target| RotationStep::RollTarget {
            target,
            token: tok(),
            phase: Phase::Switch,
        };
        let dssm = |phase| RotationStep::RollDssm { phase };
        let rows: Vec<(Record, Seen, RotationStep)> = vec![
            // trust: the dSSM copies only, dSSM rolled, no TMM roll.
            (
                record(Phase::Trust, &[]),
                seen(|_| {}),
                write(Phase::Trust, Copies::Dssm),
            ),
            (
                record(Phase::Trust, &[]),
                seen(|o| {
                    o.phase_written = true;
                    o.may_restart = false
                }),
                RotationStep::AwaitRestart {
                    phase: Phase::Trust,
                },
            ),
            (
                record(Phase::Trust, &[]),
                written.clone(),
                dssm(Phase::Trust),
            ),
            // Crash mid-way through dSSM's roll: written again, dSSM rolled (its pods that
            // already run the phase are not restarted again: restart/dssm.rs).
            (
                record(Phase::Trust, &[]),
                seen(|_| {}),
                write(Phase::Trust, Copies::Dssm),
            ),
            (
                record(Phase::Trust, &[DSSM]),
                written.clone(),
                RotationStep::AdvancePhase {
                    from: Phase::Trust,
                    to: Phase::Switch,
                },
            ),
            // switch: the TMM copies first, every target rolled, then dSSM's copies and roll.
            (
                record(Phase::Switch, &[]),
                seen(|_| {}),
                write(Phase::Switch, Copies::Tmm),
            ),
            (record(Phase::Switch, &[]), written.clone(), roll(0)),
            // Crash after A rolled: the TMM copies again (same content), then B only.
            (
                record(Phase::Switch, &[A]),
                seen(|_| {}),
                write(Phase::Switch, Copies::Tmm),
            ),
            (record(Phase::Switch, &[A]), written.clone(), roll(1)),
            (
                record(Phase::Switch, &[A, B]),
                seen(|_| {}),
                write(Phase::Switch, Copies::Dssm),
            ),
            (
                record(Phase::Switch, &[A, B]),
                written.clone(),
                dssm(Phase::Switch),
            ),
            (
                record(Phase::Switch, &[A, B, DSSM]),
                written.clone(),
                RotationStep::AdvancePhase {
                    from: Phase::Switch,
                    to: Phase::Drop,
                },
            ),
            // drop: every copy, dSSM's DBs reloaded, no TMM roll.
            (
                record(Phase::Drop, &[]),
                seen(|_| {}),
                write(Phase::Drop, Copies::All),
            ),
            (record(Phase::Drop, &[]), written.clone(), dssm(Phase::Drop)),
            (
                record(Phase::Drop, &[DSSM]),
                written.clone(),
                RotationStep::FinishRotation,
            ),
        ];
        for (i, (r, seen, want)) in rows.into_iter().enumerate() {
            let s = state(vec![
                target(A, &[(RESTART_NEEDED, "9")]),
                target(B, &[(RESTART_NEEDED, "9")]),
            ]);
            assert_eq!(
                next_in_rotation(&s, &r, &seen),
                want,
                "row {i}: {s:?} {r:?} {seen:?}"
            );
        }
    }

    /// What a CA rotation does, step by step, as `reconcile::rotation::drive` runs `next`: the
    /// record (phase, rolled) persists, what the run saw does not. `crash_after` steps, the run
    /// dies and another resumes. Returns the writes and rolls, in order.
    fn drive_with_crash(crash_after: Option<usize>) -> Vec<String> {
        let mut s = state(vec![
            target(A, &[(RESTART_NEEDED, "9")]),
            target(B, &[(RESTART_NEEDED, "9")]),
        ]);
        s.rotation = Some(Record {
            kind: Kind::Ca,
            phase: Phase::Trust,
            revision: 9,
            rolled: vec![],
        });
        let (mut log, mut written, mut taken) = (Vec::new(), None, 0);
        loop {
            if Some(taken) == crash_after {
                written = None; // a new run: it saw nothing yet
            }
            let record = s.rotation.clone().unwrap();
            let o = seen(|o| {
                o.phase_written = written == Some((record.phase, copies_due(&s, &record)))
            });
            let step = next_in_rotation(&s, &record, &o);
            taken += 1;
            let r = s.rotation.as_mut().unwrap();
            match step {
                RotationStep::WritePhase { phase, copies } => {
                    log.push(format!("write {} {copies:?}", phase.name()));
                    written = Some((phase, copies));
                }
                RotationStep::RollDssm { phase } => {
                    log.push(format!("roll dSSM {}", phase.name()));
                    r.rolled.push(DSSM.into());
                }
                RotationStep::RollTarget { target, phase, .. } => {
                    log.push(format!("roll {target} {}", phase.name()));
                    r.rolled.push(s.targets[target].id.clone());
                }
                RotationStep::AdvancePhase { to, .. } => {
                    r.phase = to;
                    r.rolled.clear();
                }
                RotationStep::FinishRotation => return log,
                RotationStep::AwaitRestart { .. } => panic!("this run may restart"),
            }
        }
    }

    /// The restart order of a CA rotation, and a crash after any step: the resumed run only
    /// writes again (the same content) and never rolls again what the record says is rolled.
    #[test]
    fn a_ca_rotation_crashed_after_any_step_rolls_tmm_once_and_dssm_once_a_phase() {
        let straight = drive_with_crash(None);
        assert_eq!(
            straight,
            [
                "write trust Dssm",
                "roll dSSM trust",
                "write switch Tmm",
                "roll 0 switch",
                "roll 1 switch",
                "write switch Dssm",
                "roll dSSM switch",
                "write drop All",
                "roll dSSM drop",
            ]
        );
        let rolls = |log: &[String]| -> Vec<String> {
            log.iter()
                .filter(|l| l.starts_with("roll"))
                .cloned()
                .collect()
        };
        for k in 0..=straight.len() + 3 {
            let log = drive_with_crash(Some(k));
            assert_eq!(
                rolls(&log),
                rolls(&straight),
                "crash after step {k}: {log:?}"
            );
            let writes: Vec<&String> = log.iter().filter(|l| l.starts_with("write")).collect();
            assert!(
                writes.len() <= 5 + 1,
                "crash after step {k}: one write again at most: {log:?}"
            );
        }
    }

    /// A cluster mid-rotation as the current main writes it (the record JSON on the CA key
    /// Secret, the marks on each target) is read and resumed at its phase.
    #[test]
    fn a_rotation_written_by_the_current_format_resumes() {
        let json = r#"{"kind":"ca","phase":"switch","revision":12,"rolled":["spk-utilities/statefulsets/dSSM","spk-ingress-a/deployment/f5-tmm"]}"#;
        let mut s = state(vec![
            target(A, &[(RESTART_NEEDED, "12"), (TMM_RESTARTED, "12")]),
            target(B, &[(RESTART_NEEDED, "12")]),
        ]);
        s.rotation = Some(Record::parse(json).unwrap());
        let o = seen(|o| o.phase_written = true);
        assert_eq!(
            next_in_rotation(&s, s.rotation.as_ref().unwrap(), &o),
            RotationStep::RollTarget {
                target: 1,
                token: "12".into(),
                phase: Phase::Switch
            }
        );
        // An older record without `rolled` (every workload still to roll).
        let mut s2 = s.clone();
        s2.rotation =
            Some(Record::parse(r#"{"kind":"ca","phase":"trust","revision":12}"#).unwrap());
        assert_eq!(
            next_in_rotation(&s2, s2.rotation.as_ref().unwrap(), &o),
            RotationStep::RollDssm {
                phase: Phase::Trust
            }
        );
        // A scale-to-zero restart interrupted by the current main: counts on the targets.
        let s3 = state(vec![
            target(
                A,
                &[
                    (RESTART_NEEDED, "3"),
                    (TMM_REPLICAS, "4"),
                    (CA_CHANGED, "true"),
                ],
            ),
            target(B, &[(RESTART_NEEDED, "3"), (TMM_RESTARTED, "3")]),
        ]);
        assert_eq!(s3.targets[0].recorded, Some(4));
        assert!(s3.resuming());
        assert_eq!(next(&s3, &seen(|_| {}), S2Z), Step::Stop { target: 0 });
    }
}
