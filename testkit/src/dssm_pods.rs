//! The test cluster's pods made real, for rotations through Kubernetes: each dSSM pod of the
//! StatefulSets is a redis-server / redis-sentinel process of a `Topology` (a pod deleted or
//! evicted stops it, its replacement starts it again and is marked Ready once it answers PING
//! over TLS), a Secret update reaches every mount by kubelet's atomic `..data` swap after a
//! bounded delay, and TMM pods are the TMM-like clients of `load.rs` (a new TMM pod makes one
//! client reconnect with its mount's current files). A sampler counts the time with no Ready
//! TMM pod as the API server shows it.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use super::apiserver::{resource, State, StateHandle};
use super::load::{Figures, KubeletMount, Load, LoadConfig, FILES};
use super::redis::Topology;
use super::TestEnv;

/// How long kubelet takes to bring a Secret update to the mounts (a real one: up to its sync
/// period plus the cache TTL, about a minute; shorter here to keep tests short).
pub const SECRET_SYNC_DELAY: Duration = Duration::from_millis(400);
const TICK: Duration = Duration::from_millis(50);

/// `f5-dssm-db-1` → `db-1`: the topology's process for a StatefulSet pod.
fn proc_name(pod: &str) -> Option<String> {
    pod.strip_prefix("f5-dssm-").map(str::to_string)
}

fn ready(p: &Value) -> bool {
    p["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

fn terminating(p: &Value) -> bool {
    !p["metadata"]["deletionTimestamp"].is_null()
}

fn terminal(p: &Value) -> bool {
    matches!(p["status"]["phase"].as_str(), Some("Failed" | "Succeeded"))
}

fn uid(p: &Value) -> String {
    p["metadata"]["uid"].as_str().unwrap_or("").to_string()
}

/// The four mounted files of a namespace's two Secrets, if both exist.
fn secret_files(s: &State, ns: &str) -> Option<BTreeMap<String, Vec<u8>>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut files = BTreeMap::new();
    for name in ["dssm-certs-secret", "dssm-keys-secret"] {
        let secret = s.get(resource("", "secrets"), ns, name)?;
        for (k, v) in secret["data"].as_object()? {
            files.insert(k.clone(), b64.decode(v.as_str()?).ok()?);
        }
    }
    FILES
        .iter()
        .all(|f| files.contains_key(*f))
        .then_some(files)
}

fn write_files(dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    for (k, v) in files {
        std::fs::write(dir.join(k), v).unwrap();
    }
    dir.to_path_buf()
}

/// One namespace's Secrets followed by kubelet into `mounts`.
struct SecretSync {
    ns: String,
    mounts: Vec<PathBuf>,
    applied: Option<BTreeMap<String, Vec<u8>>>,
    seen: Option<(BTreeMap<String, Vec<u8>>, Instant)>,
    staging: PathBuf,
}

impl SecretSync {
    fn tick(&mut self, now: Option<BTreeMap<String, Vec<u8>>>) {
        let Some(now) = now else { return };
        if self.applied.as_ref() == Some(&now) {
            self.seen = None;
            return;
        }
        match &self.seen {
            Some((files, since)) if *files == now => {
                if since.elapsed() >= SECRET_SYNC_DELAY {
                    let dir = write_files(&self.staging, &now);
                    for m in &self.mounts {
                        KubeletMount { dir: m.clone() }.swap(&dir);
                    }
                    self.applied = Some(now);
                    self.seen = None;
                }
            }
            _ => self.seen = Some((now, Instant::now())),
        }
    }
}

/// What the stand-in kubelet saw.
#[derive(Debug, Clone, Default)]
pub struct BedFigures {
    /// Time during which some TMM namespace (one target each) had no Ready pod.
    pub no_ready_tmm: Duration,
    /// The fewest Ready TMM pods any TMM namespace had at a sample.
    pub fewest_ready_tmm: usize,
    /// Per TMM namespace: the fewest Ready pods at a sample, and the pods created (replaced).
    pub fewest_ready: BTreeMap<String, usize>,
    pub new_tmm_pods: BTreeMap<String, usize>,
    /// dSSM pods (re)started as processes by the stand-in kubelet.
    pub started: usize,
}

/// Every namespace holding a TMM target: the `--tmm` targets', else the one TMM namespace.
pub fn tmm_namespaces(env: &TestEnv) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for t in &env.tmm_targets {
        let ns = t.split('/').next().unwrap().to_string();
        if !v.contains(&ns) {
            v.push(ns);
        }
    }
    if v.is_empty() {
        v.push(env.tmm_ns.clone());
    }
    v
}

