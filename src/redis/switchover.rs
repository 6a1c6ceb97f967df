//! The paused switchover: moves the primary role to a replica without losing an acknowledged
//! write. A bare `SENTINEL FAILOVER` under load loses thousands (writes acknowledged by the old
//! primary after the chosen replica's last sync); pausing writes first closes that window.
//!
//! `CLIENT PAUSE WRITE` on the primary (with a timeout, so a crashed caller never leaves it
//! paused), wait until every replica's offset reaches the primary's, `SENTINEL FAILOVER`, wait
//! until the sentinels agree on the new primary and it says so (and, briefly, until every sentinel
//! that answers names it), make sure the old one follows it
//! (`REPLICAOF` if Sentinel has not yet), disconnect its normal clients so they re-resolve the
//! primary through the sentinels, `CLIENT UNPAUSE`.

use std::time::{Duration, Instant};

use super::replication::{info_replication, Role};
use super::resp::Connection;
use super::sentinel::{primary_addr, replica_ready_for_sentinels};
use super::tls::TlsClient;
use super::{pause_until, same_address, split_host_port, RedisError};

const POLL: Duration = Duration::from_millis(20);
/// The longest a primary stays paused if we die midway (Redis ends the pause by itself).
const PAUSE_CAP: Duration = Duration::from_secs(30);

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

/// Where the sentinels say the primary is: the answer of a majority that agree, else None.
pub fn agreed_primary(
    tls: &TlsClient,
    server_name: &str,
    sentinels: &[String],
    master: &str,
    deadline: Instant,
) -> Option<String> {
    let mut answers: Vec<String> = Vec::new();
    for s in sentinels {
        let answer = Connection::connect(tls, s, server_name, deadline)
            .and_then(|mut c| primary_addr(&mut c, master, deadline));
        if let Ok(Some(a)) = answer {
            answers.push(a);
        }
    }
    let majority = sentinels.len() / 2 + 1;
    answers
        .iter()
        .find(|a| answers.iter().filter(|b| same_address(a, b)).count() >= majority)
        .cloned()
}

/// How long the pause may wait for the last sentinels to learn the promotion.
const ALL_SENTINELS_WAIT: Duration = Duration::from_secs(2);

