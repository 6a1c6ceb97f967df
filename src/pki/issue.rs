//! Issuing the CA and the one leaf that dSSM serves and TMM presents (rcgen).

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use super::inspect::{parse_certificate, Certificate, InspectError};
use super::keys::{KeyError, PrivateKey};

/// Certificates start this far in the past so that a node whose clock lags still accepts them.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::minutes(5);

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("subject {subject:?}: {reason} (expected e.g. \"O=Redis Test, CN=Server\" or \"/O=Redis Test/CN=Server\")")]
    Subject { subject: String, reason: String },
    #[error("DNS name {name:?} is not a valid subjectAltName")]
    DnsName { name: String },
    #[error("--days must be at least 1 (got {days})")]
    Days { days: u32 },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Inspect(#[from] InspectError),
    #[error("{ca_key} does not match the CA certificate {ca_cert}: a leaf signed with it would not verify")]
    CaKeyMismatch { ca_cert: String, ca_key: String },
    #[error("the CA certificate {ca_cert} is not valid now (valid {not_before} to {not_after}); rotate the CA instead")]
    CaNotValid {
        ca_cert: String,
        not_before: String,
        not_after: String,
    },
    #[error("the leaf would expire at {leaf_not_after} but its CA {ca_cert} expires at {ca_not_after}: a leaf must never outlive its CA. Issue the leaf for at most {max_days} days, or rotate the CA")]
    LeafOutlivesCa {
        ca_cert: String,
        ca_not_after: String,
        leaf_not_after: String,
        max_days: i64,
    },
    #[error("rcgen could not sign the {what}: {detail}")]
    Sign { what: &'static str, detail: String },
}

/// A distinguished name as the seeds' `-subj` writes it, in order: `/O=Redis Test/CN=Server`,
/// or the RFC 4514-ish `O=Redis Test, CN=Server`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject(Vec<(DnType, String)>);

impl Subject {
    pub fn parse(text: &str) -> Result<Self, IssueError> {
        let bad = |reason: &str| IssueError::Subject {
            subject: text.to_string(),
            reason: reason.to_string(),
        };
        let trimmed = text.trim();
        let parts: Vec<&str> = if let Some(rest) = trimmed.strip_prefix('/') {
            rest.split('/').collect()
        } else {
            trimmed.split(',').collect()
        };
        let mut out = Vec::new();
        for part in parts {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(&format!("{part:?} is not ATTRIBUTE=value")))?;
            let ty = match k.trim().to_ascii_uppercase().as_str() {
                "CN" => DnType::CommonName,
                "O" => DnType::OrganizationName,
                "OU" => DnType::OrganizationalUnitName,
                "C" => DnType::CountryName,
                "ST" => DnType::StateOrProvinceName,
                "L" => DnType::LocalityName,
                other => return Err(bad(&format!("unknown attribute {other:?}"))),
            };
            let v = v.trim();
            if v.is_empty() {
                return Err(bad(&format!("{k} has an empty value")));
            }
            out.push((ty, v.to_string()));
        }
        if out.is_empty() {
            return Err(bad("it is empty"));
        }
        Ok(Subject(out))
    }

    fn to_dn(&self) -> DistinguishedName {
        let mut dn = DistinguishedName::new();
        for (ty, v) in &self.0 {
            dn.push(ty.clone(), v.as_str());
        }
        dn
    }
}

/// What the seeds make: `O=Redis Test, CN=Certificate Authority`.
pub fn default_ca_subject() -> Subject {
    Subject::parse("O=Redis Test, CN=Certificate Authority").expect("constant")
}

/// What the seeds make: `O=Redis Test, CN=Server`.
pub fn default_leaf_subject() -> Subject {
    Subject::parse("O=Redis Test, CN=Server").expect("constant")
}

