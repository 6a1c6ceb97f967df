//! `probe`: a mutual-TLS handshake and `PING` to Sentinel (and a DB) with the deployed materials,
//! the way TMM connects. The TLS setup (WebPKI for our v3 leaf, x509-parser for the seeds' v1
//! leaf, every CA of the bundle trusted) is `redis::tls`'s. The report says which path was used.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use serde::Serialize;

use crate::check::Status;
use crate::pki;
use crate::redis::tls::TlsClient;
pub use crate::redis::tls::{ClientMaterials, TlsSetupError as ProbeError, VerifyPath};

#[derive(Debug, Clone, Serialize)]
pub struct ServedCertificate {
    pub subject: String,
    pub serial: String,
    pub not_after: String,
    pub version: u32,
    pub matches_deployed_leaf: bool,
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

/// A connection set up with the deployed materials. `client_cert: false` leaves the certificate
/// out (to prove the server demands one).
pub struct Prober {
    tls: TlsClient,
}

impl Prober {
    pub fn new(m: &ClientMaterials, client_cert: bool) -> Result<Self, ProbeError> {
        Ok(Prober {
            tls: TlsClient::new(m, client_cert)?,
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
            report.verify_path = Some(path);
            report.served = Some(ServedCertificate {
                subject: served.subject.clone(),
                serial: served.serial.clone(),
                not_after: pki::format_time(served.not_after),
                version: served.version,
                matches_deployed_leaf: served.der() == self.tls.leaf_der.as_slice(),
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
                    format!("the served certificate is not trusted with the deployed CA: {c:?}")
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
