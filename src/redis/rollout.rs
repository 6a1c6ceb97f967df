//! The Redis-aware rollout of one phase's materials through dSSM: a pure plan (which pod, in
//! which order, behind which gate) and its executor.
//!
//! DBs whose Secret volume is mounted without `subPath` see kubelet's file swap and reload in
//! place. Others need a restart: replicas one at a time, each caught up before the next; the
//! primary last, after a paused switchover has moved its role to a caught-up replica (restarting
//! a primary without persistence would bring it back empty, and its replicas would resync from
//! it). Sentinels cannot reload: one at a time, each back in quorum and seeing the others before
//! the next. A restart takes one process down, so it needs three of its kind to keep two up.
//!
//! A restarted pod comes back with a new IP, a sentinel also with a new ID, and Sentinel never
//! forgets a peer or replica by itself: the gone entries would count in the majority a failover
//! leader needs (3 of 5 instead of 2 of 3), so that with one sentinel down no failover could be
//! authorized. After each sentinel restart, every sentinel that remembers anything gone is reset
//! (`SENTINEL RESET`), one at a time, each back to exactly the live ones before the next.

use std::time::{Duration, Instant};

use super::kept::Kept;
use super::reload::{check_proof, reload_tls, Proof};
use super::replication::{info_replication, info_server, Role};
use super::sentinel::{
    ckquorum, in_quorum_and_sees_the_others, knows_exactly, master_entry,
    replica_ready_for_sentinels_by, reset, since_primary_info, wait_before_reset, ReplicaId,
};
use super::switchover::{agreed_primary, paused_switchover};
use super::tls::TlsClient;
use super::{pause_until, RedisError};
pub use crate::model::pods::PodKind;

/// A dSSM pod as observed: its kind, whether it is the primary, whether its Secret volume is
/// mounted with `subPath` (then kubelet never updates its files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    pub kind: PodKind,
    pub primary: bool,
    pub sub_path: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollStep {
    /// `CONFIG SET` the same TLS paths, until new handshakes prove the new files.
    ReloadDb {
        pod: String,
    },
    /// Move the primary role away from `from` (paused switchover).
    Switchover {
        from: String,
    },
    /// Restart a DB that is (now) a replica.
    RestartDb {
        pod: String,
    },
    /// Gate: the DB answers as a replica, its link is up, it caught up with the primary, and
    /// every sentinel sees it so (else a later failover finds no replica to promote).
    DbCaughtUp {
        pod: String,
    },
    RestartSentinel {
        pod: String,
    },
    /// Gate: `SENTINEL CKQUORUM` passes and it sees `others` sentinels and `replicas` replicas.
    SentinelInQuorum {
        pod: String,
        others: usize,
        replicas: usize,
    },
    /// After `after`'s restart: each sentinel that knows more than the `others` live sentinels
    /// and `replicas` live replicas (entries of processes recreated elsewhere) is reset, one at
    /// a time, and back to knowing exactly those, healthy, before the next.
    ForgetGone {
        after: String,
        others: usize,
        replicas: usize,
    },
}

impl RollStep {
    pub fn pod(&self) -> &str {
        match self {
            RollStep::ReloadDb { pod }
            | RollStep::RestartDb { pod }
            | RollStep::DbCaughtUp { pod }
            | RollStep::RestartSentinel { pod }
            | RollStep::SentinelInQuorum { pod, .. } => pod,
            RollStep::Switchover { from } => from,
            RollStep::ForgetGone { after, .. } => after,
        }
    }
}

impl std::fmt::Display for RollStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RollStep::ReloadDb { pod } => write!(f, "{pod}: reload TLS files in place (CONFIG SET), prove with a new handshake"),
            RollStep::Switchover { from } => write!(f, "{from}: paused switchover of the primary role to a caught-up replica"),
            RollStep::RestartDb { pod } => write!(f, "{pod}: restart (as a replica)"),
            RollStep::DbCaughtUp { pod } => write!(f, "{pod}: wait until replica link up and caught up"),
            RollStep::RestartSentinel { pod } => write!(f, "{pod}: restart"),
            RollStep::SentinelInQuorum { pod, others, replicas } => write!(
                f,
                "{pod}: wait until CKQUORUM passes and it sees {others} sentinels and {replicas} replicas"
            ),
            RollStep::ForgetGone { after, others, replicas } => write!(
                f,
                "{after}: every sentinel forgets the gone peers and replicas (SENTINEL RESET one at a time, each back to exactly {others} sentinels and {replicas} replicas before the next)"
            ),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RolloutPlanError {
    #[error("{count} DB pods are primary ({pods:?}): expected exactly one; wait until the sentinels settle")]
    Primaries { count: usize, pods: Vec<String> },
    #[error("{kind} pods {pods:?} must be restarted, but there are only {have}: a restart would leave fewer than 2 up")]
    TooFewToRestart {
        kind: &'static str,
        have: usize,
        pods: Vec<String>,
    },
    #[error("pod {0} is listed twice")]
    Duplicate(String),
}

