//! The in-place TLS reload of a Redis DB: `CONFIG SET tls-cert-file P tls-key-file P
//! tls-ca-cert-file P` with the paths it already uses (Redis ≥ 7.0.1 re-reads them even when
//! unchanged), proven by new handshakes. Existing connections, replication links included, keep
//! their session. Sentinel cannot do this (`SENTINEL CONFIG SET` refuses TLS settings).

use std::time::{Duration, Instant};

use super::resp::Connection;
use super::tls::TlsClient;
use super::{pause_until, RedisError};

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

fn config_get(conn: &mut Connection, name: &str, deadline: Instant) -> Result<String, RedisError> {
    let reply = conn.call(&["CONFIG", "GET", name], deadline)?;
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
    conn.call(
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
    )?;
    Ok(())
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
/// that the files were not swapped (the caller then falls back to a restart).
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
        let round = Connection::connect(tls, endpoint, server_name, deadline)
            .and_then(|mut c| config_set_same_paths(&mut c, deadline))
            .and_then(|()| check_proof(tls, endpoint, server_name, proof, deadline));
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
