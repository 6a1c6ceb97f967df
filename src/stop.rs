//! A stop asked for by a signal or a lost Lease, honoured at the next safe point: a step of the
//! dSSM roll (a reload, a restart and its gate, the paused switchover) is never cut in the
//! middle, where clients could stay paused or a primary half handed over. The roll marks each
//! step `busy`; whoever stops waits `at_safe_point`, and the roll starts no step once a stop is
//! `requested`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);
static BUSY: AtomicUsize = AtomicUsize::new(0);
static HONOURED: AtomicBool = AtomicBool::new(false);

/// Asks every roll of this process to start no further step.
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Forgets a stop asked for earlier (a long-running agent starts a new pass).
pub fn clear() {
    REQUESTED.store(false, Ordering::SeqCst);
    HONOURED.store(false, Ordering::SeqCst);
}

/// Whether a stop was asked for: a roll checks it before each step.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Said by a roll that stops for the stop asked for, before it returns.
pub fn honour() {
    HONOURED.store(true, Ordering::SeqCst);
}

/// Whether a roll stopped for the stop asked for: the work then ends with that roll's error,
/// which is the stop's outcome, not a failure (it may end before `at_safe_point` is polled
/// again).
pub fn honoured() -> bool {
    HONOURED.load(Ordering::SeqCst)
}

/// Runs `work` to its end unless a stop asked for takes it first: None once no step is in
/// progress, or when a roll ended the work because it stopped for it (the roll's thread can end
/// between two polls of `at_safe_point`; its "not started" error is then the stop, not a
/// failed step).
pub async fn work_or_safe_point<T, E>(
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Option<Result<T, E>> {
    tokio::pin!(work);
    tokio::select! {
        biased;
        () = at_safe_point() => None,
        r = &mut work => match r {
            Err(_) if honoured() => None,
            r => Some(r),
        },
    }
}

/// A step in progress, until dropped.
#[must_use]
pub struct Busy(());

/// Marks a step in progress until the returned guard is dropped.
pub fn busy() -> Busy {
    BUSY.fetch_add(1, Ordering::SeqCst);
    Busy(())
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Resolves once no step is in progress (at once when none is). Polls: steps last seconds and
/// run on blocking threads.
pub async fn at_safe_point() {
    while BUSY.load(Ordering::SeqCst) > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_safe_point_is_reached_once_every_step_in_progress_ended() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let step = busy();
        let waited = rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_millis(100), at_safe_point()).await
        });
        assert!(waited.is_err(), "a safe point inside a step");
        drop(step);
        rt.block_on(at_safe_point());
        assert!(!honoured());
        request();
        assert!(requested());
        honour();
        assert!(honoured());
        clear();
        assert!(!requested());
        assert!(!honoured());
    }
}
