//! Shared helpers for the integration tests and benches of dssm-certs, compiled once: the real
//! binary, the real openssl CLI, the seeds' exact commands, the test cluster's environments and
//! the real-process bed. Tests and benches say `use testkit as support;`.

pub mod agent;
pub mod dssm_pods;
pub mod load;
pub mod objects;
pub mod rbac;
/// The test cluster, a crate of its own in the workspace (testcluster/).
pub use dssm_testcluster as apiserver;
pub mod redis;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root (this crate lives in its testkit/ folder): fixtures, manifests, charts.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ sits in the workspace root")
}

/// The profile folder cargo runs the current test or bench from: target/debug/ for `cargo
/// test`, target/release/ for `cargo bench` (the executable itself is in its `deps/`).
fn profile_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("the path of the running test executable");
        exe.parent()
            .and_then(Path::parent)
            .unwrap_or_else(|| panic!("{}: not in a cargo target folder", exe.display()))
            .to_path_buf()
    })
}

/// The dssm-certs binary cargo built next to the running test or bench (cargo builds a
/// package's binaries for its integration tests and benches; `CARGO_BIN_EXE_dssm-certs` is only
/// set when compiling those, not this library).
pub fn bin_path() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = profile_dir().join("dssm-certs");
        assert!(
            bin.is_file(),
            "{}: no dssm-certs binary; the helpers serve the dssm-certs package's tests and \
             benches, for which cargo builds it",
            bin.display()
        );
        bin
    })
}

