//! The test cluster answers like a real API server: the real kubectl (1.32) drives it.

use testkit as support;

use std::process::Command;
use std::time::Duration;

use dssm_testcluster::*;
use serde_json::json;

struct Kubectl {
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

impl Kubectl {
    fn new(server: &ApiServer, token: &str) -> Self {
        let dir = support::tempdir();
        let config = dir.path().join("kubeconfig");
        std::fs::write(&config, server.kubeconfig(token, "spk-utilities")).unwrap();
        Kubectl { _dir: dir, config }
    }

    /// `kubectl <verb> --validate=false [extra] -f` of `yaml`, written to a file first.
    fn with_yaml(&self, verb: &str, extra: &[&str], yaml: &str) -> (i32, String, String) {
        let file = self._dir.path().join("manifest.yaml");
        std::fs::write(&file, yaml).unwrap();
        let mut args = vec![verb, "--validate=false"];
        args.extend_from_slice(extra);
        args.extend(["-f", file.to_str().unwrap()]);
        self.run(&args)
    }

    /// `kubectl rollout status <what> -n spk-ingress` in a thread: its result, and a channel
    /// that says when it returned.
    fn rollout_status(
        server: &ApiServer,
        what: &str,
    ) -> (
        std::thread::JoinHandle<(i32, String, String)>,
        std::sync::mpsc::Receiver<()>,
    ) {
        let (tx, rx) = std::sync::mpsc::channel();
        let k = Kubectl::new(server, ADMIN_TOKEN);
        let what = what.to_string();
        let waiter = std::thread::spawn(move || {
            let r = k.run(&[
                "rollout",
                "status",
                &what,
                "-n",
                "spk-ingress",
                "--timeout=30s",
            ]);
            let _ = tx.send(());
            r
        });
        (waiter, rx)
    }

