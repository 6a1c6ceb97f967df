//! Restarts per kind, as a run made them: TMM pods replaced, sentinel restarts, DB restarts and
//! DB reloads (`CONFIG SET` calls). The counters are the process's; a run reports the
//! difference between the counts at its end and at its start (`so_far`), so the agent's later
//! passes each report their own.

use std::sync::atomic::{AtomicU64, Ordering};

/// One kind of restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A TMM pod replaced by a new one (its data-plane connections dropped).
    TmmPod,
    SentinelRestart,
    DbRestart,
    /// One `CONFIG SET` of a DB's TLS paths (the in-place reload).
    DbReload,
}

static COUNTS: [AtomicU64; 4] = [
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
];

fn slot(kind: Kind) -> usize {
    match kind {
        Kind::TmmPod => 0,
        Kind::SentinelRestart => 1,
        Kind::DbRestart => 2,
        Kind::DbReload => 3,
    }
}

/// Counts `n` restarts of `kind`, done.
pub fn count(kind: Kind, n: u64) {
    COUNTS[slot(kind)].fetch_add(n, Ordering::Relaxed);
}

/// What the process counted so far.
pub fn so_far() -> Restarts {
    let get = |k: Kind| COUNTS[slot(k)].load(Ordering::Relaxed);
    Restarts {
        tmm_pods: get(Kind::TmmPod),
        sentinel_restarts: get(Kind::SentinelRestart),
        db_restarts: get(Kind::DbRestart),
        db_reloads: get(Kind::DbReload),
    }
}

/// Restarts per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Restarts {
    pub tmm_pods: u64,
    pub sentinel_restarts: u64,
    pub db_restarts: u64,
    pub db_reloads: u64,
}

impl Restarts {
    /// What was counted since `start` (an earlier `so_far`).
    pub fn since(start: Restarts) -> Restarts {
        let now = so_far();
        Restarts {
            tmm_pods: now.tmm_pods.saturating_sub(start.tmm_pods),
            sentinel_restarts: now
                .sentinel_restarts
                .saturating_sub(start.sentinel_restarts),
            db_restarts: now.db_restarts.saturating_sub(start.db_restarts),
            db_reloads: now.db_reloads.saturating_sub(start.db_reloads),
        }
    }
}

/// `restarts: 2 TMM pods replaced, 3 sentinel restarts, 0 DB restarts, 3 DB reloads`, the line
/// a run ends with and its last Event carries.
impl std::fmt::Display for Restarts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "restarts: {} TMM pods replaced, {} sentinel restarts, {} DB restarts, {} DB reloads",
            self.tmm_pods, self.sentinel_restarts, self.db_restarts, self.db_reloads
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_reports_only_what_it_counted_since_it_started() {
        let start = so_far();
        count(Kind::SentinelRestart, 3);
        count(Kind::DbReload, 2);
        let r = Restarts::since(start);
        // Other tests of this process may count too: at least ours.
        assert!(r.sentinel_restarts >= 3 && r.db_reloads >= 2, "{r}");
        let line = Restarts {
            tmm_pods: 2,
            sentinel_restarts: 3,
            db_restarts: 0,
            db_reloads: 3,
        }
        .to_string();
        assert_eq!(
            line,
            "restarts: 2 TMM pods replaced, 3 sentinel restarts, 0 DB restarts, 3 DB reloads"
        );
    }
}
