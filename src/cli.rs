//! The command line (docs/commands.md). Every flag can also come from a `DSSM_CERTS_…` variable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::generate::DhSource;
use crate::pki::{KeyAlgorithm, Subject};

#[derive(Debug, Parser)]
#[command(
    name = "dssm-certs",
    version,
    about = "Certificate lifecycle for F5 dSSM (Redis DB + Sentinel) and its TMM clients",
    after_help = "Exit codes: 0 ok, 1 warning, 2 critical, 3 cannot tell, 4 failed, 5 locked (another dssm-certs holds the lease), 6 pre-flight refused, 64 usage."
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "DSSM_CERTS_LOG_FORMAT")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// What clap cannot check flag by flag: values that make sense only together. The same
    /// usage error (exit 64) as a bad value.
    pub fn validate(&self) -> Result<(), clap::Error> {
        let issue = match &self.command {
            Command::Reconcile(a) => &a.issue,
            Command::Rotate(a) => &a.issue,
            Command::Run(a) => &a.issue,
            _ => return Ok(()),
        };
        issue.validate().map_err(|msg| {
            use clap::CommandFactory;
            Cli::command().error(clap::error::ErrorKind::ArgumentConflict, msg)
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write the five files of the manual procedure and the two Secret manifests.
    Generate(GenerateArgs),
    /// Inspect deployed materials: expiry, residual time, chain, key match, DH params.
    Check(CheckArgs),
    /// Before a rotation: what in the cluster would make it unsafe or slow (read-only).
    Doctor(DoctorArgs),
    /// Print the TMM Helm values that point TMM at dSSM with these materials.
    Values(ValuesArgs),
    /// Mutual-TLS handshake and PING to Sentinel (and DBs) with the deployed materials.
    Probe(ProbeArgs),
    /// One pass against the cluster: observe, plan, write what is due (the CronJob's command).
    Reconcile(ReconcileArgs),
    /// Renew now even if nothing is due; --ca also replaces the CA (the on-demand Job).
    Rotate(RotateArgs),
    /// Restart dSSM and TMM onto the Secrets already deployed, writing none: pod by pod by
    /// default (--strategy rolling); --strategy scale-to-zero is the manual procedure (TMM to 0
    /// and back, every dSSM pod at once).
    Restart(RestartArgs),
    /// The long-running agent: expiry metrics, health, Events; reconciles only inside
    /// --maintenance-window.
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub issue: IssueArgs,
    #[command(flatten)]
    pub restart: RestartFlags,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, default_value = "0.0.0.0:9090", env = "DSSM_CERTS_LISTEN")]
    pub listen: std::net::SocketAddr,
    /// Inspect at least this often (and on every change of the Secrets).
    #[arg(long, default_value = "1h", value_parser = parse_duration, env = "DSSM_CERTS_INTERVAL")]
    pub interval: i64,
    /// A cron expression (UTC) and a duration, e.g. "0 3 * * SUN 2h": inside it, renew and
    /// restart what is due. Without it the agent never writes Secrets.
    #[arg(long, env = "DSSM_CERTS_MAINTENANCE_WINDOW")]
    pub maintenance_window: Option<String>,
    /// The agent's expiry Events and metrics call a certificate expiring soon (a Warning Event
    /// `CertificateExpiringSoon`) when it has less than this left, e.g. 28d or 672h.
    #[arg(long, default_value = "28d", value_parser = parse_duration, env = "DSSM_CERTS_WARN")]
    pub warn: i64,
    /// The agent grades a certificate critical when it has less than this left (shorter than
    /// --warn).
    #[arg(long, default_value = "14d", value_parser = parse_duration, env = "DSSM_CERTS_CRITICAL")]
    pub critical: i64,
}

