//! `check`: what is deployed, how long it has left, and whether it fits together. Building the
//! report is pure (materials + clock in, report out); reading files and printing are the shell.

use std::fmt;
use std::path::Path;

use serde::Serialize;

use crate::contract;
use crate::exit;
use crate::pki::{self, format_time, Certificate, DhParams, PrivateKey};

/// The JSON schema identifier; bump it only with an incompatible change.
pub const SCHEMA: &str = "dssm-certs.check/v1";

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

/// What was found under one name: bytes, nothing, or an error reading it.
#[derive(Clone)]
pub enum Found {
    Missing,
    Unreadable(String),
    Bytes(Vec<u8>),
}

impl fmt::Debug for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Missing => f.write_str("Missing"),
            Found::Unreadable(e) => write!(f, "Unreadable({e})"),
            // may be a private key
            Found::Bytes(b) => write!(f, "Bytes([{} bytes])", b.len()),
        }
    }
}

/// One copy of the materials: a folder, or later the Secrets of one namespace.
#[derive(Debug, Clone)]
pub struct Source {
    /// e.g. `dir:/path` or `namespace/spk-ingress`
    pub label: String,
    /// `(contract file name, where it is for messages, what was found)`
    pub entries: Vec<(&'static str, String, Found)>,
}

impl Source {
    fn get(&self, name: &str) -> Option<(&str, &Found)> {
        self.entries
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, loc, f)| (loc.as_str(), f))
    }
}

