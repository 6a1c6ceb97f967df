//! `reconcile`, `rotate` and `check` on a cluster, through the real binary against the test
//! cluster.

use testkit as support;

use std::time::Duration;

use dssm_testcluster::Fault;
use support::*;

fn ca_of(copy: &[Vec<u8>; 4]) -> &[u8] {
    &copy[0]
}

fn assert_all_copies_identical_and_valid(env: &TestEnv) -> [Vec<u8>; 4] {
    let a = env.copy(&env.dssm_ns).expect("dSSM copy");
    let b = env.copy(&env.tmm_ns).expect("TMM copy");
    assert!(a == b, "the copies differ");
    let tmp = tempdir();
    for (i, f) in [
        "dssm-ca.crt",
        "dssm-cert.crt",
        "dssm-key.key",
        "dhparam2048.pem",
    ]
    .iter()
    .enumerate()
    {
        std::fs::write(tmp.path().join(f), &a[i]).unwrap();
    }
    openssl(
        tmp.path(),
        &["verify", "-CAfile", "dssm-ca.crt", "dssm-cert.crt"],
    );
    let (code, out, _) = run(&["check", "--dir", tmp.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    a
}

#[test]
fn publish_writes_the_store_first_then_dssm_then_tmm_then_marks_the_restart() {
    let env = TestEnv::spk();
    let (code, out, err) = env.reconcile(&["--no-restart"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("plan: publish"), "{out}");
    let copy = assert_all_copies_identical_and_valid(&env);

    // Labelled, annotated, and the CA key only in the dSSM namespace's store.
    let certs = env.secret("spk-ingress", "dssm-certs-secret").unwrap();
    assert_eq!(
        certs["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "dssm-certs"
    );
    assert_eq!(
        certs["metadata"]["annotations"]["dssm-certs.f5.com/revision"],
        "1"
    );
    assert!(
        certs["metadata"]["annotations"]["dssm-certs.f5.com/not-after"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    let store = env.secret("spk-utilities", "dssm-ca-key-secret").unwrap();
    assert_eq!(
        store["metadata"]["annotations"]["dssm-certs.f5.com/state"],
        "complete"
    );
    assert!(store["data"].get("pending-dssm-cert.crt").is_none());
    assert!(env.secret("spk-ingress", "dssm-ca-key-secret").is_none());
    use base64::Engine;
    let stored_ca = base64::engine::general_purpose::STANDARD
        .decode(store["data"]["dssm-ca.crt"].as_str().unwrap())
        .unwrap();
    assert_eq!(stored_ca, ca_of(&copy));

    // Write order (docs/design.md).
    let writes: Vec<String> = env
        .writes()
        .iter()
        .filter(|r| !r.path.contains("/leases") && !r.path.contains("/events"))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        writes,
        [
            "POST /api/v1/namespaces/spk-utilities/secrets",
            "POST /api/v1/namespaces/spk-utilities/secrets",
            "POST /api/v1/namespaces/spk-utilities/secrets",
            "POST /api/v1/namespaces/spk-ingress/secrets",
            "POST /api/v1/namespaces/spk-ingress/secrets",
            "PATCH /apis/apps/v1/namespaces/spk-ingress/deployments/f5-tmm",
            "PUT /api/v1/namespaces/spk-utilities/secrets/dssm-ca-key-secret",
        ]
    );
    let dep = env
        .server
        .get("apps", "deployments", "spk-ingress", "f5-tmm")
        .unwrap();
    assert_eq!(
        dep["metadata"]["annotations"]["dssm-certs.f5.com/restart-needed"],
        "1"
    );
    // Events on the written Secrets.
    let events = env.server.list("events.k8s.io", "events", "spk-ingress");
    assert!(
        events
            .iter()
            .any(|e| e["reason"] == "Published" && e["regarding"]["name"] == "dssm-certs-secret"),
        "{events:?}"
    );
}

#[test]
fn a_second_reconcile_with_nothing_due_writes_nothing_and_reads_a_handful() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&[]).0, 0);
    env.server.clear_requests();
    let (code, out, err) = env.reconcile(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("plan: nothing"), "{out}");
    let reqs = env.server.requests();
    assert!(
        reqs.iter().all(|r| !r.is_write()),
        "wrote: {:?}",
        env.writes()
    );
    // 2 Secrets x 2 namespaces + the CA key Secret + the Deployment.
    assert_eq!(reqs.len(), 6, "{reqs:?}");
}

#[test]
fn dry_run_prints_the_plan_and_makes_no_write_request() {
    let env = TestEnv::spk();
    let (code, out, err) = env.reconcile(&["--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("plan: publish") && out.contains("dry run: would write"),
        "{out}"
    );
    assert!(out.contains("secret spk-ingress/dssm-keys-secret"), "{out}");
    assert!(env.writes().is_empty(), "{:?}", env.writes());
    assert!(env.secret("spk-utilities", "dssm-certs-secret").is_none());
}

/// The request the test cluster records for one line of the writes list ("secret NS/NAME:
/// create, …", "secret NS/NAME: replace …", "deployment NS/NAME: …").
fn request_of(line: &str) -> String {
    let (object, change) = line.split_once(": ").expect("OBJECT: CHANGE");
    let (kind, at) = object.split_once(' ').expect("KIND NS/NAME");
    let (ns, name) = at.split_once('/').expect("NS/NAME");
    match (kind, change.starts_with("create")) {
        ("secret", true) => format!("POST /api/v1/namespaces/{ns}/secrets"),
        ("secret", false) => format!("PUT /api/v1/namespaces/{ns}/secrets/{name}"),
        (kind, _) => format!("PATCH /apis/apps/v1/namespaces/{ns}/{kind}s/{name}"),
    }
}

/// Lines of `out` after one of `prefixes`, the prefix cut.
fn after(out: &str, prefixes: &[&str]) -> Vec<String> {
    out.lines()
        .filter_map(|l| prefixes.iter().find_map(|p| l.strip_prefix(p)))
        .map(String::from)
        .collect()
}

#[test]
fn dry_run_lists_exactly_the_writes_the_executor_then_performs_in_order() {
    let env = TestEnv::spk();
    let install: &[&str] = &[
        "reconcile",
        "--key-algorithm",
        "ecdsa-p256",
        "--dhparam",
        "ffdhe2048",
    ];
    let renew: &[&str] = &["rotate", "--key-algorithm", "ecdsa-p256"];
    // First install: the CA key Secret, 2 copies of 2 Secrets, the mark, the CA key complete.
    // Leaf renewal: the same seven, each a replace.
    for (what, args) in [("first install", install), ("leaf renewal", renew)] {
        let args: Vec<&str> = args.iter().copied().chain(["--no-restart"]).collect();
        let dry_args: Vec<&str> = args.iter().copied().chain(["--dry-run"]).collect();
        let (code, dry, err) = env.run(&dry_args);
        assert_eq!(code, 0, "{what}: {dry}{err}");
        let planned = after(&dry, &["  would write ", "  would mark "]);
        assert_eq!(planned.len(), 7, "{what}: {dry}");
        assert!(env.writes().is_empty(), "{what}: the dry run wrote");

        let (code, out, err) = env.run(&args);
        assert_eq!(code, 0, "{what}: {out}{err}");
        assert_eq!(
            planned,
            after(&out, &["wrote ", "marked "]),
            "{what}: {dry}\n{out}"
        );
        let requested: Vec<String> = env
            .writes()
            .into_iter()
            .filter(|r| r.path.contains("/secrets") || r.path.contains("/deployments/"))
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        let expected: Vec<String> = planned.iter().map(|l| request_of(l)).collect();
        assert_eq!(requested, expected, "{what}: {out}");
        env.server.clear_requests();
    }
}

#[test]
fn cnf_uses_one_namespace_for_everything() {
    let env = TestEnv::cnf();
    let (code, out, err) = env.reconcile(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(env.copy("cnf-gateway").is_some());
    let writes = env
        .writes()
        .into_iter()
        .filter(|r| r.path.contains("/secrets"))
        .count();
    assert_eq!(writes, 4, "store, two copies, store complete");
    let (code, out, _) = env.run(&["check"]);
    assert_eq!(code, 0, "{out}");
}

fn seed_secrets(env: &TestEnv) -> std::path::PathBuf {
    let seed = env.dir.path().join("seed");
    std::fs::create_dir_all(&seed).unwrap();
    seed_materials(&seed, false);
    let r = |f: &str| read(&seed.join(f));
    for ns in [env.dssm_ns.clone(), env.tmm_ns.clone()] {
        env.put_secret(
            &ns,
            "dssm-certs-secret",
            &[
                ("dssm-ca.crt", &r("dssm-ca.crt")),
                ("dssm-cert.crt", &r("dssm-cert.crt")),
                ("dhparam2048.pem", &r("dhparam2048.pem")),
            ],
        );
        env.put_secret(
            &ns,
            "dssm-keys-secret",
            &[("dssm-key.key", &r("dssm-key.key"))],
        );
    }
    seed
}

#[test]
fn secrets_made_by_the_seed_procedure_are_adopted_untouched_and_reported() {
    let env = TestEnv::spk();
    seed_secrets(&env);
    let before = env.copy("spk-utilities").unwrap();
    env.server.clear_requests();
    let (code, out, err) = env.reconcile(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("plan: adopt") && out.contains("made by hand"),
        "{out}"
    );
    assert!(env.writes().is_empty(), "{:?}", env.writes());
    assert_eq!(env.copy("spk-utilities").unwrap(), before);
    let (code, out, _) = env.run(&["check", "-o", "json"]);
    assert_eq!(code, 0, "{out}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["in_sync"], true);
    assert_eq!(r["copies"].as_array().unwrap().len(), 2);
    assert_eq!(r["copies"][1]["certificates"][1]["version"], 1);
}

#[test]
fn a_due_leaf_is_renewed_under_the_same_ca_and_the_dh_params_are_kept() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--ca-days", "1000"]).0, 0);
    let before = env.copy("spk-utilities").unwrap();
    // Other valid params given explicitly: an explicit source wins over the deployed params
    // (`--dhparam generate` too: dh_source's table in src/reconcile.rs; its minute of search
    // is paid once, in tests/generate.rs).
    let other_dh = env.dir.path().join("modp2048.pem");
    let other_pem = dh_params_pem(openssl::bn::BigNum::get_rfc3526_prime_2048().unwrap());
    std::fs::write(&other_dh, &other_pem).unwrap();
    // 400 days before expiry: the 365-day leaf is due, the 1000-day CA is not.
    let (code, out, err) = env.reconcile(&[
        "--renew-before",
        "400d",
        "--days",
        "500",
        "--dhparam",
        other_dh.to_str().unwrap(),
    ]);
    // --dhparam was given explicitly: those params. Without it the deployed ones are reused:
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("plan: renew-leaf"), "{out}");
    let mid = assert_all_copies_identical_and_valid(&env);
    assert_eq!(mid[0], before[0], "same CA");
    assert_ne!(mid[1], before[1], "new leaf");
    assert_ne!(mid[3], before[3], "new DH params when asked");
    assert_eq!(
        mid[3], other_pem,
        "the DH params given are the ones deployed"
    );
    // A leaf issued minutes ago is never due by a policy: `rotate` renews it.
    let (code, out, err) = env.run(&["rotate", "--key-algorithm", "ecdsa-p256"]);
    assert_eq!(code, 0, "{out}{err}");
    let after = assert_all_copies_identical_and_valid(&env);
    assert_eq!(after[3], mid[3], "valid DH params are reused by default");
    assert_eq!(after[0], before[0]);
    let store = env.secret("spk-utilities", "dssm-ca-key-secret").unwrap();
    assert_eq!(
        store["metadata"]["annotations"]["dssm-certs.f5.com/revision"],
        "3"
    );
}

#[test]
fn without_a_ca_key_a_due_leaf_means_a_new_ca() {
    let env = TestEnv::spk();
    seed_secrets(&env);
    let before = env.copy("spk-utilities").unwrap();
    let (code, out, err) = env.run(&["rotate", "--key-algorithm", "ecdsa-p256"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("plan: rotate-ca") && out.contains("no CA key"),
        "{out}"
    );
    let after = assert_all_copies_identical_and_valid(&env);
    assert_ne!(after[0], before[0]);
    assert_eq!(
        after[3], before[3],
        "the seed's DH params are valid and kept"
    );
    let events = env.server.list("events.k8s.io", "events", "spk-utilities");
    assert!(
        events.iter().any(|e| e["reason"] == "CARotated"),
        "{events:?}"
    );
}

#[test]
fn rotate_renews_now_and_rotate_ca_replaces_the_ca() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&[]).0, 0);
    let first = env.copy("spk-utilities").unwrap();
    let (code, out, err) = env.run(&["rotate", "--key-algorithm", "ecdsa-p256", "--days", "200"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("plan: renew-leaf") && out.contains("renewal requested"),
        "{out}"
    );
    let second = assert_all_copies_identical_and_valid(&env);
    assert_eq!(second[0], first[0]);
    assert_ne!(second[1], first[1]);
    let (code, out, err) = env.run(&["rotate", "--ca", "--key-algorithm", "ecdsa-p256"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("plan: rotate-ca"), "{out}");
    let third = assert_all_copies_identical_and_valid(&env);
    assert_ne!(third[0], first[0]);
}

fn not_after(pem: &[u8]) -> i64 {
    dssm_certs::pki::parse_certificate(pem, "test")
        .unwrap()
        .not_after
}

/// The lifetimes issue: with the seeds' CA lifetime (365 days) and the default `--days 365`,
/// plain `rotate` replaced the CA, because a new 365-day leaf would outlive it. It renews the
/// leaf under the same CA, cut to the CA's end, and says so in its output and Event.
#[test]
fn rotate_with_default_days_under_a_365_day_ca_keeps_the_ca_and_cuts_the_leaf() {
    let env = TestEnv::spk();
    let alg = ["--key-algorithm", "ecdsa-p256"];
    assert_eq!(env.reconcile(&["--ca-days", "365"]).0, 0);
    let first = env.copy("spk-utilities").unwrap();
    next_second();
    let (code, out, err) = env.run(&[&["rotate"][..], &alg].concat());
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("plan: renew-leaf")
            && out.contains("the CA is not due")
            && out.contains("note: leaf valid until the CA's end"),
        "{out}"
    );
    let second = assert_all_copies_identical_and_valid(&env);
    assert_eq!(second[0], first[0], "same CA");
    assert_ne!(second[1], first[1], "new leaf");
    assert_eq!(
        not_after(&second[1]),
        not_after(&second[0]),
        "cut to the CA"
    );
    let events = env.server.list("events.k8s.io", "events", "spk-ingress");
    assert!(
        events.iter().any(|e| e["reason"] == "Renewed"
            && e["note"]
                .as_str()
                .is_some_and(|n| n.contains("leaf valid until the CA's end"))),
        "{events:?}"
    );

    let (code, out, err) = env.run(&[&["rotate", "--ca"][..], &alg].concat());
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("plan: rotate-ca") && out.contains("rotate --ca"),
        "{out}"
    );
    let third = assert_all_copies_identical_and_valid(&env);
    assert_ne!(third[0], first[0], "a new CA");
    assert!(
        not_after(&third[0]) - not_after(&third[1]) > 8 * 365 * 86_400,
        "a new CA lasts 10 years and its 365-day leaf is not cut"
    );
}

#[test]
fn a_drifted_copy_is_repaired_from_the_copy_that_chains_to_the_stored_ca() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&[]).0, 0);
    let good = env.copy("spk-utilities").unwrap();
    // Someone applied other materials into the TMM namespace only.
    let other = generate(env.dir.path(), &["--key-algorithm", "ecdsa-p256"]);
    let r = |f: &str| read(&other.join(f));
    env.put_secret(
        "spk-ingress",
        "dssm-certs-secret",
        &[
            ("dssm-ca.crt", &r("dssm-ca.crt")),
            ("dssm-cert.crt", &r("dssm-cert.crt")),
            ("dhparam2048.pem", &r("dhparam2048.pem")),
        ],
    );
    env.put_secret(
        "spk-ingress",
        "dssm-keys-secret",
        &[("dssm-key.key", &r("dssm-key.key"))],
    );
    let (code, out, _) = env.run(&["check"]);
    assert_eq!(code, 2, "different CAs in the two copies: critical\n{out}");
    assert!(out.contains("differ in dssm-ca.crt"), "{out}");

    let (code, out, err) = env.reconcile(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("plan: repair") && out.contains("spk-utilities's valid copy wins"),
        "{out}"
    );
    assert_eq!(assert_all_copies_identical_and_valid(&env), good);
    let events = env.server.list("events.k8s.io", "events", "spk-ingress");
    assert!(
        events.iter().any(|e| e["reason"] == "Repaired"),
        "{events:?}"
    );
}

