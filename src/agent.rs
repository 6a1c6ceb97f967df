//! `run`: the long-running agent. Watches the managed Secrets in both namespaces, inspects on
//! every change and at least every `--interval`, serves `/metrics`, `/healthz` and `/readyz`,
//! emits Events when a state changes (and at most once a day while it persists), and reconciles
//! only inside the maintenance window, if one is given.

use crate::restart::Restarter;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};

use crate::cluster::events::{EventType, Reason};
use crate::cluster::Cluster;
use crate::contract;
use crate::inspect::{self, CheckResult, Report, Status, Thresholds};
use crate::materials::{CopyObs, Place, SecretObs};
use crate::metrics::Metrics;
use crate::reconcile;

/// Events for a state that persists are repeated at most this often.
pub const EVENT_REPEAT: Duration = Duration::from_secs(24 * 3600);

/// HTTP limits, so that no client can starve the liveness probe. Open connections beyond this
/// close the oldest one (a scrape or probe takes milliseconds; an old one is idle or hostile).
pub const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this (also the keep-alive idle time).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer, whatever it does (a client that never reads its response).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Request line and headers together; our endpoints take no body.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("--maintenance-window {0:?}: {1}")]
    Window(String, String),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("{LISTEN_IP_ENV}={0:?} is not an IP address (the manifests set it to the pod IP, status.podIP)")]
    ListenIp(String),
}

/// When set (the manifests set it to the pod IP from the downward API), the agent serves on this
/// IP, with `--listen`'s port: what kubelet probes and Prometheus scrapes, and nothing else of
/// the pod (not its loopback). IPv4 or IPv6, bare (no brackets).
pub const LISTEN_IP_ENV: &str = "DSSM_CERTS_LISTEN_IP";

/// The address to serve on: `listen`, or `ip` (the value of `LISTEN_IP_ENV`) with its port.
pub fn listen_addr(listen: SocketAddr, ip: Option<&str>) -> Result<SocketAddr, AgentError> {
    match ip.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(listen),
        Some(ip) => ip
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .map(|ip| SocketAddr::new(ip, listen.port()))
            .map_err(|_| AgentError::ListenIp(ip.to_string())),
    }
}

/// `"0 3 * * SUN" 2h`: a cron expression (UTC) and how long the window stays open.
#[derive(Debug, Clone)]
pub struct MaintenanceWindow {
    text: String,
    cron: croner::Cron,
    duration: Duration,
}

impl MaintenanceWindow {
    pub fn parse(text: &str) -> Result<Self, AgentError> {
        let bad = |why: &str| AgentError::Window(text.to_string(), why.to_string());
        let (expr, dur) = text
            .trim()
            .rsplit_once(char::is_whitespace)
            .ok_or_else(|| {
                bad("expected a cron expression and a duration, e.g. \"0 3 * * SUN 2h\"")
            })?;
        let duration = humantime::parse_duration(dur.trim())
            .map_err(|e| bad(&format!("duration {dur:?}: {e}")))?;
        let cron = croner::Cron::new(expr.trim().trim_matches('"'))
            .with_dom_and_dow()
            .parse()
            .map_err(|e| bad(&e.to_string()))?;
        Ok(MaintenanceWindow {
            text: text.to_string(),
            cron,
            duration,
        })
    }

    /// Open at `now`: some occurrence falls in (now - duration, now].
    pub fn is_open(&self, now: chrono::DateTime<chrono::Utc>) -> bool {
        let from = now - chrono::Duration::from_std(self.duration).unwrap_or_default();
        matches!(self.cron.find_next_occurrence(&from, true), Ok(t) if t <= now)
    }
}

pub struct Options {
    pub listen: SocketAddr,
    pub interval: Duration,
    pub window: Option<MaintenanceWindow>,
    pub reconcile: reconcile::Options,
    pub thresholds: Thresholds,
}

struct Shared {
    metrics: Metrics,
    ready: AtomicBool,
    /// (reason, namespace) -> (the state it was emitted for, when).
    emitted: Mutex<HashMap<(Reason, String), (String, Instant)>>,
}

