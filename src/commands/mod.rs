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
            | RestartError::Rollout(_)
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
            E::Reconcile(R::Cluster(cluster_locked!()))
            | E::Reconcile(R::Restart(RestartError::Cluster(cluster_locked!()))) => exit::LOCKED,
            E::Reconcile(
                R::Preflight(_) | R::PhasePreflight { .. } | R::Restart(RestartError::Preflight(_)),
            ) => exit::PREFLIGHT,
            E::CannotTell(_) => exit::UNKNOWN,
            E::Generate(generate_failed!())
            | E::Reconcile(
                R::Cluster(cluster_failed!())
                | R::Generate(generate_failed!())
                | R::Restart(restart_failed!())
                | R::Refused(_)
                | R::NeedsLease
                | R::KeptConflicting { .. },
            )
            | E::Agent(AgentError::Window(..) | AgentError::Listen(..) | AgentError::ListenIp(_))
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
            (_, CommandError::Reconcile(_)) => "cluster",
            (_, CommandError::Agent(_)) => "agent",
            (_, CommandError::Failed(_)) => "failed",
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
    use std::path::PathBuf;

    fn api(verb: &'static str) -> ClusterError {
        ClusterError::Unreachable {
            verb,
            what: "secret spk-utilities/dssm-certs-secret".into(),
            detail: "connection refused".into(),
            attempts: 5,
        }
    }

    /// Each kind of failure, as a command returns it, and the exit code the README documents
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
            (R::KeptConflicting { attempts: 3 }.into(), exit::FAILED),
            (
                GenerateError::NotADirectory {
                    path: PathBuf::from("out"),
                }
                .into(),
                exit::FAILED,
            ),
            (AgentError::ListenIp("nope".into()).into(), exit::FAILED),
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

    /// The codes the table expects are the ones the README's "All exit codes" lists.
    #[test]
    fn the_readme_lists_every_exit_code() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("### All exit codes")
            .nth(1)
            .and_then(|s| s.split("\n### ").next())
            .expect("README has an \"All exit codes\" section");
        for (_, code) in table() {
            assert!(
                section.contains(&format!("{code} ")),
                "exit {code} not in: {section}"
            );
        }
    }
}