/// How TMM and dSSM are restarted to pick up new materials.
#[derive(Debug, Clone, Args)]
pub struct RestartFlags {
    /// `tmm-first` (the manual procedure's order) or `dssm-first` (TMM stays at zero until the dSSM election
    /// is complete).
    #[arg(long, value_enum, default_value_t = crate::restart::Order::TmmFirst, env = "DSSM_CERTS_ORDER")]
    pub order: crate::restart::Order,
    /// `rolling` (default: no interruption; a new CA goes out in three phases) or
    /// `scale-to-zero` (the manual procedure: TMM to zero, every dSSM pod at once; it interrupts
    /// traffic).
    #[arg(long, value_enum, default_value_t = crate::restart::Strategy::Rolling, env = "DSSM_CERTS_STRATEGY")]
    pub strategy: crate::restart::Strategy,
    /// Bound of every wait (pods terminating, pods Ready, TMM available).
    #[arg(long, default_value = "300s", value_parser = parse_duration, env = "DSSM_CERTS_WAIT_TIMEOUT")]
    pub wait_timeout: i64,
    /// Verify the restart with an mTLS PING here (default: f5-dssm-sentinel.<dssm-namespace>:26379).
    #[arg(long, env = "DSSM_CERTS_PROBE_ENDPOINT")]
    pub probe_endpoint: Option<String>,
    /// Name the served certificate is checked against (default: the endpoint's host).
    #[arg(long, env = "DSSM_CERTS_PROBE_SERVER_NAME")]
    pub probe_server_name: Option<String>,
    /// Restart even when the pre-flight check finds a dSSM pod not Ready or TMM mid-rollout
    /// (recorded in a `PreflightOverridden` Event).
    #[arg(long, env = "DSSM_CERTS_FORCE_RESTART")]
    pub force: bool,
    /// `POD=HOST:PORT` (repeatable): where the rolling restart reaches that dSSM pod's Redis
    /// instead of its pod IP and container port (a port-forward, a test).
    #[arg(long = "redis-endpoint", value_name = "POD=HOST:PORT", value_parser = crate::restart::dssm::parse_redis_endpoint, env = "DSSM_CERTS_REDIS_ENDPOINT", value_delimiter = ',')]
    pub redis_endpoints: Vec<(String, String)>,
    /// Allow restarting a TMM workload whose only pod cannot surge (one replica with
    /// `Recreate` or `maxSurge: 0`, a DaemonSet on one node): traffic through it stops until
    /// the replacement is Ready. Refused before anything is written without it.
    #[arg(long, env = "DSSM_CERTS_ALLOW_TMM_GAP")]
    pub allow_tmm_gap: bool,
    /// The name Sentinel monitors the dSSM primary under.
    #[arg(long, default_value = crate::redis::DEFAULT_MASTER_NAME, env = "DSSM_CERTS_REDIS_MASTER_NAME")]
    pub redis_master_name: String,
}

impl RestartFlags {
    pub fn options(&self) -> crate::restart::Options {
        crate::restart::Options {
            force: self.force,
            order: self.order,
            strategy: self.strategy,
            wait_timeout: std::time::Duration::from_secs(self.wait_timeout.max(1) as u64),
            probe_endpoint: self.probe_endpoint.clone(),
            probe_server_name: self.probe_server_name.clone(),
            redis: crate::restart::dssm::RedisAccess {
                endpoints: self.redis_endpoints.iter().cloned().collect(),
                master: self.redis_master_name.clone(),
            },
            allow_tmm_gap: self.allow_tmm_gap,
        }
    }
}

#[derive(Debug, Args)]
pub struct RestartArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub restart: RestartFlags,
}

/// Where dssm-certs works in the cluster (KUBECONFIG or the in-cluster service account).
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Namespace of the dSSM pods and of the CA key Secret (default: the pod's or kubeconfig's).
    #[arg(long, env = "DSSM_CERTS_DSSM_NAMESPACE", value_parser = parse_namespace)]
    pub dssm_namespace: Option<String>,
    #[command(flatten)]
    pub tmm: TmmArgs,
    /// Label selector of the dSSM pods (DBs and sentinels) in the dSSM namespace: the pods the
    /// restart and the pre-flight look at. The default matches the F5 dSSM chart's `app`
    /// labels.
    #[arg(long, default_value = crate::contract::DSSM_SELECTOR, env = "DSSM_CERTS_DSSM_SELECTOR", value_parser = crate::restart::parse_selector)]
    pub dssm_selector: String,
    /// Timeout of each API request.
    #[arg(long, default_value = "30s", value_parser = parse_duration, env = "DSSM_CERTS_API_TIMEOUT")]
    pub api_timeout: i64,
    /// How long the Lease lasts unless renewed (every third of it while held): what a crashed
    /// run makes the next one wait.
    #[arg(long, default_value = "120s", value_parser = parse_duration, env = "DSSM_CERTS_LEASE_DURATION")]
    pub lease_duration: i64,
    /// How far apart the clocks of two machines running dssm-certs may be. A Lease whose last
    /// renewal is older than its duration plus this is taken at once; a younger one is watched
    /// for a whole lease duration on our own clock first (client-go's rule).
    #[arg(long, default_value = "60s", value_parser = parse_duration, env = "DSSM_CERTS_MAX_CLOCK_SKEW")]
    pub max_clock_skew: i64,
}

