//! One actor at a time, with client-go's leader-election semantics: a Lease that looks expired
//! by our clock is watched for a lease duration before it is taken; a live holder is never
//! displaced whatever the clocks say; a create whose answer was lost is resolved by reading
//! back; a holder that loses its Lease stops acting and does not release what is not its own.

use testkit as support;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use support::apiserver::Fault;
use support::*;

const NS: &str = "spk-utilities";

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// A Lease held by `holder`, last renewed `ago` before now by our clock.
fn put_lease(env: &TestEnv, holder: &str, ago: Duration, duration_s: i64) {
    let at = rfc3339(time::OffsetDateTime::now_utc() - ago);
    env.server.put(
        "coordination.k8s.io",
        "leases",
        NS,
        json!({
            "metadata": {"name": "dssm-certs"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration_s,
                     "acquireTime": at, "renewTime": at, "leaseTransitions": 3},
        }),
    );
}

fn lease(env: &TestEnv) -> serde_json::Value {
    env.server
        .get("coordination.k8s.io", "leases", NS, "dssm-certs")
        .expect("the lease exists")
}

/// `dssm-certs ARGS` against the test cluster as POD_NAME `identity`.
fn command(env: &TestEnv, identity: &str, args: &[&str]) -> Command {
    let mut cmd = bin_without_redis();
    cmd.env("KUBECONFIG", &env.kubeconfig)
        .env("HOME", env.dir.path())
        .env("POD_NAME", identity)
        .args(args)
        .args([
            "--dssm-namespace",
            &env.dssm_ns,
            "--tmm-namespace",
            &env.tmm_ns,
        ]);
    cmd
}

fn secret_writes(env: &TestEnv) -> usize {
    env.writes()
        .iter()
        .filter(|w| w.path.contains("/secrets"))
        .count()
}

const RECONCILE: [&str; 5] = [
    "reconcile",
    "--key-algorithm",
    "ecdsa-p256",
    "--dhparam",
    "ffdhe2048",
];

/// A holder whose clock runs 30 s behind keeps renewing: its renewTime always looks older than
/// the 4 s lease duration by our clock. Comparing renewTime with our clock took the Lease from a
/// live holder; watching it for a lease duration sees it renewed, so we never act.
#[test]
fn a_live_holder_with_a_slow_clock_is_never_displaced() {
    let env = TestEnv::spk();
    put_lease(&env, "slow-clock-pod", Duration::from_secs(30), 4);
    env.server.clear_requests();
    let stop = AtomicBool::new(false);
    let (code, out, err) = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(500));
                let mut l = lease(&env);
                l["spec"]["renewTime"] = json!(rfc3339(
                    time::OffsetDateTime::now_utc() - Duration::from_secs(30)
                ));
                env.server.put("coordination.k8s.io", "leases", NS, l);
            }
        });
        // The default --max-clock-skew (60 s) covers clocks 30 s apart.
        let args = [&RECONCILE[..], &["--lease-duration", "4s"]].concat();
        let r = output(&mut command(&env, "us", &args));
        stop.store(true, Ordering::SeqCst);
        r
    });
    assert_eq!(code, 5, "{out}{err}");
    assert!(err.contains("held by \"slow-clock-pod\""), "{err}");
    assert_eq!(secret_writes(&env), 0, "{:?}", env.writes());
    assert_eq!(lease(&env)["spec"]["holderIdentity"], "slow-clock-pod");
}

/// The same Lease with nobody renewing it: a dead holder. It is taken after one lease duration
/// of watching, by a process with another identity, which then does the work.
#[test]
fn a_dead_holders_lease_is_taken_after_one_lease_duration_on_our_clock() {
    let env = TestEnv::spk();
    put_lease(&env, "dead-pod", Duration::from_secs(20), 4);
    let started = Instant::now();
    let args = [
        &RECONCILE[..],
        &["--lease-duration", "4s", "--max-clock-skew", "30s"],
    ]
    .concat();
    let (code, out, err) = output(&mut command(&env, "us", &args));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "watched for a whole lease duration first"
    );
    assert!(out.contains("plan: publish"), "{out}");
    assert!(secret_writes(&env) > 0);
    let l = lease(&env);
    assert!(l["spec"]["holderIdentity"].is_null(), "released: {l}");
    assert_eq!(l["spec"]["leaseTransitions"], 4, "one transition: {l}");
}

