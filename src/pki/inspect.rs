//! Reading certificates (ours, and the seeds' v1 ones) and the facts `check` reports on them.

use serde::Serialize;
use x509_parser::oid_registry as oids;
use x509_parser::pem::Pem;
use x509_parser::prelude::*;

use super::keys::PrivateKey;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("{what}: no PEM block found (expected `-----BEGIN CERTIFICATE-----`)")]
    NotPem { what: String },
    #[error("{what}: the PEM block is damaged (truncated or corrupted base64, or no END line)")]
    DamagedPem { what: String },
    #[error("{what}: the PEM block is a {label:?}, not a CERTIFICATE")]
    WrongLabel { what: String, label: String },
    #[error("{what}: the certificate is not valid DER X.509: {detail}")]
    NotX509 { what: String, detail: String },
}

/// The facts about one certificate that the report and the planner need.
#[derive(Debug, Clone, Serialize)]
pub struct Certificate {
    pub subject: String,
    pub issuer: String,
    /// Upper-case hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub key_type: String,
    pub key_bits: u32,
    pub signature_algorithm: String,
    /// 1 for the seeds' certificates, 3 for ours.
    pub version: u32,
    pub is_ca: bool,
    pub dns_names: Vec<String>,
    /// A subjectAltName extension of any kind (DNS, IP, ...) is present.
    #[serde(skip)]
    pub has_subject_alt_name: bool,
    pub server_auth: Option<bool>,
    pub client_auth: Option<bool>,
    /// SHA-256 over the DER, upper-case hex with colons (`openssl x509 -fingerprint -sha256`).
    pub sha256_fingerprint: String,
    /// Further certificates after the first in the same PEM input.
    pub extra_certificates: usize,
    #[serde(skip)]
    der: Vec<u8>,
    #[serde(skip)]
    spki: Vec<u8>,
    #[serde(skip)]
    subject_der: Vec<u8>,
    #[serde(skip)]
    issuer_der: Vec<u8>,
    /// keyIdentifier of the authorityKeyIdentifier (none in the seeds' v1 leaves).
    #[serde(skip)]
    authority_key_id: Option<Vec<u8>>,
    #[serde(skip)]
    subject_key_id: Option<Vec<u8>>,
}

impl Certificate {
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// PEM from the DER alone (64-column base64, as OpenSSL writes it).
    pub fn to_pem(&self) -> Vec<u8> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.der);
        let mut pem = b"-----BEGIN CERTIFICATE-----\n".to_vec();
        for line in b64.as_bytes().chunks(64) {
            pem.extend_from_slice(line);
            pem.push(b'\n');
        }
        pem.extend_from_slice(b"-----END CERTIFICATE-----\n");
        pem
    }

    /// DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki
    }

    /// Whether `issuer`'s key signed this certificate and the names chain.
    pub fn is_signed_by(&self, issuer: &Certificate) -> bool {
        if self.issuer_der != issuer.subject_der {
            return false;
        }
        let Ok((_, me)) = X509Certificate::from_der(&self.der) else {
            return false;
        };
        let Ok((_, them)) = X509Certificate::from_der(&issuer.der) else {
            return false;
        };
        me.verify_signature(Some(them.public_key())).is_ok()
    }

    /// Whether OpenSSL would take `ca` as a candidate issuer of this certificate before checking
    /// any signature (`X509_check_issued`): the names chain and, when this certificate has an
    /// authority key identifier and `ca` a subject key identifier, they are equal. A leaf
    /// without one (the seeds' v1 leaves) matches every CA of its issuer's name.
    pub fn names_issuer(&self, ca: &Certificate) -> bool {
        self.issuer_der == ca.subject_der
            && match (&self.authority_key_id, &ca.subject_key_id) {
                (Some(aki), Some(ski)) => aki == ski,
                _ => true,
            }
    }

    /// Whether this certificate carries an authority key identifier.
    pub fn has_authority_key_id(&self) -> bool {
        self.authority_key_id.is_some()
    }

    pub fn is_self_signed(&self) -> bool {
        self.is_signed_by(self)
    }

    pub fn matches_key(&self, key: &PrivateKey) -> bool {
        self.spki == key.public_key_der()
    }
}