/// The ordered steps that roll the new materials through dSSM's pods.
pub fn plan(pods: &[Pod]) -> Result<Vec<RollStep>, RolloutPlanError> {
    let mut names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(RolloutPlanError::Duplicate(w[0].to_string()));
    }
    let mut dbs: Vec<&Pod> = pods.iter().filter(|p| p.kind == PodKind::Db).collect();
    let mut sentinels: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.kind == PodKind::Sentinel)
        .collect();
    dbs.sort_by(|a, b| (a.primary, &a.name).cmp(&(b.primary, &b.name))); // primary last
    sentinels.sort_by(|a, b| a.name.cmp(&b.name));
    let primaries: Vec<String> = dbs
        .iter()
        .filter(|p| p.primary)
        .map(|p| p.name.clone())
        .collect();
    if primaries.len() != 1 {
        return Err(RolloutPlanError::Primaries {
            count: primaries.len(),
            pods: primaries,
        });
    }
    let restarted: Vec<String> = dbs
        .iter()
        .filter(|p| p.sub_path)
        .map(|p| p.name.clone())
        .collect();
    if !restarted.is_empty() && dbs.len() < 3 {
        return Err(RolloutPlanError::TooFewToRestart {
            kind: "DB",
            have: dbs.len(),
            pods: restarted,
        });
    }
    if !sentinels.is_empty() && sentinels.len() < 3 {
        return Err(RolloutPlanError::TooFewToRestart {
            kind: "sentinel",
            have: sentinels.len(),
            pods: sentinels.iter().map(|p| p.name.clone()).collect(),
        });
    }
    let mut steps = Vec::new();
    for db in &dbs {
        let pod = db.name.clone();
        match (db.sub_path, db.primary) {
            (false, _) => steps.push(RollStep::ReloadDb { pod }),
            (true, primary) => {
                if primary {
                    steps.push(RollStep::Switchover { from: pod.clone() });
                }
                steps.push(RollStep::RestartDb { pod: pod.clone() });
                steps.push(RollStep::DbCaughtUp { pod });
            }
        }
    }
    for s in &sentinels {
        steps.push(RollStep::RestartSentinel {
            pod: s.name.clone(),
        });
        steps.push(RollStep::SentinelInQuorum {
            pod: s.name.clone(),
            others: sentinels.len() - 1,
            replicas: dbs.len() - 1,
        });
        steps.push(RollStep::ForgetGone {
            after: s.name.clone(),
            others: sentinels.len() - 1,
            replicas: dbs.len() - 1,
        });
    }
    Ok(steps)
}

/// What the executor needs from whoever runs the pods (Kubernetes eviction, or test processes).
pub trait Pods {
    /// `host:port` where the tool reaches this pod's Redis (its pod IP and container port).
    fn endpoint(&self, pod: &str) -> String;
    /// Restarts the pod and returns once its process runs again (not necessarily Ready).
    fn restart(&mut self, pod: &str, deadline: Instant) -> Result<(), PodRestartError>;
}

/// Why a pod could not be restarted, as the implementor of [`Pods`] says (its own error kept).
pub type PodRestartError = Box<dyn std::error::Error + Send + Sync>;

/// How the executor talks to dSSM during one phase.
pub struct RolloutContext<'a> {
    /// The tool's own client materials for this phase (accepted before and after it).
    pub tls: &'a TlsClient,
    pub server_name: &'a str,
    pub master: &'a str,
    /// What new handshakes must show on every process once it runs the phase's materials.
    pub proof: Proof<'a>,
    /// Deadline of each step.
    pub step_timeout: Duration,
    /// How long a reload waits for kubelet to swap the files before the DB restarts instead
    /// (capped at `step_timeout`; the tool gives both its `--wait-timeout`).
    pub reload_timeout: Duration,
}