/// A renewal older than the duration plus the allowed clock skew is expired whatever the
/// clocks: taken at once, without a lease duration of watching.
#[test]
fn a_lease_older_than_duration_plus_skew_is_taken_at_once() {
    let env = TestEnv::spk();
    put_lease(&env, "crashed-an-hour-ago", Duration::from_secs(3600), 120);
    let (code, out, err) = output(&mut command(&env, "us", &RECONCILE));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("plan: publish"), "{out}");
}

/// The create of the Lease was stored, but its answer was lost (a timeout) and our retry got
/// 409 AlreadyExists. That used to lock the creator out ("just taken by another", exit 5); the
/// Lease is read back and is ours.
#[test]
fn a_lease_create_whose_answer_was_lost_is_ours_after_reading_it_back() {
    let env = TestEnv::spk();
    env.server
        .add_fault(Fault::delay("POST", "/leases", 1, Duration::from_millis(1500)).repeat(2));
    let args = [&RECONCILE[..], &["--api-timeout", "1s"]].concat();
    let (code, out, err) = output(&mut command(&env, "us", &args));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("plan: publish"), "{out}");
    let posts = env
        .server
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.contains("/leases"))
        .count();
    assert!(posts >= 2, "the create was retried ({posts}): {out}{err}");
}

/// While a rotation restarts the pods, another process takes the Lease over. The holder stops
/// acting at its next renewal and does not "release" a Lease that is no longer its own (release
/// used to clear whatever holder it found).
#[test]
fn a_holder_that_loses_its_lease_stops_and_leaves_the_new_holders_lease_alone() {
    let env = TestEnv::spk();
    // Published first: a first publication restarts nothing, a rotation restarts the pods.
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    env.server.with_state(|s| {
        s.timing.pod_grace = Duration::from_millis(1500);
        s.timing.pod_start = Duration::from_millis(1500);
    });
    let mut args = [&RECONCILE[..], &["--lease-duration", "3s"]].concat();
    args[0] = "rotate";
    let child = command(&env, "us", &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    env.server
        .wait_until("our lease", Duration::from_secs(30), |s| {
            s.get(
                support::apiserver::resource("coordination.k8s.io", "leases"),
                NS,
                "dssm-certs",
            )
            .is_some_and(|l| l["spec"]["holderIdentity"] == "us")
        });
    let mut l = lease(&env);
    l["spec"]["holderIdentity"] = json!("intruder");
    l["spec"]["renewTime"] = json!(rfc3339(time::OffsetDateTime::now_utc()));
    env.server.put("coordination.k8s.io", "leases", NS, l);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("could not be renewed within its renew deadline (or was taken over)"),
        "{err}"
    );
    assert_eq!(
        lease(&env)["spec"]["holderIdentity"],
        "intruder",
        "not released by us"
    );
}