/// One TMM namespace as the stand-in kubelet follows it: its Secrets, its clients, each the
/// traffic of one pod (`owner`: pod uid → client; a namespace may have more pods than clients).
struct TmmNamespace {
    sync: SecretSync,
    rolls: Vec<Arc<AtomicU64>>,
    next_client: usize,
    seen: BTreeSet<String>,
    owner: BTreeMap<String, usize>,
}

impl TmmNamespace {
    /// A tick of the stand-in kubelet for this namespace's TMM pods. A pod deleted (or gone)
    /// drops its client's connection. A new pod takes a client (one whose pod is gone, else the
    /// next in turn), mounts the Secret as it is now (kubelet mounts a new pod's volume from the
    /// current Secret, with no sync delay), and its process connects with those files.
    fn tick(&mut self, pods: &[Value], secret: Option<&BTreeMap<String, Vec<u8>>>) -> usize {
        let live: BTreeSet<String> = pods
            .iter()
            .filter(|p| !terminating(p) && !terminal(p))
            .map(uid)
            .collect();
        let gone: Vec<String> = self
            .owner
            .keys()
            .filter(|u| !live.contains(*u))
            .cloned()
            .collect();
        let mut free: Vec<usize> = Vec::new();
        for u in gone {
            let k = self.owner.remove(&u).expect("listed above");
            bump(&self.rolls[k]);
            free.push(k);
        }
        let mut created = 0;
        for u in live {
            if !self.seen.insert(u.clone()) {
                continue;
            }
            created += 1;
            if self.rolls.is_empty() {
                continue;
            }
            let k = free.pop().unwrap_or_else(|| {
                self.next_client += 1;
                (self.next_client - 1) % self.rolls.len()
            });
            self.owner.retain(|_, c| *c != k);
            self.owner.insert(u, k);
            if let Some(files) = secret {
                let dir = write_files(&self.sync.staging.join("new-pod"), files);
                KubeletMount {
                    dir: self.sync.mounts[k].clone(),
                }
                .swap(&dir);
            }
            bump(&self.rolls[k]);
        }
        created
    }
}

/// The stand-in kubelet, running until `finish`.
pub struct Bed {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(Topology, BedFigures)>>,
    /// `--redis-endpoint` values: every dSSM pod to its process's loopback port.
    pub redis_endpoints: String,
    /// A sentinel, for `--probe-endpoint`.
    pub sentinel: String,
    pub root: PathBuf,
}