/// Reads the five files of the manual procedure from `dir`.
pub fn read_dir_source(dir: &Path) -> Source {
    let entries = [
        contract::CA_CERT,
        contract::LEAF_CERT,
        contract::LEAF_KEY,
        contract::CA_KEY,
        contract::DH_PARAMS,
    ]
    .into_iter()
    .map(|name| {
        let path = dir.join(name);
        let found = match std::fs::read(&path) {
            Ok(b) => Found::Bytes(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Found::Missing,
            Err(e) => Found::Unreadable(e.to_string()),
        };
        (name, path.display().to_string(), found)
    })
    .collect();
    Source {
        label: format!("dir:{}", dir.display()),
        entries,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CertReport {
    pub file: &'static str,
    pub location: String,
    pub role: &'static str,
    pub status: Status,
    pub message: String,
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    pub residual_seconds: i64,
    pub key_type: String,
    pub key_bits: u32,
    pub signature_algorithm: String,
    pub version: u32,
    pub dns_names: Vec<String>,
    pub sha256_fingerprint: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub name: &'static str,
    pub status: Status,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DhReport {
    pub bits: u32,
    pub generator: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct CopyReport {
    pub source: String,
    pub status: Status,
    pub certificates: Vec<CertReport>,
    pub checks: Vec<CheckResult>,
    pub dhparams: Option<DhReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub checked_at: String,
    pub status: Status,
    pub exit_code: i32,
    pub warn_seconds: i64,
    pub critical_seconds: i64,
    pub copies: Vec<CopyReport>,
    /// Cluster only: whether every copy holds the same bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_sync: Option<bool>,
    /// Checks across copies (cluster only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckResult>,
    /// The phase of a CA rotation in progress (cluster only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotation_phase: Option<crate::rotation::Phase>,
}

impl Report {
    pub fn new(copies: Vec<CopyReport>, now: i64, thresholds: Thresholds) -> Self {
        let status = copies
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Unknown);
        Report {
            schema: SCHEMA,
            checked_at: format_time(now),
            status,
            exit_code: status.exit_code(),
            warn_seconds: thresholds.warn,
            critical_seconds: thresholds.critical,
            copies,
            in_sync: None,
            checks: Vec::new(),
            rotation_phase: None,
        }
    }

    /// Adds the comparison of the copies (cluster): identical bytes everywhere, or which differ.
    /// Different copies under the same CA still talk to each other (warning); under different
    /// CAs TMM and dSSM refuse each other (critical).
    pub fn with_sync(mut self, sources: &[Source]) -> Self {
        if sources.len() < 2 {
            self.in_sync = Some(true);
            return self;
        }
        let bytes = |s: &Source, n: &str| match s.get(n) {
            Some((_, Found::Bytes(b))) => Some(b.clone()),
            _ => None,
        };
        let keys = [
            contract::CA_CERT,
            contract::LEAF_CERT,
            contract::LEAF_KEY,
            contract::DH_PARAMS,
        ];
        let differing: Vec<&str> = keys
            .iter()
            .copied()
            .filter(|k| {
                sources
                    .windows(2)
                    .any(|w| bytes(&w[0], k) != bytes(&w[1], k))
            })
            .collect();
        let in_sync = differing.is_empty();
        self.in_sync = Some(in_sync);
        let labels: Vec<&str> = sources.iter().map(|s| s.label.as_str()).collect();
        let result = if in_sync {
            CheckResult {
                name: "copies-in-sync",
                status: Status::Ok,
                message: format!("{} hold identical materials", labels.join(" and ")),
            }
        } else {
            let status = if differing.contains(&contract::CA_CERT) {
                Status::Critical
            } else {
                Status::Warning
            };
            CheckResult {
                name: "copies-in-sync",
                status,
                message: format!(
                    "{} differ in {}",
                    labels.join(" and "),
                    differing.join(", ")
                ),
            }
        };
        self.status = self.status.max(result.status);
        self.exit_code = self.status.exit_code();
        self.checks.push(result);
        self
    }
}

/// One namespace's copy, from its Secrets (and the CA key Secret in the dSSM namespace).
/// The report over what the cluster holds. DH_check and the signature checks take CPU time
/// (seconds for large DH moduli), so they run on the blocking pool, off the async runtime.
pub async fn inspect_observation(
    obs: &crate::cluster::Observation,
    dssm_ns: &str,
    now: i64,
    t: Thresholds,
) -> Report {
    let sources: Vec<Source> = obs
        .copies
        .iter()
        .map(|c| {
            // An unreadable store (the agent may not read the CA key) is left out, not "absent".
            let store = (c.namespace == dssm_ns && obs.store_readable).then_some(&obs.store);
            source_from_secrets(&c.namespace, &c.certs, &c.keys, store)
        })
        .collect();
    let rotation_phase = crate::rotation::phase_on_copies(obs, dssm_ns);
    tokio::task::spawn_blocking(move || {
        let copies = sources.iter().map(|s| inspect(s, now, t)).collect();
        let mut report = Report::new(copies, now, t).with_sync(&sources);
        report.rotation_phase = rotation_phase;
        report
    })
    .await
    .expect("the inspection panicked")
}

pub fn source_from_secrets(
    ns: &str,
    certs: &crate::plan::SecretObs,
    keys: &crate::plan::SecretObs,
    store: Option<&crate::plan::SecretObs>,
) -> Source {
    use crate::plan::SecretObs;
    let entry = |obs: &SecretObs, secret: &str, key: &'static str, file: &'static str| {
        let loc = format!("{ns}/{secret}[{key}]");
        let found = match obs {
            SecretObs::Missing => Found::Missing,
            SecretObs::Present { data, .. } => data
                .get(key)
                .map(|b| Found::Bytes(b.clone()))
                .unwrap_or(Found::Missing),
        };
        (file, loc, found)
    };
    let mut entries = vec![
        entry(
            certs,
            contract::CERTS_SECRET,
            contract::CA_CERT,
            contract::CA_CERT,
        ),
        entry(
            certs,
            contract::CERTS_SECRET,
            contract::LEAF_CERT,
            contract::LEAF_CERT,
        ),
        entry(
            keys,
            contract::KEYS_SECRET,
            contract::LEAF_KEY,
            contract::LEAF_KEY,
        ),
        entry(
            certs,
            contract::CERTS_SECRET,
            contract::DH_PARAMS,
            contract::DH_PARAMS,
        ),
    ];
    if let Some(store) = store {
        entries.push(entry(
            store,
            contract::CA_KEY_SECRET,
            crate::plan::store_keys::CA_KEY,
            contract::CA_KEY,
        ));
    }
    Source {
        label: format!("namespace/{ns}"),
        entries,
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

fn validity_status(c: &Certificate, now: i64, t: Thresholds) -> (Status, String) {
    let residual = c.not_after - now;
    if now < c.not_before {
        (
            Status::Critical,
            format!("not valid before {}", format_time(c.not_before)),
        )
    } else if residual <= 0 {
        (
            Status::Critical,
            format!("expired at {}", format_time(c.not_after)),
        )
    } else if residual < t.critical {
        (
            Status::Critical,
            format!(
                "expires in {} (critical threshold)",
                format_residual(residual)
            ),
        )
    } else if residual < t.warn {
        (
            Status::Warning,
            format!(
                "expires in {} (warning threshold)",
                format_residual(residual)
            ),
        )
    } else {
        (
            Status::Ok,
            format!("valid for {}", format_residual(residual)),
        )
    }
}

fn cert_report(
    file: &'static str,
    location: &str,
    role: &'static str,
    c: &Certificate,
    now: i64,
    t: Thresholds,
) -> CertReport {
    let (status, message) = validity_status(c, now, t);
    CertReport {
        file,
        location: location.to_string(),
        role,
        status,
        message,
        subject: c.subject.clone(),
        issuer: c.issuer.clone(),
        serial: c.serial.clone(),
        not_before: format_time(c.not_before),
        not_after: format_time(c.not_after),
        not_before_unix: c.not_before,
        not_after_unix: c.not_after,
        residual_seconds: c.not_after - now,
        key_type: c.key_type.clone(),
        key_bits: c.key_bits,
        signature_algorithm: c.signature_algorithm.clone(),
        version: c.version,
        dns_names: c.dns_names.clone(),
        sha256_fingerprint: c.sha256_fingerprint.clone(),
    }
}

/// Inspects one copy of the materials at time `now` (unix seconds).
pub fn inspect(source: &Source, now: i64, t: Thresholds) -> CopyReport {
    let mut checks = Vec::new();
    let mut certificates = Vec::new();
    let mut push = |name: &'static str, status: Status, message: String| {
        checks.push(CheckResult {
            name,
            status,
            message,
        })
    };

    // The CA key usually lives elsewhere (its own Secret, or offline): its absence is fine.
    let required = |name: &str| name != contract::CA_KEY;
    let bytes =
        |name: &'static str, push: &mut dyn FnMut(&'static str, Status, String)| match source
            .get(name)
        {
            Some((loc, Found::Bytes(b))) => Some((loc.to_string(), b.clone())),
            Some((loc, Found::Unreadable(e))) => {
                push("read", Status::Unknown, format!("{loc}: cannot read: {e}"));
                None
            }
            Some((loc, Found::Missing)) if required(name) => {
                push("read", Status::Unknown, format!("{loc}: not found"));
                None
            }
            _ => None,
        };

    let cert = |name: &'static str, push: &mut dyn FnMut(&'static str, Status, String)| {
        let (loc, b) = bytes(name, push)?;
        match pki::parse_certificate(&b, &loc) {
            Ok(c) => Some((loc, c)),
            Err(e) => {
                push("parse", Status::Unknown, e.to_string());
                None
            }
        }
    };
    let ca = cert(contract::CA_CERT, &mut push);
    let leaf = cert(contract::LEAF_CERT, &mut push);
    let key = |name: &'static str, push: &mut dyn FnMut(&'static str, Status, String)| {
        let (loc, b) = bytes(name, push)?;
        match PrivateKey::from_pem(&b, &loc) {
            Ok(k) => Some((loc, k)),
            Err(e) => {
                push("parse", Status::Unknown, e.to_string());
                None
            }
        }
    };
    let leaf_key = key(contract::LEAF_KEY, &mut push);
    let ca_key = key(contract::CA_KEY, &mut push);
    let dh = bytes(contract::DH_PARAMS, &mut push);

    if let Some((loc, c)) = &ca {
        certificates.push(cert_report(contract::CA_CERT, loc, "ca", c, now, t));
        if !c.is_ca {
            push(
                "ca",
                Status::Critical,
                format!("{loc} is not a CA certificate (basicConstraints CA:FALSE)"),
            );
        }
    }
    if let Some((loc, c)) = &leaf {
        certificates.push(cert_report(contract::LEAF_CERT, loc, "leaf", c, now, t));
        let usage = match (c.server_auth, c.client_auth) {
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
                    "{loc} lacks extendedKeyUsage {}: {}",
                    if s { "clientAuth" } else { "serverAuth" },
                    if s {
                        "Redis refuses it as TMM's client certificate"
                    } else {
                        "TMM refuses it as dSSM's server certificate"
                    }
                ),
            ),
        };
        push("leaf-usage", usage.0, usage.1);
    }
    if let (Some((ca_loc, ca)), Some((leaf_loc, leaf))) = (&ca, &leaf) {
        if leaf.is_signed_by(ca) {
            push(
                "chain",
                Status::Ok,
                format!("{leaf_loc} is signed by {ca_loc}"),
            );
            if leaf.not_after > ca.not_after {
                // The seeds' commands make exactly this (the leaf is made seconds after the
                // CA); the CA's own row already carries the earlier expiry.
                push(
                    "validity-nesting",
                    Status::Ok,
                    format!(
                        "{leaf_loc} outlives its CA by {}s: the effective expiry is the CA's, {}",
                        leaf.not_after - ca.not_after,
                        format_time(ca.not_after)
                    ),
                );
            } else if leaf.not_after == ca.not_after {
                // dssm-certs cuts a leaf that would outlive its CA to the CA's end.
                push(
                    "validity-nesting",
                    Status::Ok,
                    format!(
                        "{leaf_loc}: leaf valid until the CA's end, {} (its lifetime was cut to {ca_loc}'s)",
                        format_time(ca.not_after)
                    ),
                );
            } else {
                push(
                    "validity-nesting",
                    Status::Ok,
                    format!("{leaf_loc} expires no later than {ca_loc}"),
                );
            }
        } else {
            push(
                "chain",
                Status::Critical,
                format!(
                    "{leaf_loc} (issuer {}) is not signed by {ca_loc} (subject {}): TLS between TMM and dSSM fails",
                    leaf.issuer, ca.subject
                ),
            );
        }
    }
    if let (Some((cert_loc, c)), Some((key_loc, k))) = (&leaf, &leaf_key) {
        if c.matches_key(k) {
            push(
                "leaf-key",
                Status::Ok,
                format!("{key_loc} matches {cert_loc}"),
            );
        } else {
            push(
                "leaf-key",
                Status::Critical,
                format!("{key_loc} does not match {cert_loc}"),
            );
        }
    }
    // A readable key whose certificate is not: still reported, so every file has its line.
    for (name, cert, key, cert_file) in [
        ("leaf-key", leaf.is_some(), &leaf_key, contract::LEAF_CERT),
        ("ca-key", ca.is_some(), &ca_key, contract::CA_CERT),
    ] {
        if let (false, Some((key_loc, k))) = (cert, key) {
            push(
                name,
                Status::Unknown,
                format!("{key_loc} is a readable {} key, but {cert_file} is not: the pair cannot be checked", k.describe()),
            );
        }
    }
    if let (Some((cert_loc, c)), Some((key_loc, k))) = (&ca, &ca_key) {
        if c.matches_key(k) {
            push(
                "ca-key",
                Status::Ok,
                format!("{key_loc} matches {cert_loc}"),
            );
        } else {
            push(
                "ca-key",
                Status::Critical,
                format!("{key_loc} does not match {cert_loc}: it cannot sign a renewed leaf"),
            );
        }
    }
    let mut dhparams = None;
    if let Some((loc, b)) = dh {
        match DhParams::validate(&b, &loc) {
            Ok(p) => {
                push(
                    "dhparams",
                    Status::Ok,
                    format!(
                        "{loc}: {} bits, generator {}, DH_check passes",
                        p.bits(),
                        p.generator()
                    ),
                );
                dhparams = Some(DhReport {
                    bits: p.bits(),
                    generator: p.generator(),
                });
            }
            Err(e @ pki::DhError::Unreadable { .. }) => {
                push("dhparams", Status::Unknown, e.to_string())
            }
            Err(e) => push("dhparams", Status::Critical, e.to_string()),
        }
    }

    let status = certificates
        .iter()
        .map(|c| c.status)
        .chain(checks.iter().map(|c| c.status))
        .max()
        .unwrap_or(Status::Unknown);
    CopyReport {
        source: source.label.clone(),
        status,
        certificates,
        checks,
        dhparams,
    }
}