impl ClusterArgs {
    pub fn settings(&self) -> crate::cluster::Settings {
        crate::cluster::Settings {
            dssm_namespace: self.dssm_namespace.clone(),
            tmm: self.tmm.tmm.clone(),
            tmm_namespace: self.tmm.tmm_namespace.clone(),
            tmm_deployment: self.tmm.tmm_deployment.clone(),
            dssm_selector: self.dssm_selector.clone(),
            timeout: std::time::Duration::from_secs(self.api_timeout.max(1) as u64),
            lease_seconds: i32::try_from(self.lease_duration.max(1)).unwrap_or(i32::MAX),
            max_clock_skew: self.max_clock_skew,
        }
    }
}

/// The TMM workloads that talk to dSSM: `--tmm` (repeatable), or the one-Deployment shorthand.
#[derive(Debug, Clone, Args)]
pub struct TmmArgs {
    /// A TMM workload, NAMESPACE/KIND/NAME (kind `deployment` or `daemonset`; NAMESPACE/NAME is
    /// a Deployment). Repeatable; the env form is comma-separated. Each gets the Secrets in its
    /// namespace and is restarted with dSSM.
    #[arg(
        long = "tmm",
        value_name = "NAMESPACE/KIND/NAME",
        env = "DSSM_CERTS_TMM",
        value_delimiter = ',',
        value_parser = crate::model::targets::TmmTarget::parse,
        conflicts_with_all = ["tmm_namespace", "tmm_deployment"]
    )]
    pub tmm: Vec<crate::model::targets::TmmTarget>,
    /// Namespace of TMM (default: the dSSM namespace, as in CNF): shorthand for one target
    /// with --tmm-deployment.
    #[arg(long, env = "DSSM_CERTS_TMM_NAMESPACE", value_parser = parse_namespace)]
    pub tmm_namespace: Option<String>,
    /// Name of the TMM Deployment in --tmm-namespace (the one-target shorthand; use --tmm for
    /// a DaemonSet or several targets).
    #[arg(long, default_value = crate::contract::TMM_DEPLOYMENT, env = "DSSM_CERTS_TMM_DEPLOYMENT", value_parser = parse_workload_name)]
    pub tmm_deployment: String,
}

/// What new materials look like: the same flags for `generate` and the cluster commands.
#[derive(Debug, Clone, Args)]
pub struct MaterialArgs {
    /// Lifetime of the leaf certificate, in days (1 to 36500).
    #[arg(long, default_value_t = crate::contract::DEFAULT_DAYS, value_parser = parse_days, env = "DSSM_CERTS_DAYS")]
    pub days: u32,
    /// Lifetime of a new CA certificate (10 years; `--ca-days 365` is the manual procedure's). A leaf never
    /// outlives its CA: its notAfter is cut to the CA's.
    #[arg(long, default_value_t = crate::contract::DEFAULT_CA_DAYS, value_parser = parse_days, env = "DSSM_CERTS_CA_DAYS")]
    pub ca_days: u32,
    /// Key type of the new leaf and of a new CA: RSA 4096 by default (the manual procedure's `openssl
    /// genrsa 4096`); ECDSA keys are much faster to make. A CA that is kept keeps its own key.
    #[arg(long, value_enum, default_value_t = KeyAlgorithm::Rsa4096, env = "DSSM_CERTS_KEY_ALGORITHM")]
    pub key_algorithm: KeyAlgorithm,
    /// Subject of a new CA certificate, as `/O=x/CN=y` or `O=x, CN=y`; the default is the
    /// manual procedure's.
    #[arg(long, default_value = "O=Redis Test, CN=Certificate Authority", value_parser = parse_subject, env = "DSSM_CERTS_CA_SUBJECT")]
    pub ca_subject: Subject,
    /// Subject of the leaf certificate that dSSM serves and TMM presents, as `/O=x/CN=y` or
    /// `O=x, CN=y`; the default is the manual procedure's. Its names are the subjectAltNames (--dns).
    #[arg(long, default_value = "O=Redis Test, CN=Server", value_parser = parse_subject, env = "DSSM_CERTS_SUBJECT")]
    pub subject: Subject,
    /// subjectAltNames of the leaf (DNS names, or IP addresses), instead of the dSSM Service
    /// names (repeatable).
    #[arg(
        long = "dns",
        value_name = "NAME",
        env = "DSSM_CERTS_DNS",
        value_delimiter = ',',
        value_parser = parse_dns
    )]
    pub dns: Vec<String>,
}

