//! An in-process Kubernetes API server over HTTPS for the integration tests: the real
//! `dssm-certs` binary and the real `kubectl` talk to it through a kubeconfig. It speaks the wire
//! protocol of what the program uses (see `logic` for selectors and patches), answers errors as
//! `Status` objects with the API server's reasons and messages, simulates the Deployment and
//! StatefulSet controllers, records every request, injects faults, and enforces RBAC rules read
//! from the project's own Role manifests.
//!
//! Simplifications, on purpose: core/v1 and events.k8s.io/v1 Events are separate stores (the real
//! server shows one store through both APIs); no admission, no finalizers, no OpenAPI (kubectl
//! needs `--validate=false`); a Table is never returned (kubectl prints its default columns).
#![allow(dead_code)]

pub mod logic;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::Notify;

use logic::*;

pub const ADMIN_TOKEN: &str = "admin-token";
pub const SA_TOKEN: &str = "dssm-certs-sa-token";
/// The agent's own read-only ServiceAccount (`dssm-certs-agent`, next to `dssm-certs`).
pub const AGENT_TOKEN: &str = "dssm-certs-agent-sa-token";

type Body = BoxBody<Bytes, Infallible>;

#[derive(Debug, Clone, Copy)]
pub struct Resource {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub verbs: &'static [&'static str],
}

const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

pub const RESOURCES: &[Resource] = &[
    Resource {
        group: "",
        version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
        verbs: ALL_VERBS,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "secrets",
        kind: "Secret",
        namespaced: true,
        verbs: ALL_VERBS,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "pods",
        kind: "Pod",
        namespaced: true,
        verbs: ALL_VERBS,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        verbs: ALL_VERBS,
    },
    Resource {
        group: "apps",
        version: "v1",
        plural: "deployments",
        kind: "Deployment",
        namespaced: true,
        verbs: ALL_VERBS,
    },
    Resource {
        group: "apps",
        version: "v1",
        plural: "statefulsets",
        kind: "StatefulSet",
        namespaced: true,
        verbs: ALL_VERBS,
    },
    Resource {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        verbs: ALL_VERBS,
    },
    Resource {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        verbs: ALL_VERBS,
    },
];

impl Resource {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
    /// `secrets`, `deployments.apps`: how the API server names a resource in messages.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub user: String,
    pub status: u16,
    /// The resourceVersion counter when the request was answered.
    pub at_rv: u64,
}

impl Recorded {
    pub fn is_write(&self) -> bool {
        !matches!(self.method.as_str(), "GET" | "HEAD" | "OPTIONS")
    }
}

/// A fault: for the `nth` (1-based) request whose method matches and whose path contains
/// `path_contains`, answer `status` (or wait `delay` first, then serve it normally).
#[derive(Debug, Clone)]
pub struct Fault {
    pub method: String,
    pub path_contains: String,
    pub nth: usize,
    pub times: usize,
    pub status: Option<u16>,
    pub delay: Option<Duration>,
    seen: usize,
}

impl Fault {
    pub fn status(method: &str, path_contains: &str, nth: usize, status: u16) -> Self {
        Fault {
            method: method.into(),
            path_contains: path_contains.into(),
            nth,
            times: 1,
            status: Some(status),
            delay: None,
            seen: 0,
        }
    }
    pub fn delay(method: &str, path_contains: &str, nth: usize, delay: Duration) -> Self {
        Fault {
            method: method.into(),
            path_contains: path_contains.into(),
            nth,
            times: 1,
            status: None,
            delay: Some(delay),
            seen: 0,
        }
    }
    /// Applies to `times` consecutive matching requests from the nth on.
    pub fn repeat(mut self, times: usize) -> Self {
        self.times = times;
        self
    }
}

/// A Role rule, as rbac/v1 PolicyRule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    pub resource_names: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Timing {
    /// How long a deleted pod takes to go away.
    pub pod_grace: Duration,
    /// How long a new pod takes to be Running and Ready.
    pub pod_start: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            pod_grace: Duration::from_millis(300),
            pod_start: Duration::from_millis(300),
        }
    }
}

struct Change {
    rv: u64,
    res: &'static str, // "group/plural"
    ns: String,
    kind: &'static str, // ADDED / MODIFIED / DELETED
    obj: Value,
}

pub struct State {
    pub objects: BTreeMap<(String, String, String), Value>, // (group/plural, ns, name)
    rv: u64,
    history: Vec<Change>,
    pub requests: Vec<Recorded>,
    pub faults: Vec<Fault>,
    /// RBAC for the service accounts: user -> namespace -> rules. None: not enforced.
    pub rbac: Option<HashMap<String, HashMap<String, Vec<Rule>>>>,
    pub sa_user: String,
    pub timing: Timing,
    /// Pods that never finish terminating / never become Ready (by name prefix).
    pub stuck_terminating: Vec<String>,
    pub never_ready: Vec<String>,
    pod_timers: HashMap<(String, String), Instant>,
    uid: u64,
    /// uid -> the resourceVersion at which the object was created.
    pub created_rv: HashMap<String, u64>,
    /// pod uid -> when the simulated kubelet marked it Ready.
    pub ready_at: HashMap<String, Instant>,
}

