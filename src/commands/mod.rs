//! One file per command; `run` dispatches, and `CommandError::exit_code` is the one mapping from
//! a failure to the documented exit codes (`crate::exit`).

pub mod agent;
pub mod change;
pub mod check;
pub mod doctor;
pub mod generate;
pub mod log;
pub mod probe;
pub mod values;

use crate::agent::AgentError;
use crate::cli::{Cli, Command};
use crate::cluster::ClusterError;
use crate::exit;
use crate::generate::GenerateError;
use crate::reconcile::ReconcileError;
use crate::restart::RestartError;

/// Why a command failed. A command that ran returns its own status code instead (`check` and
/// `probe` report OK/WARNING/CRITICAL/UNKNOWN as `Ok`).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// `reconcile` or `rotate` failed.
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
    /// The `restart` command failed: it writes no Secret, so its message says what it did do.
    #[error("{}", restart_message(.0))]
    Restart(#[source] RestartError),
    /// Talking to the cluster failed outside a pass (connecting, taking the Lease).
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// A signal stopped a command that changes the cluster; what it left depends on the command
    /// and on whether this process held the Lease.
    #[error("interrupted by a signal: {}", interrupted(*.command, .stopped))]
    Interrupted { command: Changing, stopped: Stopped },
    /// A signal stopped the Lease holder, and giving TMM back its replicas failed.
    #[error("interrupted by a signal, and TMM could not be given back its replicas: {source}. The next run (or the agent) restores TMM from the record on the workload; {}", command.what_stays())]
    InterruptedRestoreFailed {
        command: Changing,
        source: ClusterError,
    },
    /// The input a check or probe needs is missing or unreadable: it cannot tell.
    #[error("{0}")]
    CannotTell(String),
    /// Anything else the operator must fix (a missing flag outside a pod, an I/O error).
    #[error("{0}")]
    Failed(String),
}

/// The commands that change the cluster, for what a failure tells about each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Changing {
    Reconcile,
    Rotate,
    Restart,
}

impl Changing {
    /// What a stopped run leaves behind, in this command's terms.
    fn what_stays(self) -> &'static str {
        match self {
            Changing::Reconcile | Changing::Rotate => {
                "what this run wrote stays recorded on the cluster, and the next run \
                 (`dssm-certs reconcile`, `rotate` or `restart`) resumes from it"
            }
            Changing::Restart => {
                "`restart` changes no Secret; run `dssm-certs restart` again to finish: it resumes \
                 where this run stopped"
            }
        }
    }
}

/// What the signal handler found when a signal stopped a command that changes the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// This process did not hold the Lease (a dry run, a run waiting for it): it left TMM to
    /// the holder.
    NotHolder,
    /// It held the Lease, gave TMM back its replicas (`Some(pods)`; None: no target was
    /// scaled down) and released the Lease.
    Restored(Option<i32>),
}

fn interrupted(command: Changing, stopped: &Stopped) -> String {
    match stopped {
        Stopped::NotHolder => format!(
            "this process did not hold the Lease, so it leaves TMM to the holder (only the \
             Lease holder scales TMM down or back); {}",
            command.what_stays()
        ),
        Stopped::Restored(Some(pods)) => format!(
            "TMM was given back its replicas ({pods} in all) and the Lease released; {}",
            command.what_stays()
        ),
        Stopped::Restored(None) => format!(
            "no TMM target was scaled down, so none needed restoring; the Lease was released; {}",
            command.what_stays()
        ),
    }
}

/// The `restart` command's failure, in its own terms: refusals say what they refused; any other
/// failure says that no Secret changed and where TMM stands.
fn restart_message(e: &RestartError) -> String {
    match e {
        RestartError::Preflight(_)
        | RestartError::RollingAfterCaChange(_)
        | RestartError::Cluster(ClusterError::Locked(_)) => e.to_string(),
        _ => format!(
            "the restart failed: {e}. No Secret was changed; a TMM target this run had scaled \
             down was given back its replicas (the output says so, or why not). Run \
             `dssm-certs restart` again once the cause is fixed: it resumes where this run stopped"
        ),
    }
}

