//! The rolling restart nobody notices, for dSSM: the pods observed through the API (DB or
//! sentinel, `subPath` mounts of the Secrets, where Redis listens) and through Redis itself
//! (which DB is primary), `redis::rollout`'s plan, and its execution with pods leaving through
//! the Eviction API and coming back Ready, one at a time, behind the Redis gates.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::Restarter;

use crate::cluster::ResourceExt;
use k8s_openapi::api::core::v1::Pod;

use crate::cluster::pods::PodsIn;
use crate::cluster::Cluster;
use crate::contract;
pub use crate::model::pods::{
    mounts_secrets_with_sub_path, port_role, redis_container, redis_port, DB_PORT,
};
use crate::redis::reload::Proof;
use crate::redis::rollout::{self, PodKind, Pods, RollStep, RolloutContext};
use crate::redis::{info_replication, ClientMaterials, Connection, Role, TlsClient};
use crate::restart::{pod_ready, terminating, wait_pods, RestartError};

/// `--redis-endpoint POD=HOST:PORT`: where the tool reaches one dSSM pod's Redis instead of its
/// pod IP and container port (a port-forward, a test's loopback port).
pub fn parse_redis_endpoint(s: &str) -> Result<(String, String), InvalidEndpoint> {
    let bad = |problem| InvalidEndpoint {
        value: s.to_string(),
        problem,
    };
    let (pod, endpoint) = s
        .split_once('=')
        .ok_or_else(|| bad(EndpointProblem::NotPodEqualsEndpoint))?;
    let pod = pod.trim();
    if pod.is_empty() {
        return Err(bad(EndpointProblem::NoPod));
    }
    let (host, port) = endpoint
        .trim()
        .rsplit_once(':')
        .ok_or_else(|| bad(EndpointProblem::NoPort(endpoint.to_string())))?;
    if host.is_empty() {
        return Err(bad(EndpointProblem::NoHost));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(bad(EndpointProblem::Ipv6WithoutBrackets(pod.to_string())));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((pod.to_string(), endpoint.trim().to_string())),
        _ => Err(bad(EndpointProblem::NotAPort(port.to_string()))),
    }
}

