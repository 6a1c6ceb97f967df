//! The only code that talks to the Kubernetes API (kube-rs), one file per what it touches:
//! `secrets` (both copies and the CA key Secret), `observe` (all of them and the TMM targets in
//! one pass), `workloads` (the TMM targets), `pods` (dSSM pods, evictions, PDBs), `watch`,
//! `lease`, `events` (the one reporter) and `doctor`'s reads. This file: the connection and
//! `call`, which names the object in every error and retries what is transient (429, 5xx,
//! transport) with backoff.

pub mod doctor;
pub mod events;
pub mod lease;
pub mod observe;
pub mod pods;
pub mod secrets;
pub mod watch;
pub mod workloads;

use std::future::Future;
use std::time::Duration;

use kube::runtime::events::{Recorder, Reporter};
use kube::Client;

/// Object metadata accessors (`name_any`, `uid`, `labels`) for the objects this module returns:
/// not an API call.
pub use kube::ResourceExt;
pub use observe::Observation;
pub use secrets::secret_obs;

/// Attempts for a call that fails transiently, and the first backoff (doubled each time).
pub const ATTEMPTS: u32 = 5;
pub const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// How long a wait pauses after `call` gave up on a transient error before it tries again (the
/// wait's deadline bounds it): an API outage never ends a wait early.
pub const WAIT_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    Config(String),
    #[error("cannot {verb} {what}: forbidden: {message}")]
    Forbidden {
        verb: &'static str,
        what: String,
        message: String,
    },
    #[error("cannot {verb} {what}: not found: {message}")]
    NotFound {
        verb: &'static str,
        what: String,
        message: String,
    },
    #[error("cannot {verb} {what}: conflict: {message}")]
    Conflict {
        verb: &'static str,
        what: String,
        message: String,
    },
    #[error("cannot {verb} {what}: the API server answered {code} {reason}: {message} (after {attempts} attempts)")]
    Api {
        verb: &'static str,
        what: String,
        code: u16,
        reason: String,
        message: String,
        attempts: u32,
    },
    #[error(
        "cannot {verb} {what}: the API server is unreachable: {detail} (after {attempts} attempts)"
    )]
    Unreachable {
        verb: &'static str,
        what: String,
        detail: String,
        attempts: u32,
    },
    #[error("{what} is managed by {owner}, not dssm-certs: refusing to overwrite it. Remove its app.kubernetes.io/managed-by label (or owner reference) or delete it to let dssm-certs manage it")]
    NotOurs { what: String, owner: String },
    #[error("{0}")]
    Locked(String),
    #[error("{0} could not be renewed within its renew deadline (or was taken over): stopped before it could expire for another dssm-certs. The next run (or the agent) finishes or rolls back what this one started")]
    LeaseLost(String),
    #[error("pod {pod} could not be evicted before the deadline (--wait-timeout): a PodDisruptionBudget allows no disruption ({message})")]
    EvictionBlocked { pod: String, message: String },
    #[error("{0} not found (or its namespace does not exist): every TMM target must exist before its materials are replaced; nothing was written (check --tmm, or --tmm-namespace / --tmm-deployment)")]
    NoWorkload(crate::model::targets::TmmTarget),
}

impl ClusterError {
    /// An error a wait outlives until its deadline: the API server overloaded (429), failing
    /// (5xx) or unreachable, after `call`'s own retries.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ClusterError::Api {
                code: 429 | 500..=504,
                ..
            } | ClusterError::Unreachable { .. }
        )
    }

    pub fn is_conflict(&self) -> bool {
        matches!(self, ClusterError::Conflict { .. })
    }
}

fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => matches!(s.code, 429 | 500 | 502 | 503 | 504),
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

/// Runs `f`, retrying transient failures with exponential backoff; maps the final error to one
/// that names `verb` and `what`.
async fn call<T, F, Fut>(verb: &'static str, what: &str, f: F) -> Result<T, ClusterError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) && attempt < ATTEMPTS => {
                let error = describe(&e);
                tracing::warn!(verb, what, attempt, error, "transient API error, retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
            Err(e) => {
                let what = what.to_string();
                return Err(match e {
                    kube::Error::Api(s) => match s.code {
                        403 => ClusterError::Forbidden {
                            verb,
                            what,
                            message: status_message(&s),
                        },
                        404 => ClusterError::NotFound {
                            verb,
                            what,
                            message: status_message(&s),
                        },
                        409 => ClusterError::Conflict {
                            verb,
                            what,
                            message: status_message(&s),
                        },
                        code => ClusterError::Api {
                            verb,
                            what,
                            code,
                            reason: one_line(&s.reason, 80),
                            message: status_message(&s),
                            attempts: attempt,
                        },
                    },
                    other => ClusterError::Unreachable {
                        verb,
                        what,
                        detail: describe(&other),
                        attempts: attempt,
                    },
                });
            }
        }
    }
}

/// At most `max` characters of `s`, on one line: error text from the far side is not ours to
/// print whole (a proxy's HTML page, a multi-line dump).
fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    match flat.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &flat[..cut]),
        None => flat,
    }
}