/// A process that does not hold the Lease (here: one still watching another holder's Lease)
/// gets SIGTERM while that holder has TMM scaled to 0. It used to "restore" TMM in the middle of
/// the other's restart; only the holder may.
#[test]
fn sigterm_in_a_process_without_the_lease_never_touches_tmm() {
    let env = TestEnv::spk();
    put_lease(&env, "restarting-pod", Duration::from_secs(20), 30);
    let mut d = env
        .server
        .get("apps", "deployments", "spk-ingress", "f5-tmm")
        .unwrap();
    d["metadata"]["annotations"] = json!({"dssm-certs.f5.com/tmm-replicas": "3"});
    d["spec"]["replicas"] = json!(0);
    env.server.put("apps", "deployments", "spk-ingress", d);
    env.server.clear_requests();
    let args = [
        &RECONCILE[..],
        &["--lease-duration", "30s", "--max-clock-skew", "30s"],
    ]
    .concat();
    let child = command(&env, "bystander", &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It is watching the Lease now (a GET of it), not acting.
    env.server
        .wait_until("the lease read", Duration::from_secs(30), |s| {
            s.requests
                .iter()
                .any(|r| r.method == "GET" && r.path.contains("/leases"))
        });
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not hold the lease"), "{err}");
    let d = env
        .server
        .get("apps", "deployments", "spk-ingress", "f5-tmm")
        .unwrap();
    assert_eq!(d["spec"]["replicas"], 0, "left to the holder: {d}");
    assert!(
        env.writes().iter().all(|w| w.path.contains("/events")),
        "{:?}",
        env.writes()
    );
}

/// Runs `rotate` as `identity` and kills it (-9) once TMM is at zero with its count recorded:
/// a holder dead mid-restart, its Lease left behind.
fn kill_holder_with_tmm_at_zero(env: &TestEnv, identity: &str) {
    env.server.with_state(|s| {
        s.timing.pod_grace = Duration::from_millis(1500);
    });
    let args = [
        "rotate",
        "--key-algorithm",
        "ecdsa-p256",
        "--lease-duration",
        "3s",
        "--max-clock-skew",
        "1s",
    ];
    let mut child = command(env, identity, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    env.server
        .wait_until("TMM at zero", Duration::from_secs(60), |s| {
            s.get(
                support::apiserver::resource("apps", "deployments"),
                "spk-ingress",
                "f5-tmm",
            )
            .is_some_and(|d| {
                d["spec"]["replicas"] == 0
                    && d["metadata"]["annotations"]["dssm-certs.f5.com/tmm-replicas"] == "3"
            })
        });
    child.kill().unwrap();
    child.wait().unwrap();
    env.server.with_state(|s| {
        s.timing.pod_grace = Duration::from_millis(300);
    });
    assert_eq!(
        lease(env)["spec"]["holderIdentity"],
        identity,
        "left behind"
    );
}

fn tmm_restored(env: &TestEnv) -> bool {
    let d = env
        .server
        .get("apps", "deployments", "spk-ingress", "f5-tmm")
        .unwrap();
    d["spec"]["replicas"] == 3
        && d["metadata"]["annotations"]
            .get("dssm-certs.f5.com/tmm-replicas")
            .is_none()
}

/// The restart-safety issue: a holder killed while TMM is at 0 left its Lease, and only a run
/// with the same POD_NAME ever resumed. A run with another identity takes the Lease once it has
/// expired, restores TMM first and finishes the restart.
#[test]
fn a_dead_holders_restart_is_finished_by_another_process() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    kill_holder_with_tmm_at_zero(&env, "job-pod-a");
    let args = [
        &RECONCILE[..],
        &["--lease-duration", "3s", "--max-clock-skew", "1s"],
    ]
    .concat();
    let (code, out, err) = output(&mut command(&env, "job-pod-b", &args));
    assert_eq!(code, 0, "{out}{err}");
    assert!(tmm_restored(&env), "{out}");
    let d = env
        .server
        .get("apps", "deployments", "spk-ingress", "f5-tmm")
        .unwrap();
    assert!(
        d["metadata"]["annotations"]
            .get("dssm-certs.f5.com/restart-needed")
            .is_none(),
        "the restart was finished: {d}"
    );
}

/// The agent finds an orphaned restart at start (its holder died with TMM at 0) and restores
/// TMM once the Lease has expired, without a maintenance window and before anything else.
#[test]
fn the_agent_restores_tmm_from_an_orphaned_restart_at_start() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    kill_holder_with_tmm_at_zero(&env, "job-pod-a");
    let (child, _addr) = support::agent::spawn(
        &env,
        &env.kubeconfig,
        &[
            "--interval",
            "1h",
            "--lease-duration",
            "3s",
            "--max-clock-skew",
            "1s",
        ],
    );
    let mut child = scopeguard(child);
    support::redis::wait_for("TMM restored", Duration::from_secs(30), || {
        tmm_restored(&env).then_some(())
    });
    let _ = child.0.kill();
}

