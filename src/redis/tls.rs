//! The mutual-TLS client setup every Redis connection uses (probe, reloads, switchovers): TMM's
//! view of dSSM, built from the mounted materials.
//!
//! Our v3 leaf is verified by rustls' WebPKI verifier (chain, validity, EKU, name). A leaf made by
//! the seeds' procedure is X.509 v1 without subjectAltName, which WebPKI refuses; for such a leaf
//! the chain and validity are checked against the deployed CAs with x509-parser and the handshake
//! signatures against its raw public key. Redis itself never checks host names.
//!
//! `dssm-ca.crt` may hold several CAs (old + new during a CA rotation): every one is trusted, as
//! Redis (OpenSSL) trusts every CA of its `tls-ca-cert-file`.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::{ring as provider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, ServerName, SubjectPublicKeyInfoDer, UnixTime,
};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use serde::Serialize;

use crate::contract::{CA_CERT, LEAF_CERT, LEAF_KEY};
use crate::pki::{self, Certificate, PrivateKey};

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
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

impl ClientMaterials {
    /// Reads `dssm-ca.crt`, `dssm-cert.crt` and `dssm-key.key` from a mounted directory, now:
    /// a client that reconnects after kubelet's swap sees the new files.
    pub fn from_dir(dir: &std::path::Path) -> Result<Self, TlsSetupError> {
        let read = |name: &str| {
            crate::limits::read_bounded(&dir.join(name))
                .map_err(|e| TlsSetupError::Materials(format!("{}: {e}", dir.join(name).display())))
        };
        let key_path = dir.join(LEAF_KEY);
        Ok(ClientMaterials {
            ca_cert: read(CA_CERT)?,
            leaf_cert: read(LEAF_CERT)?,
            leaf_key: PrivateKey::from_pem(&read(LEAF_KEY)?, &key_path.display().to_string())
                .map_err(|e| TlsSetupError::Materials(e.to_string()))?,
        })
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

pub(crate) fn verify_path(served: &Certificate) -> VerifyPath {
    // The one place that decides: a subjectAltName (DNS or IP) means WebPKI and a name check.
    if served.version == 3 && served.has_subject_alt_name {
        VerifyPath::Webpki
    } else {
        VerifyPath::LegacyNoNameCheck
    }
}

fn parse_served(cert: &CertificateDer<'_>) -> Result<Certificate, rustls::Error> {
    pki::inspect::parse_certificate_der(cert.as_ref(), "served certificate")
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))
}

/// Every certificate of a PEM bundle, in order; `what` names the file or Secret key.
pub fn parse_bundle(pem: &[u8], what: &str) -> Result<Vec<Certificate>, TlsSetupError> {
    pki::inspect::parse_certificates(pem, what).map_err(|e| TlsSetupError::Materials(e.to_string()))
}

pub(crate) struct Verifier {
    pub(crate) cas: Vec<Certificate>,
    webpki: Arc<WebPkiServerVerifier>,
    algorithms: WebPkiSupportedAlgorithms,
    /// The last served certificate, for reports (probe uses one connection at a time).
    pub(crate) seen: Mutex<Option<(VerifyPath, Certificate)>>,
    /// The deployed leaf the server must serve, when known: it decides the verification path
    /// (not what is served), and on the path without a name check the served certificate must
    /// be it, byte for byte.
    deployed: Option<Certificate>,
    /// The served certificate must be `deployed`, byte for byte, on either path (a proof).
    pin_every_path: bool,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier")
    }
}

impl Verifier {
    /// Whether the handshake signature must be checked against the raw key: decided from the
    /// certificate itself, so one config serves concurrent connections.
    fn legacy(cert: &CertificateDer<'_>) -> Result<Option<Vec<u8>>, rustls::Error> {
        let served = parse_served(cert)?;
        Ok((verify_path(&served) == VerifyPath::LegacyNoNameCheck)
            .then(|| served.spki_der().to_vec()))
    }

