//! Rotations through Kubernetes, proven on real processes under load: the test cluster's dSSM
//! pods are redis-server/redis-sentinel processes (1 primary, 2 replicas, 3 sentinels, TLS only,
//! kubelet-like mounts updated by the atomic `..data` swap), TMM pods are TMM-like mutual-TLS
//! clients writing through the sentinels (`support::dssm_pods`), and the real `dssm-certs`
//! binary rotates. Judged as `Figures::assert_unnoticed`: 0 failed operations after one retry,
//! 0 acknowledged writes lost, ≥ 2 DBs and ≥ 2 sentinels up at every sample, and no moment
//! without a Ready TMM pod.

mod support;

use std::time::Duration;

use support::dssm_pods::{command, finish, rotate_args, scenarios, seeded, Bed, SETTLE};
use support::load::LoadConfig;
use support::TestEnv;

/// `rotate` without --strategy (the leaf renewal scenario runs so) rolls; scale-to-zero is the
/// opt-in, and says it interrupts traffic (the contrast scenario asserts that line).
#[test]
fn rolling_is_the_default_strategy() {
    let (code, help, _) = support::output(
        support::bin()
            .env_remove("DSSM_CERTS_STRATEGY")
            .args(["rotate", "--help"]),
    );
    assert_eq!(code, 0);
    assert!(
        help.contains("[default: rolling]") && help.contains("it interrupts"),
        "{help}"
    );
}

/// Run with the default strategy: rolling.
#[test]
fn rotate_renews_the_leaf_through_the_cluster_under_load_and_nobody_notices() {
    let r = scenarios::leaf_renewal();
    let (f, b, out) = (&r.figures, &r.bed, &r.out);
    eprintln!("leaf renewal through the cluster: {f:?} {b:?}\n{out}");
    assert_eq!(r.code, 0, "{out}");
    assert!(out.contains("plan: renew-leaf"), "{out}");
    assert!(out.contains("reload TLS files in place"), "{out}");
    assert!(b.started >= 3, "the three sentinels restarted: {b:?}");
    f.assert_unnoticed("leaf renewal through the cluster");
}

#[test]
fn rotate_ca_from_seed_materials_goes_through_three_phases_under_load_and_nobody_notices() {
    let r = scenarios::ca_rotation();
    let (f, b, out, env) = (&r.figures, &r.bed, &r.out, &r.env);
    eprintln!("CA rotation through the cluster: {f:?} {b:?}\n{out}");
    assert_eq!(r.code, 0, "{out}");
    let phases: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("CA rotation phase "))
        .map(|l| l.split_whitespace().nth(3).unwrap())
        .collect();
    assert_eq!(phases, ["trust", "switch", "drop"], "{out}");
    assert!(out.contains("CA rotation complete"), "{out}");
    let after = env.copy(&env.dssm_ns).unwrap();
    let seed_ca = support::read(&env.dir.path().join("seed/dssm-ca.crt"));
    assert_ne!(after[0], seed_ca, "a new CA");
    assert_eq!(
        after,
        env.copy(&env.tmm_ns).unwrap(),
        "both namespaces hold the same materials"
    );
    let store = env.secret(&env.dssm_ns, "dssm-ca-key-secret").unwrap();
    assert!(
        store["metadata"]["annotations"]["dssm-certs.f5.com/rotation"].is_null(),
        "the record is gone once complete: {store}"
    );
    assert_eq!(
        store["data"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["dssm-ca.crt", "dssm-ca.key"],
        "nothing of the old materials is kept"
    );
    f.assert_unnoticed("CA rotation through the cluster");
}

/// For contrast (the figures are the benchmark's): the seeds' procedure through the cluster
/// leaves TMM without a Ready pod for a while, and it must run to the end.
#[test]
fn rotate_ca_with_scale_to_zero_runs_and_is_measured() {
    let r = scenarios::scale_to_zero();
    let (f, b, out) = (&r.figures, &r.bed, &r.out);
    eprintln!("scale-to-zero through the cluster: {f:?} {b:?}\n{out}");
    assert_eq!(r.code, 0, "{out}");
    assert!(
        out.contains("scaled deployment spk-ingress/f5-tmm to 0"),
        "{out}"
    );
    assert!(out.contains("this interrupts traffic"), "{out}");
    assert!(f.no_ready_tmm > Duration::ZERO, "{f:?}");
    assert!(f.ops > 0 && f.samples > 0, "{f:?}");
}

