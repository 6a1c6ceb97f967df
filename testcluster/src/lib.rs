//! The test cluster: an in-process Kubernetes API server over HTTPS for the integration tests.
//! The real `dssm-certs` binary and the real `kubectl` talk to it through a kubeconfig. It speaks
//! the wire protocol of what the program uses (`logic`: selectors and patches; `routes`: paths,
//! verbs, Status errors, subresources; `watch`: the watch cache), simulates the controllers that
//! restarts depend on (`controllers`: kubelet, Deployment, StatefulSet, DaemonSet;
//! `disruption`: PodDisruptionBudgets and the eviction subresource), records every request,
//! injects faults (`faults`), and enforces RBAC read from the project's own Roles (`rbac`).
//!
//! Simplifications, on purpose: core/v1 and events.k8s.io/v1 Events are separate stores (the real
//! server shows one store through both APIs); no admission, no finalizers, no OpenAPI (kubectl
//! needs `--validate=false`); a Table is never returned (kubectl prints its default columns);
//! ReplicaSets and ControllerRevisions are not objects (pods of a Deployment name it as their
//! owner; revisions are a hash of the pod template).

pub mod controllers;
pub mod disruption;
pub mod faults;
pub mod logic;
mod protobuf;
pub mod rbac;
pub mod refusal;
pub mod routes;
pub mod store;
pub mod watch;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use tokio::sync::Notify;

pub use faults::{Fault, WatchFault};
pub use rbac::{attributes, rbac_from_manifests, Rule};
pub use routes::status_error;
pub use store::{
    resource, Recorded, Resource, State, Timing, PROMETHEUS_OPERATOR_GROUP, RESOURCES,
};

/// How the pods of `ApiServer::install_dssm_mounting` mount our two Secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretMount {
    /// No volume.
    None,
    /// Directory volumes, not optional: the pod waits for the Secrets.
    Required,
    /// Directory volumes with `optional: true`: the pod runs without them.
    Optional,
}

impl SecretMount {
    /// A pod spec with one container `name` mounting the Secrets as `self` says, at the paths
    /// TMM mounts them (/etc/ssl/certs, /etc/ssl/private).
    fn pod_spec(self, name: &str, image: &str) -> Value {
        let mut container = json!({"name": name, "image": image});
        if self == SecretMount::None {
            return json!({"containers": [container]});
        }
        let optional = self == SecretMount::Optional;
        container["volumeMounts"] = json!([
            {"name": "dssm-certs", "mountPath": "/etc/ssl/certs", "readOnly": true},
            {"name": "dssm-keys", "mountPath": "/etc/ssl/private", "readOnly": true}]);
        json!({"containers": [container], "volumes": [
            {"name": "dssm-certs", "secret": {"secretName": "dssm-certs-secret", "optional": optional}},
            {"name": "dssm-keys", "secret": {"secretName": "dssm-keys-secret", "optional": optional}}]})
    }
}

pub const ADMIN_TOKEN: &str = "admin-token";
pub const SA_TOKEN: &str = "dssm-certs-sa-token";
/// The agent's own read-only ServiceAccount (`dssm-certs-agent`, next to `dssm-certs`).
pub const AGENT_TOKEN: &str = "dssm-certs-agent-sa-token";

/// The running server. Dropping it stops it.
pub struct ApiServer {
    pub url: String,
    pub ca_pem: String,
    pub state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Stops serving (the API server "goes away"); later requests are refused.
    pub fn stop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// See `ApiServer::handle`.
#[derive(Clone)]
pub struct StateHandle {
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
}

impl StateHandle {
    pub fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.state.lock().unwrap());
        self.notify.notify_waiters();
        out
    }
}

pub(crate) struct Shared {
    pub(crate) state: Arc<Mutex<State>>,
    pub(crate) notify: Arc<Notify>,
}

