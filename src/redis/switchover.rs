//! The paused switchover: moves the primary role to a replica without losing an acknowledged
//! write. A bare `SENTINEL FAILOVER` under load loses thousands (writes acknowledged by the old
//! primary after the chosen replica's last sync); pausing writes first closes that window.
//!
//! `CLIENT PAUSE WRITE` on the primary (with a timeout, so a crashed caller never leaves it
//! paused), wait until every replica's offset reaches the primary's, `SENTINEL FAILOVER` (the
//! sentinels and replicas are asked on connections opened before the pause and kept through it:
//! no handshake inside it unless one breaks), wait
//! until the sentinels agree on the new primary and it says so (and, briefly, until every sentinel
//! that answers names it), make sure the old one follows it
//! (`REPLICAOF` if Sentinel has not yet), disconnect its clients (normal and subscribers) so
//! they re-resolve the primary through the sentinels, `CLIENT UNPAUSE`, and disconnect them once more (a client that
//! reconnected between the kill and the unpause found the demoted primary).
//!
//! The pause can never end before the outcome is known: it starts only with `MIN_BUDGET` left
//! in the step; until `SENTINEL FAILOVER` is about to be sent it lasts three quarters of
//! Sentinel's `down-after-milliseconds` (so that if we die, Redis ends it before the sentinels
//! call the paused primary down and fail it over by themselves, which loses the writes the old
//! primary acknowledges once the pause ends), then it is extended to `PAUSE`, and every wait
//! after the failover ends `MARGIN` before that; each connection and command inside it has `OP_TIMEOUT`, so a sentinel
//! or replica that stops answering costs that much, not the pause. A sentinel that did not
//! answer right before the pause is not asked inside it (it would cost `OP_TIMEOUT` of paused
//! writes for nothing). Replicas that have not caught up `CATCH_UP` into the pause abort the
//! switchover: unpaused, nothing moved, nothing lost. That is also before half of Sentinel's
//! `down-after-milliseconds`: a paused primary holds Sentinel's hello `PUBLISH` and the `PING`s
//! queued behind it, and once down-after passes Sentinel fails it over by itself, with replicas
//! not yet caught up. Writes stay paused under 2 s in every case the tests know: a normal
//! switchover (under 1 s), a frozen replica (`CATCH_UP`, then the abort), a silent sentinel.

use std::time::{Duration, Instant};

use super::kept::Kept;
use super::replication::{info_replication, Role};
use super::resp::Connection;
use super::sentinel::{master_entry, primary_addr, replica_ready_for_sentinels_by, ReplicaId};
use super::tls::TlsClient;
use super::{pause_until, same_address, split_host_port, RedisError};

const POLL: Duration = Duration::from_millis(20);
/// How long writes are paused at most: `CLIENT PAUSE`'s own timeout, so a crashed caller never
/// leaves the primary paused longer.
pub const PAUSE: Duration = Duration::from_secs(10);
/// The waits inside the pause end this long before it does.
pub const MARGIN: Duration = Duration::from_secs(2);
/// Every replica must hold every write this long into the pause, else the switchover aborts:
/// replicas on a healthy link catch up within ~150 ms under the test load, and an abort then
/// costs writes this long plus the unpause, under the 2 s write pause the tests bound.
pub const CATCH_UP: Duration = Duration::from_secs(1);
/// Each connection and command to a sentinel or replica while paused (and each sentinel asked
/// where the primary is): well below the pause, and below the 2 s write pause the tests bound
/// (a TLS handshake with an RSA-4096 leaf takes ~20 ms on a loaded 2-core machine).
pub const OP_TIMEOUT: Duration = Duration::from_millis(750);
/// What must be left of the step when the pause would start: the whole pause, and the unpause.
pub const MIN_BUDGET: Duration = Duration::from_secs(12);

/// `deadline`, or `OP_TIMEOUT` from now if sooner: one operation's deadline.
fn soon(deadline: Instant) -> Instant {
    deadline.min(Instant::now() + OP_TIMEOUT)
}

#[derive(Debug, Clone)]
pub struct Switchover {
    pub old_primary: String,
    pub new_primary: String,
    /// Writes were paused on the old primary this long.
    pub paused_for: Duration,
    /// From the pause until every replica had caught up, and until the sentinels agreed on the
    /// promoted replica.
    pub caught_up_after: Duration,
    pub promoted_after: Duration,
    /// Whether we sent REPLICAOF to the old primary (Sentinel had not yet).
    pub replicaof_sent: bool,
}

