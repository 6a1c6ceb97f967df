//! Prometheus metrics, named like cert-manager's (docs/install.md, Monitoring), served on `/metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::inspect::Report;

/// A label value escaped per the exposition format. prometheus-client 0.23 writes label values
/// verbatim, so a certificate subject holding `"` or a newline would forge series.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct LabelText(pub String);

impl From<&str> for LabelText {
    fn from(s: &str) -> Self {
        LabelText(s.to_string())
    }
}

impl From<String> for LabelText {
    fn from(s: String) -> Self {
        LabelText(s)
    }
}

impl EncodeLabelValue for LabelText {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(&escape_label_value(&self.0))
    }
}

/// `\` → `\\`, `"` → `\"`, newline → `\n`: the only escapes of the Prometheus text format and
/// OpenMetrics; every other character is a plain character there.
pub fn escape_label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    pub namespace: LabelText,
    pub secret: LabelText,
    pub key: LabelText,
    pub subject: LabelText,
    /// Tells apart the CAs of a bundle (old + new during a CA rotation, possibly of the same
    /// subject): one series per certificate.
    pub serial: LabelText,
}

/// One TMM target: its namespace and `kind/name` (e.g. `deployment/f5-tmm`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub namespace: LabelText,
    pub target: LabelText,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub not_after: Family<CertLabels, Gauge<i64>>,
    pub not_before: Family<CertLabels, Gauge<i64>>,
    pub ready: Family<CertLabels, Gauge<i64>>,
    /// No series until the first successful read: "unknown" must not look like "out of sync".
    pub in_sync: Family<Vec<(String, String)>, Gauge<i64>>,
    /// Per TMM target: 1 while it waits for a restart to pick up new materials (or is
    /// stopped by one), 0 when it runs what is deployed.
    pub tmm_restart_pending: Family<TargetLabels, Gauge<i64>>,
    /// Per TMM target: 1 when the workload exists and its rollout is complete.
    pub tmm_target_ready: Family<TargetLabels, Gauge<i64>>,
    pub rotations: Family<ResultLabels, Counter>,
    pub last_rotation: Gauge<i64>,
    /// 0 when no CA rotation runs, else its phase: 1 trust, 2 switch, 3 drop.
    pub rotation_phase: Gauge<i64>,
    pub reconcile_duration: Histogram,
    pub resident_memory: Gauge<i64>,
    pub cpu_seconds: Gauge<f64, AtomicU64>,
    pub start_time: Gauge<i64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            not_after: Family::default(),
            not_before: Family::default(),
            ready: Family::default(),
            in_sync: Family::default(),
            tmm_restart_pending: Family::default(),
            tmm_target_ready: Family::default(),
            rotations: Family::default(),
            last_rotation: Gauge::default(),
            rotation_phase: Gauge::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            resident_memory: Gauge::default(),
            cpu_seconds: Gauge::default(),
            start_time: Gauge::default(),
            registry: Registry::default(),
        };
        m.register(&mut registry);
        Metrics { registry, ..m }
    }

    /// One `register` per exported series with its help text: the list of what the agent exports.
    fn register(&self, registry: &mut Registry) {
        let m = self;
        registry.register(
            "dssm_rotation_phase",
            "The phase of the CA rotation in progress: 0 none, 1 trust (both CAs), 2 switch (new leaf), 3 drop (new CA only)",
            m.rotation_phase.clone(),
        );
        registry.register(
            "dssm_certificate_not_after_timestamp_seconds",
            "The notAfter of each deployed certificate, unix seconds",
            m.not_after.clone(),
        );
        registry.register(
            "dssm_certificate_not_before_timestamp_seconds",
            "The notBefore of each deployed certificate, unix seconds",
            m.not_before.clone(),
        );
        registry.register("dssm_certificate_ready", "1 when the certificate is in its validity period and its copy is usable: the leaf chains to a CA of the bundle and matches its key", m.ready.clone());
        registry.register(
            "dssm_secrets_in_sync",
            "1 when the copies in the dSSM and TMM namespaces are identical",
            m.in_sync.clone(),
        );
        registry.register(
            "dssm_tmm_restart_pending",
            "1 while the TMM target waits for a restart to pick up new materials (or is stopped by one)",
            m.tmm_restart_pending.clone(),
        );
        registry.register(
            "dssm_tmm_target_ready",
            "1 when the TMM target exists and its rollout is complete",
            m.tmm_target_ready.clone(),
        );
        registry.register(
            "dssm_rotation",
            "Rotations by result (success, failure)",
            m.rotations.clone(),
        );
        registry.register(
            "dssm_last_rotation_timestamp_seconds",
            "When the last successful rotation finished, unix seconds",
            m.last_rotation.clone(),
        );
        registry.register(
            "dssm_reconcile_duration_seconds",
            "Duration of an inspection or reconcile pass",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            m.resident_memory.clone(),
        );
        registry.register(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            m.cpu_seconds.clone(),
        );
        registry.register(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            m.start_time.clone(),
        );
    }

    /// Replaces the per-certificate series with what `report` found.
    pub fn record(&self, report: &Report) {
        self.not_after.clear();
        self.not_before.clear();
        self.ready.clear();
        for copy in &report.copies {
            let ns = copy
                .source
                .strip_prefix("namespace/")
                .unwrap_or(&copy.source)
                .to_string();
            for c in &copy.certificates {
                let labels = CertLabels {
                    namespace: ns.as_str().into(),
                    secret: crate::contract::CERTS_SECRET.into(),
                    key: c.file.into(),
                    subject: c.subject.as_str().into(),
                    serial: c.serial.as_str().into(),
                };
                let in_validity =
                    c.residual_seconds > 0 && !c.message.starts_with("not valid before");
                self.set_certificate(
                    &labels,
                    c.not_after_unix,
                    c.not_before_unix,
                    in_validity && copy.usable,
                );
            }
        }
        self.rotation_phase
            .set(report.rotation_phase.map_or(0, |p| p.number()));
        self.in_sync.clear();
        if let Some(in_sync) = report.in_sync {
            self.in_sync.get_or_create(&vec![]).set(i64::from(in_sync));
        }
    }

    /// Replaces the per-target series with what an observation found.
    pub fn record_targets(
        &self,
        workloads: &[(
            crate::model::targets::TmmTarget,
            Option<crate::model::targets::Workload>,
        )],
    ) {
        self.tmm_restart_pending.clear();
        self.tmm_target_ready.clear();
        for (t, w) in workloads {
            let labels = TargetLabels {
                namespace: t.namespace.as_str().into(),
                target: format!("{}/{}", t.kind.as_str(), t.name).into(),
            };
            let pending = w.as_ref().is_some_and(|w| {
                w.recorded().is_some()
                    || w.annotations()
                        .contains_key(crate::materials::annotations::RESTART_NEEDED)
            });
            let ready = w
                .as_ref()
                .is_some_and(|w| w.rollout_incomplete(t).is_none());
            self.tmm_restart_pending
                .get_or_create(&labels)
                .set(i64::from(pending));
            self.tmm_target_ready
                .get_or_create(&labels)
                .set(i64::from(ready));
        }
    }

    /// The three series of one certificate.
    pub fn set_certificate(
        &self,
        labels: &CertLabels,
        not_after: i64,
        not_before: i64,
        ready: bool,
    ) {
        self.not_after.get_or_create(labels).set(not_after);
        self.not_before.get_or_create(labels).set(not_before);
        self.ready.get_or_create(labels).set(i64::from(ready));
    }

    /// Process metrics, read from /proc at scrape time.
    pub fn sample_process(&self) {
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
            if let Some(pages) = statm
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<i64>().ok())
            {
                self.resident_memory.set(pages * 4096);
            }
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name (which may contain spaces): state is field 3.
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                // utime and stime are fields 14 and 15 (11 and 12 after the name); 100 Hz clock.
                self.cpu_seconds.set((ticks(11) + ticks(12)) / 100.0);
            }
        }
    }

    pub fn encode(&self) -> String {
        self.sample_process();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

/// One sample line of an exposition, label values unescaped.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A strict reader of the OpenMetrics text format as `/metrics` serves it: `# HELP`, `# TYPE`,
/// `# UNIT` lines, samples of declared families (no exemplars), no duplicate series, and `# EOF`
/// as the last line. Anything else is an error naming the line.
pub fn parse_exposition(text: &str) -> Result<Vec<Sample>, ExpositionError> {
    let body = text.strip_suffix("# EOF\n").ok_or(ExpositionError::NoEof)?;
    let mut families: Vec<String> = Vec::new();
    let mut samples: Vec<Sample> = Vec::new();
    for (n, line) in body.split_terminator('\n').enumerate() {
        let bad = |why: &str| ExpositionError::Line {
            number: n + 1,
            line: line.to_string(),
            why: why.to_string(),
        };
        if let Some(meta) = line.strip_prefix("# ") {
            let (kind, rest) = meta.split_once(' ').ok_or_else(|| bad("bare comment"))?;
            let (name, arg) = rest.split_once(' ').unwrap_or((rest, ""));
            check_metric_name(name).map_err(|e| bad(&e))?;
            match kind {
                "TYPE" => {
                    const TYPES: [&str; 8] = [
                        "counter",
                        "gauge",
                        "histogram",
                        "gaugehistogram",
                        "stateset",
                        "info",
                        "summary",
                        "unknown",
                    ];
                    if !TYPES.contains(&arg) {
                        return Err(bad("unknown type"));
                    }
                    if families.iter().any(|f| f == name) {
                        return Err(bad("family declared twice"));
                    }
                    families.push(name.to_string());
                }
                "HELP" | "UNIT" => {}
                _ => return Err(bad("unknown metadata line")),
            }
            continue;
        }
        let sample = parse_sample(line).map_err(|e| bad(&e))?;
        let declared = families.last().is_some_and(|f| {
            sample.name == *f
                || ["_total", "_bucket", "_count", "_sum", "_created", "_info"]
                    .iter()
                    .any(|suffix| sample.name.strip_suffix(suffix) == Some(f))
        });
        if !declared {
            return Err(bad("sample outside its family"));
        }
        if samples
            .iter()
            .any(|s| s.name == sample.name && s.labels == sample.labels)
        {
            return Err(bad("duplicate series"));
        }
        samples.push(sample);
    }
    Ok(samples)
}

/// Where an exposition breaks the format: the line (number and text) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExpositionError {
    #[error("the exposition does not end with `# EOF`")]
    NoEof,
    #[error("line {number}: {why}: {line:?}")]
    Line {
        number: usize,
        line: String,
        why: String,
    },
}

