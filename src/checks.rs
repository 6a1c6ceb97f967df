//! Every verdict about the materials, computed once, as data: a [`Finding`] names the check, its
//! severity and the object it is about (a file, or namespace/secret/key). `check` prints them,
//! `plan` decides from them whether a copy is usable, the agent's metrics and `probe` read them.
//! Pure: bytes and the clock in, findings out.
//!
//! A CA bundle (`dssm-ca.crt`) may hold several CAs (old + new during a CA rotation): every one
//! is parsed and judged, and the leaf is valid if it chains to the CA OpenSSL picks for it
//! (Redis verifies with OpenSSL), which is any CA of the bundle as long as the leaf names it
//! unambiguously.

use std::fmt;

use serde::Serialize;

use crate::exit;
use crate::materials::{
    Entry, Found, Place, ReadCopy, CA_CERT, CA_KEY, DH_PARAMS, LEAF_CERT, LEAF_KEY,
};
use crate::pki::{self, format_time, Certificate, DhParams, PrivateKey};

/// How bad something is. Ordered: a report's status is the worst of its parts. "Cannot tell"
/// ranks above a warning (it may hide anything) but below a known breakage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warning,
    Unknown,
    Critical,
}

impl Status {
    pub fn exit_code(self) -> i32 {
        match self {
            Status::Ok => exit::OK,
            Status::Warning => exit::WARNING,
            Status::Critical => exit::CRITICAL,
            Status::Unknown => exit::UNKNOWN,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Ok => "OK",
            Status::Warning => "WARNING",
            Status::Unknown => "UNKNOWN",
            Status::Critical => "CRITICAL",
        })
    }
}

/// `--warn` and `--critical`, in seconds of residual time.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub warn: i64,
    pub critical: i64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            warn: 28 * 86_400,
            critical: 14 * 86_400,
        }
    }
}

/// What a finding is about. The names are `check`'s JSON `name`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    Read,
    Parse,
    /// basicConstraints CA:TRUE on every certificate of the CA bundle.
    Ca,
    /// extendedKeyUsage of the leaf: dSSM serves it and TMM presents it.
    LeafUsage,
    Chain,
    ValidityNesting,
    LeafKey,
    CaKey,
    Dhparams,
    /// Every CA of the bundle is the stored CA or the rotation's previous CA.
    TrustBundle,
    /// A certificate outside its validity window: TLS refuses it now.
    Validity,
    /// Residual time against `--warn` / `--critical`: due, not broken.
    Expiry,
    CopiesInSync,
}

impl Check {
    pub fn name(self) -> &'static str {
        match self {
            Check::Read => "read",
            Check::Parse => "parse",
            Check::Ca => "ca",
            Check::LeafUsage => "leaf-usage",
            Check::Chain => "chain",
            Check::ValidityNesting => "validity-nesting",
            Check::LeafKey => "leaf-key",
            Check::CaKey => "ca-key",
            Check::Dhparams => "dhparams",
            Check::TrustBundle => "trust-bundle",
            Check::Validity => "validity",
            Check::Expiry => "expiry",
            Check::CopiesInSync => "copies-in-sync",
        }
    }
}

/// One verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: Check,
    pub status: Status,
    /// The file of the materials it is about (none for a verdict across copies).
    pub file: Option<&'static str>,
    pub object: Place,
    pub message: String,
}

impl Finding {
    /// Whether this finding makes the copy unusable for TLS between TMM and dSSM now: what
    /// `plan` repairs or replaces. Residual time is judged by renewal, not repair; the CA key
    /// lives in its own Secret, not in the mounted copy.
    pub fn breaks_copy(&self) -> bool {
        self.status >= Status::Unknown
            && !matches!(self.check, Check::Expiry | Check::CopiesInSync)
            && self.file != Some(CA_KEY)
    }

    /// The message, led by the object it names unless it already says it.
    pub fn describe(&self) -> String {
        let object = self.object.to_string();
        if self.message.contains(&object) {
            self.message.clone()
        } else {
            format!("{object} {}", self.message)
        }
    }
}

