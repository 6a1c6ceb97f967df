//! `probe`: a mutual-TLS handshake and `PING` to Sentinel (and a DB) with the deployed materials,
//! the way TMM connects. The only code that talks to Redis.
//!
//! Our v3 leaf is verified by rustls' WebPKI verifier (chain, validity, EKU, name). A leaf made by
//! the seeds' procedure is X.509 v1 without subjectAltName, which WebPKI refuses; for such a leaf
//! the chain and validity are checked against the deployed CA with x509-parser and the handshake
//! signatures against its raw public key. Redis itself never checks host names. The report says
//! which path was used.
//!
//! Why not one path for both: WebPKI cannot verify a v1 certificate at all, and verifying v3
//! leaves with the x509-parser path would drop WebPKI's name, EKU and path checks. So the choice
//! is made in one place (`VerifyPath::for_leaf`): any certificate carrying a subjectAltName
//! (DNS or IP) goes through WebPKI and must match the name; only a certificate without one (v1,
//! or a v3 made without SAN) takes the legacy path.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::{ring as provider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, ServerName, SubjectPublicKeyInfoDer, UnixTime,
};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use serde::Serialize;

use crate::check::Status;
use crate::pki::{self, Certificate, PrivateKey};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    Materials(String),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// The deployed materials a client (TMM) holds.
pub struct ClientMaterials {
    pub ca_cert: Vec<u8>,
    pub leaf_cert: Vec<u8>,
    pub leaf_key: PrivateKey,
}

impl std::fmt::Debug for ClientMaterials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientMaterials").finish_non_exhaustive()
    }
}

/// How the served certificate was verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyPath {
    /// rustls WebPKI: chain, validity, EKU serverAuth, and the name.
    Webpki,
    /// A v1 or SAN-less certificate (the seeds'): chain and validity via x509-parser, no name check.
    LegacyNoNameCheck,
}

impl VerifyPath {
    /// The one place that decides: a subjectAltName means WebPKI and a name check.
    fn for_leaf(leaf: &Certificate) -> Self {
        if leaf.version == 3 && leaf.has_subject_alt_name {
            VerifyPath::Webpki
        } else {
            VerifyPath::LegacyNoNameCheck
        }
    }
}

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

struct Verifier {
    ca: Certificate,
    webpki: Arc<WebPkiServerVerifier>,
    algorithms: WebPkiSupportedAlgorithms,
    seen: Mutex<Option<(VerifyPath, Certificate)>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier")
    }
}

impl Verifier {
    fn legacy(&self) -> bool {
        matches!(
            self.seen.lock().expect("not poisoned").as_ref(),
            Some((VerifyPath::LegacyNoNameCheck, _))
        )
    }