impl Bed {
    /// Starts a topology from `env`'s dSSM copy of the Secrets (each process on its own
    /// kubelet-like mount), the TMM-like clients on mounts of the TMM copies (client `i` is a
    /// pod of TMM namespace `i % n`: `cfg.clients` at least one per namespace), and the
    /// stand-in kubelet. The pods that exist are adopted as the running processes.
    pub fn start(env: &TestEnv, cfg: LoadConfig) -> (Bed, Load) {
        let handle = env.server.handle();
        let dssm_ns = env.dssm_ns.clone();
        let tmm_nss = tmm_namespaces(env);
        assert!(
            cfg.clients >= tmm_nss.len(),
            "one client at least per TMM namespace {tmm_nss:?}"
        );
        let root = env.dir.path().join("bed");
        let (dssm_files, tmm_files) = handle.with_state(|s| {
            // From now on only the stand-in kubelet says when a dSSM pod is Ready.
            s.never_ready.push("f5-dssm-".into());
            (
                secret_files(s, &dssm_ns).expect("the dSSM copy of the Secrets"),
                tmm_nss
                    .iter()
                    .map(|ns| {
                        secret_files(s, ns)
                            .unwrap_or_else(|| panic!("the copy of the Secrets in {ns}"))
                    })
                    .collect::<Vec<_>>(),
            )
        });
        assert!(
            tmm_files.iter().all(|f| *f == tmm_files[0]),
            "the TMM copies differ before the start"
        );
        let dssm_dir = write_files(&root.join("dssm-files"), &dssm_files);
        let tmm_dir = write_files(&root.join("tmm-files"), &tmm_files[0]);
        let mut topology = Topology::start_with(|_, dir| {
            KubeletMount::create(dir, &dssm_dir);
        });
        // The tool reaches each pod at its `--redis-endpoint`, fixed for the run: recreated pods
        // keep their address here (still with a fresh config, a sentinel with a new ID).
        topology.new_ip_on_restart = false;
        let load = Load::start(&topology, &tmm_dir, cfg);
        let redis_endpoints = topology
            .procs
            .iter()
            .map(|p| format!("f5-dssm-{}={}", p.name, p.endpoint()))
            .collect::<Vec<_>>()
            .join(",");
        let sentinel = topology.get("sentinel-0").endpoint();
        let mut dssm_sync = SecretSync {
            ns: dssm_ns.clone(),
            mounts: topology.procs.iter().map(|p| p.mount.clone()).collect(),
            applied: Some(dssm_files),
            seen: None,
            staging: root.join("dssm-staging"),
        };
        let rolls = load.roll_handles();
        let n = tmm_nss.len();
        let mut tmm: Vec<TmmNamespace> = tmm_nss
            .iter()
            .zip(tmm_files)
            .enumerate()
            .map(|(k, (ns, files))| {
                let mine = |i: &usize| i % n == k;
                TmmNamespace {
                    sync: SecretSync {
                        ns: ns.clone(),
                        mounts: (0..load.client_mounts.len())
                            .filter(mine)
                            .map(|i| load.client_mounts[i].dir.clone())
                            .collect(),
                        applied: Some(files),
                        seen: None,
                        staging: root.join(format!("tmm-staging-{ns}")),
                    },
                    rolls: (0..rolls.len())
                        .filter(mine)
                        .map(|i| rolls[i].clone())
                        .collect(),
                    next_client: 0,
                    seen: handle.with_state(|s| pods_of(s, ns).iter().map(uid).collect()),
                    owner: BTreeMap::new(),
                }
            })
            .collect();
        // The pods there are adopted: the first ones (by name) are the clients' pods.
        for n in &mut tmm {
            let mut live: Vec<Value> = handle.with_state(|s| pods_of(s, &n.sync.ns));
            live.retain(|p| !terminating(p) && !terminal(p));
            live.sort_by_key(|p| p["metadata"]["name"].as_str().unwrap_or("").to_string());
            for (k, p) in live.iter().take(n.rolls.len()).enumerate() {
                n.owner.insert(uid(p), k);
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut t = topology;
            let mut figures = BedFigures {
                fewest_ready_tmm: usize::MAX,
                ..Default::default()
            };
            // Adopt what runs: every dSSM pod is its process.
            let mut running: BTreeMap<String, String> = handle.with_state(|s| {
                pods_of(s, &dssm_ns)
                    .iter()
                    .filter_map(|p| {
                        let name = p["metadata"]["name"].as_str()?;
                        Some((proc_name(name)?, uid(p)))
                    })
                    .collect()
            });
            let mut last = Instant::now();
            while !stop2.load(Ordering::Relaxed) {
                let (dssm, dssm_secret, tmm_now) = handle.with_state(|s| {
                    (
                        pods_of(s, &dssm_ns),
                        secret_files(s, &dssm_sync.ns),
                        tmm.iter()
                            .map(|n| (pods_of(s, &n.sync.ns), secret_files(s, &n.sync.ns)))
                            .collect::<Vec<_>>(),
                    )
                });
                let now = Instant::now();
                let mut any_without_ready = false;
                for (n, (pods, secret)) in tmm.iter_mut().zip(tmm_now) {
                    // Ready pods as the API server shows them; a new pod is a new process.
                    let ready_tmm = pods
                        .iter()
                        .filter(|p| ready(p) && !terminating(p) && !terminal(p))
                        .count();
                    any_without_ready |= ready_tmm == 0;
                    figures.fewest_ready_tmm = figures.fewest_ready_tmm.min(ready_tmm);
                    let fewest = figures
                        .fewest_ready
                        .entry(n.sync.ns.clone())
                        .or_insert(usize::MAX);
                    *fewest = (*fewest).min(ready_tmm);
                    let created = n.tick(&pods, secret.as_ref());
                    *figures.new_tmm_pods.entry(n.sync.ns.clone()).or_default() += created;
                    n.sync.tick(secret);
                }
                if any_without_ready {
                    figures.no_ready_tmm += now - last;
                }
                last = now;
                dssm_sync.tick(dssm_secret.clone());
                // dSSM: a deleted pod stops its process, its replacement starts it on the
                // Secret as it is now (kubelet mounts a new pod's volume from the current Secret,
                // with no sync delay; subPath or not). Started on the mount as last synced, a
                // pod recreated within the delay served the old leaf and the roll's gate waited
                // out its whole step (3 of 35 runs of the SIGTERM-in-the-pause test).
                for p in &dssm {
                    let Some(name) = p["metadata"]["name"].as_str() else {
                        continue;
                    };
                    let Some(proc) = proc_name(name) else {
                        continue;
                    };
                    let id = uid(p);
                    if terminating(p) || terminal(p) {
                        if running.get(&proc) == Some(&id) {
                            t.stop_proc(&proc);
                            running.remove(&proc);
                        }
                    } else if running.get(&proc) != Some(&id) {
                        if t.running(&proc) {
                            t.stop_proc(&proc);
                        }
                        if let Some(files) = &dssm_secret {
                            let dir = write_files(&dssm_sync.staging.join("new-pod"), files);
                            KubeletMount {
                                dir: t.get(&proc).mount.clone(),
                            }
                            .swap(&dir);
                        }
                        t.start_proc(&proc);
                        figures.started += 1;
                        running.insert(proc, id.clone());
                        mark_ready(&handle, &dssm_ns, name, &id);
                    }
                }
                std::thread::sleep(TICK);
            }
            (t, figures)
        });
        (
            Bed {
                stop,
                thread: Some(thread),
                redis_endpoints,
                sentinel,
                root,
            },
            load,
        )
    }

