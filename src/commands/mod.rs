//! One file per command; `run` dispatches, and `CommandError::exit_code` is the one mapping from
//! a failure to the documented exit codes (`crate::exit`).

pub mod agent;
pub mod check;
pub mod cluster;
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
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The input a check or probe needs is missing or unreadable: it cannot tell.
    #[error("{0}")]
    CannotTell(String),
    /// Anything else the operator must fix (a missing flag outside a pod, an I/O error).
    #[error("{0}")]
    Failed(String),
}

impl CommandError {
    /// The one mapping to the documented exit codes.
    pub fn exit_code(&self) -> i32 {
        use ReconcileError as R;
        match self {
            CommandError::Reconcile(R::Cluster(ClusterError::Locked(_))) => exit::LOCKED,
            CommandError::Reconcile(
                R::Preflight(_) | R::PhasePreflight { .. } | R::Restart(RestartError::Preflight(_)),
            ) => exit::PREFLIGHT,
            CommandError::CannotTell(_) => exit::UNKNOWN,
            _ => exit::FAILED,
        }
    }

    /// A short stable name for the kind of failure (logs, metrics).
    pub fn label(&self) -> &'static str {
        match self.exit_code() {
            exit::LOCKED => "locked",
            exit::PREFLIGHT => "preflight",
            exit::UNKNOWN => "cannot_tell",
            _ => match self {
                CommandError::Generate(_) => "generate",
                CommandError::Reconcile(_) => "cluster",
                CommandError::Agent(_) => "agent",
                _ => "failed",
            },
        }
    }
}

impl From<ClusterError> for CommandError {
    fn from(e: ClusterError) -> Self {
        CommandError::Reconcile(e.into())
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
        Command::Restart(a) => cluster::restart(&a),
        Command::Run(a) => agent::run(&a),
        Command::Reconcile(a) => cluster::reconcile(&a),
        Command::Rotate(a) => cluster::rotate(&a),
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

    #[test]
    fn each_failure_maps_to_its_documented_exit_code() {
        let locked: CommandError = ClusterError::Locked("held by x".into()).into();
        assert_eq!(locked.exit_code(), exit::LOCKED);
        let pre = CommandError::Reconcile(ReconcileError::Preflight("pod not Ready".into()));
        assert_eq!(pre.exit_code(), exit::PREFLIGHT);
        let pre_restart = CommandError::Reconcile(ReconcileError::Restart(
            RestartError::Preflight("mid-rollout".into()),
        ));
        assert_eq!(pre_restart.exit_code(), exit::PREFLIGHT);
        assert_eq!(
            CommandError::CannotTell("x: cannot read".into()).exit_code(),
            exit::UNKNOWN
        );
        let timeout = CommandError::Reconcile(ReconcileError::Restart(RestartError::Timeout {
            what: "x".into(),
            secs: 1,
        }));
        assert_eq!(timeout.exit_code(), exit::FAILED);
        assert_eq!(locked.label(), "locked");
        assert_eq!(timeout.label(), "cluster");
    }
}