// The patterns of each wrapped error enum, by exit code. Macros in pattern position, so that
// the one `match` in `exit_code` names every variant at every place its enum is wrapped, and
// adding a variant anywhere fails to compile until it is mapped.

/// Another dssm-certs holds the Lease.
macro_rules! cluster_locked {
    () => {
        ClusterError::Locked(_)
    };
}

/// Every other API failure.
macro_rules! cluster_failed {
    () => {
        ClusterError::Config(_)
            | ClusterError::Forbidden { .. }
            | ClusterError::NotFound { .. }
            | ClusterError::Conflict { .. }
            | ClusterError::Api { .. }
            | ClusterError::Unreachable { .. }
            | ClusterError::NotOurs { .. }
            | ClusterError::LeaseLost(_)
            | ClusterError::EvictionBlocked { .. }
            | ClusterError::NoWorkload(_)
    };
}

/// A restart that failed (a refusal by the pre-flight and the Lease apart).
macro_rules! restart_failed {
    () => {
        RestartError::Cluster(cluster_failed!())
            | RestartError::Timeout { .. }
            | RestartError::Interrupted { .. }
            | RestartError::Probe(_)
            | RestartError::PodEndpoint(_)
            | RestartError::DssmRoll(_)
            | RestartError::LeafKeyMismatch { .. }
            | RestartError::StrayEndpoint { .. }
            | RestartError::MissingKey { .. }
            | RestartError::ClientKey(_)
            | RestartError::ClientCert(_)
            | RestartError::RollingAfterCaChange(_)
    };
}

/// New materials that could not be made or written.
macro_rules! generate_failed {
    () => {
        GenerateError::Read { .. }
            | GenerateError::DhparamFile { .. }
            | GenerateError::Write { .. }
            | GenerateError::WouldOverwrite { .. }
            | GenerateError::NotADirectory { .. }
            | GenerateError::NotWritable { .. }
            | GenerateError::Interrupted { .. }
            | GenerateError::Key(_)
            | GenerateError::Issue(_)
            | GenerateError::Dh(_)
    };
}

impl CommandError {
    /// The one mapping to the documented exit codes (`crate::exit`): every variant of every
    /// error a command returns is named here, with no wildcard.
    pub fn exit_code(&self) -> i32 {
        use CommandError as E;
        use ReconcileError as R;
        match self {
            E::Cluster(cluster_locked!())
            | E::Reconcile(
                R::Cluster(cluster_locked!())
                | R::Restart(RestartError::Cluster(cluster_locked!()))
                | R::PreflightFailed(RestartError::Cluster(cluster_locked!())),
            )
            | E::Restart(RestartError::Cluster(cluster_locked!())) => exit::LOCKED,
            E::Reconcile(
                R::Preflight(_)
                | R::PhasePreflight { .. }
                | R::Restart(RestartError::Preflight(_))
                | R::PreflightFailed(RestartError::Preflight(_)),
            )
            | E::Restart(RestartError::Preflight(_)) => exit::PREFLIGHT,
            E::CannotTell(_) => exit::UNKNOWN,
            E::Generate(generate_failed!())
            | E::Cluster(cluster_failed!())
            | E::Reconcile(
                R::Cluster(cluster_failed!())
                | R::Generate(generate_failed!())
                | R::Restart(restart_failed!())
                | R::PreflightFailed(restart_failed!())
                | R::Refused(_)
                | R::Rotation(_)
                | R::Revision(_)
                | R::ProofMaterials(_)
                | R::KeptConflicting { .. },
            )
            | E::Restart(restart_failed!())
            | E::Agent(AgentError::Window(..) | AgentError::Listen(..) | AgentError::ListenIp(_))
            | E::Interrupted { .. }
            | E::InterruptedRestoreFailed { .. }
            | E::Failed(_) => exit::FAILED,
        }
    }

