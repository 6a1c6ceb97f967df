//! The book's "Install and operate" page (docs/install.md), run as written. Every command line of its `sh`
//! blocks is run against the test cluster: `kubectl …` with the real kubectl and an admin
//! kubeconfig, `dssm-certs …` with the built binary, `helm install|upgrade|uninstall` by
//! rendering the chart with Helm's library (helm-python-sdk, tests/helm_chart.py) and applying
//! it with `kubectl apply --server-side -n`. A Job made from a CronJob is "run" here: its
//! container's args and env are executed with the binary under the Job's ServiceAccount token,
//! under the Roles and RoleBindings kubectl stored. The lines that cannot run here (container
//! engine, kustomize CLI) are listed in `NOT_RUN` with the reason; any other line this test does
//! not know fails it, so the README and this test cannot drift apart.

use testkit as support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use support::apiserver::{self, ApiServer};
use support::dssm_pods;
use support::load::LoadConfig;
use support::objects::{docs, merge};
use support::*;

const SECTION: &str = "## Install and operate";

/// README lines this test does not run, and why.
const NOT_RUN: &[(&str, &str)] = &[
    (
        "podman build ",
        "no container engine runs on these machines",
    ),
    (
        "podman push ",
        "no container engine and no registry on these machines",
    ),
    (
        "kustomize edit set image ",
        "no kustomize CLI here (kubectl embeds only the build); the overlay it edits is the \
         README's yaml block, rendered by the_overlay_images_entry_points_at_your_registry",
    ),
];

/// The commands this test runs (by prefix).
const RUN: &[&str] = &[
    "helm install ",
    "helm upgrade ",
    "helm uninstall ",
    "kubectl ",
    "dssm-certs ",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A fenced block of the section, under its `###` heading.
struct Block {
    heading: String,
    lang: String,
    /// Command lines (comments and blank lines left out, `\` continuations joined); for other
    /// languages, the text.
    lines: Vec<String>,
    text: String,
}

fn section() -> Vec<Block> {
    let readme = std::fs::read_to_string(repo().join("docs/install.md")).unwrap();
    let start = readme
        .find(&format!("\n{SECTION}\n"))
        .unwrap_or_else(|| panic!("docs/install.md has no section {SECTION:?}"));
    let body = &readme[start + 1..];
    let body = &body[..body[SECTION.len()..]
        .find("\n## ")
        .map_or(body.len(), |i| i + SECTION.len())];
    let mut blocks = Vec::new();
    let mut heading = String::new();
    let mut open: Option<Block> = None;
    for line in body.lines() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(lang)) => {
                open = Some(Block {
                    heading: heading.clone(),
                    lang: lang.trim().to_string(),
                    lines: Vec::new(),
                    text: String::new(),
                })
            }
            (Some(_), Some(_)) => blocks.push(open.take().unwrap()),
            (Some(b), None) => {
                b.text.push_str(line);
                b.text.push('\n');
                let l = line.trim();
                if l.is_empty() || l.starts_with('#') {
                    continue;
                }
                match b.lines.last_mut().filter(|p| p.ends_with('\\')) {
                    Some(prev) => {
                        prev.pop();
                        prev.push(' ');
                        prev.push_str(l);
                    }
                    None => b.lines.push(l.to_string()),
                }
            }
            (None, None) => {
                if let Some(h) = line.strip_prefix("### ") {
                    heading = h.to_string();
                }
            }
        }
    }
    assert!(open.is_none(), "an unclosed code block in {SECTION}");
    blocks
}

/// The `sh` command lines under the heading that contains `key`, in order.
fn commands_under(key: &str) -> Vec<String> {
    let blocks: Vec<Block> = section()
        .into_iter()
        .filter(|b| b.heading.contains(key) && b.lang == "sh")
        .collect();
    assert!(
        !blocks.is_empty(),
        "no sh block under a heading with {key:?}"
    );
    blocks.into_iter().flat_map(|b| b.lines).collect()
}

fn not_run_reason(line: &str) -> Option<&'static str> {
    NOT_RUN
        .iter()
        .find(|(p, _)| line.starts_with(p))
        .map(|(_, why)| *why)
}