/// Kills the child when dropped (a failed assertion must not leave an agent running).
struct Guard(std::process::Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
fn scopeguard(c: std::process::Child) -> Guard {
    Guard(c)
}

/// And on its timer: an agent already running when the holder dies restores TMM once the
/// holder's Lease (3 s, as the holder wrote it) has expired.
#[test]
fn the_agent_restores_tmm_from_a_restart_orphaned_while_it_runs() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    let (child, _addr) = support::agent::spawn(&env, &env.kubeconfig, &["--interval", "1s"]);
    let _agent = scopeguard(child);
    kill_holder_with_tmm_at_zero(&env, "job-pod-a");
    support::redis::wait_for("TMM restored", Duration::from_secs(30), || {
        tmm_restored(&env).then_some(())
    });
}

/// Starts `args` as "us", waits until it holds the Lease and `also` holds, sends SIGTERM, and
/// returns its stderr once it has exited.
fn sigterm_while_holding(
    env: &TestEnv,
    args: &[&str],
    also: impl Fn(&support::apiserver::State) -> bool,
) -> String {
    let child = command(env, "us", args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    env.server
        .wait_until("our lease, mid-work", Duration::from_secs(60), |s| {
            s.get(
                support::apiserver::resource("coordination.k8s.io", "leases"),
                NS,
                "dssm-certs",
            )
            .is_some_and(|l| l["spec"]["holderIdentity"] == "us")
                && also(s)
        });
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_released(env: &TestEnv, what: &str, err: &str) {
    let l = lease(env);
    assert!(
        l["spec"]["holderIdentity"].is_null(),
        "{what}: the Lease is still held after SIGTERM: {l}\n{err}"
    );
}

// Regression: `reconcile` and `rotate` dropped their work on SIGTERM without releasing the
// Lease, so the next run (the CronJob's next Job) waited up to a lease duration (120 s).
#[test]
fn sigterm_releases_the_lease_in_reconcile_rotate_and_restart() {
    // reconcile: a first publication waiting for pods that never become Ready.
    let env = TestEnv::spk_fresh(
        support::apiserver::SecretMount::Required,
        support::apiserver::SecretMount::Required,
    );
    env.server.with_state(|s| s.never_ready.push("f5-".into()));
    let published = |s: &support::apiserver::State| {
        s.get(
            support::apiserver::resource("", "secrets"),
            "spk-ingress",
            "dssm-keys-secret",
        )
        .is_some()
    };
    let err = sigterm_while_holding(&env, &RECONCILE, published);
    assert!(err.contains("interrupted by a signal"), "{err}");
    assert_released(&env, "reconcile", &err);

    // rotate and restart: mid-restart (pods take seconds to come and go).
    for cmd in ["rotate", "restart"] {
        let env = TestEnv::spk();
        assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
        env.server.with_state(|s| {
            s.timing.pod_grace = Duration::from_secs(3);
            s.timing.pod_start = Duration::from_secs(3);
        });
        let mut args = RECONCILE.to_vec();
        args[0] = cmd;
        if cmd == "restart" {
            args.truncate(1);
        }
        let terminating = |s: &support::apiserver::State| {
            s.list(support::apiserver::resource("", "pods"), None)
                .iter()
                .any(|p| !p["metadata"]["deletionTimestamp"].is_null())
        };
        let err = sigterm_while_holding(&env, &args, terminating);
        assert!(err.contains("interrupted by a signal"), "{cmd}: {err}");
        assert_released(&env, cmd, &err);
    }
}
