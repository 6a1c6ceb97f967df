//! `run`: the long-running agent (metrics, Events, reconcile on a timer or in a window).

use crate::restart::Restarter;
use std::sync::Arc;
use std::time::Duration;

use super::{change, log, runtime, CommandError};
use crate::agent::{self, MaintenanceWindow};
use crate::cli::RunArgs;
use crate::cluster::{Cluster, ClusterError};
use crate::exit;
use crate::inspect::Thresholds;

pub fn run(a: &RunArgs) -> Result<i32, CommandError> {
    let window = a
        .maintenance_window
        .as_deref()
        .map(MaintenanceWindow::parse)
        .transpose()?;
    let thresholds = Thresholds {
        warn: a.warn,
        critical: a.critical,
    };
    let ip = std::env::var(agent::LISTEN_IP_ENV).ok();
    let listen = agent::listen_addr(a.listen, ip.as_deref())?;
    runtime()?.block_on(async {
        let cluster = Arc::new(Cluster::connect(&a.cluster.settings()).await?);
        let opts = agent::Options {
            listen,
            interval: Duration::from_secs(a.interval.max(1) as u64),
            window,
            reconcile: change::options(
                &cluster,
                &a.issue,
                false,
                Some(a.restart.options()),
                change::policy(&a.issue, false, false),
                Some(thresholds),
            ),
            thresholds,
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        // A window's reconcile in flight is stopped at its next safe point, as the one-shot
        // commands are: never between a namespace's two Secrets, never mid-switchover.
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            crate::stop::request();
            crate::stop::at_safe_point().await;
        };
        // A restart whose holder died is an orphan: TMM goes back to its count first. In the
        // background: waiting out a dead holder's Lease must not delay /metrics.
        let at_start = cluster.clone();
        tokio::spawn(async move { recover_orphan(&at_start, "at start", None).await });
        // On SIGTERM the agent stops; a reconcile in flight is dropped at that safe point, and
        // TMM restored by whoever holds the Lease (us, or nobody any more: then we take it).
        agent::run(cluster.clone(), opts, stop).await?;
        if cluster.holds_lease().await {
            if let Ok(Some(n)) = Restarter::new(&cluster).restore_tmm().await {
                log::notice(&format!("restored TMM to {n} replicas before exiting"));
            }
        } else {
            // Bounded: the shutdown must fit the pod's grace period.
            recover_orphan(&cluster, "before exiting", Some(Duration::from_secs(10))).await;
        }
        Ok(exit::OK)
    })
}

/// Restores TMM from a restart record whose holder is gone; says what it did.
async fn recover_orphan(cluster: &Cluster, when: &str, limit: Option<Duration>) {
    let limit = limit.unwrap_or(Duration::MAX);
    match tokio::time::timeout(
        limit,
        Restarter::new(cluster)
            .recover_orphan(crate::cluster::lease::HolderCheck::WatchOneDuration),
    )
    .await
    {
        Ok(Ok(Some(n))) => log::notice(&format!(
            "restored TMM to {n} replicas {when} (an orphaned restart)"
        )),
        Ok(Ok(None)) => {}
        Ok(Err(ClusterError::Locked(m))) => {
            tracing::info!(%m, "a restart is in progress elsewhere")
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "could not recover an orphaned restart"),
        Err(_) => tracing::warn!("recovering an orphaned restart took too long; the next run will"),
    }
}