/// The TLS role a chain is verified for, as OpenSSL's purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// dSSM serves the leaf (TMM verifies it).
    Server,
    /// TMM presents the leaf (Redis verifies it).
    Client,
}

/// The security level of the verification: RSA and DH of at least 2048 bits, ECC of at least
/// 224, no SHA-1 signatures (OpenSSL's `-auth_level 2`).
pub const AUTH_LEVEL: i32 = 2;

/// OpenSSL's verdict on `leaf` with `cas` as trust anchors (the CA bundle, as Redis and TMM load
/// it), for `role` at auth level [`AUTH_LEVEL`]: signatures, keyUsage and extendedKeyUsage,
/// basicConstraints, critical extensions it does not know, a self-signed anchor. Times are
/// judged apart (validity findings), so they are not checked here. Err: OpenSSL's reason, with
/// the depth and subject of the certificate it refuses.
pub fn openssl_verify(
    cas: &[Certificate],
    leaf: &Certificate,
    role: Role,
) -> Result<(), OpensslVerdict> {
    use openssl::stack::Stack;
    use openssl::x509::store::X509StoreBuilder;
    use openssl::x509::verify::{X509VerifyFlags, X509VerifyParam};
    use openssl::x509::{X509PurposeId, X509StoreContext, X509};
    let failed = OpensslVerdict::CannotRun;
    let mut builder = X509StoreBuilder::new().map_err(failed)?;
    for ca in cas {
        let x = X509::from_der(ca.der()).map_err(|source| OpensslVerdict::CannotRead {
            what: format!("CA {:?}", ca.subject),
            source,
        })?;
        // The same certificate twice is refused by the store: once is enough.
        let _ = builder.add_cert(x);
    }
    let mut param = X509VerifyParam::new().map_err(failed)?;
    param.set_auth_level(AUTH_LEVEL);
    param
        .set_flags(X509VerifyFlags::NO_CHECK_TIME)
        .map_err(failed)?;
    param
        .set_purpose(match role {
            Role::Server => X509PurposeId::SSL_SERVER,
            Role::Client => X509PurposeId::SSL_CLIENT,
        })
        .map_err(failed)?;
    builder.set_param(&param).map_err(failed)?;
    let store = builder.build();
    let x = X509::from_der(leaf.der()).map_err(|source| OpensslVerdict::CannotRead {
        what: "the leaf".into(),
        source,
    })?;
    let chain = Stack::new().map_err(failed)?;
    let mut ctx = X509StoreContext::new().map_err(failed)?;
    let verdict = ctx
        .init(&store, &x, &chain, |c| {
            if c.verify_cert()? {
                return Ok(Ok(()));
            }
            let subject = c
                .current_cert()
                .and_then(|cert| parse_certificate_der(&cert.to_der().ok()?, "").ok())
                .map(|cert| cert.subject)
                .unwrap_or_default();
            Ok(Err(OpensslVerdict::Refused {
                reason: c.error().error_string().to_string(),
                depth: c.error_depth(),
                subject,
            }))
        })
        .map_err(failed)?;
    let _ = openssl::error::ErrorStack::get(); // drain the thread's error queue
    verdict
}

