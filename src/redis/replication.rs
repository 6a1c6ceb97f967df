//! `INFO replication`, parsed: who is primary, whether a replica's link is up, and the offsets
//! that tell whether a replica holds every acknowledged write.

use std::time::Instant;

use super::resp::Connection;
use super::RedisError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
}

/// A replica as its primary lists it (`slaveN:ip=…,port=…,state=…,offset=…,lag=…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaLink {
    pub ip: String,
    pub port: u16,
    pub state: String,
    pub offset: i64,
}

impl ReplicaLink {
    /// `ip:port`, an IPv6 address in brackets.
    pub fn endpoint(&self) -> String {
        super::join_host_port(&self.ip, self.port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    pub role: Role,
    /// For a replica: its primary (`master_host:master_port`).
    pub primary: Option<String>,
    /// For a replica: `master_link_status:up`.
    pub link_up: bool,
    pub master_repl_offset: i64,
    /// For a replica: how far it has applied its primary's stream.
    pub replica_offset: Option<i64>,
    /// For a primary: its connected replicas.
    pub replicas: Vec<ReplicaLink>,
}

impl Replication {
    /// The replicas that hold every write the primary has (online, same offset).
    pub fn caught_up(&self) -> Vec<&ReplicaLink> {
        self.replicas
            .iter()
            .filter(|r| r.state == "online" && r.offset == self.master_repl_offset)
            .collect()
    }
}

/// Parses the text of `INFO replication`; `endpoint` names the server in errors.
pub fn parse_info(text: &str, endpoint: &str) -> Result<Replication, RedisError> {
    let bad = |what: String| RedisError::Unexpected {
        endpoint: endpoint.to_string(),
        command: "INFO replication".into(),
        reply: what,
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim_end().strip_prefix(name)?.strip_prefix(':'))
    };
    let role = match field("role") {
        Some("master") => Role::Primary,
        Some("slave") => Role::Replica,
        other => return Err(bad(format!("role {other:?}"))),
    };
    let int = |name: &str| -> Result<Option<i64>, RedisError> {
        field(name)
            .map(|v| v.parse().map_err(|_| bad(format!("{name}:{v}"))))
            .transpose()
    };
    let mut replicas = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.trim_end().split_once(':') else {
            continue;
        };
        if !(key.starts_with("slave") && key[5..].chars().all(|c| c.is_ascii_digit()))
            || key.len() == 5
        {
            continue;
        }
        let get = |k: &str| {
            value
                .split(',')
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
        };
        replicas.push(ReplicaLink {
            ip: get("ip").ok_or_else(|| bad(line.into()))?.to_string(),
            port: get("port")
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| bad(line.into()))?,
            state: get("state").unwrap_or("").to_string(),
            offset: get("offset")
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| bad(line.into()))?,
        });
    }
    Ok(Replication {
        role,
        primary: match (field("master_host"), field("master_port")) {
            (Some(h), Some(p)) => Some(super::join_host_port(h, p)),
            _ => None,
        },
        link_up: field("master_link_status") == Some("up"),
        master_repl_offset: int("master_repl_offset")?
            .ok_or_else(|| bad("no master_repl_offset".into()))?,
        replica_offset: int("slave_repl_offset")?,
        replicas,
    })
}

/// What `INFO server` says about the process: who it is and which Redis it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// `run_id`: new at every start; Sentinel lists it for each replica it has polled.
    pub run_id: String,
    /// `redis_version` as (major, minor, patch).
    pub version: (u32, u32, u32),
}

/// Parses the text of `INFO server`; `endpoint` names the server in errors.
pub fn parse_server(text: &str, endpoint: &str) -> Result<Server, RedisError> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim_end().strip_prefix(name)?.strip_prefix(':'))
    };
    let bad = |what: String| RedisError::Unexpected {
        endpoint: endpoint.to_string(),
        command: "INFO server".into(),
        reply: what,
    };
    let version = field("redis_version").ok_or_else(|| bad("no redis_version".into()))?;
    let mut parts = version.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
    });
    let mut next = || parts.next().and_then(Result::ok);
    let (Some(major), minor, patch) = (next(), next(), next()) else {
        return Err(bad(format!("redis_version:{version}")));
    };
    Ok(Server {
        run_id: field("run_id").unwrap_or("").to_string(),
        version: (major, minor.unwrap_or(0), patch.unwrap_or(0)),
    })
}