#[test]
fn invalid_materials_are_never_copied_over_valid_ones() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&[]).0, 0);
    let good = env.copy("spk-ingress").unwrap();
    env.put_secret(
        "spk-utilities",
        "dssm-certs-secret",
        &[
            ("dssm-ca.crt", b"garbage"),
            ("dssm-cert.crt", b"x"),
            ("dhparam2048.pem", b"y"),
        ],
    );
    let (code, out, err) = env.reconcile(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("plan: repair"), "{out}");
    assert_eq!(assert_all_copies_identical_and_valid(&env), good);
}

/// The hostile-input issue: with the dSSM copy broken, a TMM-namespace copy of another CA was
/// copied into the dSSM namespace. It is replaced by materials under the stored CA instead.
#[test]
fn a_foreign_ca_in_the_tmm_namespace_is_never_copied_into_the_dssm_namespace() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&[]).0, 0);
    let ours = env.copy("spk-utilities").unwrap();
    let foreign = generate(env.dir.path(), &["--key-algorithm", "ecdsa-p256"]);
    let r = |f: &str| read(&foreign.join(f));
    env.put_secret(
        "spk-ingress",
        "dssm-certs-secret",
        &[
            ("dssm-ca.crt", &r("dssm-ca.crt")),
            ("dssm-cert.crt", &r("dssm-cert.crt")),
            ("dhparam2048.pem", &r("dhparam2048.pem")),
        ],
    );
    env.put_secret(
        "spk-ingress",
        "dssm-keys-secret",
        &[("dssm-key.key", &r("dssm-key.key"))],
    );
    env.put_secret(
        "spk-utilities",
        "dssm-certs-secret",
        &[
            ("dssm-ca.crt", b"garbage"),
            ("dssm-cert.crt", b"x"),
            ("dhparam2048.pem", b"y"),
        ],
    );
    let (code, out, err) = env.reconcile(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("is neither the stored CA"), "{out}");
    let after = assert_all_copies_identical_and_valid(&env);
    assert_eq!(ca_of(&after), ca_of(&ours), "still our stored CA");
    assert_ne!(ca_of(&after), r("dssm-ca.crt").as_slice());
}