/// A random positive 128-bit serial (RFC 5280 allows up to 20 octets).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    openssl::rand::rand_bytes(&mut bytes).expect("the OS RNG works");
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x40; // no leading zero octet, so the encoding is always 16 octets
    SerialNumber::from_slice(&bytes)
}

fn validity(
    now: OffsetDateTime,
    days: u32,
) -> Result<(OffsetDateTime, OffsetDateTime), IssueError> {
    if days == 0 {
        return Err(IssueError::Days { days });
    }
    let now = now.replace_nanosecond(0).expect("0 is a valid nanosecond");
    Ok((
        now - CLOCK_SKEW_ALLOWANCE,
        now + Duration::days(i64::from(days)),
    ))
}

/// A self-signed CA: basicConstraints CA:TRUE (critical), keyUsage keyCertSign + cRLSign.
pub fn issue_ca(
    subject: &Subject,
    days: u32,
    key: &PrivateKey,
    now: OffsetDateTime,
) -> Result<String, IssueError> {
    let mut params = CertificateParams::default();
    (params.not_before, params.not_after) = validity(now, days)?;
    params.serial_number = Some(random_serial());
    params.distinguished_name = subject.to_dn();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let signer = key.signer("the CA key")?;
    let cert = params.self_signed(&signer).map_err(|e| IssueError::Sign {
        what: "CA certificate",
        detail: e.to_string(),
    })?;
    Ok(cert.pem())
}

/// The leaf request: subject, lifetime and the DNS names dSSM is reached by.
#[derive(Debug, Clone)]
pub struct LeafRequest<'a> {
    pub subject: &'a Subject,
    pub days: u32,
    pub dns_names: &'a [String],
}

/// The existing CA a leaf is signed with. `cert_name`/`key_name` name the file or Secret key in
/// error messages.
pub struct CaSigner<'a> {
    pub cert_pem: &'a [u8],
    pub key: &'a PrivateKey,
    pub cert_name: &'a str,
    pub key_name: &'a str,
}

/// Everything that would make signing a leaf with `ca` wrong, checked before any work: the CA
/// key matches the CA certificate, the CA is valid now, and a leaf of `days` would not outlive it.
pub fn check_ca_can_sign(
    ca: &CaSigner<'_>,
    days: u32,
    now: OffsetDateTime,
) -> Result<Certificate, IssueError> {
    let ca_cert: Certificate = parse_certificate(ca.cert_pem, ca.cert_name)?;
    if ca_cert.spki_der() != ca.key.public_key_der().as_slice() {
        return Err(IssueError::CaKeyMismatch {
            ca_cert: ca.cert_name.to_string(),
            ca_key: ca.key_name.to_string(),
        });
    }
    let unix_now = now.unix_timestamp();
    if unix_now < ca_cert.not_before || unix_now >= ca_cert.not_after {
        return Err(IssueError::CaNotValid {
            ca_cert: ca.cert_name.to_string(),
            not_before: super::format_time(ca_cert.not_before),
            not_after: super::format_time(ca_cert.not_after),
        });
    }
    let (_, not_after) = validity(now, days)?;
    if not_after.unix_timestamp() > ca_cert.not_after {
        return Err(IssueError::LeafOutlivesCa {
            ca_cert: ca.cert_name.to_string(),
            ca_not_after: super::format_time(ca_cert.not_after),
            leaf_not_after: super::format_time(not_after.unix_timestamp()),
            max_days: (ca_cert.not_after - unix_now) / 86_400,
        });
    }
    Ok(ca_cert)
}