/// One certificate of a copy and its validity verdict.
#[derive(Debug, Clone)]
pub struct CertFinding {
    pub file: &'static str,
    pub place: Place,
    /// 1-based position in a CA bundle of more than one certificate.
    pub index: Option<usize>,
    pub cert: Certificate,
    /// `Validity` (outside the window) or `Expiry` (residual time against the thresholds).
    pub validity: Finding,
}

impl CertFinding {
    pub fn role(&self) -> &'static str {
        if self.file == CA_CERT {
            "ca"
        } else {
            "leaf"
        }
    }

    /// `dssm-ca.crt`, or `dssm-ca.crt #2` in a bundle of several CAs.
    pub fn name(&self) -> String {
        match self.index {
            Some(i) => format!("{} #{i}", self.file),
            None => self.file.to_string(),
        }
    }
}

/// Everything found about one copy.
#[derive(Debug, Clone)]
pub struct CopyFindings {
    pub label: String,
    /// The CAs of the bundle in order, then the leaf.
    pub certificates: Vec<CertFinding>,
    pub findings: Vec<Finding>,
    /// Bits and generator of valid DH params.
    pub dhparams: Option<(u32, u32)>,
    /// Index into `certificates` of the CA that signs the leaf (as OpenSSL picks it).
    pub issuer: Option<usize>,
    /// Index into `certificates` of the CA the copy's CA key belongs to.
    pub ca_key_of: Option<usize>,
}

impl CopyFindings {
    /// The worst of every verdict; "cannot tell" when there is nothing at all.
    pub fn status(&self) -> Status {
        self.certificates
            .iter()
            .map(|c| c.validity.status)
            .chain(self.findings.iter().map(|f| f.status))
            .max()
            .unwrap_or(Status::Unknown)
    }

    /// The verdicts that make this copy unusable now.
    pub fn breaking(&self) -> impl Iterator<Item = &Finding> {
        self.certificates
            .iter()
            .map(|c| &c.validity)
            .chain(&self.findings)
            .filter(|f| f.breaks_copy())
    }

    pub fn usable(&self) -> bool {
        self.breaking().next().is_none()
    }

    pub fn cas(&self) -> impl Iterator<Item = &CertFinding> {
        self.certificates.iter().filter(|c| c.file == CA_CERT)
    }

    pub fn leaf(&self) -> Option<&Certificate> {
        self.certificates
            .iter()
            .find(|c| c.file == LEAF_CERT)
            .map(|c| &c.cert)
    }

    /// The CA of the bundle that signs the leaf.
    pub fn issuing_ca(&self) -> Option<&Certificate> {
        self.issuer.map(|i| &self.certificates[i].cert)
    }
}

/// Residual time the way `kubeadm certs check-expiration` shows it.
pub fn format_residual(seconds: i64) -> String {
    if seconds <= 0 {
        return "expired".into();
    }
    let (d, h, m) = (
        seconds / 86_400,
        seconds % 86_400 / 3600,
        seconds % 3600 / 60,
    );
    if d > 0 {
        format!("{d}d")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else {
        format!("{m}m{}s", seconds % 60)
    }
}

fn validity(c: &Certificate, now: i64, t: Thresholds) -> (Check, Status, String) {
    let residual = c.not_after - now;
    if now < c.not_before {
        (
            Check::Validity,
            Status::Critical,
            format!("not valid before {}", format_time(c.not_before)),
        )
    } else if residual <= 0 {
        (
            Check::Validity,
            Status::Critical,
            format!("expired at {}", format_time(c.not_after)),
        )
    } else if residual < t.critical {
        let left = format_residual(residual);
        let msg = format!("expires in {left} (critical threshold)");
        (Check::Expiry, Status::Critical, msg)
    } else if residual < t.warn {
        let left = format_residual(residual);
        let msg = format!("expires in {left} (warning threshold)");
        (Check::Expiry, Status::Warning, msg)
    } else {
        let msg = format!("valid for {}", format_residual(residual));
        (Check::Expiry, Status::Ok, msg)
    }
}

/// Collects findings about one copy.
struct Judge<'a> {
    source: &'a ReadCopy,
    findings: Vec<Finding>,
}

