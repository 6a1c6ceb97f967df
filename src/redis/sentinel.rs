//! What Sentinel knows: the primary's address, the other sentinels and the replicas it
//! monitors, and whether a quorum could authorize a failover (`SENTINEL CKQUORUM`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::resp::{Connection, Value};
use super::RedisError;

/// A sentinel or replica as `SENTINEL SENTINELS` / `SENTINEL REPLICAS` list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub ip: String,
    pub port: u16,
    pub flags: String,
    pub fields: BTreeMap<String, String>,
}

impl Peer {
    /// `ip:port`, an IPv6 address in brackets.
    pub fn endpoint(&self) -> String {
        super::join_host_port(&self.ip, self.port)
    }

    /// Not flagged subjectively or objectively down, nor disconnected.
    pub fn healthy(&self) -> bool {
        !self
            .flags
            .split(',')
            .any(|f| matches!(f, "s_down" | "o_down" | "disconnected"))
    }
}

fn unexpected(conn: &Connection, command: &str, reply: &Value) -> RedisError {
    RedisError::Unexpected {
        endpoint: conn.endpoint().to_string(),
        command: command.to_string(),
        reply: format!("{reply:?}"),
    }
}

/// Parses the RESP2 flat field/value arrays of `SENTINEL SENTINELS|REPLICAS`.
pub fn parse_peers(reply: &Value) -> Option<Vec<Peer>> {
    reply
        .items()
        .iter()
        .map(|entry| {
            let items = entry.items();
            let fields: BTreeMap<String, String> = items
                .chunks(2)
                .filter_map(|kv| Some((kv.first()?.text()?, kv.get(1)?.text()?)))
                .collect();
            Some(Peer {
                ip: fields.get("ip")?.clone(),
                port: fields.get("port")?.parse().ok()?,
                flags: fields.get("flags").cloned().unwrap_or_default(),
                fields,
            })
        })
        .collect()
}

fn peers(
    conn: &mut Connection,
    what: &str,
    master: &str,
    deadline: Instant,
) -> Result<Vec<Peer>, RedisError> {
    let reply = conn.call(&["SENTINEL", what, master], deadline)?;
    parse_peers(&reply).ok_or_else(|| unexpected(conn, &format!("SENTINEL {what}"), &reply))
}

/// The other sentinels this one knows for `master`.
pub fn sentinels(
    conn: &mut Connection,
    master: &str,
    deadline: Instant,
) -> Result<Vec<Peer>, RedisError> {
    peers(conn, "SENTINELS", master, deadline)
}

/// The replicas this sentinel monitors for `master`.
pub fn replicas(
    conn: &mut Connection,
    master: &str,
    deadline: Instant,
) -> Result<Vec<Peer>, RedisError> {
    peers(conn, "REPLICAS", master, deadline)
}

/// `SENTINEL get-master-addr-by-name`: the primary as `ip:port` (IPv6 in brackets), None if
/// unknown.
pub fn primary_addr(
    conn: &mut Connection,
    master: &str,
    deadline: Instant,
) -> Result<Option<String>, RedisError> {
    let reply = conn.call(&["SENTINEL", "get-master-addr-by-name", master], deadline)?;
    match &reply {
        Value::Array(None) | Value::Bulk(None) => Ok(None),
        Value::Array(Some(items)) if items.len() == 2 => match (items[0].text(), items[1].text()) {
            (Some(ip), Some(port)) => Ok(Some(super::join_host_port(&ip, port))),
            _ => Err(unexpected(conn, "SENTINEL get-master-addr-by-name", &reply)),
        },
        _ => Err(unexpected(conn, "SENTINEL get-master-addr-by-name", &reply)),
    }
}

/// `SENTINEL CKQUORUM`: Ok with Sentinel's message when a quorum and a majority are reachable.
pub fn ckquorum(
    conn: &mut Connection,
    master: &str,
    deadline: Instant,
) -> Result<String, RedisError> {
    let reply = conn.call(&["SENTINEL", "CKQUORUM", master], deadline)?;
    reply
        .text()
        .ok_or_else(|| unexpected(conn, "SENTINEL CKQUORUM", &reply))
}

