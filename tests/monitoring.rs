//! Monitoring: the alert rules under `promtool test rules`, a real Prometheus scraping a running
//! agent and evaluating them, and the Grafana dashboard's queries against the agent's metrics.
//! promtool and prometheus come from Debian's `prometheus` package (scripts/setup-tests); missing,
//! these tests fail, never skip.

use testkit as support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::agent::{http_get, live_exposition, start_watching, unknown_metrics};
use support::redis::{free_port, wait_for};
use support::TestEnv;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn rules_file() -> PathBuf {
    repo().join("charts/dssm-certs/files/rules.yaml")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo())
        .output()
        .expect("promtool (Debian package prometheus: run scripts/setup-tests)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_alert_rules_pass_their_promtool_unit_tests() {
    let checked = promtool(&["check", "rules", rules_file().to_str().unwrap()]);
    assert!(checked.contains("SUCCESS: 8 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "tests/alerts/rules_test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real Prometheus on a free loopback port, with its own data folder, scraping `target` every
/// second as job dssm-certs-agent and evaluating the shipped rules every second.
fn prometheus(target: &str) -> Prometheus {
    let dir = support::tempdir();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: dssm-certs-agent\n    static_configs:\n      - targets: ['{target}']\n",
            rules_file().display()
        ),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (Debian package prometheus: run scripts/setup-tests)");
    let p = Prometheus {
        child,
        addr,
        _dir: dir,
    };
    wait_for("Prometheus to be ready", Duration::from_secs(30), || {
        http_get(&p.addr, "/-/ready")
    });
    p
}

fn api(p: &Prometheus, path: &str) -> Option<Value> {
    let v: Value = serde_json::from_str(&http_get(&p.addr, path)?).ok()?;
    (v["status"] == "success").then(|| v["data"].clone())
}

/// The agent sees a leaf with 20 days left, and the TMM target marked for a restart that
/// `--no-restart` did not run; Prometheus scrapes it, and its rules put
/// DssmCertificateExpiringSoon (for: 1h) and DssmTmmRestartPending (for: 2h) pending, on the
/// agent's real per-target series, while the other alerts stay inactive.
#[test]
fn a_real_prometheus_scrapes_the_agent_and_evaluates_the_rules() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart", "--days", "20"]).0, 0);
    let agent = start_watching(&env, &env.agent_kubeconfig, &[]);
    let prom = prometheus(&agent.addr);

    let alerts = wait_for("the expiry alert pending", Duration::from_secs(60), || {
        let alerts = api(&prom, "/api/v1/alerts")?["alerts"].as_array()?.clone();
        // Until Prometheus has scraped the agent once, `absent(up{...})` holds and
        // DssmCertAgentDown is pending for a moment (as on a real Prometheus just started): wait
        // for the first scrape to clear it.
        let agent_seen = !alerts
            .iter()
            .any(|a| a["labels"]["alertname"] == "DssmCertAgentDown");
        let named = |name: &str| alerts.iter().any(|a| a["labels"]["alertname"] == name);
        (agent_seen
            && named("DssmTmmRestartPending")
            && alerts.iter().any(|a| {
                a["labels"]["alertname"] == "DssmCertificateExpiringSoon"
                    && a["labels"]["namespace"] == "spk-ingress"
                    && a["labels"]["key"] == "dssm-cert.crt"
            }))
        .then_some(alerts)
    });
    let (expiry, pending): (Vec<&Value>, Vec<&Value>) = alerts
        .iter()
        .partition(|a| a["labels"]["alertname"] == "DssmCertificateExpiringSoon");
    for a in &alerts {
        assert_eq!(a["state"], "pending", "its for: has not passed: {a:#}");
    }
    for a in &expiry {
        assert_eq!(
            a["labels"]["key"], "dssm-cert.crt",
            "the CA has 10 years: {a:#}"
        );
    }
    assert_eq!(expiry.len(), 2, "the leaf in both namespaces: {alerts:#?}");
    assert_eq!(pending.len(), 1, "{alerts:#?}");
    assert_eq!(
        (
            &pending[0]["labels"]["alertname"],
            &pending[0]["labels"]["namespace"],
            &pending[0]["labels"]["target"]
        ),
        (
            &Value::from("DssmTmmRestartPending"),
            &Value::from("spk-ingress"),
            &Value::from("deployment/f5-tmm")
        ),
        "{alerts:#?}"
    );

    // Every rule evaluates without error on the real series.
    let groups = api(&prom, "/api/v1/rules").unwrap()["groups"].clone();
    let rules = groups[0]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 8);
    for r in rules {
        assert_eq!(r["health"], "ok", "{r:#}");
        if !["DssmCertificateExpiringSoon", "DssmTmmRestartPending"]
            .contains(&r["name"].as_str().unwrap())
        {
            assert_eq!(r["state"], "inactive", "{r:#}");
        }
    }
    let up = api(
        &prom,
        "/api/v1/query?query=up%7Bjob%3D%22dssm-certs-agent%22%7D",
    )
    .unwrap();
    assert_eq!(up["result"][0]["value"][1], "1", "{up:#}");
}

/// Every PromQL expression of the dashboard parses and names only metrics the agent exports.
#[test]
fn the_dashboard_queries_parse_and_name_only_metrics_the_agent_exports() {
    let path = repo().join("charts/dssm-certs/dashboards/dssm-certs.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let titles: Vec<String> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap().to_lowercase())
        .collect();
    for topic in ["time left", "in sync", "rotation", "agent"] {
        assert!(
            titles.iter().any(|t| t.contains(topic)),
            "no panel for {topic}: {titles:?}"
        );
    }
    let exposition = live_exposition();
    let mut exprs = 0;
    for p in panels {
        let title = p["title"].as_str().unwrap();
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            // Grafana's variables are plain regexes here ($namespace: ".*" for All).
            let expr = t["expr"].as_str().unwrap().replace("$namespace", ".*");
            let unknown =
                unknown_metrics(&expr, &exposition).unwrap_or_else(|e| panic!("{title}: {e}"));
            assert!(
                unknown.is_empty(),
                "{title} uses {unknown:?}, which the agent does not export:\n{exposition}"
            );
            exprs += 1;
        }
    }
    assert!(exprs >= 9, "{exprs}");
}