impl<'a> Judge<'a> {
    fn push(&mut self, check: Check, status: Status, entry: &Entry, message: String) {
        self.findings.push(Finding {
            check,
            status,
            file: Some(entry.file),
            object: entry.place.clone(),
            message,
        });
    }

    /// The bytes of `file`; a missing or unreadable one is "cannot tell" (the CA key usually
    /// lives elsewhere, its own Secret or offline: its absence is fine).
    fn bytes(&mut self, file: &str) -> Option<(&'a Entry, Vec<u8>)> {
        let source = self.source;
        let entry = source.get(file)?;
        match &entry.found {
            Found::Bytes(b) => Some((entry, b.clone())),
            Found::Unreadable(e) => {
                let msg = format!("{}: cannot read: {e}", entry.place);
                self.push(Check::Read, Status::Unknown, entry, msg);
                None
            }
            Found::Missing if file != CA_KEY => {
                let msg = format!("{}: not found", entry.place);
                self.push(Check::Read, Status::Unknown, entry, msg);
                None
            }
            Found::Missing => None,
        }
    }

    fn certs(&mut self, file: &str) -> Option<(&'a Entry, Vec<Certificate>)> {
        let (entry, b) = self.bytes(file)?;
        let what = entry.place.to_string();
        let parsed = if file == CA_CERT {
            pki::inspect::parse_certificates(&b, &what)
        } else {
            pki::parse_certificate(&b, &what).map(|c| vec![c])
        };
        match parsed {
            Ok(c) => Some((entry, c)),
            Err(e) => {
                self.push(Check::Parse, Status::Unknown, entry, e.to_string());
                None
            }
        }
    }

    fn key(&mut self, file: &str) -> Option<(&'a Entry, PrivateKey)> {
        let (entry, b) = self.bytes(file)?;
        let b = crate::pki::SecretBytes::new(b);
        match PrivateKey::from_pem(b.expose(), &entry.place.to_string()) {
            Ok(k) => Some((entry, k)),
            Err(e) => {
                self.push(Check::Parse, Status::Unknown, entry, e.to_string());
                None
            }
        }
    }
}

/// Judges one copy of the materials at `now` (unix seconds).
pub fn judge_copy(source: &ReadCopy, now: i64, t: Thresholds) -> CopyFindings {
    let mut j = Judge {
        source,
        findings: Vec::new(),
    };
    let cas = j.certs(CA_CERT);
    let leaf = j.certs(LEAF_CERT).map(|(e, mut c)| (e, c.swap_remove(0)));
    let leaf_key = j.key(LEAF_KEY);
    let ca_key = j.key(CA_KEY);
    let dh = j.bytes(DH_PARAMS);

    let mut certificates = Vec::new();
    let several = cas.as_ref().is_some_and(|(_, c)| c.len() > 1);
    if let Some((entry, cas)) = &cas {
        for (i, c) in cas.iter().enumerate() {
            let index = several.then_some(i + 1);
            let name = match index {
                Some(i) => format!("{} (CA {i} of {})", entry.place, cas.len()),
                None => entry.place.to_string(),
            };
            if !c.is_ca {
                let msg = format!("{name} is not a CA certificate (basicConstraints CA:FALSE)");
                j.push(Check::Ca, Status::Critical, entry, msg);
            }
            certificates.push(cert_finding(entry, index, c, now, t));
        }
    }
    if let Some((entry, c)) = &leaf {
        certificates.push(cert_finding(entry, None, c, now, t));
        let (status, msg) = leaf_usage(c, &entry.place);
        j.push(Check::LeafUsage, status, entry, msg);
    }
    let issuer = match (&cas, &leaf) {
        (Some((ca_entry, cas)), Some((leaf_entry, leaf))) => {
            judge_chain(&mut j, ca_entry, cas, leaf_entry, leaf, now)
        }
        _ => None,
    };
    if let (Some(issuer), true) = (issuer, several) {
        relax_unused_cas(&mut certificates, issuer);
    }
    let ca_key_of = judge_keys(&mut j, &cas, &leaf, &leaf_key, &ca_key);
    let dhparams = dh.and_then(|(entry, b)| judge_dh(&mut j, entry, &b));
    CopyFindings {
        label: source.label.clone(),
        certificates,
        findings: j.findings,
        dhparams,
        issuer,
        ca_key_of,
    }
}

