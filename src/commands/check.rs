//! `check`: a folder or the cluster's copies, judged; the exit code is the verdict.

use super::{runtime, CommandError};
use crate::cli::{CheckArgs, ClusterArgs, OutputFormat};
use crate::cluster::{Cluster, ClusterError};
use crate::exit;
use crate::inspect::{self, Report, Status, Thresholds};

pub fn run(a: CheckArgs) -> Result<i32, CommandError> {
    let thresholds = Thresholds {
        warn: a.warn,
        critical: a.critical,
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let report = match &a.dir {
        Some(dir) => Report::new(
            vec![inspect::inspect_dir(dir, now, thresholds)],
            now,
            thresholds,
        ),
        None => match runtime()?.block_on(cluster_report(&a.cluster, now, thresholds)) {
            Ok(r) => r,
            Err(e) => {
                // Monitoring reads stdout: JSON stays JSON, with the error in it.
                if a.output == OutputFormat::Json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({
                            "schema": inspect::SCHEMA,
                            "status": Status::Unknown,
                            "exit_code": exit::UNKNOWN,
                            "error": e.to_string(),
                        }))?
                    );
                }
                return Err(CommandError::CannotTell(e.to_string()));
            }
        },
    };
    match a.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Table => print!("{}", inspect::render_table(&report)),
    }
    Ok(report.exit_code)
}

async fn cluster_report(
    args: &ClusterArgs,
    now: i64,
    thresholds: Thresholds,
) -> Result<Report, ClusterError> {
    let cluster = Cluster::connect(&args.settings()).await?;
    let obs = cluster.observe().await?;
    Ok(inspect::inspect_observation(
        &obs,
        &cluster.dssm_ns,
        now,
        thresholds,
        inspect::KeyMatch::FromKeySecret,
    )
    .await
    .with_targets(&obs.workloads))
}