/// The human table, in the spirit of `kubeadm certs check-expiration`.
pub fn render_table(report: &Report) -> String {
    let mut out = String::new();
    if let Some(p) = report.rotation_phase {
        out.push_str(&format!(
            "CA rotation in progress: phase {} of 3 ({}: {})\n\n",
            p.number(),
            p.name(),
            p.describe()
        ));
    }
    for copy in &report.copies {
        out.push_str(&format!("{} — {}\n\n", copy.source, copy.status));
        let mut rows = vec![[
            "CERTIFICATE".to_string(),
            "EXPIRES".into(),
            "RESIDUAL TIME".into(),
            "ISSUER".into(),
            "STATUS".into(),
        ]];
        for c in &copy.certificates {
            let issuer = if c.issuer == c.subject {
                "<self-signed>".to_string()
            } else {
                common_name(&c.issuer)
            };
            rows.push([
                c.file.to_string(),
                c.not_after.replace('T', " ").replace('Z', " UTC"),
                format_residual(c.residual_seconds),
                printable(&issuer),
                c.status.to_string(),
            ]);
        }
        out.push_str(&columns(&rows));
        out.push('\n');
        for c in &copy.certificates {
            out.push_str(&format!(
                "{}: subject \"{}\", serial {}, {}, {}, X.509 v{}; {}\n",
                c.file,
                printable(&c.subject),
                c.serial,
                key_label(c),
                c.signature_algorithm,
                c.version,
                printable(&c.message)
            ));
        }
        out.push('\n');
        let mut rows = vec![["CHECK".to_string(), "STATUS".into(), "DETAIL".into()]];
        for c in &copy.checks {
            rows.push([
                c.name.to_string(),
                c.status.to_string(),
                printable(&c.message),
            ]);
        }
        out.push_str(&columns(&rows));
        out.push('\n');
    }
    if !report.checks.is_empty() {
        let mut rows = vec![[
            "ACROSS COPIES".to_string(),
            "STATUS".into(),
            "DETAIL".into(),
        ]];
        for c in &report.checks {
            rows.push([
                c.name.to_string(),
                c.status.to_string(),
                printable(&c.message),
            ]);
        }
        out.push_str(&columns(&rows));
        out.push('\n');
    }
    out.push_str(&format!("overall: {}\n", report.status));
    out
}

