//! Rotations under load on real redis-server/redis-sentinel processes (1 primary, 2 replicas,
//! 3 sentinels, TLS only, kubelet-like Secret volumes), two TMM-like clients writing ~100 ops/s
//! each through the sentinels with one retry. One table:
//!
//!   cargo bench --bench rotation_load
//!
//! (a) leaf renewal under the same CA, (b) three-phase CA rotation from seed-made materials,
//! both rolled the Redis-aware way (DB hot reload, sentinels one at a time behind CKQUORUM),
//! and (a) again with subPath mounts (replicas restarted one at a time, primary switched over);
//! (c) for contrast, new CA + leaf with every process restarted at once; and the paused
//! switchover of the primary on its own.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use support::load::{scenarios, Figures, LoadConfig};

fn row(name: &str, f: &Figures) {
    println!(
        "{name:<48} {:>6} {:>6} {:>8} {:>6} {:>9.2} {:>5} {:>10}",
        f.ops,
        f.acked,
        f.failed_after_retry,
        f.lost,
        f.longest_gap.as_secs_f64(),
        f.min_dbs_up,
        f.min_sentinels_up
    );
}

fn main() {
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let cfg = LoadConfig::default();
    let a = scenarios::leaf_renewal(cfg);
    let a_sub = scenarios::leaf_renewal_mounted(cfg, true);
    let b = scenarios::ca_rotation(cfg);
    let c = scenarios::everything_at_once(cfg);
    let (s, moved) = scenarios::paused_switchover(cfg);
    println!(
        "{:<48} {:>6} {:>6} {:>8} {:>6} {:>9} {:>5} {:>10}",
        "scenario", "ops", "acked", "failed*", "lost", "gap (s)", "DBs", "sentinels"
    );
    row("(a) leaf renewal, rolling (reload + 1-by-1)", &a);
    row("(a) same, subPath mounts (restarts+switchover)", &a_sub);
    row("(b) CA rotation, 3 phases, rolling", &b);
    row("(c) new CA, everything restarted at once", &c);
    row("paused switchover of the primary", &s);
    println!(
        "* failed after one retry; DBs/sentinels: fewest answering a readiness PING (sampled every \
         150 ms); switchover paused writes {:.2} s (replicas caught up after {} ms)",
        moved.paused_for.as_secs_f64(),
        moved.caught_up_after.as_millis()
    );
}