impl ApiServer {
    pub fn start(namespaces: &[&str], sa_user: &str) -> ApiServer {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test-apiserver-ca");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let ca_issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .unwrap();
        let cert = params.signed_by(&key, &ca_issuer).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let mut state = State::new(sa_user);
        for ns in namespaces {
            state.put(&RESOURCES[0], "", json!({"metadata": {"name": ns}, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}));
        }
        let state = Arc::new(Mutex::new(state));
        let notify = Arc::new(Notify::new());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let shared = Arc::new(Shared {
            state: state.clone(),
            notify: notify.clone(),
        });
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
                let ctl = shared.clone();
                tokio::spawn(async move {
                    let mut last = controllers::LastPass::new();
                    loop {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        controllers::run(&ctl, &mut last);
                    }
                });
                loop {
                    tokio::select! {
                        _ = &mut rx => break,
                        accepted = listener.accept() => {
                            let Ok((tcp, _)) = accepted else { continue };
                            let acceptor = acceptor.clone();
                            let shared = shared.clone();
                            tokio::spawn(async move {
                                let Ok(tls) = acceptor.accept(tcp).await else { return };
                                let svc = hyper::service::service_fn(move |req| {
                                    let shared = shared.clone();
                                    // Served in a task of its own: like a real API server, a
                                    // request whose client gave up (a timeout) still completes,
                                    // so its write can be stored while the answer is lost.
                                    async move {
                                        let served = tokio::spawn(routes::handle(shared, req)).await;
                                        Ok::<_, Infallible>(served.unwrap_or_else(|_| {
                                            hyper::Response::builder()
                                                .status(500)
                                                .body(Default::default())
                                                .unwrap()
                                        }))
                                    }
                                });
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                                    .await;
                            });
                        }
                    }
                }
            });
        });
        ApiServer {
            url,
            ca_pem: ca_cert.pem(),
            state,
            notify,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// A handle on the state for another thread (a test's stand-in kubelet): it changes
    /// objects and wakes the watches as `with_state` does.
    pub fn handle(&self) -> StateHandle {
        StateHandle {
            state: self.state.clone(),
            notify: self.notify.clone(),
        }
    }

    pub fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.state.lock().unwrap());
        self.notify.notify_waiters();
        out
    }

    /// A kubeconfig for `token`, with `namespace` as the context's namespace.
    pub fn kubeconfig(&self, token: &str, namespace: &str) -> String {
        let b64 = base64::engine::general_purpose::STANDARD;
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority-data: {}\n\
             users:\n- name: test\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: {namespace}\n\
             current-context: test\n",
            self.url,
            b64.encode(&self.ca_pem)
        )
    }

    pub fn add_fault(&self, f: Fault) {
        self.with_state(|s| s.faults.push(f));
    }

    pub fn add_watch_fault(&self, f: WatchFault) {
        self.with_state(|s| s.watch_faults.push(f));
    }

    /// What a client sees when the API server restarts after an etcd compaction: every open watch
    /// ends, and resuming from any resourceVersion it had is answered 410 Gone.
    pub fn expire_watches(&self) {
        self.with_state(|s| {
            s.expire_history();
            s.end_watches();
        });
    }

    /// The kubelet fails a pod, as node-pressure eviction does: phase Failed, reason `reason`,
    /// not Ready. It stays listed until someone deletes it.
    pub fn fail_pod(&self, ns: &str, name: &str, reason: &str) {
        self.with_state(|s| controllers::kubelet::fail(s, ns, name, reason));
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.with_state(|s| s.requests.clone())
    }

    pub fn clear_requests(&self) {
        self.with_state(|s| s.requests.clear());
    }

    pub fn get(&self, group: &str, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.with_state(|s| s.get(resource(group, plural), ns, name).cloned())
    }

    pub fn put(&self, group: &str, plural: &str, ns: &str, obj: Value) -> Value {
        self.with_state(|s| s.put(resource(group, plural), ns, obj))
    }

    pub fn delete(&self, group: &str, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.with_state(|s| s.remove(resource(group, plural), ns, name))
    }

    pub fn list(&self, group: &str, plural: &str, ns: &str) -> Vec<Value> {
        self.with_state(|s| {
            s.list(resource(group, plural), Some(ns))
                .into_iter()
                .cloned()
                .collect()
        })
    }

    /// A dSSM installation: StatefulSets f5-dssm-db and f5-dssm-sentinel (3 each) in `dssm_ns`,
    /// Deployment f5-tmm with `tmm_replicas` in `tmm_ns`. Their pods appear through the controllers.
    pub fn install_dssm(&self, dssm_ns: &str, tmm_ns: &str, tmm_replicas: i64) {
        self.install_dssm_mounting(
            dssm_ns,
            tmm_ns,
            tmm_replicas,
            SecretMount::None,
            SecretMount::None,
        );
    }

    /// `install_dssm`, with the dSSM pods and the TMM pods mounting `dssm-certs-secret` and
    /// `dssm-keys-secret` as `dssm` and `tmm` say (the SPK charts mount both, not optional: their
    /// pods wait for the Secrets).
    pub fn install_dssm_mounting(
        &self,
        dssm_ns: &str,
        tmm_ns: &str,
        tmm_replicas: i64,
        dssm: SecretMount,
        tmm: SecretMount,
    ) {
        // podManagementPolicy unset: OrderedReady, the API default (one pod at a time, each
        // Ready before the next), as the dSSM StatefulSets run.
        for app in ["f5-dssm-db", "f5-dssm-sentinel"] {
            self.put("apps", "statefulsets", dssm_ns, json!({
                "metadata": {"name": app, "labels": {"app": app}},
                "spec": {"replicas": 3, "serviceName": app, "selector": {"matchLabels": {"app": app}},
                         "template": {"metadata": {"labels": {"app": app}}, "spec": dssm.pod_spec("redis", "f5-dssm-store")}},
            }));
        }
        self.put("apps", "deployments", tmm_ns, json!({
            "metadata": {"name": "f5-tmm", "labels": {"app": "f5-tmm"}},
            "spec": {"replicas": tmm_replicas, "selector": {"matchLabels": {"app": "f5-tmm"}},
                     "template": {"metadata": {"labels": {"app": "f5-tmm"}}, "spec": tmm.pod_spec("f5-tmm", "tmm")}},
        }));
    }

    /// A TMM DaemonSet `name` in `ns` (BIG-IP Next's shape): one pod per node, labels
    /// `app: <name>`, a nodeSelector on `kubernetes.io/os: linux` (every simulated node has it).
    pub fn install_tmm_daemonset(&self, ns: &str, name: &str) {
        self.put(
            "apps",
            "daemonsets",
            ns,
            json!({
                "metadata": {"name": name, "labels": {"app": name}},
                "spec": {"selector": {"matchLabels": {"app": name}},
                         "template": {"metadata": {"labels": {"app": name}},
                                      "spec": {"nodeSelector": {"kubernetes.io/os": "linux"},
                                               "containers": [{"name": "tmm", "image": "tmm"}]}}},
            }),
        );
    }

    /// Waits (polling the in-process state) until `f` holds.
    pub fn wait_until(&self, what: &str, timeout: Duration, mut f: impl FnMut(&State) -> bool) {
        let start = Instant::now();
        while !f(&self.state.lock().unwrap()) {
            assert!(start.elapsed() < timeout, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `kubectl kustomize manifests/overlays/<overlay>`, rendered once per test binary: every
/// test cluster loads its RBAC from it, and the overlays do not change while the tests run.
pub fn render_overlay(overlay: &str) -> String {
    static RENDERED: std::sync::OnceLock<Mutex<std::collections::HashMap<String, String>>> =
        std::sync::OnceLock::new();
    let rendered = RENDERED.get_or_init(Default::default);
    if let Some(yaml) = rendered.lock().unwrap().get(overlay) {
        return yaml.clone();
    }
    // The project's manifests live at the workspace root, next to this crate.
    let yaml = kustomize(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../manifests/overlays")
            .join(overlay),
    );
    rendered
        .lock()
        .unwrap()
        .insert(overlay.to_string(), yaml.clone());
    yaml
}

/// `kubectl kustomize <dir>`.
pub fn kustomize(dir: &std::path::Path) -> String {
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl (1.32, with kustomize)");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