    /// Stops the stand-in kubelet; the processes stop when the returned topology is dropped.
    pub fn finish(mut self) -> (Topology, BedFigures) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

fn pods_of(s: &State, ns: &str) -> Vec<Value> {
    s.list(resource("", "pods"), Some(ns))
        .into_iter()
        .cloned()
        .collect()
}

fn bump(roll: &AtomicU64) {
    roll.fetch_add(1, Ordering::Relaxed);
}

/// What kubelet reports once the container's readiness probe passes.
fn mark_ready(handle: &StateHandle, ns: &str, name: &str, id: &str) {
    handle.with_state(|s| {
        let pods = resource("", "pods");
        let Some(mut p) = s.get(pods, ns, name).cloned() else {
            return;
        };
        if uid(&p) != id {
            return;
        }
        let t = s.now_rfc3339();
        p["status"] = json!({"phase": "Running", "startTime": t, "conditions": [
            {"type": "Initialized", "status": "True"}, {"type": "ContainersReady", "status": "True"},
            {"type": "Ready", "status": "True", "lastTransitionTime": t}, {"type": "PodScheduled", "status": "True"}]});
        s.ready_at.insert(id.to_string(), Instant::now());
        s.put(pods, ns, p);
    });
}

/// The binary against the bed: `--redis-endpoint` maps every dSSM pod to its process, the
/// probe goes to a sentinel, and a killed run's Lease is waited out quickly.
pub fn command(env: &TestEnv, bed: &Bed, args: &[&str]) -> std::process::Command {
    command_leased(env, bed, args, "4s")
}

/// `command` with `--lease-duration lease` (a long run on a loaded machine needs more than 4 s
/// to renew its lease in time).
pub fn command_leased(
    env: &TestEnv,
    bed: &Bed,
    args: &[&str],
    lease: &str,
) -> std::process::Command {
    command_timed(env, bed, args, lease, "60s")
}

/// `command_leased` with `--wait-timeout wait` (a refusal a test expects need not wait a
/// minute).
pub fn command_timed(
    env: &TestEnv,
    bed: &Bed,
    args: &[&str],
    lease: &str,
    wait: &str,
) -> std::process::Command {
    let mut cmd = super::bin();
    // The processes run: the binary's own default strategy applies.
    cmd.env_remove("DSSM_CERTS_STRATEGY");
    cmd.env("KUBECONFIG", &env.kubeconfig)
        .env("HOME", env.dir.path())
        .env("DSSM_CERTS_REDIS_ENDPOINT", &bed.redis_endpoints)
        .args(args)
        .args(["--dssm-namespace", &env.dssm_ns])
        .args(env.tmm_args())
        .args([
            "--probe-endpoint",
            &bed.sentinel,
            "--probe-server-name",
            "f5-dssm-sentinel",
            "--wait-timeout",
            wait,
            "--lease-duration",
            lease,
            "--max-clock-skew",
            "1s",
        ]);
    cmd
}

pub fn run(env: &TestEnv, bed: &Bed, args: &[&str]) -> (i32, String, String) {
    super::output(&mut command(env, bed, args))
}

/// Stops the load and the stand-in kubelet; reads the counters back as a client holding the
/// dSSM copy of the Secrets now.
pub fn finish(bed: Bed, load: Load) -> (Figures, BedFigures) {
    let (f, b, topology) = finish_keeping(bed, load);
    drop(topology);
    (f, b)
}

/// `finish`, the processes kept running (returned) for what comes after the load.
pub fn finish_keeping(bed: Bed, load: Load) -> (Figures, BedFigures, Topology) {
    load.settle();
    let reader = bed.root.join("reader");
    let (topology, b) = bed.finish();
    let files = topology.get("db-0").mount.clone();
    std::fs::create_dir_all(&reader).unwrap();
    for f in FILES {
        std::fs::copy(files.join(f), reader.join(f)).unwrap();
    }
    let mut f = load.finish(&reader);
    f.no_ready_tmm = b.no_ready_tmm;
    f.fewest_tmm_ready = Some(b.fewest_ready_tmm);
    f.tmm_pods = b.new_tmm_pods.values().sum();
    f.with_restarts(&topology);
    (f, b, topology)
}

/// Managed materials (with the CA key in its Secret), published before the processes start.
pub fn published() -> TestEnv {
    published_on(TestEnv::spk())
}

/// `published`, on `env` (e.g. `TestEnv::spk_multi`: every TMM namespace gets its copy).
pub fn published_on(env: TestEnv) -> TestEnv {
    let (code, out, err) = env.reconcile(&["--no-restart"]);
    assert_eq!(code, 0, "{out}{err}");
    env
}

/// The seeds' materials (openssl CLI: RSA CA, v1 leaf without AKI), put by hand in both
/// namespaces, as a seed-made cluster has them.
pub fn seeded() -> TestEnv {
    seeded_on(TestEnv::spk())
}

/// `seeded`, on `env`: the seeds' copy in every namespace that holds one.
pub fn seeded_on(env: TestEnv) -> TestEnv {
    let seed = env.dir.path().join("seed");
    std::fs::create_dir_all(&seed).unwrap();
    super::seed_materials(&seed, false);
    let read = |f: &str| super::read(&seed.join(f));
    let (ca, cert, key, dh) = (
        read("dssm-ca.crt"),
        read("dssm-cert.crt"),
        read("dssm-key.key"),
        read("dhparam2048.pem"),
    );
    for ns in env.copy_namespaces() {
        env.put_secret(
            &ns,
            "dssm-certs-secret",
            &[
                ("dssm-ca.crt", &ca),
                ("dssm-cert.crt", &cert),
                ("dhparam2048.pem", &dh),
            ],
        );
        env.put_secret(&ns, "dssm-keys-secret", &[("dssm-key.key", &key)]);
    }
    env
}

/// What one rotation through the cluster showed.
pub struct Run {
    pub env: TestEnv,
    pub figures: Figures,
    pub bed: BedFigures,
    pub code: i32,
    pub out: String,
}

/// `args` run once under load against a bed started on `env`'s Secrets.
pub fn rotate_under_load(env: TestEnv, args: &[&str]) -> Run {
    rotate_under(env, LoadConfig::default(), args)
}

/// `rotate_under_load` with `cfg`'s clients.
pub fn rotate_under(env: TestEnv, cfg: LoadConfig, args: &[&str]) -> Run {
    let (bed, load) = Bed::start(&env, cfg);
    load.settle();
    let (code, out, err) = run(&env, &bed, args);
    let (figures, b) = finish(bed, load);
    Run {
        env,
        figures,
        bed: b,
        code,
        out: out + &err,
    }
}

/// `rotate` (with `--ca` if `ca`) with fast keys and `strategy` (None: the default).
pub fn rotate_args(ca: bool, strategy: Option<&str>) -> Vec<&str> {
    let mut args = vec!["rotate", "--key-algorithm", "ecdsa-p256"];
    if ca {
        args.insert(1, "--ca");
    }
    if let Some(s) = strategy {
        args.extend(["--strategy", s]);
    }
    args
}

/// The scenarios the tests assert on and the benchmark prints, each through the real binary.
pub mod scenarios {
    use super::*;