/// The gate after a sentinel restart: CKQUORUM passes and it sees `others` healthy sentinels
/// and `replicas` healthy replicas.
pub fn in_quorum_and_sees_the_others(
    conn: &mut Connection,
    master: &str,
    others: usize,
    replica_count: usize,
    deadline: Instant,
) -> Result<(), RedisError> {
    ckquorum(conn, master, deadline)?;
    let seen = sentinels(conn, master, deadline)?;
    let healthy = seen.iter().filter(|p| p.healthy()).count();
    let reps = replicas(conn, master, deadline)?;
    let healthy_replicas = reps.iter().filter(|p| p.healthy()).count();
    if healthy < others || healthy_replicas < replica_count {
        return Err(RedisError::Topology(format!(
            "{}: sees {healthy} of {others} other sentinels and {healthy_replicas} of {replica_count} replicas healthy",
            conn.endpoint()
        )));
    }
    Ok(())
}

/// `SENTINEL MASTER <master>`: the primary's entry as this sentinel sees it (its `flags` say
/// whether a failover is under way).
pub fn master_entry(
    conn: &mut Connection,
    master: &str,
    deadline: Instant,
) -> Result<BTreeMap<String, String>, RedisError> {
    let reply = conn.call(&["SENTINEL", "MASTER", master], deadline)?;
    let items = reply.items();
    let fields: BTreeMap<String, String> = items
        .chunks(2)
        .filter_map(|kv| Some((kv.first()?.text()?, kv.get(1)?.text()?)))
        .collect();
    if fields.is_empty() {
        return Err(unexpected(conn, "SENTINEL MASTER", &reply));
    }
    Ok(fields)
}

/// How often a sentinel asks the primary for `INFO` (Redis' `SENTINEL_INFO_PERIOD`; only
/// `SENTINEL DEBUG` changes it). The replicas a sentinel knows come from that `INFO` alone.
pub const INFO_PERIOD: Duration = Duration::from_secs(10);

/// How long before a sentinel's next `INFO` of the primary its reset is sent at the earliest:
/// room for the checks before the reset, the reset itself and the sentinel's reconnect (it
/// sends the `INFO` on its first ~100 ms tick past the period).
pub const RESET_LEAD: Duration = Duration::from_millis(1500);

/// How long before that `INFO` a reset is sent at the latest. Later, the reply to that `INFO`
/// could land just before the reset, which would then leave the sentinel without replicas for
/// a whole period: the reset waits for the next `INFO` instead.
pub const RESET_LATEST: Duration = Duration::from_millis(500);

/// How overdue a sentinel's `INFO` of the primary may be and still be expected: past it, its
/// link to the primary is down, no `INFO` is coming, and nothing is gained by waiting.
pub const INFO_STALE: Duration = Duration::from_secs(3);

/// How long ago this sentinel last had the primary's `INFO` (`info-refresh` in its
/// `SENTINEL MASTER` entry), if it says.
pub fn since_primary_info(entry: &BTreeMap<String, String>) -> Option<Duration> {
    let ms: u64 = entry.get("info-refresh")?.parse().ok()?;
    Some(Duration::from_millis(ms))
}

/// How long to wait so that a reset lands between `RESET_LEAD` and `RESET_LATEST` before the
/// sentinel's next `INFO` of the primary. Nothing within that window, or when the sentinel
/// did not say when it had the last `INFO` (or never had one), or when that `INFO` is stale; the
/// next `INFO`'s window when this one's has passed (that `INFO` may be in flight).
pub fn wait_before_reset(since: Option<Duration>) -> Duration {
    // 0: it never had that `INFO` (it cannot reach the primary yet); it asks at once when it
    // does, so there is nothing to wait for.
    let Some(since) = since.filter(|s| !s.is_zero()) else {
        return Duration::ZERO;
    };
    let earliest = INFO_PERIOD - RESET_LEAD;
    if since < earliest {
        earliest - since
    } else if since <= INFO_PERIOD - RESET_LATEST || since >= INFO_PERIOD + INFO_STALE {
        Duration::ZERO
    } else {
        (INFO_PERIOD + earliest).saturating_sub(since)
    }
}

