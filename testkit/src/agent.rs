//! The agent (`dssm-certs run`) as the manifests run it, and the metric names it exports: shared
//! by the manifest, chart, dashboard and Prometheus tests.

use std::path::Path;
use std::time::Duration;

use super::TestEnv;

pub struct RunningAgent {
    child: std::process::Child,
    pub addr: String,
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dssm-certs run` against the test cluster as `kubeconfig`'s account, on a free loopback port:
/// (the process, its address).
pub fn spawn(env: &TestEnv, kubeconfig: &Path, extra: &[&str]) -> (std::process::Child, String) {
    spawn_as(super::bin_without_redis(), env, kubeconfig, extra)
}

/// `spawn`, with `cmd` being the binary or a wrapper that execs it (e.g. `prlimit`).
pub fn spawn_as(
    mut cmd: std::process::Command,
    env: &TestEnv,
    kubeconfig: &Path,
    extra: &[&str],
) -> (std::process::Child, String) {
    let addr = format!("127.0.0.1:{}", super::redis::free_port());
    let child = cmd
        .env("KUBECONFIG", kubeconfig)
        .args(["run", "--listen", &addr])
        .args(["--dssm-namespace", &env.dssm_ns])
        .args(env.tmm_args())
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (child, addr)
}

/// Starts `run` (every second unless `extra` says otherwise) and waits until it has listed and
/// watched each copy's certificate Secret (it never reads the key Secret).
pub fn start_watching(env: &TestEnv, kubeconfig: &Path, extra: &[&str]) -> RunningAgent {
    let mut args = extra.to_vec();
    if !args.contains(&"--interval") {
        args.extend(["--interval", "1s"]);
    }
    // Only this agent's watches count, not those of an agent started before it.
    let earlier = env.server.requests().len();
    let (child, addr) = spawn(env, kubeconfig, &args);
    let agent = RunningAgent { child, addr };
    super::redis::wait_for("the agent's watches", Duration::from_secs(15), || {
        let reqs = env.server.requests();
        let watched = |ns: &str, name: &str| {
            reqs.iter().skip(earlier).any(|r| {
                r.path == format!("/api/v1/namespaces/{ns}/secrets")
                    && r.query.contains("watch=true")
                    && r.query.contains(name)
            })
        };
        env.copy_namespaces()
            .iter()
            .all(|ns| watched(ns, "dssm-certs-secret"))
            .then_some(())
    });
    agent
}

/// A plain HTTP/1.0 GET on loopback: the body of a 200, else None.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.contains(" 200 ").then(|| {
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    })
}

/// The live /metrics of an agent that sees certificates (SPK test cluster, materials
/// published), run as its own read-only ServiceAccount.
pub fn live_exposition() -> String {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    let agent = start_watching(&env, &env.agent_kubeconfig, &[]);
    super::redis::wait_for(
        "/metrics with certificates",
        Duration::from_secs(10),
        || {
            http_get(&agent.addr, "/metrics")
                .filter(|m| m.contains("dssm_certificate_not_after_timestamp_seconds{"))
        },
    )
}

/// Every metric name a PromQL expression selects.
pub fn metric_names(e: &promql_parser::parser::Expr, out: &mut Vec<String>) {
    use promql_parser::parser::Expr;
    match e {
        Expr::VectorSelector(v) => out.extend(v.name.clone()),
        Expr::MatrixSelector(m) => out.extend(m.vs.name.clone()),
        Expr::Binary(b) => {
            metric_names(&b.lhs, out);
            metric_names(&b.rhs, out);
        }
        Expr::Aggregate(a) => metric_names(&a.expr, out),
        Expr::Unary(u) => metric_names(&u.expr, out),
        Expr::Paren(p) => metric_names(&p.expr, out),
        Expr::Subquery(s) => metric_names(&s.expr, out),
        Expr::Call(c) => c.args.args.iter().for_each(|a| metric_names(a, out)),
        _ => {}
    }
}

/// An alert expression that cannot be judged against the agent's metrics.
#[derive(Debug)]
pub enum BadAlertExpr {
    /// Not PromQL: the parser's message.
    Unparsable { expr: String, error: String },
    /// An expression over no metric cannot watch the agent.
    NoMetric(String),
}

impl std::fmt::Display for BadAlertExpr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadAlertExpr::Unparsable { expr, error } => write!(f, "{expr}: {error}"),
            BadAlertExpr::NoMetric(expr) => write!(f, "{expr} uses no metric"),
        }
    }
}

/// Parses `expr` and returns the metric names it uses that the agent does not export (`up` is
/// written by Prometheus for every target; counters are exposed as `<name>_total` and appear
/// only after their first increment, so their `# TYPE` line is what the agent declares;
/// histograms as `_bucket`, `_sum`, `_count`).
pub fn unknown_metrics(expr: &str, exposition: &str) -> Result<Vec<String>, BadAlertExpr> {
    let parsed = promql_parser::parser::parse(expr).map_err(|error| BadAlertExpr::Unparsable {
        expr: expr.to_string(),
        error,
    })?;
    let mut names = Vec::new();
    metric_names(&parsed, &mut names);
    if names.is_empty() {
        return Err(BadAlertExpr::NoMetric(expr.to_string()));
    }
    let exported: Vec<&str> = exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    Ok(names
        .into_iter()
        .filter(|n| n != "up")
        .filter(|n| {
            let declared = ["_total", "_bucket", "_sum", "_count"].iter().any(|s| {
                n.ends_with(s) && exposition.contains(&format!("# TYPE {} ", n.trim_end_matches(s)))
            });
            !(exported.contains(&n.as_str()) || declared)
        })
        .collect())
}

/// An agent that renews at once: its maintenance window is always open (every minute, for an
/// hour) and --renew-before makes the 365-day leaf due now, and not its 730-day successor (else
/// every renewal would trigger the next one).
pub const RENEW_IN_THE_WINDOW: &[&str] = &[
    "--interval",
    "1h",
    "--maintenance-window",
    "* * * * * 1h",
    "--renew-before",
    "400d",
    "--days",
    "730",
    "--key-algorithm",
    "ecdsa-p256",
];