/// The sentinels asked through a switchover, on connections opened before the pause and kept
/// through it. A new connection per question cost each sentinel an RSA-4096 signature per poll
/// (three every 20 ms while paused), on the single thread that must also run the failover: the
/// pause then lasted seconds longer on a loaded machine. The replicas' connections are kept in
/// the same `Kept`.
struct Sentinels<'a> {
    kept: Kept<'a>,
    endpoints: Vec<String>,
}

impl<'a> Sentinels<'a> {
    fn new(kept: Kept<'a>, endpoints: &[String]) -> Self {
        Sentinels {
            kept,
            endpoints: endpoints.to_vec(),
        }
    }

    fn len(&self) -> usize {
        self.endpoints.len()
    }

    fn endpoint(&self, i: usize) -> &str {
        &self.endpoints[i]
    }

    /// Asks sentinel `i` on its kept connection (connecting first, by `op`, if it has none),
    /// once: an error closes the connection.
    fn ask<T>(
        &mut self,
        i: usize,
        op: Instant,
        question: impl FnOnce(&mut Connection) -> Result<T, RedisError>,
    ) -> Result<T, RedisError> {
        self.kept.ask_once(&self.endpoints[i], op, question)
    }

    /// Forgets the sentinels in `gone`.
    fn without(mut self, gone: &[String]) -> Self {
        self.endpoints.retain(|e| !gone.contains(e));
        self
    }

    /// Where the sentinels say the primary is: the answer of a majority that agree, else None.
    fn agreed_primary(&mut self, master: &str, deadline: Instant) -> Option<String> {
        let mut answers: Vec<String> = Vec::new();
        for i in 0..self.len() {
            let op = soon(deadline);
            if let Ok(Some(a)) = self.ask(i, op, |c| primary_addr(c, master, op)) {
                answers.push(a);
            }
        }
        let majority = self.len() / 2 + 1;
        answers
            .iter()
            .find(|a| answers.iter().filter(|b| same_address(a, b)).count() >= majority)
            .cloned()
    }
}

/// Where the sentinels say the primary is: the answer of a majority that agree, else None.
pub fn agreed_primary(
    tls: &TlsClient,
    server_name: &str,
    sentinels: &[String],
    master: &str,
    deadline: Instant,
) -> Option<String> {
    Sentinels::new(Kept::new(tls, server_name), sentinels).agreed_primary(master, deadline)
}

/// How long the pause may wait for the last sentinels to learn the promotion.
const ALL_SENTINELS_WAIT: Duration = Duration::from_secs(2);

/// Waits until every sentinel that answers names `new` (bounded by `ALL_SENTINELS_WAIT`). A
/// client's retry may ask another sentinel than its first try: one still naming the old primary
/// would send it to a replica. Sentinel pushes a promotion to the others at once, so this is
/// usually immediate; one that does not answer cannot misdirect anybody and is not waited for.
fn every_sentinel_names(sentinels: &mut Sentinels<'_>, master: &str, new: &str, deadline: Instant) {
    let until = (Instant::now() + ALL_SENTINELS_WAIT).min(deadline);
    loop {
        let all = (0..sentinels.len()).all(|i| {
            let op = soon(until);
            match sentinels.ask(i, op, |c| primary_addr(c, master, op)) {
                Ok(named) => named.is_some_and(|n| same_address(&n, new)),
                Err(_) => true,
            }
        });
        if all || Instant::now() + POLL >= until {
            return;
        }
        pause_until(until, POLL);
    }
}

fn topology(msg: String) -> RedisError {
    RedisError::Topology(msg)
}

/// Moves the primary of `master` (as the sentinels at `sentinels` see it) to a caught-up replica.
pub fn paused_switchover(
    tls: &TlsClient,
    server_name: &str,
    sentinels: &[String],
    master: &str,
    deadline: Instant,
) -> Result<Switchover, RedisError> {
    paused_switchover_disconnecting(
        tls,
        server_name,
        sentinels,
        master,
        deadline,
        Disconnect::ClientsAndSubscribers,
    )
}

/// Which of the demoted primary's connections the switchover closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// What the rotation does: normal clients and subscribers find the new primary.
    ClientsAndSubscribers,
    /// Normal clients only, as the switchover once did: subscribers stay on the demoted
    /// primary. Kept for the negative control that shows what they then miss.
    ClientsOnly,
}