/// The CAs a copy may hold: the CA stored in the CA key Secret, and the previous CA while a CA
/// rotation records one. Any other CA in a bundle is foreign: a copy must never widen whom Redis
/// and TMM trust, whoever wrote it.
#[derive(Debug, Clone)]
pub struct Anchors {
    /// Where they are stored, for messages (`ns/dssm-ca-key-secret`).
    pub ca_key_secret: String,
    pub stored: Certificate,
    /// The CA bundle saved as the rotation's previous one (empty outside a rotation).
    pub previous: Vec<Certificate>,
}

impl Anchors {
    /// Whether `c` is one of them, byte for byte (a CA of the same subject is not).
    pub fn trusts(&self, c: &Certificate) -> bool {
        c.der() == self.stored.der() || self.previous.iter().any(|p| c.der() == p.der())
    }
}

/// The bundle's CAs against the anchors: each foreign CA is Critical (the copy is unusable: never
/// a repair source, and replaced).
pub fn judge_anchors(f: &mut CopyFindings, anchors: &Anchors) {
    let cas: Vec<&CertFinding> = f.cas().collect();
    let Some(first) = cas.first() else {
        return;
    };
    let (file, place) = (first.file, first.place.clone());
    let mut found = Vec::new();
    for (i, c) in cas.iter().enumerate() {
        if !anchors.trusts(&c.cert) {
            let message = format!(
                "{place}: CA #{} (subject {:?}, SHA-256 {}) is neither the stored CA ({}) nor the \
                 rotation's previous CA: a copy must not widen whom Redis and TMM trust; reconcile \
                 replaces this copy and never copies it elsewhere",
                i + 1,
                c.cert.subject,
                c.cert.sha256_fingerprint,
                anchors.ca_key_secret
            );
            found.push((Status::Critical, message));
        }
    }
    if found.is_empty() {
        let message = format!(
            "{place}: every CA is the stored CA ({}) or the rotation's previous CA",
            anchors.ca_key_secret
        );
        found.push((Status::Ok, message));
    }
    for (status, message) in found {
        f.findings.push(Finding {
            check: Check::TrustBundle,
            status,
            file: Some(file),
            object: place.clone(),
            message,
        });
    }
}

/// Without the CA key Secret (`check --dir`), what can still be said: a CA of a bundle of several
/// that neither signs the leaf nor belongs to the CA key may be foreign (a CA rotation's bundle
/// holds two CAs, one signing the leaf, the other being the key's).
pub fn judge_unanchored(f: &mut CopyFindings) {
    let cas: Vec<(usize, &CertFinding)> = (f.certificates.iter().enumerate())
        .filter(|(_, c)| c.file == CA_CERT)
        .collect();
    if cas.len() < 2 {
        return;
    }
    let mut found = Vec::new();
    for (n, (i, c)) in cas.iter().enumerate() {
        if Some(*i) != f.issuer && Some(*i) != f.ca_key_of {
            let message = format!(
                "{}: CA #{} (subject {:?}) signs no leaf here and is not the CA key's: without the \
                 CA key Secret's record check cannot tell a CA rotation's other CA from a foreign \
                 one; outside a rotation the bundle holds one CA (run check against the cluster)",
                c.place,
                n + 1,
                c.cert.subject
            );
            found.push((c.file, c.place.clone(), message));
        }
    }
    for (file, object, message) in found {
        f.findings.push(Finding {
            check: Check::TrustBundle,
            status: Status::Warning,
            file: Some(file),
            object,
            message,
        });
    }
}