fn check_metric_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    if ok {
        Ok(())
    } else {
        Err(format!("bad metric name {name:?}"))
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or("no value after the metric name")?;
    let name = &line[..name_end];
    check_metric_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            if !labels.is_empty() {
                rest = rest
                    .strip_prefix(',')
                    .ok_or("labels not separated by a comma")?;
            }
            let (key, after) = rest.split_once("=\"").ok_or("a label without =\"")?;
            if key.is_empty()
                || !key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(format!("bad label name {key:?}"));
            }
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next().ok_or("unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        _ => return Err("a bad escape in a label value".into()),
                    },
                    (_, c) => value.push(c),
                }
            };
            if labels.iter().any(|(k, _)| k == key) {
                return Err(format!("label {key:?} twice"));
            }
            labels.push((key.to_string(), value));
            rest = &after[end + 1..];
        }
    }
    let rest = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let mut fields = rest.split(' ');
    let value = fields.next().unwrap_or_default();
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    if let Some(ts) = fields.next() {
        ts.parse::<f64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields (exemplars are not served)".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::materials::Bundle;
    use crate::pki::{self, CaSigner, KeyAlgorithm, LeafRequest, PrivateKey, SecretBytes, Subject};
    use time::OffsetDateTime;

    /// A CA of `subject` and a leaf it signs: (CA PEM, leaf PEM, leaf key).
    fn ca_and_leaf(subject: &str) -> (String, String, PrivateKey) {
        let now = OffsetDateTime::now_utc();
        let ca_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let ca = pki::issue_ca(&Subject::parse(subject).unwrap(), 3650, &ca_key, now).unwrap();
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let request = LeafRequest {
            subject: &Subject::parse("CN=Server").unwrap(),
            days: 365,
            dns_names: &[],
        };
        let signer = CaSigner {
            cert_pem: ca.as_bytes(),
            key: &ca_key,
            cert_name: "ca",
            key_name: "ca key",
        };
        let leaf = pki::issue_leaf(&request, &key, &signer, now).unwrap();
        (ca, leaf.pem, key)
    }

    fn series(text: &str, name: &str) -> Vec<Sample> {
        let samples = parse_exposition(text).unwrap();
        samples.into_iter().filter(|s| s.name == name).collect()
    }

    /// Issue 13: during a CA rotation the bundle holds two CAs of the same subject. Each has its
    /// own series (told apart by serial), and both are ready while the leaf chains to one.
    #[test]
    fn every_ca_of_a_bundle_has_its_own_series_and_is_ready_in_every_phase() {
        let (old, old_leaf, old_key) = ca_and_leaf("CN=Certificate Authority");
        let (new, new_leaf, new_key) = ca_and_leaf("CN=Certificate Authority");
        let bundle = |ca: String, leaf: &str, key: &PrivateKey| Bundle {
            ca_cert: ca.into_bytes(),
            leaf_cert: leaf.as_bytes().to_vec(),
            leaf_key: SecretBytes::new(key.to_pkcs8_pem()),
            dhparams: pki::dhparams::FFDHE2048_PEM.as_bytes().to_vec(),
        };
        let phases = [
            ("trust", bundle(old.clone() + &new, &old_leaf, &old_key), 2),
            ("switch", bundle(old.clone() + &new, &new_leaf, &new_key), 2),
            ("drop", bundle(new.clone(), &new_leaf, &new_key), 1),
            // The negative control: the old leaf behind the new CA alone does not chain.
            ("broken", bundle(new.clone(), &old_leaf, &old_key), 1),
        ];
        let now = OffsetDateTime::now_utc().unix_timestamp();
        for (phase, b, cas) in phases {
            let report = crate::inspect::Report::new(
                vec![crate::inspect::inspect(
                    &b.to_read_copy("spk-ingress"),
                    now,
                    Default::default(),
                )],
                now,
                Default::default(),
            );
            let m = Metrics::new();
            m.record(&report);
            let text = m.encode();
            let ready = series(&text, "dssm_certificate_ready");
            let ca_series: Vec<_> = ready
                .iter()
                .filter(|s| s.labels.contains(&("key".into(), "dssm-ca.crt".into())))
                .collect();
            assert_eq!(ca_series.len(), cas, "{phase}:\n{text}");
            let serials: std::collections::BTreeSet<_> = ca_series
                .iter()
                .map(|s| {
                    s.labels
                        .iter()
                        .find(|(k, _)| k == "serial")
                        .unwrap()
                        .1
                        .clone()
                })
                .collect();
            assert_eq!(serials.len(), cas, "{phase}: one serial per CA");
            let want = if phase == "broken" { 0.0 } else { 1.0 };
            assert!(ready.iter().all(|s| s.value == want), "{phase}:\n{text}");
            assert_eq!(ready.len(), cas + 1, "{phase}: the CAs and the leaf");
        }
    }
}
