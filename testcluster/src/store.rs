//! The object store: every resource the test cluster serves, its objects keyed by
//! (group/plural, namespace, name), the resourceVersion counter, the bounded event history that
//! watches are served from, and the recorded requests.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::faults::{Fault, WatchFault};
use crate::rbac::Rule;

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
        group: "apps",
        version: "v1",
        plural: "daemonsets",
        kind: "DaemonSet",
        namespaced: true,
        verbs: ALL_VERBS,
    },
    Resource {
        group: "policy",
        version: "v1",
        plural: "poddisruptionbudgets",
        kind: "PodDisruptionBudget",
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
    }, // What the install manifests hold (docs/install.md), stored without controllers.
    Resource {
        group: "",
        version: "v1",
        plural: "serviceaccounts",
        kind: "ServiceAccount",
        namespaced: true,
        verbs: ALL_VERBS,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
        verbs: ALL_VERBS,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "configmaps",
        kind: "ConfigMap",
        namespaced: true,
        verbs: ALL_VERBS,
    },
    Resource {
        group: "batch",
        version: "v1",
        plural: "cronjobs",
        kind: "CronJob",
        namespaced: true,
        verbs: ALL_VERBS,
    },
    Resource {
        group: "batch",
        version: "v1",
        plural: "jobs",
        kind: "Job",
        namespaced: true,
        verbs: ALL_VERBS,
    },
    Resource {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "roles",
        kind: "Role",
        namespaced: true,
        verbs: ALL_VERBS,
    },
    Resource {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "rolebindings",
        kind: "RoleBinding",
        namespaced: true,
        verbs: ALL_VERBS,
    },
    // Stored only: what makes a group a CRD's is the flag below, not these objects.
    Resource {
        group: "apiextensions.k8s.io",
        version: "v1",
        plural: "customresourcedefinitions",
        kind: "CustomResourceDefinition",
        namespaced: false,
        verbs: ALL_VERBS,
    },
    // The Prometheus Operator's kinds: served only once their CRDs are installed
    // (`State::prometheus_operator_crds`), as on a real cluster.
    Resource {
        group: "monitoring.coreos.com",
        version: "v1",
        plural: "servicemonitors",
        kind: "ServiceMonitor",
        namespaced: true,
        verbs: ALL_VERBS,
    },
    Resource {
        group: "monitoring.coreos.com",
        version: "v1",
        plural: "podmonitors",
        kind: "PodMonitor",
        namespaced: true,
        verbs: ALL_VERBS,
    },
    Resource {
        group: "monitoring.coreos.com",
        version: "v1",
        plural: "prometheusrules",
        kind: "PrometheusRule",
        namespaced: true,
        verbs: ALL_VERBS,
    },
];

/// The API group of the Prometheus Operator's CRDs.
pub const PROMETHEUS_OPERATOR_GROUP: &str = "monitoring.coreos.com";

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
    /// `secrets`, `deployments.apps`: how the API server names a resource in messages.
    pub fn qualified(&self) -> String {
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

#[derive(Debug, Clone)]
pub struct Timing {
    /// How long a deleted pod takes to go away.
    pub pod_grace: Duration,
    /// How long a new pod takes to be Running and Ready.
    pub pod_start: Duration,
    /// The wait before kubelet retries a failed volume mount (a Secret missing), doubled on
    /// each failure up to `mount_retry_max`: pkg/util/goroutinemap/exponentialbackoff's
    /// 500 ms and 2 min 2 s, scaled down 5 times here.
    pub mount_retry: Duration,
    pub mount_retry_max: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            pod_grace: Duration::from_millis(300),
            pod_start: Duration::from_millis(300),
            mount_retry: Duration::from_millis(100),
            mount_retry_max: Duration::from_millis(24_400),
        }
    }
}

pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) res: String, // "group/plural"
    pub(crate) ns: String,
    pub(crate) kind: &'static str, // ADDED / MODIFIED / DELETED
    pub(crate) obj: Value,
}