fn cert_finding(
    entry: &Entry,
    index: Option<usize>,
    c: &Certificate,
    now: i64,
    t: Thresholds,
) -> CertFinding {
    let (check, status, message) = validity(c, now, t);
    CertFinding {
        file: entry.file,
        place: entry.place.clone(),
        index,
        cert: c.clone(),
        validity: Finding {
            check,
            status,
            file: Some(entry.file),
            object: entry.place.clone(),
            message,
        },
    }
}

/// A CA of a bundle that signs no leaf here (the old one after the switch, the new one before
/// it) cannot break TLS by being outside its validity: OpenSSL prefers a CA in validity of the
/// same name, and the leaf's authority key identifier names the right one. Still said.
fn relax_unused_cas(certificates: &mut [CertFinding], issuer: usize) {
    for (i, c) in certificates.iter_mut().enumerate() {
        let v = &mut c.validity;
        if i != issuer && c.file == CA_CERT && v.check == Check::Validity {
            v.status = Status::Warning;
            v.message
                .push_str("; it signs no leaf of this copy: drop it from the bundle");
        }
    }
}

fn leaf_usage(c: &Certificate, place: &Place) -> (Status, String) {
    match (c.server_auth, c.client_auth) {
        (None, _) | (_, None) => (
            Status::Ok,
            "no extendedKeyUsage: usable to serve (dSSM) and as a client cert (TMM)".into(),
        ),
        (Some(true), Some(true)) => (
            Status::Ok,
            "extendedKeyUsage serverAuth + clientAuth: dSSM serves it, TMM presents it".into(),
        ),
        (Some(s), Some(_)) => (
            Status::Critical,
            format!(
                "{place} lacks extendedKeyUsage {}: {}",
                if s { "clientAuth" } else { "serverAuth" },
                if s {
                    "Redis refuses it as TMM's client certificate"
                } else {
                    "TMM refuses it as dSSM's server certificate"
                }
            ),
        ),
    }
}

/// The CA of `cas` OpenSSL takes as the leaf's issuer (`X509_STORE_CTX_get1_issuer`): the first
/// of the names the leaf points to that is within its validity, else the last of them. It then
/// checks the signature against that one only: with two CAs of the same subject and a leaf
/// without an authority key identifier (the manual procedure's v1 leaves), order decides.
fn openssl_issuer(cas: &[Certificate], leaf: &Certificate, now: i64) -> Option<usize> {
    let named: Vec<usize> = (0..cas.len())
        .filter(|&i| leaf.names_issuer(&cas[i]))
        .collect();
    named
        .iter()
        .copied()
        .find(|&i| cas[i].not_before <= now && now < cas[i].not_after)
        .or(named.last().copied())
}

/// The CA of `cas` that OpenSSL takes for `leaf` and that signs it (0-based), if any.
pub fn chain_issuer(cas: &[Certificate], leaf: &Certificate, now: i64) -> Option<usize> {
    openssl_issuer(cas, leaf, now).filter(|&i| leaf.is_signed_by(&cas[i]))
}