/// Runs the binary, and kills it (-9) at the first line containing `marker` printed while the
/// rotation is in phase `phase`. Returns whether it was killed, and what it printed.
fn run_killed_at(
    env: &TestEnv,
    bed: &Bed,
    args: &[&str],
    kill_at: Option<(&str, &str)>,
) -> (Option<i32>, bool, String) {
    use std::io::BufRead;
    let mut cmd = command(env, bed, args);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let (mut printed, mut phase, mut killed) = (String::new(), String::new(), false);
    for line in stdout.lines() {
        let line = line.unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if let Some(rest) = line.strip_prefix("CA rotation, phase ") {
            // "CA rotation, phase 2 of 3 (switch): ..."
            phase = rest
                .split(['(', ')'])
                .nth(1)
                .unwrap_or_default()
                .to_string();
        }
        if let Some((p, marker)) = kill_at {
            if !killed && phase == p && line.contains(marker) {
                child.kill().unwrap(); // SIGKILL
                killed = true;
            }
        }
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    printed.push_str(&err);
    (status.code(), killed, printed)
}

/// Re-runs (as the next CronJob run would) while the killed run's Lease holds (exit 5).
fn rerun_until_unlocked(
    env: &TestEnv,
    bed: &Bed,
    args: &[&str],
    kill_at: Option<(&str, &str)>,
) -> (Option<i32>, bool, String) {
    let start = std::time::Instant::now();
    loop {
        let r = run_killed_at(env, bed, args, kill_at);
        if r.0 != Some(5) {
            return r;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{}", r.2);
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_ca_rotation_killed_in_each_phase_resumes_there_and_nobody_notices() {
    let env = seeded();
    let (bed, load) = Bed::start(&env, LoadConfig::default());
    std::thread::sleep(SETTLE);
    let rotate = rotate_args(true, Some("rolling"));
    let reconcile = [
        "reconcile",
        "--key-algorithm",
        "ecdsa-p256",
        "--strategy",
        "rolling",
    ];
    // One kill point per phase: mid-way through the dSSM pods, between the copies and the
    // rollout of TMM, mid-way through the DB reloads.
    let kills = [
        ("trust", "done: f5-dssm-sentinel-0: restart"),
        ("switch", "rolling restart of deployment"),
        ("drop", "done: f5-dssm-db-2: reload"),
    ];
    let mut killed_in = Vec::new();
    let mut resumed_at = Vec::new();
    let mut shown = Vec::new();
    let mut log = String::new();
    for (i, kill) in kills.iter().enumerate() {
        // `rotate --ca` again, then `reconcile`: any run that finds the record resumes it.
        let args: &[&str] = if i < 2 { &rotate } else { &reconcile };
        let (code, killed, out) = rerun_until_unlocked(&env, &bed, args, Some(*kill));
        log.push_str(&out);
        assert!(killed, "never reached {kill:?} (exit {code:?}):\n{out}");
        killed_in.push(kill.0);
        // What `check` (and the agent's dssm_rotation_phase) shows while the rotation waits.
        let (_, json, err) = env.run(&["check", "-o", "json"]);
        let report: serde_json::Value =
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}{err}"));
        shown.push(
            report["rotation_phase"]
                .as_str()
                .unwrap_or("none")
                .to_string(),
        );
        if let Some(l) = out
            .lines()
            .find(|l| l.starts_with("a CA rotation is in progress"))
        {
            resumed_at.push(l.to_string());
        }
    }
    let (code, killed, out) = rerun_until_unlocked(&env, &bed, &reconcile, None);
    log.push_str(&out);
    assert!(!killed);
    if let Some(l) = out
        .lines()
        .find(|l| l.starts_with("a CA rotation is in progress"))
    {
        resumed_at.push(l.to_string());
    }
    let (f, b) = finish(bed, load);
    eprintln!("CA rotation killed in every phase: {f:?} {b:?}\n{log}");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(killed_in, ["trust", "switch", "drop"]);
    assert_eq!(shown, ["trust", "switch", "drop"], "check shows the phase");
    let (_, json, _) = env.run(&["check", "-o", "json"]);
    assert!(
        !json.contains("rotation_phase"),
        "no phase once complete: {json}"
    );
    assert_eq!(
        resumed_at,
        [
            "a CA rotation is in progress: phase 1 of 3 (trust); resuming it",
            "a CA rotation is in progress: phase 2 of 3 (switch); resuming it",
            "a CA rotation is in progress: phase 3 of 3 (drop); resuming it",
        ],
        "each re-run resumed where the killed one was"
    );
    assert!(out.contains("CA rotation complete"), "{out}");
    let store = env.secret(&env.dssm_ns, "dssm-ca-key-secret").unwrap();
    assert!(store["metadata"]["annotations"]["dssm-certs.f5.com/rotation"].is_null());
    f.assert_unnoticed("CA rotation killed in each phase");
}