    /// The handshake signature of either TLS version: webpki's check for a v3 certificate; for a
    /// seed's v1 certificate (which webpki refuses to parse) `raw` checks it against the key.
    fn handshake_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
        webpki: fn(
            &[u8],
            &CertificateDer<'_>,
            &DigitallySignedStruct,
            &WebPkiSupportedAlgorithms,
        ) -> Result<HandshakeSignatureValid, rustls::Error>,
        raw: impl FnOnce(
            &WebPkiSupportedAlgorithms,
            &[u8],
        ) -> Result<HandshakeSignatureValid, rustls::Error>,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match Self::legacy(cert)? {
            None => webpki(message, cert, dss, &self.algorithms),
            Some(spki) => raw(&self.algorithms, &spki),
        }
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
        let served = parse_served(end_entity)?;
        let path = verify_path(self.deployed.as_ref().unwrap_or(&served));
        *self.seen.lock().expect("not poisoned") = Some((path, served.clone()));
        if let Some(d) = self
            .deployed
            .as_ref()
            .filter(|_| self.pin_every_path || path == VerifyPath::LegacyNoNameCheck)
        {
            if d.der() != served.der() && self.pin_every_path {
                return Err(rustls::Error::General(format!(
                    "the served certificate (SHA-256 {}) is not the deployed leaf (SHA-256 {}): \
                     a proof accepts only the deployed one",
                    served.sha256_fingerprint, d.sha256_fingerprint
                )));
            }
            if d.der() != served.der() {
                return Err(rustls::Error::General(format!(
                    "the served certificate (SHA-256 {}) is not the deployed leaf (SHA-256 {}): \
                     a leaf without subjectAltName cannot be checked by name, so only the \
                     deployed one is accepted",
                    served.sha256_fingerprint, d.sha256_fingerprint
                )));
            }
        }
        match path {
            VerifyPath::Webpki => {
                self.webpki
                    .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            }
            VerifyPath::LegacyNoNameCheck => {
                let t = now.as_secs() as i64;
                if !self.cas.iter().any(|ca| served.is_signed_by(ca)) {
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
        self.handshake_signature(
            message,
            cert,
            dss,
            rustls::crypto::verify_tls12_signature,
            |algorithms, spki| {
                // TLS 1.2 names only the scheme; try each algorithm it maps to against the raw key.
                let (_, parsed) =
                    <x509_parser::x509::SubjectPublicKeyInfo as x509_parser::prelude::FromDer<
                        x509_parser::error::X509Error,
                    >>::from_der(spki)
                    .map_err(|_| {
                        rustls::Error::InvalidCertificate(CertificateError::BadEncoding)
                    })?;
                let key = parsed.subject_public_key.data.as_ref();
                let verified = algorithms
                    .mapping
                    .iter()
                    .filter(|(scheme, _)| *scheme == dss.scheme)
                    .flat_map(|(_, algs)| algs.iter())
                    .any(|alg| alg.verify_signature(key, message, dss.signature()).is_ok());
                verified.then(HandshakeSignatureValid::assertion).ok_or(
                    rustls::Error::InvalidCertificate(CertificateError::BadSignature),
                )
            },
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.handshake_signature(
            message,
            cert,
            dss,
            rustls::crypto::verify_tls13_signature,
            |algorithms, spki| {
                rustls::crypto::verify_tls13_signature_with_raw_key(
                    message,
                    &SubjectPublicKeyInfoDer::from(spki),
                    dss,
                    algorithms,
                )
            },
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

/// A client configuration made from the deployed materials. `ClientIdentity::Withheld` leaves the
/// certificate out (to prove the server demands one).
#[derive(Clone)]
pub struct TlsClient {
    pub(crate) config: Arc<rustls::ClientConfig>,
    pub(crate) verifier: Arc<Verifier>,
    pub(crate) leaf_der: Vec<u8>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient").finish_non_exhaustive()
    }
}

/// Whether a client presents its certificate: withheld, a proof shows that the server demands
/// one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientIdentity {
    Presented,
    Withheld,
}

impl TlsClient {
    pub fn new(m: &ClientMaterials, client_cert: ClientIdentity) -> Result<Self, TlsSetupError> {
        Self::with_deployed(m, client_cert, false)
    }

    /// A client of the deployed materials whose server must serve the same leaf (`probe`): the
    /// verification path comes from that leaf, not from what is served, and a served leaf
    /// without subjectAltName must be it.
    pub fn for_deployed(
        m: &ClientMaterials,
        client_cert: ClientIdentity,
    ) -> Result<Self, TlsSetupError> {
        Self::with_deployed(m, client_cert, true)
    }

    /// A proof's client, with `m`'s materials: its server must serve `deployed` (a PEM leaf,
    /// the dSSM copy's), byte for byte whatever its version, and the verification path comes
    /// from that leaf, never from what is served.
    pub fn pinned_to(
        m: &ClientMaterials,
        client_cert: ClientIdentity,
        deployed: &[u8],
    ) -> Result<Self, TlsSetupError> {
        let deployed = pki::parse_certificate(deployed, LEAF_CERT)
            .map_err(|e| TlsSetupError::Materials(e.to_string()))?;
        Self::build(m, client_cert, Some(deployed), true)
    }

    fn with_deployed(
        m: &ClientMaterials,
        client_cert: ClientIdentity,
        pin: bool,
    ) -> Result<Self, TlsSetupError> {
        let leaf = pki::parse_certificate(&m.leaf_cert, LEAF_CERT)
            .map_err(|e| TlsSetupError::Materials(e.to_string()))?;
        Self::build(m, client_cert, pin.then_some(leaf), false)
    }

    fn build(
        m: &ClientMaterials,
        client_cert: ClientIdentity,
        deployed: Option<Certificate>,
        pin_every_path: bool,
    ) -> Result<Self, TlsSetupError> {
        let provider = Arc::new(provider::default_provider());
        let cas = parse_bundle(&m.ca_cert, CA_CERT)?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in &cas {
            // A v1 CA is accepted as a trust anchor too: webpki only needs its subject and key.
            roots
                .add(CertificateDer::from(ca.der().to_vec()))
                .map_err(|e| TlsSetupError::Materials(format!("{CA_CERT}: {e}")))?;
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsSetupError::Materials(e.to_string()))?;
        let leaf = pki::parse_certificate(&m.leaf_cert, LEAF_CERT)
            .map_err(|e| TlsSetupError::Materials(e.to_string()))?;
        let leaf_der = leaf.der().to_vec();
        let verifier = Arc::new(Verifier {
            cas,
            webpki,
            algorithms: provider.signature_verification_algorithms,
            seen: Mutex::new(None),
            deployed,
            pin_every_path,
        });
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone());
        let config = if client_cert == ClientIdentity::Presented {
            let key = provider
                .key_provider
                // Moved, not copied, into rustls: the DER exists once outside the signer.
                .load_private_key(PrivateKeyDer::Pkcs8(
                    std::mem::take(&mut *m.leaf_key.to_pkcs8_der()).into(),
                ))
                .map_err(|e| TlsSetupError::Materials(format!("{LEAF_KEY}: {e}")))?;
            let certified = CertifiedKey::new(vec![CertificateDer::from(leaf_der.clone())], key);
            builder.with_client_cert_resolver(Arc::new(ClientCert(Arc::new(certified))))
        } else {
            builder.with_no_client_auth()
        };
        let mut config = config;
        // Every connection is a full handshake: a resumed session skips the certificates, and a
        // proof (the server now accepts or refuses this leaf, serves that one) would prove
        // nothing.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(TlsClient {
            config: Arc::new(config),
            verifier,
            leaf_der,
        })
    }

    /// SHA-256 fingerprint (`AB:CD:…`) of the leaf this client presents.
    pub fn leaf_fingerprint(&self) -> String {
        fingerprint(&self.leaf_der)
    }
}

/// Why the served certificate was refused, in words and with what to do: not a Rust `Debug`
/// of rustls' error. A name mismatch is not a trust problem: the chain was fine.
pub fn describe_refused_certificate(c: &CertificateError) -> String {
    use rustls::pki_types::ServerName;
    match c {
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => {
            let expected = match expected {
                ServerName::DnsName(d) => d.as_ref().to_string(),
                ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
                _ => "the server name".to_string(),
            };
            format!(
                "the served certificate is not valid for the name {expected:?} it was reached \
                 by (it names {}): reach it by one of those names (--server-name), or issue the \
                 leaf with --dns {expected}",
                if presented.is_empty() {
                    "nothing".to_string()
                } else {
                    presented.join(", ")
                }
            )
        }
        CertificateError::NotValidForName => "the served certificate is not valid for the name \
             it was reached by: reach it by a name of its subjectAltName (--server-name)"
            .to_string(),
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "the served certificate has expired: renew it (rotate)".to_string()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "the served certificate is not valid yet: check the clocks".to_string()
        }
        CertificateError::UnknownIssuer | CertificateError::BadSignature => {
            "the served certificate is not signed by the deployed CA: the server serves a \
             leaf of another CA (a copy out of sync?); run check"
                .to_string()
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "the served certificate's extendedKeyUsage does not allow a TLS server".to_string()
        }
        other => format!("the served certificate is refused: {other}"),
    }
}