/// The Status message of an API error; a body that was not a Kubernetes Status (kube-rs puts it
/// in the message whole) is only described.
fn status_message(s: &kube::core::Status) -> String {
    if s.reason == "Failed to parse error data" {
        format!(
            "the answer was not a Kubernetes Status (HTTP {}; a proxy in between?)",
            s.code
        )
    } else {
        one_line(&s.message, 300)
    }
}

/// A transport or client error in one short line: the innermost cause (e.g. "Connection refused
/// (os error 111)"), not kube-rs's nested chain.
pub(crate) fn describe(e: &dyn std::error::Error) -> String {
    let text = root_cause(e);
    let text = if text.is_empty() || text == "deadline has elapsed" {
        "timed out".to_string()
    } else {
        text
    };
    one_line(&text, 200)
}

/// One line saying where a Kubernetes configuration was looked for and why each place failed.
fn no_config(e: &kube::config::InferConfigError) -> String {
    let kubeconfig = match std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        Some(v) => {
            let v = v.to_string_lossy().into_owned();
            let missing: Vec<&str> = v
                .split(':')
                .filter(|p| !p.is_empty() && !std::path::Path::new(p).exists())
                .collect();
            if missing.is_empty() {
                format!(
                    "KUBECONFIG={v} is not a usable kubeconfig ({})",
                    describe_config(e)
                )
            } else {
                format!("KUBECONFIG={v}: {} does not exist", missing.join(", "))
            }
        }
        None => match std::env::var_os("HOME").map(std::path::PathBuf::from) {
            Some(home) if home.join(".kube/config").exists() => format!(
                "KUBECONFIG is not set, and ~/.kube/config is not a usable kubeconfig ({})",
                describe_config(e)
            ),
            _ => "KUBECONFIG is not set, ~/.kube/config does not exist".to_string(),
        },
    };
    let in_cluster = if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
        "not in a pod (KUBERNETES_SERVICE_HOST is not set)"
    } else {
        "the in-cluster service account token or CA is unreadable"
    };
    format!("no Kubernetes configuration found: {kubeconfig}, and {in_cluster}")
}

fn describe_config(e: &kube::config::InferConfigError) -> String {
    one_line(&root_cause(e), 160)
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut root = e;
    while let Some(next) = root.source() {
        root = next;
    }
    root.to_string()
}

/// Where dssm-certs works: the cluster flags of docs/commands.md.
#[derive(Debug, Clone)]
pub struct Settings {
    pub dssm_namespace: Option<String>,
    /// `--tmm` targets; when empty, the shorthand below names one Deployment.
    pub tmm: Vec<crate::model::targets::TmmTarget>,
    pub tmm_namespace: Option<String>,
    pub tmm_deployment: String,
    pub dssm_selector: String,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Lease duration (client-go's timings derive from it; see `lease::Timing`).
    pub lease_seconds: i32,
    /// How far apart two machines' clocks may be (`--max-clock-skew`).
    pub max_clock_skew: i64,
}

pub struct Cluster {
    client: Client,
    pub dssm_ns: String,
    /// Every TMM workload that talks to dSSM (at least one).
    pub targets: Vec<crate::model::targets::TmmTarget>,
    pub dssm_selector: String,
    pub identity: String,
    pub lease_seconds: i32,
    pub max_clock_skew: i64,
    recorder: Recorder,
}

impl Cluster {
    pub async fn connect(t: &Settings) -> Result<Self, ClusterError> {
        let mut config = kube::Config::infer()
            .await
            .map_err(|e| ClusterError::Config(no_config(&e)))?;
        config.read_timeout = Some(t.timeout);
        config.write_timeout = Some(t.timeout);
        config.connect_timeout = Some(t.timeout);
        // Our `call` retries (and says which object it was retrying); kube's own retry layer
        // would multiply the attempts and hide them.
        config.default_retry = false;
        let dssm_ns = t
            .dssm_namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let targets = crate::model::targets::resolve(
            &t.tmm,
            t.tmm_namespace.as_deref(),
            &t.tmm_deployment,
            &dssm_ns,
        );
        let client = Client::try_from(config).map_err(|e| {
            ClusterError::Config(format!(
                "cannot set up the Kubernetes client: {}",
                describe(&e)
            ))
        })?;
        let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_else(|_| "dssm-certs".into());
            format!("{}-{}", host.trim(), std::process::id())
        });
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "f5.com/dssm-certs".into(),
                instance: Some(identity.clone()),
            },
        );
        Ok(Cluster {
            client,
            dssm_ns,
            targets,
            dssm_selector: t.dssm_selector.clone(),
            identity,
            lease_seconds: t.lease_seconds.max(1),
            max_clock_skew: t.max_clock_skew.max(0),
            recorder,
        })
    }

    /// The namespaces holding copies: dSSM's first, then every TMM target's namespace that
    /// differs (SPK: one per ingress instance), each once.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v = vec![self.dssm_ns.clone()];
        for ns in crate::model::targets::namespaces(&self.targets) {
            if !v.contains(&ns) {
                v.push(ns);
            }
        }
        v
    }

    /// The TMM namespaces, each once, in target order.
    pub fn tmm_namespaces(&self) -> Vec<String> {
        crate::model::targets::namespaces(&self.targets)
    }
}