    fn raw_key(cert: &CertificateDer<'_>) -> Result<Vec<u8>, rustls::Error> {
        pki::inspect::parse_certificate_der(cert.as_ref(), "served certificate")
            .map(|c| c.spki_der().to_vec())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let served = pki::inspect::parse_certificate_der(end_entity.as_ref(), "served certificate")
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let path = VerifyPath::for_leaf(&served);
        *self.seen.lock().expect("not poisoned") = Some((path, served.clone()));
        match path {
            VerifyPath::Webpki => {
                self.webpki
                    .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            }
            VerifyPath::LegacyNoNameCheck => {
                let t = now.as_secs() as i64;
                if !served.is_signed_by(&self.ca) {
                    Err(rustls::Error::InvalidCertificate(
                        CertificateError::UnknownIssuer,
                    ))
                } else if t >= served.not_after {
                    Err(rustls::Error::InvalidCertificate(CertificateError::Expired))
                } else if t < served.not_before {
                    Err(rustls::Error::InvalidCertificate(
                        CertificateError::NotValidYet,
                    ))
                } else {
                    Ok(ServerCertVerified::assertion())
                }
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if !self.legacy() {
            return rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms);
        }
        // TLS 1.2 names only the scheme; try each algorithm it maps to against the raw key.
        let spki = Self::raw_key(cert)?;
        let (_, parsed) =
            <x509_parser::x509::SubjectPublicKeyInfo as x509_parser::prelude::FromDer<
                x509_parser::error::X509Error,
            >>::from_der(&spki)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let key = parsed.subject_public_key.data.as_ref();
        for (scheme, algs) in self.algorithms.mapping {
            if *scheme != dss.scheme {
                continue;
            }
            for alg in *algs {
                if alg.verify_signature(key, message, dss.signature()).is_ok() {
                    return Ok(HandshakeSignatureValid::assertion());
                }
            }
        }
        Err(rustls::Error::InvalidCertificate(
            CertificateError::BadSignature,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if !self.legacy() {
            return rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms);
        }
        let spki = Self::raw_key(cert)?;
        rustls::crypto::verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(spki.as_slice()),
            dss,
            &self.algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Presents the deployed leaf whatever its version: `with_client_auth_cert` would refuse a v1.
#[derive(Debug)]
struct ClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for ClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

fn first_der(pem: &[u8], what: &str) -> Result<Vec<u8>, ProbeError> {
    pki::parse_certificate(pem, what)
        .map(|c| c.der().to_vec())
        .map_err(|e| ProbeError::Materials(e.to_string()))
}

/// A connection set up with the deployed materials. `client_cert: false` leaves the certificate
/// out (to prove the server demands one).
pub struct Prober {
    config: Arc<rustls::ClientConfig>,
    verifier: Arc<Verifier>,
    leaf_der: Vec<u8>,
}

impl Prober {
    pub fn new(m: &ClientMaterials, client_cert: bool) -> Result<Self, ProbeError> {
        let provider = Arc::new(provider::default_provider());
        let ca_der = first_der(&m.ca_cert, crate::contract::CA_CERT)?;
        let ca = pki::inspect::parse_certificate_der(&ca_der, crate::contract::CA_CERT)
            .map_err(|e| ProbeError::Materials(e.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        // A v1 CA is accepted as a trust anchor too: webpki only needs its subject and key.
        roots
            .add(CertificateDer::from(ca_der.clone()))
            .map_err(|e| ProbeError::Materials(format!("{}: {e}", crate::contract::CA_CERT)))?;
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| ProbeError::Materials(e.to_string()))?;
        let verifier = Arc::new(Verifier {
            ca,
            webpki,
            algorithms: provider.signature_verification_algorithms,
            seen: Mutex::new(None),
        });
        let leaf_der = first_der(&m.leaf_cert, crate::contract::LEAF_CERT)?;
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone());
        let config = if client_cert {
            // Moved, not copied, into rustls: the DER exists once outside the signer.
            let der = std::mem::take(&mut *m.leaf_key.to_pkcs8_der());
            let key = provider
                .key_provider
                .load_private_key(PrivateKeyDer::Pkcs8(der.into()))
                .map_err(|e| {
                    ProbeError::Materials(format!("{}: {e}", crate::contract::LEAF_KEY))
                })?;
            let certified = CertifiedKey::new(vec![CertificateDer::from(leaf_der.clone())], key);
            builder.with_client_cert_resolver(Arc::new(ClientCert(Arc::new(certified))))
        } else {
            builder.with_no_client_auth()
        };
        Ok(Prober {
            config: Arc::new(config),
            verifier,
            leaf_der,
        })
    }

    /// Connects to `endpoint` (`host:port`), verifies the server as `server_name`, sends `PING`.
    pub fn ping(&self, endpoint: &str, server_name: &str, timeout: Duration) -> ProbeReport {
        *self.verifier.seen.lock().expect("not poisoned") = None;
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
        if let Some((path, served)) = self.verifier.seen.lock().expect("not poisoned").clone() {
            report.verify_path = Some(path);
            report.served = Some(ServedCertificate {
                subject: served.subject.clone(),
                serial: served.serial.clone(),
                not_after: pki::format_time(served.not_after),
                version: served.version,
                matches_deployed_leaf: served.der() == self.leaf_der.as_slice(),
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
        let conn = rustls::ClientConnection::new(self.config.clone(), name)
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
        assert_eq!(VerifyPath::for_leaf(&leaf), VerifyPath::Webpki);
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
