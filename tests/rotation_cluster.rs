//! Rotations through Kubernetes, proven on real processes under load: the test cluster's dSSM
//! pods are redis-server/redis-sentinel processes (1 primary, 2 replicas, 3 sentinels, TLS only,
//! kubelet-like mounts updated by the atomic `..data` swap), TMM pods are TMM-like mutual-TLS
//! clients writing through the sentinels (`support::dssm_pods`), and the real `dssm-certs`
//! binary rotates. Judged as `Figures::assert_unnoticed`: 0 failed operations after one retry,
//! 0 acknowledged writes lost, ≥ 2 DBs and ≥ 2 sentinels up at every sample, and no moment
//! without a Ready TMM pod.

use testkit as support;

use std::time::Duration;

use support::dssm_pods::{
    command, finish, published_on, rotate_args, scenarios, seeded, Bed, BedFigures,
};
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
    // As few restarts as a new leaf needs, as the bed counted them: TMM rolled once, each
    // sentinel restarted once, the DBs (directory mounts) reloaded and never restarted.
    let replicas = tmm_replicas(&r.env);
    assert_eq!(f.tmm_pods, replicas, "TMM rolled once: {f:?}");
    assert_eq!(f.sentinel_starts, 3, "each sentinel restarted once: {f:?}");
    assert_eq!(f.db_starts, 0, "no DB restarted: {f:?}");
    assert!(f.db_reloads >= 3, "every DB reloaded: {f:?}");
    assert_tool_counted_what_the_bed_did(&r.env, f, out, "spk-ingress");
}

/// The tool's own figures (its last `restarts:` line) are those the bed counted.
fn tool_restarts(out: &str) -> [u64; 4] {
    let line = out
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("restarts: "))
        .unwrap_or_else(|| panic!("no restarts line:\n{out}"));
    let n: Vec<u64> = line
        .split(", ")
        .map(|part| part.split(' ').next().unwrap().parse().unwrap())
        .collect();
    n.try_into().unwrap()
}

/// The tool's `restarts:` line (and the Event of its end in `events_ns`) say what the bed
/// counted: TMM pods created, sentinel and DB process starts, DB reloads (`CONFIG SET` calls).
fn assert_tool_counted_what_the_bed_did(
    env: &TestEnv,
    f: &support::load::Figures,
    out: &str,
    events_ns: &str,
) {
    let bed = [
        f.tmm_pods as u64,
        f.sentinel_starts as u64,
        f.db_starts as u64,
        f.db_reloads,
    ];
    assert_eq!(tool_restarts(out), bed, "tool vs bed: {f:?}\n{out}");
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with("restarts: "))
        .unwrap();
    let events = env.server.list("events.k8s.io", "events", events_ns);
    assert!(
        events
            .iter()
            .any(|e| e["note"].as_str().is_some_and(|n| n.contains(line))),
        "no Event in {events_ns} says {line:?}: {events:?}"
    );
}