/// `SENTINEL RESET <master>`: the sentinel forgets every other sentinel and every replica it
/// knows for `master` (and any failover state), then relearns the live ones: sentinels from
/// their hello messages (every 2 s), replicas only at its next `INFO` of the primary, which the
/// reset does not bring forward (up to `INFO_PERIOD` later).
pub fn reset(conn: &mut Connection, master: &str, deadline: Instant) -> Result<(), RedisError> {
    match conn.call(&["SENTINEL", "RESET", master], deadline)? {
        Value::Int(1) => Ok(()),
        reply => Err(unexpected(conn, "SENTINEL RESET", &reply)),
    }
}

/// Whether this sentinel knows exactly `others` sentinels and `replica_count` replicas, every
/// one healthy and each replica with its link to the primary up: nothing gone is remembered and
/// a failover can both be authorized and find a replica to promote. Else a Topology error
/// listing what it knows.
pub fn knows_exactly(
    conn: &mut Connection,
    master: &str,
    others: usize,
    replica_count: usize,
    deadline: Instant,
) -> Result<(), RedisError> {
    let seen = sentinels(conn, master, deadline)?;
    let reps = replicas(conn, master, deadline)?;
    let link_up = |p: &Peer| p.fields.get("master-link-status").map(String::as_str) == Some("ok");
    let exact = seen.len() == others
        && reps.len() == replica_count
        && seen.iter().all(Peer::healthy)
        && reps.iter().all(|p| p.healthy() && link_up(p));
    if exact {
        return Ok(());
    }
    let show = |v: &[Peer]| {
        v.iter()
            .map(|p| format!("{} ({})", p.endpoint(), p.flags))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(RedisError::Topology(format!(
        "{}: knows sentinels [{}] and replicas [{}]; expected exactly {others} and {replica_count}, healthy",
        conn.endpoint(),
        show(&seen),
        show(&reps)
    )))
}

/// A replica as the tool knows it: where it reaches it, and (if asked) its `run_id`, which
/// names it whatever address Sentinel sees it at (a `--redis-endpoint` override, a hostname).
#[derive(Debug, Clone, Copy)]
pub struct ReplicaId<'a> {
    pub endpoint: &'a str,
    pub run_id: Option<&'a str>,
}

impl ReplicaId<'_> {
    /// Whether Sentinel's entry `p` is this replica: the same run ID, else the same address
    /// (compared as addresses).
    pub fn is(&self, p: &Peer) -> bool {
        let run_id = p.fields.get("runid").filter(|r| !r.is_empty());
        match (self.run_id, run_id) {
            (Some(mine), Some(theirs)) if mine == theirs => true,
            _ => super::same_address(&p.endpoint(), self.endpoint),
        }
    }
}

/// Whether every sentinel at `sentinels` lists the replica at `replica` (`ip:port`) as healthy
/// with its link to the primary up. Sentinel refreshes a replica's INFO only every 10 s, and a
/// failover never promotes a replica whose last INFO showed the link down (`NOGOODSLAVE`).
pub fn replica_ready_for_sentinels(
    tls: &super::TlsClient,
    server_name: &str,
    sentinels: &[String],
    master: &str,
    replica: &str,
    deadline: Instant,
) -> Result<(), RedisError> {
    let id = ReplicaId {
        endpoint: replica,
        run_id: None,
    };
    let kept = super::kept::Kept::new(tls, server_name);
    replica_ready_for_sentinels_by(&kept, sentinels, master, id, deadline)
}

