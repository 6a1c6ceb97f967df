//! `check`: what is deployed, how long it has left, and whether it fits together. Building the
//! report is pure (materials + clock in, report out); reading files and printing are the shell.

use serde::Serialize;

pub use crate::checks::printable;
pub use crate::checks::{format_residual, Status, Thresholds};
use crate::checks::{CertFinding, CopyFindings, Finding};
use crate::materials::{Place, ReadCopy};
use crate::pki::format_time;

/// The JSON schema identifier; bump it only with an incompatible change.
pub const SCHEMA: &str = "dssm-certs.check/v1";

#[derive(Debug, Clone, Serialize)]
pub struct CertReport {
    pub file: &'static str,
    /// Position of a CA in a bundle of several (1-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
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
    /// What it is about: a file, a Secret key, or the copies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<Place>,
}

impl From<&Finding> for CheckResult {
    fn from(f: &Finding) -> Self {
        CheckResult {
            name: f.check.name(),
            status: f.status,
            message: f.message.clone(),
            object: Some(f.object.clone()),
        }
    }
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
    /// No finding makes this copy unusable for TLS now (what `reconcile` would repair).
    pub usable: bool,
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
    pub rotation_phase: Option<crate::model::rotation::Phase>,
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
    pub fn with_sync(mut self, sources: &[ReadCopy]) -> Self {
        if sources.len() < 2 {
            self.in_sync = Some(true);
            return self;
        }
        let finding = crate::checks::judge_drift(sources);
        self.in_sync = Some(finding.status == Status::Ok);
        self.status = self.status.max(finding.status);
        self.exit_code = self.status.exit_code();
        self.checks.push(CheckResult::from(&finding));
        self
    }
}

impl Report {
    /// Adds one `tmm-target` check per TMM target (cluster): a missing one is critical (a
    /// rotation would refuse before writing); one stopped by an interrupted restart is a
    /// warning (TMM is down until the next run restores it); else ok, saying whether new
    /// materials wait for its restart.
    pub fn with_targets(
        mut self,
        workloads: &[(
            crate::model::targets::TmmTarget,
            Option<crate::model::targets::Workload>,
        )],
    ) -> Self {
        for (t, w) in workloads {
            let (status, message) = match w {
                None => (
                    Status::Critical,
                    format!("{t} not found (or its namespace does not exist): a rotation would refuse before writing"),
                ),
                Some(w) => match (w.recorded(), w.annotations().get(crate::materials::annotations::RESTART_NEEDED)) {
                    (Some(n), _) => (
                        Status::Warning,
                        format!("{t} is stopped by an interrupted restart (recorded {n}): the next reconcile or restart brings it back"),
                    ),
                    (None, Some(revision)) => (
                        Status::Ok,
                        format!("{t}: new materials (revision {revision}) wait for its restart"),
                    ),
                    (None, None) => (
                        Status::Ok,
                        match w.rollout_incomplete(t) {
                            Some(why) => why,
                            None => format!("{t}: rolled out, {} available", w.available()),
                        },
                    ),
                },
            };
            self.status = self.status.max(status);
            self.exit_code = self.status.exit_code();
            self.checks.push(CheckResult {
                name: "tmm-target",
                status,
                message,
                object: None,
            });
        }
        self
    }
}

/// One namespace's copy, from its Secrets (and the CA key Secret in the dSSM namespace).
/// The report over what the cluster holds. DH_check and the signature checks take CPU time
/// (seconds for large DH moduli), so they run on the blocking pool, off the async runtime.
pub async fn inspect_observation(
    obs: &crate::model::observation::Observation,
    dssm_ns: &str,
    now: i64,
    t: Thresholds,
    keys: KeyMatch,
) -> Report {
    let sources: Vec<ReadCopy> = obs
        .copies
        .iter()
        .map(|c| {
            // An unreadable CA key Secret (the agent may not read the CA key) is left out, not "absent".
            let ca_key_secret = (c.namespace == dssm_ns && obs.ca_key_secret_readable)
                .then_some(&obs.ca_key_secret);
            let mut s = c.to_read_copy(ca_key_secret);
            if let KeyMatch::Judged(_) = keys {
                // Not read, so not "not found": left out, as the CA key is when it lives elsewhere.
                s.entries.retain(|e| e.file != crate::contract::LEAF_KEY);
            }
            s
        })
        .collect();
    let judged = match keys {
        KeyMatch::FromKeySecret => vec![None; sources.len()],
        KeyMatch::Judged(v) => v,
    };
    let rotation_phase = crate::model::rotation::phase_on_copies(obs, dssm_ns);
    let ca_key_secret = obs
        .ca_key_secret_readable
        .then(|| obs.ca_key_secret.clone());
    let dssm_ns = dssm_ns.to_string();
    tokio::task::spawn_blocking(move || {
        // Each copy's CAs against the stored ones, when the CA key Secret can be read.
        let ca_key_secret =
            ca_key_secret.map(|s| crate::plan::evaluate_ca_key_secret(&s, &dssm_ns, now));
        let anchors = ca_key_secret.as_ref().and_then(|s| s.anchors());
        let copies = (sources.iter().zip(judged))
            .map(|(s, key)| {
                let mut f = crate::checks::judge_copy(s, now, t);
                if let Some(a) = anchors {
                    crate::checks::judge_anchors(&mut f, a);
                }
                let mut copy = report_copy(&f, now);
                if let Some(m) = key {
                    copy.status = copy.status.max(m.status);
                    copy.usable &= m.status != Status::Critical;
                    copy.checks.push(m);
                }
                copy
            })
            .collect();
        let mut report = Report::new(copies, now, t).with_sync(&sources);
        report.rotation_phase = rotation_phase;
        report
    })
    .await
    .expect("the inspection panicked")
}