    /// What the soak showed: the load's figures over the whole year, how long each command
    /// took, and what the sentinels knew and how the failover with one of them down went.
    pub struct Soak {
        pub figures: Figures,
        pub bed: BedFigures,
        /// Per command: its arguments, its exit code, how long it ran.
        pub runs: Vec<(String, i32, Duration)>,
        pub resilience: super::super::load::scenarios::Resilience,
        pub took: Duration,
        pub out: String,
    }

    /// A year of renewals under the full load: twelve `rotate` and one `rotate --ca`, back to
    /// back, with the default key algorithm (RSA-4096) and the default strategy, through the
    /// real binary; then, the load judged, one sentinel stopped and the primary killed. Stops
    /// at the first command that fails (its output kept).
    pub fn soak() -> Soak {
        let start = Instant::now();
        let env = published();
        let cfg = LoadConfig {
            // About 16 minutes at the default rates (a SET, a GET and a tenth of a PUBLISH an
            // iteration, 100 a second): far more than the year takes, also on a loaded machine.
            max_ops: 200_000,
            ..LoadConfig::default()
        };
        let (bed, load) = Bed::start(&env, cfg);
        load.settle();
        let mut runs = Vec::new();
        let mut out = String::new();
        let year: Vec<&[&str]> = [&["rotate"][..]; 12]
            .into_iter()
            .chain([&["rotate", "--ca"][..]])
            .collect();
        for args in year {
            let at = Instant::now();
            // A 30 s lease (default 120 s): renewals at load average 30 on 2 cores missed a 4 s one.
            let (code, o, e) = super::super::output(&mut command_leased(&env, &bed, args, "30s"));
            runs.push((args.join(" "), code, at.elapsed()));
            if code != 0 {
                out = format!("{}: exit {code}\n{o}{e}", args.join(" "));
                break;
            }
        }
        let (figures, b, mut topology) = finish_keeping(bed, load);
        let resilience =
            super::super::load::scenarios::failover_with_one_sentinel_down(&mut topology);
        Soak {
            figures,
            bed: b,
            runs,
            resilience,
            took: start.elapsed(),
            out,
        }
    }