    fn run(&self, args: &[&str]) -> (i32, String, String) {
        support::output(
            Command::new("kubectl")
                .env("KUBECONFIG", &self.config)
                .env("HOME", self._dir.path())
                .args(args),
        )
    }
}

// Long: one real kubectl session against one server, each verb in turn, as an operator
// would use them.
#[test]
fn kubectl_gets_applies_scales_deletes_and_watches() {
    let server = ApiServer::start(
        &["spk-utilities", "spk-ingress"],
        "system:serviceaccount:spk-utilities:dssm-certs",
    );
    server.install_dssm("spk-utilities", "spk-ingress", 3);
    server.wait_until(
        "6 dSSM pods and 3 TMM pods ready",
        Duration::from_secs(10),
        |s| {
            let pods = s.list(resource("", "pods"), None);
            pods.len() == 9
                && pods
                    .iter()
                    .all(|p| p.pointer("/status/phase") == Some(&json!("Running")))
        },
    );
    let k = Kubectl::new(&server, ADMIN_TOKEN);

    let (code, out, err) = k.run(&[
        "get",
        "pods",
        "-l",
        "app in (f5-dssm-db, f5-dssm-sentinel)",
        "-o",
        "name",
    ]);
    assert_eq!(code, 0, "{err}");
    let mut names: Vec<&str> = out.lines().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "pod/f5-dssm-db-0",
            "pod/f5-dssm-db-1",
            "pod/f5-dssm-db-2",
            "pod/f5-dssm-sentinel-0",
            "pod/f5-dssm-sentinel-1",
            "pod/f5-dssm-sentinel-2"
        ]
    );

    let (code, out, err) = k.run(&[
        "get",
        "deploy",
        "f5-tmm",
        "-n",
        "spk-ingress",
        "-o",
        "jsonpath={.status.readyReplicas}",
    ]);
    assert_eq!((code, out.as_str()), (0, "3"), "{err}");

    // Server-side apply, then a conflicting apply by another manager, then --force-conflicts.
    let dir = support::tempdir();
    let manifest = dir.path().join("s.yaml");
    std::fs::write(&manifest, "apiVersion: v1\nkind: Secret\nmetadata:\n  name: dssm-certs-secret\ndata:\n  dssm-ca.crt: YQ==\n").unwrap();
    let (code, out, err) = k.run(&[
        "apply",
        "--server-side",
        "--validate=false",
        "-f",
        manifest.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("secret/dssm-certs-secret serverside-applied"),
        "{out}"
    );
    std::fs::write(&manifest, "apiVersion: v1\nkind: Secret\nmetadata:\n  name: dssm-certs-secret\ndata:\n  dssm-ca.crt: Yg==\n").unwrap();
    let (code, _, err) = k.run(&[
        "apply",
        "--server-side",
        "--validate=false",
        "--field-manager",
        "other",
        "-f",
        manifest.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("conflict with \"kubectl\"") && err.contains(".data.dssm-ca.crt"),
        "{err}"
    );
    let (code, _, err) = k.run(&[
        "apply",
        "--server-side",
        "--validate=false",
        "--field-manager",
        "other",
        "--force-conflicts",
        "-f",
        manifest.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        server
            .get("", "secrets", "spk-utilities", "dssm-certs-secret")
            .unwrap()["data"]["dssm-ca.crt"],
        "Yg=="
    );

    // Scale through the scale subresource; the Deployment controller follows.
    let (code, _, err) = k.run(&[
        "scale",
        "deploy/f5-tmm",
        "--replicas=0",
        "-n",
        "spk-ingress",
    ]);
    assert_eq!(code, 0, "{err}");
    server.wait_until("TMM pods gone", Duration::from_secs(10), |s| {
        s.list(resource("", "pods"), Some("spk-ingress")).is_empty()
    });
    assert!(server
        .requests()
        .iter()
        .any(|r| r.method == "PATCH" && r.path.ends_with("/deployments/f5-tmm/scale")));

    // delete -l uses the label selector with `in`; StatefulSet pods come back, new uid.
    let before = server
        .get("", "pods", "spk-utilities", "f5-dssm-db-0")
        .unwrap()["metadata"]["uid"]
        .clone();
    let (code, out, err) = k.run(&[
        "delete",
        "pods",
        "-l",
        "app in (f5-dssm-db, f5-dssm-sentinel)",
        "--wait=false",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 6, "{out}");
    server.wait_until("db-0 recreated and ready", Duration::from_secs(10), |s| {
        s.get(resource("", "pods"), "spk-utilities", "f5-dssm-db-0")
            .is_some_and(|p| {
                p["metadata"]["uid"] != before
                    && p.pointer("/status/phase") == Some(&json!("Running"))
            })
    });

    // get -w streams changes: the current object first, then what is added later.
    let mut watch = Command::new("kubectl")
        .env("KUBECONFIG", &k.config)
        .env("HOME", k._dir.path())
        .args([
            "get",
            "secrets",
            "-w",
            "-o",
            "name",
            "--request-timeout=20s",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("kubectl get -w printed nothing");
    assert_eq!(first, "secret/dssm-certs-secret");
    server.put(
        "",
        "secrets",
        "spk-utilities",
        json!({"metadata": {"name": "late"}, "data": {}}),
    );
    let next = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the watch did not deliver the new Secret");
    assert_eq!(next, "secret/late");
    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn errors_are_status_objects_with_the_real_reasons() {
    let server = ApiServer::start(
        &["spk-utilities"],
        "system:serviceaccount:spk-utilities:dssm-certs",
    );
    let k = Kubectl::new(&server, ADMIN_TOKEN);
    let (code, _, err) = k.run(&["get", "secret", "nope"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("Error from server (NotFound): secrets \"nope\" not found"),
        "{err}"
    );
    let (code, _, err) = k.run(&["get", "secrets", "-n", "missing-ns", "x"]);
    assert_eq!(code, 1);
    assert!(err.contains("NotFound"), "{err}");
    let (code, _, err) = Kubectl::new(&server, "wrong-token").run(&["get", "secrets"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("Unauthorized")
            || err.contains("the server has asked for the client to provide credentials"),
        "{err}"
    );
    server.add_fault(Fault::status("GET", "/secrets/x", 1, 500));
    let (code, _, err) = k.run(&["get", "secret", "x"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("InternalError") || err.contains("Internal error occurred"),
        "{err}"
    );
}

/// `kubectl get --raw` of a watch: the events the stream carried until it ended, one per line.
fn raw_watch(k: &Kubectl, path: &str) -> Vec<serde_json::Value> {
    let (code, out, err) = k.run(&["get", "--raw", path, "--request-timeout=20s"]);
    assert_eq!(code, 0, "{path}: {err}");
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn spk_server() -> ApiServer {
    ApiServer::start(
        &["spk-utilities", "spk-ingress"],
        "system:serviceaccount:spk-utilities:dssm-certs",
    )
}

/// Secrets s0..s{n-1} in spk-utilities, one change each; returns the first.
fn put_secrets(server: &ApiServer, n: usize) -> serde_json::Value {
    let put = |i: usize| {
        server.put(
            "",
            "secrets",
            "spk-utilities",
            json!({"metadata": {"name": format!("s{i}")}, "data": {}}),
        )
    };
    let first = put(0);
    (1..n).for_each(|i| {
        put(i);
    });
    first
}

fn rv_of(v: &serde_json::Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_watch_from_an_expired_resource_version_is_answered_410_gone() {
    let server = spk_server();
    server.with_state(|s| s.history_window = 5);
    let first = put_secrets(&server, 10);
    let k = Kubectl::new(&server, ADMIN_TOKEN);
    let base = "/api/v1/namespaces/spk-utilities/secrets?watch=true";
    // Ten events ago is outside a window of five: one ERROR event, then the stream ends.
    let events = raw_watch(&k, &format!("{base}&resourceVersion={}", rv_of(&first)));
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "ERROR");
    let status = &events[0]["object"];
    assert_eq!(
        (&status["kind"], &status["code"], &status["reason"]),
        (&json!("Status"), &json!(410), &json!("Expired")),
        "{status}"
    );
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .starts_with(&format!("too old resource version: {} (", rv_of(&first))),
        "{status}"
    );
    // Inside the window the watch resumes: the events after that version, then the timeout.
    let recent = server.get("", "secrets", "spk-utilities", "s7").unwrap();
    let events = raw_watch(
        &k,
        &format!("{base}&resourceVersion={}&timeoutSeconds=1", rv_of(&recent)),
    );
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["object"]["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["s8", "s9"], "{events:?}");
    // After a compaction every version handed out so far is gone.
    server.expire_watches();
    let events = raw_watch(&k, &format!("{base}&resourceVersion={}", rv_of(&recent)));
    assert_eq!(events[0]["object"]["code"], 410, "{events:?}");
}

#[test]
fn watch_faults_end_or_break_streams_mid_way() {
    let server = spk_server();
    put_secrets(&server, 4);
    let k = Kubectl::new(&server, ADMIN_TOKEN);
    let path = "/api/v1/namespaces/spk-utilities/secrets?watch=true";
    // Each fault counts the matching watches from when it is added: the next one gets it.
    server.add_watch_fault(WatchFault::end_after_events("/secrets", 2));
    let events = raw_watch(&k, path);
    assert_eq!(events.len(), 2, "ended after two events: {events:?}");
    assert!(events.iter().all(|e| e["type"] == "ADDED"));
    server.add_watch_fault(WatchFault::end_after_events("/secrets", 3).with_error(500));
    let events = raw_watch(&k, path);
    assert_eq!(events.len(), 4, "{events:?}");
    assert_eq!(events[3]["type"], "ERROR");
    assert_eq!(events[3]["object"]["reason"], "InternalError");
    // After T: a stream with nothing to say ends on time, not at its timeoutSeconds.
    server.add_watch_fault(WatchFault::end_after(
        "/secrets",
        Duration::from_millis(300),
    ));
    let rv = server.with_state(|s| s.resource_version());
    let start = std::time::Instant::now();
    let events = raw_watch(
        &k,
        &format!("{path}&resourceVersion={rv}&timeoutSeconds=30"),
    );
    assert!(events.is_empty(), "{events:?}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    // `gone` answers 410 whatever the version asked for.
    server.add_watch_fault(WatchFault::gone("/secrets"));
    let events = raw_watch(&k, &format!("{path}&resourceVersion={rv}"));
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["object"]["reason"], "Expired");
    // The next watch is served normally again.
    let events = raw_watch(&k, &format!("{path}&timeoutSeconds=1"));
    assert_eq!(events.len(), 4, "{events:?}");
}

fn pods(server: &ApiServer, ns: &str, prefix: &str) -> Vec<serde_json::Value> {
    server
        .list("", "pods", ns)
        .into_iter()
        .filter(|p| p["metadata"]["name"].as_str().unwrap().starts_with(prefix))
        .collect()
}

fn ready(p: &serde_json::Value) -> bool {
    p["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

fn deleting(p: &serde_json::Value) -> bool {
    !p["metadata"]["deletionTimestamp"].is_null()
}

#[test]
fn failed_pods_stay_listed_are_not_counted_and_are_replaced() {
    let server = spk_server();
    server.install_dssm("spk-utilities", "spk-ingress", 3);
    server.wait_until("TMM ready", Duration::from_secs(10), |s| {
        s.get(resource("apps", "deployments"), "spk-ingress", "f5-tmm")
            .is_some_and(|d| d["status"]["availableReplicas"] == 3)
    });
    let victim = pods(&server, "spk-ingress", "f5-tmm")[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    server.fail_pod("spk-ingress", &victim, "Evicted");
    server.wait_until("a replacement Ready", Duration::from_secs(10), |s| {
        s.get(resource("apps", "deployments"), "spk-ingress", "f5-tmm")
            .is_some_and(|d| d["status"]["readyReplicas"] == 3 && d["status"]["replicas"] == 3)
            && s.list(resource("", "pods"), Some("spk-ingress")).len() == 4
    });
    let k = Kubectl::new(&server, ADMIN_TOKEN);
    let (code, out, err) = k.run(&[
        "get",
        "pod",
        &victim,
        "-n",
        "spk-ingress",
        "-o",
        "jsonpath={.status.phase}/{.status.reason}",
    ]);
    assert_eq!((code, out.as_str()), (0, "Failed/Evicted"), "{err}");
    // A StatefulSet deletes its failed pod and makes it again under the same name.
    let uid = server
        .get("", "pods", "spk-utilities", "f5-dssm-db-1")
        .unwrap()["metadata"]["uid"]
        .clone();
    server.fail_pod("spk-utilities", "f5-dssm-db-1", "Evicted");
    server.wait_until("db-1 recreated", Duration::from_secs(10), |s| {
        s.get(resource("", "pods"), "spk-utilities", "f5-dssm-db-1")
            .is_some_and(|p| p["metadata"]["uid"] != uid && ready(p))
    });
}

/// Polls the pods of `prefix` until `done`, checking `invariant` on every observation.
fn observe(
    server: &ApiServer,
    ns: &str,
    prefix: &str,
    what: &str,
    invariant: impl Fn(&[serde_json::Value]) -> Result<(), String>,
    done: impl Fn(&[serde_json::Value]) -> bool,
) {
    let start = std::time::Instant::now();
    loop {
        let now = pods(server, ns, prefix);
        if let Err(e) = invariant(&now) {
            panic!("{what}: {e}");
        }
        if done(&now) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(3));
    }
}

fn sts(name: &str, replicas: i64, policy: Option<&str>) -> serde_json::Value {
    let mut o = json!({"metadata": {"name": name},
        "spec": {"replicas": replicas, "serviceName": name, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
    if let Some(p) = policy {
        o["spec"]["podManagementPolicy"] = json!(p);
    }
    o
}

// Long: the same scale-up followed pod by pod under both pod management policies.
#[test]
fn ordered_ready_statefulsets_go_one_pod_at_a_time_and_parallel_ones_do_not() {
    let server = spk_server();
    let ns = "spk-utilities";
    server.put("apps", "statefulsets", ns, sts("ord", 3, None));
    // Pod i exists only once 0..i are Ready.
    let ordered = |now: &[serde_json::Value]| {
        for p in now {
            let name = p["metadata"]["name"].as_str().unwrap();
            let i: usize = name.rsplit('-').next().unwrap().parse().unwrap();
            for j in 0..i {
                let lower = now
                    .iter()
                    .find(|q| q["metadata"]["name"] == format!("ord-{j}"));
                if !lower.is_some_and(|q| ready(q) && !deleting(q)) {
                    return Err(format!("{name} exists while ord-{j} is not Ready"));
                }
            }
        }
        Ok(())
    };
    observe(
        &server,
        ns,
        "ord-",
        "OrderedReady scale-up",
        ordered,
        |now| now.len() == 3 && now.iter().all(ready),
    );
    // Scale down from the highest ordinal, one at a time, through kubectl's scale subresource.
    let k = Kubectl::new(&server, ADMIN_TOKEN);
    let (code, _, err) = k.run(&["scale", "sts/ord", "--replicas=1", "-n", ns]);
    assert_eq!(code, 0, "{err}");
    observe(
        &server,
        ns,
        "ord-",
        "OrderedReady scale-down",
        |now| {
            let has = |n: &str| now.iter().any(|p| p["metadata"]["name"] == n);
            if now
                .iter()
                .any(|p| p["metadata"]["name"] == "ord-1" && deleting(p))
                && has("ord-2")
            {
                return Err("ord-1 deleted while ord-2 still exists".into());
            }
            Ok(())
        },
        |now| now.len() == 1,
    );
    // A deleted pod comes back under the same name.
    let (code, _, err) = k.run(&["delete", "pod", "ord-0", "-n", ns, "--wait=false"]);
    assert_eq!(code, 0, "{err}");
    server.wait_until("ord-0 back", Duration::from_secs(10), |s| {
        s.get(resource("", "pods"), ns, "ord-0")
            .is_some_and(|p| ready(p) && !deleting(p))
    });

    // Parallel: every pod is made at once, before any is Ready.
    server.put("apps", "statefulsets", ns, sts("par", 3, Some("Parallel")));
    observe(
        &server,
        ns,
        "par-",
        "Parallel scale-up",
        |now| match now.len() {
            0 | 3 => Ok(()),
            n => Err(format!("{n} pods: not made at once")),
        },
        |now| now.len() == 3,
    );
    assert!(pods(&server, ns, "par-").iter().all(|p| !ready(p)));
    server.wait_until("par status", Duration::from_secs(10), |s| {
        s.get(resource("apps", "statefulsets"), ns, "par")
            .is_some_and(|o| {
                o["status"]["readyReplicas"] == 3
                    && o["status"]["availableReplicas"] == 3
                    && o["status"]["updatedReplicas"] == 3
                    && o["status"]["observedGeneration"] == o["metadata"]["generation"]
            })
    });
}

// Long: follows a rollout step by step, checking maxSurge and maxUnavailable at each step.
#[test]
fn kubectl_rollout_restart_rolls_a_deployment_within_max_surge_and_max_unavailable() {
    let server = spk_server();
    let ns = "spk-ingress";
    server.install_dssm("spk-utilities", ns, 3);
    // minReadySeconds: available lags Ready by a second.
    let mut d = server.get("apps", "deployments", ns, "f5-tmm").unwrap();
    d["spec"]["minReadySeconds"] = json!(1);
    server.put("apps", "deployments", ns, d);
    server.wait_until("available", Duration::from_secs(10), |s| {
        s.get(resource("apps", "deployments"), ns, "f5-tmm")
            .is_some_and(|d| d["status"]["availableReplicas"] == 3)
    });
    let gen = server.get("apps", "deployments", ns, "f5-tmm").unwrap()["metadata"]["generation"]
        .as_i64()
        .unwrap();
    let k = Kubectl::new(&server, ADMIN_TOKEN);
    let (code, out, err) = k.run(&["rollout", "restart", "deployment/f5-tmm", "-n", ns]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("deployment.apps/f5-tmm restarted"), "{out}");
    let d = server.get("apps", "deployments", ns, "f5-tmm").unwrap();
    assert_eq!(
        d["metadata"]["generation"],
        gen + 1,
        "a template change bumps it"
    );
    assert!(
        d["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"]
            .is_string()
    );
    // The default 25%/25% of 3: surge 1, unavailable 0. At most 4 live pods, never fewer
    // than 3 Ready, and `rollout status` follows the status fields to the end.
    let (waiter, rx) = Kubectl::rollout_status(&server, "deployment/f5-tmm");
    let live = |now: &[serde_json::Value]| -> Vec<serde_json::Value> {
        now.iter().filter(|p| !deleting(p)).cloned().collect()
    };
    observe(
        &server,
        ns,
        "f5-tmm",
        "rolling update 1/0",
        |now| {
            let live = live(now);
            let ready = now.iter().filter(|p| ready(p) && !deleting(p)).count();
            if live.len() > 4 || ready < 3 {
                return Err(format!("{} live, {ready} Ready", live.len()));
            }
            Ok(())
        },
        |_| rx.try_recv().is_ok(),
    );
    let (code, out, err) = waiter.join().unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("successfully rolled out"), "{out}");
    let d = server.get("apps", "deployments", ns, "f5-tmm").unwrap();
    let st = &d["status"];
    assert_eq!(st["observedGeneration"], d["metadata"]["generation"]);
    assert_eq!(
        (
            &st["replicas"],
            &st["updatedReplicas"],
            &st["readyReplicas"],
            &st["availableReplicas"]
        ),
        (&json!(3), &json!(3), &json!(3), &json!(3))
    );

    // maxSurge 0 / maxUnavailable 1: never more than 3 live, never fewer than 2 Ready.
    let mut d = d;
    d["spec"]["strategy"] =
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}});
    server.put("apps", "deployments", ns, d);
    let (code, _, err) = k.run(&["rollout", "restart", "deployment/f5-tmm", "-n", ns]);
    assert_eq!(code, 0, "{err}");
    let gen =
        server.get("apps", "deployments", ns, "f5-tmm").unwrap()["metadata"]["generation"].clone();
    observe(
        &server,
        ns,
        "f5-tmm",
        "rolling update 0/1",
        |now| {
            let live = live(now);
            let ready = now.iter().filter(|p| ready(p) && !deleting(p)).count();
            if live.len() > 3 || ready < 2 {
                return Err(format!("{} live, {ready} Ready", live.len()));
            }
            Ok(())
        },
        |_| {
            server
                .get("apps", "deployments", ns, "f5-tmm")
                .is_some_and(|d| {
                    let st = &d["status"];
                    st["observedGeneration"] == gen
                        && st["updatedReplicas"] == 3
                        && st["availableReplicas"] == 3
                        && st["replicas"] == 3
                })
        },
    );
}

#[test]
fn a_daemonset_runs_one_pod_per_node_and_rolls_one_node_at_a_time() {
    let server = spk_server();
    let ns = "spk-ingress";
    server.with_state(|s| s.nodes = vec!["n1".into(), "n2".into(), "n3".into(), "n4".into()]);
    let k = Kubectl::new(&server, ADMIN_TOKEN);
    let (code, out, err) = k.with_yaml(
        "apply",
        &[],
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: f5-tmm\n  namespace: spk-ingress\nspec:\n  selector:\n    matchLabels: {app: f5-tmm}\n  template:\n    metadata:\n      labels: {app: f5-tmm}\n    spec:\n      containers: [{name: tmm, image: tmm}]\n",
    );
    assert_eq!(code, 0, "{out}{err}");
    server.wait_until("4 daemon pods ready", Duration::from_secs(10), |s| {
        s.get(resource("apps", "daemonsets"), ns, "f5-tmm")
            .is_some_and(|d| d["status"]["numberAvailable"] == 4)
    });
    let mut nodes: Vec<String> = pods(&server, ns, "f5-tmm")
        .iter()
        .map(|p| p["spec"]["nodeName"].as_str().unwrap().to_string())
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["n1", "n2", "n3", "n4"]);
    let (code, out, err) = k.run(&["get", "ds", "-n", ns, "-o", "name"]);
    assert_eq!((code, out.trim()), (0, "daemonset.apps/f5-tmm"), "{err}");

    let (code, _, err) = k.run(&["rollout", "restart", "ds/f5-tmm", "-n", ns]);
    assert_eq!(code, 0, "{err}");
    let (waiter, rx) = Kubectl::rollout_status(&server, "ds/f5-tmm");
    // maxUnavailable 1: at every instant at most one node lacks a Ready pod.
    observe(
        &server,
        ns,
        "f5-tmm",
        "daemon rolling update",
        |now| {
            let covered = ["n1", "n2", "n3", "n4"]
                .iter()
                .filter(|n| {
                    now.iter()
                        .any(|p| p["spec"]["nodeName"] == **n && ready(p) && !deleting(p))
                })
                .count();
            if covered < 3 {
                return Err(format!("only {covered} of 4 nodes have a Ready pod"));
            }
            Ok(())
        },
        |_| rx.try_recv().is_ok(),
    );
    let (code, out, err) = waiter.join().unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("successfully rolled out"), "{out}");
    let d = server.get("apps", "daemonsets", ns, "f5-tmm").unwrap();
    let st = &d["status"];
    assert_eq!(st["observedGeneration"], d["metadata"]["generation"]);
    assert_eq!(d["metadata"]["generation"], 2);
    for f in [
        "desiredNumberScheduled",
        "numberReady",
        "updatedNumberScheduled",
        "numberAvailable",
    ] {
        assert_eq!(st[f], 4, "{f}: {st}");
    }
}

// Long: each budget (minAvailable, then maxUnavailable) and the verdict on each eviction in
// turn, through kubectl and the raw subresource.
#[test]
fn evictions_respect_pod_disruption_budgets() {
    let server = spk_server();
    let ns = "spk-ingress";
    server.install_dssm("spk-utilities", ns, 3);
    server.wait_until("TMM ready", Duration::from_secs(10), |s| {
        s.get(resource("apps", "deployments"), ns, "f5-tmm")
            .is_some_and(|d| d["status"]["availableReplicas"] == 3)
    });
    let k = Kubectl::new(&server, ADMIN_TOKEN);
    let pdb = |spec: &str| {
        format!("apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata:\n  name: f5-tmm\n  namespace: spk-ingress\nspec:\n  {spec}\n  selector:\n    matchLabels: {{app: f5-tmm}}\n")
    };
    let (code, out, err) = k.with_yaml("apply", &["--server-side"], &pdb("minAvailable: 3"));
    assert_eq!(code, 0, "{out}{err}");
    server.wait_until("the budget's status", Duration::from_secs(10), |s| {
        s.get(resource("policy", "poddisruptionbudgets"), ns, "f5-tmm")
            .is_some_and(|p| p["status"]["currentHealthy"] == 3)
    });
    let (code, out, err) = k.run(&[
        "get",
        "pdb",
        "f5-tmm",
        "-n",
        ns,
        "-o",
        "jsonpath={.status.desiredHealthy}/{.status.currentHealthy}/{.status.disruptionsAllowed}/{.status.expectedPods}",
    ]);
    assert_eq!((code, out.as_str()), (0, "3/3/0/3"), "{err}");

    let victims: Vec<String> = pods(&server, ns, "f5-tmm")
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    let dir = support::tempdir();
    let evict = |name: &str| {
        let body = dir.path().join(format!("{name}.json"));
        std::fs::write(
            &body,
            json!({"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": name, "namespace": "spk-ingress"}})
            .to_string(),
        )
        .unwrap();
        k.run(&[
            "create",
            "--raw",
            &format!("/api/v1/namespaces/spk-ingress/pods/{name}/eviction"),
            "-f",
            body.to_str().unwrap(),
        ])
    };
    // No disruption allowed: 429 with the API server's message, and the pod stays.
    let (code, out, err) = evict(&victims[0]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("Cannot evict pod as it would violate the pod's disruption budget."),
        "{err}"
    );
    let rec = server.requests();
    let last = rec
        .iter()
        .rev()
        .find(|r| r.path.ends_with("/eviction"))
        .unwrap();
    assert_eq!(last.status, 429);
    assert!(!deleting(&server.get("", "pods", ns, &victims[0]).unwrap()));

    // maxUnavailable 1: one eviction passes and deletes gracefully; the next is refused
    // until the replacement is Ready.
    let (code, out, err) = k.with_yaml("replace", &[], &pdb("maxUnavailable: 1"));
    assert_eq!(code, 0, "{out}{err}");
    server.wait_until("one disruption allowed", Duration::from_secs(10), |s| {
        s.get(resource("policy", "poddisruptionbudgets"), ns, "f5-tmm")
            .is_some_and(|p| {
                p["status"]["disruptionsAllowed"] == 1
                    && p["status"]["observedGeneration"] == p["metadata"]["generation"]
            })
    });
    // Replacements take 3 s to be Ready, so the budget stays spent meanwhile.
    server.with_state(|s| s.timing.pod_start = Duration::from_secs(3));
    let (code, out, err) = evict(&victims[0]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(deleting(&server.get("", "pods", ns, &victims[0]).unwrap()));
    let (code, _, err) = evict(&victims[1]);
    assert_ne!(code, 0);
    assert!(err.contains("disruption budget"), "{err}");
    server.wait_until("the budget recovers", Duration::from_secs(20), |s| {
        s.get(resource("policy", "poddisruptionbudgets"), ns, "f5-tmm")
            .is_some_and(|p| p["status"]["disruptionsAllowed"] == 1)
    });
    let (code, out, err) = evict(&victims[1]);
    assert_eq!(code, 0, "{out}{err}");
    // A failed pod is no disruption: evicted whatever the budget says.
    server.wait_until("the budget is spent", Duration::from_secs(10), |s| {
        s.get(resource("policy", "poddisruptionbudgets"), ns, "f5-tmm")
            .is_some_and(|p| p["status"]["disruptionsAllowed"] == 0)
    });
    server.fail_pod(ns, &victims[2], "Evicted");
    let (code, out, err) = evict(&victims[2]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn rbac_covers_evictions_budgets_and_daemonsets_by_subresource() {
    let sa = "system:serviceaccount:spk-utilities:dssm-certs";
    let server = spk_server();
    server.install_dssm("spk-utilities", "spk-ingress", 1);
    server.wait_until("a TMM pod", Duration::from_secs(10), |s| {
        s.list(resource("", "pods"), Some("spk-ingress")).len() == 1
    });
    let rule = |group: &str, res: &str, verbs: &[&str]| Rule {
        api_groups: vec![group.into()],
        resources: vec![res.into()],
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        resource_names: vec![],
    };
    server.with_state(|s| {
        s.rbac = Some(
            [(
                s.sa_user.clone(),
                [(
                    "spk-ingress".to_string(),
                    vec![
                        rule("", "pods", &["get", "list", "create"]),
                        rule("policy", "poddisruptionbudgets", &["list"]),
                        rule("apps", "daemonsets", &["get"]),
                    ],
                )]
                .into(),
            )]
            .into(),
        )
    });
    assert!(sa.ends_with("dssm-certs"));
    let k = Kubectl::new(&server, SA_TOKEN);
    let pod = pods(&server, "spk-ingress", "f5-tmm")[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = support::tempdir();
    let body = dir.path().join("e.json");
    std::fs::write(
        &body,
        json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod}})
            .to_string(),
    )
    .unwrap();
    let path = format!("/api/v1/namespaces/spk-ingress/pods/{pod}/eviction");
    // `create` on pods is not `create` on pods/eviction.
    let (code, _, err) = k.run(&["create", "--raw", &path, "-f", body.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot create resource \"pods/eviction\""),
        "{err}"
    );
    let (code, _, err) = k.run(&["get", "pdb", "-n", "spk-ingress"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = k.run(&["get", "ds", "-n", "spk-ingress"]);
    assert!(
        code != 0 && err.contains("cannot list resource \"daemonsets\""),
        "{err}"
    );
    server.with_state(|s| {
        let user = s.sa_user.clone();
        s.rbac
            .as_mut()
            .unwrap()
            .get_mut(&user)
            .and_then(|by_ns| by_ns.get_mut("spk-ingress"))
            .unwrap()
            .push(rule("", "pods/eviction", &["create"]))
    });
    let (code, out, err) = k.run(&["create", "--raw", &path, "-f", body.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
}

/// A StatefulSet whose pods mount `secret` in `mode`: "dir" (a directory), "subPath" (one key
/// of it as a file), or "optional" (a directory, `optional: true`).
fn sts_mounting(name: &str, secret: &str, mode: &str) -> serde_json::Value {
    let mut o = sts(name, 2, Some("Parallel"));
    let mut volume = json!({"name": "certs", "secret": {"secretName": secret}});
    let mut mount = json!({"name": "certs", "mountPath": "/etc/ssl/certs"});
    match mode {
        "subPath" => {
            mount = json!({"name": "certs", "mountPath": "/etc/ssl/certs/dssm-ca.crt", "subPath": "dssm-ca.crt"});
            volume["secret"]["items"] = json!([{"key": "dssm-ca.crt", "path": "dssm-ca.crt"}]);
        }
        "optional" => volume["secret"]["optional"] = json!(true),
        _ => {}
    }
    o["spec"]["template"]["spec"]["volumes"] = json!([volume]);
    // A sidecar that mounts nothing, then the container that mounts the Secret.
    o["spec"]["template"]["spec"]["containers"] = json!([
        {"name": "sidecar", "image": "s"},
        {"name": "redis", "image": "r", "volumeMounts": [mount]}]);
    o
}

fn pod_ip(p: &serde_json::Value) -> Option<std::net::Ipv4Addr> {
    p["status"]["podIP"].as_str().map(|ip| ip.parse().unwrap())
}

/// What a real kubelet shows while a mounted Secret is missing (pkg/kubelet generateAPIPodStatus,
/// then WaitForAttachAndMount fails before the sandbox exists).
fn assert_waiting_for_its_volume(p: &serde_json::Value) {
    let name = &p["metadata"]["name"];
    assert_eq!(p["status"]["phase"], "Pending", "{name}: {p}");
    assert!(!ready(p), "{name} is Ready without its Secret");
    assert!(
        pod_ip(p).is_none(),
        "{name} has a pod IP before its sandbox"
    );
    let statuses = p["status"]["containerStatuses"].as_array().unwrap();
    assert_eq!(statuses.len(), 2, "{p}");
    for c in statuses {
        assert_eq!(c["state"]["waiting"]["reason"], "ContainerCreating", "{p}");
        assert_eq!(c["ready"], false);
    }
}

// Regression: the test cluster started every pod at once, so a fresh install's deadlock (pods
// waiting for the Secrets only the tool publishes) could not happen here.
#[test]
fn pods_wait_in_container_creating_until_their_mounted_secret_exists() {
    let server = spk_server();
    let ns = "spk-utilities";
    server.put(
        "apps",
        "statefulsets",
        ns,
        sts_mounting("dir", "certs-a", "dir"),
    );
    server.put(
        "apps",
        "statefulsets",
        ns,
        sts_mounting("sub", "certs-b", "subPath"),
    );
    server.put(
        "apps",
        "statefulsets",
        ns,
        sts_mounting("opt", "certs-c", "optional"),
    );
    server.put(
        "apps",
        "statefulsets",
        ns,
        sts("plain", 2, Some("Parallel")),
    );
    server.wait_until(
        "the pods without a missing Secret Ready",
        Duration::from_secs(10),
        |s| {
            ["opt-0", "opt-1", "plain-0", "plain-1"]
                .iter()
                .all(|n| s.get(resource("", "pods"), ns, n).is_some_and(ready))
        },
    );
    // Long enough for the kubelet to start a pod several times over (pod_start is shorter).
    std::thread::sleep(server.with_state(|s| s.timing.pod_start) * 3);
    for p in pods(&server, ns, "dir")
        .iter()
        .chain(&pods(&server, ns, "sub"))
    {
        assert_waiting_for_its_volume(p);
    }
    // The kubectl an operator runs says so too.
    let k = Kubectl::new(&server, ADMIN_TOKEN);
    let (code, out, err) = k.run(&[
        "get",
        "pod",
        "dir-0",
        "-n",
        ns,
        "-o",
        "jsonpath={.status.phase}/{.status.containerStatuses[*].state.waiting.reason}",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "Pending/ContainerCreating ContainerCreating");

    // A subPath of a key the Secret lacks still waits; the key appearing starts it.
    server.put(
        "",
        "secrets",
        ns,
        json!({"metadata": {"name": "certs-b"}, "data": {"other": "eA=="}}),
    );
    server.put(
        "",
        "secrets",
        ns,
        json!({"metadata": {"name": "certs-a"}, "data": {"dssm-ca.crt": "eA=="}}),
    );
    server.wait_until("dir pods Ready", Duration::from_secs(10), |s| {
        ["dir-0", "dir-1"]
            .iter()
            .all(|n| s.get(resource("", "pods"), ns, n).is_some_and(ready))
    });
    for p in pods(&server, ns, "sub") {
        assert_waiting_for_its_volume(&p);
    }
    server.put(
        "",
        "secrets",
        ns,
        json!({"metadata": {"name": "certs-b"}, "data": {"dssm-ca.crt": "eA=="}}),
    );
    server.wait_until("sub pods Ready", Duration::from_secs(10), |s| {
        ["sub-0", "sub-1"]
            .iter()
            .all(|n| s.get(resource("", "pods"), ns, n).is_some_and(ready))
    });
}

// Regression: the test cluster started a waiting pod `pod_start` after its Secret appeared.
// Kubelet retries a failed mount with exponential backoff (500 ms doubled up to 2 min 2 s,
// pkg/util/goroutinemap/exponentialbackoff): a pod that waited long starts at the next retry,
// noticeably later. Here the backoff is 1 s, 2 s, 4 s: the pod seen waiting fails its mounts at
// about 0, 1 and 3 s; its Secret appears at 3.5 s, and it starts at the 7 s retry.
#[test]
fn a_pod_that_waited_for_its_secret_starts_at_kubelets_next_backed_off_retry() {
    let server = spk_server();
    let ns = "spk-utilities";
    server.with_state(|s| {
        s.timing.mount_retry = Duration::from_secs(1);
        s.timing.mount_retry_max = Duration::from_secs(122);
    });
    let mut o = sts_mounting("late", "certs-late", "dir");
    o["spec"]["replicas"] = json!(1);
    server.put("apps", "statefulsets", ns, o);
    server.wait_until("late-0 waiting", Duration::from_secs(10), |s| {
        s.get(resource("", "pods"), ns, "late-0")
            .is_some_and(|p| p["status"]["phase"] == "Pending" && !p["status"]["hostIP"].is_null())
    });
    let seen = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(3500));
    server.put(
        "",
        "secrets",
        ns,
        json!({"metadata": {"name": "certs-late"}, "data": {"dssm-ca.crt": "eA=="}}),
    );
    let started = |s: &State| s.get(resource("", "pods"), ns, "late-0").is_some_and(ready);
    server.wait_until("late-0 Ready", Duration::from_secs(15), started);
    let after = seen.elapsed();
    assert!(
        after >= Duration::from_millis(6500),
        "late-0 started {after:?} after it was seen waiting, {:?} after its Secret appeared: \
         before kubelet's next retry",
        after - Duration::from_millis(3500)
    );
}

#[test]
fn started_pods_get_their_own_loopback_ip_and_a_new_one_when_recreated() {
    let server = spk_server();
    server.install_dssm("spk-utilities", "spk-ingress", 3);
    let all_ready = |s: &State| {
        let pods = s.list(resource("", "pods"), None);
        pods.len() == 9 && pods.iter().all(|p| ready(p))
    };
    server.wait_until("9 pods Ready", Duration::from_secs(10), all_ready);
    let ips = |server: &ApiServer| -> std::collections::BTreeMap<String, std::net::Ipv4Addr> {
        ["spk-utilities", "spk-ingress"]
            .iter()
            .flat_map(|ns| server.list("", "pods", ns))
            .map(|p| {
                let ip = pod_ip(&p).unwrap_or_else(|| panic!("a Ready pod without an IP: {p}"));
                assert!(ip.is_loopback(), "{ip} is not a loopback address");
                assert_ne!(ip, std::net::Ipv4Addr::LOCALHOST, "127.0.0.1 is the host's");
                assert_eq!(p["status"]["podIPs"][0]["ip"], ip.to_string());
                assert!(p["status"]["hostIP"]
                    .as_str()
                    .unwrap()
                    .parse::<std::net::Ipv4Addr>()
                    .unwrap()
                    .is_loopback());
                (p["metadata"]["name"].as_str().unwrap().to_string(), ip)
            })
            .collect()
    };
    let before = ips(&server);
    let distinct: std::collections::BTreeSet<_> = before.values().collect();
    assert_eq!(distinct.len(), 9, "{before:?}");
    let uid = server
        .get("", "pods", "spk-utilities", "f5-dssm-db-1")
        .unwrap()["metadata"]["uid"]
        .clone();
    server.with_state(|s| controllers::mark_terminating(s, "spk-utilities", "f5-dssm-db-1"));
    server.wait_until("db-1 recreated and Ready", Duration::from_secs(10), |s| {
        s.get(resource("", "pods"), "spk-utilities", "f5-dssm-db-1")
            .is_some_and(|p| p["metadata"]["uid"] != uid && ready(p))
    });
    let after = ips(&server);
    assert!(
        !before.values().any(|ip| *ip == after["f5-dssm-db-1"]),
        "the recreated pod reuses an address: {} ({before:?})",
        after["f5-dssm-db-1"]
    );
}

/// Deletions honour grace periods as the pod registry does: `--grace-period` (DeleteOptions),
/// else the pod's terminationGracePeriodSeconds, sets deletionGracePeriodSeconds and a
/// deletionTimestamp that far ahead; 0 with --force removes the pod at once; a container slower
/// to stop than its grace period is killed when it runs out.
#[test]
fn pod_deletions_honour_grace_periods() {
    let server = ApiServer::start(
        &["spk-utilities", "spk-ingress"],
        "system:serviceaccount:spk-utilities:dssm-certs",
    );
    server.install_dssm("spk-utilities", "spk-ingress", 2);
    let mut d = server
        .get("apps", "deployments", "spk-ingress", "f5-tmm")
        .unwrap();
    d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = json!(7);
    server.put("apps", "deployments", "spk-ingress", d);
    // Containers that would take a minute to stop: only the grace period ends them.
    server.with_state(|s| s.timing.pod_grace = Duration::from_secs(60));
    let live = |s: &store::State| -> Vec<serde_json::Value> {
        s.list(resource("", "pods"), Some("spk-ingress"))
            .into_iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .cloned()
            .collect()
    };
    server.wait_until(
        "two pods of the new template",
        Duration::from_secs(120),
        |s| {
            let pods = live(s);
            pods.len() == 2
                && pods
                    .iter()
                    .all(|p| p["spec"]["terminationGracePeriodSeconds"] == 7)
        },
    );
    let names: Vec<String> = server.with_state(|s| {
        live(s)
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    });
    let k = Kubectl::new(&server, ADMIN_TOKEN);
    let get = |name: &str| server.get("", "pods", "spk-ingress", name);
    // The pod's own grace period.
    let (code, out, err) = k.run(&[
        "delete",
        "pod",
        &names[0],
        "-n",
        "spk-ingress",
        "--wait=false",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let p = get(&names[0]).expect("still listed, terminating");
    assert_eq!(p["metadata"]["deletionGracePeriodSeconds"], 7);
    let at = time::OffsetDateTime::parse(
        p["metadata"]["deletionTimestamp"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let ahead = (at - time::OffsetDateTime::now_utc()).whole_seconds();
    assert!(
        (5..=7).contains(&ahead),
        "deletionTimestamp {ahead} s ahead"
    );
    // A shorter one asked for by the deletion: killed when it runs out, well before the
    // container would have stopped.
    let (code, out, err) = k.run(&[
        "delete",
        "pod",
        &names[0],
        "-n",
        "spk-ingress",
        "--grace-period=1",
        "--wait=false",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        get(&names[0]).unwrap()["metadata"]["deletionGracePeriodSeconds"],
        1
    );
    server.wait_until("killed after its grace", Duration::from_secs(5), |s| {
        s.get(resource("", "pods"), "spk-ingress", &names[0])
            .is_none()
    });
    // 0 with --force: gone at once.
    let (code, out, err) = k.run(&[
        "delete",
        "pod",
        &names[1],
        "-n",
        "spk-ingress",
        "--grace-period=0",
        "--force",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(get(&names[1]).is_none(), "removed at once");
}