/// `replica_ready_for_sentinels`, the replica found in Sentinel's lists by `id`, each sentinel
/// asked on the connection `kept` holds for it.
pub fn replica_ready_for_sentinels_by(
    kept: &super::kept::Kept<'_>,
    sentinels: &[String],
    master: &str,
    id: ReplicaId<'_>,
    deadline: Instant,
) -> Result<(), RedisError> {
    let replica = id.endpoint;
    for s in sentinels {
        let seen = kept.ask(s, deadline, |c| replicas(c, master, deadline))?;
        let ready = seen.iter().any(|p| {
            id.is(p)
                && p.healthy()
                && p.fields.get("master-link-status").map(String::as_str) == Some("ok")
        });
        if !ready {
            let seen: Vec<String> = seen
                .iter()
                .map(|p| {
                    let link = p
                        .fields
                        .get("master-link-status")
                        .map_or("?", String::as_str);
                    format!("{} ({}, link {link})", p.endpoint(), p.flags)
                })
                .collect();
            return Err(RedisError::Topology(format!(
                "{s}: does not yet see replica {replica} healthy with its link up; it sees [{}]",
                seen.join(", ")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_waits_until_the_sentinels_next_info_of_the_primary_is_a_lead_away() {
        let entry = |ms: &str| BTreeMap::from([("info-refresh".to_string(), ms.to_string())]);
        let wait = |ms: &str| wait_before_reset(since_primary_info(&entry(ms)));
        // Had the INFO 2 s ago: the next comes in 8 s, the reset 1.5 s before it.
        assert_eq!(wait("2000"), Duration::from_millis(6500));
        assert_eq!(
            wait("1"),
            INFO_PERIOD - RESET_LEAD - Duration::from_millis(1)
        );
        // Never had it (Redis says 0): it asks as soon as it reaches the primary. At once.
        assert_eq!(wait("0"), Duration::ZERO);
        // Within the window: at once.
        assert_eq!(wait("8500"), Duration::ZERO);
        assert_eq!(wait("9500"), Duration::ZERO);
        // Past it: the INFO may be in flight, and its reply land just before the reset (a
        // fresh-clone CI run had a reset sentinel without replicas for 10.03 s). The next one's.
        assert_eq!(wait("9900"), Duration::from_millis(8600));
        assert_eq!(wait("10050"), Duration::from_millis(8450));
        assert_eq!(wait("12900"), Duration::from_millis(5600));
        // Stale (the sentinel's link to the primary is down) or not said: at once.
        assert_eq!(wait("13000"), Duration::ZERO);
        assert_eq!(wait("25000"), Duration::ZERO);
        assert_eq!(wait("soon"), Duration::ZERO);
        assert_eq!(
            wait_before_reset(since_primary_info(&BTreeMap::new())),
            Duration::ZERO
        );
    }

    fn bulk(s: &str) -> Value {
        Value::Bulk(Some(s.as_bytes().to_vec()))
    }

    #[test]
    fn peers_parse_from_flat_field_value_arrays() {
        let reply = Value::Array(Some(vec![
            Value::Array(Some(
                [
                    "name",
                    "abc",
                    "ip",
                    "127.0.0.1",
                    "port",
                    "26380",
                    "flags",
                    "sentinel",
                ]
                .iter()
                .map(|s| bulk(s))
                .collect(),
            )),
            Value::Array(Some(
                [
                    "ip",
                    "127.0.0.1",
                    "port",
                    "26381",
                    "flags",
                    "s_down,sentinel",
                ]
                .iter()
                .map(|s| bulk(s))
                .collect(),
            )),
        ]));
        let peers = parse_peers(&reply).unwrap();
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].endpoint(), "127.0.0.1:26380");
        assert_eq!(peers[0].fields["name"], "abc");
        assert!(peers[0].healthy());
        assert!(!peers[1].healthy());
        let no_port = Value::Array(Some(vec![Value::Array(Some(vec![bulk("ip"), bulk("x")]))]));
        assert_eq!(parse_peers(&no_port), None);
    }
}