/// How a report judges each copy's key against its certificate.
pub enum KeyMatch {
    /// From the key Secret, as read (`check`, `doctor`).
    FromKeySecret,
    /// Judged without reading the key Secret (the agent: `agent::key_match`), one result per
    /// copy of the observation, in order; the key files are left out of the report.
    Judged(Vec<Option<CheckResult>>),
}

/// One copy's report, from the findings about it.
pub fn report_copy(f: &CopyFindings, now: i64) -> CopyReport {
    CopyReport {
        source: f.label.clone(),
        status: f.status(),
        usable: f.usable(),
        certificates: f.certificates.iter().map(|c| cert_report(c, now)).collect(),
        checks: f.findings.iter().map(CheckResult::from).collect(),
        dhparams: f
            .dhparams
            .map(|(bits, generator)| DhReport { bits, generator }),
    }
}

fn cert_report(f: &CertFinding, now: i64) -> CertReport {
    let c = &f.cert;
    CertReport {
        file: f.file,
        index: f.index,
        location: f.place.to_string(),
        role: f.role(),
        status: f.validity.status,
        message: f.validity.message.clone(),
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

/// `check --dir DIR`: the copy in a folder; a path that is not a folder cannot tell.
pub fn inspect_dir(dir: &std::path::Path, now: i64, t: Thresholds) -> CopyReport {
    let message = if !dir.exists() {
        format!(
            "{}: no such directory; --dir takes the folder holding the materials ({}, ...)",
            dir.display(),
            crate::materials::CA_CERT
        )
    } else {
        format!(
            "{}: not a directory; --dir takes a folder, not a file",
            dir.display()
        )
    };
    if dir.is_dir() {
        // No CA key Secret here: say what can be said of a bundle's CAs without it.
        let mut f = crate::checks::judge_copy(&crate::materials::read_dir(dir), now, t);
        crate::checks::judge_unanchored(&mut f);
        return report_copy(&f, now);
    }
    CopyReport {
        source: format!("dir:{}", dir.display()),
        status: Status::Unknown,
        usable: false,
        certificates: vec![],
        checks: vec![CheckResult {
            name: crate::checks::Check::Read.name(),
            status: Status::Unknown,
            message,
            object: Some(Place::File {
                path: dir.display().to_string(),
            }),
        }],
        dhparams: None,
    }
}

/// Inspects one copy of the materials at time `now` (unix seconds).
pub fn inspect(source: &ReadCopy, now: i64, t: Thresholds) -> CopyReport {
    report_copy(&crate::checks::judge_copy(source, now, t), now)
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
        out.push_str(&format!(
            "{} — {}\n\n",
            printable(&copy.source),
            copy.status
        ));
        if !copy.certificates.is_empty() {
            render_certificates(copy, &mut out);
        }
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

/// One copy's certificates: the table, then a line of facts per certificate.
fn render_certificates(copy: &CopyReport, out: &mut String) {
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
            cert_name(c),
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
            cert_name(c),
            printable(&c.subject),
            c.serial,
            key_label(c),
            c.signature_algorithm,
            c.version,
            printable(&c.message)
        ));
    }
    out.push('\n');
}

/// `dssm-ca.crt`, or `dssm-ca.crt #2` for the second CA of a bundle: one line per CA.
fn cert_name(c: &CertReport) -> String {
    match c.index {
        Some(i) => format!("{} #{i}", c.file),
        None => c.file.to_string(),
    }
}

fn key_label(c: &CertReport) -> String {
    if c.key_type == "RSA" {
        format!("RSA {}", c.key_bits)
    } else {
        c.key_type.clone()
    }
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
    fn the_worst_status_wins_and_cannot_tell_outranks_a_warning() {
        assert!(Status::Ok < Status::Warning);
        assert!(Status::Warning < Status::Unknown);
        assert!(Status::Unknown < Status::Critical);
        let copy = |status| CopyReport {
            source: "x".into(),
            status,
            usable: true,
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
}