/// Why OpenSSL does not accept a chain: its refusal (the reason, and the depth and subject of
/// the certificate it refuses), or why it could not judge at all (the error stack kept).
#[derive(Debug, thiserror::Error)]
pub enum OpensslVerdict {
    #[error("{reason} (certificate at depth {depth}, subject {subject:?})")]
    Refused {
        reason: String,
        depth: u32,
        subject: String,
    },
    #[error("OpenSSL cannot read {what}: {source}")]
    CannotRead {
        what: String,
        #[source]
        source: openssl::error::ErrorStack,
    },
    #[error("OpenSSL cannot run the verification: {0}")]
    CannotRun(#[source] openssl::error::ErrorStack),
}

/// Parses the first certificate of a PEM input; `what` names the file or Secret key.
pub fn parse_certificate(pem: &[u8], what: &str) -> Result<Certificate, InspectError> {
    let mut blocks = Pem::iter_from_buffer(pem);
    let first = match blocks.next() {
        Some(Ok(p)) => p,
        Some(Err(_)) if pem.windows(11).any(|w| w == b"-----BEGIN ") => {
            return Err(InspectError::DamagedPem {
                what: what.to_string(),
            })
        }
        _ => {
            return Err(InspectError::NotPem {
                what: what.to_string(),
            })
        }
    };
    if first.label != "CERTIFICATE" {
        return Err(InspectError::WrongLabel {
            what: what.to_string(),
            label: first.label,
        });
    }
    let extra = blocks
        .filter(|b| matches!(b, Ok(p) if p.label == "CERTIFICATE"))
        .count();
    let mut cert = parse_certificate_der(&first.contents, what)?;
    cert.extra_certificates = extra;
    Ok(cert)
}

/// Every certificate of a PEM bundle, in order (a CA file may hold the old and the new CA);
/// `what` names the file or Secret key. Blocks of other labels are skipped; one damaged block
/// fails the bundle.
pub fn parse_certificates(pem: &[u8], what: &str) -> Result<Vec<Certificate>, InspectError> {
    // The first block gets parse_certificate's precise messages (no PEM, damaged, wrong label).
    parse_certificate(pem, what)?;
    Pem::iter_from_buffer(pem)
        .filter_map(|block| match block {
            Ok(p) if p.label == "CERTIFICATE" => Some(Ok(p.contents)),
            Ok(_) => None,
            Err(_) => Some(Err(InspectError::DamagedPem {
                what: what.to_string(),
            })),
        })
        .enumerate()
        .map(|(i, der)| parse_certificate_der(&der?, &format!("{what} (certificate {})", i + 1)))
        .collect()
}

/// Parses one DER certificate; `what` names it in errors.
pub fn parse_certificate_der(der: &[u8], what: &str) -> Result<Certificate, InspectError> {
    let (rest, x509) = X509Certificate::from_der(der).map_err(|e| InspectError::NotX509 {
        what: what.to_string(),
        detail: match e {
            x509_parser::nom::Err::Incomplete(_) => {
                "truncated: the data ends before the certificate does".into()
            }
            e if e.to_string().contains("Eof") => {
                "truncated: the data ends before the certificate does".into()
            }
            // x509-parser's own error is a Rust Debug dump (`Der(UnexpectedTag { .. })`).
            _ => "the bytes inside the PEM block are not an X.509 certificate (damaged, or \
                  another kind of data under a CERTIFICATE label): copy the file again from \
                  where it was made"
                .into(),
        },
    })?;
    if !rest.is_empty() {
        return Err(InspectError::NotX509 {
            what: what.to_string(),
            detail: format!(
                "{} bytes of trailing data after the certificate",
                rest.len()
            ),
        });
    }
    let spki = x509.public_key().raw.to_vec();
    let (key_type, key_bits) = describe_public_key(x509.public_key());
    let ext = Extensions::of(&x509);
    Ok(Certificate {
        subject: x509.subject().to_string(),
        issuer: x509.issuer().to_string(),
        serial: hex_upper(x509.raw_serial(), ""),
        not_before: x509.validity().not_before.timestamp(),
        not_after: x509.validity().not_after.timestamp(),
        key_type,
        key_bits,
        signature_algorithm: signature_name(&x509.signature_algorithm.algorithm),
        version: x509.version().0 + 1,
        is_ca: ext.is_ca,
        dns_names: ext.dns_names,
        has_subject_alt_name: ext.has_subject_alt_name,
        server_auth: ext.server_auth,
        client_auth: ext.client_auth,
        sha256_fingerprint: hex_upper(&openssl::sha::sha256(der), ":"),
        extra_certificates: 0,
        der: der.to_vec(),
        spki,
        subject_der: x509.subject().as_raw().to_vec(),
        issuer_der: x509.issuer().as_raw().to_vec(),
        authority_key_id: ext.authority_key_id,
        subject_key_id: ext.subject_key_id,
    })
}

/// What the checks need from a certificate's extensions (SAN, EKU, CA flag, key identifiers).
struct Extensions {
    dns_names: Vec<String>,
    has_subject_alt_name: bool,
    server_auth: Option<bool>,
    client_auth: Option<bool>,
    is_ca: bool,
    authority_key_id: Option<Vec<u8>>,
    subject_key_id: Option<Vec<u8>>,
}

impl Extensions {
    fn of(x509: &X509Certificate<'_>) -> Self {
        let mut dns_names = Vec::new();
        let has_subject_alt_name = matches!(x509.subject_alternative_name(), Ok(Some(_)) | Err(_));
        if let Ok(Some(san)) = x509.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::DNSName(n) = name {
                    dns_names.push(n.to_string());
                }
            }
        }
        let (server_auth, client_auth) = match x509.extended_key_usage() {
            Ok(Some(eku)) => (
                Some(eku.value.server_auth || eku.value.any),
                Some(eku.value.client_auth || eku.value.any),
            ),
            _ => (None, None),
        };
        let is_ca = match x509.basic_constraints() {
            Ok(Some(bc)) => bc.value.ca,
            // A v1 certificate has no extensions; OpenSSL treats a self-signed v1 as a CA.
            _ => {
                x509.version() == X509Version::V1
                    && x509.subject().as_raw() == x509.issuer().as_raw()
            }
        };
        let mut authority_key_id = None;
        let mut subject_key_id = None;
        for ext in x509.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    authority_key_id = aki.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                ParsedExtension::SubjectKeyIdentifier(ski) => subject_key_id = Some(ski.0.to_vec()),
                _ => {}
            }
        }
        Extensions {
            dns_names,
            has_subject_alt_name,
            server_auth,
            client_auth,
            is_ca,
            authority_key_id,
            subject_key_id,
        }
    }
}