/// Regression: under the default rolling strategy, replacing a TMM copy of another CA wrote
/// every Secret and marked the target, then the rolling restart refused (old and new pods would
/// refuse each other), and so did every later run. It is refused before anything is written,
/// naming the ways out.
#[test]
fn a_ca_change_the_rolling_restart_cannot_roll_is_refused_before_any_write() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&[]).0, 0);
    let foreign = generate(env.dir.path(), &["--key-algorithm", "ecdsa-p256"]);
    let r = |f: &str| read(&foreign.join(f));
    env.put_secret(
        "spk-ingress",
        "dssm-certs-secret",
        &[
            ("dssm-ca.crt", &r("dssm-ca.crt")),
            ("dssm-cert.crt", &r("dssm-cert.crt")),
            ("dhparam2048.pem", &r("dhparam2048.pem")),
        ],
    );
    env.put_secret(
        "spk-ingress",
        "dssm-keys-secret",
        &[("dssm-key.key", &r("dssm-key.key"))],
    );
    env.server.clear_requests();
    let (code, out, err) = reconcile_default(&env, &["--wait-timeout", "20s"]);
    assert_eq!(code, dssm_certs::exit::FAILED, "{out}{err}");
    assert!(err.contains("Nothing was written"), "{err}");
    assert!(err.contains("rotate --ca"), "{err}");
    env.assert_wrote_only_lease_and_events();
    let dep = env
        .server
        .get("apps", "deployments", &env.tmm_ns, "f5-tmm")
        .unwrap();
    assert!(
        our_annotations(&dep).is_empty(),
        "{:?}",
        our_annotations(&dep)
    );
}

/// The DER of every certificate in `pem`.
fn ders(pem: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = pem;
    while let Ok((tail, p)) = x509_parser::pem::parse_x509_pem(rest) {
        out.push(p.contents);
        rest = tail;
    }
    out
}

/// The trust-boundary issue: a TMM-namespace copy holding our bundle plus one more CA (with our
/// CA's subject) was the repair source whenever the dSSM copy was missing or broken, and its
/// whole bundle reached every namespace; with no stored CA (an adopted seed-made cluster) it won
/// outright. Whichever copies exist, that CA must reach no other namespace, and `check` is
/// Critical on it while a CA is stored.
#[test]
fn a_tmm_copy_with_an_appended_ca_never_reaches_another_namespace() {
    let foreign_dir = tempdir();
    let foreign = generate(foreign_dir.path(), &["--key-algorithm", "ecdsa-p256"]);
    let foreign_ca = ders(&read(&foreign.join("dssm-ca.crt"))).remove(0);
    for stored in [true, false] {
        for dssm in ["missing", "broken", "present"] {
            let name = format!("stored CA: {stored}, dSSM copy {dssm}");
            let env = TestEnv::spk();
            if stored {
                assert_eq!(env.reconcile(&[]).0, 0, "{name}");
            } else {
                seed_secrets(&env);
            }
            let ours = env.copy("spk-utilities").unwrap();
            assert_ne!(
                ders(ca_of(&ours))[0],
                foreign_ca,
                "the same subject, another CA"
            );
            let appended = [&ours[0][..], &read(&foreign.join("dssm-ca.crt"))].concat();
            env.put_secret(
                "spk-ingress",
                "dssm-certs-secret",
                &[
                    ("dssm-ca.crt", &appended),
                    ("dssm-cert.crt", &ours[1]),
                    ("dhparam2048.pem", &ours[3]),
                ],
            );
            if stored {
                let (code, out, _) = env.run(&["check"]);
                assert_eq!(code, 2, "{name}\n{out}");
                assert!(
                    out.contains("CA #2") && out.contains("is neither the stored CA"),
                    "{name}\n{out}"
                );
            }
            match dssm {
                "missing" => {
                    env.server
                        .delete("", "secrets", "spk-utilities", "dssm-certs-secret");
                }
                "broken" => env.put_secret(
                    "spk-utilities",
                    "dssm-certs-secret",
                    &[("dssm-ca.crt", b"garbage")],
                ),
                _ => {}
            }
            let (code, out, err) = env.reconcile(&[]);
            assert_eq!(code, 0, "{name}\n{out}{err}");
            let after = assert_all_copies_identical_and_valid(&env);
            assert!(
                !ders(ca_of(&after)).contains(&foreign_ca),
                "{name}: the appended CA was spread\n{out}"
            );
            assert_eq!(ders(ca_of(&after)).len(), 1, "{name}");
            if stored || dssm == "present" {
                assert_eq!(ca_of(&after), ca_of(&ours), "{name}: still our CA\n{out}");
            }
        }
    }
}

#[test]
fn unusable_materials_everywhere_are_replaced() {
    let env = TestEnv::spk();
    for ns in ["spk-utilities", "spk-ingress"] {
        env.put_secret(
            ns,
            "dssm-certs-secret",
            &[(
                "dssm-ca.crt",
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            )],
        );
    }
    let (code, out, err) = env.reconcile(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("plan: replace-invalid"), "{out}");
    assert!(
        out.contains("spk-utilities/dssm-keys-secret: missing") || out.contains("has no key"),
        "{out}"
    );
    assert_all_copies_identical_and_valid(&env);
}