    /// A short stable name for the kind of failure (logs, metrics).
    pub fn label(&self) -> &'static str {
        match (self.exit_code(), self) {
            (exit::LOCKED, _) => "locked",
            (exit::PREFLIGHT, _) => "preflight",
            (_, CommandError::CannotTell(_)) => "cannot_tell",
            (_, CommandError::Generate(_)) => "generate",
            (_, CommandError::Reconcile(_) | CommandError::Cluster(_)) => "cluster",
            (_, CommandError::Restart(_)) => "restart",
            (
                _,
                CommandError::Interrupted { .. } | CommandError::InterruptedRestoreFailed { .. },
            ) => "interrupted",
            (_, CommandError::Agent(_)) => "agent",
            (_, CommandError::Failed(_)) => "failed",
        }
    }
}

impl From<std::io::Error> for CommandError {
    fn from(e: std::io::Error) -> Self {
        CommandError::Failed(e.to_string())
    }
}

impl From<serde_json::Error> for CommandError {
    fn from(e: serde_json::Error) -> Self {
        CommandError::Failed(e.to_string())
    }
}

/// Runs the command the command line names; `Ok` carries its exit code.
pub fn run(cli: Cli) -> Result<i32, CommandError> {
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Check(a) => check::run(a),
        Command::Doctor(a) => doctor::run(a),
        Command::Probe(a) => probe::run(a),
        Command::Restart(a) => change::restart(&a),
        Command::Run(a) => agent::run(&a),
        Command::Reconcile(a) => change::reconcile(&a),
        Command::Rotate(a) => change::rotate(&a),
        Command::Values(a) => values::run(a),
    }
}