/// Waits until every sentinel that answers names `new` (bounded by `ALL_SENTINELS_WAIT`). A
/// client's retry may ask another sentinel than its first try: one still naming the old primary
/// would send it to a replica. Sentinel pushes a promotion to the others at once, so this is
/// usually immediate; one that does not answer cannot misdirect anybody and is not waited for.
fn every_sentinel_names(
    tls: &TlsClient,
    server_name: &str,
    sentinels: &[String],
    master: &str,
    new: &str,
    deadline: Instant,
) {
    let until = (Instant::now() + ALL_SENTINELS_WAIT).min(deadline);
    loop {
        let all = sentinels.iter().all(|s| {
            match Connection::connect(tls, s, server_name, until)
                .and_then(|mut c| primary_addr(&mut c, master, until))
            {
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
    for r in &info.replicas {
        let endpoint = r.endpoint();
        loop {
            match replica_ready_for_sentinels(
                tls,
                server_name,
                sentinels,
                master,
                &endpoint,
                deadline,
            ) {
                Ok(()) => break,
                Err(e) if Instant::now() + POLL >= deadline => return Err(e),
                Err(_) => pause_until(deadline, POLL * 5),
            }
        }
    }
    let pause_ms = deadline
        .saturating_duration_since(Instant::now())
        .min(PAUSE_CAP)
        .as_millis()
        .to_string();
    let paused_at = Instant::now();
    primary.call(&["CLIENT", "PAUSE", &pause_ms, "WRITE"], deadline)?;
    let moved = move_while_paused(
        tls,
        server_name,
        sentinels,
        master,
        &old,
        &mut primary,
        (paused_at, deadline),
    );
    // Unpause whatever happened: on a new connection if ours broke.
    let unpaused = primary
        .call(&["CLIENT", "UNPAUSE"], deadline + Duration::from_secs(2))
        .or_else(|_| {
            Connection::connect(tls, &old, server_name, deadline + Duration::from_secs(2))
                .and_then(|mut c| c.call(&["CLIENT", "UNPAUSE"], deadline + Duration::from_secs(2)))
        });
    let (new, replicaof_sent, caught_up_after, promoted_after) = moved?;
    unpaused?;
    Ok(Switchover {
        old_primary: old,
        new_primary: new,
        paused_for: paused_at.elapsed(),
        replicaof_sent,
        caught_up_after,
        promoted_after,
    })
}

fn move_while_paused(
    tls: &TlsClient,
    server_name: &str,
    sentinels: &[String],
    master: &str,
    old: &str,
    primary: &mut Connection,
    (paused_at, deadline): (Instant, Instant),
) -> Result<(String, bool, Duration, Duration), RedisError> {
    // Every replica holds every acknowledged write: whichever Sentinel picks loses nothing. Asked
    // of the replicas themselves: the primary learns their offsets only once a second.
    let info = info_replication(primary, deadline)?;
    let target = info.master_repl_offset;
    let mut replicas = info
        .replicas
        .iter()
        .map(|r| Connection::connect(tls, &r.endpoint(), server_name, deadline))
        .collect::<Result<Vec<_>, _>>()?;
    loop {
        let mut behind = Vec::new();
        for r in &mut replicas {
            let me = info_replication(r, deadline)?;
            // At least: the paused primary still sends its replicas PINGs, which move the
            // offset past `target` after it was read (equality then never comes).
            if !(me.link_up && me.replica_offset.is_some_and(|o| o >= target)) {
                behind.push(format!("{} at {:?}", r.endpoint(), me.replica_offset));
            }
        }
        if behind.is_empty() {
            break;
        }
        if Instant::now() + POLL >= deadline {
            return Err(topology(format!(
                "{old}: replicas did not catch up with offset {target} while writes were paused: {behind:?}"
            )));
        }
        pause_until(deadline, POLL / 4);
    }
    let caught_up_after = paused_at.elapsed();
    let mut asked = Err(topology("no sentinel to ask".into()));
    for s in sentinels {
        asked = Connection::connect(tls, s, server_name, deadline)
            .and_then(|mut c| c.call(&["SENTINEL", "FAILOVER", master], deadline));
        if asked.is_ok() {
            break;
        }
    }
    asked?;
    let new = loop {
        if let Some(p) = agreed_primary(tls, server_name, sentinels, master, deadline) {
            if !same_address(&p, old) {
                let promoted = Connection::connect(tls, &p, server_name, deadline)
                    .and_then(|mut c| info_replication(&mut c, deadline));
                if matches!(promoted, Ok(ref i) if i.role == Role::Primary) {
                    break p;
                }
            }
        }
        if Instant::now() + POLL >= deadline {
            return Err(topology(format!(
                "the sentinels did not agree on a new primary for {master} (still {old}) before the deadline"
            )));
        }
        pause_until(deadline, POLL);
    };
    let promoted_after = paused_at.elapsed();
    every_sentinel_names(tls, server_name, sentinels, master, &new, deadline);
    // Sentinel would turn the old primary into a replica of the new one too, but only after its
    // next INFO poll (seconds); while paused nobody writes to it, so it follows now.
    let info = info_replication(primary, deadline)?;
    let replicaof_sent = !(info.role == Role::Replica
        && info
            .primary
            .as_deref()
            .is_some_and(|p| same_address(p, &new)));
    if replicaof_sent {
        let (host, port) = split_host_port(&new)
            .ok_or_else(|| topology(format!("{new}: not a host:port the sentinels named")))?;
        primary.call(&["REPLICAOF", &host, &port.to_string()], deadline)?;
    }
    // Clients still connected to the old primary must find the new one through the sentinels.
    primary.call(&["CLIENT", "KILL", "TYPE", "normal"], deadline)?;
    Ok((new, replicaof_sent, caught_up_after, promoted_after))
}