fn key_label(c: &CertReport) -> String {
    if c.key_type == "RSA" {
        format!("RSA {}", c.key_bits)
    } else {
        c.key_type.clone()
    }
}

/// Text from a certificate as a terminal may show it: control characters (escape sequences,
/// newlines that would fake a row) escaped, so a crafted subject cannot rewrite the table.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn common_name(dn: &str) -> String {
    dn.split(", ")
        .find_map(|p| p.strip_prefix("CN="))
        .unwrap_or(dn)
        .to_string()
}

fn columns<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residual_time_reads_like_kubeadm() {
        for (secs, want) in [
            (-5, "expired"),
            (0, "expired"),
            (59, "0m59s"),
            (3_600 + 120, "1h2m"),
            (86_400 * 364 + 3_600, "364d"),
        ] {
            assert_eq!(format_residual(secs), want, "{secs}");
        }
    }

    #[test]
    fn the_worst_status_wins_and_cannot_tell_outranks_a_warning() {
        assert!(Status::Ok < Status::Warning);
        assert!(Status::Warning < Status::Unknown);
        assert!(Status::Unknown < Status::Critical);
        let copy = |status| CopyReport {
            source: "x".into(),
            status,
            certificates: vec![],
            checks: vec![],
            dhparams: None,
        };
        let r = Report::new(
            vec![copy(Status::Warning), copy(Status::Critical)],
            0,
            Thresholds::default(),
        );
        assert_eq!((r.status, r.exit_code), (Status::Critical, 2));
        let r = Report::new(vec![], 0, Thresholds::default());
        assert_eq!(r.exit_code, 3, "no copy at all: cannot tell");
    }

    #[test]
    fn found_bytes_never_show_in_debug() {
        let f = Found::Bytes(b"-----BEGIN PRIVATE KEY-----secret".to_vec());
        assert!(!format!("{f:?}").contains("PRIVATE"));
    }
}
