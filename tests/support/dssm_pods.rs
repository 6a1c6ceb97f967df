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
#[derive(Debug, Clone, Copy, Default)]
pub struct BedFigures {
    pub no_ready_tmm: Duration,
    pub fewest_ready_tmm: usize,
    /// dSSM pods (re)started as processes by the stand-in kubelet.
    pub started: usize,
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
    /// kubelet-like mount), the TMM-like clients on mounts of the TMM copy, and the stand-in
    /// kubelet. The pods that exist are adopted as the running processes.
    pub fn start(env: &TestEnv, cfg: LoadConfig) -> (Bed, Load) {
        let handle = env.server.handle();
        let (dssm_ns, tmm_ns) = (env.dssm_ns.clone(), env.tmm_ns.clone());
        let root = env.dir.path().join("bed");
        let (dssm_files, tmm_files) = handle.with_state(|s| {
            // From now on only the stand-in kubelet says when a dSSM pod is Ready.
            s.never_ready.push("f5-dssm-".into());
            (
                secret_files(s, &dssm_ns).expect("the dSSM copy of the Secrets"),
                secret_files(s, &tmm_ns).expect("the TMM copy of the Secrets"),
            )
        });
        let dssm_dir = write_files(&root.join("dssm-files"), &dssm_files);
        let tmm_dir = write_files(&root.join("tmm-files"), &tmm_files);
        let topology = Topology::start_with(|_, dir| {
            KubeletMount::create(dir, &dssm_dir);
        });
        let load = Load::start(&topology, &tmm_dir, cfg);
        let redis_endpoints = topology
            .procs
            .iter()
            .map(|p| format!("f5-dssm-{}=127.0.0.1:{}", p.name, p.port))
            .collect::<Vec<_>>()
            .join(",");
        let sentinel = format!("127.0.0.1:{}", topology.get("sentinel-0").port);
        let mut dssm_sync = SecretSync {
            ns: dssm_ns.clone(),
            mounts: topology.procs.iter().map(|p| p.mount.clone()).collect(),
            applied: Some(dssm_files),
            seen: None,
            staging: root.join("dssm-staging"),
        };
        let mut tmm_sync = SecretSync {
            ns: tmm_ns.clone(),
            mounts: load.client_mounts.iter().map(|m| m.dir.clone()).collect(),
            applied: Some(tmm_files),
            seen: None,
            staging: root.join("tmm-staging"),
        };
        let rolls = load.roll_handles();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut t = topology;
            let mut figures = BedFigures {
                fewest_ready_tmm: usize::MAX,
                ..Default::default()
            };
            let pods_of = |s: &State, ns: &str| -> Vec<Value> {
                s.list(resource("", "pods"), Some(ns))
                    .into_iter()
                    .cloned()
                    .collect()
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
            let mut tmm_seen: BTreeSet<String> =
                handle.with_state(|s| pods_of(s, &tmm_ns).iter().map(uid).collect());
            let mut next_client = 0usize;
            let mut last = Instant::now();
            while !stop2.load(Ordering::Relaxed) {
                let (dssm, tmm, dssm_secret, tmm_secret) = handle.with_state(|s| {
                    (
                        pods_of(s, &dssm_ns),
                        pods_of(s, &tmm_ns),
                        secret_files(s, &dssm_sync.ns),
                        secret_files(s, &tmm_sync.ns),
                    )
                });
                // TMM: Ready pods as the API server shows them; a new pod is a new process.
                let ready_tmm = tmm
                    .iter()
                    .filter(|p| ready(p) && !terminating(p) && !terminal(p))
                    .count();
                let now = Instant::now();
                if ready_tmm == 0 {
                    figures.no_ready_tmm += now - last;
                }
                last = now;
                figures.fewest_ready_tmm = figures.fewest_ready_tmm.min(ready_tmm);
                for p in tmm.iter().filter(|p| !terminating(p) && !terminal(p)) {
                    if tmm_seen.insert(uid(p)) && !rolls.is_empty() {
                        bump(&rolls[next_client % rolls.len()]);
                        next_client += 1;
                    }
                }
                dssm_sync.tick(dssm_secret);
                tmm_sync.tick(tmm_secret);
                // dSSM: a deleted pod stops its process, its replacement starts it.
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
        let t = super::apiserver::store::now_rfc3339();
        p["status"] = json!({"phase": "Running", "startTime": t, "conditions": [
            {"type": "Initialized", "status": "True"}, {"type": "ContainersReady", "status": "True"},
            {"type": "Ready", "status": "True", "lastTransitionTime": t}, {"type": "PodScheduled", "status": "True"}]});
        s.ready_at.insert(id.to_string(), Instant::now());
        s.put(pods, ns, p);
    });
}

/// Lets the clients settle before and after the change, so the figures cover steady load.
pub const SETTLE: Duration = Duration::from_millis(1500);

/// The binary against the bed: `--redis-endpoint` maps every dSSM pod to its process, the
/// probe goes to a sentinel, and a killed run's Lease is waited out quickly.
pub fn command(env: &TestEnv, bed: &Bed, args: &[&str]) -> std::process::Command {
    let mut cmd = super::bin();
    // The processes run: the binary's own default strategy applies.
    cmd.env_remove("DSSM_CERTS_STRATEGY");
    cmd.env("KUBECONFIG", &env.kubeconfig)
        .env("HOME", env.dir.path())
        .env("DSSM_CERTS_REDIS_ENDPOINT", &bed.redis_endpoints)
        .args(args)
        .args([
            "--dssm-namespace",
            &env.dssm_ns,
            "--tmm-namespace",
            &env.tmm_ns,
            "--probe-endpoint",
            &bed.sentinel,
            "--probe-server-name",
            "f5-dssm-sentinel",
            "--wait-timeout",
            "60s",
            "--lease-duration",
            "4s",
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
    std::thread::sleep(SETTLE);
    let reader = bed.root.join("reader");
    let (topology, b) = bed.finish();
    let files = topology.get("db-0").mount.clone();
    std::fs::create_dir_all(&reader).unwrap();
    for f in FILES {
        std::fs::copy(files.join(f), reader.join(f)).unwrap();
    }
    let mut f = load.finish(&reader);
    f.no_ready_tmm = b.no_ready_tmm;
    drop(topology);
    (f, b)
}

/// Managed materials (with the CA key in its Secret), published before the processes start.
pub fn published() -> TestEnv {
    let env = TestEnv::spk();
    let (code, out, err) = env.reconcile(&["--no-restart"]);
    assert_eq!(code, 0, "{out}{err}");
    env
}

/// The seeds' materials (openssl CLI: RSA CA, v1 leaf without AKI), put by hand in both
/// namespaces, as a seed-made cluster has them.
pub fn seeded() -> TestEnv {
    let env = TestEnv::spk();
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
    for ns in [env.dssm_ns.clone(), env.tmm_ns.clone()] {
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
    let (bed, load) = Bed::start(&env, LoadConfig::default());
    std::thread::sleep(SETTLE);
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
}