/// A roll's context and the connections its waits keep open between polls (to DBs and
/// sentinels; proofs make new handshakes).
struct Roll<'c, 'a> {
    cx: &'c RolloutContext<'a>,
    kept: Kept<'c>,
}

impl<'a> std::ops::Deref for Roll<'_, 'a> {
    type Target = RolloutContext<'a>;
    fn deref(&self) -> &RolloutContext<'a> {
        self.cx
    }
}

#[derive(Debug, thiserror::Error)]
#[error("rollout step \"{step}\" failed: {error}")]
pub struct RolloutError {
    pub step: String,
    #[source]
    pub error: Box<StepError>,
}

/// Why one step of the roll failed: each with the object it names and the error underneath.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(
        "not started: asked to stop (a signal or the lost Lease); every step before it is complete"
    )]
    Stopped,
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("{0}")]
    PodRestart(#[source] PodRestartError),
    #[error("cannot ask {endpoint} its role before acting on it: {source}")]
    RoleUnknown {
        endpoint: String,
        #[source]
        source: Box<RedisError>,
    },
    #[error("{endpoint} says it is the primary, but the sentinels do not agree on one")]
    NoAgreedPrimary { endpoint: String },
    #[error("{endpoint} says it is the primary, but the sentinels name another process ({agreed}): refusing to restart it or to move the role")]
    AnotherPrimary { endpoint: String, agreed: String },
    #[error("{endpoint} still says it is the primary after the switchover")]
    StillPrimary { endpoint: String },
    #[error("{sentinel}: not reset ({why}): {source}")]
    NotReset {
        sentinel: String,
        why: Box<RedisError>,
        #[source]
        source: Box<RedisError>,
    },
    #[error("reset, but not back to the live ones: {0}")]
    NotBackAfterReset(#[source] RedisError),
    #[error("{why}; a restart instead would leave fewer than 2 of the {dbs} DBs up")]
    NoFallback {
        #[source]
        why: Box<StepError>,
        dbs: usize,
    },
    #[error("{why}; restarting it instead: {step}: {source}")]
    FallbackFailed {
        why: Box<StepError>,
        step: String,
        #[source]
        source: Box<StepError>,
    },
}

impl StepError {
    /// A reload that cannot work in place (the files never changed under the DB, or the DB
    /// cannot reload): a restart brings the files, the safe way.
    fn wants_restart(&self) -> bool {
        matches!(
            self,
            StepError::Redis(RedisError::NotSwapped { .. } | RedisError::ReloadUnavailable { .. })
        )
    }
}

const POLL: Duration = Duration::from_millis(100);

/// Runs `steps` in order; stops at the first that fails (nothing later is touched). `done` is
/// told of each finished step.
pub fn execute(
    steps: &[RollStep],
    pods: &mut dyn Pods,
    cx: &RolloutContext<'_>,
    mut done: impl FnMut(&RollStep, Duration),
) -> Result<(), RolloutError> {
    let cx = &Roll {
        cx,
        kept: Kept::new(cx.tls, cx.server_name),
    };
    let dbs = steps
        .iter()
        .filter(|s| matches!(s, RollStep::ReloadDb { .. } | RollStep::DbCaughtUp { .. }))
        .count();
    for step in steps {
        // A signal or a lost Lease stops the roll here, between steps, never inside one. Busy
        // first, then the check: a stop asked between the two would otherwise find a safe
        // point while this step runs.
        let _busy = crate::stop::busy();
        if crate::stop::requested() {
            crate::stop::honour();
            return Err(RolloutError {
                step: step.to_string(),
                error: Box::new(StepError::Stopped),
            });
        }
        // Asked again at every step: a restarted pod may come back at another address.
        let sentinels: Vec<String> = steps
            .iter()
            .filter_map(|s| match s {
                RollStep::RestartSentinel { pod } => Some(pods.endpoint(pod)),
                _ => None,
            })
            .collect();
        let start = Instant::now();
        let timeout = match step {
            RollStep::ReloadDb { .. } => cx.reload_timeout.min(cx.step_timeout),
            _ => cx.step_timeout,
        };
        let deadline = start + timeout;
        let result = match run_step(step, pods, cx, &sentinels, deadline) {
            // The files never changed under the DB (a mount kubelet does not update, not
            // detected as `subPath`): a restart brings them, the safe way.
            Err(e) if matches!(step, RollStep::ReloadDb { .. }) && e.wants_restart() => {
                restart_db_instead(step.pod(), dbs, pods, cx, &sentinels, e)
            }
            other => other,
        };
        result.map_err(|error| RolloutError {
            step: step.to_string(),
            error: Box::new(error),
        })?;
        done(step, start.elapsed());
    }
    Ok(())
}

/// The fallback of a reload: a replica restarts; the primary first hands its role over by a
/// paused switchover. Each with a deadline of its own; only with three DBs (two stay up).
fn restart_db_instead(
    pod: &str,
    dbs: usize,
    pods: &mut dyn Pods,
    cx: &Roll<'_, '_>,
    sentinels: &[String],
    why: StepError,
) -> Result<(), StepError> {
    let why = Box::new(why);
    if dbs < 3 {
        return Err(StepError::NoFallback { why, dbs });
    }
    let from = pod.to_string();
    for step in [
        RollStep::Switchover { from: from.clone() },
        RollStep::RestartDb { pod: from.clone() },
        RollStep::DbCaughtUp { pod: from.clone() },
    ] {
        let deadline = Instant::now() + cx.step_timeout;
        if let Err(e) = run_step(&step, pods, cx, sentinels, deadline) {
            return Err(StepError::FallbackFailed {
                why,
                step: step.to_string(),
                source: Box::new(e),
            });
        }
    }
    Ok(())
}

/// Polls `f` until it succeeds; at the deadline, its last error.
fn until<T>(
    deadline: Instant,
    mut f: impl FnMut() -> Result<T, RedisError>,
) -> Result<T, RedisError> {
    // Each new reason to wait is logged once: the error a step ends with is only the last.
    let mut last = String::new();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() + POLL >= deadline => return Err(e),
            Err(e) => {
                let now = e.to_string();
                if now != last {
                    tracing::debug!(waiting_on = %now, "not yet");
                    last = now;
                }
                pause_until(deadline, POLL)
            }
        }
    }
}

