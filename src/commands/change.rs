//! `reconcile`, `rotate` and `restart`: the commands that change the cluster. Each holds the
//! Lease while it writes, and on SIGTERM/SIGINT gives TMM back its replicas and releases the
//! Lease before exiting.

use super::{log, runtime, Changing, CommandError, Stopped};
use crate::cli::{IssueArgs, ReconcileArgs, RestartArgs, RotateArgs};
use crate::cluster::Cluster;
use crate::inspect::Thresholds;
use crate::plan::Policy;
use crate::reconcile;
use crate::restart::Restarter;
use crate::{contract, exit, generate};

pub fn reconcile(a: &ReconcileArgs) -> Result<i32, CommandError> {
    let policy = policy(&a.issue, false, false);
    let restart = (!a.no_restart).then(|| a.restart.options());
    let command = Changing::Reconcile;
    write(&a.cluster, &a.issue, a.dry_run, restart, policy, command)
}

pub fn rotate(a: &RotateArgs) -> Result<i32, CommandError> {
    let policy = policy(&a.issue, true, a.ca);
    let restart = (!a.no_restart).then(|| a.restart.options());
    write(
        &a.cluster,
        &a.issue,
        a.dry_run,
        restart,
        policy,
        Changing::Rotate,
    )
}

pub fn restart(a: &RestartArgs) -> Result<i32, CommandError> {
    runtime()?.block_on(async {
        let cluster = Cluster::connect(&a.cluster.settings()).await?;
        // `restart` is run to end a restart that may be holding TMM down: wait out a holder
        // that looks alive rather than giving up at once.
        let lease = cluster
            .acquire_lease_waiting(crate::cluster::lease::HolderCheck::WatchOneDuration)
            .await?;
        let mut out = std::io::stdout();
        let opts = a.restart.options();
        let restarter = Restarter::new(&cluster);
        let work = lease.guard(restarter.restart(&opts, &mut out));
        let r = until_sigterm(&cluster, work, Changing::Restart).await;
        lease.release().await;
        r?.map_err(CommandError::Restart)
    })?;
    Ok(exit::OK)
}

/// Another run holds the Lease: nothing of this run failed.
fn locked(e: &reconcile::ReconcileError) -> bool {
    matches!(
        e,
        reconcile::ReconcileError::Cluster(crate::cluster::ClusterError::Locked(_))
    )
}

/// The renewal policy the flags ask for; `rotate` forces the leaf (and with `--ca`, the CA).
pub fn policy(issue: &IssueArgs, force_leaf: bool, force_ca: bool) -> Policy {
    Policy {
        renew_before: issue.renew_before,
        ca_renew_before: issue.ca_renew_before,
        leaf_days: issue.material.days,
        force_leaf,
        force_ca,
    }
}

fn write(
    args: &crate::cli::ClusterArgs,
    issue: &IssueArgs,
    dry_run: bool,
    restart: Option<crate::restart::Options>,
    policy: Policy,
    command: Changing,
) -> Result<i32, CommandError> {
    runtime()?.block_on(async {
        let cluster = Cluster::connect(&args.settings()).await?;
        let opts = options(&cluster, issue, dry_run, restart, policy, None);
        let mut out = std::io::stdout();
        let work = reconcile::reconcile(&cluster, &opts, &mut out);
        let r = until_sigterm(&cluster, work, command).await?;
        if let Err(e) = &r {
            if !dry_run && !locked(e) {
                cluster.rotation_failed(&e.to_string()).await;
            }
        }
        r.map_err(CommandError::from)
    })?;
    Ok(exit::OK)
}

/// What a reconcile needs besides the cluster, from the flags. `thresholds` are the agent's
/// `--warn`/`--critical` (for its expiry Events); the one-shot commands use the defaults.
pub fn options(
    cluster: &Cluster,
    issue: &IssueArgs,
    dry_run: bool,
    restart: Option<crate::restart::Options>,
    policy: Policy,
    thresholds: Option<Thresholds>,
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
        thresholds: thresholds.unwrap_or_default(),
        restart,
    }
}

/// Runs `work`; on SIGTERM or SIGINT drops it and restores TMM before returning, so that TMM is
/// never left at zero by a stopped Job. `Err` is the signal's outcome, in `command`'s terms.
async fn until_sigterm<T, E>(
    cluster: &Cluster,
    work: impl std::future::Future<Output = Result<T, E>>,
    command: Changing,
) -> Result<Result<T, E>, CommandError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler can be installed");
    crate::stop::clear();
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => return Ok(r),
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // A dSSM roll mid-step (a paused switchover) finishes that step and starts no other; the
    // work is dropped at that safe point.
    crate::stop::request();
    log::notice("signal received: stopping at the next safe point");
    match crate::stop::work_or_safe_point(&mut work).await {
        Some(r) => Ok(r),
        None => Err(stop(cluster, command).await),
    }
}

/// Gives TMM back its replicas and releases the Lease if this process holds it; says what it
/// found, as the command's error.
async fn stop(cluster: &Cluster, command: Changing) -> CommandError {
    if !cluster.holds_lease().await {
        log::notice(
            "signal received: this process does not hold the lease, so it leaves TMM to the holder",
        );
        let stopped = Stopped::NotHolder;
        return CommandError::Interrupted { command, stopped };
    }
    log::notice("signal received: restoring TMM before exiting");
    let restored = Restarter::new(cluster).restore_tmm().await;
    // Released even when the restore failed: the next run restores from the record at once
    // instead of waiting out the Lease.
    cluster.release_lease().await;
    match restored {
        Ok(pods) => CommandError::Interrupted {
            command,
            stopped: Stopped::Restored(pods),
        },
        Err(source) => CommandError::InterruptedRestoreFailed { command, source },
    }
}