/// `paused_switchover`, closing `who` on the demoted primary.
pub fn paused_switchover_disconnecting(
    tls: &TlsClient,
    server_name: &str,
    sentinels: &[String],
    master: &str,
    deadline: Instant,
    who: Disconnect,
) -> Result<Switchover, RedisError> {
    let old = agreed_primary(tls, server_name, sentinels, master, deadline).ok_or_else(|| {
        topology(format!(
            "the sentinels {sentinels:?} do not agree on a primary for {master}"
        ))
    })?;
    let mut primary = Connection::connect(tls, &old, server_name, deadline)?;
    let info = info_replication(&mut primary, deadline)?;
    if info.role != Role::Primary || !info.replicas.iter().any(|r| r.state == "online") {
        return Err(topology(format!(
            "{old}: not a primary with an online replica ({info:?}): refusing to move the only copy of the data"
        )));
    }
    // Pause only once Sentinel could promote every replica (its view lags a restart by seconds).
    let pause_by = deadline.checked_sub(MIN_BUDGET).unwrap_or(deadline);
    let (answering, down_after) =
        ready_to_pause(tls, server_name, sentinels, master, &info, pause_by)?;
    let (catch_up, first) = (CATCH_UP.min(down_after / 2), first_pause(down_after));
    let left = deadline.saturating_duration_since(Instant::now());
    if left < MIN_BUDGET {
        return Err(topology(format!(
            "{old}: only {:.1} s left of the step, a paused switchover needs {} s (a {} s pause and the unpause): not paused, nothing moved",
            left.as_secs_f64(),
            MIN_BUDGET.as_secs(),
            PAUSE.as_secs()
        )));
    }
    let pause_ms = first.as_millis().to_string();
    let paused_at = Instant::now();
    primary.call(&["CLIENT", "PAUSE", &pause_ms, "WRITE"], soon(deadline))?;
    tracing::info!(
        primary = %old,
        "writes paused on the primary for the switchover (ends by itself after {:.1} s)",
        first.as_secs_f64()
    );
    let moved = move_while_paused(
        answering,
        master,
        &old,
        &mut primary,
        (paused_at, catch_up, first, who),
    );
    // Unpause whatever happened: on a new connection if ours broke.
    let unpause_by = Instant::now() + OP_TIMEOUT * 2;
    let unpaused = primary
        .call(&["CLIENT", "UNPAUSE"], unpause_by)
        .or_else(|_| {
            Connection::connect(tls, &old, server_name, unpause_by)
                .and_then(|mut c| c.call(&["CLIENT", "UNPAUSE"], unpause_by))
        });
    let (new, replicaof_sent, caught_up_after, promoted_after) = moved?;
    unpaused?;
    // A client that reconnected between the kill and the unpause reached the demoted primary.
    let _ = disconnect_clients(&mut primary, who, soon(deadline));
    Ok(Switchover {
        old_primary: old,
        new_primary: new,
        paused_for: paused_at.elapsed(),
        replicaof_sent,
        caught_up_after,
        promoted_after,
    })
}

/// Waits (until `pause_by`) until every replica of `info` is ready for the answering sentinels;
/// then returns the sentinels that answer right before the pause (a majority: the only ones
/// asked inside it, so that one gone silent costs no paused time) and the catch-up bound.
fn ready_to_pause<'a>(
    tls: &'a TlsClient,
    server_name: &'a str,
    sentinels: &[String],
    master: &str,
    info: &super::replication::Replication,
    pause_by: Instant,
) -> Result<(Sentinels<'a>, Duration), RedisError> {
    // Asked every 100 ms until Sentinel's next INFO of the replica (up to 10 s): on kept
    // connections.
    let kept = Kept::new(tls, server_name);
    for r in &info.replicas {
        let id = ReplicaId {
            endpoint: &r.endpoint(),
            run_id: None,
        };
        loop {
            let ready = answering_sentinels(&kept, sentinels, pause_by)
                .and_then(|a| replica_ready_for_sentinels_by(&kept, &a, master, id, pause_by));
            match ready {
                Ok(()) => break,
                Err(e) if Instant::now() + POLL >= pause_by => return Err(e),
                Err(_) => pause_until(pause_by, POLL * 5),
            }
        }
    }
    let answering = answering_sentinels(&kept, sentinels, pause_by)?;
    // The replicas too are asked inside the pause (their offsets, the promoted one's role):
    // connected now. One that does not answer is asked again inside it, within `OP_TIMEOUT`.
    for r in &info.replicas {
        let op = soon(pause_by);
        let _ = kept.ask(&r.endpoint(), op, |c| c.call(&["PING"], op));
    }
    let mut asked = Sentinels::new(kept, &answering);
    let down_after = down_after(&mut asked, master, pause_by)?;
    Ok((asked, down_after))
}

