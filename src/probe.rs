//! `probe`: a mutual-TLS handshake and `PING` to Sentinel (and a DB) with the deployed materials,
//! the way TMM connects. The TLS setup (WebPKI for our v3 leaf, x509-parser for the manual procedure's v1
//! leaf, every CA of the bundle trusted) is `redis::tls`'s. The report says which path was used.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use serde::Serialize;

use crate::checks::{self, Status};
use crate::pki;
use crate::redis::tls::TlsClient;
pub use crate::redis::tls::{ClientMaterials, TlsSetupError as ProbeError, VerifyPath};

/// The name a certificate is checked against when none is given: the endpoint's host, without
/// port and IPv6 brackets. `probe` and the restart's verification both use this.
pub fn default_server_name(endpoint: &str) -> String {
    let host = match endpoint.rsplit_once(':') {
        // `[::1]:26379`, `host:26379`; a bare IPv6 address has more colons and no brackets.
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(':') => {
            if h.contains(':') && !h.starts_with('[') {
                endpoint
            } else {
                h
            }
        }
        _ => endpoint,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// The Sentinel Service of the dSSM namespace, on its TLS port.
pub fn sentinel_endpoint(dssm_ns: &str) -> String {
    format!(
        "{}.{dssm_ns}:{}",
        crate::contract::SENTINEL_SERVICE,
        crate::contract::SENTINEL_PORT
    )
}

/// Probes `endpoints` in turn, all within `deadline` (name resolution and every handshake
/// included: neither a black-holed address nor a slow DNS can hold the command). Endpoints not
/// answered by then are reported as such.
pub fn ping_all(
    prober: Prober,
    endpoints: &[String],
    server_name: Option<&str>,
    timeout: Duration,
    deadline: Duration,
) -> Vec<ProbeReport> {
    let until = std::time::Instant::now() + deadline;
    let (tx, rx) = std::sync::mpsc::channel();
    let work: Vec<(String, String)> = endpoints
        .iter()
        .map(|e| {
            let name = server_name.map_or_else(|| default_server_name(e), str::to_string);
            (e.clone(), name)
        })
        .collect();
    // Detached: a blocking resolver call cannot be interrupted; the process exits without it.
    std::thread::spawn(move || {
        for (endpoint, name) in work {
            let left = until.saturating_duration_since(std::time::Instant::now());
            let report = prober.ping(
                &endpoint,
                &name,
                timeout.min(left).max(Duration::from_millis(1)),
            );
            if tx.send(report).is_err() {
                return;
            }
        }
    });
    let mut reports = Vec::new();
    for endpoint in endpoints {
        let left = until.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(r) => reports.push(r),
            Err(_) => reports.push(ProbeReport {
                endpoint: endpoint.clone(),
                server_name: server_name
                    .map_or_else(|| default_server_name(endpoint), str::to_string),
                status: Status::Critical,
                message: format!(
                    "{endpoint}: no answer within the probe deadline of {}s (--deadline)",
                    deadline.as_secs()
                ),
                tls_version: None,
                verify_path: None,
                served: None,
                reply: None,
            }),
        }
    }
    reports
}

#[derive(Debug, Clone, Serialize)]
pub struct ServedCertificate {
    pub subject: String,
    pub serial: String,
    pub not_after: String,
    pub version: u32,
    pub matches_deployed_leaf: bool,
    /// The CA of the deployed bundle it chains to, as OpenSSL (Redis) picks it: 1-based, and
    /// out of how many (during a CA rotation, which CA the server's leaf is under).
    pub ca_index: Option<usize>,
    pub bundle_cas: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    pub endpoint: String,
    pub server_name: String,
    pub status: Status,
    pub message: String,
    pub tls_version: Option<String>,
    pub verify_path: Option<VerifyPath>,
    pub served: Option<ServedCertificate>,
    pub reply: Option<String>,
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// A connection set up with the deployed materials. `ClientIdentity::Withheld` leaves the
/// certificate out (to prove the server demands one).
pub struct Prober {
    tls: TlsClient,
}

impl Prober {
    pub fn new(
        m: &ClientMaterials,
        client_cert: crate::redis::ClientIdentity,
    ) -> Result<Self, ProbeError> {
        Ok(Prober {
            tls: TlsClient::for_deployed(m, client_cert)?,
        })
    }

    /// Connects to `endpoint` (`host:port`), verifies the server as `server_name`, sends `PING`.
    pub fn ping(&self, endpoint: &str, server_name: &str, timeout: Duration) -> ProbeReport {
        *self.tls.verifier.seen.lock().expect("not poisoned") = None;
        let mut report = ProbeReport {
            endpoint: endpoint.to_string(),
            server_name: server_name.to_string(),
            status: Status::Critical,
            message: String::new(),
            tls_version: None,
            verify_path: None,
            served: None,
            reply: None,
        };
        let result = self.exchange(endpoint, server_name, timeout, &mut report);
        if let Some((path, served)) = self.tls.verifier.seen.lock().expect("not poisoned").clone() {
            let cas = &self.tls.verifier.cas;
            report.verify_path = Some(path);
            report.served = Some(ServedCertificate {
                subject: served.subject.clone(),
                serial: served.serial.clone(),
                not_after: pki::format_time(served.not_after),
                version: served.version,
                matches_deployed_leaf: served.der() == self.tls.leaf_der.as_slice(),
                ca_index: checks::chain_issuer(cas, &served, unix_now()).map(|i| i + 1),
                bundle_cas: cas.len(),
            });
        }
        match result {
            Err((status, message)) => {
                report.status = status;
                report.message = message;
            }
            Ok(()) => match &report.served {
                Some(s) if !s.matches_deployed_leaf => {
                    report.status = Status::Warning;
                    report.message = format!(
                        "PONG, but {endpoint} serves serial {} while the deployed leaf differs: the pods still run older materials (restart pending?)",
                        s.serial
                    );
                }
                _ => {
                    report.status = Status::Ok;
                    report.message = format!("PONG from {endpoint} over mutual TLS");
                }
            },
        }
        report
    }

    fn exchange(
        &self,
        endpoint: &str,
        server_name: &str,
        timeout: Duration,
        report: &mut ProbeReport,
    ) -> Result<(), (Status, String)> {
        let addr = endpoint
            .to_socket_addrs()
            .map_err(|e| (Status::Unknown, format!("{endpoint}: cannot resolve: {e}")))?
            .next()
            .ok_or_else(|| (Status::Unknown, format!("{endpoint}: no address")))?;
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|e| (Status::Unknown, format!("server name {server_name:?}: {e}")))?;
        let tcp = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| (Status::Critical, format!("{endpoint}: cannot connect: {e}")))?;
        let _ = tcp.set_read_timeout(Some(timeout));
        let _ = tcp.set_write_timeout(Some(timeout));
        let conn = rustls::ClientConnection::new(Arc::clone(&self.tls.config), name)
            .map_err(|e| (Status::Unknown, format!("TLS setup: {e}")))?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let tls_err = |e: std::io::Error| {
            let reason = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(rustls::Error::AlertReceived(a)) => format!(
                    "the server refused the handshake (alert {a:?}): it does not accept our client certificate"
                ),
                Some(rustls::Error::InvalidCertificate(c)) => {
                    crate::redis::tls::describe_refused_certificate(c)
                }
                _ => e.to_string(),
            };
            (Status::Critical, format!("{endpoint}: {reason}"))
        };
        tls.write_all(b"*1\r\n$4\r\nPING\r\n").map_err(tls_err)?;
        tls.flush().map_err(tls_err)?;
        report.tls_version = tls
            .conn
            .protocol_version()
            .map(|v| format!("{v:?}").replace('_', "."));
        let mut reply = Vec::new();
        let mut buf = [0u8; 256];
        while !reply.ends_with(b"\r\n") {
            let n = tls.read(&mut buf).map_err(tls_err)?;
            if n == 0 {
                return Err((
                    Status::Critical,
                    format!("{endpoint}: the server closed the connection without a reply (client certificate refused?)"),
                ));
            }
            reply.extend_from_slice(&buf[..n]);
            if reply.len() > 4096 {
                break;
            }
        }
        let text = String::from_utf8_lossy(&reply).trim_end().to_string();
        report.reply = Some(text.clone());
        if text == "+PONG" {
            Ok(())
        } else {
            Err((
                Status::Critical,
                format!("{endpoint}: expected +PONG, got {text:?}"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{default_server_name, VerifyPath};

    #[test]
    fn a_leaf_with_only_ip_addresses_in_its_san_is_verified_by_webpki_with_its_name() {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap())];
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        let leaf = crate::pki::parse_certificate(pem.as_bytes(), "leaf").unwrap();
        assert!(leaf.dns_names.is_empty());
        assert_eq!(crate::redis::tls::verify_path(&leaf), VerifyPath::Webpki);
    }

    #[test]
    fn the_default_server_name_is_the_host_of_the_endpoint() {
        for (endpoint, name) in [
            (
                "f5-dssm-sentinel.spk-utilities:26379",
                "f5-dssm-sentinel.spk-utilities",
            ),
            ("127.0.0.1:26379", "127.0.0.1"),
            ("[::1]:26379", "::1"),
            ("::1", "::1"),
            ("redis", "redis"),
        ] {
            assert_eq!(default_server_name(endpoint), name, "{endpoint}");
        }
    }
}