    /// (a) `rotate`: a new leaf under the same CA, with the default strategy (rolling).
    pub fn leaf_renewal() -> Run {
        rotate_under_load(published(), &rotate_args(false, None))
    }

    /// (b) `rotate --ca` from seed-made materials, rolling: three phases.
    pub fn ca_rotation() -> Run {
        rotate_under_load(seeded(), &rotate_args(true, Some("rolling")))
    }

    /// (c) `rotate --ca` from seed-made materials the seeds' way: TMM to zero, every dSSM pod
    /// at once.
    pub fn scale_to_zero() -> Run {
        rotate_under_load(seeded(), &rotate_args(true, Some("scale-to-zero")))
    }

    /// The spk-multi shape (`TestEnv::spk_multi` under the kustomize overlay's RBAC): f5-tmm
    /// in spk-ingress-a and spk-ingress-b, the DaemonSet `tmm` in bnk-tmm, one dSSM.
    pub fn multi() -> TestEnv {
        let env = TestEnv::spk_multi(&super::super::apiserver::render_overlay("spk-multi"));
        // The default grace again (spk_multi slows terminations for its RBAC exercise): the
        // rollouts of three targets in each of three phases stay short.
        env.server.with_state(|s| {
            s.timing.pod_grace = super::super::apiserver::store::Timing::default().pod_grace
        });
        env
    }