/// How new materials are made in the cluster.
#[derive(Debug, Clone, Args)]
pub struct IssueArgs {
    #[command(flatten)]
    pub material: MaterialArgs,
    /// DH params for new materials: reuse the deployed ones while valid (default), or
    /// `generate`, `ffdhe2048`, FILE.
    #[arg(
        long,
        value_name = "generate|ffdhe2048|FILE",
        env = "DSSM_CERTS_DHPARAM"
    )]
    pub dhparam: Option<DhSource>,
    /// Renew the leaf this long before expiry instead of when 1/3 of its lifetime is left.
    #[arg(long, value_parser = parse_duration, env = "DSSM_CERTS_RENEW_BEFORE")]
    pub renew_before: Option<i64>,
    /// Rotate the CA this long before its expiry instead of when 1/3 of its lifetime is left.
    /// A due leaf under a CA that is not due is renewed under the same CA.
    #[arg(long, value_parser = parse_duration, env = "DSSM_CERTS_CA_RENEW_BEFORE")]
    pub ca_renew_before: Option<i64>,
}

impl IssueArgs {
    /// A renew-before at or over the lifetime makes every new certificate due at birth: every
    /// pass would renew (back-to-back rolling restarts inside the agent's window).
    pub fn validate(&self) -> Result<(), RenewBeforeTooLong> {
        let m = &self.material;
        for (flag, before, days_flag, days) in [
            ("--renew-before", self.renew_before, "--days", m.days),
            (
                "--ca-renew-before",
                self.ca_renew_before,
                "--ca-days",
                m.ca_days,
            ),
        ] {
            let lifetime = i64::from(days) * 86_400;
            if let Some(b) = before.filter(|b| *b >= lifetime) {
                let given = humantime::format_duration(std::time::Duration::from_secs(
                    u64::try_from(b).unwrap_or(0),
                ));
                return Err(RenewBeforeTooLong {
                    flag,
                    given: given.to_string(),
                    days_flag,
                    days,
                });
            }
        }
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub issue: IssueArgs,
    /// Print the plan and what would be written; make no write request at all.
    #[arg(long, env = "DSSM_CERTS_DRY_RUN")]
    pub dry_run: bool,
    /// Write new materials and mark the Deployment, but do not restart.
    #[arg(long, env = "DSSM_CERTS_NO_RESTART")]
    pub no_restart: bool,
    #[command(flatten)]
    pub restart: RestartFlags,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub issue: IssueArgs,
    /// Replace the CA too. With --strategy rolling (the default) the new CA goes out in three
    /// phases (trust both CAs, switch the leaf, drop the old CA) so that every pod trusts its
    /// peers throughout; with scale-to-zero everything restarts at once.
    #[arg(long, env = "DSSM_CERTS_ROTATE_CA")]
    pub ca: bool,
    /// Print the plan and what would be written; make no write request at all.
    #[arg(long, env = "DSSM_CERTS_DRY_RUN")]
    pub dry_run: bool,
    /// Write the new materials and mark the TMM targets, but restart nothing (a later
    /// `dssm-certs restart`, or the next reconcile, does).
    #[arg(long, env = "DSSM_CERTS_NO_RESTART")]
    pub no_restart: bool,
    #[command(flatten)]
    pub restart: RestartFlags,
}

/// A renew-before that is not shorter than the lifetime it is for (both flags named).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{flag} {given} is not shorter than {days_flag} {days}: every new certificate would be due \
     as soon as it is issued, and every pass would renew it. Give {flag} less than {days_flag} \
     (or leave it out: renewal at 1/3 of the lifetime left)"
)]
pub struct RenewBeforeTooLong {
    pub flag: &'static str,
    pub given: String,
    pub days_flag: &'static str,
    pub days: u32,
}