/// SHA-256 over DER, upper-case hex with colons, as `openssl x509 -fingerprint -sha256`.
pub fn fingerprint(der: &[u8]) -> String {
    pki::inspect::hex_upper(&openssl::sha::sha256(der), ":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{issue::default_ca_subject, KeyAlgorithm};

    /// A v1 certificate (as the seeds make them) of `subject`, signed by `signer`.
    fn v1(
        subject: &str,
        issuer: &str,
        key: &openssl::pkey::PKeyRef<openssl::pkey::Private>,
        signer: &openssl::pkey::PKeyRef<openssl::pkey::Private>,
    ) -> openssl::x509::X509 {
        use openssl::{asn1::Asn1Time, bn::BigNum, hash::MessageDigest, x509};
        let name = |cn: &str| {
            let mut n = x509::X509NameBuilder::new().unwrap();
            n.append_entry_by_text("CN", cn).unwrap();
            n.build()
        };
        let mut b = x509::X509Builder::new().unwrap();
        b.set_version(0).unwrap();
        let serial = BigNum::from_u32(rand_serial())
            .unwrap()
            .to_asn1_integer()
            .unwrap();
        b.set_serial_number(&serial).unwrap();
        b.set_subject_name(&name(subject)).unwrap();
        b.set_issuer_name(&name(issuer)).unwrap();
        b.set_pubkey(key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::days_from_now(30).unwrap())
            .unwrap();
        b.sign(signer, MessageDigest::sha256()).unwrap();
        b.build()
    }

    fn rand_serial() -> u32 {
        let mut b = [0u8; 4];
        openssl::rand::rand_bytes(&mut b).unwrap();
        u32::from_be_bytes(b) >> 1
    }

    /// The trust-boundary issue: the verification path came from the *served* certificate, so a
    /// server serving any v1 leaf of the bundle's CA (no name to check) passed `probe`. With the
    /// deployed leaf known, a v1 served leaf must be the deployed one.
    #[test]
    fn without_a_name_to_check_only_the_deployed_leaf_is_accepted() {
        use openssl::{ec, nid::Nid, pkey::PKey};
        let key = || {
            let group = ec::EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
            PKey::from_ec_key(ec::EcKey::generate(&group).unwrap()).unwrap()
        };
        let (ca_key, a_key, b_key) = (key(), key(), key());
        let ca = v1("CA", "CA", &ca_key, &ca_key);
        let a = v1("Server", "CA", &a_key, &ca_key);
        let b = v1("Server", "CA", &b_key, &ca_key);
        let m = ClientMaterials {
            ca_cert: ca.to_pem().unwrap(),
            leaf_cert: a.to_pem().unwrap(),
            leaf_key: PrivateKey::from_pem(&a_key.private_key_to_pem_pkcs8().unwrap(), "a")
                .unwrap(),
        };
        let name = ServerName::try_from("dssm.example").unwrap();
        let verify = |c: &TlsClient, served: &openssl::x509::X509| {
            let der = CertificateDer::from(served.to_der().unwrap());
            c.verifier
                .verify_server_cert(&der, &[], &name, &[], UnixTime::now())
                .map(|_| ())
        };
        let pinned = TlsClient::for_deployed(&m, ClientIdentity::Presented).unwrap();
        assert!(verify(&pinned, &a).is_ok());
        let e = verify(&pinned, &b).unwrap_err().to_string();
        assert!(e.contains("is not the deployed leaf"), "{e}");
        // Without the deployed leaf (proof clients holding another leaf), as before.
        assert!(verify(&TlsClient::new(&m, ClientIdentity::Presented).unwrap(), &b).is_ok());
    }

    /// The trust-boundary issue: proof connections allowed TLS session resumption, where a
    /// resumed session shows no certificate: a proof that a process accepts or refuses a leaf,
    /// or serves one, proved nothing.
    #[test]
    fn clients_never_resume_tls_sessions() {
        let m = ClientMaterials {
            ca_cert: ca(),
            leaf_cert: ca(),
            leaf_key: PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        };
        for client_cert in [ClientIdentity::Presented, ClientIdentity::Withheld] {
            let c = TlsClient::new(&m, client_cert).unwrap();
            let r = format!("{:?}", c.config.resumption);
            assert!(
                r.contains("NoClientSessionStorage") && r.contains("Disabled"),
                "{r}"
            );
        }
    }

    /// The trust-boundary issue: a name mismatch in `probe` printed rustls' Debug
    /// (`NotValidForNameContext { expected: DnsName(..), presented: [..] }`) under "not trusted
    /// with the deployed CA", while the chain was fine.
    #[test]
    fn a_refused_certificate_is_described_in_words_with_what_to_do() {
        use rustls::pki_types::ServerName;
        let c = CertificateError::NotValidForNameContext {
            expected: ServerName::try_from("redis.example").unwrap(),
            presented: vec!["DnsName(\"other.svc\")".into()],
        };
        let m = describe_refused_certificate(&c);
        assert!(
            m.contains("not valid for the name \"redis.example\"")
                && m.contains("--server-name")
                && m.contains("--dns redis.example")
                && !m.contains("NotValidForNameContext")
                && !m.contains("not trusted"),
            "{m}"
        );
        let m = describe_refused_certificate(&CertificateError::UnknownIssuer);
        assert!(m.contains("not signed by the deployed CA"), "{m}");
    }

    fn ca() -> Vec<u8> {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        pki::issue_ca(
            &default_ca_subject(),
            30,
            &key,
            time::OffsetDateTime::now_utc(),
        )
        .unwrap()
        .into_bytes()
    }

    #[test]
    fn every_ca_of_a_bundle_is_read_in_order_and_damage_is_named() {
        let (old, new) = (ca(), ca());
        let bundle = [old.clone(), new.clone()].concat();
        let cas = parse_bundle(&bundle, CA_CERT).unwrap();
        assert_eq!(cas.len(), 2);
        assert_eq!(
            cas[0].der(),
            pki::parse_certificate(&old, "old").unwrap().der()
        );
        assert_eq!(
            cas[1].der(),
            pki::parse_certificate(&new, "new").unwrap().der()
        );

        let mut damaged = bundle.clone();
        let cut = old.len() + new.len() / 2;
        damaged.truncate(cut);
        let err = parse_bundle(&damaged, CA_CERT).unwrap_err().to_string();
        assert!(err.contains(CA_CERT), "{err}");
        let err = parse_bundle(b"not a certificate", CA_CERT)
            .unwrap_err()
            .to_string();
        assert!(err.contains(CA_CERT), "{err}");
    }
}