async fn serve(
    shared: Arc<Shared>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    use hyper::body::Body;
    let text = |code: u16, body: &str| {
        Ok(Response::builder()
            .status(code)
            .header("content-type", "text/plain")
            .header("connection", "close")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("valid response"))
    };
    if !matches!(*req.method(), hyper::Method::GET | hyper::Method::HEAD) {
        return text(405, "only GET and HEAD\n");
    }
    // A body is never read: refuse it rather than let it occupy the connection.
    if req.body().size_hint().upper() != Some(0) {
        return text(413, "requests take no body\n");
    }
    let (code, ctype, body) = match req.uri().path() {
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.encode(),
        ),
        "/healthz" => (200, "text/plain", "ok\n".to_string()),
        "/readyz" if shared.ready.load(Ordering::SeqCst) => {
            (200, "text/plain", "ready\n".to_string())
        }
        "/readyz" => (
            503,
            "text/plain",
            "not ready: no successful inspection yet, or the API server is unreachable\n"
                .to_string(),
        ),
        _ => (404, "text/plain", "not found\n".to_string()),
    };
    Ok(Response::builder()
        .status(code)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("valid response"))
}

/// Runs until `shutdown` resolves.
pub async fn run(
    cluster: Arc<Cluster>,
    opts: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let shared = Arc::new(Shared {
        metrics: Metrics::new(),
        ready: AtomicBool::new(false),
        emitted: Mutex::new(HashMap::new()),
    });
    shared
        .metrics
        .start_time
        .set(time::OffsetDateTime::now_utc().unix_timestamp());
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| AgentError::Listen(opts.listen, e))?;
    tracing::info!(listen = %opts.listen, "serving /metrics, /healthz, /readyz");
    let http = tokio::spawn(accept_loop(listener, shared.clone()));

    // A watch per certificate Secret; any event triggers an inspection. Not the key Secret,
    // which the agent never reads (every write of it comes with a write of the certificate
    // Secret, which carries the key's SPKI), nor the CA key Secret: the agent's own account may
    // not read it, and every write of it is followed by writes of the copies.
    let mut watches = cluster.watch_secrets(&cluster.namespaces(), &[contract::CERTS_SECRET]);
    let rx = &mut watches.changes;

    tokio::pin!(shutdown);
    loop {
        // SIGTERM also ends an inspection in flight: a reconcile inside the maintenance window
        // may be restarting TMM for minutes. The caller then restores TMM (it holds the Lease).
        tokio::select! {
            _ = &mut shutdown => break,
            () = inspect(&cluster, &opts, &shared) => {}
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(opts.interval) => {}
            ev = rx.recv() => {
                let mut failed = ev == Some(false);
                // Coalesce a burst (a reconcile writes several Secrets), for at most half a second.
                let until = tokio::time::Instant::now() + Duration::from_millis(500);
                while let Ok(Some(ok)) = tokio::time::timeout_at(until.min(tokio::time::Instant::now() + Duration::from_millis(50)), rx.recv()).await {
                    failed |= !ok;
                }
                if failed {
                    // A watch failed: the API server may be gone. The inspection that follows
                    // says whether it is.
                    shared.ready.store(false, Ordering::SeqCst);
                }
            }
        }
    }
    drop(watches);
    http.abort();
    Ok(())
}

/// Open connections, oldest first, each with the signal that closes it.
type OpenConnections = Arc<Mutex<VecDeque<(u64, Arc<tokio::sync::Notify>)>>>;

/// Serves each connection under the limits above; at `MAX_CONNECTIONS` the oldest is closed.
async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let open: OpenConnections = Arc::default();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(32);
    let builder = Arc::new(builder);
    for id in 0u64.. {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors, typically: pause instead of spinning.
                tracing::warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let close = Arc::new(tokio::sync::Notify::new());
        {
            let mut open = open.lock().expect("not poisoned");
            if open.len() >= MAX_CONNECTIONS {
                if let Some((_, oldest)) = open.pop_front() {
                    oldest.notify_one();
                }
            }
            open.push_back((id, close.clone()));
        }
        let (shared, open, builder) = (shared.clone(), open.clone(), builder.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| serve(shared.clone(), req));
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_LIFETIME, conn) => {}
                _ = close.notified() => {}
            }
            open.lock()
                .expect("not poisoned")
                .retain(|(other, _)| *other != id);
        });
    }
}