/// A `--redis-endpoint` value the command line refuses, quoting it.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{value:?}: {problem}")]
pub struct InvalidEndpoint {
    pub value: String,
    pub problem: EndpointProblem,
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum EndpointProblem {
    #[error("expected POD=HOST:PORT, e.g. f5-dssm-db-0=127.0.0.1:6379")]
    NotPodEqualsEndpoint,
    #[error("the pod name is missing")]
    NoPod,
    #[error("{0:?} has no :PORT")]
    NoPort(String),
    #[error("the host is missing")]
    NoHost,
    #[error("an IPv6 address needs brackets, e.g. {0}=[fd00::2]:6379")]
    Ipv6WithoutBrackets(String),
    #[error("{0:?} is not a port (1-65535)")]
    NotAPort(String),
}

/// A sentinel by its `app` label (or, without one, by its Redis container's port: named
/// `sentinel` or 26379; or by its name); every other dSSM pod is a DB.
pub fn pod_kind(p: &Pod) -> PodKind {
    let sentinel = match p.labels().get("app") {
        Some(app) => app.contains("sentinel"),
        None => {
            let port = p.spec.as_ref().and_then(|s| {
                let c = redis_container(s).ok()?;
                c.ports
                    .iter()
                    .flatten()
                    .find(|port| port_role(port).is_some())
            });
            match port.and_then(port_role) {
                Some(kind) => kind == PodKind::Sentinel,
                None => p.name_any().contains("sentinel"),
            }
        }
    };
    if sentinel {
        PodKind::Sentinel
    } else {
        PodKind::Db
    }
}

/// `host:port` as a socket address is written: an IPv6 host in brackets.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Where the tool reaches a pod's Redis: the override, else its pod IP and the port of its
/// Redis container (`redis_container`, `redis_port`).
pub fn pod_endpoint(
    p: &Pod,
    overrides: &BTreeMap<String, String>,
) -> Result<String, PodEndpointError> {
    let name = p.name_any();
    if let Some(e) = overrides.get(&name) {
        return Ok(e.clone());
    }
    let namespace = p.namespace().unwrap_or_default();
    let ip = p
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .filter(|ip| !ip.is_empty())
        .ok_or_else(|| PodEndpointError::NoIp {
            namespace: namespace.clone(),
            pod: name.clone(),
        })?;
    let ip: std::net::IpAddr = ip.parse().map_err(|source| PodEndpointError::BadIp {
        namespace: namespace.clone(),
        pod: name.clone(),
        ip: ip.clone(),
        source,
    })?;
    let spec = p.spec.clone().unwrap_or_default();
    let c = redis_container(&spec).map_err(|source| PodEndpointError::NoRedis {
        namespace,
        pod: name.clone(),
        source,
    })?;
    Ok(join_host_port(&ip.to_string(), redis_port(c, pod_kind(p))))
}

/// Why the tool cannot tell where a dSSM pod's Redis listens; each says how to reach it anyway.
#[derive(Debug, thiserror::Error)]
pub enum PodEndpointError {
    #[error("pod {namespace}/{pod} has no pod IP yet; pass --redis-endpoint {pod}=HOST:PORT to reach it another way")]
    NoIp { namespace: String, pod: String },
    #[error("pod {namespace}/{pod}: pod IP {ip:?} is not an address ({source}); pass --redis-endpoint {pod}=HOST:PORT to reach it another way")]
    BadIp {
        namespace: String,
        pod: String,
        ip: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error("pod {namespace}/{pod}: {source}; pass --redis-endpoint {pod}=HOST:PORT to reach it another way")]
    NoRedis {
        namespace: String,
        pod: String,
        #[source]
        source: crate::model::pods::NoRedisContainer,
    },
}

/// Why the Redis side of dSSM's roll failed, with its cause.
#[derive(Debug, thiserror::Error)]
pub enum DssmRollError {
    #[error("{0}")]
    Tls(#[from] crate::redis::tls::TlsSetupError),
    #[error("{0}")]
    Plan(#[from] rollout::RolloutPlanError),
    #[error("{0}")]
    Roll(#[from] rollout::RolloutError),
    /// A DB whose role the tool cannot ask (its Redis unreachable or not answering).
    #[error("pod {namespace}/{pod}: cannot reach its Redis: {source}")]
    Unreachable {
        namespace: String,
        pod: String,
        #[source]
        source: Box<crate::redis::RedisError>,
    },
    #[error("pod {namespace}/{pod}: {source}")]
    Observe {
        namespace: String,
        pod: String,
        #[source]
        source: Box<crate::redis::RedisError>,
    },
    /// A sentinel the pre-flight of a CA rotation's phase refuses.
    #[error("sentinel pod {namespace}/{pod}: {problem}")]
    Sentinel {
        namespace: String,
        pod: String,
        #[source]
        problem: SentinelProblem,
    },
}

/// What the pre-flight found wrong with one sentinel.
#[derive(Debug, thiserror::Error)]
pub enum SentinelProblem {
    #[error("cannot reach it: {0}")]
    Unreachable(#[source] Box<crate::redis::RedisError>),
    #[error("SENTINEL CKQUORUM {master}: {source}")]
    NoQuorum {
        master: String,
        #[source]
        source: Box<crate::redis::RedisError>,
    },
    #[error("it does not know the master name {0:?}")]
    UnknownMaster(String),
    #[error("{0}")]
    Redis(#[source] Box<crate::redis::RedisError>),
}

/// How the tool talks to dSSM during a rolling restart.
#[derive(Debug, Clone)]
pub struct RedisAccess {
    /// Pod name → `host:port` overrides (`--redis-endpoint`).
    pub endpoints: BTreeMap<String, String>,
    /// The name Sentinel monitors the primary under.
    pub master: String,
}

impl Default for RedisAccess {
    fn default() -> Self {
        RedisAccess {
            endpoints: BTreeMap::new(),
            master: crate::redis::DEFAULT_MASTER_NAME.to_string(),
        }
    }
}

/// What new handshakes must show once every dSSM process runs a phase's materials, beyond
/// serving the leaf of the dSSM copy and accepting it as a client.
#[derive(Default)]
pub struct PhaseProof {
    /// Client materials every process must accept (e.g. a leaf of the new CA in phase trust).
    pub accepts: Vec<ClientMaterials>,
    /// Client materials every process must refuse (the old CA's leaf once it is dropped).
    pub refuses: Vec<ClientMaterials>,
    /// The sentinels are not restarted (the DBs only reload), unless a DB must restart (a
    /// `subPath` mount), whose switchover and gates need them.
    pub keep_sentinels: bool,
}

/// The dSSM pods as the eviction side of the rollout sees them.
struct ClusterPods {
    api: PodsIn,
    selector: String,
    overrides: BTreeMap<String, String>,
    endpoints: BTreeMap<String, String>,
    uids: BTreeMap<String, String>,
    /// Each pod's kind, for the restarts counted per kind.
    kinds: BTreeMap<String, PodKind>,
    /// Pods that already run the materials (`skip_proven`): their restart step is a no-op.
    proven: std::collections::BTreeSet<String>,
    runtime: tokio::runtime::Handle,
}

impl Pods for ClusterPods {
    fn endpoint(&self, pod: &str) -> String {
        self.endpoints.get(pod).cloned().unwrap_or_default()
    }

    /// Evicts the pod (PDBs respected) and returns once its controller's replacement (same
    /// name, new uid) is Ready, at its new address.
    fn restart(&mut self, pod: &str, deadline: Instant) -> Result<(), rollout::PodRestartError> {
        if self.proven.contains(pod) {
            return Ok(());
        }
        let old_uid = self.uids.get(pod).cloned().unwrap_or_default();
        let left = deadline.saturating_duration_since(Instant::now());
        let tokio_deadline = tokio::time::Instant::now() + left;
        let what = format!(
            "pod {}/{pod} to come back Running and Ready",
            self.api.namespace()
        );
        let (api, sel) = (&self.api, &self.selector);
        let name = pod.to_string();
        let back = self.runtime.block_on(async {
            api.evict(&name, tokio_deadline).await?;
            let now = wait_pods(api, sel, &what, left.max(Duration::from_secs(1)), |now| {
                now.get(&name).is_some_and(|p| {
                    p.uid().as_deref() != Some(old_uid.as_str()) && !terminating(p) && pod_ready(p)
                })
            })
            .await?;
            Ok::<_, RestartError>(now.get(&name).cloned())
        });
        let p = back?.ok_or_else(|| format!("pod {}/{pod} vanished", self.api.namespace()))?;
        use crate::model::restarts::{count, Kind};
        match self.kinds.get(pod) {
            Some(PodKind::Sentinel) => count(Kind::SentinelRestart, 1),
            _ => count(Kind::DbRestart, 1),
        }
        self.uids
            .insert(pod.to_string(), p.uid().unwrap_or_default());
        self.endpoints
            .insert(pod.to_string(), pod_endpoint(&p, &self.overrides)?);
        Ok(())
    }
}

/// The copy of the materials in `ns`, as a client, with its leaf's fingerprint; None when its
/// leaf and key do not match (a copy caught between its two Secret writes by a crash).
async fn client_from_copy(
    cluster: &Cluster,
    ns: &str,
) -> Result<Option<(ClientMaterials, String)>, RestartError> {
    let certs = cluster.get_secret(ns, contract::CERTS_SECRET).await?;
    let keys = cluster.get_secret(ns, contract::KEYS_SECRET).await?;
    let get = |s: &Option<k8s_openapi::api::core::v1::Secret>,
               secret: &'static str,
               key: &'static str| {
        s.as_ref()
            .and_then(|s| s.data.as_ref())
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
            .ok_or_else(|| RestartError::MissingKey {
                namespace: ns.to_string(),
                secret,
                key,
            })
    };
    let ca_cert = get(&certs, contract::CERTS_SECRET, contract::CA_CERT)?;
    let leaf_cert = get(&certs, contract::CERTS_SECRET, contract::LEAF_CERT)?;
    let key = get(&keys, contract::KEYS_SECRET, contract::LEAF_KEY)?;
    let at = format!("{ns}/{}[{}]", contract::KEYS_SECRET, contract::LEAF_KEY);
    let leaf_key = crate::pki::PrivateKey::from_pem(&key, &at).map_err(RestartError::ClientKey)?;
    let leaf = crate::pki::parse_certificate(
        &leaf_cert,
        &format!("{ns}/{}[{}]", contract::CERTS_SECRET, contract::LEAF_CERT),
    )
    .map_err(RestartError::ClientCert)?;
    if !leaf.matches_key(&leaf_key) {
        return Ok(None);
    }
    let fingerprint = leaf.sha256_fingerprint.clone();
    Ok(Some((
        ClientMaterials {
            ca_cert,
            leaf_cert,
            leaf_key,
        },
        fingerprint,
    )))
}

/// The dSSM copy of the materials, as the tool's client for this phase.
async fn dssm_client(cluster: &Cluster) -> Result<(ClientMaterials, String), RestartError> {
    let ns = &cluster.dssm_ns;
    client_from_copy(cluster, ns)
        .await?
        .ok_or_else(|| RestartError::LeafKeyMismatch {
            namespace: ns.to_string(),
        })
}

/// A client the running dSSM processes accept before the writes: the dSSM copy, or, when a
/// crash left it between its two Secret writes (a resumed run completes it), the first TMM
/// copy whose leaf matches its key: the copies are written dSSM's first, so TMM's is intact.
async fn preflight_client(cluster: &Cluster) -> Result<(ClientMaterials, String), RestartError> {
    if let Some(c) = client_from_copy(cluster, &cluster.dssm_ns).await? {
        return Ok(c);
    }
    for ns in crate::model::targets::namespaces(&cluster.targets) {
        if let Some(c) = client_from_copy(cluster, &ns).await? {
            return Ok(c);
        }
    }
    dssm_client(cluster).await
}

/// Everything a dSSM rollout needs, read before anything is touched.
struct Prepared {
    pods: ClusterPods,
    live: Vec<Pod>,
    materials: ClientMaterials,
    fingerprint: String,
}

impl Restarter<'_> {
    async fn prepare_dssm(
        &self,
        access: &RedisAccess,
        preflight: bool,
    ) -> Result<Prepared, RestartError> {
        let api = self.cluster.pods_in(&self.cluster.dssm_ns);
        let sel = self.cluster.dssm_selector.clone();
        let list = api.list(&sel).await?;
        let live: Vec<Pod> = list
            .into_iter()
            .filter(|p| !terminating(p) && !crate::restart::ended(p))
            .collect();
        let names: Vec<String> = live.iter().map(|p| p.name_any()).collect();
        if let Some(stray) = access.endpoints.keys().find(|k| !names.contains(k)) {
            return Err(RestartError::StrayEndpoint {
                pod: stray.clone(),
                namespace: self.cluster.dssm_ns.clone(),
                selector: sel,
                pods: names,
            });
        }
        let mut endpoints = BTreeMap::new();
        let mut uids = BTreeMap::new();
        let kinds = live.iter().map(|p| (p.name_any(), pod_kind(p))).collect();
        for p in &live {
            endpoints.insert(p.name_any(), pod_endpoint(p, &access.endpoints)?);
            uids.insert(p.name_any(), p.uid().unwrap_or_default());
        }
        let (materials, fingerprint) = if preflight {
            preflight_client(self.cluster).await?
        } else {
            dssm_client(self.cluster).await?
        };
        Ok(Prepared {
            pods: ClusterPods {
                api,
                selector: sel,
                overrides: access.endpoints.clone(),
                endpoints,
                uids,
                kinds,
                proven: Default::default(),
                runtime: tokio::runtime::Handle::current(),
            },
            live,
            materials,
            fingerprint,
        })
    }

    /// The rolling restart's own pre-flight, before anything is written: every dSSM pod's Redis
    /// answers with the deployed materials, exactly one DB is primary, and the plan is safe.
    pub async fn check_dssm_rollout(&self, access: &RedisAccess) -> Result<(), RestartError> {
        let p = self.prepare_dssm(access, true).await?;
        let ns = self.cluster.dssm_ns.clone();
        tokio::task::spawn_blocking(move || {
            let tool = TlsClient::new(&p.materials, crate::redis::ClientIdentity::Presented)?;
            let observed = observe(&p.live, &p.pods, &tool, contract::SENTINEL_SERVICE, &ns)?;
            Ok::<_, DssmRollError>(rollout::plan(&observed)?)
        })
        .await
        .expect("the dSSM rollout check panicked")
        .map(drop)
        .map_err(|e| RestartError::DssmRoll(Box::new(e)))
    }

    /// Every sentinel pod answers `SENTINEL CKQUORUM` for `access.master` and knows its primary
    /// (`get-master-addr-by-name`), reached with the deployed materials: part of the pre-flight
    /// before each phase of a CA rotation.
    pub async fn check_sentinels(&self, access: &RedisAccess) -> Result<(), RestartError> {
        let p = self.prepare_dssm(access, true).await?;
        let (ns, master) = (self.cluster.dssm_ns.clone(), access.master.clone());
        tokio::task::spawn_blocking(move || {
            let tool = TlsClient::new(&p.materials, crate::redis::ClientIdentity::Presented)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            let sentinels = p.live.iter().filter(|x| pod_kind(x) == PodKind::Sentinel);
            for pod in sentinels {
                let name = pod.name_any();
                let refused = |problem| DssmRollError::Sentinel {
                    namespace: ns.clone(),
                    pod: name.clone(),
                    problem,
                };
                let endpoint = p.pods.endpoint(&name);
                let server_name = contract::SENTINEL_SERVICE;
                let mut c = Connection::connect(&tool, &endpoint, server_name, deadline)
                    .map_err(|e| refused(SentinelProblem::Unreachable(Box::new(e))))?;
                crate::redis::sentinel::ckquorum(&mut c, &master, deadline).map_err(|source| {
                    refused(SentinelProblem::NoQuorum {
                        master: master.clone(),
                        source: Box::new(source),
                    })
                })?;
                match crate::redis::sentinel::primary_addr(&mut c, &master, deadline) {
                    Ok(Some(_)) => {}
                    Ok(None) => return Err(refused(SentinelProblem::UnknownMaster(master))),
                    Err(e) => return Err(refused(SentinelProblem::Redis(Box::new(e)))),
                }
            }
            Ok(())
        })
        .await
        .expect("the sentinel check panicked")
        .map_err(|e| RestartError::DssmRoll(Box::new(e)))
    }

    /// Rolls the dSSM pods the Redis-aware way: DBs reload in place (restarted where `subPath`
    /// hides kubelet's update: replicas first, the primary last after a paused switchover),
    /// sentinels one at a time behind CKQUORUM. Nothing is evicted unless every pod was
    /// observed, its Redis reached and exactly one primary found.
    pub async fn roll_dssm(
        &self,
        access: &RedisAccess,
        extra: PhaseProof,
        step_timeout: Duration,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), RestartError> {
        let Prepared {
            mut pods,
            live,
            materials,
            fingerprint,
        } = self.prepare_dssm(access, false).await?;
        let server_name = contract::SENTINEL_SERVICE.to_string();
        let master = access.master.clone();
        let ns = self.cluster.dssm_ns.clone();
        let _ = writeln!(
            out,
            "dSSM pods in {} roll one at a time:",
            self.cluster.dssm_ns
        );
        // The Redis side blocks (its own deadlines): on a blocking thread, with the API calls
        // of the restarts sent back to this runtime, and its progress lines sent back to `out`
        // as they happen.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let work = tokio::task::spawn_blocking(move || {
            let tool = TlsClient::new(&materials, crate::redis::ClientIdentity::Presented)?;
            let clients = ProofClients::new(&materials, &extra)?;
            let observed = observe(&live, &pods, &tool, &server_name, &ns)?;
            let mut steps = rollout::plan(&observed)?;
            if extra.keep_sentinels {
                keep_sentinels(&mut steps);
            }
            let proof = clients.proof(fingerprint);
            let say = |line: String| drop(tx.send(line));
            pods.proven = skip_proven(&mut steps, &pods, (&tool, &server_name), &proof, say);
            for s in &steps {
                let _ = tx.send(format!("  plan: {s}"));
            }
            let proven = pods.proven.clone();
            let cx = RolloutContext {
                tls: &tool,
                server_name: &server_name,
                master: &master,
                proof,
                step_timeout,
                reload_timeout: step_timeout,
            };
            rollout::execute(&steps, &mut pods, &cx, |s: &RollStep, took| {
                let _ = tx.send(done_line(s, took, &proven));
            })?;
            Ok::<_, DssmRollError>(())
        });
        while let Some(line) = rx.recv().await {
            let _ = writeln!(out, "{line}");
        }
        work.await
            .expect("the dSSM rollout panicked")
            .map_err(|e| RestartError::DssmRoll(Box::new(e)))
    }
}

/// The clients of a phase's proof handshakes. What must be accepted is pinned to the deployed
/// leaf (the dSSM copy's): served byte for byte, verified on the path that leaf decides,
/// whatever is served. What must be refused is a plain client of its materials.
struct ProofClients {
    pinned: TlsClient,
    accepts: Vec<TlsClient>,
    refuses: Vec<TlsClient>,
}

impl ProofClients {
    fn new(
        materials: &ClientMaterials,
        extra: &PhaseProof,
    ) -> Result<Self, crate::redis::tls::TlsSetupError> {
        let deployed = &materials.leaf_cert;
        let pin = |m: &ClientMaterials| {
            TlsClient::pinned_to(m, crate::redis::ClientIdentity::Presented, deployed)
        };
        Ok(ProofClients {
            pinned: pin(materials)?,
            accepts: extra.accepts.iter().map(pin).collect::<Result<_, _>>()?,
            refuses: (extra.refuses.iter())
                .map(|m| TlsClient::new(m, crate::redis::ClientIdentity::Presented))
                .collect::<Result<_, _>>()?,
        })
    }

