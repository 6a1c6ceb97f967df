//! Issuing the CA and the one leaf that dSSM serves and TMM presents (rcgen).

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose, SanType, SerialNumber,
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
    #[error("--dns {name:?} is not a valid subjectAltName: {reason}")]
    DnsName { name: String, reason: String },
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
    #[error("{ca_cert} is not a CA certificate (subject {subject:?}: basicConstraints CA:FALSE or missing): a leaf signed with it would not verify. Give the CA's certificate, not a leaf")]
    NotACa { ca_cert: String, subject: String },
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
            check_value(&ty, k.trim(), v, trimmed).map_err(|r| bad(&r))?;
            if let Some((_, first)) = out.iter().find(|(t, _)| *t == ty) {
                return Err(bad(&format!(
                    "{} is given twice ({first:?} and {v:?}): each attribute may be given once",
                    k.trim().to_ascii_uppercase()
                )));
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
            match (ty, rcgen::string::PrintableString::try_from(v.as_str())) {
                // X.520: countryName is a PrintableString of two letters.
                (DnType::CountryName, Ok(p)) => dn.push(ty.clone(), DnValue::PrintableString(p)),
                _ => dn.push(ty.clone(), v.as_str()),
            }
        }
        dn
    }
}

/// What one attribute's value must be: C two letters; no value that reads as the rest of an
/// OpenSSL slash-form subject given without its leading slash (`CN=x/O=y`).
fn check_value(ty: &DnType, key: &str, v: &str, whole: &str) -> Result<(), String> {
    if *ty == DnType::CountryName && !(v.len() == 2 && v.bytes().all(|b| b.is_ascii_alphabetic())) {
        return Err(format!(
            "C must be a two-letter country code (ISO 3166), like C=US; {v:?} is not"
        ));
    }
    let slash_form = v.split('/').skip(1).any(|rest| {
        rest.split_once('=').is_some_and(|(k, _)| {
            ["CN", "O", "OU", "C", "ST", "L"].contains(&k.trim().to_ascii_uppercase().as_str())
        })
    });
    if slash_form && !whole.starts_with('/') {
        return Err(format!(
            "{key}={v:?} looks like OpenSSL's slash form without its leading slash: write \
             \"/{whole}\" or, with commas, \"{}\"",
            whole.split('/').collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(())
}

/// One subjectAltName: an IP address (v4 or v6), else a DNS name (RFC 1123 labels, a leading
/// `*.` wildcard allowed). Something that looks like an address but is not one is refused rather
/// than written as a DNS name no client would ever match.
pub fn parse_san(name: &str) -> Result<SanType, IssueError> {
    let bad = |reason: &str| IssueError::DnsName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    if name.contains(':')
        || (!name.is_empty() && name.chars().all(|c| c.is_ascii_digit() || c == '.'))
    {
        return Err(bad("it looks like an IP address but is not a valid one"));
    }
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > 253 {
        return Err(bad("longer than 253 characters"));
    }
    let host = name.strip_prefix("*.").unwrap_or(name);
    for label in host.split('.') {
        if label.is_empty() {
            return Err(bad("it has an empty label (two dots, or a dot at an end)"));
        }
        if label.len() > 63 {
            return Err(bad("a label is longer than 63 characters"));
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(bad(
                "only letters, digits, '-' and '.' are allowed (and a leading '*.')",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label starts or ends with '-'"));
        }
    }
    name.to_string()
        .try_into()
        .map(SanType::DnsName)
        .map_err(|_| bad("not an IA5 string"))
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

/// The validity a new leaf gets: the asked-for days, cut to its CA's notAfter when it would
/// outlive the CA (a leaf never outlives its CA, and refusing instead would turn every renewal
/// under a CA of the same lifetime into a CA rotation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafValidity {
    pub not_before: i64,
    pub not_after: i64,
    /// What `days` asked for; later than `not_after` when the leaf was cut.
    pub requested_not_after: i64,
    pub requested_days: u32,
}

impl LeafValidity {
    /// From the CA's validity, the asked-for days and the clock (unix seconds).
    pub fn new(
        ca_not_before: i64,
        ca_not_after: i64,
        days: u32,
        now: OffsetDateTime,
    ) -> Result<Self, IssueError> {
        let (not_before, requested) = validity(now, days)?;
        let requested = requested.unix_timestamp();
        Ok(LeafValidity {
            // Never before the CA itself: the chain's validity nests.
            not_before: not_before.unix_timestamp().max(ca_not_before),
            not_after: requested.min(ca_not_after),
            requested_not_after: requested,
            requested_days: days,
        })
    }

    pub fn cut_to_ca(&self) -> bool {
        self.not_after < self.requested_not_after
    }

    /// The note the output, the Event and the plan carry when the leaf was cut.
    pub fn note(&self) -> Option<String> {
        self.cut_to_ca().then(|| {
            let short = self.requested_not_after - self.not_after;
            let days = short / 86_400;
            let short = if days > 0 {
                format!("{days} days")
            } else {
                format!("{}s", short)
            };
            format!(
                "leaf valid until the CA's end, {}, {short} short of --days {}",
                super::format_time(self.not_after),
                self.requested_days
            )
        })
    }
}

/// Everything that would make signing a leaf with `ca` wrong, checked before any work: the CA
/// certificate is a CA, its key matches it, and it is valid now. Returns the CA and the validity
/// the leaf will get (cut to the CA's end if `days` would outlive it).
pub fn check_ca_can_sign(
    ca: &CaSigner<'_>,
    days: u32,
    now: OffsetDateTime,
) -> Result<(Certificate, LeafValidity), IssueError> {
    let ca_cert: Certificate = parse_certificate(ca.cert_pem, ca.cert_name)?;
    if !ca_cert.is_ca {
        return Err(IssueError::NotACa {
            ca_cert: ca.cert_name.to_string(),
            subject: ca_cert.subject.clone(),
        });
    }
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
    let validity = LeafValidity::new(ca_cert.not_before, ca_cert.not_after, days, now)?;
    Ok((ca_cert, validity))
}

/// A leaf as issued: its PEM and the validity it got.
#[derive(Debug, Clone)]
pub struct IssuedLeaf {
    pub pem: String,
    pub validity: LeafValidity,
}

/// The leaf: X.509 v3 with subjectAltName, EKU serverAuth + clientAuth (dSSM serves it and TMM
/// presents it), SKI and AKI, signed by `ca`. Its notAfter is cut to the CA's when `days` would
/// outlive it.
pub fn issue_leaf(
    request: &LeafRequest<'_>,
    key: &PrivateKey,
    ca: &CaSigner<'_>,
    now: OffsetDateTime,
) -> Result<IssuedLeaf, IssueError> {
    let (_, validity) = check_ca_can_sign(ca, request.days, now)?;
    let at = |t: i64| OffsetDateTime::from_unix_timestamp(t).expect("within the CA's validity");

    let mut params = CertificateParams::default();
    params.not_before = at(validity.not_before);
    params.not_after = at(validity.not_after);
    params.serial_number = Some(random_serial());
    params.distinguished_name = request.subject.to_dn();
    params.subject_alt_names = request
        .dns_names
        .iter()
        .map(|name| parse_san(name))
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
    Ok(IssuedLeaf {
        pem: cert.pem(),
        validity,
    })
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

    /// The trust-boundary issue: `OU=a, OU=b` kept only `OU=b`, `C=USA` was taken (and written
    /// as a UTF8String), and `CN=x/O=y` became one CN. Each is now refused with what to write;
    /// C is a two-letter PrintableString, as X.520 says and `openssl req` writes.
    #[test]
    fn repeated_attributes_bad_countries_and_slash_form_without_its_slash_are_refused() {
        for (text, says) in [
            ("OU=a, OU=b, CN=x", "OU is given twice (\"a\" and \"b\")"),
            ("C=USA, CN=x", "C must be a two-letter country code"),
            ("C=1A, CN=x", "two-letter"),
            (
                "CN=x/O=y",
                "write \"/CN=x/O=y\" or, with commas, \"CN=x, O=y\"",
            ),
        ] {
            let e = Subject::parse(text).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
        // A slash that starts no attribute is part of the value; the slash form is understood.
        assert!(Subject::parse("O=a/b, CN=x").is_ok());
        assert_eq!(
            Subject::parse("/O=y/CN=x").unwrap().0,
            [
                (DnType::OrganizationName, "y".to_string()),
                (DnType::CommonName, "x".to_string())
            ]
        );
        // C is written as a PrintableString.
        let key = PrivateKey::generate(super::super::KeyAlgorithm::EcdsaP256).unwrap();
        let pem = issue_ca(
            &Subject::parse("C=US, CN=x").unwrap(),
            1,
            &key,
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = p.parse_x509().unwrap();
        let c = cert.subject().iter_country().next().unwrap();
        assert_eq!(
            c.attr_value().header.tag(),
            x509_parser::der_parser::asn1_rs::Tag::PrintableString
        );
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
    fn subject_alt_names_are_dns_names_or_ip_addresses_and_nothing_else() {
        let ok = [
            "f5-dssm-sentinel",
            "f5-dssm-db.spk-utilities.svc.cluster.local",
            "*.f5-dssm-db.ns.svc.cluster.local",
            "a1.example",
        ];
        for name in ok {
            assert!(matches!(parse_san(name), Ok(SanType::DnsName(_))), "{name}");
        }
        for ip in ["127.0.0.1", "::1", "fd00::5"] {
            assert!(matches!(parse_san(ip), Ok(SanType::IpAddress(_))), "{ip}");
        }
        let bad = [
            ("", "empty"),
            ("999.1.1.1", "IP address"),
            ("10.0.0", "IP address"),
            ("fd00::zz", "IP address"),
            ("a..b", "empty label"),
            ("a.", "empty label"),
            ("-a.b", "starts or ends"),
            ("a_b.c", "only letters"),
            ("a b", "only letters"),
            ("*", "only letters"),
            ("a.*.b", "only letters"),
        ];
        for (name, why) in bad {
            let err = parse_san(name).unwrap_err().to_string();
            assert!(
                err.contains(&format!("--dns {name:?}")) && err.contains(why),
                "{name}: {err}"
            );
        }
        assert!(parse_san(&"a".repeat(64)).is_err());
        assert!(parse_san(&["a"; 130].join(".")).is_err());
    }

    #[test]
    fn zero_days_is_refused() {
        let err = validity(OffsetDateTime::now_utc(), 0).unwrap_err();
        assert!(matches!(err, IssueError::Days { days: 0 }));
    }
}
