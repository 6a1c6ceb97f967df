//! The test cluster answers like a real API server: the real kubectl (1.32) drives it.

mod support;

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

    fn run(&self, args: &[&str]) -> (i32, String, String) {
        support::output(
            Command::new("kubectl")
                .env("KUBECONFIG", &self.config)
                .env("HOME", self._dir.path())
                .args(args),
        )
    }
}

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