fn run_step(
    step: &RollStep,
    pods: &mut dyn Pods,
    cx: &Roll<'_, '_>,
    sentinels: &[String],
    deadline: Instant,
) -> Result<(), StepError> {
    let endpoint = pods.endpoint(step.pod());
    match step {
        RollStep::ReloadDb { .. } => {
            reload_tls(cx.tls, &endpoint, cx.server_name, &cx.proof, deadline)?;
            Ok(())
        }
        // The pod itself says whether it is the primary, asked right before: a failover since
        // the plan was made may have moved the role (then nothing to move), or given it to a
        // DB planned as a replica (then it moves first). Never an address compared as text.
        RollStep::Switchover { .. } => match role_of(cx, &endpoint, deadline)? {
            Role::Replica => Ok(()),
            Role::Primary => switch_away_from(cx, sentinels, &endpoint, deadline),
        },
        RollStep::RestartDb { pod } => {
            if role_of(cx, &endpoint, deadline)? == Role::Primary {
                switch_away_from(cx, sentinels, &endpoint, deadline)?;
            }
            pods.restart(pod, deadline).map_err(StepError::PodRestart)
        }
        RollStep::RestartSentinel { pod } => {
            pods.restart(pod, deadline).map_err(StepError::PodRestart)
        }
        RollStep::DbCaughtUp { .. } => Ok(until(deadline, || {
            db_caught_up(cx, sentinels, &endpoint, deadline)
        })?),
        RollStep::SentinelInQuorum {
            others, replicas, ..
        } => Ok(until(deadline, || {
            cx.kept.ask(&endpoint, deadline, |c| {
                in_quorum_and_sees_the_others(c, cx.master, *others, *replicas, deadline)
            })?;
            check_proof(cx.tls, &endpoint, cx.server_name, &cx.proof, deadline)
        })?),
        // Each sentinel's reset has a deadline of its own: it relearns the replicas from the
        // primary's INFO, which Sentinel may ask for only every 10 s.
        RollStep::ForgetGone {
            others, replicas, ..
        } => forget_gone(cx, sentinels, *others, *replicas),
    }
}