/// How long writes are first paused, until `SENTINEL FAILOVER` is about to be sent: a pause
/// nobody ends (we died) must end before the sentinels call the paused primary down (it holds
/// their command link) and fail it over by themselves; the old primary, still primary in its own
/// eyes, would then acknowledge writes until Sentinel demotes it, and they would be lost. Only
/// right before `SENTINEL FAILOVER` is the pause extended to `PAUSE`: from then on the outcome
/// is Sentinel's failover, which the pause must outlast.
pub fn first_pause(down_after: Duration) -> Duration {
    (down_after * 3 / 4).min(PAUSE)
}

/// The sentinels that answer a PING within `OP_TIMEOUT`, if a majority of all: one that
/// stops answering neither authorizes nor misdirects, and must not hold the switchover.
fn answering_sentinels(
    kept: &Kept<'_>,
    sentinels: &[String],
    deadline: Instant,
) -> Result<Vec<String>, RedisError> {
    let mut answering = Vec::new();
    let mut silent = Vec::new();
    for s in sentinels {
        let op = soon(deadline);
        match kept.ask(s, op, |c| c.call(&["PING"], op)) {
            Ok(_) => answering.push(s.clone()),
            Err(e) => silent.push(e.to_string()),
        }
    }
    if answering.len() < sentinels.len() / 2 + 1 {
        return Err(topology(format!(
            "fewer than a majority of the sentinels answer: {silent:?}"
        )));
    }
    Ok(answering)
}

/// The shortest `down-after-milliseconds` the answering sentinels have for `master`.
fn down_after(
    sentinels: &mut Sentinels<'_>,
    master: &str,
    deadline: Instant,
) -> Result<Duration, RedisError> {
    let mut asked = Vec::new();
    let mut shortest: Option<Duration> = None;
    for i in 0..sentinels.len() {
        let op = soon(deadline);
        match sentinels.ask(i, op, |c| master_entry(c, master, op)) {
            Ok(m) => match m
                .get("down-after-milliseconds")
                .and_then(|v| v.parse().ok())
            {
                Some(ms) => {
                    let d = Duration::from_millis(ms);
                    shortest = Some(shortest.map_or(d, |s| s.min(d)));
                }
                None => asked.push(format!(
                    "{}: no down-after-milliseconds",
                    sentinels.endpoint(i)
                )),
            },
            Err(e) => asked.push(e.to_string()),
        }
    }
    shortest.ok_or_else(|| {
        topology(format!(
            "no sentinel told its down-after-milliseconds for {master}: {asked:?}"
        ))
    })
}

/// Every replica holds every acknowledged write, `CATCH_UP` into the pause at the latest: then
/// whichever Sentinel picks loses nothing. Asked of the replicas themselves (the primary learns
/// their offsets only once a second), each connection and command within `OP_TIMEOUT`.
fn wait_caught_up(
    kept: &Kept<'_>,
    old: &str,
    primary: &mut Connection,
    by: Instant,
) -> Result<(), RedisError> {
    let paused_since = Instant::now();
    let info = info_replication(primary, soon(by))?;
    let target = info.master_repl_offset;
    let endpoints: Vec<String> = info.replicas.iter().map(|r| r.endpoint()).collect();
    loop {
        let mut behind = Vec::new();
        for endpoint in &endpoints {
            let op = soon(by);
            // At least: the paused primary still sends its replicas PINGs, which move the
            // offset past `target` after it was read (equality then never comes).
            match kept.ask_once(endpoint, op, |c| info_replication(c, op)) {
                Ok(me) if me.link_up && me.replica_offset.is_some_and(|o| o >= target) => {}
                Ok(me) => behind.push(format!("{endpoint} at {:?}", me.replica_offset)),
                Err(e) => behind.push(e.to_string()),
            }
        }
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() + POLL >= by {
            return Err(topology(format!(
                "{old}: replicas did not catch up with offset {target} within {:.1} s of pausing writes, aborted (unpaused, nothing moved): {behind:?}",
                (by - paused_since).as_secs_f64()
            )));
        }
        pause_until(by, POLL / 4);
    }
}