#[test]
fn an_interrupted_rotation_is_finished_from_the_saved_materials() {
    let env = TestEnv::spk();
    // Every write to the TMM namespace fails: the run stops after the store and the dSSM copies.
    env.server
        .add_fault(Fault::status("POST", "/namespaces/spk-ingress/secrets", 1, 500).repeat(100));
    let (code, out, err) = env.reconcile(&[]);
    assert_eq!(code, 4, "{out}{err}");
    assert!(
        err.contains("secret spk-ingress/dssm-certs-secret") && err.contains("500"),
        "{err}"
    );
    let store = env.secret("spk-utilities", "dssm-ca-key-secret").unwrap();
    assert_eq!(
        store["metadata"]["annotations"]["dssm-certs.f5.com/state"],
        "pending"
    );
    let saved = env.copy("spk-utilities").unwrap();
    assert!(env.copy("spk-ingress").is_none());

    env.server.with_state(|s| s.faults.clear());
    let (code, out, err) = env.reconcile(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("plan: resume"), "{out}");
    let after = assert_all_copies_identical_and_valid(&env);
    assert!(
        after == saved,
        "resumed with the saved materials, not new ones"
    );
    let store = env.secret("spk-utilities", "dssm-ca-key-secret").unwrap();
    assert_eq!(
        store["metadata"]["annotations"]["dssm-certs.f5.com/state"],
        "complete"
    );
    assert_eq!(env.reconcile(&[]).1.lines().next(), Some("plan: nothing"));
}

#[test]
fn a_second_actor_holding_the_lease_makes_reconcile_exit_5_without_writing() {
    let env = TestEnv::spk();
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    env.server.put("coordination.k8s.io", "leases", "spk-utilities", serde_json::json!({
        "metadata": {"name": "dssm-certs"},
        "spec": {"holderIdentity": "other-pod", "leaseDurationSeconds": 600, "acquireTime": now, "renewTime": now},
    }));
    env.server.clear_requests();
    let (code, out, err) = env.reconcile(&[]);
    assert_eq!(code, 5, "{out}{err}");
    assert!(err.contains("held by \"other-pod\""), "{err}");
    assert!(env.writes().is_empty(), "{:?}", env.writes());
}

#[test]
fn a_secret_managed_by_someone_else_is_never_overwritten() {
    let env = TestEnv::spk();
    env.server.put("", "secrets", "spk-ingress", serde_json::json!({
        "metadata": {"name": "dssm-certs-secret", "labels": {"app.kubernetes.io/managed-by": "Helm"}},
        "data": {"dssm-ca.crt": "eA=="},
    }));
    env.server.clear_requests();
    let (code, out, err) = env.reconcile(&[]);
    assert_eq!(code, 4, "{out}{err}");
    assert!(
        err.contains("secret spk-ingress/dssm-certs-secret is managed by Helm"),
        "{err}"
    );
    let writes: Vec<_> = env
        .writes()
        .into_iter()
        .filter(|w| w.path.contains("/secrets"))
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
}

#[test]
fn conflicts_and_transient_errors_are_retried() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&[]).0, 0);
    // A 409 on the first update: observe again, plan again, succeed.
    env.server
        .add_fault(Fault::status("PUT", "/secrets/dssm-certs-secret", 1, 409));
    // 429 and 500 on reads: retried with backoff.
    env.server
        .add_fault(Fault::status("GET", "/secrets/dssm-keys-secret", 1, 429));
    env.server
        .add_fault(Fault::status("GET", "/secrets/dssm-ca-key-secret", 1, 503));
    let (code, out, err) = env.run(&["rotate", "--key-algorithm", "ecdsa-p256"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("observing again"), "{out}");
    assert_all_copies_identical_and_valid(&env);
}

#[test]
fn persistent_server_errors_fail_clearly_after_bounded_retries() {
    let env = TestEnv::spk();
    env.server
        .add_fault(Fault::status("GET", "/secrets/dssm-certs-secret", 1, 500).repeat(1000));
    let (code, _, err) = env.reconcile(&[]);
    assert_eq!(code, 4);
    assert!(
        err.contains("cannot get secret spk-utilities/dssm-certs-secret")
            && err.contains("after 5 attempts"),
        "{err}"
    );
    // Nothing but the RotationFailed Event that tells the operator.
    env.assert_wrote_only_lease_and_events();
    assert!(
        env.writes().iter().all(|w| w.path.ends_with("/events")),
        "{:#?}",
        env.writes()
    );
}

#[test]
fn an_unreachable_api_server_fails_clearly() {
    let env = TestEnv::spk();
    let cfg = std::fs::read_to_string(&env.kubeconfig).unwrap();
    let port = support::redis::free_port();
    let cfg = cfg.replace(&env.server.url, &format!("https://127.0.0.1:{port}"));
    std::fs::write(&env.kubeconfig, cfg).unwrap();
    let (code, _, err) = env.reconcile(&["--api-timeout", "2s"]);
    assert_eq!(code, 4);
    assert!(
        err.contains("unreachable") && err.contains("spk-utilities/dssm-certs-secret"),
        "{err}"
    );
}

#[test]
fn a_missing_tmm_deployment_or_namespace_is_found_before_anything_is_written() {
    let env = TestEnv::spk();
    env.server
        .delete("apps", "deployments", "spk-ingress", "f5-tmm");
    env.server.clear_requests();
    let (code, _, err) = env.reconcile(&[]);
    assert_eq!(code, 4);
    assert!(
        err.contains("deployment spk-ingress/f5-tmm not found"),
        "{err}"
    );
    let secret_writes: Vec<_> = env
        .writes()
        .into_iter()
        .filter(|w| w.path.contains("/secrets"))
        .collect();
    assert!(secret_writes.is_empty(), "{secret_writes:?}");

    // Under the shipped RBAC a namespace we were not given access to (or that does not exist)
    // answers 403, and the message names the verb, the resource and the namespace.
    let mut cmd = bin();
    cmd.env("KUBECONFIG", &env.kubeconfig).args([
        "reconcile",
        "--dssm-namespace",
        "spk-utilities",
        "--tmm-namespace",
        "no-such-ns",
    ]);
    let (code, _, err) = output(&mut cmd);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains(
            "cannot get resource \"secrets\" in API group \"\" in the namespace \"no-such-ns\""
        ),
        "{err}"
    );

    // With unlimited rights, the missing namespace shows as the missing Deployment.
    let admin = TestEnv::new(
        "spk-utilities",
        "spk-ingress",
        dssm_testcluster::ADMIN_TOKEN,
    );
    let mut cmd = bin();
    cmd.env("KUBECONFIG", &admin.kubeconfig).args([
        "reconcile",
        "--key-algorithm",
        "ecdsa-p256",
        "--dhparam",
        "ffdhe2048",
        "--dssm-namespace",
        "spk-utilities",
        "--tmm-namespace",
        "no-such-ns",
    ]);
    let (code, _, err) = output(&mut cmd);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("deployment no-such-ns/f5-tmm not found"),
        "{err}"
    );
    assert!(
        admin.writes().iter().all(|w| !w.path.contains("/secrets")),
        "{:?}",
        admin.writes()
    );
}

#[test]
fn check_on_the_cluster_grades_every_copy() {
    let env = TestEnv::spk();
    let (code, out, _) = env.run(&["check"]);
    assert_eq!(code, 3, "nothing deployed: cannot tell\n{out}");
    assert_eq!(env.reconcile(&["--days", "20"]).0, 0);
    let (code, out, _) = env.run(&["check", "-o", "json"]);
    assert_eq!(code, 1, "20 days left: warning\n{out}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["copies"][0]["source"], "namespace/spk-utilities");
    assert_eq!(r["copies"][1]["source"], "namespace/spk-ingress");
    assert_eq!(r["checks"][0]["name"], "copies-in-sync");
    // The CA key Secret is checked against the CA in the dSSM copy.
    assert!(r["copies"][0]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == "ca-key" && c["status"] == "ok"));
    let _ = Duration::from_secs(0);
}

