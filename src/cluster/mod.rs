//! The only code that talks to the Kubernetes API (kube-rs): the Secrets in both namespaces, the
//! CA key Secret, the TMM Deployment, the Lease and Events. Every call names the object it
//! touches in its errors and retries what is transient (429, 5xx, transport) with backoff.

pub mod doctor;
pub mod lease;
pub mod workloads;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::PostParams;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};

use crate::contract;
use crate::materials::{annotations, CopyObs, Owner, SecretObs};

/// Attempts for a call that fails transiently, and the first backoff (doubled each time).
pub const ATTEMPTS: u32 = 5;
pub const FIRST_BACKOFF: Duration = Duration::from_millis(200);

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
    #[error("{0} not found (or its namespace does not exist): every TMM target must exist before its materials are replaced; nothing was written (check --tmm, or --tmm-namespace / --tmm-deployment)")]
    NoWorkload(crate::targets::TmmTarget),
}

impl ClusterError {
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
pub async fn call<T, F, Fut>(verb: &'static str, what: &str, f: F) -> Result<T, ClusterError>
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

/// Where dssm-certs works: the flags of DESIGN §3.
#[derive(Debug, Clone)]
pub struct Target {
    pub dssm_namespace: Option<String>,
    /// `--tmm` targets; when empty, the shorthand below names one Deployment.
    pub tmm: Vec<crate::targets::TmmTarget>,
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
    pub client: Client,
    pub dssm_ns: String,
    /// Every TMM workload that talks to dSSM (at least one).
    pub targets: Vec<crate::targets::TmmTarget>,
    pub dssm_selector: String,
    pub identity: String,
    pub lease_seconds: i32,
    pub max_clock_skew: i64,
    recorder: Recorder,
}

/// What one observation found, with the raw Secrets for writing back.
#[derive(Clone)]
pub struct Observation {
    /// dSSM namespace first, then TMM's when it differs.
    pub copies: Vec<CopyObs>,
    pub store: SecretObs,
    pub raw: BTreeMap<(String, String), Secret>,
    /// Every TMM target and its workload (None: not found).
    pub workloads: Vec<(crate::targets::TmmTarget, Option<crate::targets::Workload>)>,
    /// False when the CA key Secret could not be read (403, the agent's read-only account):
    /// `store` is then `Missing` and means "not available", not "absent".
    pub store_readable: bool,
}

impl Observation {
    /// Some TMM target says new materials wait for a restart, or holds a restart record.
    pub fn restart_pending(&self) -> bool {
        self.workloads.iter().any(|(_, w)| {
            w.as_ref().is_some_and(|w| {
                w.recorded().is_some() || w.annotations().contains_key(annotations::RESTART_NEEDED)
            })
        })
    }

    /// Some TMM target holds a restart record (it is stopped, or being stopped).
    pub fn restart_recorded(&self) -> bool {
        self.workloads
            .iter()
            .any(|(_, w)| w.as_ref().is_some_and(|w| w.recorded().is_some()))
    }

    /// The first TMM target that does not exist.
    pub fn missing_target(&self) -> Option<&crate::targets::TmmTarget> {
        self.workloads
            .iter()
            .find(|(_, w)| w.is_none())
            .map(|(t, _)| t)
    }
}

/// The raw Secrets hold private keys: `Debug` names them and their keys, never their data.
/// What was read holds the leaf key (and the CA key): wiped when the observation goes.
impl Drop for Observation {
    fn drop(&mut self) {
        self.wipe();
    }
}

impl Observation {
    /// Overwrites every Secret value read with zeros (`zeroize`: not optimised away).
    fn wipe(&mut self) {
        use zeroize::Zeroize;
        for secret in self.raw.values_mut() {
            for value in secret.data.iter_mut().flat_map(|d| d.values_mut()) {
                value.0.zeroize();
            }
        }
        let copies = self
            .copies
            .iter_mut()
            .flat_map(|c| [&mut c.certs, &mut c.keys]);
        for obs in copies.chain([&mut self.store]) {
            if let SecretObs::Present { data, .. } = obs {
                data.values_mut().for_each(Zeroize::zeroize);
            }
        }
    }
}

impl std::fmt::Debug for Observation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let raw: Vec<String> = self
            .raw
            .iter()
            .map(|((ns, name), s)| {
                let keys: Vec<&String> = s.data.iter().flat_map(|d| d.keys()).collect();
                format!("{ns}/{name} {keys:?}")
            })
            .collect();
        f.debug_struct("Observation")
            .field("copies", &self.copies)
            .field("store", &self.store)
            .field("raw", &raw)
            .field(
                "workloads",
                &self
                    .workloads
                    .iter()
                    .map(|(t, w)| (t.to_string(), w.is_some()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn owner_of(s: &Secret) -> Owner {
    let labels = s.labels();
    match labels.get(annotations::MANAGED_BY).map(String::as_str) {
        Some(annotations::MANAGER) => Owner::Us,
        Some(other) => Owner::Other(format!(
            "{other} (label {}={other})",
            annotations::MANAGED_BY
        )),
        None => match s.owner_references().first() {
            Some(o) => Owner::Other(format!("{} {} (owner reference)", o.kind, o.name)),
            None => Owner::Nobody,
        },
    }
}

pub fn secret_obs(s: Option<&Secret>) -> SecretObs {
    match s {
        None => SecretObs::Missing,
        Some(s) => SecretObs::Present {
            data: s
                .data
                .as_ref()
                .map(|d| d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
                .unwrap_or_default(),
            owner: owner_of(s),
            annotations: s.annotations().clone(),
        },
    }
}

impl Cluster {
    pub async fn connect(t: &Target) -> Result<Self, ClusterError> {
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
        let targets = crate::targets::resolve(
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
        for ns in crate::targets::namespaces(&self.targets) {
            if !v.contains(&ns) {
                v.push(ns);
            }
        }
        v
    }

    /// The TMM namespaces, each once, in target order.
    pub fn tmm_namespaces(&self) -> Vec<String> {
        crate::targets::namespaces(&self.targets)
    }

    pub async fn get_secret(&self, ns: &str, name: &str) -> Result<Option<Secret>, ClusterError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        call("get", &format!("secret {ns}/{name}"), || api.get_opt(name)).await
    }

    /// Reads every Secret of every copy, the CA key Secret and every TMM workload: 2 reads per
    /// namespace, 1 per target, plus 1.
    pub async fn observe(&self) -> Result<Observation, ClusterError> {
        self.observe_inner(false).await
    }

    /// `observe` for the agent, whose own ServiceAccount may not read the CA key Secret: a 403
    /// on that one Secret leaves the store out (`store_readable: false`) instead of failing.
    pub async fn observe_without_ca_key(&self) -> Result<Observation, ClusterError> {
        self.observe_inner(true).await
    }

    async fn observe_inner(
        &self,
        ca_key_may_be_forbidden: bool,
    ) -> Result<Observation, ClusterError> {
        let mut raw = BTreeMap::new();
        let mut copies = Vec::new();
        for ns in self.namespaces() {
            let certs = self.get_secret(&ns, contract::CERTS_SECRET).await?;
            let keys = self.get_secret(&ns, contract::KEYS_SECRET).await?;
            copies.push(CopyObs {
                namespace: ns.clone(),
                certs: secret_obs(certs.as_ref()),
                keys: secret_obs(keys.as_ref()),
            });
            for (name, s) in [
                (contract::CERTS_SECRET, certs),
                (contract::KEYS_SECRET, keys),
            ] {
                if let Some(s) = s {
                    raw.insert((ns.clone(), name.to_string()), s);
                }
            }
        }
        let (store, store_readable) = match self
            .get_secret(&self.dssm_ns, contract::CA_KEY_SECRET)
            .await
        {
            Err(ClusterError::Forbidden { .. }) if ca_key_may_be_forbidden => (None, false),
            r => (r?, true),
        };
        let store_obs = secret_obs(store.as_ref());
        if let Some(s) = store {
            raw.insert(
                (self.dssm_ns.clone(), contract::CA_KEY_SECRET.to_string()),
                s,
            );
        }
        let mut workloads = Vec::new();
        for t in &self.targets {
            workloads.push((t.clone(), self.get_workload(t).await?));
        }
        Ok(Observation {
            copies,
            store: store_obs,
            raw,
            workloads,
            store_readable,
        })
    }

    /// Creates the Secret, or replaces it if `existing` is given (optimistic concurrency: a
    /// change since it was read is a 409 Conflict). Refuses Secrets managed by someone else.
    pub async fn write_secret(
        &self,
        ns: &str,
        name: &str,
        data: BTreeMap<String, Vec<u8>>,
        annotations: BTreeMap<String, String>,
        existing: Option<&Secret>,
    ) -> Result<Secret, ClusterError> {
        let what = format!("secret {ns}/{name}");
        if let Some(Owner::Other(owner)) = existing.map(owner_of) {
            return Err(ClusterError::NotOurs { what, owner });
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let mut s = existing.cloned().unwrap_or_default();
        s.metadata.name = Some(name.to_string());
        s.metadata.namespace = Some(ns.to_string());
        s.metadata.managed_fields = None;
        s.labels_mut()
            .insert(annotations::MANAGED_BY.into(), annotations::MANAGER.into());
        let ann = s.annotations_mut();
        ann.retain(|k, _| {
            !k.starts_with(annotations::PREFIX)
                && k != "kubectl.kubernetes.io/last-applied-configuration"
        });
        ann.extend(annotations);
        s.type_ = Some("Opaque".into());
        s.string_data = None;
        s.data = Some(data.into_iter().map(|(k, v)| (k, ByteString(v))).collect());
        let pp = PostParams {
            field_manager: Some("dssm-certs".into()),
            ..Default::default()
        };
        if existing.is_some() {
            call("update", &what, || api.replace(name, &pp, &s)).await
        } else {
            call("create", &what, || api.create(&pp, &s)).await
        }
    }

    /// Publishes an Event about `secret` (best effort: a failure is logged, never fatal).
    pub async fn event(&self, secret: &Secret, warning: bool, reason: &str, note: String) {
        self.event_on(secret, warning, reason, note).await
    }

    /// Publishes an Event about any object (best effort).
    pub async fn event_on<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            let error = describe(&e);
            tracing::warn!(reason, error, "could not publish an Event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_an_observation_never_shows_secret_data() {
        let key = b"-----BEGIN PRIVATE KEY-----\nTOPSECRETKEYBYTES\n".to_vec();
        let mut secret = Secret::default();
        secret.metadata.name = Some(contract::KEYS_SECRET.into());
        secret.data = Some(
            [(contract::LEAF_KEY.to_string(), ByteString(key.clone()))]
                .into_iter()
                .collect(),
        );
        let obs = Observation {
            copies: vec![CopyObs {
                namespace: "spk-utilities".into(),
                certs: SecretObs::Missing,
                keys: secret_obs(Some(&secret)),
            }],
            store: SecretObs::Missing,
            raw: [(
                (
                    "spk-utilities".to_string(),
                    contract::KEYS_SECRET.to_string(),
                ),
                secret,
            )]
            .into_iter()
            .collect(),
            workloads: Vec::new(),
            store_readable: true,
        };
        let shown = format!("{obs:?}");
        let as_numbers = format!("{:?}", &key[..8]);
        let as_numbers = as_numbers.trim_matches(['[', ']']);
        assert!(!shown.contains("TOPSECRET"), "{shown}");
        assert!(!shown.contains(as_numbers), "{shown}");
        assert!(
            shown.contains(contract::LEAF_KEY),
            "the key name is shown: {shown}"
        );

        // Dropping an observation wipes what it read (the drop runs `wipe`).
        let mut obs = obs;
        obs.wipe();
        let raw = obs.raw.values().next().unwrap().data.as_ref().unwrap();
        assert!(raw[contract::LEAF_KEY].0.iter().all(|b| *b == 0));
        let SecretObs::Present { data, .. } = &obs.copies[0].keys else {
            panic!("present")
        };
        assert!(data[contract::LEAF_KEY].iter().all(|b| *b == 0));
    }
}
