//! `redis`: the only code that talks Redis during a rotation (with `probe`, which shares its TLS
//! setup): a small RESP client over mutual TLS, `INFO replication`, the in-place TLS reload of a
//! DB, Sentinel's quorum and topology views, the paused switchover, and the pure rollout plan
//! that orders them.
//!
//! Every operation takes a deadline; nothing here waits unbounded.

pub mod kept;
pub mod reload;
pub mod replication;
pub mod resp;
pub mod rollout;
pub mod sentinel;
pub mod switchover;
pub mod tls;

pub use replication::{info_replication, Replication, Role};
pub use resp::{Connection, Value};
pub use tls::{ClientIdentity, ClientMaterials, TlsClient};

/// The name Sentinel monitors dSSM's primary under, unless configured otherwise.
pub const DEFAULT_MASTER_NAME: &str = "mymaster";

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("{endpoint}: {detail}")]
    Io { endpoint: String, detail: String },
    #[error("{endpoint}: no answer to {what} before the deadline")]
    Timeout { endpoint: String, what: String },
    #[error("{endpoint}: {command} failed: {message}")]
    Reply {
        endpoint: String,
        command: String,
        message: String,
    },
    #[error("{endpoint}: unexpected reply to {command}: {reply}")]
    Unexpected {
        endpoint: String,
        command: String,
        reply: String,
    },
    #[error("{endpoint}: still serves certificate {served} instead of {expected} after reloading until the deadline: the mounted files were not swapped (subPath mount, or kubelet has not synced yet){last_error}")]
    NotSwapped {
        endpoint: String,
        expected: String,
        served: String,
        last_error: String,
    },
    /// The DB cannot reload its TLS files in place (`CONFIG` renamed or disabled, or a Redis
    /// that does not re-read a path set again): a restart brings the files instead, at once.
    #[error("{endpoint}: cannot reload TLS files in place: {reason}")]
    ReloadUnavailable { endpoint: String, reason: String },
    /// The DB refused the mounted TLS files: nothing may be restarted onto them.
    #[error("{endpoint}: refused the mounted TLS files (tls-cert-file {cert}, tls-key-file {key}, tls-ca-cert-file {ca}): {message}; the rotation stops here, nothing restarted onto them (the DB's log names the file it could not load)")]
    TlsConfig {
        endpoint: String,
        cert: String,
        key: String,
        ca: String,
        message: String,
    },
    #[error("{0}")]
    Topology(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsSetupError),
}

/// `host:port` as a socket address wants it: an IPv6 literal in brackets (`[fd00::2]:6379`).
/// Sentinel and `INFO` give the host bare and the port apart; brackets already there are kept
/// once.
pub fn join_host_port(host: &str, port: impl std::fmt::Display) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `host:port` or `[v6]:port` split into the bare host and the port; a bare IPv6 literal
/// followed by `:port` (`fd00::2:6379`, as joined by a careless hand) only where the host part
/// still parses as an address. None for anything else.
pub fn split_host_port(endpoint: &str) -> Option<(String, u16)> {
    let endpoint = endpoint.trim();
    if let Some(rest) = endpoint.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        host.parse::<std::net::Ipv6Addr>().ok()?;
        return Some((host.to_string(), port.parse().ok()?));
    }
    let (host, port) = endpoint.rsplit_once(':')?;
    let port = port.parse().ok()?;
    if host.is_empty() || (host.contains(':') && host.parse::<std::net::IpAddr>().is_err()) {
        return None;
    }
    Some((host.to_string(), port))
}

/// The socket addresses `endpoint` stands for, IPs normalized (an IPv4-mapped IPv6 address is
/// its IPv4 address); a hostname resolved. Empty when it cannot be parsed or resolved.
fn socket_addrs(endpoint: &str) -> Vec<std::net::SocketAddr> {
    use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
    let Some((host, port)) = split_host_port(endpoint) else {
        return Vec::new();
    };
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    match host.parse::<IpAddr>() {
        Ok(ip) => vec![canonical(SocketAddr::new(ip, port))],
        Err(_) => (host.as_str(), port)
            .to_socket_addrs()
            .map(|addrs| addrs.map(canonical).collect())
            .unwrap_or_default(),
    }
}

