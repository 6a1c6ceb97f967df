use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use clap::Parser;
use dssm_certs::cli::{Cli, Command, LogFormat, OutputFormat};
use dssm_certs::cluster::{Cluster, ClusterError};
use dssm_certs::plan::Policy;
use dssm_certs::reconcile::{self, ReconcileError};
use dssm_certs::{check, contract, exit, generate, pki, probe, values};

/// The log format, once known: every line on stderr follows it, the fatal one included.
static LOG_FORMAT: OnceLock<LogFormat> = OnceLock::new();

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            if json_requested() {
                LOG_FORMAT.get_or_init(|| LogFormat::Json);
                init_tracing(LogFormat::Json);
                fatal(&e.render().to_string());
            } else {
                let _ = e.print();
            }
            return code(exit::USAGE);
        }
        Err(e) => {
            let _ = e.print(); // --help, --version
            return code(exit::OK);
        }
    };
    LOG_FORMAT.get_or_init(|| cli.log_format);
    init_tracing(cli.log_format);
    code(match run(cli) {
        Ok(c) => c,
        Err(e) => {
            fatal(&e.to_string());
            exit::FAILED
        }
    })
}

/// Sets `flag` on SIGTERM or SIGINT, from a thread of its own (generate is synchronous).
fn stop_on_signal(flag: Arc<AtomicBool>) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            let _ = ready_tx.send(());
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            flag.store(true, Ordering::SeqCst);
        });
    });
    // The handlers are installed before any temporary file can exist.
    let _ = ready_rx.recv_timeout(std::time::Duration::from_secs(2));
}

/// `--log-format json` (or its variable) asked for, even on a command line clap refused.
fn json_requested() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .any(|w| w[0] == "--log-format" && w[1] == "json")
        || args.iter().any(|a| a == "--log-format=json")
        || std::env::var("DSSM_CERTS_LOG_FORMAT").is_ok_and(|v| v == "json")
}

/// The last line before a non-zero exit: `error: ...`, or an ERROR record in JSON.
fn fatal(message: &str) {
    match LOG_FORMAT.get() {
        Some(LogFormat::Json) => tracing::error!("{}", message.trim_end()),
        _ => eprintln!("error: {}", message.trim_end()),
    }
}

/// A line for the operator that is not an error (a signal, TMM restored).
fn notice(message: &str) {
    match LOG_FORMAT.get() {
        Some(LogFormat::Json) => tracing::warn!("{message}"),
        _ => eprintln!("{message}"),
    }
}