/// The gate after a DB restart: it answers as a replica with its link up, has reached where its
/// primary was a moment ago, every sentinel sees it ready, and new handshakes prove the phase.
fn db_caught_up(
    cx: &Roll<'_, '_>,
    sentinels: &[String],
    endpoint: &str,
    deadline: Instant,
) -> Result<(), RedisError> {
    let (run_id, me) = cx.kept.ask(endpoint, deadline, |c| {
        Ok((
            info_server(c, deadline)?.run_id,
            info_replication(c, deadline)?,
        ))
    })?;
    let primary = me
        .primary
        .clone()
        .filter(|_| me.role == Role::Replica && me.link_up);
    let primary = primary.ok_or_else(|| {
        RedisError::Topology(format!("{endpoint}: not yet a replica with its link up"))
    })?;
    let seen_by_primary = cx
        .kept
        .ask(&primary, deadline, |p| info_replication(p, deadline))?;
    let target = seen_by_primary.master_repl_offset;
    // The primary moves on under load: caught up = reached where it was a moment ago. A link
    // that drops meanwhile (a new sync) sends the gate back to its start, and so does a replica
    // still behind after `CATCH_UP_POLLS`: the error the step ends with is then the condition
    // that held it, not the last few milliseconds of this loop.
    const CATCH_UP_POLLS: u32 = 100;
    for poll in 1.. {
        let now = cx
            .kept
            .ask(endpoint, deadline, |c| info_replication(c, deadline))?;
        if now.replica_offset.unwrap_or(-1) >= target {
            break;
        }
        if !now.link_up || poll >= CATCH_UP_POLLS || Instant::now() + POLL >= deadline {
            // What the primary listed when its offset was read says whether it was feeding
            // this replica at all.
            let listed: Vec<String> = seen_by_primary
                .replicas
                .iter()
                .map(|r| format!("{} {} at {}", r.endpoint(), r.state, r.offset))
                .collect();
            return Err(RedisError::Topology(format!(
                "{endpoint}: offset {:?} behind the primary's {target} (replica link {}; \
                 its primary {primary} listed [{}])",
                now.replica_offset,
                if now.link_up { "up" } else { "down" },
                listed.join(", ")
            )));
        }
        pause_until(deadline, POLL / 5);
    }
    // Found in Sentinel's lists by its run ID: Sentinel sees it at its pod IP, which
    // need not be how the tool reaches it.
    let id = ReplicaId {
        endpoint,
        run_id: Some(&run_id),
    };
    replica_ready_for_sentinels_by(&cx.kept, sentinels, cx.master, id, deadline)?;
    check_proof(cx.tls, endpoint, cx.server_name, &cx.proof, deadline)
}

/// The role the DB at `endpoint` reports itself (`INFO replication`).
fn role_of(cx: &Roll<'_, '_>, endpoint: &str, deadline: Instant) -> Result<Role, StepError> {
    cx.kept
        .ask(endpoint, deadline, |c| info_replication(c, deadline))
        .map(|r| r.role)
        .map_err(|source| StepError::RoleUnknown {
            endpoint: endpoint.to_string(),
            source: Box::new(source),
        })
}

/// The `run_id` of the process at `endpoint`: the same process whatever address names it.
fn run_id_of(cx: &Roll<'_, '_>, endpoint: &str, deadline: Instant) -> Result<String, RedisError> {
    cx.kept
        .ask(endpoint, deadline, |c| info_server(c, deadline))
        .map(|s| s.run_id)
}

/// Moves the primary role away from the DB at `endpoint` by a paused switchover, once the
/// sentinels' agreed primary is that very process (same run ID), and proves that it then says
/// it is a replica.
fn switch_away_from(
    cx: &Roll<'_, '_>,
    sentinels: &[String],
    endpoint: &str,
    deadline: Instant,
) -> Result<(), StepError> {
    let agreed = agreed_primary(cx.tls, cx.server_name, sentinels, cx.master, deadline)
        .ok_or_else(|| StepError::NoAgreedPrimary {
            endpoint: endpoint.to_string(),
        })?;
    let (named, mine) = (
        run_id_of(cx, &agreed, deadline)?,
        run_id_of(cx, endpoint, deadline)?,
    );
    if named != mine {
        return Err(StepError::AnotherPrimary {
            endpoint: endpoint.to_string(),
            agreed,
        });
    }
    paused_switchover(cx.tls, cx.server_name, sentinels, cx.master, deadline)?;
    match role_of(cx, endpoint, deadline)? {
        Role::Replica => Ok(()),
        Role::Primary => Err(StepError::StillPrimary {
            endpoint: endpoint.to_string(),
        }),
    }
}