/// The replicas of the one TMM Deployment.
fn tmm_replicas(env: &TestEnv) -> usize {
    let d = env
        .server
        .get("apps", "deployments", &env.tmm_ns, "f5-tmm")
        .unwrap();
    d["spec"]["replicas"].as_u64().unwrap() as usize
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
    // As few restarts as a new CA needs, as the bed counted them: TMM rolled once (in switch,
    // with both CAs and the new leaf), each sentinel restarted at most twice (trust, switch),
    // the DBs reloaded and never restarted.
    assert_eq!(f.tmm_pods, tmm_replicas(env), "TMM rolled once: {f:?}");
    assert!(f.sentinel_starts <= 6, "≤ 2 restarts a sentinel: {f:?}");
    assert_eq!(f.db_starts, 0, "no DB restarted: {f:?}");
    assert!(f.db_reloads >= 9, "every DB reloaded in each phase: {f:?}");
    assert_tool_counted_what_the_bed_did(env, f, out, "spk-utilities");
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
    // Every dSSM process at once, TMM back from zero: the tool counts them as the bed does.
    assert_tool_counted_what_the_bed_did(&r.env, f, out, "spk-ingress");
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

/// A resumed CA rotation runs the pre-flight first, as each phase does: with a dSSM pod not
/// Ready it is refused (exit 6, here after a 2 s `--wait-timeout`) before any write but the
/// Lease's and Events, in the phase it resumes; the pod is Ready again when this returns.
fn resume_refused_while_a_dssm_pod_is_not_ready(
    env: &TestEnv,
    bed: &Bed,
    args: &[&str],
    phase: &str,
) -> String {
    let ns = env.dssm_ns.clone();
    let ready = env.server.get("", "pods", &ns, "f5-dssm-db-1").unwrap();
    let mut not_ready = ready.clone();
    not_ready["status"]["conditions"] = serde_json::json!([{"type": "Ready", "status": "False"}]);
    env.server.put("", "pods", &ns, not_ready);
    let lease_held = std::time::Instant::now();
    let (code, out) = loop {
        env.server.clear_requests();
        let (code, out, err) = support::output(&mut support::dssm_pods::command_timed(
            env, bed, args, "4s", "2s",
        ));
        // The killed run's Lease first (exit 5), as `rerun_until_unlocked` waits it out.
        if code != 5 || lease_held.elapsed() > Duration::from_secs(30) {
            break (code, format!("{out}{err}"));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    env.server.put("", "pods", &ns, ready);
    assert_eq!(code, 6, "resuming {phase} with a pod not Ready: {out}");
    assert!(
        out.contains("pre-flight refused") && out.contains("f5-dssm-db-1 not Ready"),
        "resuming {phase}: {out}"
    );
    env.assert_wrote_only_lease_and_events();
    out
}

#[test]
fn a_ca_rotation_killed_in_each_phase_resumes_there_and_nobody_notices() {
    let env = seeded();
    let (bed, load) = Bed::start(&env, LoadConfig::default());
    load.settle();
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
        if i > 0 {
            log.push_str(&resume_refused_while_a_dssm_pod_is_not_ready(
                &env,
                &bed,
                args,
                kills[i - 1].0,
            ));
        }
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
    log.push_str(&resume_refused_while_a_dssm_pod_is_not_ready(
        &env, &bed, &reconcile, "drop",
    ));
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
    // Killed and resumed three times, and still nothing restarted twice in a phase: TMM rolled
    // once (the roll recorded before the kill is waited for, not started again), each sentinel
    // at most twice (those the killed run restarted prove it by new handshakes), no DB restart.
    assert_eq!(f.tmm_pods, tmm_replicas(&env), "TMM rolled once: {f:?}");
    assert!(
        f.sentinel_starts <= 6,
        "≤ 2 restarts a sentinel: {f:?}\n{log}"
    );
    assert_eq!(f.db_starts, 0, "no DB restarted: {f:?}");
}

/// The three TMM targets of the spk-multi shape: (plural, namespace, name, how the binary names
/// it).
const TARGETS: [(&str, &str, &str, &str); 3] = [
    (
        "deployments",
        "spk-ingress-a",
        "f5-tmm",
        "deployment spk-ingress-a/f5-tmm",
    ),
    (
        "deployments",
        "spk-ingress-b",
        "f5-tmm",
        "deployment spk-ingress-b/f5-tmm",
    ),
    ("daemonsets", "bnk-tmm", "tmm", "daemonset bnk-tmm/tmm"),
];

/// A target's workload as the API server holds it.
fn workload(env: &TestEnv, (plural, ns, name, _): (&str, &str, &str, &str)) -> serde_json::Value {
    env.server.get("apps", plural, ns, name).unwrap()
}

/// The pod-template annotation of `kubectl rollout restart` (null before the first).
fn restarted_at(env: &TestEnv, t: (&str, &str, &str, &str)) -> serde_json::Value {
    workload(env, t)["spec"]["template"]["metadata"]["annotations"]
        ["kubectl.kubernetes.io/restartedAt"]
        .clone()
}

/// Pods per target: a Deployment's replicas, a DaemonSet's one per node.
fn expected_pods(env: &TestEnv, t: (&str, &str, &str, &str)) -> usize {
    match t.0 {
        "deployments" => workload(env, t)["spec"]["replicas"].as_u64().unwrap() as usize,
        _ => env.server.with_state(|s| s.nodes.len()),
    }
}

/// Every target back at its count of Ready pods, none of our marks left on it.
fn assert_targets_restored(env: &TestEnv, counts: &[usize], what: &str) {
    for (t, n) in TARGETS.iter().zip(counts) {
        env.server.wait_until(
            &format!("{what}: {} back at {n} Ready pods", t.3),
            Duration::from_secs(30),
            |s| {
                s.list(support::apiserver::resource("", "pods"), Some(t.1))
                    .iter()
                    .filter(|p| {
                        p["metadata"]["deletionTimestamp"].is_null()
                            && p["status"]["conditions"].as_array().is_some_and(|c| {
                                c.iter()
                                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
                            })
                    })
                    .count()
                    == *n
            },
        );
        let w = workload(env, *t);
        let ours = support::our_annotations(&w);
        assert!(ours.is_empty(), "{what}: {} keeps {ours:?}", t.3);
    }
}

/// Every target's namespace had a Ready pod at every sample, and at least `rolls` × its count
/// of new pods (each rolling restart replaces every pod).
fn assert_every_target_rolled(b: &BedFigures, counts: &[usize], rolls: usize, what: &str) {
    for (t, n) in TARGETS.iter().zip(counts) {
        assert!(
            b.fewest_ready.get(t.1).is_some_and(|r| *r >= 1),
            "{what}: {} had no Ready pod at some moment: {b:?}",
            t.3
        );
        assert!(
            b.new_tmm_pods.get(t.1).is_some_and(|p| *p >= rolls * n),
            "{what}: {} not rolled {rolls} time(s) ({n} pods): {b:?}",
            t.3
        );
    }
}

/// Several TMM instances (issue 14): `rotate` with the default strategy rolls each of the three
/// targets, one at a time, while each target's pods write through the sentinels.
#[test]
fn rotate_with_three_tmm_targets_rolls_every_target_and_nobody_notices() {
    let r = scenarios::multi_leaf_renewal();
    let (f, b, out, env) = (&r.figures, &r.bed, &r.out, &r.env);
    eprintln!("leaf renewal, three TMM targets: {f:?} {b:?}\n{out}");
    assert_eq!(r.code, 0, "{out}");
    assert!(out.contains("plan: renew-leaf"), "{out}");
    let counts: Vec<usize> = TARGETS.iter().map(|t| expected_pods(env, *t)).collect();
    for t in TARGETS {
        assert!(
            out.contains(&format!("rolling restart of {} (", t.3))
                && out.contains(&format!("{} rolled out", t.3)),
            "{}: {out}",
            t.3
        );
        assert!(restarted_at(env, t).is_string(), "{}: not rolled", t.3);
    }
    assert!(
        !out.contains("scaled"),
        "a rolling restart never scales: {out}"
    );
    assert_targets_restored(env, &counts, "leaf renewal, three targets");
    assert_every_target_rolled(b, &counts, 1, "leaf renewal, three targets");
    let copies: Vec<_> = env
        .copy_namespaces()
        .iter()
        .map(|ns| env.copy(ns).unwrap())
        .collect();
    assert!(copies.iter().all(|c| *c == copies[0]), "identical copies");
    f.assert_unnoticed("leaf renewal with three TMM targets");
}

/// `rotate --ca` with three targets: each of the three phases rolls all three.
#[test]
fn rotate_ca_with_three_tmm_targets_rolls_every_target_once_in_switch_and_nobody_notices() {
    let r = scenarios::multi_ca_rotation();
    let (f, b, out, env) = (&r.figures, &r.bed, &r.out, &r.env);
    eprintln!("CA rotation, three TMM targets: {f:?} {b:?}\n{out}");
    assert_eq!(r.code, 0, "{out}");
    assert!(out.contains("CA rotation complete"), "{out}");
    let counts: Vec<usize> = TARGETS.iter().map(|t| expected_pods(env, *t)).collect();
    // Per phase (named by its summary line, which follows its rolls): the targets rolled.
    let mut rolled_per_phase: Vec<(String, Vec<String>)> = Vec::new();
    let mut rolls = Vec::new();
    for l in out.lines() {
        if let Some(t) = l.strip_prefix("rolling restart of ") {
            rolls.push(t.split(" (").next().unwrap().to_string());
        } else if let Some(rest) = l.strip_prefix("CA rotation phase ") {
            let phase = rest.split(' ').next().unwrap().to_string();
            rolled_per_phase.push((phase, std::mem::take(&mut rolls)));
        }
    }
    let every: Vec<String> = TARGETS.iter().map(|t| t.3.to_string()).collect();
    // TMM rolls once, in switch (both CAs and the new leaf), never in trust or drop: a CA
    // rotation used to roll every target in each of the three phases.
    assert_eq!(
        rolled_per_phase,
        [
            ("trust".to_string(), vec![]),
            ("switch".to_string(), every),
            ("drop".to_string(), vec![]),
        ],
        "{out}"
    );
    assert_targets_restored(env, &counts, "CA rotation, three targets");
    assert_every_target_rolled(b, &counts, 1, "CA rotation, three targets");
    for (t, n) in TARGETS.iter().zip(&counts) {
        assert_eq!(
            b.new_tmm_pods.get(t.1),
            Some(n),
            "{} rolled once: {b:?}",
            t.3
        );
    }
    f.assert_unnoticed("CA rotation with three TMM targets");
}

/// kill -9 of a leaf renewal once the first TMM target is rolled (its `tmm-restarted` record
/// written): the next run finishes the other two and leaves the done one alone.
#[test]
fn a_rotation_killed_after_the_first_target_rolled_resumes_with_the_others_only() {
    let env = published_on(scenarios::multi());
    let counts: Vec<usize> = TARGETS.iter().map(|t| expected_pods(&env, *t)).collect();
    let (bed, load) = Bed::start(&env, scenarios::multi_load());
    load.settle();
    let log = env.dir.path().join("killed.log");
    let mut child = command(&env, &bed, &rotate_args(false, None))
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let token = |w: &serde_json::Value, k: &str| {
        w["metadata"]["annotations"][format!("dssm-certs.f5.com/{k}")].clone()
    };
    // Killed as soon as the API server holds the first target's record: nothing after it ran.
    let start = std::time::Instant::now();
    let killed = loop {
        let done = env.server.with_state(|s| {
            let a = s
                .get(
                    support::apiserver::resource("apps", "deployments"),
                    TARGETS[0].1,
                    "f5-tmm",
                )
                .unwrap();
            let done = !token(a, "tmm-restarted").is_null();
            if done {
                child.kill().unwrap(); // SIGKILL, while the API server is held
            }
            done
        });
        if done {
            break true;
        }
        if child.try_wait().unwrap().is_some() || start.elapsed() > Duration::from_secs(60) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    child.wait().unwrap();
    let first = std::fs::read_to_string(&log).unwrap();
    assert!(killed, "the first target was never recorded done:\n{first}");
    // The exact per-target state the killed run left.
    let revision = token(&workload(&env, TARGETS[0]), "restart-needed");
    assert!(revision.is_string(), "{first}");
    let state: Vec<(serde_json::Value, serde_json::Value)> = TARGETS
        .iter()
        .map(|t| {
            let w = workload(&env, *t);
            (token(&w, "restart-needed"), token(&w, "tmm-restarted"))
        })
        .collect();
    assert_eq!(
        state,
        [
            (revision.clone(), revision.clone()),
            (revision.clone(), serde_json::Value::Null),
            (revision.clone(), serde_json::Value::Null),
        ],
        "(restart-needed, tmm-restarted) per target after the kill:\n{first}"
    );
    let rolled_a = restarted_at(&env, TARGETS[0]);
    assert!(rolled_a.is_string(), "{first}");
    // The next CronJob run, once the killed run's Lease has expired.
    let reconcile = ["reconcile", "--key-algorithm", "ecdsa-p256"];
    let (code, out) = loop {
        let (code, out, err) = support::dssm_pods::run(&env, &bed, &reconcile);
        if code != 5 {
            break (code, out + &err);
        }
        assert!(start.elapsed() < Duration::from_secs(90), "{out}{err}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let (f, b) = finish(bed, load);
    eprintln!("leaf renewal killed after the first of three targets: {f:?} {b:?}\n{first}\n--- resumed:\n{out}");
    assert_eq!(code, 0, "{out}");
    let rolled: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("rolling restart of "))
        .map(|t| t.split(" (").next().unwrap())
        .collect();
    assert_eq!(rolled, [TARGETS[1].3, TARGETS[2].3], "{out}");
    assert_eq!(
        restarted_at(&env, TARGETS[0]),
        rolled_a,
        "the done target is not rolled again"
    );
    assert_targets_restored(&env, &counts, "after the resumed rotation");
    assert_every_target_rolled(&b, &counts, 1, "killed and resumed");
    f.assert_unnoticed("leaf renewal killed after the first target and resumed");
}

/// The public key of the CA the dSSM copy of `env` holds now, and the store's CA key, if any.
fn ca_public_key_and_stored_key(env: &TestEnv) -> (String, Vec<u8>) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let dir = env.dir.path();
    std::fs::write(dir.join("old-ca.crt"), &env.copy(&env.dssm_ns).unwrap()[0]).unwrap();
    let public = support::openssl(dir, &["x509", "-in", "old-ca.crt", "-noout", "-pubkey"]);
    let store = env.secret(&env.dssm_ns, "dssm-ca-key-secret").unwrap();
    let key = b64
        .decode(store["data"]["dssm-ca.key"].as_str().unwrap_or(""))
        .unwrap();
    (public, key)
}

/// No private key in the CA key Secret belongs to the CA whose public key is `old_public`.
fn assert_store_holds_no_key_of(env: &TestEnv, old_public: &str, what: &str) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let dir = env.dir.path();
    let store = env.secret(&env.dssm_ns, "dssm-ca-key-secret").unwrap();
    for (name, value) in store["data"].as_object().unwrap() {
        let bytes = b64.decode(value.as_str().unwrap()).unwrap();
        if !String::from_utf8_lossy(&bytes).contains("PRIVATE KEY") {
            continue;
        }
        std::fs::write(dir.join("k.pem"), &bytes).unwrap();
        let public = support::openssl(dir, &["pkey", "-in", "k.pem", "-pubout"]);
        assert_ne!(public, old_public, "{what}: {name} is a key of the old CA");
    }
}

/// Sentinels and TMM keep trusting the old CA after drop until their next restart: harmless
/// because nobody can sign with it any more. A CA rotation of tool-managed materials (the old
/// CA's key in the store) killed in switch right after TMM's roll: the store already holds no
/// key of the old CA; the resumed run does not roll TMM again (the recorded roll is waited for)
/// and finishes with TMM rolled once, each sentinel restarted at most twice, no DB restarted.
#[test]
fn a_ca_rotation_killed_after_tmm_rolled_keeps_no_old_ca_key_and_rolls_tmm_once() {
    let env = support::dssm_pods::published();
    let (old_public, old_key) = ca_public_key_and_stored_key(&env);
    // The check can fail: before the rotation, the store holds the old CA's key.
    std::fs::write(env.dir.path().join("k.pem"), &old_key).unwrap();
    let stored = support::openssl(env.dir.path(), &["pkey", "-in", "k.pem", "-pubout"]);
    assert_eq!(
        stored, old_public,
        "the store holds the old CA's key before"
    );
    let (bed, load) = Bed::start(&env, LoadConfig::default());
    load.settle();
    let rotate = rotate_args(true, None);
    let kill = ("switch", "rolled out: its");
    let (code, killed, first) = rerun_until_unlocked(&env, &bed, &rotate, Some(kill));
    assert!(killed, "never reached {kill:?} (exit {code:?}):\n{first}");
    assert_store_holds_no_key_of(&env, &old_public, "killed in switch");
    let reconcile = ["reconcile", "--key-algorithm", "ecdsa-p256"];
    let (code, _, out) = rerun_until_unlocked(&env, &bed, &reconcile, None);
    let (f, b) = finish(bed, load);
    eprintln!("CA rotation killed after TMM rolled: {f:?} {b:?}\n{first}\n--- resumed:\n{out}");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("CA rotation complete"), "{out}");
    assert!(
        !out.contains("rolling restart of"),
        "TMM not rolled again: {out}"
    );
    assert_store_holds_no_key_of(&env, &old_public, "complete");
    assert_eq!(f.tmm_pods, tmm_replicas(&env), "TMM rolled once: {f:?}");
    assert!(f.sentinel_starts <= 6, "≤ 2 restarts a sentinel: {f:?}");
    assert_eq!(f.db_starts, 0, "no DB restarted: {f:?}");
    f.assert_unnoticed("CA rotation killed after TMM rolled, resumed");
}

/// The stand-in kubelet mounts a recreated dSSM pod's volume from the Secret as it is then, as
/// kubelet does for a new pod (no sync delay), subPath or not. It used to start the process on
/// the mounts' last sync: a pod recreated within the delay of a rotation's write served the old
/// leaf, and the roll's gate waited out its whole step (3 of 35 runs of the SIGTERM-in-the-pause
/// test).
#[test]
fn a_dssm_pod_recreated_right_after_a_secret_change_serves_the_new_leaf() {
    use base64::Engine;
    use dssm_certs::redis::{ClientIdentity, ClientMaterials, Connection, TlsClient};
    let env = support::dssm_pods::published();
    let (bed, load) = Bed::start(&env, LoadConfig::default());
    load.settle();
    let ns = env.dssm_ns.clone();
    let data = |name: &str, key: &str| {
        let v = env.secret(&ns, name).unwrap()["data"][key].clone();
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    };
    // A leaf renewal, as a rotation writes it: the same CA, a new leaf and key.
    let ca = support::load::Ca {
        cert: data("dssm-certs-secret", "dssm-ca.crt"),
        key: dssm_certs::pki::PrivateKey::from_pem(
            &data("dssm-ca-key-secret", "dssm-ca.key"),
            "ca",
        )
        .unwrap(),
    };
    let (cert, key) = ca.leaf(365);
    let key = key.to_pkcs8_pem();
    let dh = data("dssm-certs-secret", "dhparam2048.pem");
    env.put_secret(
        &ns,
        "dssm-certs-secret",
        &[
            ("dssm-ca.crt", &ca.cert),
            ("dssm-cert.crt", &cert),
            ("dhparam2048.pem", &dh),
        ],
    );
    env.put_secret(&ns, "dssm-keys-secret", &[("dssm-key.key", &key)]);
    // At once: well within the stand-in kubelet's sync delay of the running pods' mounts.
    let gone = env
        .server
        .delete("", "pods", &ns, "f5-dssm-sentinel-2")
        .expect("the pod");
    // Its replacement Ready: the stand-in kubelet started its process (it says Ready once the
    // process answers).
    support::redis::wait_for("the replacement pod Ready", Duration::from_secs(20), || {
        let p = env.server.get("", "pods", &ns, "f5-dssm-sentinel-2")?;
        let ready = p["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        (p["metadata"]["uid"] != gone["metadata"]["uid"] && ready).then_some(())
    });
    let endpoint = bed
        .redis_endpoints
        .split(',')
        .find_map(|e| e.strip_prefix("f5-dssm-sentinel-2="))
        .unwrap()
        .to_string();
    let files = support::tempdir();
    support::load::write_materials(
        files.path(),
        &ca.cert,
        &cert,
        &dssm_certs::pki::PrivateKey::from_pem(&key, "leaf").unwrap(),
    );
    let tls = TlsClient::new(
        &ClientMaterials::from_dir(files.path()).unwrap(),
        ClientIdentity::Presented,
    )
    .unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&cert).unwrap();
    let expected = dssm_certs::redis::tls::fingerprint(&pem.contents);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let served = Connection::connect(&tls, &endpoint, "f5-dssm-sentinel", deadline)
        .unwrap()
        .served_fingerprint()
        .map(str::to_string);
    assert_eq!(
        served,
        Some(expected),
        "the recreated sentinel serves the new leaf"
    );
    finish(bed, load)
        .0
        .assert_unnoticed("a pod recreated right after a Secret change");
}

/// A TMM DaemonSet with `updateStrategy: OnDelete` never replaces a pod by itself, so a
/// `rollout restart` would leave its pods on the old files. The rotation replaces them itself,
/// one node at a time, each replacement Ready before the next eviction, and nobody notices.
#[test]
fn an_on_delete_tmm_daemonset_is_replaced_one_pod_at_a_time_and_nobody_notices() {
    let env = published_on(scenarios::multi());
    let mut ds = env
        .server
        .get("apps", "daemonsets", "bnk-tmm", "tmm")
        .unwrap();
    ds["spec"]["updateStrategy"] = serde_json::json!({"type": "OnDelete"});
    env.server.put("apps", "daemonsets", "bnk-tmm", ds);
    let r =
        support::dssm_pods::rotate_under(env, scenarios::multi_load(), &rotate_args(false, None));
    let (f, b, out, env) = (&r.figures, &r.bed, &r.out, &r.env);
    assert_eq!(r.code, 0, "{out}");
    let counts: Vec<usize> = TARGETS.iter().map(|t| expected_pods(env, *t)).collect();
    let nodes = expected_pods(env, TARGETS[2]);
    assert!(nodes >= 2, "a DaemonSet on {nodes} node(s)");
    assert!(
        out.contains("daemonset bnk-tmm/tmm") && out.contains("replaced one at a time"),
        "{out}"
    );
    assert_eq!(
        out.matches("  evicted pod bnk-tmm/").count(),
        nodes,
        "each node's pod evicted once: {out}"
    );
    assert!(
        restarted_at(env, TARGETS[2]).is_null(),
        "no rollout restart of an OnDelete DaemonSet: {out}"
    );
    assert_targets_restored(env, &counts, "OnDelete DaemonSet");
    assert_every_target_rolled(b, &counts, 1, "OnDelete DaemonSet");
    assert!(
        b.fewest_ready
            .get("bnk-tmm")
            .is_some_and(|r| *r >= nodes - 1),
        "at most one of its pods down at a time: {b:?}"
    );
    f.assert_unnoticed("leaf renewal with an OnDelete TMM DaemonSet");
}