    /// The proof: `fingerprint` served, these clients accepted and refused.
    fn proof(&self, fingerprint: String) -> Proof<'_> {
        Proof {
            serves: Some(fingerprint),
            accepts: std::iter::once(&self.pinned).chain(&self.accepts).collect(),
            refuses: self.refuses.iter().collect(),
        }
    }
}

/// The progress line of a finished roll step: a restart the resumed run skipped says so.
fn done_line(s: &RollStep, took: Duration, proven: &std::collections::BTreeSet<String>) -> String {
    let restart = matches!(
        s,
        RollStep::RestartSentinel { .. } | RollStep::RestartDb { .. }
    );
    if restart && proven.contains(s.pod()) {
        format!(
            "  not restarted: {}: it already runs these materials",
            s.pod()
        )
    } else {
        format!("  done: {s} ({:.1} s)", took.as_secs_f64())
    }
}

/// The pods that already run these materials, proven by new handshakes (they serve the current
/// leaf, accept the tool's client and the phase's others, refuse what the phase refuses): a pod
/// restarted by a run killed mid-way through the roll is not restarted again by the run that
/// resumes it. Their reloads and switchovers leave the plan; their restart steps stay (the
/// rollout names the sentinels by them) and are no-ops (`ClusterPods::restart`); their gates
/// stay (cheap, and the killed run may have died before them).
fn skip_proven(
    steps: &mut Vec<RollStep>,
    pods: &ClusterPods,
    (tool, server_name): (&TlsClient, &str),
    proof: &Proof<'_>,
    say: impl Fn(String),
) -> std::collections::BTreeSet<String> {
    let mut proven = std::collections::BTreeSet::new();
    for s in steps.iter() {
        if let RollStep::ReloadDb { pod }
        | RollStep::RestartDb { pod }
        | RollStep::RestartSentinel { pod } = s
        {
            let deadline = Instant::now() + Duration::from_secs(5);
            let endpoint = pods.endpoint(pod);
            if crate::redis::reload::check_proof(tool, &endpoint, server_name, proof, deadline)
                .is_ok()
            {
                proven.insert(pod.clone());
            }
        }
    }
    steps.retain(|s| match s {
        RollStep::ReloadDb { pod } | RollStep::Switchover { from: pod } => !proven.contains(pod),
        _ => true,
    });
    for pod in &proven {
        say(format!(
            "  skip: {pod}: already runs these materials (proven by new handshakes): not restarted or reloaded again"
        ));
    }
    proven
}

/// Leaves the sentinel steps out of a plan whose DBs all reload in place; a plan that restarts
/// a DB keeps them (the switchover and the DB gates ask the sentinels named by them).
fn keep_sentinels(steps: &mut Vec<RollStep>) {
    let only_reloads = steps.iter().all(|s| {
        matches!(
            s,
            RollStep::ReloadDb { .. }
                | RollStep::RestartSentinel { .. }
                | RollStep::SentinelInQuorum { .. }
                | RollStep::ForgetGone { .. }
        )
    });
    if only_reloads {
        steps.retain(|s| matches!(s, RollStep::ReloadDb { .. }));
    }
}

/// The live dSSM pods as the rollout plan sees them; the primary is whichever DB says so.
fn observe(
    live: &[Pod],
    pods: &ClusterPods,
    tool: &TlsClient,
    server_name: &str,
    ns: &str,
) -> Result<Vec<rollout::Pod>, DssmRollError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    live.iter()
        .map(|p| {
            let name = p.name_any();
            let kind = pod_kind(p);
            let primary = match kind {
                PodKind::Sentinel => false,
                PodKind::Db => {
                    let endpoint = pods.endpoint(&name);
                    let mut c = Connection::connect(tool, &endpoint, server_name, deadline)
                        .map_err(|source| DssmRollError::Unreachable {
                            namespace: ns.to_string(),
                            pod: name.clone(),
                            source: Box::new(source),
                        })?;
                    info_replication(&mut c, deadline)
                        .map_err(|source| DssmRollError::Observe {
                            namespace: ns.to_string(),
                            pod: name.clone(),
                            source: Box::new(source),
                        })?
                        .role
                        == Role::Primary
                }
            };
            Ok(rollout::Pod {
                name,
                kind,
                primary,
                sub_path: mounts_secrets_with_sub_path(p),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn redis_endpoint_overrides_are_validated_naming_the_flag_value() {
        assert_eq!(
            parse_redis_endpoint("f5-dssm-db-0=127.0.0.1:6390"),
            Ok(("f5-dssm-db-0".into(), "127.0.0.1:6390".into()))
        );
        assert!(parse_redis_endpoint("x=[::1]:1").is_ok());
        for (bad, says) in [
            ("f5-dssm-db-0", "expected POD=HOST:PORT"),
            ("=127.0.0.1:1", "pod name is missing"),
            ("a=127.0.0.1", "has no :PORT"),
            ("a=:6379", "host is missing"),
            ("a=h:0", "is not a port"),
            ("a=h:65536", "is not a port"),
            ("a=fd00::2:6379", "needs brackets"),
        ] {
            let e = parse_redis_endpoint(bad).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn kind_sub_path_and_endpoint_come_from_the_pod_spec() {
        let db = pod(json!({
            "metadata": {"name": "f5-dssm-db-1", "namespace": "u", "labels": {"app": "f5-dssm-db"}},
            "spec": {
                "containers": [{"name": "redis", "ports": [{"containerPort": 6390}],
                    "volumeMounts": [{"name": "certs", "mountPath": "/etc/ssl/certs/dssm-cert.crt", "subPath": "dssm-cert.crt"}]}],
                "volumes": [{"name": "certs", "secret": {"secretName": "dssm-certs-secret"}}]},
            "status": {"podIP": "10.0.0.7"}
        }));
        assert_eq!(pod_kind(&db), PodKind::Db);
        assert!(mounts_secrets_with_sub_path(&db));
        assert_eq!(
            pod_endpoint(&db, &BTreeMap::new()).unwrap(),
            "10.0.0.7:6390"
        );
        let over = BTreeMap::from([("f5-dssm-db-1".to_string(), "127.0.0.1:7000".to_string())]);
        assert_eq!(pod_endpoint(&db, &over).unwrap(), "127.0.0.1:7000");

        // A subPath of another volume does not count; a sentinel without ports gets 26379.
        let sentinel = pod(json!({
            "metadata": {"name": "f5-dssm-sentinel-0", "namespace": "u", "labels": {"app": "f5-dssm-sentinel"}},
            "spec": {
                "containers": [{"name": "s", "volumeMounts": [
                    {"name": "conf", "mountPath": "/etc/x", "subPath": "x"},
                    {"name": "certs", "mountPath": "/etc/ssl/certs"}]}],
                "volumes": [{"name": "conf", "configMap": {"name": "c"}},
                    {"name": "certs", "projected": {"sources": [{"secret": {"name": "dssm-keys-secret"}}]}}]},
            "status": {"podIP": "fd00::5"}
        }));
        assert_eq!(pod_kind(&sentinel), PodKind::Sentinel);
        assert!(!mounts_secrets_with_sub_path(&sentinel));
        assert_eq!(
            pod_endpoint(&sentinel, &BTreeMap::new()).unwrap(),
            "[fd00::5]:26379"
        );

        let pending = pod(
            json!({"metadata": {"name": "f5-dssm-db-2", "namespace": "u"}, "spec": {"containers": []}}),
        );
        let e = pod_endpoint(&pending, &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("u/f5-dssm-db-2") && e.contains("--redis-endpoint f5-dssm-db-2="),
            "{e}"
        );
    }

    /// The SPK procedure lists each dSSM pod as 2/2 Running: Redis and a sidecar. A sidecar
    /// that declares a port and is listed first was taken for Redis ("the first container's
    /// first port"), and `rotate` was refused.
    #[test]
    fn a_sidecar_listed_first_is_not_taken_for_redis() {
        let certs = json!([{"name": "certs", "secret": {"secretName": "dssm-certs-secret"}}]);
        let mount = json!([{"name": "certs", "mountPath": "/etc/ssl/certs/dssm-cert.crt", "subPath": "dssm-cert.crt"}]);
        let sidecar =
            json!({"name": "metrics", "ports": [{"name": "metrics", "containerPort": 9121}]});
        let with = |labels: serde_json::Value, redis: serde_json::Value, ip: &str| {
            pod(json!({
                "metadata": {"name": "f5-dssm-x-0", "namespace": "u", "labels": labels},
                "spec": {"containers": [sidecar.clone(), redis], "volumes": certs.clone()},
                "status": {"podIP": ip}
            }))
        };
        let none = BTreeMap::new();
        // By the port's name (the number is the operator's).
        let p = with(
            json!({"app": "f5-dssm-db"}),
            json!({"name": "f5-dssm-store", "ports": [{"name": "redis", "containerPort": 6380}], "volumeMounts": mount.clone()}),
            "10.1.0.4",
        );
        assert_eq!(pod_endpoint(&p, &none).unwrap(), "10.1.0.4:6380");
        assert!(mounts_secrets_with_sub_path(&p));
        // By Redis's own number, among other ports.
        let p = with(
            json!({"app": "f5-dssm-sentinel"}),
            json!({"name": "s", "ports": [{"containerPort": 8080}, {"containerPort": 26379}]}),
            "fd00::2",
        );
        assert_eq!(pod_endpoint(&p, &none).unwrap(), "[fd00::2]:26379");
        // By the mount, when Redis declares no port: the default of its kind. Without the app
        // label, a port named sentinel says what it is.
        let p = with(
            json!({"app": "f5-dssm-db"}),
            json!({"name": "r", "volumeMounts": mount.clone()}),
            "10.1.0.5",
        );
        assert_eq!(pod_endpoint(&p, &none).unwrap(), "10.1.0.5:6379");
        let p = with(
            json!({}),
            json!({"name": "s", "ports": [{"name": "sentinel", "containerPort": 5000}]}),
            "10.1.0.6",
        );
        assert_eq!(pod_kind(&p), PodKind::Sentinel);
        // A sidecar's subPath mount does not make Redis's mounts subPath ones.
        let p = pod(json!({
            "metadata": {"name": "f5-dssm-db-0", "namespace": "u", "labels": {"app": "f5-dssm-db"}},
            "spec": {"containers": [
                {"name": "tls-proxy", "ports": [{"containerPort": 8443}], "volumeMounts": mount.clone()},
                {"name": "redis", "ports": [{"containerPort": 6379}],
                 "volumeMounts": [{"name": "certs", "mountPath": "/etc/ssl/certs"}]}],
                "volumes": certs.clone()}
        }));
        assert!(!mounts_secrets_with_sub_path(&p));
        // Nothing recognisable: refused, naming the pod, its containers and the way out.
        let p = with(
            json!({"app": "f5-dssm-db"}),
            json!({"name": "other", "ports": [{"containerPort": 7000}]}),
            "10.1.0.7",
        );
        let e = pod_endpoint(&p, &none).unwrap_err().to_string();
        for says in [
            "u/f5-dssm-x-0",
            "metrics, other",
            "--redis-endpoint f5-dssm-x-0=",
        ] {
            assert!(e.contains(says), "{says}: {e}");
        }
        // A pod IP that is not an address is named, never joined as it is.
        let p = with(
            json!({"app": "f5-dssm-db"}),
            json!({"name": "redis", "ports": [{"name": "redis", "containerPort": 6379}]}),
            "10.0.0.1:6379",
        );
        assert!(pod_endpoint(&p, &none)
            .unwrap_err()
            .to_string()
            .contains("is not an address"));
    }

    /// The proofs' pin: a served leaf other than the deployed one, even one the deployed CA
    /// signed for the same name (the unpinned client, whose path came from the served
    /// certificate, accepts it), is refused naming both fingerprints; the deployed leaf passes.
    #[test]
    fn a_proof_refuses_a_valid_leaf_that_is_not_the_deployed_one() {
        use crate::pki::issue::{
            default_ca_subject, default_leaf_subject, issue_ca, issue_leaf, CaSigner, LeafRequest,
        };
        use crate::pki::{KeyAlgorithm, PrivateKey};
        use rustls::client::danger::ServerCertVerifier;
        let now = time::OffsetDateTime::now_utc();
        let key = || PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let ca_key = key();
        let ca = issue_ca(&default_ca_subject(), 365, &ca_key, now).unwrap();
        let signer = CaSigner {
            cert_pem: ca.as_bytes(),
            key: &ca_key,
            cert_name: "ca",
            key_name: "ca key",
        };
        let names = vec![contract::SENTINEL_SERVICE.to_string()];
        let subject = default_leaf_subject();
        let request = LeafRequest {
            subject: &subject,
            days: 30,
            dns_names: &names,
        };
        let leaf = |k: &PrivateKey| issue_leaf(&request, k, &signer, now).unwrap().pem;
        let (k1, k2) = (key(), key());
        let other = crate::pki::parse_certificate(leaf(&k2).as_bytes(), "other").unwrap();
        let m = ClientMaterials {
            ca_cert: ca.clone().into_bytes(),
            leaf_cert: leaf(&k1).into_bytes(),
            leaf_key: k1,
        };
        let deployed = crate::pki::parse_certificate(&m.leaf_cert, "deployed").unwrap();
        let name = rustls::pki_types::ServerName::try_from(contract::SENTINEL_SERVICE).unwrap();
        let verify = |c: &TlsClient, served: &crate::pki::Certificate| {
            let der = rustls::pki_types::CertificateDer::from(served.der().to_vec());
            c.verifier
                .verify_server_cert(&der, &[], &name, &[], rustls::pki_types::UnixTime::now())
                .map(drop)
                .map_err(|e| e.to_string())
        };
        let unpinned = TlsClient::new(&m, crate::redis::ClientIdentity::Presented).unwrap();
        assert_eq!(
            verify(&unpinned, &other),
            Ok(()),
            "the unpinned path takes it"
        );
        let pinned =
            TlsClient::pinned_to(&m, crate::redis::ClientIdentity::Presented, &m.leaf_cert)
                .unwrap();
        let e = verify(&pinned, &other).unwrap_err();
        assert!(
            e.contains(&other.sha256_fingerprint)
                && e.contains(&deployed.sha256_fingerprint)
                && e.contains("not the deployed leaf"),
            "{e}"
        );
        assert_eq!(verify(&pinned, &deployed), Ok(()));
    }
}