async fn inspect(cluster: &Cluster, opts: &Options, shared: &Shared) {
    let started = Instant::now();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let obs = match cluster.observe_for_agent().await {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, "inspection failed");
            shared.ready.store(false, Ordering::SeqCst);
            return;
        }
    };
    // The agent never reads the key Secret: each copy's key is judged by its recorded SPKI.
    let keys = inspect::KeyMatch::Judged(obs.copies.iter().map(key_match).collect());
    let report =
        inspect::inspect_observation(&obs, &cluster.dssm_ns, now, opts.thresholds, keys).await;
    shared.metrics.record(&report);
    shared.metrics.record_targets(&obs.workloads);
    shared.ready.store(true, Ordering::SeqCst);
    events(cluster, &obs, &report, shared).await;

    // On the timer too: a restart record whose holder is gone is an orphan; TMM goes back to
    // its count. (A live holder's record is left to it; the read-only account cannot act and
    // says so at debug level.)
    if obs.restart_recorded() {
        match Restarter::new(cluster)
            .recover_orphan(crate::cluster::lease::HolderCheck::BelieveAtOnce)
            .await
        {
            Ok(Some(n)) => tracing::warn!(replicas = n, "restored TMM from an orphaned restart"),
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, "a restart record is present; not ours to finish")
            }
        }
    }

    if let Some(w) = &opts.window {
        if w.is_open(chrono::Utc::now()) {
            let mut out = Vec::new();
            let r = reconcile::reconcile(cluster, &opts.reconcile, &mut out).await;
            let text = String::from_utf8_lossy(&out);
            match r {
                Ok(o) if o.plan.action.writes() || o.restart_pending => {
                    shared
                        .metrics
                        .rotations
                        .get_or_create(&crate::metrics::ResultLabels {
                            result: "success".into(),
                        })
                        .inc();
                    shared
                        .metrics
                        .last_rotation
                        .set(time::OffsetDateTime::now_utc().unix_timestamp());
                    tracing::info!(window = %w.text, output = %text, "reconciled inside the maintenance window");
                }
                Ok(_) => {}
                Err(e) => {
                    shared
                        .metrics
                        .rotations
                        .get_or_create(&crate::metrics::ResultLabels {
                            result: "failure".into(),
                        })
                        .inc();
                    tracing::warn!(error = %e, output = %text, "reconcile inside the maintenance window failed");
                    cluster.rotation_failed(&e.to_string()).await;
                }
            }
        }
    }
    shared
        .metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
}

/// Whether a copy's key matches its certificate, as far as the certificate Secret tells: the
/// SHA-256 of the key's SPKI that the writer recorded, against the certificate's public key.
/// None when there is no certificate to compare (the report already says why).
pub fn key_match(copy: &CopyObs) -> Option<CheckResult> {
    use crate::materials::{annotations::KEY_SPKI_SHA256, spki_sha256};
    let SecretObs::Present { annotations, .. } = &copy.certs else {
        return None;
    };
    let ns = &copy.namespace;
    let cert_at = Place::secret(ns, contract::LEAF_CERT);
    let leaf = crate::pki::parse_certificate(copy.certs.get(contract::LEAF_CERT)?, "").ok()?;
    let has = spki_sha256(leaf.spki_der());
    let key_at = Place::secret(ns, contract::LEAF_KEY);
    let (status, message) = match annotations.get(KEY_SPKI_SHA256) {
        Some(recorded) if recorded.eq_ignore_ascii_case(&has) => (
            Status::Ok,
            format!("{key_at} matches {cert_at} (by the key's SPKI SHA-256 recorded in {ns}/{}'s annotation {KEY_SPKI_SHA256}; the agent never reads the key)", contract::CERTS_SECRET),
        ),
        Some(recorded) => (
            Status::Critical,
            format!(
                "{key_at} does not match {cert_at}: {ns}/{}'s annotation {KEY_SPKI_SHA256} records the key's SPKI SHA-256 {}, the certificate's public key is {has}. Run `dssm-certs check` (it reads the key) and `dssm-certs reconcile` to repair",
                contract::CERTS_SECRET,
                shown_digest(recorded),
            ),
        ),
        None => (
            Status::Warning,
            format!(
                "cannot tell whether {key_at} matches {cert_at}: {ns}/{} has no annotation {KEY_SPKI_SHA256} (the agent never reads the key). The next renewal by dssm-certs adds it; `dssm-certs check` reads the key and tells now",
                contract::CERTS_SECRET
            ),
        ),
    };
    Some(CheckResult {
        name: "leaf-key",
        status,
        message,
        object: Some(key_at),
    })
}