/// The leaf: X.509 v3 with subjectAltName, EKU serverAuth + clientAuth (dSSM serves it and TMM
/// presents it), SKI and AKI, signed by `ca`. Refuses a leaf that would outlive its CA.
pub fn issue_leaf(
    request: &LeafRequest<'_>,
    key: &PrivateKey,
    ca: &CaSigner<'_>,
    now: OffsetDateTime,
) -> Result<String, IssueError> {
    check_ca_can_sign(ca, request.days, now)?;
    let (not_before, not_after) = validity(now, request.days)?;

    let mut params = CertificateParams::default();
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    params.distinguished_name = request.subject.to_dn();
    params.subject_alt_names = request
        .dns_names
        .iter()
        .map(|name| {
            name.clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|_| IssueError::DnsName { name: name.clone() })
        })
        .collect::<Result<_, _>>()?;
    // ExplicitNoCa writes basicConstraints CA:FALSE and, with it, the subject key identifier.
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = if key.algorithm().is_rsa() {
        vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ]
    } else {
        // keyEncipherment means RSA key transport; it has no meaning for an EC key.
        vec![KeyUsagePurpose::DigitalSignature]
    };
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;

    let ca_signer = ca.key.signer(ca.key_name)?;
    let cert_pem = std::str::from_utf8(ca.cert_pem).map_err(|_| InspectError::NotPem {
        what: ca.cert_name.to_string(),
    })?;
    // Keeps the CA's exact subject bytes and its SKI as our AKI, also for a seed-made v1 CA.
    let issuer = Issuer::from_ca_cert_pem(cert_pem, ca_signer).map_err(|e| IssueError::Sign {
        what: "leaf certificate (reading the CA)",
        detail: e.to_string(),
    })?;
    let leaf_signer = key.signer("the leaf key")?;
    let cert = params
        .signed_by(&leaf_signer, &issuer)
        .map_err(|e| IssueError::Sign {
            what: "leaf certificate",
            detail: e.to_string(),
        })?;
    Ok(cert.pem())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Case<'a> = (&'a str, Option<&'a [(DnType, &'a str)]>);

    #[test]
    fn subjects_parse_in_both_spellings_and_keep_their_order() {
        let cases: &[Case<'_>] = &[
            (
                "/O=Redis Test/CN=Certificate Authority",
                Some(&[
                    (DnType::OrganizationName, "Redis Test"),
                    (DnType::CommonName, "Certificate Authority"),
                ]),
            ),
            (
                "O=Redis Test, CN=Server",
                Some(&[
                    (DnType::OrganizationName, "Redis Test"),
                    (DnType::CommonName, "Server"),
                ]),
            ),
            (
                "CN=x,O=y",
                Some(&[(DnType::CommonName, "x"), (DnType::OrganizationName, "y")]),
            ),
            (
                "c=US, st=WA, l=Seattle, ou=Ops, cn=a",
                Some(&[
                    (DnType::CountryName, "US"),
                    (DnType::StateOrProvinceName, "WA"),
                    (DnType::LocalityName, "Seattle"),
                    (DnType::OrganizationalUnitName, "Ops"),
                    (DnType::CommonName, "a"),
                ]),
            ),
            ("", None),
            ("/", None),
            ("CN", None),
            ("CN=", None),
            ("XX=1", None),
        ];
        for (text, want) in cases {
            let got = Subject::parse(text);
            match want {
                Some(want) => {
                    let want: Vec<(DnType, String)> = want
                        .iter()
                        .map(|(t, v)| (t.clone(), v.to_string()))
                        .collect();
                    assert_eq!(got.expect(text).0, want, "{text}");
                }
                None => {
                    let err = got.expect_err(text).to_string();
                    assert!(err.contains(&format!("{text:?}")), "{err}");
                }
            }
        }
    }

    #[test]
    fn serials_are_positive_16_octets_and_differ() {
        let a = random_serial().to_bytes();
        let b = random_serial().to_bytes();
        assert_eq!(a.len(), 16);
        assert!(a[0] & 0x80 == 0 && a[0] != 0);
        assert_ne!(a, b);
    }

    #[test]
    fn zero_days_is_refused() {
        let err = validity(OffsetDateTime::now_utc(), 0).unwrap_err();
        assert!(matches!(err, IssueError::Days { days: 0 }));
    }
}