/// `INFO server` on `conn`, parsed.
pub fn info_server(conn: &mut Connection, deadline: Instant) -> Result<Server, RedisError> {
    let reply = conn.call(&["INFO", "server"], deadline)?;
    let text = reply.text().ok_or_else(|| RedisError::Unexpected {
        endpoint: conn.endpoint().to_string(),
        command: "INFO server".into(),
        reply: format!("{reply:?}"),
    })?;
    parse_server(&text, conn.endpoint())
}

/// `INFO replication` on `conn`, parsed.
pub fn info_replication(
    conn: &mut Connection,
    deadline: Instant,
) -> Result<Replication, RedisError> {
    let reply = conn.call(&["INFO", "replication"], deadline)?;
    let text = reply.text().ok_or_else(|| RedisError::Unexpected {
        endpoint: conn.endpoint().to_string(),
        command: "INFO replication".into(),
        reply: format!("{reply:?}"),
    })?;
    parse_info(&text, conn.endpoint())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIMARY: &str = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
        slave0:ip=127.0.0.1,port=40001,state=online,offset=5000,lag=0\r\n\
        slave1:ip=127.0.0.1,port=40002,state=wait_bgsave,offset=0,lag=1\r\n\
        master_failover_state:no-failover\r\nmaster_replid:abc\r\nmaster_repl_offset:5000\r\n\
        second_repl_offset:-1\r\nrepl_backlog_active:1\r\n";
    const REPLICA: &str = "# Replication\r\nrole:slave\r\nmaster_host:127.0.0.1\r\n\
        master_port:40000\r\nmaster_link_status:down\r\nmaster_last_io_seconds_ago:-1\r\n\
        slave_read_repl_offset:4000\r\nslave_repl_offset:4000\r\nslave_priority:100\r\n\
        connected_slaves:0\r\nmaster_repl_offset:4000\r\n";

    #[test]
    fn a_primary_lists_its_replicas_and_which_are_caught_up() {
        let r = parse_info(PRIMARY, "db-0").unwrap();
        assert_eq!(r.role, Role::Primary);
        assert_eq!(r.master_repl_offset, 5000);
        assert_eq!(r.replicas.len(), 2);
        assert_eq!(r.replicas[1].endpoint(), "127.0.0.1:40002");
        let caught: Vec<String> = r.caught_up().iter().map(|l| l.endpoint()).collect();
        assert_eq!(caught, ["127.0.0.1:40001"]);
        assert_eq!(r.primary, None);
    }

    #[test]
    fn a_replica_names_its_primary_link_and_offset() {
        let r = parse_info(REPLICA, "db-1").unwrap();
        assert_eq!(r.role, Role::Replica);
        assert_eq!(r.primary.as_deref(), Some("127.0.0.1:40000"));
        assert!(!r.link_up);
        assert_eq!(r.replica_offset, Some(4000));
        let up = parse_info(&REPLICA.replace(":down", ":up"), "db-1").unwrap();
        assert!(up.link_up);
    }

    #[test]
    fn ipv6_peers_are_joined_with_brackets() {
        let text = PRIMARY.replace("ip=127.0.0.1", "ip=fd00::2");
        let r = parse_info(&text, "db-0").unwrap();
        assert_eq!(r.replicas[0].endpoint(), "[fd00::2]:40001");
        let r = parse_info(&REPLICA.replace("127.0.0.1", "fd00::1"), "db-1").unwrap();
        assert_eq!(r.primary.as_deref(), Some("[fd00::1]:40000"));
    }

    #[test]
    fn info_server_gives_the_run_id_and_the_version() {
        let text = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:0\r\nrun_id:abc123\r\n";
        let s = parse_server(text, "db-0").unwrap();
        assert_eq!((s.run_id.as_str(), s.version), ("abc123", (7, 0, 15)));
        let rc = parse_server("redis_version:7.2-rc1\r\n", "db-0").unwrap();
        assert_eq!(rc.version, (7, 2, 0));
        for bad in ["", "redis_version:x.y\r\n"] {
            let err = parse_server(bad, "db-9:6379").unwrap_err().to_string();
            assert!(err.starts_with("db-9:6379"), "{err}");
        }
    }

    #[test]
    fn garbage_is_refused_naming_the_server() {
        for text in [
            "",
            "role:sentinel\r\n",
            "role:master\r\nmaster_repl_offset:x\r\n",
        ] {
            let err = parse_info(text, "db-9:6379").unwrap_err().to_string();
            assert!(err.starts_with("db-9:6379"), "{err}");
        }
    }
}