#[test]
fn a_request_that_times_out_is_retried() {
    let env = TestEnv::spk();
    // The first read of the TMM copy hangs for 3s; with a 1s request timeout it is abandoned
    // and retried.
    env.server.add_fault(Fault::delay(
        "GET",
        "/namespaces/spk-ingress/secrets/dssm-certs-secret",
        1,
        Duration::from_secs(3),
    ));
    let (code, out, err) = env.reconcile(&["--api-timeout", "1s", "--no-restart"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_all_copies_identical_and_valid(&env);
}

#[test]
fn after_a_failure_the_next_reconcile_finishes_the_job() {
    let env = TestEnv::spk();
    // The TMM keys Secret cannot be written: a persistent 503.
    env.server
        .add_fault(Fault::status("POST", "/namespaces/spk-ingress/secrets", 2, 503).repeat(5));
    let (code, _, err) = env.reconcile(&["--no-restart"]);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("cannot create secret spk-ingress/dssm-keys-secret") && err.contains("503"),
        "{err}"
    );
    let (code, out, err) = env.reconcile(&["--no-restart"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("plan: resume"), "{out}");
    assert_all_copies_identical_and_valid(&env);
}

#[test]
fn a_secret_missing_a_key_is_invalid_and_named() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    let good = env.copy("spk-utilities").unwrap();
    env.put_secret(
        "spk-ingress",
        "dssm-keys-secret",
        &[("wrong-name.key", &good[2])],
    );
    let (code, out, _) = env.run(&["check"]);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("spk-ingress/dssm-keys-secret[dssm-key.key]: not found"),
        "{out}"
    );
    let (code, out, err) = env.reconcile(&["--no-restart"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("plan: repair")
            && out.contains("spk-ingress/dssm-keys-secret: has no key dssm-key.key"),
        "{out}"
    );
    assert_eq!(assert_all_copies_identical_and_valid(&env), good);
}

#[test]
fn two_rotations_started_at_once_one_runs_the_other_exits_5() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    let revision = || {
        env.secret("spk-ingress", "dssm-certs-secret").unwrap()["metadata"]["annotations"]
            ["dssm-certs.f5.com/revision"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let before = revision();
    // The first Secret write of whoever wins the Lease is held 3 s, so the two runs overlap
    // for sure: the other one must find the Lease held.
    env.server
        .add_fault(Fault::delay("PUT", "/secrets/", 1, Duration::from_secs(3)));
    let spawn = |pod: &str| {
        bin_without_redis()
            .env("KUBECONFIG", &env.kubeconfig)
            .env("POD_NAME", pod)
            .args([
                "rotate",
                "--key-algorithm",
                "ecdsa-p256",
                "--dssm-namespace",
                "spk-utilities",
                "--tmm-namespace",
                "spk-ingress",
            ])
            .output()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| spawn("rotate-a"));
        let b = s.spawn(|| spawn("rotate-b"));
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    let mut codes = [a.status.code().unwrap(), b.status.code().unwrap()];
    codes.sort();
    // Exactly one ran while the other found the Lease held: never both, never neither.
    assert_eq!(
        codes,
        [0, 5],
        "{} {}",
        String::from_utf8_lossy(&a.stderr),
        String::from_utf8_lossy(&b.stderr)
    );
    assert_eq!(revision(), before + 1, "exactly one rotation was written");
    assert_all_copies_identical_and_valid(&env);
    let lease = env
        .server
        .get(
            "coordination.k8s.io",
            "leases",
            "spk-utilities",
            "dssm-certs",
        )
        .unwrap();
    assert!(
        lease["spec"]["holderIdentity"].is_null(),
        "released: {lease}"
    );
}

/// `reconcile` as the CronJob and the agent run it: no strategy flag (the default, rolling).
fn reconcile_default(env: &TestEnv, extra: &[&str]) -> (i32, String, String) {
    let mut cmd = bin();
    cmd.env_remove("DSSM_CERTS_STRATEGY")
        .env("KUBECONFIG", &env.kubeconfig)
        .env("HOME", env.dir.path())
        .args([
            "reconcile",
            "--key-algorithm",
            "ecdsa-p256",
            "--dhparam",
            "ffdhe2048",
        ])
        .args(["--dssm-namespace", &env.dssm_ns])
        .args(env.tmm_args())
        .args(extra);
    output(&mut cmd)
}

/// name -> uid of every pod: a restarted pod has a new uid.
fn pod_uids(env: &TestEnv) -> std::collections::BTreeMap<String, String> {
    [&env.dssm_ns, &env.tmm_ns]
        .iter()
        .flat_map(|ns| env.server.list("", "pods", ns))
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_string(),
                p["metadata"]["uid"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn all_ready(env: &TestEnv) -> bool {
    let pods: Vec<_> = [&env.dssm_ns, &env.tmm_ns]
        .iter()
        .flat_map(|ns| env.server.list("", "pods", ns))
        .collect();
    pods.len() == 9 && pods.iter().all(apiserver::controllers::pod_ready)
}

/// Nothing was restarted: no eviction, no pod deleted, no TMM workload patched or scaled, and
/// every pod is the one that was there before.
fn assert_restarted_nothing(env: &TestEnv, before: &std::collections::BTreeMap<String, String>) {
    let reqs = env.server.requests();
    let restarts: Vec<_> = reqs
        .iter()
        .filter(|r| {
            r.path.ends_with("/eviction")
                || r.path.ends_with("/scale")
                || (r.method == "DELETE" && r.path.contains("/pods"))
                || (r.method != "GET" && r.path.contains("/deployments/"))
        })
        .map(|r| (&r.method, &r.path))
        .collect();
    assert!(restarts.is_empty(), "{restarts:?}");
    // Pods created since (an OrderedReady StatefulSet's next ordinals) are new, not replaced.
    let after = pod_uids(env);
    for (name, uid) in before {
        assert_eq!(
            after.get(name),
            Some(uid),
            "pod {name} was replaced: {after:?}"
        );
    }
    let dep = env
        .server
        .get("apps", "deployments", &env.tmm_ns, "f5-tmm")
        .unwrap();
    assert!(
        our_annotations(&dep).is_empty(),
        "{:?}",
        our_annotations(&dep)
    );
}

// Regression: with the default strategy, a fresh install deadlocked. The pods wait for the
// Secrets (ContainerCreating), and `reconcile` waited for them in its pre-flight, then refused
// with nothing written after --wait-timeout.
#[test]
fn a_fresh_install_is_published_restarts_nothing_and_its_waiting_pods_come_up() {
    let env = TestEnv::spk_fresh(
        apiserver::SecretMount::Required,
        apiserver::SecretMount::Required,
    );
    assert!(
        // OrderedReady (the API default): each StatefulSet's ordinal 0 waits, and the next
        // ordinals are created only once it is Ready; TMM's 3 pods wait.
        pod_uids(&env).len() == 5 && !all_ready(&env),
        "the pods should wait for their Secrets: {:?}",
        pod_uids(&env)
    );
    let before = pod_uids(&env);
    // The dry run says so too, and marks nothing.
    let (code, out, err) = reconcile_default(&env, &["--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("first publication") && !out.contains("would mark"),
        "{out}"
    );

    env.server.clear_requests();
    let (code, out, err) = reconcile_default(&env, &["--wait-timeout", "60s"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("plan: publish"), "{out}");
    assert!(
        out.contains("first publication: none of our Secrets exist yet; 5 pods are waiting"),
        "{out}"
    );
    assert!(
        out.contains("dSSM pods in spk-utilities are Running and Ready"),
        "{out}"
    );
    assert!(out.contains("f5-tmm is available"), "{out}");
    // The handshake is tried (the Service name does not resolve outside a cluster).
    assert!(out.contains("probe"), "{out}");
    assert!(all_ready(&env), "not every pod is Ready after the run");
    assert_all_copies_identical_and_valid(&env);
    assert_restarted_nothing(&env, &before);

    // The second run (the next CronJob) is a no-op.
    env.server.clear_requests();
    let (code, out, err) = reconcile_default(&env, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("plan: nothing"), "{out}");
    assert!(
        env.server.requests().iter().all(|r| !r.is_write()),
        "{:?}",
        env.writes()
    );
    assert_restarted_nothing(&env, &before);
}

/// Pods that run although the Secrets are missing: the publication restarts none of them
/// (a pod that does not mount the Secrets gains nothing; one that mounts them optional runs a
/// process that started without them) and names each, with what to do.
#[test]
fn pods_running_without_the_secrets_mounted_are_named_and_not_restarted() {
    use apiserver::SecretMount::{None as Unmounted, Optional};
    for (dssm, tmm, dssm_says, tmm_says) in [
        (
            Optional,
            Unmounted,
            "mounts them optional: true",
            "does not mount them",
        ),
        (
            Unmounted,
            Optional,
            "does not mount them",
            "mounts them optional: true",
        ),
    ] {
        let env = TestEnv::spk_fresh(dssm, tmm);
        assert!(all_ready(&env));
        let before = pod_uids(&env);
        env.server.clear_requests();
        let (code, out, err) = reconcile_default(&env, &["--wait-timeout", "60s"]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            out.contains("0 pods are waiting")
                && out.contains(&format!("pod spk-utilities/f5-dssm-db-0 ({dssm_says})"))
                && out.contains(&format!("({tmm_says})"))
                && out.contains("not restarted")
                && out.contains("dssm-certs restart"),
            "{out}"
        );
        assert_all_copies_identical_and_valid(&env);
        assert_restarted_nothing(&env, &before);
        let events = env.server.list("events.k8s.io", "events", "spk-ingress");
        assert!(
            events.iter().any(|e| e["reason"] == "Published"
                && e["type"] == "Warning"
                && e["note"].as_str().unwrap().contains(dssm_says)),
            "{events:?}"
        );
        let (code, out, _) = reconcile_default(&env, &[]);
        assert_eq!(
            (code, out.lines().next()),
            (0, Some("plan: nothing")),
            "{out}"
        );
        assert_restarted_nothing(&env, &before);
    }
}

// Regression: a transient API error inside a wait ended it after `call`'s retries (about 3 s),
// so an API server restart during a rotation failed it. Here: 10 s of 503s (and every open
// watch cut) while the first publication waits for its pods.
#[test]
fn a_ten_second_api_outage_during_a_wait_is_waited_out() {
    let env = TestEnv::spk_fresh(
        apiserver::SecretMount::Required,
        apiserver::SecretMount::Required,
    );
    // The pods come up in the middle of the outage.
    env.server
        .with_state(|s| s.timing.pod_start = Duration::from_secs(4));
    let run = std::thread::scope(|scope| {
        let run = scope.spawn(|| reconcile_default(&env, &["--wait-timeout", "90s"]));
        // Once the last write (the store marked complete) is done: the run is waiting.
        env.server
            .wait_until("the publication complete", Duration::from_secs(60), |s| {
                s.get(
                    apiserver::resource("", "secrets"),
                    "spk-utilities",
                    "dssm-ca-key-secret",
                )
                .is_some_and(|c| {
                    c["metadata"]["annotations"]["dssm-certs.f5.com/state"] == "complete"
                })
            });
        env.server.with_state(|s| s.end_watches());
        env.server.add_fault(Fault::outage(Duration::from_secs(10)));
        run.join().unwrap()
    });
    let (code, out, err) = run;
    assert_eq!(code, 0, "{out}{err}");
    let refused = env
        .server
        .requests()
        .iter()
        .filter(|r| r.status == 503)
        .count();
    assert!(
        refused >= 3,
        "the outage was not met ({refused} requests answered 503): {err}"
    );
    assert!(
        out.contains("dSSM pods in spk-utilities are Running and Ready"),
        "{out}"
    );
    assert!(all_ready(&env));
}

/// `rotate --ca` on the real-process bed with the dSSM endpoints `endpoints` (and `extra`).
fn rotate_ca_on_bed(
    env: &TestEnv,
    bed: &support::dssm_pods::Bed,
    cmd: &str,
    endpoints: &str,
    extra: &[&str],
) -> (i32, String, String) {
    let mut args = vec![cmd, "--key-algorithm", "ecdsa-p256"];
    if cmd == "rotate" {
        args.insert(1, "--ca");
    }
    args.extend_from_slice(extra);
    let mut c = support::dssm_pods::command(env, bed, &args);
    c.env("DSSM_CERTS_REDIS_ENDPOINT", endpoints);
    output(&mut c)
}

// Regression: a CA rotation's phases were pre-flighted once, at the start: a phase (or a resumed
// one) went out into a dSSM with a sentinel unreachable or not monitoring the master.
#[test]
fn each_ca_rotation_phase_and_every_resume_is_preflighted_and_refused_before_its_first_write() {
    use support::dssm_pods::{self, Bed};
    let env = dssm_pods::published();
    let (bed, load) = Bed::start(&env, support::load::LoadConfig::default());
    load.settle();
    let before = env.copy(&env.dssm_ns).unwrap();
    // sentinel-2 unreachable (its endpoint a closed port): the trust phase is refused.
    let broken: String = bed
        .redis_endpoints
        .split(',')
        .map(|e| {
            if e.starts_with("f5-dssm-sentinel-2=") {
                "f5-dssm-sentinel-2=127.0.0.1:1".to_string()
            } else {
                e.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    let (code, out, err) = rotate_ca_on_bed(&env, &bed, "rotate", &broken, &[]);
    assert_eq!(code, 6, "{out}{err}");
    assert!(
        err.contains("pre-flight refused phase 1 of 3 (trust)")
            && err.contains("sentinel pod spk-utilities/f5-dssm-sentinel-2: cannot reach it"),
        "{err}"
    );
    assert_eq!(
        env.copy(&env.dssm_ns).unwrap(),
        before,
        "the trust phase was written"
    );
    assert_eq!(env.copy(&env.tmm_ns).unwrap(), before);
    let store = env.secret(&env.dssm_ns, "dssm-ca-key-secret").unwrap();
    assert!(
        store["metadata"]["annotations"]["dssm-certs.f5.com/rotation"]
            .as_str()
            .is_some_and(|r| r.contains("trust")),
        "{store}"
    );
    // The resume is pre-flighted too: a master name no sentinel monitors is refused.
    let (code, out, err) = rotate_ca_on_bed(
        &env,
        &bed,
        "reconcile",
        &bed.redis_endpoints,
        &["--redis-master-name", "not-monitored"],
    );
    assert_eq!(code, 6, "{out}{err}");
    assert!(
        err.contains("pre-flight refused phase 1 of 3 (trust)") && err.contains("CKQUORUM"),
        "{err}"
    );
    assert_eq!(env.copy(&env.dssm_ns).unwrap(), before);
    // Fixed: the next run resumes, each phase pre-flighted, and finishes unnoticed.
    let (code, out, err) = rotate_ca_on_bed(&env, &bed, "reconcile", &bed.redis_endpoints, &[]);
    assert_eq!(code, 0, "{out}{err}");
    for n in 1..=3 {
        assert!(out.contains(&format!("pre-flight for phase {n} ")), "{out}");
    }
    assert!(out.contains("CA rotation complete"), "{out}");
    let (figures, _) = support::dssm_pods::finish(bed, load);
    figures.assert_unnoticed("a CA rotation refused twice by its pre-flight, then resumed");
}

// Regression: SIGTERM dropped the dSSM roll wherever it was (a paused switchover included) and
// left the Lease held. Now the step in progress finishes, no other starts, and the Lease goes.
#[test]
fn sigterm_mid_dssm_roll_stops_at_the_next_safe_point_and_the_next_run_finishes() {
    use std::io::BufRead;
    use support::dssm_pods::{self, Bed};
    let env = dssm_pods::published();
    let (bed, load) = Bed::start(&env, support::load::LoadConfig::default());
    load.settle();
    let mut child = dssm_pods::command(&env, &bed, &dssm_pods::rotate_args(false, None))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = Vec::new();
    let mut planned = 0;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        planned += usize::from(line.starts_with("  plan: "));
        let first_done = line.starts_with("  done: ");
        lines.push(line);
        if first_done {
            let pid = child.id().to_string();
            assert!(std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success());
        }
    }
    let out = child.wait_with_output().unwrap();
    let (stdout, err) = (lines.join("\n"), String::from_utf8_lossy(&out.stderr));
    assert_ne!(out.status.code(), Some(0), "{stdout}\n{err}");
    assert!(
        err.contains("stopping at the next safe point")
            && (err.contains("interrupted by a signal") || err.contains("asked to stop")),
        "{stdout}\n{err}"
    );
    let done = lines.iter().filter(|l| l.starts_with("  done: ")).count();
    assert!(
        (1..planned).contains(&done),
        "{done} of {planned} steps done: {stdout}"
    );
    let lease = env
        .server
        .get("coordination.k8s.io", "leases", &env.dssm_ns, "dssm-certs")
        .unwrap();
    assert!(lease["spec"]["holderIdentity"].is_null(), "{lease}");
    // The next run (the restart is still marked) finishes it.
    let (code, out, err) = dssm_pods::run(&env, &bed, &["reconcile"]);
    assert_eq!(code, 0, "{out}{err}");
    let (figures, _) = support::dssm_pods::finish(bed, load);
    figures.assert_unnoticed("a leaf renewal stopped by SIGTERM mid-roll, then finished");
}

/// Forwards every connection to 127.0.0.1:`target` once it is set: an address known before the
/// processes behind it exist (the probe's, given on the command line).
fn forwarder(target: std::sync::Arc<std::sync::OnceLock<String>>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let (Ok(client), Some(to)) = (conn, target.get()) else {
                continue;
            };
            let Ok(server) = std::net::TcpStream::connect(to.as_str()) else {
                continue;
            };
            for (mut from, mut into) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    port
}

// The fresh install on real Redis: the dSSM processes start only once kubelet could mount the
// published Secrets, and `reconcile` with default settings waits for them and proves mTLS
// through a sentinel with the published materials.
#[test]
fn a_fresh_install_on_real_redis_comes_up_on_the_published_secrets_with_mtls_proven() {
    let env = TestEnv::spk_fresh(
        apiserver::SecretMount::Required,
        apiserver::SecretMount::Required,
    );
    // From now on the dSSM pods are Ready when their processes are (below).
    env.server
        .with_state(|s| s.never_ready.push("f5-dssm-".into()));
    let before = pod_uids(&env);
    let sentinel = std::sync::Arc::new(std::sync::OnceLock::new());
    let probe = format!("127.0.0.1:{}", forwarder(sentinel.clone()));
    let (code, out, err, _topology) = std::thread::scope(|scope| {
        let kubelet = scope.spawn(|| {
            let files = redis::wait_for("the published Secrets", Duration::from_secs(60), || {
                let certs = env.secret("spk-utilities", "dssm-certs-secret")?;
                let keys = env.secret("spk-utilities", "dssm-keys-secret")?;
                Some((certs["data"].clone(), keys["data"].clone()))
            });
            let mount = env.dir.path().join("mount");
            std::fs::create_dir_all(&mount).unwrap();
            for data in [files.0, files.1] {
                for (key, value) in data.as_object().unwrap() {
                    use base64::Engine;
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(value.as_str().unwrap())
                        .unwrap();
                    std::fs::write(mount.join(key), bytes).unwrap();
                }
            }
            let topology = redis::Topology::start(&mount);
            sentinel.set(topology.get("sentinel-0").endpoint()).unwrap();
            env.server.with_state(|s| {
                s.never_ready.clear();
                s.timing.pod_start = Duration::ZERO;
            });
            topology
        });
        let (code, out, err) = reconcile_default(
            &env,
            &[
                "--wait-timeout",
                "120s",
                "--probe-endpoint",
                &probe,
                "--probe-server-name",
                "f5-dssm-sentinel",
            ],
        );
        (code, out, err, kubelet.join().unwrap())
    });
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("plan: publish") && out.contains("5 pods are waiting"),
        "{out}"
    );
    assert!(out.contains("probe: "), "mTLS not proven: {out}");
    assert!(!out.contains("probe skipped"), "{out}");
    assert!(all_ready(&env));
    assert_restarted_nothing(&env, &before);
    let (code, out, _) = reconcile_default(&env, &[]);
    assert_eq!(
        (code, out.lines().next()),
        (0, Some("plan: nothing")),
        "{out}"
    );
}

// The fresh install on the real-process bed under client load: the processes and the TMM-like
// clients start once the Secrets are published (they had none to start with), the dSSM pods
// that waited are adopted as those processes, and the default `reconcile` waits for them all,
// proves mTLS and restarts nothing: no operation failed, no acknowledged write lost.
#[test]
fn a_fresh_install_under_client_load_comes_up_with_no_failed_operation() {
    let env = TestEnv::spk_fresh(
        apiserver::SecretMount::Required,
        apiserver::SecretMount::Required,
    );
    env.server
        .with_state(|s| s.never_ready.push("f5-dssm-".into()));
    let before = pod_uids(&env);
    let sentinel = std::sync::Arc::new(std::sync::OnceLock::new());
    let probe = format!("127.0.0.1:{}", forwarder(sentinel.clone()));
    let cfg = support::load::LoadConfig::default();
    let ((code, out, err), (bed, load)) = std::thread::scope(|scope| {
        let bed = scope.spawn(|| {
            let at = |b: &support::dssm_pods::Bed| sentinel.set(b.sentinel.clone()).unwrap();
            support::dssm_pods::start_when_published(&env, cfg, Duration::from_secs(100), at)
        });
        let run = reconcile_default(
            &env,
            &[
                "--wait-timeout",
                "120s",
                "--probe-endpoint",
                &probe,
                "--probe-server-name",
                "f5-dssm-sentinel",
            ],
        );
        (run, bed.join().unwrap())
    });
    // Some load after the run too: the clients keep working on the published materials.
    std::thread::sleep(Duration::from_secs(1));
    let (figures, _) = support::dssm_pods::finish(bed, load);
    eprintln!("fresh install under load: {figures:?}");
    let dssm: Vec<_> = env
        .server
        .list("", "pods", "spk-utilities")
        .iter()
        .map(|p| format!("{} {}", p["metadata"]["name"], p["status"]["phase"]))
        .collect();
    assert_eq!(code, 0, "{out}{err}\ndSSM pods: {dssm:?}");
    assert!(
        out.contains("first publication: none of our Secrets exist yet; 5 pods are waiting")
            && out.contains("probe: ")
            && !out.contains("probe skipped"),
        "{out}"
    );
    assert!(all_ready(&env), "{out}");
    assert_restarted_nothing(&env, &before);
    // TMM had no Ready pod before its Secrets existed: a fresh install, nothing to keep up.
    assert!(
        figures.acked > 0 && figures.samples > 0,
        "no load: {figures:?}"
    );
    assert_eq!(figures.failed_after_retry, 0, "{figures:?}");
    assert_eq!(figures.lost, 0, "{figures:?}");
    assert!(
        figures.min_dbs_up >= 2 && figures.min_sentinels_up >= 2,
        "{figures:?}"
    );
}

// A first publication that stopped after the dSSM copies (here: the TMM namespace refused the
// write) left the dSSM pods started and TMM's waiting. The next run finishes the publication
// from the saved materials as a first publication: no pre-flight waiting for TMM pods that only
// it can start, no restart.
#[test]
fn a_first_publication_stopped_after_the_dssm_copies_is_finished_without_a_restart() {
    let env = TestEnv::spk_fresh(
        apiserver::SecretMount::Required,
        apiserver::SecretMount::Required,
    );
    let before = pod_uids(&env);
    env.server.add_fault(Fault::status(
        "POST",
        "/namespaces/spk-ingress/secrets",
        1,
        403,
    ));
    let (code, out, err) = reconcile_default(&env, &["--wait-timeout", "30s"]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(env.secret("spk-utilities", "dssm-keys-secret").is_some());
    assert!(env.secret("spk-ingress", "dssm-certs-secret").is_none());
    let (code, out, err) = reconcile_default(&env, &["--wait-timeout", "30s"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("plan: resume") && out.contains("first publication"),
        "{out}"
    );
    assert!(all_ready(&env), "{out}");
    assert_all_copies_identical_and_valid(&env);
    assert_restarted_nothing(&env, &before);
}

/// A fresh install published by the default `reconcile`, every pod up on the Secrets.
fn published_fresh_install() -> TestEnv {
    let env = TestEnv::spk_fresh(
        apiserver::SecretMount::Required,
        apiserver::SecretMount::Required,
    );
    let (code, out, err) = reconcile_default(&env, &["--wait-timeout", "60s"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(all_ready(&env), "{out}");
    env
}

// Regression: Secrets deleted while the pods run on them (an operator forcing a new key, or a
// restore that lost them) were republished as a first publication: nothing was restarted, so
// the running processes kept the old files and the key meant to be dropped. Here the CA key
// Secret stays: the new leaf is signed by the same CA. Run with scale-to-zero, since the point
// is that the pods are restarted (the rolling roll needs real Redis: the real-process bed).
#[test]
fn secrets_deleted_while_pods_run_on_them_are_republished_and_every_pod_restarted() {
    let env = published_fresh_install();
    let old_key = env.secret("spk-utilities", "dssm-keys-secret").unwrap()["data"].clone();
    env.delete_copies();
    let before = pod_uids(&env);
    let (code, out, err) = env.reconcile(&["--wait-timeout", "60s"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("plan: publish")
            && out.contains("not a first publication")
            && out.contains("pod spk-utilities/f5-dssm-db-0"),
        "{out}"
    );
    let after = pod_uids(&env);
    let kept: Vec<_> = before
        .iter()
        .filter(|(_, uid)| after.values().any(|u| u == *uid))
        .collect();
    assert!(kept.is_empty(), "pods not restarted: {kept:?}\n{out}");
    assert!(all_ready(&env), "{out}");
    assert_all_copies_identical_and_valid(&env);
    let new_key = env.secret("spk-utilities", "dssm-keys-secret").unwrap()["data"].clone();
    assert_ne!(old_key, new_key, "the key was not replaced");
    let (code, out, _) = env.reconcile(&[]);
    assert_eq!(
        (code, out.lines().next()),
        (0, Some("plan: nothing")),
        "{out}"
    );
}

// Regression: with the CA key Secret deleted too, the republication brings a new CA, which the
// pods running on the deleted Secrets do not trust: the rolling restart (the default) would
// have old and new pods refuse each other. It is refused before any write, naming the pods and
// scale-to-zero (before: published, nothing restarted, the old key kept in use).
#[test]
fn secrets_and_ca_deleted_while_pods_run_are_refused_by_the_rolling_default_before_any_write() {
    let env = published_fresh_install();
    env.delete_copies();
    assert!(env
        .server
        .delete("", "secrets", "spk-utilities", "dssm-ca-key-secret")
        .is_some());
    env.server.clear_requests();
    let (code, out, err) = reconcile_default(&env, &["--wait-timeout", "30s"]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("pod spk-ingress/f5-tmm-")
            && err.contains("deleted since they started")
            && err.contains("--strategy scale-to-zero")
            && err.contains("Nothing was written"),
        "{out}{err}"
    );
    env.assert_wrote_only_lease_and_events();
    assert!(env.secret("spk-utilities", "dssm-certs-secret").is_none());
}

// Regression: a partial first publication deadlocked. A TMM namespace added to a running,
// published install (here spk-ingress-b, under spk-multi's RBAC) has pods waiting for Secrets
// that only the publication writes there; the pre-flight waited for their rollout, then refused
// after --wait-timeout with nothing written, on every run. Now they are left out of the
// pre-flight and not marked: published, then waited for, and nothing is restarted.
#[test]
fn a_new_tmm_namespace_waiting_for_the_secrets_is_published_and_comes_up_without_a_deadlock() {
    use apiserver::SecretMount::Required;
    let mut env = TestEnv::spk_fresh_in(
        &["spk-ingress-a", "spk-ingress-b"],
        "spk-multi",
        Required,
        Required,
    );
    env.tmm_targets = vec!["spk-ingress-a/deployment/f5-tmm".into()];
    let (code, out, err) = reconcile_default(&env, &["--wait-timeout", "60s"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(all_ready(&env), "{out}");
    // The new target: TMM's Deployment copied into spk-ingress-b, its pods waiting.
    let tmm = env
        .server
        .get("apps", "deployments", "spk-ingress-a", "f5-tmm")
        .unwrap();
    let copy = serde_json::json!({"metadata": {"name": "f5-tmm",
        "labels": tmm["metadata"]["labels"].clone()}, "spec": tmm["spec"].clone()});
    env.server.put("apps", "deployments", "spk-ingress-b", copy);
    let waiting = |s: &apiserver::State| {
        let pods = s.list(apiserver::resource("", "pods"), Some("spk-ingress-b"));
        pods.len() == 3
            && pods.iter().all(|p| {
                p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                    == "ContainerCreating"
            })
    };
    env.server.wait_until(
        "spk-ingress-b's pods waiting",
        Duration::from_secs(30),
        waiting,
    );
    env.tmm_targets
        .push("spk-ingress-b/deployment/f5-tmm".into());
    let before = pod_uids(&env);
    env.server.clear_requests();
    let (code, out, err) = reconcile_default(&env, &["--wait-timeout", "60s"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("plan: repair")
            && out.contains("first publication into namespaces without our Secrets: 3 pods")
            && out.contains("deployment spk-ingress-b/f5-tmm is available"),
        "{out}"
    );
    let b = env.server.list("", "pods", "spk-ingress-b");
    assert!(
        b.len() == 3 && b.iter().all(apiserver::controllers::pod_ready),
        "{b:?}"
    );
    assert_restarted_nothing(&env, &before);
    let (code, out, _) = reconcile_default(&env, &[]);
    assert_eq!(
        (code, out.lines().next()),
        (0, Some("plan: nothing")),
        "{out}"
    );
}

// An eviction answered 503 more times than one call retries (an API server restarting) is
// retried until --wait-timeout instead of failing the restart after about 3 s.
#[test]
fn evictions_outlive_a_burst_of_server_errors() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    env.server
        .add_fault(Fault::status("POST", "/eviction", 1, 503).repeat(8));
    let (code, out, err) = env.run(&["restart", "--wait-timeout", "60s"]);
    assert_eq!(code, 0, "{out}{err}");
    let refused = env
        .server
        .requests()
        .iter()
        .filter(|r| r.status == 503 && r.path.ends_with("/eviction"))
        .count();
    assert_eq!(refused, 8, "{out}");
    assert!(out.contains("dSSM pods in spk-utilities are back"), "{out}");
}

/// Regression: a repair of a TMM copy only rolled dSSM too (every sentinel restarted, every DB
/// reloaded) though its copy had not changed. Now the TMM copy (deleted there) is restored and
/// TMM rolled, and dSSM, whose processes prove by new handshakes that they already run the
/// dSSM copy, is left alone: no pod restarted, no reload, as the real-process bed counts them.
#[test]
fn a_repair_of_the_tmm_copy_rolls_tmm_and_leaves_dssm_untouched() {
    let env = support::dssm_pods::published();
    let (bed, load) = support::dssm_pods::Bed::start(&env, support::load::LoadConfig::default());
    load.settle();
    env.server
        .delete("", "secrets", &env.tmm_ns, "dssm-certs-secret")
        .expect("the TMM copy existed");
    let (code, out, err) = support::dssm_pods::run(&env, &bed, &["reconcile"]);
    let (f, b) = support::dssm_pods::finish(bed, load);
    eprintln!("repair of the TMM copy: {f:?} {b:?}\n{out}{err}");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("plan: repair"), "{out}");
    assert_eq!(f.sentinel_starts, 0, "no sentinel restarted: {f:?}");
    assert_eq!(f.db_starts, 0, "no DB restarted: {f:?}");
    assert_eq!(f.db_reloads, 0, "no DB reloaded: {f:?}");
    assert_eq!(
        b.new_tmm_pods.get("spk-ingress"),
        Some(&3),
        "TMM rolled once: {b:?}"
    );
    assert!(
        out.contains(
            "restarts: 3 TMM pods replaced, 0 sentinel restarts, 0 DB restarts, 0 DB reloads"
        ),
        "{out}"
    );
    f.assert_unnoticed("a repair of the TMM copy");
}