fn code(c: i32) -> ExitCode {
    ExitCode::from(u8::try_from(c).unwrap_or(1))
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DSSM_CERTS_LOG")
        // kube-client logs every failed HTTP status at ERROR; `call` reports them with the object.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("warn,kube_client::client::builder=off")
        });
    // Colour only for a person at a terminal, and never when NO_COLOR is set (no-color.org).
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(cli: Cli) -> Result<i32, Box<dyn std::error::Error>> {
    match cli.command {
        Command::Generate(a) => {
            generate::refuse_overwrite(&a.out, a.force)?;
            generate::check_writable(&a.out)?;
            let dns_names = if a.material.dns.is_empty() {
                contract::default_dns_names(a.dssm_namespace.as_deref().or(a.namespace.as_deref()))
            } else {
                a.material.dns.clone()
            };
            let opts = generate::GenerateOptions {
                days: a.material.days,
                ca_days: a.material.ca_days,
                key_algorithm: a.material.key_algorithm,
                ca_subject: a.material.ca_subject,
                subject: a.material.subject,
                dns_names,
                existing_ca: match a.ca_cert.zip(a.ca_key) {
                    Some((cert, key)) => Some(generate::ExistingCa::from_files(&cert, &key)?),
                    None => None,
                },
                dhparam: a.dhparam,
                namespace: a.namespace.clone(),
                threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            };
            let started = std::time::Instant::now();
            // SIGTERM/SIGINT stop the DH search and any write not yet begun; no temporary file
            // is left behind (the default action would kill us mid-write).
            let cancel = Arc::new(AtomicBool::new(false));
            stop_on_signal(cancel.clone());
            let interrupted = || {
                cancel
                    .load(Ordering::SeqCst)
                    .then(|| generate::GenerateError::Interrupted { dir: a.out.clone() })
            };
            let materials =
                match generate::make_materials(&opts, time::OffsetDateTime::now_utc(), &cancel) {
                    Err(e) => return Err(interrupted().map_or(e, Into::into).into()),
                    Ok(m) => m,
                };
            if let Some(e) = interrupted() {
                return Err(e.into());
            }
            let files = generate::output_files(&materials, a.namespace.as_deref());
            generate::write_files(&a.out, &files, a.force, &cancel)?;
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "generated"
            );
            for f in &files {
                println!("{}", a.out.join(f.name).display());
            }
            if let Some(note) = &materials.leaf_note {
                notice(&format!("note: {note}"));
            }
            Ok(exit::OK)
        }
        Command::Check(a) => {
            let thresholds = check::Thresholds {
                warn: a.warn,
                critical: a.critical,
            };
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let report = match &a.dir {
                Some(dir) => {
                    let copy = if dir.is_dir() {
                        check::inspect(&check::read_dir_source(dir), now, thresholds)
                    } else {
                        check::CopyReport {
                            source: format!("dir:{}", dir.display()),
                            status: check::Status::Unknown,
                            certificates: vec![],
                            checks: vec![check::CheckResult {
                                name: "read",
                                status: check::Status::Unknown,
                                message: format!("{}: not a directory", dir.display()),
                            }],
                            dhparams: None,
                        }
                    };
                    check::Report::new(vec![copy], now, thresholds)
                }
                None => match runtime()?.block_on(cluster_check(&a.cluster, now, thresholds)) {
                    Ok(r) => r,
                    Err(e) => {
                        // Monitoring reads stdout: JSON stays JSON, with the error in it.
                        if a.output == OutputFormat::Json {
                            println!(
                                "{}",
                                serde_json::to_string_pretty(&serde_json::json!({
                                    "schema": check::SCHEMA,
                                    "status": check::Status::Unknown,
                                    "exit_code": exit::UNKNOWN,
                                    "error": e.to_string(),
                                }))?
                            );
                        }
                        fatal(&e.to_string());
                        return Ok(exit::UNKNOWN);
                    }
                },
            };
            match a.output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                OutputFormat::Table => print!("{}", check::render_table(&report)),
            }
            Ok(report.exit_code)
        }
        Command::Probe(a) => probe(a),
        Command::Restart(a) => restart(&a),
        Command::Run(a) => agent(&a),
        Command::Reconcile(a) => cluster_run(
            &a.cluster,
            &a.issue,
            a.dry_run,
            (!a.no_restart).then(|| a.restart.options()),
            Policy {
                renew_before: a.issue.renew_before,
                ca_renew_before: a.issue.ca_renew_before,
                leaf_days: a.issue.material.days,
                force_leaf: false,
                force_ca: false,
            },
        ),
        Command::Rotate(a) => cluster_run(
            &a.cluster,
            &a.issue,
            a.dry_run,
            (!a.no_restart).then(|| a.restart.options()),
            Policy {
                renew_before: a.issue.renew_before,
                ca_renew_before: a.issue.ca_renew_before,
                leaf_days: a.issue.material.days,
                force_leaf: true,
                force_ca: a.ca,
            },
        ),
        Command::Values(a) => {
            let ns = match a.dssm_namespace {
                Some(ns) => ns,
                None => own_namespace().ok_or(
                    "--dssm-namespace is required outside a pod (no service account namespace file)",
                )?,
            };
            let targets = dssm_certs::targets::resolve(
                &a.tmm.tmm,
                a.tmm.tmm_namespace.as_deref(),
                &a.tmm.tmm_deployment,
                &ns,
            );
            print!("{}", values::tmm_values_for(&ns, &targets));
            Ok(exit::OK)
        }
    }
}