/// How many events the history keeps by default. The real watch cache keeps between 100 and
/// 100*1024 events per resource, sized to hold about 75 s of changes
/// (staging/src/k8s.io/apiserver/pkg/storage/cacher/watch_cache.go: defaultLowerBoundCapacity,
/// defaultUpperBoundCapacity, eventFreshDuration); tests set `history_window` lower to make
/// resourceVersions expire.
pub const DEFAULT_HISTORY_WINDOW: usize = 100 * 1024;

pub struct State {
    pub objects: BTreeMap<(String, String, String), Value>, // (group/plural, ns, name)
    pub(crate) rv: u64,
    pub(crate) history: VecDeque<Change>,
    /// Events kept for watches that resume from a resourceVersion; older ones are dropped, and a
    /// watch from before the oldest kept event is answered 410 Gone.
    pub history_window: usize,
    /// The newest resourceVersion whose event was dropped: a watch must resume from here or later.
    pub(crate) history_floor: u64,
    /// Bumped to end every open watch stream (as an API server restart does).
    pub(crate) watch_epoch: u64,
    pub requests: Vec<Recorded>,
    pub faults: Vec<Fault>,
    pub watch_faults: Vec<WatchFault>,
    /// RBAC for the service accounts: user -> namespace -> rules. None: not enforced.
    pub rbac: Option<HashMap<String, HashMap<String, Vec<Rule>>>>,
    pub sa_user: String,
    pub timing: Timing,
    /// Whether the Prometheus Operator's CRDs (ServiceMonitor, PodMonitor, PrometheusRule) are
    /// installed; without them their group is neither discovered nor served.
    pub prometheus_operator_crds: bool,
    /// The simulated nodes: a DaemonSet runs one pod on each.
    pub nodes: Vec<String>,
    /// Pods that never finish terminating / never become Ready (by name prefix).
    pub stuck_terminating: Vec<String>,
    pub never_ready: Vec<String>,
    pub(crate) pod_timers: HashMap<(String, String), Instant>,
    uid: u64,
    /// uid -> the resourceVersion at which the object was created.
    pub created_rv: HashMap<String, u64>,
    /// pod uid -> when the simulated kubelet marked it Ready.
    pub ready_at: HashMap<String, Instant>,
    /// How many pod IPs the simulated kubelet handed out: the next pod gets the next loopback
    /// address (`controllers::kubelet::pod_ip`).
    pub(crate) pod_ips: u32,
    /// How far this API server's clock is from the machine's: every time it stamps
    /// (creationTimestamp, managedFields, deletionTimestamp, pod and budget status) is skewed
    /// by it, as a control plane whose clock differs from the client's.
    pub clock_offset: time::Duration,
}

/// The API server's defaulting of the workload specs we serve (pkg/apis/apps/v1/defaults.go
/// SetDefaults_Deployment, SetDefaults_StatefulSet, SetDefaults_DaemonSet): clients such as
/// `kubectl rollout status` read these fields.
fn defaults(kind: &str, spec: &mut Value) {
    let set = |spec: &mut Value, pointer: &str, v: Value| {
        if spec.pointer(pointer).is_none_or(Value::is_null) {
            let mut at = &mut *spec;
            for key in pointer.trim_start_matches('/').split('/') {
                at = &mut at[key];
            }
            *at = v;
        }
    };
    match kind {
        "Deployment" => {
            set(spec, "/replicas", json!(1));
            set(spec, "/strategy/type", json!("RollingUpdate"));
            if spec["strategy"]["type"] == "RollingUpdate" {
                set(spec, "/strategy/rollingUpdate/maxSurge", json!("25%"));
                set(spec, "/strategy/rollingUpdate/maxUnavailable", json!("25%"));
            }
            set(spec, "/revisionHistoryLimit", json!(10));
            set(spec, "/progressDeadlineSeconds", json!(600));
        }
        "StatefulSet" => {
            set(spec, "/replicas", json!(1));
            set(spec, "/podManagementPolicy", json!("OrderedReady"));
            set(spec, "/updateStrategy/type", json!("RollingUpdate"));
            if spec["updateStrategy"]["type"] == "RollingUpdate" {
                set(spec, "/updateStrategy/rollingUpdate/partition", json!(0));
            }
            set(spec, "/revisionHistoryLimit", json!(10));
        }
        "DaemonSet" => {
            set(spec, "/updateStrategy/type", json!("RollingUpdate"));
            if spec["updateStrategy"]["type"] == "RollingUpdate" {
                set(
                    spec,
                    "/updateStrategy/rollingUpdate/maxUnavailable",
                    json!(1),
                );
                set(spec, "/updateStrategy/rollingUpdate/maxSurge", json!(0));
            }
            set(spec, "/revisionHistoryLimit", json!(10));
        }
        _ => {}
    }
}