/// The namespace of the pod we run in, as the service account mount tells it.
pub fn own_namespace() -> Option<String> {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn runtime() -> Result<tokio::runtime::Runtime, std::io::Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn api(verb: &'static str) -> ClusterError {
        ClusterError::Unreachable {
            verb,
            what: "secret spk-utilities/dssm-certs-secret".into(),
            detail: "connection refused".into(),
            attempts: 5,
        }
    }

    /// Each kind of failure, as a command returns it, and the exit code docs/commands.md documents
    /// for it ("All exit codes").
    fn table() -> Vec<(CommandError, i32)> {
        use ReconcileError as R;
        let locked = || ClusterError::Locked("lease spk-utilities/dssm-certs is held".into());
        let timeout = || RestartError::Timeout {
            what: "deployment spk-ingress/f5-tmm".into(),
            secs: 1,
        };
        vec![
            (locked().into(), exit::LOCKED),
            (
                R::Restart(RestartError::Cluster(locked())).into(),
                exit::LOCKED,
            ),
            (R::Preflight("pod not Ready".into()).into(), exit::PREFLIGHT),
            (
                R::PhasePreflight {
                    number: 1,
                    phase: "trust",
                    why: "CKQUORUM".into(),
                }
                .into(),
                exit::PREFLIGHT,
            ),
            (
                R::Restart(RestartError::Preflight("mid-rollout".into())).into(),
                exit::PREFLIGHT,
            ),
            (
                CommandError::CannotTell("x: cannot read".into()),
                exit::UNKNOWN,
            ),
            (R::Restart(timeout()).into(), exit::FAILED),
            (
                R::Restart(RestartError::Interrupted { replicas: 3 }).into(),
                exit::FAILED,
            ),
            (api("get").into(), exit::FAILED),
            (R::Refused("not valid".into()).into(), exit::FAILED),
            (
                R::Revision(crate::writes::RevisionExhausted).into(),
                exit::FAILED,
            ),
            (
                R::Rotation(crate::model::rotation::RecordError::MissingKey {
                    namespace: "ns".into(),
                    key: "ca.crt".into(),
                })
                .into(),
                exit::FAILED,
            ),
            (R::KeptConflicting { attempts: 3 }.into(), exit::FAILED),
            (
                GenerateError::NotADirectory {
                    path: PathBuf::from("out"),
                }
                .into(),
                exit::FAILED,
            ),
            (AgentError::ListenIp("nope".into()).into(), exit::FAILED),
            (
                CommandError::Restart(RestartError::Cluster(locked())),
                exit::LOCKED,
            ),
            (
                CommandError::Restart(RestartError::Preflight("mid-rollout".into())),
                exit::PREFLIGHT,
            ),
            (CommandError::Restart(timeout()), exit::FAILED),
            (R::PreflightFailed(timeout()).into(), exit::FAILED),
            (
                CommandError::Interrupted {
                    command: Changing::Restart,
                    stopped: Stopped::Restored(Some(3)),
                },
                exit::FAILED,
            ),
            (
                CommandError::InterruptedRestoreFailed {
                    command: Changing::Rotate,
                    source: api("patch"),
                },
                exit::FAILED,
            ),
            (CommandError::Failed("--dir: missing".into()), exit::FAILED),
        ]
    }

    #[test]
    fn each_failure_maps_to_its_documented_exit_code() {
        for (e, code) in table() {
            assert_eq!(e.exit_code(), code, "{e:?}");
        }
    }

    #[test]
    fn each_failure_has_a_stable_label() {
        let locked: CommandError = ClusterError::Locked("held by x".into()).into();
        assert_eq!(locked.label(), "locked");
        let timeout: CommandError = ReconcileError::Restart(RestartError::Timeout {
            what: "x".into(),
            secs: 1,
        })
        .into();
        assert_eq!(timeout.label(), "cluster");
    }

    /// `restart` writes no Secret: none of its failures may say it did, and a stopped run says
    /// one thing about TMM, not two.
    #[test]
    fn restart_failures_never_claim_written_materials_or_contradict_themselves() {
        let timeout = RestartError::Timeout {
            what: "pods of statefulset spk-utilities/f5-dssm-db Ready".into(),
            secs: 300,
        };
        let msg = CommandError::Restart(timeout).to_string();
        assert!(
            msg.starts_with("the restart failed: timed out after 300s"),
            "{msg}"
        );
        assert!(msg.contains("No Secret was changed"), "{msg}");
        for stopped in [
            Stopped::NotHolder,
            Stopped::Restored(None),
            Stopped::Restored(Some(3)),
        ] {
            let command = Changing::Restart;
            let msg = CommandError::Interrupted { command, stopped }.to_string();
            assert!(msg.starts_with("interrupted by a signal: "), "{msg}");
            assert!(!msg.contains("written") && !msg.contains("wrote"), "{msg}");
            let claims = [
                "not touched",
                "to the holder",
                "was given back",
                "none needed",
            ];
            let n = claims.iter().filter(|c| msg.contains(*c)).count();
            assert_eq!(n, 1, "one claim about TMM: {msg}");
        }
        let msg = CommandError::Interrupted {
            command: Changing::Reconcile,
            stopped: Stopped::Restored(Some(3)),
        }
        .to_string();
        assert!(msg.contains("(3 in all)") && msg.contains("what this run wrote stays recorded"));
    }

    /// The codes the table expects are the ones docs/commands.md's "All exit codes" lists.
    #[test]
    fn the_readme_lists_every_exit_code() {
        let readme = include_str!("../../docs/commands.md");
        let section = readme
            .split("### All exit codes")
            .nth(1)
            .and_then(|s| s.split("\n### ").next())
            .expect("docs/commands.md has an \"All exit codes\" section");
        for (_, code) in table() {
            assert!(
                section.contains(&format!("\n| {code} |")),
                "exit {code} not in: {section}"
            );
        }
    }
}