/// `RollStep::ForgetGone`: one sentinel at a time, never during a failover (a reset aborts it),
/// only while the others hold a quorum without it, and each back to exactly the live sentinels
/// and replicas before the next is touched. A reset sentinel relearns its replicas only at its
/// next `INFO` of the primary: the one whose `INFO` comes soonest goes first, and its reset is
/// sent just before that `INFO`, so that it is without replicas for about a second, not up to
/// ten, and resets need not wait out a whole period each.
fn forget_gone(
    cx: &Roll<'_, '_>,
    sentinels: &[String],
    others: usize,
    replicas: usize,
) -> Result<(), StepError> {
    let mut left: Vec<&String> = sentinels.iter().collect();
    loop {
        let deadline = Instant::now() + cx.step_timeout;
        let mut due = Vec::new();
        for s in left {
            let exact = cx.kept.ask(s, deadline, |c| {
                knows_exactly(c, cx.master, others, replicas, deadline)
            });
            if let Err(why) = exact {
                due.push((wait_before_reset(info_since(cx, s, deadline)), s, why));
            }
        }
        due.sort_by_key(|(wait, s, _)| (*wait, *s));
        let mut due = due.into_iter();
        let Some((_, s, why)) = due.next() else {
            return Ok(());
        };
        reset_before_its_next_info(cx, s, sentinels, why)?;
        let back = Instant::now() + cx.step_timeout;
        until(back, || {
            cx.kept.ask(s, back, |c| {
                ckquorum(c, cx.master, back)?;
                knows_exactly(c, cx.master, others, replicas, back)
            })
        })
        .map_err(StepError::NotBackAfterReset)?;
        left = due.map(|(_, s, _)| s).collect();
    }
}

/// How long ago sentinel `s` had the primary's `INFO` (None if it cannot say).
fn info_since(cx: &Roll<'_, '_>, s: &str, deadline: Instant) -> Option<Duration> {
    let entry = cx
        .kept
        .ask(s, deadline, |c| master_entry(c, cx.master, deadline));
    entry.ok().as_ref().and_then(since_primary_info)
}

/// Resets sentinel `s` (which remembers gone peers: `why`) between `RESET_LEAD` and
/// `RESET_LATEST` before its next `INFO` of the primary, once the others hold a quorum without it
/// and no failover is under way. Checks that took long enough to pass that window wait for the
/// next `INFO`'s; past the deadline, the reset is sent anyway (a sentinel that never says when it
/// had the `INFO` is reset at once).
fn reset_before_its_next_info(
    cx: &Roll<'_, '_>,
    s: &str,
    sentinels: &[String],
    why: RedisError,
) -> Result<(), StepError> {
    let deadline = Instant::now() + cx.step_timeout;
    loop {
        pause_until(deadline, wait_before_reset(info_since(cx, s, deadline)));
        let quiet = until(deadline, || {
            for o in sentinels.iter().filter(|o| *o != s) {
                cx.kept
                    .ask(o, deadline, |c| ckquorum(c, cx.master, deadline))?;
            }
            let flags = cx
                .kept
                .ask(s, deadline, |c| master_entry(c, cx.master, deadline))?
                .remove("flags")
                .unwrap_or_default();
            if flags.split(',').any(|f| f.starts_with("failover")) {
                return Err(RedisError::Topology(format!(
                    "{s}: a failover is under way ({flags})"
                )));
            }
            Ok(())
        });
        if let Err(source) = quiet {
            return Err(StepError::NotReset {
                sentinel: s.to_string(),
                why: Box::new(why),
                source: Box::new(source),
            });
        }
        let ready = wait_before_reset(info_since(cx, s, deadline)).is_zero();
        if ready || Instant::now() >= deadline {
            break;
        }
    }
    // Sent even when the wait took the whole deadline: a bound of its own.
    let deadline = deadline.max(Instant::now() + RESET_ASK);
    Ok(cx
        .kept
        .ask(s, deadline, |c| reset(c, cx.master, deadline))?)
}