pub(crate) fn res_key(r: &Resource) -> String {
    format!("{}/{}", r.group, r.plural)
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

impl State {
    pub(crate) fn new(sa_user: &str) -> State {
        State {
            objects: BTreeMap::new(),
            rv: 100,
            history: VecDeque::new(),
            history_window: DEFAULT_HISTORY_WINDOW,
            history_floor: 0,
            watch_epoch: 0,
            requests: Vec::new(),
            faults: Vec::new(),
            watch_faults: Vec::new(),
            rbac: None,
            sa_user: sa_user.into(),
            timing: Timing::default(),
            prometheus_operator_crds: false,
            nodes: vec!["node-1".into(), "node-2".into(), "node-3".into()],
            stuck_terminating: Vec::new(),
            never_ready: Vec::new(),
            pod_timers: HashMap::new(),
            uid: 0,
            created_rv: HashMap::new(),
            ready_at: HashMap::new(),
            pod_ips: 0,
            clock_offset: time::Duration::ZERO,
        }
    }

    /// This API server's clock: the machine's, skewed by `clock_offset`, whole seconds (as
    /// metav1.Time serializes).
    pub fn now(&self) -> time::OffsetDateTime {
        (time::OffsetDateTime::now_utc() + self.clock_offset)
            .replace_nanosecond(0)
            .unwrap()
    }

    /// `now`, as RFC 3339.
    pub fn now_rfc3339(&self) -> String {
        self.now()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    }

    pub(crate) fn next_rv(&mut self) -> u64 {
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
        self.history.push_back(Change {
            rv,
            res: res_key(r),
            ns: ns.into(),
            kind,
            obj: obj.clone(),
        });
        while self.history.len() > self.history_window {
            if let Some(old) = self.history.pop_front() {
                self.history_floor = old.rv;
            }
        }
    }

    /// Drops the whole event history: a watch resuming from any resourceVersion handed out so
    /// far is answered 410 Gone, as after an etcd compaction or a watch-cache re-initialisation.
    pub fn expire_history(&mut self) {
        self.history.clear();
        self.history_floor = self.rv;
    }

    /// Ends every open watch stream cleanly, as an API server restart or its watch timeout does.
    pub fn end_watches(&mut self) {
        self.watch_epoch += 1;
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
                m["creationTimestamp"] = json!(self.now_rfc3339());
            }
        }
        if r.namespaced {
            obj["metadata"]["namespace"] = json!(ns);
        }
        obj["apiVersion"] = json!(r.api_version());
        obj["kind"] = json!(r.kind);
        if let Some(spec) = obj.get_mut("spec") {
            defaults(r.kind, spec);
        }
        // metadata.generation moves on spec changes only, for the kinds whose strategies set it
        // (pkg/registry/apps/deployment/strategy.go PrepareForUpdate, same for StatefulSet,
        // DaemonSet and pkg/registry/policy/poddisruptionbudget/strategy.go).
        if matches!(
            r.kind,
            "Deployment" | "StatefulSet" | "DaemonSet" | "PodDisruptionBudget"
        ) {
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