/// Whether two endpoints name the same server: the same port and the same IP once both are
/// parsed as addresses (brackets stripped, IPv6 in any spelling, IPv4-mapped IPv6 as IPv4) and
/// hostnames resolved (`announce-hostnames`, `--redis-endpoint` names). Never compared as text.
pub fn same_address(a: &str, b: &str) -> bool {
    let a = socket_addrs(a);
    !a.is_empty() && socket_addrs(b).iter().any(|x| a.contains(x))
}

impl RedisError {
    /// An authentication or permission refusal (`NOAUTH`, `NOPERM`, `WRONGPASS`): retrying does
    /// not help, it is reported.
    pub fn is_auth(&self) -> bool {
        let text = self.to_string();
        ["NOAUTH", "NOPERM", "WRONGPASS"]
            .iter()
            .any(|k| text.contains(k))
    }
}

/// Sleeps `step`, but never past `deadline`.
pub(crate) fn pause_until(deadline: std::time::Instant, step: std::time::Duration) {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    std::thread::sleep(step.min(left));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_compare_as_addresses_not_as_text() {
        let cases: &[(&str, &str, bool)] = &[
            ("127.0.0.1:6379", "127.0.0.1:6379", true),
            ("127.0.0.1:6379", "127.0.0.1:6380", false),
            ("127.0.0.1:6379", "127.0.0.2:6379", false),
            // Sentinel's bare IPv6 answer, joined, against the tool's bracketed endpoint.
            ("[fd00::2]:6379", "fd00::2:6379", true),
            ("[fd00::2]:6379", "[fd00:0:0:0:0:0:0:2]:6379", true),
            ("[FD00::2]:6379", "[fd00::2]:6379", true),
            ("[fd00::2]:6379", "[fd00::3]:6379", false),
            ("[::ffff:10.0.0.7]:6379", "10.0.0.7:6379", true),
            // A hostname is resolved (localhost: 127.0.0.1 and maybe ::1).
            ("localhost:6379", "127.0.0.1:6379", true),
            ("localhost:6379", "127.0.0.2:6379", false),
            // What cannot be parsed is never the same as anything, itself included.
            ("garbage", "garbage", false),
            ("fd00::6379", "fd00::6379", false),
            ("[fd00::2]6379", "[fd00::2]6379", false),
            ("", "", false),
        ];
        for (a, b, same) in cases {
            assert_eq!(same_address(a, b), *same, "{a} vs {b}");
            assert_eq!(same_address(b, a), *same, "{b} vs {a}");
        }
    }

    #[test]
    fn ipv6_hosts_are_bracketed_once_when_joined_and_unbracketed_when_split() {
        assert_eq!(join_host_port("fd00::2", 6379), "[fd00::2]:6379");
        assert_eq!(join_host_port("[fd00::2]", "6379"), "[fd00::2]:6379");
        assert_eq!(join_host_port("10.0.0.7", 6379), "10.0.0.7:6379");
        assert_eq!(join_host_port("db-0.dssm", 6379), "db-0.dssm:6379");
        assert_eq!(
            split_host_port("[fd00::2]:6379"),
            Some(("fd00::2".into(), 6379))
        );
        assert_eq!(
            split_host_port("fd00::2:6379"),
            Some(("fd00::2".into(), 6379))
        );
        assert_eq!(
            split_host_port("db-0.dssm:6379"),
            Some(("db-0.dssm".into(), 6379))
        );
        for bad in [
            "[fd00::2]",
            "[nope]:1",
            ":6379",
            "host:",
            "host:99999",
            "fd00::x:1",
        ] {
            assert_eq!(split_host_port(bad), None, "{bad}");
        }
    }
}