/// An annotation's value as a message shows it: a SHA-256 in hex, or not echoed at all (anyone
/// who may update the Secret writes it).
fn shown_digest(v: &str) -> String {
    if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) {
        v.to_ascii_uppercase()
    } else {
        format!("(not a SHA-256 in hex, {} bytes)", v.len())
    }
}

/// An Event the report calls for: its reason, namespace, the state it describes (a repeat of
/// the same state is not due before `EVENT_REPEAT`), and its note.
struct Wanted {
    reason: Reason,
    ns: String,
    state: String,
    note: String,
}

/// The Events a report calls for: certificates expiring soon, invalid materials, copies out of
/// sync.
fn wanted_events(report: &Report, dssm_ns: &str) -> Vec<Wanted> {
    let want = |reason: Reason, ns: &str, state: String, note: String| Wanted {
        reason,
        ns: ns.into(),
        state,
        note,
    };
    let mut wanted = Vec::new();
    for copy in &report.copies {
        let ns = copy
            .source
            .strip_prefix("namespace/")
            .unwrap_or(&copy.source)
            .to_string();
        for c in &copy.certificates {
            if c.residual_seconds < report.warn_seconds {
                let level = if c.status == Status::Critical {
                    "critical"
                } else {
                    "warning"
                };
                wanted.push(want(
                    Reason::CertificateExpiringSoon,
                    &ns,
                    format!("{}:{level}:{}", c.file, c.not_after),
                    format!("{ns}: {} expires at {} ({level})", c.file, c.not_after),
                ));
            }
        }
        let broken: Vec<&str> = copy
            .checks
            .iter()
            .filter(|c| {
                matches!(c.status, Status::Critical | Status::Unknown)
                    && c.name != "validity-nesting"
            })
            .map(|c| c.message.as_str())
            .collect();
        if !broken.is_empty() {
            wanted.push(want(
                Reason::InvalidMaterials,
                &ns,
                broken.join("; "),
                broken.join("; "),
            ));
        }
    }
    if report.in_sync == Some(false) {
        let msg = report
            .checks
            .iter()
            .map(|c| c.message.clone())
            .collect::<Vec<_>>()
            .join("; ");
        wanted.push(want(Reason::CopiesOutOfSync, dssm_ns, msg.clone(), msg));
    }
    wanted
}