/// Chain and validity nesting; returns the index (in the copy's certificates) of the issuing CA.
fn judge_chain(
    j: &mut Judge<'_>,
    ca_entry: &Entry,
    cas: &[Certificate],
    leaf_entry: &Entry,
    leaf: &Certificate,
    now: i64,
) -> Option<usize> {
    let (ca_loc, leaf_loc) = (&ca_entry.place, &leaf_entry.place);
    let of = |i: usize| match cas.len() {
        1 => ca_loc.to_string(),
        n => format!("{ca_loc} (CA {} of {n})", i + 1),
    };
    let Some(i) = chain_issuer(cas, leaf, now) else {
        let signer = cas.iter().position(|ca| leaf.is_signed_by(ca));
        let msg = match signer {
            Some(s) => format!(
                "{leaf_loc} is signed by {}, but it has no authority key identifier and OpenSSL \
                 (Redis) takes the first CA of that name, {}: TLS between TMM and dSSM fails; \
                 that CA must come first in {CA_CERT}",
                of(s),
                of(openssl_issuer(cas, leaf, now).unwrap_or(0))
            ),
            None => {
                let subjects: Vec<&str> = cas.iter().map(|c| c.subject.as_str()).collect();
                format!(
                    "{leaf_loc} (issuer {}) is not signed by {ca_loc} (subject {}): TLS between \
                     TMM and dSSM fails",
                    leaf.issuer,
                    subjects.join("; ")
                )
            }
        };
        j.push(Check::Chain, Status::Critical, leaf_entry, msg);
        return None;
    };
    let ca = &cas[i];
    if let Some(msg) = openssl_refusal(cas, leaf, leaf_loc) {
        j.push(Check::Chain, Status::Critical, leaf_entry, msg);
        return None;
    }
    let msg = format!("{leaf_loc} is signed by {}", of(i));
    j.push(Check::Chain, Status::Ok, leaf_entry, msg);
    let msg = if leaf.not_after > ca.not_after {
        // The manual procedure's commands make exactly this (the leaf is made seconds after the CA); the
        // CA's own row already carries the earlier expiry.
        format!(
            "{leaf_loc} outlives its CA by {}s: the effective expiry is the CA's, {}",
            leaf.not_after - ca.not_after,
            format_time(ca.not_after)
        )
    } else if leaf.not_after == ca.not_after {
        // dssm-certs cuts a leaf that would outlive its CA to the CA's end.
        format!(
            "{leaf_loc}: leaf valid until the CA's end, {} (its lifetime was cut to {}'s)",
            format_time(ca.not_after),
            of(i)
        )
    } else {
        format!("{leaf_loc} expires no later than {}", of(i))
    };
    j.push(Check::ValidityNesting, Status::Ok, leaf_entry, msg);
    Some(i)
}

/// OpenSSL judges (Redis and TMM verify with it), for both roles the leaf plays: why it refuses
/// the chain, if it does.
fn openssl_refusal(cas: &[Certificate], leaf: &Certificate, leaf_loc: &Place) -> Option<String> {
    [
        (
            pki::inspect::Role::Server,
            "as dSSM's server certificate (purpose sslserver)",
        ),
        (
            pki::inspect::Role::Client,
            "as TMM's client certificate (purpose sslclient)",
        ),
    ]
    .into_iter()
    .find_map(|(role, what)| {
        let why = pki::inspect::openssl_verify(cas, leaf, role).err()?;
        Some(format!(
            "{leaf_loc}: OpenSSL refuses the chain {what} at auth level {}: {why}; TLS between \
             TMM and dSSM fails",
            pki::inspect::AUTH_LEVEL
        ))
    })
}

type Parsed<'a, T> = Option<(&'a Entry, T)>;

fn judge_keys(
    j: &mut Judge<'_>,
    cas: &Parsed<'_, Vec<Certificate>>,
    leaf: &Parsed<'_, Certificate>,
    leaf_key: &Parsed<'_, PrivateKey>,
    ca_key: &Parsed<'_, PrivateKey>,
) -> Option<usize> {
    if let (Some((cert, c)), Some((key, k))) = (leaf, leaf_key) {
        let (status, msg) = if c.matches_key(k) {
            (Status::Ok, format!("{} matches {}", key.place, cert.place))
        } else {
            let msg = format!("{} does not match {}", key.place, cert.place);
            (Status::Critical, msg)
        };
        j.push(Check::LeafKey, status, key, msg);
    }
    // A readable key whose certificate is not: still reported, so every file has its line.
    for (check, cert, key, cert_file) in [
        (Check::LeafKey, leaf.is_some(), leaf_key, LEAF_CERT),
        (Check::CaKey, cas.is_some(), ca_key, CA_CERT),
    ] {
        if let (false, Some((entry, k))) = (cert, key) {
            let msg = format!(
                "{} is a readable {} key, but {cert_file} is not: the pair cannot be checked",
                entry.place,
                k.describe()
            );
            j.push(check, Status::Unknown, entry, msg);
        }
    }
    let (Some((cert, cas)), Some((key, k))) = (cas, ca_key) else {
        return None;
    };
    // During a CA rotation the bundle holds two CAs; the key signs one of them.
    let of = cas.iter().position(|c| c.matches_key(k));
    {
        let (status, msg) = match of {
            Some(i) if cas.len() > 1 => (
                Status::Ok,
                format!(
                    "{} matches {} (CA {} of {})",
                    key.place,
                    cert.place,
                    i + 1,
                    cas.len()
                ),
            ),
            Some(_) => (Status::Ok, format!("{} matches {}", key.place, cert.place)),
            None => (
                Status::Critical,
                format!(
                    "{} does not match {}: it cannot sign a renewed leaf",
                    key.place, cert.place
                ),
            ),
        };
        j.push(Check::CaKey, status, key, msg);
    }
    of
}