/// A flag value the command line refuses, with the value as given (clap names the flag).
#[derive(Debug, thiserror::Error)]
pub enum InvalidValue {
    #[error("{value:?} is not a whole number of days")]
    NotDays { value: String },
    #[error("a lifetime of 0 days would be expired at once: give at least 1")]
    ZeroDays,
    #[error("{days} days is more than the maximum of {MAX_DAYS} (100 years)")]
    TooManyDays { days: u64 },
    #[error("{value:?} is not a duration like 28d or 336h: {source}")]
    NotDuration {
        value: String,
        #[source]
        source: humantime::DurationError,
    },
    #[error("{value:?} is too long")]
    DurationTooLong { value: String },
    #[error(
        "{:?} is not a valid Deployment name: lowercase letters, digits, '-' and '.', starting \
         and ending with a letter or digit, at most 253 characters (as the API server requires)",
        value.escape_debug().to_string()
    )]
    WorkloadName { value: String },
}

fn parse_dns(s: &str) -> Result<String, crate::pki::IssueError> {
    crate::pki::parse_san(s).map(|_| s.to_string())
}

/// A lifetime in days: at least 1, at most `MAX_DAYS` (100 years: X.509 times end in 9999, and
/// nothing needs longer).
pub fn parse_days(s: &str) -> Result<u32, InvalidValue> {
    let days: u64 = s.trim().parse().map_err(|_| InvalidValue::NotDays {
        value: s.to_string(),
    })?;
    match days {
        0 => Err(InvalidValue::ZeroDays),
        d if d > u64::from(MAX_DAYS) => Err(InvalidValue::TooManyDays { days: d }),
        d => Ok(d as u32),
    }
}

pub const MAX_DAYS: u32 = 36_500;

fn parse_subject(s: &str) -> Result<Subject, crate::pki::IssueError> {
    Subject::parse(s)
}

/// A Deployment name as the API server takes one (an RFC 1123 subdomain): it also goes into
/// `values`' YAML, where a newline would inject keys.
fn parse_workload_name(s: &str) -> Result<String, InvalidValue> {
    if crate::model::targets::dns_subdomain(s) {
        Ok(s.to_string())
    } else {
        Err(InvalidValue::WorkloadName {
            value: s.to_string(),
        })
    }
}

fn parse_namespace(s: &str) -> Result<String, crate::manifest::NamespaceError> {
    crate::manifest::validate_namespace(s).map(|()| s.to_string())
}

/// A duration such as `28d`, `336h` or `2w`, in seconds.
pub fn parse_duration(s: &str) -> Result<i64, InvalidValue> {
    let d = humantime::parse_duration(s.trim()).map_err(|source| InvalidValue::NotDuration {
        value: s.to_string(),
        source,
    })?;
    i64::try_from(d.as_secs()).map_err(|_| InvalidValue::DurationTooLong {
        value: s.to_string(),
    })
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Folder to write into (created 0700 if missing).
    #[arg(long, env = "DSSM_CERTS_OUT")]
    pub out: PathBuf,
    /// Replace existing files in the folder.
    #[arg(long, env = "DSSM_CERTS_FORCE")]
    pub force: bool,
    /// metadata.namespace of the manifests; also the default --dssm-namespace.
    #[arg(long, env = "DSSM_CERTS_NAMESPACE", value_parser = parse_namespace)]
    pub namespace: Option<String>,
    /// Namespace of the dSSM Services, for the leaf's subjectAltNames.
    #[arg(long, env = "DSSM_CERTS_DSSM_NAMESPACE", value_parser = parse_namespace)]
    pub dssm_namespace: Option<String>,
    #[command(flatten)]
    pub material: MaterialArgs,
    /// Sign the leaf with this existing CA certificate instead of making a CA.
    #[arg(long, requires = "ca_key", env = "DSSM_CERTS_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// The existing CA's private key.
    #[arg(long, requires = "ca_cert", env = "DSSM_CERTS_CA_KEY")]
    pub ca_key: Option<PathBuf>,
    /// DH parameters: `generate` (fresh, like openssl dhparam 2048), `ffdhe2048` (RFC 7919) or a FILE to reuse.
    #[arg(
        long,
        default_value = "generate",
        value_name = "generate|ffdhe2048|FILE",
        env = "DSSM_CERTS_DHPARAM"
    )]
    pub dhparam: DhSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Folder holding the files of the manual procedure (without it: the cluster).
    #[arg(long, env = "DSSM_CERTS_DIR")]
    pub dir: Option<PathBuf>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Output: `table` for people, `json` for scripts.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table, env = "DSSM_CERTS_OUTPUT")]
    pub output: OutputFormat,
    /// Warn when less than this is left.
    #[arg(long, default_value = "28d", value_parser = parse_duration, env = "DSSM_CERTS_WARN")]
    pub warn: i64,
    /// Critical when less than this is left.
    #[arg(long, default_value = "14d", value_parser = parse_duration, env = "DSSM_CERTS_CRITICAL")]
    pub critical: i64,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Output: `table` for people, `json` for scripts.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table, env = "DSSM_CERTS_OUTPUT")]
    pub output: OutputFormat,
    /// Whose permissions to check, as NAMESPACE/NAME of a ServiceAccount (impersonated: you must
    /// be allowed to impersonate it), or `self` for the identity running doctor. Default: the
    /// `dssm-certs` ServiceAccount in the dSSM namespace.
    #[arg(long, env = "DSSM_CERTS_DOCTOR_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    /// Warn when a deployed certificate has less than this left before it expires.
    #[arg(long, default_value = "28d", value_parser = parse_duration, env = "DSSM_CERTS_WARN")]
    pub warn: i64,
    /// Critical when a deployed certificate has less than this left (shorter than --warn).
    #[arg(long, default_value = "14d", value_parser = parse_duration, env = "DSSM_CERTS_CRITICAL")]
    pub critical: i64,
}

