//! The in-place TLS reload of a Redis DB: `CONFIG SET tls-cert-file P tls-key-file P
//! tls-ca-cert-file P` with the paths it already uses (Redis ≥ 7.0.1 re-reads them even when
//! unchanged), proven by new handshakes. Existing connections, replication links included, keep
//! their session. Sentinel cannot do this (`SENTINEL CONFIG SET` refuses TLS settings).

use std::time::{Duration, Instant};

use super::replication::info_server;
use super::resp::Connection;
use super::tls::TlsClient;
use super::{pause_until, RedisError};

/// Whether a Redis of `version` re-reads TLS files when `CONFIG SET` names the path it already
/// uses: 7.0.0 does not (it compares the paths), 7.0.1 and later do.
pub fn reloads_same_path(version: (u32, u32, u32)) -> bool {
    version >= (7, 0, 1)
}

/// `CONFIG` answered as renamed or disabled.
fn unknown_command(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.starts_with("err unknown command") || m.starts_with("err unknown subcommand")
}

/// What new handshakes must show once a process runs a phase's materials.
#[derive(Debug, Default)]
pub struct Proof<'a> {
    /// SHA-256 fingerprint of the certificate the process must serve.
    pub serves: Option<String>,
    /// Clients whose certificate it must accept (e.g. a leaf signed by the new CA).
    pub accepts: Vec<&'a TlsClient>,
    /// Clients it must refuse (e.g. the old CA's leaf once the old CA is dropped).
    pub refuses: Vec<&'a TlsClient>,
}

const RETRY: Duration = Duration::from_millis(200);

/// How long a refusal of the mounted files is taken for a mount caught between its two Secret
/// volumes (kubelet updates them one after the other; a run resumed after one killed between
/// the two writes reloads right after writing the second): the new leaf beside the old key.
/// Refusals are retried this long, then stop the rotation.
const MOUNT_LAG: Duration = Duration::from_secs(3);

/// One round of new handshakes against `endpoint`: Ok, or what does not hold yet.
pub fn check_proof(
    tls: &TlsClient,
    endpoint: &str,
    server_name: &str,
    proof: &Proof<'_>,
    deadline: Instant,
) -> Result<(), RedisError> {
    let conn = Connection::connect(tls, endpoint, server_name, deadline)?;
    let served = conn.served_fingerprint().unwrap_or("none").to_string();
    if let Some(expected) = &proof.serves {
        if served != *expected {
            return Err(RedisError::NotSwapped {
                endpoint: endpoint.to_string(),
                expected: expected.clone(),
                served,
                last_error: String::new(),
            });
        }
    }
    for client in &proof.accepts {
        Connection::connect(client, endpoint, server_name, deadline).map_err(|e| {
            RedisError::Topology(format!(
                "{endpoint}: does not yet accept the client certificate {}: {e}",
                client.leaf_fingerprint()
            ))
        })?;
    }
    // A refusal is the server's TLS alert: a timeout or a closed connection proves nothing
    // (the error makes the caller try again until its deadline).
    for client in &proof.refuses {
        let verdict = super::resp::handshake(client, endpoint, server_name, deadline)?;
        if verdict == super::resp::Handshake::Accepted {
            return Err(RedisError::Topology(format!(
                "{endpoint}: still accepts the client certificate {}",
                client.leaf_fingerprint()
            )));
        }
    }
    Ok(())
}

/// `CONFIG` renamed or disabled, as the error that makes the rollout restart the DB at once.
fn config_unavailable(e: RedisError) -> RedisError {
    match e {
        RedisError::Reply {
            endpoint, message, ..
        } if unknown_command(&message) => RedisError::ReloadUnavailable {
            endpoint,
            reason: format!("CONFIG is renamed or disabled ({message})"),
        },
        e => e,
    }
}

fn config_get(conn: &mut Connection, name: &str, deadline: Instant) -> Result<String, RedisError> {
    let reply = conn
        .call(&["CONFIG", "GET", name], deadline)
        .map_err(config_unavailable)?;
    match reply.items() {
        [_, value] => value.text().filter(|v| !v.is_empty()),
        _ => None,
    }
    .ok_or_else(|| RedisError::Unexpected {
        endpoint: conn.endpoint().to_string(),
        command: format!("CONFIG GET {name}"),
        reply: format!("{reply:?} (TLS not configured?)"),
    })
}

/// Issues one `CONFIG SET` of the TLS file paths the DB already uses.
pub fn config_set_same_paths(conn: &mut Connection, deadline: Instant) -> Result<(), RedisError> {
    let cert = config_get(conn, "tls-cert-file", deadline)?;
    let key = config_get(conn, "tls-key-file", deadline)?;
    let ca = config_get(conn, "tls-ca-cert-file", deadline)?;
    let set = conn.call(
        &[
            "CONFIG",
            "SET",
            "tls-cert-file",
            &cert,
            "tls-key-file",
            &key,
            "tls-ca-cert-file",
            &ca,
        ],
        deadline,
    );
    match set.map_err(config_unavailable) {
        Ok(_) => {
            crate::model::restarts::count(crate::model::restarts::Kind::DbReload, 1);
            Ok(())
        }
        // Redis could not load what the paths hold now (a key that does not match, a bad PEM).
        Err(RedisError::Reply {
            endpoint, message, ..
        }) if message.to_ascii_lowercase().contains("tls") => Err(RedisError::TlsConfig {
            endpoint,
            cert,
            key,
            ca,
            message,
        }),
        Err(e) => Err(e),
    }
}