/// Events when a state starts, changes, or has lasted another day — not at every interval.
async fn events(
    cluster: &Cluster,
    obs: &crate::cluster::Observation,
    report: &Report,
    shared: &Shared,
) {
    for w in wanted_events(report, &cluster.dssm_ns) {
        let Wanted {
            reason,
            ns,
            state,
            note,
        } = w;
        let due = {
            let mut emitted = shared.emitted.lock().expect("not poisoned");
            let key = (reason.clone(), ns.clone());
            let due = match emitted.get(&key) {
                Some((s, at)) => *s != state || at.elapsed() >= EVENT_REPEAT,
                None => true,
            };
            if due {
                emitted.insert(key, (state, Instant::now()));
            }
            due
        };
        if due {
            if let Some(s) = obs
                .raw
                .get(&(ns.clone(), contract::CERTS_SECRET.to_string()))
            {
                cluster.event(s, EventType::Warning, reason, note).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// A copy whose certificate Secret holds a self-signed leaf and `annotation` (if any).
    fn copy_with(annotation: Option<&str>) -> (CopyObs, Vec<u8>) {
        let c = rcgen::generate_simple_self_signed(vec!["dssm".into()]).unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&c.signing_key);
        let annotations = annotation
            .map(|a| {
                let key = crate::materials::annotations::KEY_SPKI_SHA256.to_string();
                (key, a.to_string())
            })
            .into_iter()
            .collect();
        let certs = SecretObs::Present {
            data: [(contract::LEAF_CERT.to_string(), c.cert.pem().into_bytes())].into(),
            owner: crate::materials::Owner::Us,
            annotations,
        };
        let copy = CopyObs {
            namespace: "spk-ingress".into(),
            certs,
            keys: SecretObs::Missing,
        };
        (copy, spki)
    }

    #[test]
    fn the_agent_judges_the_key_match_by_the_recorded_spki_without_the_key() {
        // The recorded SPKI of the certificate's own key: ok.
        let (mut copy, spki) = copy_with(None);
        let good = crate::materials::spki_sha256(&spki);
        if let SecretObs::Present { annotations, .. } = &mut copy.certs {
            annotations.insert(
                crate::materials::annotations::KEY_SPKI_SHA256.into(),
                good.to_ascii_lowercase(),
            );
        }
        let r = key_match(&copy).unwrap();
        assert_eq!(
            (r.name, r.status),
            ("leaf-key", Status::Ok),
            "{}",
            r.message
        );

        // Another key's: critical, both digests named.
        let other = crate::materials::spki_sha256(b"another key");
        let (copy, spki) = copy_with(Some(&other));
        let r = key_match(&copy).unwrap();
        assert_eq!(r.status, Status::Critical, "{}", r.message);
        assert!(r.message.contains(&other), "{}", r.message);
        assert!(
            r.message.contains(&crate::materials::spki_sha256(&spki)),
            "{}",
            r.message
        );
        assert!(
            r.message.contains("spk-ingress/dssm-certs-secret"),
            "{}",
            r.message
        );

        // Junk is not echoed (anyone who may update the Secret writes it).
        let (copy, _) = copy_with(Some("\u{1b}[2Jjunk"));
        let r = key_match(&copy).unwrap();
        assert_eq!(r.status, Status::Critical);
        assert!(!r.message.contains("junk"), "{}", r.message);

        // No annotation (a copy written before it existed, or by hand): a warning, not a crash.
        let (copy, _) = copy_with(None);
        let r = key_match(&copy).unwrap();
        assert_eq!(r.status, Status::Warning, "{}", r.message);
        assert!(r.message.contains("key-spki-sha256"), "{}", r.message);

        // No certificate Secret: nothing to compare (the report says it is missing).
        let missing = CopyObs {
            namespace: "spk-ingress".into(),
            certs: SecretObs::Missing,
            keys: SecretObs::Missing,
        };
        assert!(key_match(&missing).is_none());
    }

    #[test]
    fn the_pod_ip_replaces_the_listen_address_and_keeps_its_port() {
        let listen: SocketAddr = "0.0.0.0:9090".parse().unwrap();
        assert_eq!(listen_addr(listen, None).unwrap(), listen);
        assert_eq!(listen_addr(listen, Some("")).unwrap(), listen);
        assert_eq!(
            listen_addr(listen, Some("10.42.0.7")).unwrap().to_string(),
            "10.42.0.7:9090"
        );
        assert_eq!(
            listen_addr(listen, Some("fd00:10:244::7"))
                .unwrap()
                .to_string(),
            "[fd00:10:244::7]:9090"
        );
        let e = listen_addr(listen, Some("10.42.0.7:9090")).unwrap_err();
        assert!(e.to_string().contains(LISTEN_IP_ENV), "{e}");
    }

    #[test]
    fn a_window_is_open_from_each_occurrence_for_its_duration() {
        let w = MaintenanceWindow::parse("0 3 * * SUN 2h").unwrap();
        let at = |d, h, m| chrono::Utc.with_ymd_and_hms(2026, 11, d, h, m, 0).unwrap();
        // 2026-11-22 is a Sunday.
        assert!(w.is_open(at(22, 3, 0)));
        assert!(w.is_open(at(22, 4, 59)));
        assert!(!w.is_open(at(22, 5, 1)));
        assert!(!w.is_open(at(22, 2, 59)));
        assert!(!w.is_open(at(23, 3, 30)), "Monday");
        for bad in ["0 3 * * SUN", "0 3 * * SUN forever", "nonsense 2h", ""] {
            assert!(MaintenanceWindow::parse(bad).is_err(), "{bad}");
        }
    }
}