fn judge_dh(j: &mut Judge<'_>, entry: &Entry, b: &[u8]) -> Option<(u32, u32)> {
    let loc = entry.place.to_string();
    match DhParams::validate(b, &loc) {
        Ok(p) => {
            let msg = format!(
                "{loc}: {} bits, generator {}, DH_check passes",
                p.bits(),
                p.generator()
            );
            j.push(Check::Dhparams, Status::Ok, entry, msg);
            Some((p.bits(), p.generator()))
        }
        Err(e @ pki::DhError::Unreadable { .. }) => {
            j.push(Check::Dhparams, Status::Unknown, entry, e.to_string());
            None
        }
        Err(e) => {
            j.push(Check::Dhparams, Status::Critical, entry, e.to_string());
            None
        }
    }
}

/// Drift: whether every copy holds the same bytes under every mounted key (the whole CA
/// bundle included, so a copy that lacks the new CA of a rotation differs). Different copies
/// under the same CA bundle still talk to each other (warning); under different CA bundles TMM
/// and dSSM may refuse each other (critical).
pub fn judge_drift(sources: &[ReadCopy]) -> Finding {
    let labels: Vec<String> = sources.iter().map(|s| s.label.clone()).collect();
    let differing: Vec<&str> = crate::materials::MOUNTED
        .iter()
        .map(|(_, file)| *file)
        .filter(|file| {
            sources
                .windows(2)
                .any(|w| w[0].bytes(file) != w[1].bytes(file))
        })
        .collect();
    let (status, message) = if differing.is_empty() {
        (
            Status::Ok,
            format!("{} hold identical materials", labels.join(" and ")),
        )
    } else {
        let status = if differing.contains(&CA_CERT) {
            Status::Critical
        } else {
            Status::Warning
        };
        let msg = format!(
            "{} differ in {}",
            labels.join(" and "),
            differing.join(", ")
        );
        (status, msg)
    };
    Finding {
        check: Check::CopiesInSync,
        status,
        file: None,
        object: Place::Copies { copies: labels },
        message,
    }
}