#[test]
fn every_command_of_the_section_is_run_here_or_listed_with_its_reason() {
    let blocks = section();
    assert!(blocks.len() >= 8, "{} blocks", blocks.len());
    let mut listed_seen = vec![false; NOT_RUN.len()];
    for b in blocks.iter().filter(|b| b.lang == "sh") {
        for line in &b.lines {
            if let Some(i) = NOT_RUN.iter().position(|(p, _)| line.starts_with(p)) {
                listed_seen[i] = true;
                continue;
            }
            assert!(
                RUN.iter().any(|p| line.starts_with(p)),
                "README {SECTION} ({}): this test does not know how to run {line:?}",
                b.heading
            );
            // Shell constructs would run unseen: each line must be one command.
            for bad in ["|", ";", "&&", "$(", "`", ">"] {
                assert!(
                    !line.contains(bad),
                    "{line:?}: one command per line, no {bad:?}"
                );
            }
        }
    }
    // Every exception is still in the README (else it is stale here).
    for ((prefix, _), seen) in NOT_RUN.iter().zip(listed_seen) {
        assert!(
            seen,
            "NOT_RUN lists {prefix:?}, which the README no longer has"
        );
    }
    // The section's headings all have a test below.
    for key in [
        "Build and push",
        "Install with Helm",
        "Install with kustomize",
        "Install by hand",
        "Prometheus Operator",
        "first rotation",
    ] {
        commands_under(key);
    }
    let under = |k: &str| commands_under(k);
    assert!(under("Build and push")
        .iter()
        .all(|l| not_run_reason(l).is_some()));
}

/// A test cluster, the admin kubeconfig, and a PATH where `dssm-certs` is the built binary.
struct Cluster {
    /// The test cluster (its kubeconfigs are not used: the README runs as the admin).
    env: TestEnv,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    /// Helm releases: (name, namespace) -> the objects of the last render, by namespace.
    releases: HashMap<(String, String), BTreeMap<String, Vec<Value>>>,
    /// What each command printed, for failure messages.
    transcript: Vec<String>,
    /// Added to a Job's environment: where its pod would reach the dSSM pods by their IPs, the
    /// test cluster's dSSM pods are processes on loopback ports (`dssm_pods::Bed`).
    job_env: Vec<(String, String)>,
    /// Where the README's lines run: the repository's root unless a test writes files.
    cwd: PathBuf,
}