/// How long the `SENTINEL RESET` itself may take once it is due.
const RESET_ASK: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, kind: PodKind, primary: bool, sub_path: bool) -> Pod {
        Pod {
            name: name.into(),
            kind,
            primary,
            sub_path,
        }
    }

    fn dssm(sub_path: bool, primary: &str) -> Vec<Pod> {
        let mut pods: Vec<Pod> = ["db-0", "db-1", "db-2"]
            .iter()
            .map(|n| pod(n, PodKind::Db, *n == primary, sub_path))
            .collect();
        for n in ["sentinel-2", "sentinel-0", "sentinel-1"] {
            pods.push(pod(n, PodKind::Sentinel, false, sub_path));
        }
        pods
    }

    fn show(steps: &[RollStep]) -> Vec<String> {
        steps
            .iter()
            .map(|s| {
                let kind = match s {
                    RollStep::ReloadDb { .. } => "reload",
                    RollStep::Switchover { .. } => "switchover",
                    RollStep::RestartDb { .. } | RollStep::RestartSentinel { .. } => "restart",
                    RollStep::DbCaughtUp { .. } => "caught-up",
                    RollStep::SentinelInQuorum { .. } => "quorum",
                    RollStep::ForgetGone { .. } => "forget",
                };
                format!("{kind} {}", s.pod())
            })
            .collect()
    }

    const SENTINELS_ONE_AT_A_TIME: [&str; 9] = [
        "restart sentinel-0",
        "quorum sentinel-0",
        "forget sentinel-0",
        "restart sentinel-1",
        "quorum sentinel-1",
        "forget sentinel-1",
        "restart sentinel-2",
        "quorum sentinel-2",
        "forget sentinel-2",
    ];

    #[test]
    fn without_subpath_dbs_reload_in_place_primary_last_then_sentinels_one_at_a_time() {
        let steps = plan(&dssm(false, "db-1")).unwrap();
        let mut want = vec!["reload db-0", "reload db-2", "reload db-1"];
        want.extend(SENTINELS_ONE_AT_A_TIME);
        assert_eq!(show(&steps), want);
        assert_eq!(
            steps[4],
            RollStep::SentinelInQuorum {
                pod: "sentinel-0".into(),
                others: 2,
                replicas: 2
            }
        );
    }

    #[test]
    fn with_subpath_replicas_restart_one_at_a_time_and_the_primary_moves_before_its_restart() {
        let steps = plan(&dssm(true, "db-0")).unwrap();
        let mut want = vec![
            "restart db-1",
            "caught-up db-1",
            "restart db-2",
            "caught-up db-2",
            "switchover db-0",
            "restart db-0",
            "caught-up db-0",
        ];
        want.extend(SENTINELS_ONE_AT_A_TIME);
        assert_eq!(show(&steps), want);
    }

    #[test]
    fn a_mixed_topology_reloads_what_it_can_and_restarts_the_rest() {
        let mut pods = dssm(false, "db-2");
        pods[2].sub_path = true; // the primary
        let steps = plan(&pods).unwrap();
        assert_eq!(
            show(&steps)[..5],
            [
                "reload db-0",
                "reload db-1",
                "switchover db-2",
                "restart db-2",
                "caught-up db-2"
            ]
        );
    }

    #[test]
    fn unsafe_topologies_are_refused_naming_the_pods() {
        let mut two_primaries = dssm(false, "db-0");
        two_primaries[1].primary = true;
        assert_eq!(
            plan(&two_primaries),
            Err(RolloutPlanError::Primaries {
                count: 2,
                pods: vec!["db-0".into(), "db-1".into()]
            })
        );
        assert!(matches!(
            plan(&dssm(false, "none")),
            Err(RolloutPlanError::Primaries { count: 0, .. })
        ));
        // Two DBs with subPath: restarting one leaves a single DB up.
        let mut two_dbs = dssm(true, "db-0");
        two_dbs.retain(|p| p.name != "db-2");
        let err = plan(&two_dbs).unwrap_err();
        assert!(err.to_string().contains("[\"db-1\", \"db-0\"]"), "{err}");
        // Reloads take nothing down: two DBs without subPath are fine.
        let mut reload_only = dssm(false, "db-0");
        reload_only.retain(|p| p.name != "db-2");
        assert!(plan(&reload_only).is_ok());
        let mut two_sentinels = dssm(false, "db-0");
        two_sentinels.retain(|p| p.name != "sentinel-2");
        assert!(matches!(
            plan(&two_sentinels),
            Err(RolloutPlanError::TooFewToRestart {
                kind: "sentinel",
                have: 2,
                ..
            })
        ));
        let mut dup = dssm(false, "db-0");
        dup.push(dup[0].clone());
        assert_eq!(plan(&dup), Err(RolloutPlanError::Duplicate("db-0".into())));
    }
}