/// Errors a retry cannot cure: reported (or, for `ReloadUnavailable`, restarted) at once.
fn final_error(e: &RedisError) -> bool {
    matches!(
        e,
        RedisError::TlsConfig { .. } | RedisError::ReloadUnavailable { .. }
    ) || e.is_auth()
}

/// One reload round: the version quirk checked on the first, then `CONFIG SET`, then the proof.
fn reload_round(
    tls: &TlsClient,
    endpoint: &str,
    server_name: &str,
    proof: &Proof<'_>,
    (first, deadline): (bool, Instant),
) -> Result<(), RedisError> {
    let mut c = Connection::connect(tls, endpoint, server_name, deadline)?;
    if first {
        // `INFO` renamed too: no version to go by, the proof still decides.
        if let Ok(server) = info_server(&mut c, deadline) {
            if !reloads_same_path(server.version) {
                let (a, b, p) = server.version;
                return Err(RedisError::ReloadUnavailable {
                    endpoint: endpoint.to_string(),
                    reason: format!(
                        "redis_version {a}.{b}.{p} does not re-read TLS files set to the same path (7.0.1 does)"
                    ),
                });
            }
        }
    }
    config_set_same_paths(&mut c, deadline)?;
    check_proof(tls, endpoint, server_name, proof, deadline)
}

#[derive(Debug, Clone)]
pub struct Reloaded {
    pub endpoint: String,
    /// CONFIG SET rounds until new handshakes proved the new files (1 if kubelet had already
    /// swapped them).
    pub attempts: u32,
    pub took: Duration,
}

/// Reloads the DB at `endpoint` until new handshakes show `proof`, or reports at `deadline`
/// that the files were not swapped (the caller then falls back to a restart). Errors by kind,
/// at once: the files refused (`TlsConfig`: nothing may restart onto them; after `MOUNT_LAG`
/// of refusals), no in-place reload possible (`ReloadUnavailable`: restart instead), an
/// authentication refusal.
pub fn reload_tls(
    tls: &TlsClient,
    endpoint: &str,
    server_name: &str,
    proof: &Proof<'_>,
    deadline: Instant,
) -> Result<Reloaded, RedisError> {
    let start = Instant::now();
    let mut attempts = 0;
    let mut served = "unknown".to_string();
    loop {
        attempts += 1;
        let round = reload_round(tls, endpoint, server_name, proof, (attempts == 1, deadline));
        let last_error = match round {
            Ok(()) => {
                return Ok(Reloaded {
                    endpoint: endpoint.to_string(),
                    attempts,
                    took: start.elapsed(),
                })
            }
            Err(RedisError::NotSwapped { served: s, .. }) => {
                served = s;
                String::new()
            }
            Err(e @ RedisError::TlsConfig { .. })
                if start.elapsed() < MOUNT_LAG && Instant::now() + RETRY < deadline =>
            {
                format!("; last error: {e}")
            }
            Err(e) if final_error(&e) => return Err(e),
            Err(other) => format!("; last error: {other}"),
        };
        if Instant::now() + RETRY >= deadline {
            return Err(RedisError::NotSwapped {
                endpoint: endpoint.to_string(),
                expected: proof
                    .serves
                    .clone()
                    .unwrap_or_else(|| "the new files".into()),
                served,
                last_error,
            });
        }
        pause_until(deadline, RETRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_redis_7_0_1_and_later_reload_a_path_set_again() {
        for (version, reloads) in [
            ((6, 2, 14), false),
            ((7, 0, 0), false),
            ((7, 0, 1), true),
            ((7, 0, 15), true),
            ((7, 2, 0), true),
            ((8, 0, 0), true),
        ] {
            assert_eq!(reloads_same_path(version), reloads, "{version:?}");
        }
    }

    #[test]
    fn config_renamed_or_disabled_reads_as_no_in_place_reload() {
        for message in [
            "ERR unknown command 'CONFIG', with args beginning with: 'GET' 'tls-cert-file' ",
            "ERR unknown subcommand 'SET'. Try CONFIG HELP.",
        ] {
            let e = config_unavailable(RedisError::Reply {
                endpoint: "db-0:6379".into(),
                command: "CONFIG".into(),
                message: message.into(),
            });
            assert!(matches!(e, RedisError::ReloadUnavailable { .. }), "{e}");
            assert!(final_error(&e));
        }
        let other = config_unavailable(RedisError::Reply {
            endpoint: "db-0:6379".into(),
            command: "CONFIG".into(),
            message: "LOADING Redis is loading the dataset in memory".into(),
        });
        assert!(matches!(other, RedisError::Reply { .. }) && !final_error(&other));
        let noauth = RedisError::Unexpected {
            endpoint: "db-0:6379".into(),
            command: "PING".into(),
            reply: "Error(\"NOAUTH Authentication required.\")".into(),
        };
        assert!(final_error(&noauth));
    }
}