fn describe_public_key(spki: &SubjectPublicKeyInfo<'_>) -> (String, u32) {
    use x509_parser::public_key::PublicKey;
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) => ("RSA".into(), rsa.key_size() as u32),
        Ok(PublicKey::EC(ec)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            let name = match curve {
                Some(c) if c == oids::OID_EC_P256 => "ECDSA P-256",
                Some(c) if c == oids::OID_NIST_EC_P384 => "ECDSA P-384",
                Some(c) if c == oids::OID_NIST_EC_P521 => "ECDSA P-521",
                _ => "ECDSA",
            };
            (name.into(), ec.key_size() as u32)
        }
        Ok(PublicKey::Unknown(_)) | Ok(_) | Err(_) => (spki.algorithm.algorithm.to_id_string(), 0),
    }
}

fn signature_name(oid: &x509_parser::der_parser::oid::Oid<'_>) -> String {
    let known = [
        (oids::OID_PKCS1_SHA256WITHRSA, "sha256WithRSAEncryption"),
        (oids::OID_PKCS1_SHA384WITHRSA, "sha384WithRSAEncryption"),
        (oids::OID_PKCS1_SHA512WITHRSA, "sha512WithRSAEncryption"),
        (oids::OID_PKCS1_SHA1WITHRSA, "sha1WithRSAEncryption"),
        (oids::OID_SIG_ECDSA_WITH_SHA256, "ecdsa-with-SHA256"),
        (oids::OID_SIG_ECDSA_WITH_SHA384, "ecdsa-with-SHA384"),
        (oids::OID_SIG_ECDSA_WITH_SHA512, "ecdsa-with-SHA512"),
        (oids::OID_SIG_ED25519, "ED25519"),
    ];
    known
        .iter()
        .find(|(o, _)| o == oid)
        .map(|(_, n)| n.to_string())
        .unwrap_or_else(|| oid.to_id_string())
}

pub(crate) fn hex_upper(bytes: &[u8], sep: &str) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(sep)
}