/// The namespace of the pod we run in, as the service account mount tells it.
fn own_namespace() -> Option<String> {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn probe(a: dssm_certs::cli::ProbeArgs) -> Result<i32, Box<dyn std::error::Error>> {
    let read = |name: &str| {
        let path = a.dir.join(name);
        std::fs::read(&path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
    };
    let materials = match (|| -> Result<_, Box<dyn std::error::Error>> {
        let key_path = a.dir.join(contract::LEAF_KEY);
        Ok(probe::ClientMaterials {
            ca_cert: read(contract::CA_CERT)?,
            leaf_cert: read(contract::LEAF_CERT)?,
            leaf_key: pki::PrivateKey::from_pem(
                &read(contract::LEAF_KEY)?,
                &key_path.display().to_string(),
            )?,
        })
    })() {
        Ok(m) => m,
        Err(e) => {
            fatal(&e.to_string());
            return Ok(exit::UNKNOWN);
        }
    };
    let sentinel = match (a.endpoint, a.dssm_namespace.or_else(own_namespace)) {
        (Some(e), _) => e,
        (None, Some(ns)) => probe::sentinel_endpoint(&ns),
        (None, None) => {
            return Err("--endpoint or --dssm-namespace is required outside a pod".into())
        }
    };
    let prober = match probe::Prober::new(&materials, true) {
        Ok(p) => p,
        Err(e) => {
            fatal(&e.to_string());
            return Ok(exit::UNKNOWN);
        }
    };
    let timeout = std::time::Duration::from_secs(a.timeout.max(1) as u64);
    let deadline = std::time::Duration::from_secs(a.deadline.max(1) as u64);
    let endpoints: Vec<String> = std::iter::once(sentinel).chain(a.db_endpoints).collect();
    let reports = probe::ping_all(
        prober,
        &endpoints,
        a.server_name.as_deref(),
        timeout,
        deadline,
    );
    let worst = reports
        .iter()
        .map(|r| r.status)
        .max()
        .unwrap_or(check::Status::Unknown);
    match a.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "schema": "dssm-certs.probe/v1",
                "status": worst,
                "exit_code": worst.exit_code(),
                "endpoints": reports,
            }))?
        ),
        OutputFormat::Table => {
            for r in &reports {
                println!(
                    "{}  {}  {}",
                    r.endpoint,
                    r.status,
                    check::printable(&r.message)
                );
                if let Some(s) = &r.served {
                    println!(
                        "  served: subject \"{}\", serial {}, notAfter {}, X.509 v{}, {} the deployed leaf",
                        check::printable(&s.subject),
                        s.serial,
                        s.not_after,
                        s.version,
                        if s.matches_deployed_leaf { "matches" } else { "differs from" }
                    );
                }
                if let (Some(v), Some(p)) = (&r.tls_version, &r.verify_path) {
                    let how = match p {
                        probe::VerifyPath::Webpki => format!("rustls WebPKI (chain, validity, EKU, name {:?})", r.server_name),
                        probe::VerifyPath::LegacyNoNameCheck => "v1/SAN-less certificate: chain and validity via x509-parser, no name check".to_string(),
                    };
                    println!("  {v}, verified by {how}");
                }
            }
        }
    }
    Ok(worst.exit_code())
}

fn runtime() -> Result<tokio::runtime::Runtime, std::io::Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

async fn cluster_check(
    args: &dssm_certs::cli::ClusterArgs,
    now: i64,
    thresholds: check::Thresholds,
) -> Result<check::Report, ClusterError> {
    let cluster = Cluster::connect(&args.target()).await?;
    let obs = cluster.observe().await?;
    Ok(check::inspect_observation(&obs, &cluster.dssm_ns, now, thresholds).await)
}

fn cluster_run(
    args: &dssm_certs::cli::ClusterArgs,
    issue: &dssm_certs::cli::IssueArgs,
    dry_run: bool,
    restart: Option<dssm_certs::restart::Options>,
    policy: Policy,
) -> Result<i32, Box<dyn std::error::Error>> {
    let rt = runtime()?;
    let result = rt.block_on(async {
        let cluster = Cluster::connect(&args.target()).await?;
        let cluster = &cluster;
        let opts = reconcile_options(cluster, issue, dry_run, restart, policy);
        let mut out = std::io::stdout();
        let work = reconcile::reconcile(cluster, &opts, &mut out);
        until_sigterm(cluster, work).await
    });
    exit_for(result.map(|_| ()))
}