/// A scratch folder under the target folder, as `CARGO_TARGET_TMPDIR` is for a test.
pub fn target_tmpdir() -> PathBuf {
    let dir = profile_dir().join("tmp");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// The binary, with its own defaults: a restart is the default strategy, rolling.
pub fn bin() -> Command {
    let mut c = Command::new(bin_path());
    c.env_remove("DSSM_CERTS_LOG");
    c.env_remove("DSSM_CERTS_STRATEGY");
    c
}

/// The binary for the test cluster alone, whose pods run no Redis: the rolling restart cannot
/// reach them, so a restart there is the seeds' procedure, named explicitly. The default path
/// runs on the real-process bed (`dssm_pods::command`), under every fault the cluster injects.
pub fn bin_without_redis() -> Command {
    let mut c = bin();
    c.env("DSSM_CERTS_STRATEGY", "scale-to-zero");
    c
}

/// Runs the binary; returns (exit code, stdout, stderr).
pub fn run(args: &[&str]) -> (i32, String, String) {
    output(bin().args(args))
}

pub fn output(cmd: &mut Command) -> (i32, String, String) {
    let out: Output = cmd.output().expect("spawn");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the openssl CLI in `dir`; panics with its stderr when it fails.
pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl CLI (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sh(dir: &Path, script: &str) {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Steps 3–5 of the seeds, verbatim but for two substitutions of the same output format:
/// `openssl genrsa 4096`'s keys come from tests/fixtures/seed-keys/ (made by that command; its
/// search takes seconds a key and the suite runs these steps a dozen times), and the DH params
/// are the RFC 7919 group instead of a minute of `openssl dhparam 2048`. Each call in a test
/// binary gets keys no other call got; past the fixtures, genrsa runs.
/// `traditional` makes PKCS#1 `RSA PRIVATE KEY` keys, as OpenSSL 1.x's genrsa did.
pub fn seed_materials(dir: &Path, traditional: bool) {
    let genrsa = |out: &str| match (next_seed_key(), traditional) {
        (Some(key), true) => format!(
            "openssl rsa -traditional -in '{}' -out {out} 2>/dev/null",
            key.display()
        ),
        (Some(key), false) => format!("cp '{}' {out}", key.display()),
        (None, true) => format!("openssl genrsa -traditional -out {out} 4096 2>/dev/null"),
        (None, false) => format!("openssl genrsa -out {out} 4096 2>/dev/null"),
    };
    sh(
        dir,
        &format!(
            "{}
             openssl req -x509 -new -nodes -sha384 \
                 -key dssm-ca.key -days 365 \
                 -subj '/O=Redis Test/CN=Certificate Authority' \
                 -out dssm-ca.crt",
            genrsa("dssm-ca.key"),
        ),
    );
    // The seeds' second genrsa takes seconds: their leaf starts (and, with the same 365 days,
    // ends) seconds after its CA, which `check` reports. A fixture key takes none.
    next_second();
    sh(
        dir,
        &format!(
            "{}
             openssl req -new -sha384 -key dssm-key.key \
                 -subj '/O=Redis Test/CN=Server' | \
                 openssl x509 -req -sha384 -CA dssm-ca.crt \
                     -CAkey dssm-ca.key -CAserial dssm-ca.txt \
                     -CAcreateserial  -days 365 \
                     -out dssm-cert.crt 2>/dev/null
             openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048 -out dhparam2048.pem",
            genrsa("dssm-key.key"),
        ),
    );
}

/// The next RSA 4096 key of tests/fixtures/seed-keys/ this test binary has not handed out.
pub fn next_seed_key() -> Option<PathBuf> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let key = repo().join(format!("tests/fixtures/seed-keys/rsa4096-{n}.pem"));
    key.exists().then_some(key)
}

/// PKCS#3 DH params (generator 2) on a published safe prime, made at once: they stand in for
/// `openssl dhparam`, whose safe-prime search takes seconds to a minute (generate.rs's
/// `fresh_dh_params_pass_openssl_dhparam_check` pays that once). RFC 3526's 2048-bit group is
/// valid and is not ffdhe2048; RFC 2409's 1024-bit group is too small.
pub fn dh_params_pem(prime: openssl::bn::BigNum) -> Vec<u8> {
    let two = openssl::bn::BigNum::from_u32(2).unwrap();
    openssl::dh::Dh::from_pqg(prime, None, two)
        .unwrap()
        .params_to_pem()
        .unwrap()
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("dssm-certs-test")
        .tempdir()
        .unwrap()
}

/// `generate` into `dir/sub` with the instant DH group; panics unless it succeeds.
pub fn generate(dir: &Path, extra: &[&str]) -> PathBuf {
    let out = dir.join("out");
    let mut args = vec![
        "generate",
        "--out",
        out.to_str().unwrap(),
        "--dhparam",
        "ffdhe2048",
    ];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 0, "generate {extra:?}: {stdout}{stderr}");
    out
}

/// One `generate` with every default, made once per test binary and only read, for the tests
/// that need default materials as their input: its two RSA 4096 keys take seconds to make.
pub fn made_by_default() -> &'static Path {
    static MADE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MADE.get_or_init(|| {
        let dir = target_tmpdir().join(format!("generate-defaults-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        generate(&dir, &[])
    })
}

/// A copy of `made_by_default()` in `dir` (created 0700, as `generate` makes it), for a test
/// that changes the files.
pub fn copy_of_defaults(dir: &Path) -> PathBuf {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(dir).unwrap();
    for entry in std::fs::read_dir(made_by_default()).unwrap() {
        let name = entry.unwrap().file_name();
        std::fs::copy(made_by_default().join(&name), dir.join(&name)).unwrap();
    }
    dir.to_path_buf()
}

/// Waits for the clock's next whole second. Validity is in whole seconds: a leaf made with the
/// same lifetime as its CA within the CA's own second ends with it, and there is nothing to cut.
pub fn next_second() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    std::thread::sleep(std::time::Duration::from_nanos(
        1_000_000_000 - u64::from(now.subsec_nanos()) + 10_000_000,
    ));
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A test cluster with dSSM installed, and the real binary pointed at it through a kubeconfig.
pub struct TestEnv {
    pub server: apiserver::ApiServer,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    /// The same cluster as the agent's own read-only ServiceAccount.
    pub agent_kubeconfig: PathBuf,
    pub dssm_ns: String,
    pub tmm_ns: String,
    /// `--tmm` targets (NAMESPACE/KIND/NAME); empty: `--tmm-namespace tmm_ns`, one Deployment.
    pub tmm_targets: Vec<String>,
}

impl TestEnv {
    /// SPK: dSSM in spk-utilities, TMM (3 replicas) in spk-ingress. The binary runs as the
    /// ServiceAccount `dssm-certs` (`agent_kubeconfig`: as `dssm-certs-agent`), under exactly the
    /// RBAC of `manifests/overlays/spk`.
    pub fn spk() -> Self {
        Self::with_rbac("spk-utilities", "spk-ingress", "spk")
    }

    /// CNF: both in cnf-gateway, under `manifests/overlays/cnf`'s RBAC.
    pub fn cnf() -> Self {
        Self::with_rbac("cnf-gateway", "cnf-gateway", "cnf")
    }

    pub fn with_rbac(dssm_ns: &str, tmm_ns: &str, overlay: &str) -> Self {
        let env = Self::new(dssm_ns, tmm_ns, apiserver::SA_TOKEN);
        let rbac = apiserver::rbac_from_manifests(&apiserver::render_overlay(overlay));
        for sa in ["dssm-certs", "dssm-certs-agent"] {
            let user = format!("system:serviceaccount:{dssm_ns}:{sa}");
            assert!(
                rbac.contains_key(&user),
                "{overlay} binds no Role to {user}"
            );
        }
        env.server.with_state(|s| s.rbac = Some(rbac));
        env
    }

    pub fn new(dssm_ns: &str, tmm_ns: &str, token: &str) -> Self {
        let sa = format!("system:serviceaccount:{dssm_ns}:dssm-certs");
        let server = apiserver::ApiServer::start(&[dssm_ns, tmm_ns], &sa);
        server.install_dssm(dssm_ns, tmm_ns, 3);
        // A healthy cluster to start from, as the pre-flight check requires: 3 TMM pods and
        // 3 + 3 dSSM pods Running and Ready.
        wait_all_ready(&server, 9);
        Self::on(server, dssm_ns, tmm_ns, token)
    }

    /// SPK as `spk()` (same RBAC), but a fresh install: nothing published, the dSSM and TMM
    /// pods mount the Secrets as `dssm` and `tmm` say, and those that need them wait for them
    /// (ContainerCreating); the others are Ready.
    pub fn spk_fresh(dssm: apiserver::SecretMount, tmm: apiserver::SecretMount) -> Self {
        Self::spk_fresh_in(&["spk-ingress"], "spk", dssm, tmm)
    }

    /// `spk_fresh` with the TMM namespaces `tmm_namespaces` (the Deployment f5-tmm in the first
    /// only), under the RBAC of `manifests/overlays/<overlay>`.
    pub fn spk_fresh_in(
        tmm_namespaces: &[&str],
        overlay: &str,
        dssm: apiserver::SecretMount,
        tmm: apiserver::SecretMount,
    ) -> Self {
        let (dssm_ns, tmm_ns) = ("spk-utilities", tmm_namespaces[0]);
        let sa = format!("system:serviceaccount:{dssm_ns}:dssm-certs");
        let mut namespaces = vec![dssm_ns];
        namespaces.extend(tmm_namespaces);
        let server = apiserver::ApiServer::start(&namespaces, &sa);
        server.install_dssm_mounting(dssm_ns, tmm_ns, 3, dssm, tmm);
        server.wait_until(
            "the installed pods Ready or waiting for their Secrets",
            std::time::Duration::from_secs(30),
            |s| {
                // OrderedReady StatefulSets create pod N+1 only once pod N is Ready: a waiting
                // ordinal is the last of its StatefulSet, and the others are all there.
                let pods = s.list(apiserver::resource("", "pods"), None);
                let waiting = |p: &serde_json::Value| {
                    p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                        == "ContainerCreating"
                };
                ["f5-dssm-db", "f5-dssm-sentinel", "f5-tmm"]
                    .iter()
                    .all(|app| {
                        let of: Vec<_> = pods
                            .iter()
                            .filter(|p| p["metadata"]["labels"]["app"] == *app)
                            .collect();
                        let settled = of
                            .iter()
                            .all(|p| apiserver::controllers::pod_ready(p) || waiting(p));
                        let sts_waits = *app != "f5-tmm" && of.last().is_some_and(|p| waiting(p));
                        settled && (of.len() == 3 || sts_waits)
                    })
            },
        );
        let rbac = apiserver::rbac_from_manifests(&apiserver::render_overlay(overlay));
        server.with_state(|s| s.rbac = Some(rbac));
        Self::on(server, dssm_ns, tmm_ns, apiserver::SA_TOKEN)
    }

    /// Deletes `dssm-certs-secret` and `dssm-keys-secret` in every namespace holding a copy, as
    /// an operator forcing a new key does (or a restore that lost them); the pods keep running.
    pub fn delete_copies(&self) {
        for ns in self.copy_namespaces() {
            for name in ["dssm-certs-secret", "dssm-keys-secret"] {
                assert!(
                    self.server.delete("", "secrets", &ns, name).is_some(),
                    "{ns}/{name}"
                );
            }
        }
    }

    /// The environment of a started `server`: kubeconfigs for `token` (and the agent's own
    /// account when `token` is the writer's).
    fn on(server: apiserver::ApiServer, dssm_ns: &str, tmm_ns: &str, token: &str) -> Self {
        let dir = tempdir();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig(token, dssm_ns)).unwrap();
        let agent_kubeconfig = dir.path().join("agent-kubeconfig");
        let agent_token = if token == apiserver::SA_TOKEN {
            apiserver::AGENT_TOKEN
        } else {
            token
        };
        std::fs::write(&agent_kubeconfig, server.kubeconfig(agent_token, dssm_ns)).unwrap();
        TestEnv {
            server,
            dir,
            kubeconfig,
            agent_kubeconfig,
            dssm_ns: dssm_ns.into(),
            tmm_ns: tmm_ns.into(),
            tmm_targets: Vec::new(),
        }
    }

    /// Several TMM instances sharing one dSSM (spk-utilities): f5-tmm (3 replicas) in
    /// spk-ingress-a and spk-ingress-b, the DaemonSet `tmm` (one pod per node) in bnk-tmm, under
    /// the RBAC of `rendered` (e.g. `manifests/overlays/spk-multi`).
    pub fn spk_multi(rendered: &str) -> Self {
        let (dssm_ns, a, b, bnk) = ("spk-utilities", "spk-ingress-a", "spk-ingress-b", "bnk-tmm");
        let sa = format!("system:serviceaccount:{dssm_ns}:dssm-certs");
        let server = apiserver::ApiServer::start(&[dssm_ns, a, b, bnk], &sa);
        server.install_dssm(dssm_ns, a, 3);
        server.install_tmm_daemonset(bnk, "tmm");
        let tmm = server.get("apps", "deployments", a, "f5-tmm").unwrap();
        let copy = serde_json::json!({"metadata": {"name": "f5-tmm", "labels": tmm["metadata"]["labels"].clone()}, "spec": tmm["spec"].clone()});
        server.put("apps", "deployments", b, copy);
        let nodes = server.with_state(|s| s.nodes.len());
        wait_all_ready(&server, 12 + nodes);
        server.with_state(|s| {
            s.rbac = Some(apiserver::rbac_from_manifests(rendered));
            // Pods take a second to terminate: a wait for one target's pods cannot be satisfied
            // by its first list while another target's are being waited for.
            s.timing.pod_grace = std::time::Duration::from_secs(1);
        });
        let mut env = Self::on(server, dssm_ns, a, apiserver::SA_TOKEN);
        env.tmm_targets = vec![
            format!("{a}/deployment/f5-tmm"),
            format!("{b}/deployment/f5-tmm"),
            format!("{bnk}/daemonset/tmm"),
        ];
        env
    }

    /// The TMM flags of every command: `--tmm` per target, or the one-Deployment shorthand.
    pub fn tmm_args(&self) -> Vec<String> {
        if self.tmm_targets.is_empty() {
            return vec!["--tmm-namespace".into(), self.tmm_ns.clone()];
        }
        self.tmm_targets
            .iter()
            .flat_map(|t| ["--tmm".to_string(), t.clone()])
            .collect()
    }

    /// Every namespace holding a copy: dSSM's, then each TMM namespace once.
    pub fn copy_namespaces(&self) -> Vec<String> {
        let mut v = vec![self.dssm_ns.clone()];
        let tmm = self
            .tmm_targets
            .iter()
            .map(|t| t.split('/').next().unwrap().to_string())
            .chain(self.tmm_targets.is_empty().then(|| self.tmm_ns.clone()));
        for ns in tmm {
            if !v.contains(&ns) {
                v.push(ns);
            }
        }
        v
    }

    /// Runs `dssm-certs <args> --dssm-namespace .. --tmm-namespace ..` (or `--tmm ..` per
    /// target) against the cluster.
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let mut cmd = bin_without_redis();
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.dir.path())
            .args(args)
            .args(["--dssm-namespace", &self.dssm_ns])
            .args(self.tmm_args());
        output(&mut cmd)
    }

    /// `reconcile` with fast settings (RSA 2048, the RFC 7919 DH group unless reused).
    pub fn reconcile(&self, extra: &[&str]) -> (i32, String, String) {
        let mut args = vec!["reconcile", "--key-algorithm", "ecdsa-p256"];
        if !extra.contains(&"--dhparam") {
            args.extend(["--dhparam", "ffdhe2048"]);
        }
        args.extend_from_slice(extra);
        self.run(&args)
    }

    pub fn secret(&self, ns: &str, name: &str) -> Option<serde_json::Value> {
        self.server.get("", "secrets", ns, name)
    }

    /// The four mounted items of a copy, decoded.
    pub fn copy(&self, ns: &str) -> Option<[Vec<u8>; 4]> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let certs = self.secret(ns, "dssm-certs-secret")?;
        let keys = self.secret(ns, "dssm-keys-secret")?;
        let get = |s: &serde_json::Value, k: &str| {
            b64.decode(s["data"][k].as_str().unwrap_or(""))
                .unwrap_or_default()
        };
        Some([
            get(&certs, "dssm-ca.crt"),
            get(&certs, "dssm-cert.crt"),
            get(&keys, "dssm-key.key"),
            get(&certs, "dhparam2048.pem"),
        ])
    }

    /// Puts a Secret as `kubectl apply` of the seeds' manifests would (no labels).
    pub fn put_secret(&self, ns: &str, name: &str, data: &[(&str, &[u8])]) {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let data: serde_json::Map<String, serde_json::Value> = data
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::json!(b64.encode(v))))
            .collect();
        let mut obj = self
            .secret(ns, name)
            .unwrap_or_else(|| serde_json::json!({"metadata": {"name": name}, "type": "Opaque"}));
        obj["data"] = serde_json::Value::Object(data);
        self.server.put("", "secrets", ns, obj);
    }

    pub fn writes(&self) -> Vec<apiserver::Recorded> {
        self.server
            .requests()
            .into_iter()
            .filter(|r| r.is_write())
            .collect()
    }

    /// A refused run writes nothing but its Lease and Events.
    pub fn assert_wrote_only_lease_and_events(&self) {
        let writes = self.writes();
        assert!(
            writes
                .iter()
                .all(|w| w.path.contains("/leases") || w.path.contains("/events")),
            "{writes:?}"
        );
    }
}