#[derive(Debug, Args)]
pub struct ValuesArgs {
    /// Namespace of the dSSM pods (default: this pod's namespace).
    #[arg(long, env = "DSSM_CERTS_DSSM_NAMESPACE", value_parser = parse_namespace)]
    pub dssm_namespace: Option<String>,
    /// The TMM targets: one snippet per TMM namespace.
    #[command(flatten)]
    pub tmm: TmmArgs,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Folder holding dssm-ca.crt, dssm-cert.crt and dssm-key.key (as TMM mounts them).
    #[arg(long, env = "DSSM_CERTS_DIR")]
    pub dir: PathBuf,
    /// Sentinel endpoint (default: f5-dssm-sentinel.<dssm-namespace>:26379).
    #[arg(long, env = "DSSM_CERTS_ENDPOINT")]
    pub endpoint: Option<String>,
    /// A DB endpoint to probe as well (repeatable).
    #[arg(
        long = "db-endpoint",
        env = "DSSM_CERTS_DB_ENDPOINT",
        value_delimiter = ','
    )]
    pub db_endpoints: Vec<String>,
    /// Name to verify the served certificate against (default: each endpoint's host).
    #[arg(long, env = "DSSM_CERTS_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Namespace of the dSSM Services, for the default --endpoint (default: this pod's
    /// namespace).
    #[arg(long, env = "DSSM_CERTS_DSSM_NAMESPACE", value_parser = parse_namespace)]
    pub dssm_namespace: Option<String>,
    /// Connect and reply timeout per endpoint.
    #[arg(long, default_value = "5s", value_parser = parse_duration, env = "DSSM_CERTS_TIMEOUT")]
    pub timeout: i64,
    /// The whole probe, every endpoint and name lookup included, ends by then.
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "DSSM_CERTS_DEADLINE")]
    pub deadline: i64,
    /// Output: `table` for people, `json` for scripts.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table, env = "DSSM_CERTS_OUTPUT")]
    pub output: OutputFormat,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag of every command, as `--help` lists it.
    fn flags(cmd: &clap::Command, path: &str, out: &mut Vec<(String, bool)>) {
        for a in cmd.get_arguments() {
            let name = a
                .get_long()
                .map_or_else(|| a.get_id().to_string(), |l| format!("--{l}"));
            out.push((format!("{path} {name}"), a.get_help().is_some()));
        }
        for sub in cmd.get_subcommands() {
            flags(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    /// Regression: --key-algorithm, --subject, --ca-subject, --dssm-selector, --warn and
    /// --critical (and others) had no help text: `--help` listed them bare.
    #[test]
    fn every_flag_of_every_command_has_help_text() {
        let mut cmd = Cli::command();
        cmd.build();
        let mut all = Vec::new();
        flags(&cmd, "dssm-certs", &mut all);
        assert!(all.len() > 50, "walked {} flags", all.len());
        let bare: Vec<&str> = all
            .iter()
            .filter(|(_, help)| !help)
            .map(|(name, _)| name.as_str())
            .collect();
        assert!(bare.is_empty(), "flags without help text: {bare:?}");
    }
}