/// The exit code of a cluster command: 5 when another holds the Lease, 6 when the pre-flight
/// refused; other errors go to `main`'s one mapping.
fn exit_for(result: Result<(), ReconcileError>) -> Result<i32, Box<dyn std::error::Error>> {
    match result {
        Ok(()) => Ok(exit::OK),
        Err(ReconcileError::Cluster(ClusterError::Locked(m))) => {
            fatal(&m);
            Ok(exit::LOCKED)
        }
        Err(
            e @ (ReconcileError::Preflight(_)
            | ReconcileError::Restart(dssm_certs::restart::RestartError::Preflight(_))),
        ) => {
            fatal(&e.to_string());
            Ok(exit::PREFLIGHT)
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs `work`; on SIGTERM or SIGINT drops it and restores TMM before returning, so that TMM is
/// never left at zero by a stopped Job.
async fn until_sigterm<T, E>(
    cluster: &Cluster,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E>
where
    E: From<dssm_certs::restart::RestartError> + From<ClusterError>,
{
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler can be installed");
    tokio::select! {
        r = work => r,
        _ = term.recv() => stop(cluster).await,
        _ = tokio::signal::ctrl_c() => stop(cluster).await,
    }
}

async fn stop<T, E>(cluster: &Cluster) -> Result<T, E>
where
    E: From<dssm_certs::restart::RestartError> + From<ClusterError>,
{
    if !cluster.holds_lease().await {
        notice(
            "signal received: this process does not hold the lease, so it leaves TMM to the holder",
        );
        return Err(dssm_certs::restart::RestartError::Interrupted { replicas: -1 }.into());
    }
    notice("signal received: restoring TMM before exiting");
    let replicas = cluster.restore_tmm().await?.unwrap_or(-1);
    Err(dssm_certs::restart::RestartError::Interrupted { replicas }.into())
}

fn restart(a: &dssm_certs::cli::RestartArgs) -> Result<i32, Box<dyn std::error::Error>> {
    let rt = runtime()?;
    let result: Result<(), ReconcileError> = rt.block_on(async {
        let cluster = Cluster::connect(&a.cluster.target()).await?;
        // `restart` is run to end a restart that may be holding TMM down: wait out a holder
        // that looks alive rather than giving up at once.
        let lease = cluster.acquire_lease_waiting(true).await?;
        let mut out = std::io::stdout();
        let opts = a.restart.options();
        let r = until_sigterm(
            &cluster,
            lease.guard(async {
                cluster.restart(&opts, &mut out).await.map_err(|e| match e {
                    dssm_certs::restart::RestartError::Preflight(why) => {
                        ReconcileError::Preflight(why)
                    }
                    e => e.into(),
                })
            }),
        )
        .await;
        lease.release().await;
        r
    });
    exit_for(result.map(|_| ()))
}

fn agent(a: &dssm_certs::cli::RunArgs) -> Result<i32, Box<dyn std::error::Error>> {
    use dssm_certs::agent;
    let window = a
        .maintenance_window
        .as_deref()
        .map(agent::MaintenanceWindow::parse)
        .transpose()?;
    let thresholds = check::Thresholds {
        warn: a.warn,
        critical: a.critical,
    };
    let rt = runtime()?;
    rt.block_on(async {
        let cluster = std::sync::Arc::new(Cluster::connect(&a.cluster.target()).await?);
        let opts = agent::Options {
            listen: a.listen,
            interval: std::time::Duration::from_secs(a.interval.max(1) as u64),
            window,
            reconcile: reconcile_options(
                &cluster,
                &a.issue,
                false,
                Some(a.restart.options()),
                Policy {
                    renew_before: a.issue.renew_before,
                    ca_renew_before: a.issue.ca_renew_before,
                    leaf_days: a.issue.material.days,
                    force_leaf: false,
                    force_ca: false,
                },
            ),
            thresholds,
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        // A restart whose holder died is an orphan: TMM goes back to its count first. In the
        // background: waiting out a dead holder's Lease must not delay /metrics.
        let at_start = cluster.clone();
        tokio::spawn(async move { recover_orphan(&at_start, "at start", None).await });
        // On SIGTERM the agent stops; a reconcile in flight is dropped, and TMM restored by
        // whoever holds the Lease (us, or nobody any more: then we take it).
        agent::run(cluster.clone(), opts, stop).await?;
        if cluster.holds_lease().await {
            if let Ok(Some(n)) = cluster.restore_tmm().await {
                notice(&format!("restored TMM to {n} replicas before exiting"));
            }
        } else {
            // Bounded: the shutdown must fit the pod's grace period.
            let limit = std::time::Duration::from_secs(10);
            recover_orphan(&cluster, "before exiting", Some(limit)).await;
        }
        Ok::<_, Box<dyn std::error::Error>>(exit::OK)
    })
}

/// Restores TMM from a restart record whose holder is gone; says what it did.
async fn recover_orphan(cluster: &Cluster, when: &str, limit: Option<std::time::Duration>) {
    let limit = limit.unwrap_or(std::time::Duration::MAX);
    match tokio::time::timeout(limit, cluster.recover_orphan(true)).await {
        Ok(Ok(Some(n))) => eprintln!("restored TMM to {n} replicas {when} (an orphaned restart)"),
        Ok(Ok(None)) => {}
        Ok(Err(ClusterError::Locked(m))) => {
            tracing::info!(%m, "a restart is in progress elsewhere")
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "could not recover an orphaned restart"),
        Err(_) => tracing::warn!("recovering an orphaned restart took too long; the next run will"),
    }
}

fn reconcile_options(
    cluster: &Cluster,
    issue: &dssm_certs::cli::IssueArgs,
    dry_run: bool,
    restart: Option<dssm_certs::restart::Options>,
    policy: Policy,
) -> reconcile::Options {
    let m = &issue.material;
    let dns_names = if m.dns.is_empty() {
        contract::default_dns_names(Some(&cluster.dssm_ns))
    } else {
        m.dns.clone()
    };
    reconcile::Options {
        dry_run,
        policy,
        dhparam: issue.dhparam.clone(),
        generate: generate::GenerateOptions {
            days: m.days,
            ca_days: m.ca_days,
            key_algorithm: m.key_algorithm,
            ca_subject: m.ca_subject.clone(),
            subject: m.subject.clone(),
            dns_names,
            existing_ca: None,
            dhparam: generate::DhSource::Generate,
            namespace: None,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        },
        thresholds: check::Thresholds::default(),
        restart,
    }
}