fn res_key(r: &Resource) -> String {
    format!("{}/{}", r.group, r.plural)
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

impl State {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    fn new_uid(&mut self) -> String {
        self.uid += 1;
        format!("00000000-0000-4000-8000-{:012x}", self.uid)
    }

    fn record(&mut self, r: &Resource, ns: &str, kind: &'static str, obj: &Value) {
        let rv = obj["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(self.rv);
        self.history.push(Change {
            rv,
            res: Box::leak(res_key(r).into_boxed_str()),
            ns: ns.into(),
            kind,
            obj: obj.clone(),
        });
    }

    pub fn get(&self, r: &Resource, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(res_key(r), ns.to_string(), name.to_string()))
    }

    pub fn list(&self, r: &Resource, ns: Option<&str>) -> Vec<&Value> {
        let key = res_key(r);
        self.objects
            .iter()
            .filter(|((k, n, _), _)| *k == key && ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v)
            .collect()
    }

    /// Stores `obj` (new or changed) with a new resourceVersion; emits the watch event.
    pub fn put(&mut self, r: &Resource, ns: &str, mut obj: Value) -> Value {
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let key = (res_key(r), ns.to_string(), name);
        let existed = self.objects.contains_key(&key);
        if !existed {
            let uid = self.new_uid();
            let m = &mut obj["metadata"];
            if m.get("uid").is_none_or(Value::is_null) {
                m["uid"] = json!(uid);
            }
            if m.get("creationTimestamp").is_none_or(Value::is_null) {
                m["creationTimestamp"] = json!(now_rfc3339());
            }
        }
        if r.namespaced {
            obj["metadata"]["namespace"] = json!(ns);
        }
        obj["apiVersion"] = json!(r.api_version());
        obj["kind"] = json!(r.kind);
        if matches!(r.kind, "Deployment" | "StatefulSet") {
            let spec_changed = self
                .objects
                .get(&key)
                .is_none_or(|old| old["spec"] != obj["spec"]);
            let gen = obj["metadata"]["generation"].as_i64().unwrap_or(0);
            if spec_changed || gen == 0 {
                obj["metadata"]["generation"] = json!(gen + 1);
            }
        }
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if !existed {
            if let Some(uid) = obj["metadata"]["uid"].as_str() {
                self.created_rv.insert(uid.to_string(), rv);
            }
        }
        self.objects.insert(key, obj.clone());
        self.record(r, ns, if existed { "MODIFIED" } else { "ADDED" }, &obj);
        obj
    }

    pub fn remove(&mut self, r: &Resource, ns: &str, name: &str) -> Option<Value> {
        let mut obj = self
            .objects
            .remove(&(res_key(r), ns.to_string(), name.to_string()))?;
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(r, ns, "DELETED", &obj);
        Some(obj)
    }

    pub fn namespace_exists(&self, ns: &str) -> bool {
        self.get(&RESOURCES[0], "", ns).is_some()
    }

    /// Requests (method, path) recorded so far.
    pub fn writes(&self) -> Vec<&Recorded> {
        self.requests.iter().filter(|r| r.is_write()).collect()
    }
}

pub fn resource(group: &str, plural: &str) -> &'static Resource {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.plural == plural)
        .expect("known resource")
}

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

