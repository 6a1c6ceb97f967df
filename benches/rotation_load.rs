//! Rotations under load on real redis-server/redis-sentinel processes (1 primary, 2 replicas,
//! 3 sentinels, TLS only, kubelet-like Secret volumes) and TMM-like load: per TMM pod a
//! long-lived client (~100 `SET`s a second, each followed by a `GET` of an earlier acked key,
//! and a `PUBLISH` every tenth), a client connecting per request (a fresh mTLS handshake with
//! the pod's mount each time, 20 a second), and a subscriber; one retry each. One table:
//!
//!   cargo bench --bench rotation_load
//!
//! First through Kubernetes: the real binary against the test cluster, whose dSSM pods are the
//! processes and whose TMM pods are the clients (testkit/src/dssm_pods.rs): (a) `rotate`,
//! (b) `rotate --ca` from seed-made materials, both `--strategy rolling`, (c) `rotate --ca
//! --strategy scale-to-zero`, the seeds' procedure (a contrast: it must show failures and
//! losses, else the judge is broken), and the soak: a year of renewals (twelve `rotate` and one
//! `rotate --ca`, default keys and strategy) then the primary killed with one sentinel down.
//! Then the Redis side driven directly: (a) leaf renewal under the same CA, (b) three-phase CA
//! rotation from seed-made materials, both rolled the Redis-aware way (DB hot reload, sentinels
//! one at a time behind CKQUORUM), and (a) again with subPath mounts (replicas restarted one at
//! a time, primary switched over), also on IPv6; (c) for contrast, new CA + leaf with every
//! process restarted at once; the paused switchover of the primary on its own, also with a
//! frozen replica (aborted inside the pause) and with a sentinel gone silent; what the sentinels
//! know after a leaf renewal, with and without the resets after each sentinel restart, and the
//! failover with one sentinel down.
//!
//! Every process of the Redis-side rows has a loopback IP of its own, a new one when recreated,
//! and a fresh config then (a sentinel: a new ID), as pods of StatefulSets without volumes.

use testkit as support;

use support::load::{scenarios, Figures, LoadConfig};

fn row(name: &str, f: &Figures) {
    let tmm = f
        .fewest_tmm_ready
        .map_or("-".to_string(), |n| n.to_string());
    println!(
        "{name:<46} {:>6} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5.2} {:>5.2} {:>3} {:>3} {:>3} {:>4} {:>4} {:>4} {:>4}",
        f.ops,
        f.failed_after_retry,
        f.retried,
        f.lost,
        f.stale_reads,
        f.published,
        f.pubsub_missed,
        f.longest_gap.as_secs_f64(),
        f.longest_gap_per_request.as_secs_f64(),
        f.min_dbs_up,
        f.min_sentinels_up,
        tmm,
        f.tmm_pods,
        f.sentinel_starts,
        f.db_starts,
        f.db_reloads,
    );
    if f.longest_gap.as_secs_f64() > 1.0 {
        println!("    longest gap ended with {}", f.longest_gap_at);
    }
    for why in f.failures.iter().take(2) {
        println!("    failed: {}", why.chars().take(300).collect::<String>());
    }
}

fn header() {
    println!(
        "{:<46} {:>6} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>3} {:>3} {:>3} {:>4} {:>4} {:>4} {:>4}",
        "scenario",
        "ops",
        "fail*",
        "retry",
        "lost",
        "stale",
        "pub",
        "miss",
        "gap s",
        "gap r",
        "DB",
        "sen",
        "TMM",
        "tmm+",
        "sen+",
        "db+",
        "rld"
    );
}

/// A contrast row must show the damage, else the judge is broken.
fn assert_damage(name: &str, f: &Figures) {
    assert!(
        f.failed_after_retry > 0 && f.lost > 0,
        "the judge is broken: {name} shows no failed operation or no lost write: {f:?}"
    );
}

fn knows(r: &scenarios::Resilience) -> String {
    let knows: Vec<String> = r
        .knows
        .iter()
        .map(|(s, peers, replicas, healthy)| {
            format!("{s} knows {peers} sentinels, {replicas} replicas ({healthy} healthy)")
        })
        .collect();
    format!(
        "{}; primary killed with sentinel-2 down: {}",
        knows.join("; "),
        match r.failover {
            Some(t) => format!("new primary after {:.2} s", t.as_secs_f64()),
            None => format!(
                "no new primary within {} s",
                scenarios::FAILOVER_BOUND.as_secs()
            ),
        }
    )
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
    let soak = through_cluster::soak();
    assert_damage("scale-to-zero", &cluster_c.figures);
    assert_damage("everything at once", &c);
    header();
    row(
        "(a) rotate, rolling, through the cluster",
        &cluster_a.figures,
    );
    row(
        "(b) rotate --ca, rolling, through the cluster",
        &cluster_b.figures,
    );
    row(
        "(c) rotate --ca, scale-to-zero (contrast)",
        &cluster_c.figures,
    );
    row("soak: 12 rotate + 1 rotate --ca, RSA-4096", &soak.figures);
    row("(a) leaf renewal, rolling (reload + 1-by-1)", &a);
    row("(a) same, subPath mounts (restarts+switchover)", &a_sub);
    row("(a) same, subPath mounts, IPv6 (::1)", &v6);
    row("(b) CA rotation, 3 phases, rolling", &b);
    row("(c) new CA, all restarted at once (contrast)", &c);
    row("paused switchover of the primary", &s);
    row("  same, one replica frozen (aborted)", &frozen);
    row("  same, one sentinel silent", &silent);
    row("(a) leaf renewal, sentinels reset after each", &hygiene);
    row("(a) without the resets (contrast)", &no_reset);
    println!(
        "ops: writes, reads and publishes; fail*: failed after one retry; retry: needed their retry; \
         lost: acked writes missing at the end; stale: reads without the acked value; pub/miss: \
         messages published / missed by a subscriber subscribed throughout; gap: longest time \
         a long-lived client went without an acked write (gap r: a per-request client's); DB/sen: fewest DBs/sentinels answering a readiness PING (every \
         150 ms); TMM: fewest Ready TMM pods (cluster rows); restarts as the bed counts them: \
         tmm+ TMM pods created, sen+/db+ sentinel/DB process starts, rld DB TLS reloads \
         (CONFIG SET calls, INFO commandstats, summed over processes)"
    );
    println!(
        "switchover: writes paused {:.2} s (replicas caught up after {} ms); frozen replica: {} after {:.2} s; silent sentinel: {}",
        moved.paused_for.as_secs_f64(),
        moved.caught_up_after.as_millis(),
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
    println!("after a leaf renewal with the resets: {}", knows(&kept));
    println!(
        "after a leaf renewal without (contrast): {}",
        knows(&lost_quorum)
    );
    let runs: Vec<String> = soak
        .runs
        .iter()
        .map(|(args, code, took)| {
            format!(
                "{args} {:.1} s{}",
                took.as_secs_f64(),
                if *code == 0 {
                    "".into()
                } else {
                    format!(" exit {code}")
                }
            )
        })
        .collect();
    println!(
        "soak: {:.0} s in all; {}",
        soak.took.as_secs_f64(),
        runs.join(", ")
    );
    println!("after the soak: {}", knows(&soak.resilience));
    if !soak.out.is_empty() {
        println!("soak stopped: {}", soak.out);
    }
}