/// Text from a certificate as a terminal may show it: control characters (escape sequences,
/// newlines that would fake a row) and Unicode bidirectional controls (which reorder what is
/// shown: `U+202E` makes `crt.exe` read `exe.trc`) escaped, so a crafted subject cannot
/// rewrite the table. Every command printing text from certificates or Secrets uses this one.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() || is_bidi_control(c) {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// The Unicode bidirectional formatting characters (UAX #9): embeddings, overrides, isolates
/// and marks.
fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::materials::Bundle;
    use crate::pki::{dhparams::FFDHE2048_PEM, Subject};
    use crate::pki::{issue_ca, issue_leaf, CaSigner, KeyAlgorithm, LeafRequest, SecretBytes};
    use time::{Duration, OffsetDateTime};

    struct Ca {
        pem: String,
        key: PrivateKey,
    }

    fn ca(days_ago: i64, days: u32) -> Ca {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let at = OffsetDateTime::now_utc() - Duration::days(days_ago);
        let subject = Subject::parse("CN=Certificate Authority").unwrap();
        let pem = issue_ca(&subject, days, &key, at).unwrap();
        Ca { pem, key }
    }

    /// A leaf of `signer` issued `days_ago`, for 30 days: (PEM, key).
    fn leaf(signer: &Ca, days_ago: i64) -> (String, PrivateKey) {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let request = LeafRequest {
            subject: &Subject::parse("CN=Server").unwrap(),
            days: 30,
            dns_names: &[],
        };
        let ca = CaSigner {
            cert_pem: signer.pem.as_bytes(),
            key: &signer.key,
            cert_name: "ca",
            key_name: "ca key",
        };
        let at = OffsetDateTime::now_utc() - Duration::days(days_ago);
        (issue_leaf(&request, &key, &ca, at).unwrap().pem, key)
    }

    /// `cas` as the bundle, with a fresh leaf of `signer`.
    fn bundle(cas: &[&Ca], signer: &Ca) -> Bundle {
        let (pem, key) = leaf(signer, 1);
        Bundle {
            ca_cert: cas
                .iter()
                .map(|c| c.pem.as_str())
                .collect::<String>()
                .into_bytes(),
            leaf_cert: pem.into_bytes(),
            leaf_key: SecretBytes::new(key.to_pkcs8_pem()),
            dhparams: FFDHE2048_PEM.as_bytes().to_vec(),
        }
    }

    fn now() -> i64 {
        OffsetDateTime::now_utc().unix_timestamp()
    }

    /// Drift compares whole bundles: copies that share the old CA but not the new one differ,
    /// and differ in the CA bundle (critical: they may refuse each other's next leaf).
    #[test]
    fn copies_whose_bundles_differ_only_in_their_second_ca_are_out_of_sync() {
        let (old, new, other) = (ca(10, 3650), ca(1, 3650), ca(1, 3650));
        let a = bundle(&[&old, &new], &old);
        let mut b = bundle(&[&old, &other], &old);
        b.leaf_cert = a.leaf_cert.clone();
        b.leaf_key = a.leaf_key.clone();
        let f = judge_drift(&[
            a.to_read_copy("spk-utilities"),
            b.to_read_copy("spk-ingress"),
        ]);
        assert_eq!(f.status, Status::Critical, "{f:?}");
        assert!(f.message.ends_with("differ in dssm-ca.crt"), "{f:?}");
        let f = judge_drift(&[
            a.to_read_copy("spk-utilities"),
            a.to_read_copy("spk-ingress"),
        ]);
        assert_eq!(f.status, Status::Ok, "{f:?}");
    }

    /// After the switch, an old CA that expired before the drop signs nothing: a warning on its
    /// row, the copy still usable. The CA that signs the leaf expired is a broken copy.
    #[test]
    fn only_the_ca_that_signs_the_leaf_must_be_in_its_validity() {
        let (expired, new) = (ca(400, 365), ca(1, 3650));
        let f = judge_copy(
            &bundle(&[&expired, &new], &new).to_read_copy("ns"),
            now(),
            Thresholds::default(),
        );
        assert!(f.usable(), "{:?}", f.breaking().collect::<Vec<_>>());
        assert_eq!(f.issuer, Some(1));
        assert_eq!(f.certificates[0].validity.status, Status::Warning);
        assert!(f.certificates[0].validity.message.contains("drop it"));
        assert_eq!(f.certificates[0].name(), "dssm-ca.crt #1");

        // The leaf of the expired CA: issued while it was valid, it is not usable now.
        let mut b = bundle(&[&new], &new);
        b.ca_cert = [expired.pem.as_bytes(), new.pem.as_bytes()].concat();
        let leaf = leaf(&expired, 380);
        b.leaf_cert = leaf.0.into_bytes();
        b.leaf_key = SecretBytes::new(leaf.1.to_pkcs8_pem());
        let f = judge_copy(&b.to_read_copy("ns"), now(), Thresholds::default());
        assert!(!f.usable());
        let broken: Vec<String> = f.breaking().map(Finding::describe).collect();
        assert!(
            broken
                .iter()
                .any(|m| m.contains("ns/dssm-certs-secret[dssm-ca.crt] expired at")),
            "{broken:?}"
        );
    }
}