    /// One client per TMM target.
    pub fn multi_load() -> LoadConfig {
        LoadConfig {
            clients: 3,
            ..LoadConfig::default()
        }
    }

    /// (a) with three TMM targets: the leaf renewal, the default strategy.
    pub fn multi_leaf_renewal() -> Run {
        rotate_under(
            published_on(multi()),
            multi_load(),
            &rotate_args(false, None),
        )
    }

    /// (b) with three TMM targets: the three-phase CA rotation from the seeds' materials.
    pub fn multi_ca_rotation() -> Run {
        rotate_under(seeded_on(multi()), multi_load(), &rotate_args(true, None))
    }
}

/// A fresh install under load: waits (up to `timeout`) until the Secrets are published in
/// `env`'s every namespace, then starts the bed as `Bed::start` does; the dSSM pods that waited
/// for them are adopted as its processes and marked Ready, as kubelet does once they answer.
/// `on_start` gets the bed as soon as it runs; returns once the 6 dSSM pods are Ready.
/// Run beside the `reconcile` that publishes, with `f5-dssm-` in `never_ready` from the start
/// (only the bed says when a dSSM pod is Ready).
pub fn start_when_published(
    env: &TestEnv,
    cfg: LoadConfig,
    timeout: Duration,
    on_start: impl FnOnce(&Bed),
) -> (Bed, Load) {
    let handle = env.server.handle();
    let mut namespaces = vec![env.dssm_ns.clone()];
    namespaces.extend(tmm_namespaces(env));
    let start = Instant::now();
    while !handle.with_state(|s| namespaces.iter().all(|ns| secret_files(s, ns).is_some())) {
        assert!(
            start.elapsed() < timeout,
            "the Secrets were not published in {namespaces:?} within {timeout:?}"
        );
        std::thread::sleep(TICK);
    }
    let (bed, load) = Bed::start(env, cfg);
    on_start(&bed);
    // The bed adopts the pods there when its thread starts, without marking them Ready: with
    // OrderedReady a pod created meanwhile (the next ordinal) can be among them. A pod the bed
    // starts is Ready within a tick or two; one still not Ready after `ADOPTED` was adopted.
    const ADOPTED: Duration = Duration::from_secs(2);
    let mut first_seen: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        let pods = handle.with_state(|s| pods_of(s, &env.dssm_ns));
        let live: Vec<&Value> = pods
            .iter()
            .filter(|p| !terminating(p) && !terminal(p))
            .collect();
        if live.len() == 6 && live.iter().all(|p| ready(p)) {
            return (bed, load);
        }
        assert!(
            start.elapsed() < timeout,
            "the dSSM pods not all Ready: {pods:?}"
        );
        for p in live.iter().filter(|p| !ready(p)) {
            let since = *first_seen.entry(uid(p)).or_insert_with(Instant::now);
            if since.elapsed() >= ADOPTED {
                let name = p["metadata"]["name"].as_str().unwrap_or("");
                mark_ready(&handle, &env.dssm_ns, name, &uid(p));
            }
        }
        std::thread::sleep(TICK);
    }
}