impl Cluster {
    fn new(env: TestEnv) -> Self {
        let dir = tempdir();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            env.server.kubeconfig(apiserver::ADMIN_TOKEN, "default"),
        )
        .unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_dssm-certs"), bin.join("dssm-certs"))
            .unwrap();
        Cluster {
            env,
            dir,
            kubeconfig,
            releases: HashMap::new(),
            transcript: Vec::new(),
            job_env: Vec::new(),
            cwd: repo().to_path_buf(),
        }
    }

    /// A cluster with the SPK and CNF namespaces and nothing else.
    fn empty() -> Self {
        let server = ApiServer::start(
            &["spk-utilities", "spk-ingress", "cnf-gateway"],
            "system:serviceaccount:spk-utilities:dssm-certs",
        );
        let dir = tempdir();
        Self::new(TestEnv {
            kubeconfig: dir.path().join("unused"),
            agent_kubeconfig: dir.path().join("unused"),
            server,
            dir,
            dssm_ns: "spk-utilities".into(),
            tmm_ns: "spk-ingress".into(),
            tmm_targets: Vec::new(),
        })
    }

    /// Runs one README line; returns (exit code, stdout, stderr).
    fn run(&mut self, line: &str) -> (i32, String, String) {
        let out = if line.starts_with("helm ") {
            self.helm(line)
        } else {
            self.sh(line)
        };
        self.transcript
            .push(format!("$ {line}\n[{}] {}{}", out.0, out.1, out.2));
        out
    }

    /// Runs `line` with sh, as the operator's shell would, from the repository's root.
    fn sh(&self, line: &str) -> (i32, String, String) {
        let path = format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        output(
            Command::new("sh")
                .arg("-c")
                .arg(line)
                .current_dir(&self.cwd)
                .env("KUBECONFIG", &self.kubeconfig)
                .env("HOME", self.dir.path())
                .env("PATH", path)
                .env_remove("DSSM_CERTS_LOG"),
        )
    }

    fn kubectl(&self, args: &str) -> (i32, String, String) {
        self.sh(&format!("kubectl {args}"))
    }

    fn must(&mut self, line: &str) -> String {
        let (code, out, err) = self.run(line);
        assert_eq!(
            code,
            0,
            "{line}\n{out}{err}\n{}",
            self.transcript.join("\n")
        );
        out
    }

    /// `helm install|upgrade NAME CHART -n NS [-f FILE]... [--set K=V]...` and
    /// `helm uninstall NAME -n NS`, as Helm does them: render, then apply each object in its
    /// namespace (upgrade also deletes what the new render no longer has); uninstall deletes
    /// what the release made.
    fn helm(&mut self, line: &str) -> (i32, String, String) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (verb, name) = (words[1], words[2]);
        let mut ns = "default".to_string();
        let mut values = json!({});
        let mut chart = None;
        let mut i = 3;
        while i < words.len() {
            match words[i] {
                "-n" | "--namespace" => ns = words[i + 1].to_string(),
                "-f" | "--values" => {
                    let text = std::fs::read_to_string(repo().join(words[i + 1])).unwrap();
                    merge(&mut values, serde_yaml::from_str(&text).unwrap());
                }
                "--set" => {
                    let (k, v) = words[i + 1].split_once('=').unwrap();
                    let mut over = json!(v);
                    for part in k.rsplit('.') {
                        over = json!({ part: over });
                    }
                    merge(&mut values, over);
                }
                other if chart.is_none() && verb != "uninstall" => {
                    chart = Some(other.to_string());
                    i += 1;
                    continue;
                }
                other => panic!("{line}: helm flag {other:?} unknown to this test"),
            }
            i += 2;
        }
        let key = (name.to_string(), ns.clone());
        let old = self.releases.remove(&key).unwrap_or_default();
        if verb == "uninstall" {
            assert!(!old.is_empty(), "{line}: no such release");
            for (obj_ns, objects) in &old {
                let r = self.kubectl_objects("delete", obj_ns, objects);
                if r.0 != 0 {
                    return r;
                }
            }
            return (
                0,
                format!("release \"{name}\" uninstalled\n"),
                String::new(),
            );
        }
        assert_eq!(verb == "upgrade", !old.is_empty(), "{line}: release state");
        let chart = repo().join(chart.expect("a chart"));
        let python = repo().join(".venv/bin/python");
        assert!(
            python.exists(),
            "{} is missing: run scripts/setup-tests",
            python.display()
        );
        let (code, out, err) = output(
            Command::new(&python)
                .arg(repo().join("tests/helm_chart.py"))
                .args([
                    "render",
                    chart.to_str().unwrap(),
                    &values.to_string(),
                    name,
                    &ns,
                ]),
        );
        if code != 0 {
            return (code, out, err);
        }
        let files: serde_json::Map<String, Value> = serde_json::from_str(&out).unwrap();
        let mut by_ns: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for (path, text) in files {
            if path.ends_with("NOTES.txt") {
                continue;
            }
            for o in docs(text.as_str().unwrap()) {
                let obj_ns = o["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or(&ns)
                    .to_string();
                by_ns.entry(obj_ns).or_default().push(o);
            }
        }
        let mut all = String::new();
        for (obj_ns, objects) in &by_ns {
            let r =
                self.kubectl_objects("apply --server-side --field-manager helm", obj_ns, objects);
            all.push_str(&r.1);
            if r.0 != 0 {
                return r;
            }
        }
        // What the old release had and the new one does not: deleted, as helm upgrade does.
        for (obj_ns, objects) in &old {
            let gone: Vec<Value> = objects
                .iter()
                .filter(|o| {
                    !by_ns
                        .get(obj_ns)
                        .is_some_and(|n| n.iter().any(|x| same(x, o)))
                })
                .cloned()
                .collect();
            if !gone.is_empty() {
                let r = self.kubectl_objects("delete", obj_ns, &gone);
                if r.0 != 0 {
                    return r;
                }
            }
        }
        self.releases.insert(key, by_ns);
        (0, all, String::new())
    }

    fn kubectl_objects(&self, verb: &str, ns: &str, objects: &[Value]) -> (i32, String, String) {
        let file = self.dir.path().join("objects.yaml");
        let yaml: Vec<String> = objects
            .iter()
            .map(|o| serde_yaml::to_string(o).unwrap())
            .collect();
        std::fs::write(&file, yaml.join("---\n")).unwrap();
        self.kubectl(&format!("{verb} -n {ns} -f {}", file.display()))
    }

    /// The stored object of `kind` (as the test cluster stores it).
    fn stored(&self, o: &Value, default_ns: &str) -> Option<Value> {
        let (group, _) = o["apiVersion"]
            .as_str()
            .unwrap()
            .rsplit_once('/')
            .unwrap_or(("", ""));
        let res = apiserver::RESOURCES
            .iter()
            .find(|r| r.group == group && r.kind == o["kind"].as_str().unwrap())
            .unwrap_or_else(|| panic!("the test cluster does not store {}", o["kind"]));
        let ns = o["metadata"]["namespace"].as_str().unwrap_or(default_ns);
        self.env.server.get(
            res.group,
            res.plural,
            ns,
            o["metadata"]["name"].as_str().unwrap(),
        )
    }

    /// Every object of `objects` is stored in its namespace (else `ns`), with the same rules,
    /// subjects, roleRef and spec fields.
    fn assert_all_stored(&self, objects: &[Value], ns: &str) {
        for o in objects {
            let s = self.stored(o, ns).unwrap_or_else(|| {
                panic!("{} {} not stored in {ns}", o["kind"], o["metadata"]["name"])
            });
            for field in ["rules", "subjects", "roleRef"] {
                assert_eq!(
                    s[field], o[field],
                    "{} {}",
                    o["kind"], o["metadata"]["name"]
                );
            }
            for (k, v) in o["spec"].as_object().into_iter().flatten() {
                assert_eq!(
                    &s["spec"][k], v,
                    "{} {} spec.{k}",
                    o["kind"], o["metadata"]["name"]
                );
            }
        }
    }

    /// The RBAC the stored Roles and RoleBindings grant (what the authorizer would read).
    fn stored_rbac(&self) -> HashMap<String, HashMap<String, Vec<apiserver::Rule>>> {
        let mut yaml = String::new();
        for plural in ["roles", "rolebindings"] {
            for ns in self.namespaces() {
                for o in self
                    .env
                    .server
                    .list("rbac.authorization.k8s.io", plural, &ns)
                {
                    yaml.push_str(&serde_yaml::to_string(&o).unwrap());
                    yaml.push_str("---\n");
                }
            }
        }
        apiserver::rbac_from_manifests(&yaml)
    }

    fn namespaces(&self) -> Vec<String> {
        self.env
            .server
            .list("", "namespaces", "")
            .iter()
            .map(|n| n["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// Runs Job `name` in `ns` as its pod would: its container's args and env (fieldRefs
    /// resolved) with the binary, authenticated as the Job's ServiceAccount, under the RBAC
    /// stored in the cluster. Records the outcome in the Job's status, as the Job controller
    /// does (`Complete` or `Failed`).
    fn run_job(&self, ns: &str, name: &str) -> (i32, String, String) {
        let job = self
            .env
            .server
            .get("batch", "jobs", ns, name)
            .unwrap_or_else(|| panic!("job {ns}/{name} was not created"));
        // kubectl sent it as protobuf: what the test cluster read is the CronJob's template.
        let owner = &job["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "CronJob", "{job:#}");
        let cronjob = self
            .env
            .server
            .get("batch", "cronjobs", ns, owner["name"].as_str().unwrap())
            .unwrap();
        let pod = &job["spec"]["template"]["spec"];
        let template = &cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"];
        for f in [
            "serviceAccountName",
            "restartPolicy",
            "terminationGracePeriodSeconds",
        ] {
            assert_eq!(pod[f], template[f], "job {ns}/{name}: {f}");
        }
        for f in ["image", "args", "env"] {
            assert_eq!(
                pod["containers"][0][f], template["containers"][0][f],
                "job {ns}/{name}: {f}"
            );
        }
        let sa = pod["serviceAccountName"].as_str().unwrap();
        let user = format!("system:serviceaccount:{ns}:{sa}");
        assert_eq!(
            self.env.server.with_state(|s| s.sa_user.clone()),
            user,
            "the test cluster's ServiceAccount token is not the Job's"
        );
        let rbac = self.stored_rbac();
        assert!(
            rbac.contains_key(&user),
            "no RoleBinding grants {user} anything"
        );
        self.env.server.with_state(|s| s.rbac = Some(rbac));
        let c = &pod["containers"][0];
        let pod_name = format!("{name}-x7k2p");
        let kubeconfig = self.dir.path().join(format!("{name}.kubeconfig"));
        std::fs::write(
            &kubeconfig,
            self.env.server.kubeconfig(apiserver::SA_TOKEN, ns),
        )
        .unwrap();
        let mut cmd = bin();
        cmd.env_clear()
            .env("KUBECONFIG", &kubeconfig)
            .env("HOME", self.dir.path());
        for e in c["env"].as_array().into_iter().flatten() {
            let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.namespace") => ns.to_string(),
                Some("metadata.name") => pod_name.clone(),
                Some(other) => panic!("fieldRef {other} unknown to this test"),
                None => e["value"].as_str().unwrap_or("").to_string(),
            };
            cmd.env(e["name"].as_str().unwrap(), value);
        }
        for (k, v) in &self.job_env {
            cmd.env(k, v);
        }
        assert!(
            c["command"].is_null(),
            "the image's entrypoint is the binary"
        );
        for a in c["args"].as_array().into_iter().flatten() {
            cmd.arg(a.as_str().unwrap());
        }
        let out = output(&mut cmd);
        let (cond, field) = if out.0 == 0 {
            ("Complete", "succeeded")
        } else {
            ("Failed", "failed")
        };
        let mut job = job;
        job["status"] = json!({field: 1, "conditions": [{"type": cond, "status": "True",
            "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
        self.env.server.put("batch", "jobs", ns, job);
        out
    }
}

fn same(a: &Value, b: &Value) -> bool {
    a["kind"] == b["kind"] && a["metadata"]["name"] == b["metadata"]["name"]
}

fn kind_of(objects: &[Value], kind: &str) -> Vec<Value> {
    objects
        .iter()
        .filter(|o| o["kind"] == kind)
        .cloned()
        .collect()
}

// Long: replays the README's Helm section command by command, in its order, checking the
// cluster after each.
#[test]
fn readme_install_with_helm_upgrade_and_uninstall() {
    let mut c = Cluster::empty();
    // The Secrets exist before (dSSM and TMM use them): uninstall must leave them.
    for ns in ["spk-utilities", "spk-ingress", "cnf-gateway"] {
        c.env.server.put(
            "",
            "secrets",
            ns,
            json!({"metadata": {"name": "dssm-certs-secret"}, "type": "Opaque"}),
        );
    }
    let mut uninstalled = false;
    for line in commands_under("Install with Helm") {
        let out = c.must(&line);
        let (verb, ns) = {
            let w: Vec<&str> = line.split_whitespace().collect();
            let ns = w[w.iter().position(|x| *x == "-n").unwrap() + 1].to_string();
            (w[1].to_string(), ns)
        };
        match verb.as_str() {
            "install" | "upgrade" => {
                let release = &c.releases[&("dssm-certs".to_string(), ns.clone())];
                for (obj_ns, objects) in release {
                    c.assert_all_stored(objects, obj_ns);
                }
                let cronjob = c
                    .env
                    .server
                    .get("batch", "cronjobs", &ns, "dssm-certs-rotate")
                    .unwrap();
                let container =
                    &cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0];
                // The default restart strategy is the rolling one.
                assert!(
                    container["env"]
                        .as_array()
                        .unwrap()
                        .contains(&json!({"name": "DSSM_CERTS_STRATEGY", "value": "rolling"})),
                    "{out}"
                );
                if let Some(tag) = line.split("--set image.tag=").nth(1) {
                    let tag = tag.split_whitespace().next().unwrap();
                    assert!(
                        container["image"]
                            .as_str()
                            .unwrap()
                            .ends_with(&format!(":{tag}")),
                        "{}",
                        container["image"]
                    );
                }
                // The TMM Roles are bound to the dSSM namespace's ServiceAccounts.
                let rbac = c.stored_rbac();
                let tmm_ns = if ns == "cnf-gateway" {
                    "cnf-gateway"
                } else {
                    "spk-ingress"
                };
                for sa in ["dssm-certs", "dssm-certs-agent"] {
                    let user = format!("system:serviceaccount:{ns}:{sa}");
                    assert!(
                        rbac.get(&user)
                            .is_some_and(|m| m.contains_key(tmm_ns) && m.contains_key(&ns)),
                        "{user} has no Role in {tmm_ns} and {ns}"
                    );
                }
            }
            "uninstall" => {
                uninstalled = true;
                for plural in ["cronjobs", "jobs"] {
                    assert!(
                        c.env.server.list("batch", plural, &ns).is_empty(),
                        "{plural} left"
                    );
                }
                for tmm in ["spk-ingress", &ns] {
                    assert!(c
                        .env
                        .server
                        .list("rbac.authorization.k8s.io", "roles", tmm)
                        .is_empty());
                    assert!(c
                        .env
                        .server
                        .list("rbac.authorization.k8s.io", "rolebindings", tmm)
                        .is_empty());
                }
                assert!(c.env.server.list("", "serviceaccounts", &ns).is_empty());
                for ns in ["spk-utilities", "spk-ingress"] {
                    assert!(
                        c.env
                            .server
                            .get("", "secrets", ns, "dssm-certs-secret")
                            .is_some(),
                        "the Secrets stay"
                    );
                }
            }
            other => panic!("helm {other}"),
        }
    }
    assert!(uninstalled, "the README says how to uninstall");
    // The CNF install came after: its release is in place.
    assert!(c
        .env
        .server
        .get("batch", "cronjobs", "cnf-gateway", "dssm-certs-reconcile")
        .is_some());
}

#[test]
fn readme_install_with_kustomize() {
    let mut c = Cluster::empty();
    for line in commands_under("Install with kustomize") {
        if let Some(why) = not_run_reason(&line) {
            eprintln!("not run: {line} ({why})");
            continue;
        }
        c.must(&line);
        let dir = line
            .strip_prefix("kubectl apply -k ")
            .expect("kubectl apply -k DIR");
        let objects = docs(&apiserver::kustomize(&repo().join(dir)));
        c.assert_all_stored(&objects, "");
        assert_eq!(kind_of(&objects, "CronJob").len(), 2);
    }
    // What the overlays bind is what the test cluster enforces in every other test.
    for overlay in ["spk", "cnf"] {
        let want = apiserver::rbac_from_manifests(&apiserver::render_overlay(overlay));
        let got = c.stored_rbac();
        for (user, by_ns) in want {
            assert_eq!(
                format!("{:?}", sorted(&got[&user])),
                format!("{:?}", sorted(&by_ns)),
                "{user}"
            );
        }
    }
}

fn sorted(m: &HashMap<String, Vec<apiserver::Rule>>) -> BTreeMap<String, Vec<String>> {
    m.iter()
        .map(|(k, v)| {
            let mut rules: Vec<String> = v.iter().map(|r| format!("{r:?}")).collect();
            rules.sort();
            (k.clone(), rules)
        })
        .collect()
}

#[test]
fn the_overlay_images_entry_points_at_your_registry() {
    let block = section()
        .into_iter()
        .find(|b| b.heading.contains("Install with kustomize") && b.lang == "yaml")
        .expect("the overlay example");
    // The overlay sits next to a checkout: `../manifests/overlays/spk` from its folder.
    let dir = tempdir();
    let checkout = dir.path().join("checkout");
    std::os::unix::fs::symlink(repo(), &checkout).unwrap();
    let overlay = dir.path().join("my-overlay");
    std::fs::create_dir(&overlay).unwrap();
    std::fs::write(
        overlay.join("kustomization.yaml"),
        block
            .text
            .replace("../manifests/", "../checkout/manifests/"),
    )
    .unwrap();
    let want: Value = serde_yaml::from_str(&block.text).unwrap();
    let image = &want["images"][0];
    // Over the shipped overlays the image is already the base's registry.example.com/dssm-certs.
    assert_eq!(
        image["name"], "registry.example.com/dssm-certs",
        "the entry must match the image as the overlay below renders it"
    );
    let pinned = format!(
        "{}:{}",
        image["newName"].as_str().unwrap(),
        image["newTag"].as_str().unwrap()
    );
    let rendered = docs(&apiserver::kustomize(&overlay));
    let mut seen = 0;
    for o in &rendered {
        let spec = match o["kind"].as_str().unwrap() {
            "CronJob" => &o["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            "Deployment" => &o["spec"]["template"]["spec"],
            _ => continue,
        };
        assert_eq!(
            spec["containers"][0]["image"],
            pinned.as_str(),
            "{}",
            o["metadata"]["name"]
        );
        seen += 1;
    }
    assert_eq!(seen, 3);
    // An entry named as the workloads name it in the base (`dssm-certs`) matches nothing here,
    // silently: the reported surprise.
    let wrong = block
        .text
        .replace("name: registry.example.com/dssm-certs", "name: dssm-certs")
        .replace("../manifests/", "../checkout/manifests/");
    std::fs::write(overlay.join("kustomization.yaml"), wrong).unwrap();
    let rendered = apiserver::kustomize(&overlay);
    assert!(
        !rendered.contains(&pinned),
        "a non-matching images: entry applied"
    );
}

// Long: replays the README's by-hand section command by command, in its order, checking the
// cluster after each.
#[test]
fn readme_install_by_hand_with_namespace_free_manifests() {
    let mut c = Cluster::empty();
    // The lines write dssm_secrets/ where they run: a copy of the tree's manifests/, not the
    // repository.
    let work = c.dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::os::unix::fs::symlink(repo().join("manifests"), work.join("manifests")).unwrap();
    c.cwd = work.clone();
    c.env.server.install_dssm("spk-utilities", "spk-ingress", 3);
    for line in commands_under("Install by hand") {
        c.must(&line);
    }
    the_hand_made_secrets_apply_into_both_namespaces_and_keep_their_ca(&mut c, &work);
    // The same RBAC as the SPK overlay: the bindings made by command bind the dSSM namespace's
    // ServiceAccounts in the TMM namespace.
    let want = apiserver::rbac_from_manifests(&apiserver::render_overlay("spk"));
    let got = c.stored_rbac();
    assert_eq!(want.len(), 2);
    for (user, by_ns) in &want {
        let mine = got
            .get(user)
            .unwrap_or_else(|| panic!("nothing bound to {user}"));
        assert_eq!(
            format!("{:?}", sorted(mine)),
            format!("{:?}", sorted(by_ns)),
            "{user}"
        );
    }
    // The workloads know the TMM namespace and run the image set by command.
    let overlay = docs(&apiserver::render_overlay("spk"));
    for (plural, name) in [
        ("cronjobs", "dssm-certs-reconcile"),
        ("cronjobs", "dssm-certs-rotate"),
        ("deployments", "dssm-certs-agent"),
    ] {
        let group = if plural == "cronjobs" {
            "batch"
        } else {
            "apps"
        };
        let o = c
            .env
            .server
            .get(group, plural, "spk-utilities", name)
            .unwrap();
        let spec = if plural == "cronjobs" {
            &o["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        } else {
            &o["spec"]["template"]["spec"]
        };
        let env = spec["containers"][0]["env"].as_array().unwrap();
        assert!(
            env.contains(&json!({"name": "DSSM_CERTS_TMM_NAMESPACE", "value": "spk-ingress"})),
            "{name}: {env:?}"
        );
        assert!(
            !spec["containers"][0]["image"]
                .as_str()
                .unwrap()
                .starts_with("registry.example.com"),
            "{name}"
        );
        let kind = if plural == "cronjobs" {
            "CronJob"
        } else {
            "Deployment"
        };
        let o2 = overlay
            .iter()
            .find(|x| x["kind"] == kind && x["metadata"]["name"] == name)
            .unwrap();
        let env2 = if plural == "cronjobs" {
            &o2["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]
        } else {
            &o2["spec"]["template"]["spec"]["containers"][0]["env"]
        };
        let names = |e: &Value| -> Vec<String> {
            e.as_array()
                .unwrap()
                .iter()
                .map(|x| x["name"].as_str().unwrap().to_string())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        assert_eq!(
            names(&spec["containers"][0]["env"]),
            names(env2),
            "{name}: the same env as the overlay"
        );
    }
}

/// After the README's by-hand lines: the copies are in both namespaces, the CA key only in the
/// dSSM one (kubectl refuses it elsewhere), and the first renewal keeps the CA `generate` made.
/// It used to be replaced: hand-applied Secrets carried no CA key into the cluster.
fn the_hand_made_secrets_apply_into_both_namespaces_and_keep_their_ca(
    c: &mut Cluster,
    work: &Path,
) {
    use std::os::unix::fs::PermissionsExt;
    let out = work.join("dssm_secrets");
    let mode = |f: &str| std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("ca-key-secret.yaml"), 0o600);
    let ca = read(&out.join("dssm-ca.crt"));
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    };
    for ns in ["spk-utilities", "spk-ingress"] {
        for name in ["dssm-certs-secret", "dssm-keys-secret"] {
            assert!(
                c.env.server.get("", "secrets", ns, name).is_some(),
                "{ns}/{name}"
            );
        }
    }
    let store = c
        .env
        .server
        .get("", "secrets", "spk-utilities", "dssm-ca-key-secret")
        .expect("the CA key Secret in the dSSM namespace");
    assert_eq!(b64(&store["data"]["dssm-ca.crt"]), ca);
    assert!(c
        .env
        .server
        .get("", "secrets", "spk-ingress", "dssm-ca-key-secret")
        .is_none());
    let (code, _, err) = c.kubectl("apply -n spk-ingress -f dssm_secrets/ca-key-secret.yaml");
    assert_ne!(code, 0, "the CA key Secret applied into the TMM namespace");
    assert!(err.contains("does not match the namespace"), "{err}");
    // The CronJob's first renewal (made due now: the hand-made leaf has 365 days left, less
    // than 400; its successor lives 800), without the restart this cluster cannot run.
    let line = "dssm-certs reconcile --days 800 --renew-before 400d --no-restart \
                --dssm-namespace spk-utilities --tmm-namespace spk-ingress";
    let (code, stdout, err) = c.sh(line);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("plan: renew-leaf"), "{stdout}");
    for ns in ["spk-utilities", "spk-ingress"] {
        let certs = c
            .env
            .server
            .get("", "secrets", ns, "dssm-certs-secret")
            .unwrap();
        assert_eq!(
            b64(&certs["data"]["dssm-ca.crt"]),
            ca,
            "{ns}: the CA changed"
        );
        assert_ne!(
            b64(&certs["data"]["dssm-cert.crt"]),
            read(&out.join("dssm-cert.crt")),
            "{ns}: the leaf was not renewed"
        );
    }
}

/// The `generate` section shows the same hand install as "2c. Install by hand", which runs it.
#[test]
fn the_generate_section_shows_the_hand_install_that_2c_runs() {
    let readme = std::fs::read_to_string(repo().join("docs/commands.md")).unwrap();
    let start = readme.find("\n### `generate --out DIR`\n").unwrap();
    let block = &readme[start..];
    let block = &block[block.find("```sh\n").unwrap() + 6..];
    let block = &block[..block.find("```").unwrap()];
    let lines: Vec<String> = block.lines().map(|l| l.trim().to_string()).collect();
    let by_hand: Vec<String> = commands_under("Install by hand")
        .into_iter()
        .skip_while(|l| !l.starts_with("dssm-certs generate"))
        .collect();
    assert_eq!(lines, by_hand);
}

#[test]
fn manifests_install_are_what_scripts_sync_install_writes() {
    let dir = tempdir();
    let (code, out, err) =
        output(Command::new(repo().join("scripts/sync-install")).arg(dir.path()));
    assert_eq!(code, 0, "{out}{err}");
    for file in ["dssm-certs.yaml", "tmm-access.yaml"] {
        let want = std::fs::read_to_string(dir.path().join(file)).unwrap();
        let have = std::fs::read_to_string(repo().join("manifests/install").join(file)).unwrap();
        assert!(want == have, "manifests/install/{file} differs from what scripts/sync-install writes: run scripts/sync-install");
        for o in docs(&have) {
            assert!(
                o["metadata"]["namespace"].is_null(),
                "{file}: {} {} has a namespace",
                o["kind"],
                o["metadata"]["name"]
            );
            // Only the dSSM namespace's bindings ship: their subjects name no namespace, so they
            // bind that namespace's ServiceAccounts.
            if o["kind"] == "RoleBinding" {
                assert_eq!(
                    file, "dssm-certs.yaml",
                    "the TMM bindings are made by command"
                );
                for subject in o["subjects"].as_array().unwrap() {
                    assert!(subject["namespace"].is_null(), "{file}: {subject}");
                }
            }
        }
    }
}

#[test]
fn readme_prometheus_operator_objects_need_their_crds() {
    let mut c = Cluster::empty();
    let lines = commands_under("Prometheus Operator");
    // Without the CRDs kubectl refuses, as on a real cluster.
    for line in &lines {
        let (code, out, err) = c.run(line);
        assert_ne!(code, 0, "{out}");
        assert!(err.contains("ensure CRDs are installed first"), "{err}");
    }
    // Discovery says the same, as `kubectl api-resources` shows it (short names as the
    // registries and the CRDs declare them).
    let listed = |c: &Cluster| c.kubectl("api-resources --no-headers").1;
    let before = listed(&c);
    for (name, short) in [
        ("cronjobs", "cj"),
        ("serviceaccounts", "sa"),
        ("services", "svc"),
        ("configmaps", "cm"),
    ] {
        assert!(
            before
                .lines()
                .any(|l| l.starts_with(name) && l.contains(&format!(" {short} "))),
            "{before}"
        );
    }
    for l in ["rolebindings", "roles", "jobs"] {
        assert!(before.lines().any(|x| x.starts_with(l)), "{before}");
    }
    assert!(!before.contains("monitoring.coreos.com"), "{before}");
    c.env
        .server
        .with_state(|s| s.prometheus_operator_crds = true);
    for line in &lines {
        c.must(line);
    }
    assert!(c
        .env
        .server
        .get(
            "monitoring.coreos.com",
            "prometheusrules",
            "spk-utilities",
            "dssm-certs"
        )
        .is_some());
    assert!(!c
        .env
        .server
        .list("monitoring.coreos.com", "servicemonitors", "spk-utilities")
        .is_empty());
    let after = listed(&c);
    for kind in ["servicemonitors", "podmonitors", "prometheusrules"] {
        assert!(
            after
                .lines()
                .any(|l| l.starts_with(kind) && l.contains("monitoring.coreos.com/v1")),
            "{after}"
        );
    }
}

#[test]
fn readme_safe_first_rotation() {
    // A cluster as the seeds leave it: Secrets made by hand in both namespaces, dSSM pods that
    // are real Redis processes (TLS only, kubelet-like mounts) under client load, and dssm-certs
    // installed by the SPK overlay (section 2b).
    let env = dssm_pods::seeded();
    let (bed, load) = dssm_pods::Bed::start(&env, LoadConfig::default());
    let mut c = Cluster::new(env);
    c.job_env = vec![
        (
            "DSSM_CERTS_REDIS_ENDPOINT".into(),
            bed.redis_endpoints.clone(),
        ),
        ("DSSM_CERTS_PROBE_ENDPOINT".into(), bed.sentinel.clone()),
        (
            "DSSM_CERTS_PROBE_SERVER_NAME".into(),
            "f5-dssm-sentinel".into(),
        ),
    ];
    c.must("kubectl apply -k manifests/overlays/spk");
    let mut ran_job = false;
    for line in commands_under("first rotation") {
        c.env.server.clear_requests();
        let (code, out, err) = c.run(&line);
        let all = format!("{out}{err}\n{}", c.transcript.join("\n"));
        let w: Vec<&str> = line.split_whitespace().collect();
        match (w[0], w[1]) {
            // Seed-made Secrets are not labelled as ours: a warning, not a failure.
            ("dssm-certs", "doctor") => assert!(code == 0 || code == 1, "{all}"),
            ("dssm-certs", "reconcile") => {
                assert_eq!(code, 0, "{all}");
                assert!(out.contains("plan: "), "{all}");
                assert!(
                    c.env.server.requests().iter().all(|r| !r.is_write()),
                    "--dry-run wrote"
                );
            }
            ("kubectl", "create") => {
                assert_eq!(code, 0, "{all}");
                let name = w[w.iter().position(|x| x.starts_with("--from=")).unwrap() + 1];
                let (jc, jout, jerr) = c.run_job("spk-utilities", name);
                assert_eq!(jc, 0, "job {name}: {jout}{jerr}");
                // The CronJob's strategy: rolling, no scale to zero. Seed-made Secrets have no
                // CA key in the cluster, so this first rotation replaces the CA.
                assert!(jout.contains("plan: rotate-ca"), "{jout}{jerr}");
                assert!(
                    !c.env
                        .server
                        .requests()
                        .iter()
                        .any(|r| r.path.ends_with("/scale")),
                    "the Job scaled TMM"
                );
                ran_job = true;
            }
            ("kubectl", "wait") => assert_eq!(code, 0, "{all}"),
            ("dssm-certs", "check") => assert_eq!(code, 0, "{all}"),
            _ => panic!("{line}: no expectation in this test"),
        }
    }
    assert!(ran_job, "the README runs the on-demand rotation Job");
    let (figures, _) = dssm_pods::finish(bed, load);
    figures.assert_unnoticed("the README's first rotation (the on-demand Job)");
}
