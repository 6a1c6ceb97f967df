//! Watches, served from the bounded event history like the API server's watch cache: initial
//! events, bookmarks, 410 Gone for a resourceVersion older than the history holds, and streams
//! that end (timeoutSeconds, `State::end_watches`) or break (`WatchFault`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use crate::faults::WatchFault;
use crate::logic::{fields_match, labels_match, Req};
use crate::routes::{reason_of, Body, Parsed};
use crate::store::res_key;
use crate::Shared;

/// The Status an ERROR watch event carries. For 410 it is the watch cache's answer to a
/// resourceVersion older than it holds: `errors.NewResourceExpired("too old resource version:
/// %d (%d)")` (staging/src/k8s.io/apiserver/pkg/storage/cacher/watch_cache.go,
/// getAllEventsSinceLocked), reason Expired, code 410, sent as a single ERROR event on a 200
/// stream that then ends (cacher.go newErrWatcher).
fn error_status(code: u16, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason_of(code), "code": code})
}

fn line(t: &str, o: &Value) -> Bytes {
    let mut s = serde_json::to_vec(&json!({"type": t, "object": o})).unwrap();
    s.push(b'\n');
    Bytes::from(s)
}

pub(crate) fn watch(
    shared: Arc<Shared>,
    p: &Parsed,
    q: &HashMap<String, String>,
    labels: Vec<Req>,
    fields: Vec<(String, bool, String)>,
    fault: Option<WatchFault>,
) -> Response<Body> {
    let key = res_key(p.res);
    let ns = p.ns.clone();
    let from: Option<u64> = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0);
    let explicit_initial = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let send_initial = explicit_initial || from.is_none();
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let res = p.res;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut deadline = start + timeout;
        if let Some(after) = fault.as_ref().and_then(|f| f.after) {
            deadline = deadline.min(start + after);
        }
        let max_events = fault.as_ref().and_then(|f| f.after_events);
        let mut sent = 0usize;
        let matches = |o: &Value| labels_match(&labels, o) && fields_match(&fields, o);
        // What goes out when the stream ends early: the fault's ERROR event, if it has one.
        let farewell = |cursor: u64, floor: u64| {
            fault.as_ref().and_then(|f| f.error).map(|code| {
                let msg = if code == 410 {
                    // An injected expiry: the oldest version kept is at least the cursor.
                    format!("too old resource version: {cursor} ({})", floor.max(cursor))
                } else {
                    crate::faults::message_of(code)
                };
                line("ERROR", &error_status(code, &msg))
            })
        };
        let (initial, mut cursor, epoch, expired) = {
            let s = shared.state.lock().unwrap();
            if let Some(from) = from.filter(|f| *f < s.history_floor && !send_initial) {
                let msg = format!("too old resource version: {from} ({})", s.history_floor);
                (
                    vec![line("ERROR", &error_status(410, &msg))],
                    from,
                    s.watch_epoch,
                    true,
                )
            } else {
                let mut cursor = from.unwrap_or(s.rv);
                let mut initial = Vec::new();
                if send_initial {
                    for o in s.list(res, ns.as_deref()) {
                        if matches(o) {
                            initial.push(line("ADDED", o));
                        }
                    }
                    cursor = s.rv;
                    if explicit_initial && bookmarks {
                        initial.push(line("BOOKMARK", &json!({"kind": res.kind, "apiVersion": res.api_version(),
                            "metadata": {"resourceVersion": s.rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}})));
                    }
                }
                (initial, cursor, s.watch_epoch, false)
            }
        };
        for l in initial {
            if max_events.is_some_and(|m| sent >= m) {
                break;
            }
            sent += 1;
            if tx.send(l).await.is_err() {
                return;
            }
        }
        if expired {
            return;
        }
        if max_events.is_some_and(|m| sent >= m) {
            let floor = shared.state.lock().unwrap().history_floor;
            if let Some(l) = farewell(cursor, floor) {
                let _ = tx.send(l).await;
            }
            return;
        }
        loop {
            let notified = shared.notify.notified();
            let (pending, ended, floor): (Vec<Bytes>, bool, u64) = {
                let s = shared.state.lock().unwrap();
                let out = s
                    .history
                    .iter()
                    .filter(|c| {
                        c.rv > cursor && c.res == key && ns.as_deref().is_none_or(|n| n == c.ns)
                    })
                    .filter(|c| matches(&c.obj))
                    .map(|c| line(c.kind, &c.obj))
                    .collect();
                cursor = s.rv;
                (out, s.watch_epoch != epoch, s.history_floor)
            };
            if ended {
                return;
            }
            for l in pending {
                sent += 1;
                if tx.send(l).await.is_err() {
                    return;
                }
                if max_events.is_some_and(|m| sent >= m) {
                    if let Some(l) = farewell(cursor, floor) {
                        let _ = tx.send(l).await;
                    }
                    return;
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {
                    if start + timeout > deadline {
                        if let Some(l) = farewell(cursor, floor) {
                            let _ = tx.send(l).await;
                        }
                    }
                    return;
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(StreamBody::new(stream).boxed())
        .unwrap()
}
