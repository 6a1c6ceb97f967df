//! Fault injection: answers a request with an error status or after a delay, and ends or breaks
//! watch streams mid-way, so the tests can prove what the program does when the API server
//! misbehaves as real ones do (overload, restarts, compaction).

use std::time::{Duration, Instant};

use crate::store::State;

/// A fault: for the `nth` (1-based) request whose method matches and whose path contains
/// `path_contains`, answer `status` (or wait `delay` first, then serve it normally).
#[derive(Debug, Clone)]
pub struct Fault {
    pub method: String,
    pub path_contains: String,
    pub nth: usize,
    pub times: usize,
    pub status: Option<u16>,
    pub delay: Option<Duration>,
    /// An outage: every request (any method, any path) is answered `status` until then.
    pub until: Option<Instant>,
    seen: usize,
}

impl Fault {
    /// An API outage of `lasting` from now: every request is answered 503, as a kube-apiserver
    /// behind a load balancer with no healthy backend is. Add it with `ApiServer::add_fault`
    /// after `State::end_watches`, so that open watches end as the connections would.
    pub fn outage(lasting: Duration) -> Self {
        Fault {
            until: Some(Instant::now() + lasting),
            ..Fault::status("", "", 1, 503)
        }
    }

    pub fn status(method: &str, path_contains: &str, nth: usize, status: u16) -> Self {
        Fault {
            method: method.into(),
            path_contains: path_contains.into(),
            nth,
            times: 1,
            status: Some(status),
            delay: None,
            until: None,
            seen: 0,
        }
    }
    pub fn delay(method: &str, path_contains: &str, nth: usize, delay: Duration) -> Self {
        Fault {
            method: method.into(),
            path_contains: path_contains.into(),
            nth,
            times: 1,
            status: None,
            delay: Some(delay),
            until: None,
            seen: 0,
        }
    }
    /// Applies to `times` consecutive matching requests from the nth on.
    pub fn repeat(mut self, times: usize) -> Self {
        self.times = times;
        self
    }
}

/// A broken watch: the `nth` (1-based) watch request whose path contains `path_contains` ends
/// after `after_events` events (the initial ones included) or after `after`, whichever comes
/// first; with `error`, an ERROR event carrying a Status of that code goes out just before the
/// end (410 is answered as reason Expired, like the watch cache's "too old resource version").
#[derive(Debug, Clone)]
pub struct WatchFault {
    pub path_contains: String,
    pub nth: usize,
    pub times: usize,
    pub after_events: Option<usize>,
    pub after: Option<Duration>,
    pub error: Option<u16>,
    seen: usize,
}

impl WatchFault {
    fn new(path_contains: &str) -> Self {
        WatchFault {
            path_contains: path_contains.into(),
            nth: 1,
            times: 1,
            after_events: None,
            after: None,
            error: None,
            seen: 0,
        }
    }
    /// The stream ends cleanly after `n` events.
    pub fn end_after_events(path_contains: &str, n: usize) -> Self {
        WatchFault {
            after_events: Some(n),
            ..Self::new(path_contains)
        }
    }
    /// The stream ends cleanly after `d`.
    pub fn end_after(path_contains: &str, d: Duration) -> Self {
        WatchFault {
            after: Some(d),
            ..Self::new(path_contains)
        }
    }
    /// The watch is answered at once with an ERROR event of 410 Gone (reason Expired), whatever
    /// resourceVersion it asked for.
    pub fn gone(path_contains: &str) -> Self {
        Self::end_after_events(path_contains, 0).with_error(410)
    }
    /// Send an ERROR event with a Status of `code` before ending.
    pub fn with_error(mut self, code: u16) -> Self {
        self.error = Some(code);
        self
    }
    /// The fault hits the nth matching watch (1-based).
    pub fn nth(mut self, nth: usize) -> Self {
        self.nth = nth;
        self
    }
    /// The fault hits `times` consecutive matching watches from the nth on.
    pub fn repeat(mut self, times: usize) -> Self {
        self.times = times;
        self
    }
}

/// The request fault that hits this request, if any: (status to answer, delay before).
pub(crate) fn request_fault(
    s: &mut State,
    method: &str,
    path: &str,
) -> Option<(Option<u16>, Option<Duration>)> {
    for f in s.faults.iter_mut() {
        if let Some(until) = f.until {
            if Instant::now() < until {
                return Some((f.status, None));
            }
            continue;
        }
        if f.method == method && path.contains(&f.path_contains) {
            f.seen += 1;
            if f.seen >= f.nth && f.seen < f.nth + f.times {
                return Some((f.status, f.delay));
            }
        }
    }
    None
}

/// The watch fault that hits this watch request, if any.
pub(crate) fn watch_fault(s: &mut State, path: &str) -> Option<WatchFault> {
    for f in s.watch_faults.iter_mut() {
        if path.contains(&f.path_contains) {
            f.seen += 1;
            if f.seen >= f.nth && f.seen < f.nth + f.times {
                return Some(f.clone());
            }
        }
    }
    None
}

/// The message an injected error status carries.
pub(crate) fn message_of(code: u16) -> String {
    match code {
        410 => "injected: too old resource version".to_string(),
        429 => "Too many requests, please try again later.".to_string(),
        500 => "Internal error occurred: injected fault".to_string(),
        503 => "the server is currently unable to handle the request".to_string(),
        c => format!("injected fault {c}"),
    }
}
