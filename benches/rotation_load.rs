//! Rotations under load on real redis-server/redis-sentinel processes (1 primary, 2 replicas,
//! 3 sentinels, TLS only, kubelet-like Secret volumes), two TMM-like clients writing ~100 ops/s
//! each through the sentinels with one retry. One table:
//!
//!   cargo bench --bench rotation_load
//!
//! First through Kubernetes: the real binary against the test cluster, whose dSSM pods are the
//! processes and whose TMM pods are the clients (testkit/src/dssm_pods.rs): (a) `rotate`,
//! (b) `rotate --ca` from seed-made materials, both `--strategy rolling`, and (c) `rotate --ca
//! --strategy scale-to-zero`, the seeds' procedure. Then the Redis side driven directly:
//! (a) leaf renewal under the same CA, (b) three-phase CA rotation from seed-made materials,
//! both rolled the Redis-aware way (DB hot reload, sentinels one at a time behind CKQUORUM),
//! and (a) again with subPath mounts (replicas restarted one at a time, primary switched over);
//! (c) for contrast, new CA + leaf with every process restarted at once; and the paused
//! switchover of the primary on its own, also with a frozen replica (aborted inside the pause)
//! and with a sentinel gone silent. Then what the sentinels know after a leaf renewal, with and
//! without the resets after each sentinel restart, and the failover with one sentinel down.
//!
//! Every process of the Redis-side rows has a loopback IP of its own, a new one when recreated,
//! and a fresh config then (a sentinel: a new ID), as pods of StatefulSets without volumes.

use testkit as support;

use support::load::{scenarios, Figures, LoadConfig};

fn row(name: &str, f: &Figures) {
    println!(
        "{name:<48} {:>6} {:>6} {:>8} {:>7} {:>6} {:>9.2} {:>5} {:>10} {:>9.2}",
        f.ops,
        f.acked,
        f.failed_after_retry,
        f.retried,
        f.lost,
        f.longest_gap.as_secs_f64(),
        f.min_dbs_up,
        f.min_sentinels_up,
        f.no_ready_tmm.as_secs_f64()
    );
    for why in &f.failures {
        println!("    failed: {why}");
    }
}

fn main() {
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    use support::dssm_pods::scenarios as through_cluster;
    let cluster_a = through_cluster::leaf_renewal();
    let cluster_b = through_cluster::ca_rotation();
    let cluster_c = through_cluster::scale_to_zero();
    for (name, r) in [("a", &cluster_a), ("b", &cluster_b), ("c", &cluster_c)] {
        assert_eq!(r.code, 0, "({name}): {}", r.out);
    }
    let cfg = LoadConfig::default();
    let a = scenarios::leaf_renewal(cfg);
    let a_sub = scenarios::leaf_renewal_mounted(cfg, true);
    let b = scenarios::ca_rotation(cfg);
    let c = scenarios::everything_at_once(cfg);
    let (s, moved, _named) = scenarios::paused_switchover(cfg);
    let (frozen, frozen_r, frozen_took, _) =
        scenarios::switchover_against(cfg, Some("db-2"), false);
    let (silent, silent_r, _, _) = scenarios::switchover_against(cfg, None, true);
    let v6 = scenarios::leaf_renewal_on(cfg, true, true);
    let (hygiene, kept) = scenarios::leaf_renewal_then_failover(cfg, true);
    let (no_reset, lost_quorum) = scenarios::leaf_renewal_then_failover(cfg, false);
    println!(
        "{:<48} {:>6} {:>6} {:>8} {:>7} {:>6} {:>9} {:>5} {:>10} {:>9}",
        "scenario",
        "ops",
        "acked",
        "failed*",
        "retried",
        "lost",
        "gap (s)",
        "DBs",
        "sentinels",
        "no TMM (s)"
    );
    row(
        "(a) rotate, rolling, through the cluster",
        &cluster_a.figures,
    );
    row(
        "(b) rotate --ca, rolling, through the cluster",
        &cluster_b.figures,
    );
    row(
        "(c) rotate --ca, scale-to-zero, through cluster",
        &cluster_c.figures,
    );
    row("(a) leaf renewal, rolling (reload + 1-by-1)", &a);
    row("(a) same, subPath mounts (restarts+switchover)", &a_sub);
    row("(b) CA rotation, 3 phases, rolling", &b);
    row("(c) new CA, everything restarted at once", &c);
    row("paused switchover of the primary", &s);
    row("  same, one replica frozen (aborted)", &frozen);
    row("  same, one sentinel silent", &silent);
    row("(a) same as (a), subPath mounts, IPv6 (::1)", &v6);
    row("(a) leaf renewal, sentinels reset after each", &hygiene);
    row("(a) leaf renewal without the resets (contrast)", &no_reset);
    println!(
        "* failed after one retry; DBs/sentinels: fewest answering a readiness PING (sampled every \
         150 ms); no TMM: seconds without a Ready TMM pod (cluster rows only); switchover paused writes {:.2} s (replicas caught up after {} ms)",
        moved.paused_for.as_secs_f64(),
        moved.caught_up_after.as_millis()
    );
    println!(
        "frozen replica: {} after {:.2} s; silent sentinel: {}",
        match &frozen_r {
            Ok(_) => "moved (unexpected)".to_string(),
            Err(e) => format!("refused ({e})"),
        },
        frozen_took.as_secs_f64(),
        match &silent_r {
            Ok(m) => format!("moved, writes paused {:.2} s", m.paused_for.as_secs_f64()),
            Err(e) => format!("refused ({e})"),
        }
    );
    for (name, r) in [
        ("with the resets", &kept),
        ("without (contrast)", &lost_quorum),
    ] {
        let knows: Vec<String> = r
            .knows
            .iter()
            .map(|(s, peers, replicas, healthy)| {
                format!("{s} knows {peers} sentinels, {replicas} replicas ({healthy} healthy)")
            })
            .collect();
        println!(
            "after a leaf renewal {name}: {}; primary killed with sentinel-2 down: {}",
            knows.join("; "),
            match r.failover {
                Some(t) => format!("new primary after {:.2} s", t.as_secs_f64()),
                None => format!(
                    "no new primary within {} s",
                    scenarios::FAILOVER_BOUND.as_secs()
                ),
            }
        );
    }
}