fn move_while_paused(
    mut sentinels: Sentinels<'_>,
    master: &str,
    old: &str,
    primary: &mut Connection,
    (paused_at, catch_up, first, who): (Instant, Duration, Duration, Disconnect),
) -> Result<(String, bool, Duration, Duration), RedisError> {
    wait_caught_up(&sentinels.kept, old, primary, paused_at + catch_up)?;
    let caught_up_after = paused_at.elapsed();
    let extended_at = extend_pause(old, primary, paused_at + first)?;
    // Every wait below ends before the pause does: the outcome is known while writes wait.
    let deadline = extended_at + PAUSE - MARGIN;
    let mut asked = Err(topology("no sentinel to ask".into()));
    let mut silent = Vec::new();
    for i in 0..sentinels.len() {
        let op = soon(deadline);
        asked = sentinels.ask(i, op, |c| c.call(&["SENTINEL", "FAILOVER", master], op));
        match &asked {
            Ok(_) => break,
            Err(RedisError::Io { .. } | RedisError::Timeout { .. }) => {
                silent.push(sentinels.endpoint(i).to_string())
            }
            Err(_) => {}
        }
    }
    asked?;
    // A sentinel that did not answer is not asked again while paused (each try would cost
    // `OP_TIMEOUT`), as long as the others are a majority of all: their agreement still is one.
    if sentinels.len() - silent.len() > sentinels.len() / 2 {
        sentinels = sentinels.without(&silent);
    }
    let new = loop {
        if let Some(p) = sentinels.agreed_primary(master, deadline) {
            if !same_address(&p, old) {
                let op = soon(deadline);
                let promoted = sentinels.kept.ask_once(&p, op, |c| info_replication(c, op));
                if matches!(promoted, Ok(ref i) if i.role == Role::Primary) {
                    break p;
                }
            }
        }
        if Instant::now() + POLL >= deadline {
            return Err(topology(format!(
                "SENTINEL FAILOVER was accepted, but the sentinels did not agree on a new primary for {master} (still {old}) {} s into the pause: unpaused with the outcome unknown",
                (PAUSE - MARGIN).as_secs()
            )));
        }
        pause_until(deadline, POLL);
    };
    let promoted_after = paused_at.elapsed();
    every_sentinel_names(&mut sentinels, master, &new, deadline);
    // Sentinel would turn the old primary into a replica of the new one too, but only after its
    // next INFO poll (seconds); while paused nobody writes to it, so it follows now.
    let info = info_replication(primary, soon(deadline))?;
    let replicaof_sent = !(info.role == Role::Replica
        && info
            .primary
            .as_deref()
            .is_some_and(|p| same_address(p, &new)));
    if replicaof_sent {
        let (host, port) = split_host_port(&new)
            .ok_or_else(|| topology(format!("{new}: not a host:port the sentinels named")))?;
        primary.call(&["REPLICAOF", &host, &port.to_string()], soon(deadline))?;
    }
    // Clients still connected to the old primary must find the new one through the sentinels.
    disconnect_clients(primary, who, soon(deadline))?;
    Ok((new, replicaof_sent, caught_up_after, promoted_after))
}

/// Extends the first pause to `PAUSE` right before `SENTINEL FAILOVER` (Redis keeps the later
/// of two pause ends). If the first pause may have ended before the extension took effect, a
/// write may have slipped in after the catch-up: abort, nothing moved.
fn extend_pause(
    old: &str,
    primary: &mut Connection,
    first_ends: Instant,
) -> Result<Instant, RedisError> {
    let lapsed = |at: Instant| {
        topology(format!(
            "{old}: the first pause (ended {:.2} s ago) lapsed before it could be extended for SENTINEL FAILOVER, aborted (unpaused, nothing moved)",
            at.saturating_duration_since(first_ends).as_secs_f64()
        ))
    };
    if Instant::now() + POLL >= first_ends {
        return Err(lapsed(Instant::now()));
    }
    let extended_at = Instant::now();
    let pause_ms = PAUSE.as_millis().to_string();
    primary.call(&["CLIENT", "PAUSE", &pause_ms, "WRITE"], first_ends)?;
    match Instant::now() {
        now if now >= first_ends => Err(lapsed(now)),
        _ => Ok(extended_at),
    }
}

/// Disconnects the demoted primary's clients, so that they find the new primary through the
/// sentinels: the normal ones (writes would fail with READONLY) and the subscribers. A
/// subscriber left on it gets the new primary's messages only through replication, and loses
/// every one published before the old primary follows the new one (all of them when that takes
/// a full resync). Replicas (this primary's link to its new primary) are not touched.
fn disconnect_clients(
    primary: &mut Connection,
    who: Disconnect,
    deadline: Instant,
) -> Result<(), RedisError> {
    primary.call(&["CLIENT", "KILL", "TYPE", "normal"], deadline)?;
    if who == Disconnect::ClientsAndSubscribers {
        primary.call(&["CLIENT", "KILL", "TYPE", "pubsub"], deadline)?;
    }
    Ok(())
}