/// The `dssm-certs.f5.com/` annotations an object carries.
pub fn our_annotations(obj: &serde_json::Value) -> Vec<String> {
    obj["metadata"]["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with(dssm_certs::materials::annotations::PREFIX))
        .cloned()
        .collect()
}

/// Waits until `n` pods exist and every one is Ready.
fn wait_all_ready(server: &apiserver::ApiServer, n: usize) {
    server.wait_until(
        "the installed pods Ready",
        std::time::Duration::from_secs(30),
        |s| {
            let pods = s.list(apiserver::resource("", "pods"), None);
            pods.len() == n
                && pods.iter().all(|p| {
                    p["status"]["conditions"].as_array().is_some_and(|c| {
                        c.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    })
                })
        },
    );
}

/// A self-signed CA certificate (PEM) whose subject is `CN=<cn>`, whatever `cn` holds.
pub fn self_signed_ca_pem(cn: &str) -> String {
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().pem()
}

/// Runs `f` on every item, each on a thread of its own, and returns the results in order; a
/// panic in one is raised again here with its message. For scenarios that each build their own
/// test cluster and spend most of their time waiting on it.
pub fn side_by_side<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    std::thread::scope(|scope| {
        let f = &f;
        let running: Vec<_> = items
            .into_iter()
            .map(|item| scope.spawn(move || f(item)))
            .collect();
        running
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Runs `at(n)` for n = 1, 2, … on `workers` threads until some n finds nothing left to
/// interrupt (`at` returns `None`); returns the results for 1..n in order. The crash matrices
/// build a test cluster of their own for every point, so their points can run side by side.
pub fn each_crash_point<T: Send>(workers: usize, at: impl Fn(usize) -> Option<T> + Sync) -> Vec<T> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(1);
    let end = AtomicUsize::new(usize::MAX);
    let found = std::sync::Mutex::new(std::collections::BTreeMap::new());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= end.load(Ordering::SeqCst) {
                    return;
                }
                match at(n) {
                    Some(t) => {
                        found.lock().unwrap().insert(n, t);
                    }
                    None => {
                        end.fetch_min(n, Ordering::SeqCst);
                        return;
                    }
                }
            });
        }
    });
    let end = end.into_inner();
    let mut found = found.into_inner().unwrap();
    (1..end)
        .map(|n| {
            found
                .remove(&n)
                .unwrap_or_else(|| panic!("crash point {n} was never run"))
        })
        .collect()
}