struct Shared {
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
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
        let mut state = State {
            objects: BTreeMap::new(),
            rv: 100,
            history: Vec::new(),
            requests: Vec::new(),
            faults: Vec::new(),
            rbac: None,
            sa_user: sa_user.into(),
            timing: Timing::default(),
            stuck_terminating: Vec::new(),
            never_ready: Vec::new(),
            pod_timers: HashMap::new(),
            uid: 0,
            created_rv: HashMap::new(),
            ready_at: HashMap::new(),
        };
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
                    loop {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        controllers(&ctl);
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
                                        let served = tokio::spawn(handle(shared, req)).await;
                                        Ok::<_, Infallible>(served.unwrap_or_else(|_| {
                                            Response::builder().status(500).body(Body::default()).unwrap()
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
        for app in ["f5-dssm-db", "f5-dssm-sentinel"] {
            self.put("apps", "statefulsets", dssm_ns, json!({
                "metadata": {"name": app, "labels": {"app": app}},
                "spec": {"replicas": 3, "serviceName": app, "selector": {"matchLabels": {"app": app}},
                         "template": {"metadata": {"labels": {"app": app}}, "spec": {"containers": [{"name": "redis", "image": "f5-dssm-store"}]}}},
            }));
        }
        self.put("apps", "deployments", tmm_ns, json!({
            "metadata": {"name": "f5-tmm", "labels": {"app": "f5-tmm"}},
            "spec": {"replicas": tmm_replicas, "selector": {"matchLabels": {"app": "f5-tmm"}},
                     "template": {"metadata": {"labels": {"app": "f5-tmm"}}, "spec": {"containers": [{"name": "f5-tmm", "image": "tmm"}]}}},
        }));
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

// ---------------------------------------------------------------------------------------------
// Controllers.

fn pod_ready(p: &Value) -> bool {
    p.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

fn controllers(shared: &Shared) {
    let mut changed = false;
    {
        let mut s = shared.state.lock().unwrap();
        let pods_res = resource("", "pods");
        let now = Instant::now();
        // Terminating pods go away after their grace period; new pods become Ready.
        let pods: Vec<Value> = s.list(pods_res, None).into_iter().cloned().collect();
        for p in pods {
            let ns = p["metadata"]["namespace"].as_str().unwrap().to_string();
            let name = p["metadata"]["name"].as_str().unwrap().to_string();
            let uid = p["metadata"]["uid"].as_str().unwrap().to_string();
            let key = (uid.clone(), String::new());
            let terminating = p["metadata"]
                .get("deletionTimestamp")
                .is_some_and(|v| !v.is_null());
            if terminating {
                if s.stuck_terminating
                    .iter()
                    .any(|x| name.starts_with(x.as_str()))
                {
                    continue;
                }
                let since = *s
                    .pod_timers
                    .entry((uid.clone(), "del".into()))
                    .or_insert(now);
                if now.duration_since(since) >= s.timing.pod_grace {
                    s.remove(pods_res, &ns, &name);
                    changed = true;
                }
            } else if !pod_ready(&p) {
                let since = *s.pod_timers.entry(key).or_insert(now);
                if now.duration_since(since) >= s.timing.pod_start
                    && !s.never_ready.iter().any(|x| name.starts_with(x.as_str()))
                {
                    let mut p = p.clone();
                    let t = now_rfc3339();
                    p["status"] = json!({"phase": "Running", "startTime": t, "conditions": [
                        {"type": "Initialized", "status": "True"}, {"type": "ContainersReady", "status": "True"},
                        {"type": "Ready", "status": "True", "lastTransitionTime": t}, {"type": "PodScheduled", "status": "True"}]});
                    s.ready_at.insert(uid.clone(), now);
                    s.put(pods_res, &ns, p);
                    changed = true;
                }
            }
        }
        // Deployments and StatefulSets keep their replica counts and report status.
        for (plural, sts) in [("deployments", false), ("statefulsets", true)] {
            let r = resource("apps", plural);
            let owners: Vec<Value> = s.list(r, None).into_iter().cloned().collect();
            for o in owners {
                let ns = o["metadata"]["namespace"].as_str().unwrap().to_string();
                let name = o["metadata"]["name"].as_str().unwrap().to_string();
                let want = o["spec"]["replicas"].as_i64().unwrap_or(1).max(0) as usize;
                let labels = o["spec"]["template"]["metadata"]["labels"].clone();
                let sel: Vec<Req> = labels
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| Req::Eq(k.clone(), v.as_str().unwrap_or("").into()))
                            .collect()
                    })
                    .unwrap_or_default();
                let pods: Vec<Value> = s
                    .list(pods_res, Some(&ns))
                    .into_iter()
                    .filter(|p| labels_match(&sel, p))
                    .cloned()
                    .collect();
                let live: Vec<&Value> = pods
                    .iter()
                    .filter(|p| {
                        p["metadata"]
                            .get("deletionTimestamp")
                            .is_none_or(Value::is_null)
                    })
                    .collect();
                let template = o["spec"]["template"].clone();
                // Like the ReplicaSet's pod-template-hash: pods of an older template are "old".
                let hash = {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    template.to_string().hash(&mut h);
                    format!("{:08x}", h.finish() as u32)
                };
                let make_pod = |pod_name: String| {
                    let mut meta = template["metadata"].clone();
                    meta["name"] = json!(pod_name);
                    meta["labels"]["pod-template-hash"] = json!(hash.clone());
                    meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": if sts {"StatefulSet"} else {"ReplicaSet"}, "name": name, "uid": o["metadata"]["uid"], "controller": true}]);
                    json!({"metadata": meta, "spec": template["spec"], "status": {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}]}})
                };
                if sts {
                    for i in 0..want {
                        let pod_name = format!("{name}-{i}");
                        if !pods
                            .iter()
                            .any(|p| p["metadata"]["name"] == json!(pod_name))
                        {
                            s.put(pods_res, &ns, make_pod(pod_name));
                            changed = true;
                        }
                    }
                    for p in &live {
                        let n = p["metadata"]["name"].as_str().unwrap();
                        let idx: usize =
                            n.rsplit('-').next().unwrap().parse().unwrap_or(usize::MAX);
                        if idx >= want {
                            mark_terminating(&mut s, &ns, n);
                            changed = true;
                        }
                    }
                } else {
                    let is_current =
                        |p: &Value| p["metadata"]["labels"]["pod-template-hash"] == json!(hash);
                    let old: Vec<&Value> =
                        live.iter().copied().filter(|p| !is_current(p)).collect();
                    let new_ready = live
                        .iter()
                        .filter(|p| is_current(p) && pod_ready(p))
                        .count();
                    if !old.is_empty() && want > 0 {
                        // Rolling update, maxSurge 1 / maxUnavailable 0: one new pod, then, once
                        // a new one is Ready, one old pod goes.
                        let new_live = live.len() - old.len();
                        if live.len() < want + 1 && new_live < want {
                            let id = s.next_rv();
                            s.put(pods_res, &ns, make_pod(format!("{name}-{hash}-{id:05x}")));
                            changed = true;
                        } else if new_ready > 0 && live.len() > want {
                            mark_terminating(
                                &mut s,
                                &ns,
                                old[0]["metadata"]["name"].as_str().unwrap(),
                            );
                            changed = true;
                        } else if new_ready >= want {
                            for p in &old {
                                mark_terminating(
                                    &mut s,
                                    &ns,
                                    p["metadata"]["name"].as_str().unwrap(),
                                );
                            }
                            changed = true;
                        }
                    } else if live.len() < want {
                        for _ in live.len()..want {
                            let id = s.next_rv();
                            s.put(
                                pods_res,
                                &ns,
                                make_pod(format!("{name}-7d4f8b9c5-{id:05x}")),
                            );
                        }
                        changed = true;
                    } else if live.len() > want {
                        for p in &live[want..] {
                            mark_terminating(&mut s, &ns, p["metadata"]["name"].as_str().unwrap());
                        }
                        changed = true;
                    }
                }
                let pods: Vec<Value> = s
                    .list(pods_res, Some(&ns))
                    .into_iter()
                    .filter(|p| labels_match(&sel, p))
                    .cloned()
                    .collect();
                let replicas = pods
                    .iter()
                    .filter(|p| {
                        p["metadata"]
                            .get("deletionTimestamp")
                            .is_none_or(Value::is_null)
                    })
                    .count();
                let ready = pods
                    .iter()
                    .filter(|p| {
                        pod_ready(p)
                            && p["metadata"]
                                .get("deletionTimestamp")
                                .is_none_or(Value::is_null)
                    })
                    .count();
                let updated = pods
                    .iter()
                    .filter(|p| {
                        p["metadata"]
                            .get("deletionTimestamp")
                            .is_none_or(Value::is_null)
                    })
                    .filter(|p| sts || p["metadata"]["labels"]["pod-template-hash"] == json!(hash))
                    .count();
                let mut status = json!({"observedGeneration": o["metadata"]["generation"], "replicas": replicas, "readyReplicas": ready,
                    "availableReplicas": ready, "updatedReplicas": updated});
                if sts {
                    status["currentReplicas"] = json!(replicas);
                    status.as_object_mut().unwrap().remove("updatedReplicas");
                }
                if o["status"] != status {
                    let mut o = o.clone();
                    o["status"] = status;
                    s.put(r, &ns, o);
                    changed = true;
                }
            }
        }
    }
    if changed {
        shared.notify.notify_waiters();
    }
}

fn mark_terminating(s: &mut State, ns: &str, name: &str) {
    let pods_res = resource("", "pods");
    if let Some(p) = s.get(pods_res, ns, name).cloned() {
        if p["metadata"]
            .get("deletionTimestamp")
            .is_some_and(|v| !v.is_null())
        {
            return;
        }
        let mut p = p;
        p["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
        p["metadata"]["deletionGracePeriodSeconds"] = json!(30);
        s.put(pods_res, ns, p);
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP.

fn full(v: impl Into<Bytes>) -> Body {
    Full::new(v.into()).boxed()
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(full(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

fn reason_of(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

/// A `Status` failure as the API server writes it.
pub fn status_error(
    code: u16,
    reason: &str,
    message: &str,
    details: Option<(&str, &str, &str)>,
) -> Response<Body> {
    let mut v = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    if let Some((name, group, kind)) = details {
        let mut d = json!({"name": name, "kind": kind});
        if !group.is_empty() {
            d["group"] = json!(group);
        }
        v["details"] = d;
    }
    let mut resp = json_response(code, &v);
    if code == 429 {
        v["details"] = json!({"retryAfterSeconds": 1});
        resp = json_response(code, &v);
        resp.headers_mut()
            .insert("retry-after", "1".parse().unwrap());
    }
    resp
}

fn not_found(r: &Resource, name: &str) -> Response<Body> {
    status_error(
        404,
        "NotFound",
        &format!("{} \"{name}\" not found", r.qualified()),
        Some((name, r.group, r.plural)),
    )
}

struct Parsed {
    res: &'static Resource,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Parsed> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, r, more @ ..] if !r.is_empty() => {
            (Some(ns.to_string()), [&[*r][..], more].concat())
        }
        other => (None, other.to_vec()),
    };
    let plural = rest.first()?;
    let res = RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == *plural)?;
    Some(Parsed {
        res,
        ns,
        name: rest.get(1).map(|s| s.to_string()),
        sub: rest.get(2).map(|s| s.to_string()),
    })
}

fn query_map(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    out.push(v);
                    i += 2;
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn verb_of(method: &str, p: &Parsed, q: &HashMap<String, String>) -> &'static str {
    let watch = q.get("watch").is_some_and(|w| w == "1" || w == "true");
    match (method, p.name.is_some()) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    }
}

/// rbac/v1 semantics: a rule matches the verb, the group, `resource` or `resource/sub`, and,
/// when it lists resourceNames, the request's name (list/watch only with a metadata.name field
/// selector; never create or deletecollection).
fn authorized(rules: &[Rule], verb: &str, p: &Parsed, field_name: Option<&str>) -> bool {
    let resource = match &p.sub {
        Some(s) => format!("{}/{s}", p.res.plural),
        None => p.res.plural.to_string(),
    };
    let name = p.name.as_deref().or(if matches!(verb, "list" | "watch") {
        field_name
    } else {
        None
    });
    rules.iter().any(|r| {
        (r.verbs.iter().any(|v| v == "*" || v == verb))
            && r.api_groups.iter().any(|g| g == "*" || g == p.res.group)
            && r.resources.iter().any(|x| x == "*" || *x == resource)
            && (r.resource_names.is_empty()
                || name.is_some_and(|n| r.resource_names.iter().any(|x| x == n)))
    })
}

async fn handle(shared: Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let token = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let user_agent = req
        .headers()
        .get("user-agent")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("unknown")
        .to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();

    let user = {
        let s = shared.state.lock().unwrap();
        match token.as_str() {
            ADMIN_TOKEN => Some("kubernetes-admin".to_string()),
            SA_TOKEN => Some(s.sa_user.clone()),
            AGENT_TOKEN => Some(format!("{}-agent", s.sa_user)),
            _ => None,
        }
    };
    // Faults are matched before anything else, as a proxy or an overloaded server would.
    let fault = {
        let mut s = shared.state.lock().unwrap();
        let mut hit = None;
        for f in s.faults.iter_mut() {
            if f.method == method && path.contains(&f.path_contains) {
                f.seen += 1;
                if f.seen >= f.nth && f.seen < f.nth + f.times {
                    hit = Some((f.status, f.delay));
                    break;
                }
            }
        }
        hit
    };
    // A delay fault holds the request, then serves it; a status fault answers instead.
    let injected = match fault {
        Some((status, delay)) => {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            status.map(|code| {
                let msg = match code {
                    429 => "Too many requests, please try again later.".to_string(),
                    500 => "Internal error occurred: injected fault".to_string(),
                    503 => "the server is currently unable to handle the request".to_string(),
                    c => format!("injected fault {c}"),
                };
                status_error(code, reason_of(code), &msg, None)
            })
        }
        None => None,
    };
    let resp = match injected {
        Some(r) => r,
        None => {
            route(
                &shared,
                &method,
                &path,
                &query,
                &content_type,
                &user_agent,
                user.as_deref(),
                &body,
            )
            .await
        }
    };
    {
        let mut s = shared.state.lock().unwrap();
        let at_rv = s.rv;
        s.requests.push(Recorded {
            method,
            path,
            query,
            user: user.unwrap_or_default(),
            status: resp.status().as_u16(),
            at_rv,
        });
    }
    shared.notify.notify_waiters();
    resp
}

fn discovery(path: &str) -> Option<Value> {
    let resources = |group: &str, version: &str| {
        let list: Vec<Value> = RESOURCES
            .iter()
            .filter(|r| r.group == group && r.version == version)
            .flat_map(|r| {
                let short: &[&str] = match r.plural {
                    "deployments" => &["deploy"],
                    "statefulsets" => &["sts"],
                    "pods" => &["po"],
                    "namespaces" => &["ns"],
                    "events" => &["ev"],
                    _ => &[],
                };
                let mut v = vec![json!({"name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
                    "kind": r.kind, "verbs": r.verbs, "shortNames": short})];
                if matches!(r.plural, "deployments" | "statefulsets") {
                    v.push(json!({"name": format!("{}/scale", r.plural), "singularName": "", "namespaced": true,
                        "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]}));
                }
                v
            })
            .collect();
        let gv = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list})
    };
    match path.trim_end_matches('/') {
        "/api" => Some(
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        ),
        "/apis" => {
            let groups: Vec<Value> = ["apps", "coordination.k8s.io", "events.k8s.io"]
                .iter()
                .map(|g| json!({"name": g, "versions": [{"groupVersion": format!("{g}/v1"), "version": "v1"}],
                    "preferredVersion": {"groupVersion": format!("{g}/v1"), "version": "v1"}}))
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        "/api/v1" => Some(resources("", "v1")),
        "/apis/apps/v1" => Some(resources("apps", "v1")),
        "/apis/coordination.k8s.io/v1" => Some(resources("coordination.k8s.io", "v1")),
        "/apis/events.k8s.io/v1" => Some(resources("events.k8s.io", "v1")),
        "/version" => Some(
            json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-dssm-test", "platform": "linux/amd64"}),
        ),
        _ => None,
    }
}

fn parse_body(body: &[u8], content_type: &str) -> Result<Value, String> {
    if body.is_empty() {
        return Ok(Value::Null);
    }
    if content_type.contains("yaml") {
        serde_yaml::from_slice(body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(body).map_err(|e| e.to_string())
    }
}

/// Checks what the API server validates for our kinds; returns the 422 message.
fn validate(r: &Resource, obj: &Value) -> Result<(), String> {
    let name = obj["metadata"]["name"].as_str().unwrap_or("");
    let kind = r.kind;
    if name.is_empty() {
        return Err(format!("{kind} \"\" is invalid: metadata.name: Required value: name or generateName is required"));
    }
    let dns = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    if !dns(name) {
        return Err(format!("{kind} \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"));
    }
    if r.kind == "Secret" {
        if let Some(data) = obj["data"].as_object() {
            for (k, v) in data {
                if k.is_empty()
                    || !k
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                {
                    return Err(format!("Secret \"{name}\" is invalid: data[{k}]: Invalid value: \"{k}\": a valid config key must consist of alphanumeric characters, '-', '_' or '.'"));
                }
                if !v.is_string()
                    || base64::engine::general_purpose::STANDARD
                        .decode(v.as_str().unwrap())
                        .is_err()
                {
                    return Err(format!(
                        "Secret \"{name}\" is invalid: data[{k}]: illegal base64 data"
                    ));
                }
            }
        }
    }
    if (r.kind == "Deployment" || r.kind == "StatefulSet")
        && obj["spec"]["replicas"].as_i64().is_some_and(|n| n < 0)
    {
        {
            return Err(format!("{kind}.apps \"{name}\" is invalid: spec.replicas: Invalid value: {}: must be greater than or equal to 0", obj["spec"]["replicas"]));
        }
    }
    Ok(())
}

/// stringData is write-only: merged into data, as the API server does.
fn normalize_secret(obj: &mut Value) {
    if let Some(sd) = obj.as_object_mut().and_then(|m| m.remove("stringData")) {
        if let Some(sd) = sd.as_object() {
            for (k, v) in sd {
                obj["data"][k] = json!(base64::engine::general_purpose::STANDARD
                    .encode(v.as_str().unwrap_or("").as_bytes()));
            }
        }
    }
    if obj.get("type").is_none_or(Value::is_null) {
        obj["type"] = json!("Opaque");
    }
}

fn manager_name(q: &HashMap<String, String>, user_agent: &str) -> String {
    q.get("fieldManager").cloned().unwrap_or_else(|| {
        user_agent
            .split('/')
            .next()
            .unwrap_or("unknown")
            .to_string()
    })
}

#[allow(clippy::too_many_arguments)]
async fn route(
    shared: &Arc<Shared>,
    method: &str,
    path: &str,
    query: &str,
    content_type: &str,
    user_agent: &str,
    user: Option<&str>,
    body: &[u8],
) -> Response<Body> {
    let Some(user) = user else {
        return status_error(401, "Unauthorized", "Unauthorized", None);
    };
    if method == "GET" {
        if let Some(d) = discovery(path) {
            return json_response(200, &d);
        }
    }
    let q = query_map(query);
    let Some(p) = parse_path(path) else {
        return status_error(
            404,
            "NotFound",
            "the server could not find the requested resource",
            None,
        );
    };
    let verb = verb_of(method, &p, &q);
    let field_sel = match q
        .get("fieldSelector")
        .map(|f| parse_field_selector(f))
        .transpose()
    {
        Ok(f) => f.unwrap_or_default(),
        Err(e) => return status_error(400, "BadRequest", &e, None),
    };
    let label_sel = match q
        .get("labelSelector")
        .map(|l| parse_label_selector(l))
        .transpose()
    {
        Ok(l) => l.unwrap_or_default(),
        Err(e) => return status_error(400, "BadRequest", &e, None),
    };
    // RBAC for the service account.
    {
        let s = shared.state.lock().unwrap();
        if let (Some(rbac), true) = (&s.rbac, user.starts_with("system:serviceaccount:")) {
            let field_name = field_sel
                .iter()
                .find(|(k, eq, _)| k == "metadata.name" && *eq)
                .map(|(_, _, v)| v.as_str());
            let ns = p.ns.clone().unwrap_or_default();
            let rules = rbac
                .get(user)
                .and_then(|by_ns| by_ns.get(&ns))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            if !authorized(rules, verb, &p, field_name) {
                let resource = match &p.sub {
                    Some(sub) => format!("{}/{sub}", p.res.plural),
                    None => p.res.plural.to_string(),
                };
                let subject = match &p.name {
                    Some(n) => format!("{} \"{n}\" is forbidden", p.res.qualified()),
                    None => format!("{} is forbidden", p.res.qualified()),
                };
                let scope = if p.ns.is_some() {
                    format!(" in the namespace \"{ns}\"")
                } else {
                    " at the cluster scope".into()
                };
                let msg = format!(
                    "{subject}: User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"{}\"{scope}",
                    p.res.group
                );
                return status_error(
                    403,
                    "Forbidden",
                    &msg,
                    Some((p.name.as_deref().unwrap_or(""), p.res.group, p.res.plural)),
                );
            }
        }
    }
    // Like the NamespaceLifecycle admission plugin: only what creates an object needs the
    // namespace to exist; reads in a missing namespace answer NotFound for the object.
    let creates = verb == "create"
        || (verb == "patch" && content_type.starts_with("application/apply-patch"));
    if let Some(ns) = &p.ns {
        let exists = shared.state.lock().unwrap().namespace_exists(ns);
        if creates && !exists && p.res.namespaced {
            return status_error(
                404,
                "NotFound",
                &format!("namespaces \"{ns}\" not found"),
                Some((ns, "", "namespaces")),
            );
        }
    }
    if verb == "watch" {
        return watch(shared.clone(), &p, &q, label_sel, field_sel);
    }
    let mut s = shared.state.lock().unwrap();
    let ns = p.ns.clone().unwrap_or_default();
    let r = p.res;
    let manager = manager_name(&q, user_agent);
    let now = now_rfc3339();
    match (verb, p.sub.as_deref()) {
        ("get", None) => match s.get(r, &ns, p.name.as_deref().unwrap()) {
            Some(o) => json_response(200, o),
            None => not_found(r, p.name.as_deref().unwrap()),
        },
        ("list", None) => {
            let items: Vec<Value> = s
                .list(r, p.ns.as_deref())
                .into_iter()
                .filter(|o| labels_match(&label_sel, o) && fields_match(&field_sel, o))
                .map(|o| {
                    let mut o = o.clone();
                    let m = o.as_object_mut().unwrap();
                    m.remove("apiVersion");
                    m.remove("kind");
                    o
                })
                .collect();
            json_response(
                200,
                &json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(),
                "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
            )
        }
        ("create", None) => {
            let mut obj = match parse_body(body, content_type) {
                Ok(v) if v.is_object() => v,
                Ok(_) => {
                    return status_error(
                        400,
                        "BadRequest",
                        "the body of the request was in an unknown format",
                        None,
                    )
                }
                Err(e) => return status_error(400, "BadRequest", &e, None),
            };
            if let Some(gen) = obj["metadata"]["generateName"]
                .as_str()
                .filter(|_| obj["metadata"]["name"].is_null())
            {
                let id = s.next_rv();
                obj["metadata"]["name"] = json!(format!("{gen}{id:05x}"));
            }
            if let Some(body_ns) = obj["metadata"]["namespace"].as_str() {
                if body_ns != ns {
                    return status_error(400, "BadRequest", "the namespace of the provided object does not match the namespace sent on the request", None);
                }
            }
            if r.kind == "Secret" {
                normalize_secret(&mut obj);
            }
            if let Err(m) = validate(r, &obj) {
                return status_error(
                    422,
                    "Invalid",
                    &m,
                    Some((
                        obj["metadata"]["name"].as_str().unwrap_or(""),
                        r.group,
                        r.kind,
                    )),
                );
            }
            let name = obj["metadata"]["name"].as_str().unwrap().to_string();
            if s.get(r, &ns, &name).is_some() {
                return status_error(
                    409,
                    "AlreadyExists",
                    &format!("{} \"{name}\" already exists", r.qualified()),
                    Some((&name, r.group, r.plural)),
                );
            }
            for k in [
                "resourceVersion",
                "uid",
                "creationTimestamp",
                "managedFields",
                "generation",
            ] {
                if let Some(m) = obj["metadata"].as_object_mut() {
                    m.remove(k);
                }
            }
            if q.contains_key("dryRun") {
                return json_response(201, &obj);
            }
            record_update(None, &mut obj, &manager, &r.api_version(), &now);
            let stored = s.put(r, &ns, obj);
            json_response(201, &stored)
        }
        ("update", None) | ("patch", None) => {
            let name = p.name.clone().unwrap();
            let current = s.get(r, &ns, &name).cloned();
            let is_apply = content_type.starts_with("application/apply-patch");
            let parsed = match parse_body(body, content_type) {
                Ok(v) => v,
                Err(e) => return status_error(400, "BadRequest", &e, None),
            };
            let mut obj = match (verb, current.as_ref()) {
                ("update", None) => return not_found(r, &name),
                ("update", Some(cur)) => {
                    let want_rv = parsed["metadata"]["resourceVersion"].as_str().unwrap_or("");
                    if !want_rv.is_empty()
                        && want_rv != cur["metadata"]["resourceVersion"].as_str().unwrap_or("")
                    {
                        return status_error(409, "Conflict", &format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", r.qualified()), Some((&name, r.group, r.plural)));
                    }
                    let mut o = parsed.clone();
                    for k in ["uid", "creationTimestamp"] {
                        o["metadata"][k] = cur["metadata"][k].clone();
                    }
                    o["metadata"]["managedFields"] = cur["metadata"]["managedFields"].clone();
                    if o.get("status").is_none_or(Value::is_null) {
                        o["status"] = cur["status"].clone();
                    }
                    o
                }
                (_, None) if is_apply => {
                    if !q.contains_key("fieldManager") {
                        return status_error(400, "BadRequest", "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch", None);
                    }
                    match apply(
                        None,
                        &parsed,
                        &manager,
                        q.get("force").is_some_and(|f| f == "true"),
                        &r.api_version(),
                        &now,
                    ) {
                        Ok(mut o) => {
                            o["metadata"]["name"] = json!(name);
                            o
                        }
                        Err(m) => return status_error(409, "Conflict", &m, None),
                    }
                }
                (_, None) => return not_found(r, &name),
                (_, Some(cur)) => {
                    if let Some(rv) = parsed
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                    {
                        if !is_apply
                            && rv != cur["metadata"]["resourceVersion"].as_str().unwrap_or("")
                        {
                            return status_error(409, "Conflict", &format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", r.qualified()), Some((&name, r.group, r.plural)));
                        }
                    }
                    let mut o = cur.clone();
                    if is_apply {
                        if !q.contains_key("fieldManager") {
                            return status_error(400, "BadRequest", "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch", None);
                        }
                        match apply(
                            Some(cur),
                            &parsed,
                            &manager,
                            q.get("force").is_some_and(|f| f == "true"),
                            &r.api_version(),
                            &now,
                        ) {
                            Ok(x) => o = x,
                            Err(m) => return status_error(409, "Conflict", &m, None),
                        }
                    } else if content_type.starts_with("application/json-patch+json") {
                        if let Err(e) = json_patch(&mut o, &parsed) {
                            return status_error(422, "Invalid", &e, None);
                        }
                    } else if content_type.starts_with("application/merge-patch+json") {
                        merge_patch(&mut o, &parsed);
                    } else if content_type.starts_with("application/strategic-merge-patch+json") {
                        strategic_merge_patch(&mut o, &parsed);
                    } else {
                        return status_error(415, "UnsupportedMediaType", "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml", None);
                    }
                    o
                }
            };
            if r.kind == "Secret" {
                normalize_secret(&mut obj);
            }
            obj["metadata"]["name"] = json!(name);
            if let Err(m) = validate(r, &obj) {
                return status_error(422, "Invalid", &m, Some((&name, r.group, r.kind)));
            }
            if q.contains_key("dryRun") {
                return json_response(200, &obj);
            }
            if !is_apply {
                record_update(current.as_ref(), &mut obj, &manager, &r.api_version(), &now);
            }
            // A write that changes nothing keeps the resourceVersion, as the API server does.
            if let Some(cur) = &current {
                let strip = |v: &Value| {
                    let mut v = v.clone();
                    if let Some(m) = v["metadata"].as_object_mut() {
                        m.remove("resourceVersion");
                        m.remove("managedFields");
                    }
                    v["apiVersion"] = json!(r.api_version());
                    v["kind"] = json!(r.kind);
                    v
                };
                if strip(cur) == strip(&obj) {
                    return json_response(200, cur);
                }
            }
            let created = current.is_none();
            let stored = s.put(r, &ns, obj);
            json_response(if created { 201 } else { 200 }, &stored)
        }
        ("get", Some("scale")) | ("update", Some("scale")) | ("patch", Some("scale"))
            if matches!(r.plural, "deployments" | "statefulsets") =>
        {
            let name = p.name.clone().unwrap();
            let Some(cur) = s.get(r, &ns, &name).cloned() else {
                return not_found(r, &name);
            };
            let scale_of = |o: &Value| {
                let labels = o["spec"]["selector"]["matchLabels"].as_object().map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join(",")
                });
                json!({"kind": "Scale", "apiVersion": "autoscaling/v1",
                    "metadata": {"name": o["metadata"]["name"], "namespace": o["metadata"]["namespace"], "uid": o["metadata"]["uid"],
                                 "resourceVersion": o["metadata"]["resourceVersion"], "creationTimestamp": o["metadata"]["creationTimestamp"]},
                    "spec": {"replicas": o["spec"]["replicas"]},
                    "status": {"replicas": o["status"]["replicas"].as_i64().unwrap_or(0), "selector": labels.unwrap_or_default()}})
            };
            if verb == "get" {
                return json_response(200, &scale_of(&cur));
            }
            let parsed = match parse_body(body, content_type) {
                Ok(v) => v,
                Err(e) => return status_error(400, "BadRequest", &e, None),
            };
            let mut scale = scale_of(&cur);
            if verb == "update" {
                let want_rv = parsed["metadata"]["resourceVersion"].as_str().unwrap_or("");
                if !want_rv.is_empty()
                    && want_rv != cur["metadata"]["resourceVersion"].as_str().unwrap_or("")
                {
                    return status_error(409, "Conflict", &format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", r.qualified()), Some((&name, r.group, r.plural)));
                }
                scale = parsed;
            } else if content_type.starts_with("application/json-patch+json") {
                if let Err(e) = json_patch(&mut scale, &parsed) {
                    return status_error(422, "Invalid", &e, None);
                }
            } else {
                merge_patch(&mut scale, &parsed);
            }
            let Some(n) = scale["spec"]["replicas"].as_i64() else {
                return status_error(
                    422,
                    "Invalid",
                    &format!(
                        "Scale.autoscaling \"{name}\" is invalid: spec.replicas: Required value"
                    ),
                    None,
                );
            };
            if n < 0 {
                return status_error(422, "Invalid", &format!("Scale.autoscaling \"{name}\" is invalid: spec.replicas: Invalid value: {n}: must be greater than or equal to 0"), None);
            }
            let mut o = cur.clone();
            o["spec"]["replicas"] = json!(n);
            let o = if o != cur { s.put(r, &ns, o) } else { cur };
            json_response(200, &scale_of(&o))
        }
        ("delete", None) => {
            let name = p.name.clone().unwrap();
            let Some(cur) = s.get(r, &ns, &name).cloned() else {
                return not_found(r, &name);
            };
            if let Some(pre) = parse_body(body, content_type).ok().and_then(|b| {
                b.pointer("/preconditions/resourceVersion")
                    .and_then(Value::as_str)
                    .map(String::from)
            }) {
                if Some(pre.as_str()) != cur["metadata"]["resourceVersion"].as_str() {
                    return status_error(409, "Conflict", &format!("Operation cannot be fulfilled on {} \"{name}\": the ResourceVersion in the precondition ({pre}) does not match the ResourceVersion in record ({}). The object might have been modified", r.qualified(), cur["metadata"]["resourceVersion"].as_str().unwrap_or("")), Some((&name, r.group, r.plural)));
                }
            }
            if r.kind == "Pod" {
                mark_terminating(&mut s, &ns, &name);
                let o = s.get(r, &ns, &name).cloned().unwrap();
                return json_response(200, &o);
            }
            s.remove(r, &ns, &name);
            json_response(
                200,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": name, "group": r.group, "kind": r.plural, "uid": cur["metadata"]["uid"]}}),
            )
        }
        ("deletecollection", None) => {
            let victims: Vec<Value> = s
                .list(r, p.ns.as_deref())
                .into_iter()
                .filter(|o| labels_match(&label_sel, o) && fields_match(&field_sel, o))
                .cloned()
                .collect();
            let mut out = Vec::new();
            for v in victims {
                let name = v["metadata"]["name"].as_str().unwrap().to_string();
                if r.kind == "Pod" {
                    mark_terminating(&mut s, &ns, &name);
                    out.push(s.get(r, &ns, &name).cloned().unwrap());
                } else if let Some(o) = s.remove(r, &ns, &name) {
                    out.push(o);
                }
            }
            json_response(
                200,
                &json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(),
                "metadata": {"resourceVersion": s.rv.to_string()}, "items": out}),
            )
        }
        _ => status_error(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            None,
        ),
    }
}

fn watch(
    shared: Arc<Shared>,
    p: &Parsed,
    q: &HashMap<String, String>,
    labels: Vec<Req>,
    fields: Vec<(String, bool, String)>,
) -> Response<Body> {
    let key = res_key(p.res);
    let ns = p.ns.clone();
    let from: Option<u64> = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0);
    let explicit_initial = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let send_initial = explicit_initial || from.is_none();
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let res = p.res;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let matches =
            |ns_ok: bool, o: &Value| ns_ok && labels_match(&labels, o) && fields_match(&fields, o);
        let line = |t: &str, o: &Value| {
            let mut s = serde_json::to_vec(&json!({"type": t, "object": o})).unwrap();
            s.push(b'\n');
            Bytes::from(s)
        };
        let (initial, mut cursor) = {
            let s = shared.state.lock().unwrap();
            let mut cursor = from.unwrap_or(s.rv);
            let mut initial = Vec::new();
            if send_initial {
                for o in s.list(res, ns.as_deref()) {
                    if matches(true, o) {
                        initial.push(line("ADDED", o));
                    }
                }
                cursor = s.rv;
                if explicit_initial && bookmarks {
                    initial.push(line("BOOKMARK", &json!({"kind": res.kind, "apiVersion": res.api_version(),
                        "metadata": {"resourceVersion": s.rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}})));
                }
            }
            (initial, cursor)
        };
        for l in initial {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        loop {
            let notified = shared.notify.notified();
            let pending: Vec<Bytes> = {
                let s = shared.state.lock().unwrap();
                let out = s
                    .history
                    .iter()
                    .filter(|c| {
                        c.rv > cursor && c.res == key && ns.as_deref().is_none_or(|n| n == c.ns)
                    })
                    .filter(|c| matches(true, &c.obj))
                    .map(|c| line(c.kind, &c.obj))
                    .collect();
                cursor = s.rv;
                out
            };
            for l in pending {
                if tx.send(l).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(StreamBody::new(stream).boxed())
        .unwrap()
}

/// What the authorizer sees of a recorded request: (verb, group, resource[/sub], namespace, name).
pub fn attributes(rec: &Recorded) -> Option<(String, String, String, String, Option<String>)> {
    let p = parse_path(&rec.path)?;
    let q = query_map(&rec.query);
    let verb = verb_of(&rec.method, &p, &q).to_string();
    let resource = match &p.sub {
        Some(s) => format!("{}/{s}", p.res.plural),
        None => p.res.plural.to_string(),
    };
    // list/watch name their object through a metadata.name field selector, as RBAC sees it.
    let name = p.name.clone().or_else(|| {
        if !matches!(verb.as_str(), "list" | "watch") {
            return None;
        }
        let sel = parse_field_selector(q.get("fieldSelector")?).ok()?;
        sel.into_iter()
            .find(|(k, eq, _)| k == "metadata.name" && *eq)
            .map(|(_, _, v)| v)
    });
    Some((
        verb,
        p.res.group.to_string(),
        resource,
        p.ns.clone().unwrap_or_default(),
        name,
    ))
}

/// The Roles and RoleBindings of rendered manifests (kustomize or the Helm chart), as the RBAC
/// the test cluster enforces for each ServiceAccount: user -> namespace -> rules.
pub fn rbac_from_manifests(yaml: &str) -> HashMap<String, HashMap<String, Vec<Rule>>> {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let mut roles: HashMap<(String, String), Role> = HashMap::new();
    let mut bindings = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v: Value = serde::Deserialize::deserialize(doc).unwrap();
        match v["kind"].as_str() {
            Some("Role") => {
                let r: Role = serde_json::from_value(v).unwrap();
                roles.insert(
                    (
                        r.metadata.namespace.clone().unwrap(),
                        r.metadata.name.clone().unwrap(),
                    ),
                    r,
                );
            }
            Some("RoleBinding") => bindings.push(serde_json::from_value::<RoleBinding>(v).unwrap()),
            _ => {}
        }
    }
    let mut out: HashMap<String, HashMap<String, Vec<Rule>>> = HashMap::new();
    for b in bindings {
        let ns = b.metadata.namespace.clone().unwrap();
        for s in b.subjects.unwrap_or_default() {
            if s.kind != "ServiceAccount" {
                continue;
            }
            let user = format!(
                "system:serviceaccount:{}:{}",
                s.namespace.clone().unwrap_or(ns.clone()),
                s.name
            );
            let role = &roles[&(ns.clone(), b.role_ref.name.clone())];
            for r in role.rules.clone().unwrap_or_default() {
                out.entry(user.clone())
                    .or_default()
                    .entry(ns.clone())
                    .or_default()
                    .push(Rule {
                        api_groups: r.api_groups.unwrap_or_default(),
                        resources: r.resources.unwrap_or_default(),
                        verbs: r.verbs,
                        resource_names: r.resource_names.unwrap_or_default(),
                    });
            }
        }
    }
    out
}

/// `kubectl kustomize manifests/overlays/<overlay>`.
pub fn render_overlay(overlay: &str) -> String {
    kustomize(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("manifests/overlays")
            .join(overlay),
    )
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
