//! Real Redis: what dssm-certs generates really works for dSSM (Redis DB + Sentinel over mutual
//! TLS), before and after a rotation. Needs redis-server and redis-sentinel (scripts/setup-tests); a
//! missing binary fails the test.

use testkit as support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use dssm_certs::pki::PrivateKey;
use dssm_certs::probe::{ClientMaterials, Prober, VerifyPath};
use dssm_certs::redis::ClientIdentity;
use support::redis::*;
use support::*;

const SETTLE: Duration = Duration::from_secs(90);

/// `generate` into `dir/name`, then mount the Secrets' data into `dir/name-mount`.
fn materials(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let out = generate(&dir.join(name), extra);
    mount_from_manifests(&out, &dir.join(format!("{name}-mount")))
}

fn client(mount: &Path, with_cert: bool) -> Prober {
    let m = ClientMaterials {
        ca_cert: read(&mount.join("dssm-ca.crt")),
        leaf_cert: read(&mount.join("dssm-cert.crt")),
        leaf_key: PrivateKey::from_pem(&read(&mount.join("dssm-key.key")), "dssm-key.key").unwrap(),
    };
    let identity = if with_cert {
        ClientIdentity::Presented
    } else {
        ClientIdentity::Withheld
    };
    Prober::new(&m, identity).unwrap()
}

fn pong(prober: &Prober, port: u16) -> bool {
    let r = prober.ping(&endpoint(port), "f5-dssm-sentinel", Duration::from_secs(5));
    r.reply.as_deref() == Some("+PONG")
}

/// Mounted materials, and a renewed leaf under the same CA (`generate --ca-cert --ca-key`).
fn old_and_renewed_under_the_same_ca(dir: &Path) -> (PathBuf, PathBuf) {
    let old = materials(dir, "old", &["--key-algorithm", "ecdsa-p256"]);
    let m = dir.join("old/out");
    let renewed = generate(
        &dir.join("new"),
        &[
            "--key-algorithm",
            "ecdsa-p256",
            "--days",
            "300",
            "--ca-cert",
            m.join("dssm-ca.crt").to_str().unwrap(),
            "--ca-key",
            m.join("dssm-ca.key").to_str().unwrap(),
        ],
    );
    (old, mount_from_manifests(&renewed, &dir.join("new-mount")))
}

/// `dssm-certs probe` (the binary) against a sentinel and a DB.
fn probe_bin(mount: &Path, sentinel: u16, db: u16) -> (i32, serde_json::Value) {
    let (code, stdout, stderr) = run(&[
        "probe",
        "--dir",
        mount.to_str().unwrap(),
        "--endpoint",
        &endpoint(sentinel),
        "--db-endpoint",
        &endpoint(db),
        "--server-name",
        "f5-dssm-sentinel",
        "-o",
        "json",
    ]);
    (
        code,
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}{stderr}")),
    )
}

#[test]
fn generated_materials_run_a_tls_only_dssm_topology() {
    for alg in ["rsa4096", "ecdsa-p384"] {
        let tmp = tempdir();
        let mount = materials(
            tmp.path(),
            "m",
            &["--key-algorithm", alg, "--namespace", "spk-utilities"],
        );
        // start() waits for: six processes answering PING over TLS with the client cert, both
        // replicas `master_link_status:up`, all sentinels agreeing on the primary and each
        // seeing two replicas and the two other sentinels.
        let t = Topology::start(&mount);
        assert_eq!(t.agreed_primary(), Some(t.primary_port));
        for p in &t.procs {
            let conf = std::fs::read_to_string(p.dir.join("redis.conf")).unwrap();
            assert!(
                conf.contains("port 0\n") && conf.contains("tls-auth-clients yes"),
                "TLS only"
            );
        }
        let c = client(&mount, true);
        for p in &t.procs {
            assert!(pong(&c, p.port), "{alg}: {} did not PONG", p.name);
        }
        let (code, report) = probe_bin(&mount, t.get("sentinel-0").port, t.get("db-1").port);
        assert_eq!(code, 0, "{report:#}");
        for e in report["endpoints"].as_array().unwrap() {
            assert_eq!(e["reply"], "+PONG");
            assert_eq!(e["verify_path"], "webpki");
            assert_eq!(e["served"]["matches_deployed_leaf"], true);
        }
    }
}

#[test]
fn clients_without_a_certificate_or_from_another_ca_are_refused() {
    let tmp = tempdir();
    let mount = materials(tmp.path(), "m", &["--key-algorithm", "ecdsa-p256"]);
    let other = materials(tmp.path(), "other", &["--key-algorithm", "ecdsa-p256"]);
    let t = Topology::start(&mount);
    for p in [t.get("db-0"), t.get("sentinel-0")] {
        let no_cert = client(&mount, false);
        let r = no_cert.ping(
            &endpoint(p.port),
            "f5-dssm-sentinel",
            Duration::from_secs(5),
        );
        assert_eq!(r.reply, None, "{}: {r:?}", p.name);
        assert_eq!(r.status, dssm_certs::check::Status::Critical);

        // A client whose certificate comes from another CA (it trusts ours, to get that far).
        let stranger = ClientMaterials {
            ca_cert: read(&mount.join("dssm-ca.crt")),
            leaf_cert: read(&other.join("dssm-cert.crt")),
            leaf_key: PrivateKey::from_pem(&read(&other.join("dssm-key.key")), "k").unwrap(),
        };
        let r = Prober::new(&stranger, ClientIdentity::Presented)
            .unwrap()
            .ping(
                &endpoint(p.port),
                "f5-dssm-sentinel",
                Duration::from_secs(5),
            );
        assert_eq!(r.reply, None, "{}: {r:?}", p.name);
        // redis-cli agrees
        assert_eq!(t.cli(&other, p.port, &["PING"]).trim(), "");
        assert_eq!(t.cli(&mount, p.port, &["PING"]).trim(), "PONG");
    }
}

#[test]
fn sentinel_failover_completes_over_tls_and_the_old_primary_rejoins() {
    let tmp = tempdir();
    let mount = materials(tmp.path(), "m", &["--key-algorithm", "ecdsa-p256"]);
    let t = Topology::start(&mount);
    let old = t.primary_port;
    let s = t.get("sentinel-1");
    assert_eq!(
        t.cli(&mount, s.port, &["SENTINEL", "FAILOVER", MASTER])
            .trim(),
        "OK"
    );
    let new = wait_for("a new primary agreed by all sentinels", SETTLE, || {
        t.agreed_primary().filter(|p| *p != old)
    });
    wait_for(
        "the old primary to rejoin as a replica of the new one",
        SETTLE,
        || {
            let info = t.cli(&mount, old, &["INFO", "replication"]);
            (info.contains("role:slave")
                && info.contains(&format!("master_port:{new}"))
                && info.contains("master_link_status:up"))
            .then_some(())
        },
    );
    assert_eq!(t.wait_healthy(SETTLE), new);
}

#[test]
fn renewing_the_leaf_under_the_same_ca_keeps_both_leaves_working_through_a_rolling_restart() {
    let tmp = tempdir();
    let (old, new) = old_and_renewed_under_the_same_ca(tmp.path());
    assert_eq!(
        read(&new.join("dssm-ca.crt")),
        read(&old.join("dssm-ca.crt"))
    );
    assert_ne!(
        read(&new.join("dssm-cert.crt")),
        read(&old.join("dssm-cert.crt"))
    );

    let mut t = Topology::start(&old);
    // The primary is restarted by hand here, without a switchover: at a new IP nobody would
    // know it (Sentinel only learns replicas from the primary). Addresses kept: this test is
    // about the materials.
    t.new_ip_on_restart = false;
    let (old_client, new_client) = (client(&old, true), client(&new, true));
    // Replicas and sentinels first, the primary last: the `rolling` strategy's order.
    for name in [
        "db-1",
        "db-2",
        "sentinel-0",
        "sentinel-1",
        "sentinel-2",
        "db-0",
    ] {
        t.restart_with(name, &new);
        for p in &t.procs {
            assert!(
                pong(&old_client, p.port),
                "old leaf refused by {} after restarting {name}",
                p.name
            );
            assert!(
                pong(&new_client, p.port),
                "new leaf refused by {} after restarting {name}",
                p.name
            );
        }
        t.wait_healthy(SETTLE);
    }
    let served = new_client.ping(
        &endpoint(t.get("db-0").port),
        "f5-dssm-db",
        Duration::from_secs(5),
    );
    assert!(
        served.served.unwrap().matches_deployed_leaf,
        "db-0 serves the renewed leaf"
    );
}

#[test]
fn a_ca_rotation_splits_old_and_new_processes_and_refuses_old_clients_afterwards() {
    let tmp = tempdir();
    let old = materials(tmp.path(), "old", &["--key-algorithm", "ecdsa-p256"]);
    let new = materials(tmp.path(), "new", &["--key-algorithm", "ecdsa-p256"]);
    let mut t = Topology::start(&old);
    // Processes restarted by hand, the primary among them: addresses kept (see above).
    t.new_ip_on_restart = false;

    // Midway: one replica on the new CA, the primary on the old one. Replication breaks.
    t.restart_with("db-1", &new);
    let replica = t.get("db-1");
    wait_for(
        "db-1 to fail its TLS link to the old-CA primary",
        SETTLE,
        || {
            let info = t.cli(&new, replica.port, &["INFO", "replication"]);
            let log = replica.log();
            (info.contains("master_link_status:down")
                && log.contains("Error condition on socket for SYNC"))
            .then_some(())
        },
    );
    assert!(
        !pong(&client(&old, true), replica.port),
        "an old-CA client must be refused by db-1"
    );

    // After every process has the new materials: old clients refused, new ones accepted.
    for name in ["db-0", "db-2", "sentinel-0", "sentinel-1", "sentinel-2"] {
        t.restart_with(name, &new);
    }
    t.wait_healthy(SETTLE);
    let (old_client, new_client) = (client(&old, true), client(&new, true));
    for p in &t.procs {
        assert!(
            !pong(&old_client, p.port),
            "{} still accepts the old CA's leaf",
            p.name
        );
        assert!(pong(&new_client, p.port), "{} refuses the new leaf", p.name);
    }
}

#[test]
fn materials_made_by_the_seed_commands_work_with_redis_and_probe() {
    let tmp = tempdir();
    let seed = tmp.path().join("seed");
    std::fs::create_dir(&seed).unwrap();
    seed_materials(&seed, false);
    let t = Topology::start(&seed);
    let (code, report) = probe_bin(&seed, t.get("sentinel-2").port, t.get("db-0").port);
    assert_eq!(code, 0, "{report:#}");
    for e in report["endpoints"].as_array().unwrap() {
        assert_eq!(e["reply"], "+PONG");
        assert_eq!(
            e["verify_path"], "legacy-no-name-check",
            "v1 leaf: the x509-parser path"
        );
        assert_eq!(e["served"]["version"], 1);
    }
    let r = client(&seed, true).ping(&endpoint(t.get("db-2").port), "x", Duration::from_secs(5));
    assert_eq!(r.verify_path, Some(VerifyPath::LegacyNoNameCheck));
}

#[test]
fn redis_db_reloads_certificates_in_place_but_sentinel_cannot() {
    let tmp = tempdir();
    let (old, new) = old_and_renewed_under_the_same_ca(tmp.path());
    let t = Topology::start(&old);
    let new_client = client(&new, true);

    // Redis DB: new files at the same path, CONFIG SET the same path, new connections get them.
    let db = t.get("db-2");
    for f in ["dssm-cert.crt", "dssm-key.key"] {
        std::fs::copy(new.join(f), db.mount.join(f)).unwrap();
    }
    let path = db.mount.join("dssm-cert.crt");
    let key = db.mount.join("dssm-key.key");
    let reply = t.cli(
        &old,
        db.port,
        &[
            "CONFIG",
            "SET",
            "tls-cert-file",
            path.to_str().unwrap(),
            "tls-key-file",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(reply.trim(), "OK");
    let r = new_client.ping(&endpoint(db.port), "f5-dssm-db", Duration::from_secs(5));
    assert!(
        r.served.unwrap().matches_deployed_leaf,
        "db-2 serves the new leaf without a restart"
    );

    // Sentinel: neither CONFIG SET nor SENTINEL CONFIG SET takes TLS settings.
    let s = t.get("sentinel-0");
    let path = path.to_str().unwrap();
    let plain = t.cli(&old, s.port, &["CONFIG", "SET", "tls-cert-file", path]);
    let sentinel = t.cli(
        &old,
        s.port,
        &["SENTINEL", "CONFIG", "SET", "tls-cert-file", path],
    );
    for reply in [&plain, &sentinel] {
        assert!(
            reply.starts_with("ERR") || reply.contains("ERR"),
            "sentinel accepted: {reply:?}"
        );
    }
    let r = new_client.ping(
        &endpoint(s.port),
        "f5-dssm-sentinel",
        Duration::from_secs(5),
    );
    assert!(
        !r.served.unwrap().matches_deployed_leaf,
        "sentinel still serves the old leaf"
    );
}

/// Decides whether a CA rotation needs a new CA subject or cross-signing, with OpenSSL (Redis)
/// as the verifier. Finding: with the seeds' subject on both CAs, a seed-made v1 leaf (no
/// authority key identifier) is accepted only while the OLD CA comes first in `dssm-ca.crt`
/// (OpenSSL picks the first CA whose name matches and, without an AKI, does not try the next);
/// our v3 leaves carry an AKI and are accepted in either order. A distinct subject for the new CA
/// lifts the ordering constraint, but the contract keeps the seeds' subject, so the bundle is
/// always old CA first. Cross-signing is not needed: every process trusts the bundle (phase a)
/// before any leaf of the new CA is served (phase b), as the rotation-under-load test shows.
#[test]
fn a_same_subject_ca_bundle_must_list_the_old_ca_first_while_seed_v1_leaves_live() {
    use support::load::scenarios::CaRotation;
    let same = "O=Redis Test, CN=Certificate Authority";
    let cases = [
        (same, true, true),
        (same, false, false),
        ("O=Redis Test, CN=Certificate Authority 2", false, true),
    ];
    let made = CaRotation::new(same, true); // its temporary directory holds the seed
    let seed = made.seed.clone();
    for (subject, old_first, seed_leaf_accepted) in cases {
        let m = CaRotation::from_seed(tempdir(), seed.clone(), subject, old_first);
        // The DB serves the new leaf and trusts the bundle; clients present either leaf.
        let db = start_db(&m.tmp.path().join("db"), &m.switch);
        let seed_client = cli_with(&m.trust, db.port, &["PING"]);
        let new_client = cli_with(&m.switch, db.port, &["PING"]);
        let what = format!("new CA {subject:?}, old CA first: {old_first}");
        assert_eq!(new_client.trim(), "PONG", "{what}: the new v3 leaf");
        assert_eq!(
            seed_client.trim() == "PONG",
            seed_leaf_accepted,
            "{what}: the seed's v1 leaf got {seed_client:?}"
        );
    }
}

#[test]
fn reload_tls_retries_until_kubelet_swaps_the_files_and_reports_when_they_never_change() {
    use dssm_certs::redis::reload::{reload_tls, Proof};
    use dssm_certs::redis::{Connection, RedisError};
    use std::time::Instant;
    use support::load::*;

    let tmp = tempdir();
    let (old, new) = renewal_materials(tmp.path());
    let mount = KubeletMount::create(&tmp.path().join("mount"), &old);
    let db = start_db(&tmp.path().join("db"), &mount.dir);
    let endpoint = support::redis::endpoint(db.port);
    let tool = tls_client(&new);
    let proof = Proof {
        serves: Some(fingerprint_of(&new)),
        ..Default::default()
    };
    let deadline = || Instant::now() + Duration::from_secs(20);
    let mut existing = Connection::connect(&tool, &endpoint, SERVER_NAME, deadline()).unwrap();
    assert_eq!(
        existing.served_fingerprint(),
        Some(fingerprint_of(&old).as_str())
    );

    // The files never change (a subPath mount): reported at the deadline, naming the DB.
    let err = reload_tls(
        &tool,
        &endpoint,
        SERVER_NAME,
        &proof,
        Instant::now() + Duration::from_millis(1500),
    )
    .unwrap_err();
    assert!(matches!(err, RedisError::NotSwapped { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&endpoint) && msg.contains(&fingerprint_of(&old)),
        "{msg}"
    );

    // Kubelet swaps a second into the reload: it retries until then, then proves the new leaf.
    let swap = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        mount.swap(&new);
    });
    let reloaded = reload_tls(&tool, &endpoint, SERVER_NAME, &proof, deadline()).unwrap();
    swap.join().unwrap();
    assert!(reloaded.attempts > 1, "{reloaded:?}");
    let fresh = Connection::connect(&tool, &endpoint, SERVER_NAME, deadline()).unwrap();
    assert_eq!(fresh.served_fingerprint(), proof.serves.as_deref());
    // The connection opened before the reload keeps working.
    assert_eq!(
        existing.call(&["PING"], deadline()).unwrap(),
        dssm_certs::redis::Value::Simple("PONG".into())
    );
}

/// Issue 13: during a CA rotation `probe` says which CA of the deployed bundle the served leaf
/// is under (as OpenSSL picks it): the old one in phase a, the new one from phase b.
#[test]
fn probe_names_the_ca_of_the_bundle_the_served_leaf_is_under() {
    use support::load::scenarios::CaRotation;
    let m = CaRotation::new("O=Redis Test, CN=Certificate Authority", true);
    for (phase, dir, ca_index, cas) in [
        ("trust", &m.trust, 1, 2),
        ("switch", &m.switch, 2, 2),
        ("drop", &m.drop, 1, 1),
    ] {
        let db = start_db(&m.tmp.path().join(format!("db-{phase}")), dir);
        let (code, report) = probe_bin(dir, db.port, db.port);
        assert_eq!(code, 0, "{phase}: {report:#}");
        let served = &report["endpoints"][0]["served"];
        assert_eq!(
            (served["ca_index"].as_u64(), served["bundle_cas"].as_u64()),
            (Some(ca_index), Some(cas)),
            "{phase}: {report:#}"
        );
    }
}

/// Issue 23: reload errors by kind, at once instead of looping until the deadline. Refused files
/// name the files; `CONFIG` disabled reads as "no in-place reload" (the roll restarts instead);
/// NOAUTH is reported.
#[test]
fn reload_errors_are_told_apart_at_once_instead_of_retried_until_the_deadline() {
    use dssm_certs::redis::reload::{reload_tls, Proof};
    use dssm_certs::redis::RedisError;
    use std::time::Instant;
    use support::load::*;

    let tmp = tempdir();
    let (old, new) = renewal_materials(tmp.path());
    let tool = tls_client(&new);
    let proof = Proof {
        serves: Some(fingerprint_of(&new)),
        ..Default::default()
    };
    let reload = |db: &Proc| {
        let start = Instant::now();
        let r = reload_tls(
            &tool,
            &support::redis::endpoint(db.port),
            SERVER_NAME,
            &proof,
            Instant::now() + Duration::from_secs(20),
        );
        (r.map(drop), start.elapsed())
    };

    // The new leaf with a key that is not its own: Redis refuses the files.
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    for f in ["dssm-ca.crt", "dssm-cert.crt", "dhparam2048.pem"] {
        std::fs::copy(new.join(f), bad.join(f)).unwrap();
    }
    std::fs::copy(old.join("dssm-key.key"), bad.join("dssm-key.key")).unwrap();
    let mount = KubeletMount::create(&tmp.path().join("mount"), &old);
    let db = start_db(&tmp.path().join("db"), &mount.dir);
    mount.swap(&bad);
    let (r, took) = reload(&db);
    let err = r.unwrap_err();
    assert!(matches!(err, RedisError::TlsConfig { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("{}/dssm-key.key", mount.dir.display()))
            && msg.contains("nothing restarted"),
        "{msg}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}: {msg}");
    // Still serving the old files, still answering.
    assert_eq!(cli_with(&old, db.port, &["PING"]).trim(), "PONG");

    // CONFIG disabled.
    let mount = KubeletMount::create(&tmp.path().join("mount-2"), &new);
    let db = start_db_with(
        &tmp.path().join("db-2"),
        &mount.dir,
        "rename-command CONFIG \"\"\n",
    );
    let (r, took) = reload(&db);
    let err = r.unwrap_err();
    assert!(matches!(err, RedisError::ReloadUnavailable { .. }), "{err}");
    assert!(
        err.to_string().contains("CONFIG is renamed or disabled"),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}: {err}");

    // A password the tool does not have.
    let mount = KubeletMount::create(&tmp.path().join("mount-3"), &new);
    let db = start_db_with(
        &tmp.path().join("db-3"),
        &mount.dir,
        "requirepass not-ours\n",
    );
    let (r, took) = reload(&db);
    let err = r.unwrap_err();
    assert!(err.is_auth() && err.to_string().contains("NOAUTH"), "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}: {err}");
}

/// Issue 23: refused files stop the roll at the first DB, naming the file; no pod is restarted
/// onto them (the restart fallback is for files that never changed, not for bad ones).
#[test]
fn a_roll_onto_files_redis_refuses_stops_at_the_first_db_and_restarts_nothing() {
    use dssm_certs::redis::reload::Proof;
    use dssm_certs::redis::rollout::{self, RolloutContext};
    use std::time::Instant;
    use support::load::*;

    let tmp = tempdir();
    let (old, new) = renewal_materials(tmp.path());
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    for f in ["dssm-ca.crt", "dssm-cert.crt", "dhparam2048.pem"] {
        std::fs::copy(new.join(f), bad.join(f)).unwrap();
    }
    std::fs::copy(old.join("dssm-key.key"), bad.join("dssm-key.key")).unwrap();
    let mut t = Topology::start_with(|_, dir| {
        KubeletMount::create(dir, &old);
    });
    let steps = rollout::plan(&observed_pods(&t, false)).unwrap();
    for p in &t.procs {
        KubeletMount {
            dir: p.mount.clone(),
        }
        .swap(&bad);
    }
    let tool = tls_client(&new);
    let cx = RolloutContext {
        tls: &tool,
        server_name: SERVER_NAME,
        master: MASTER,
        proof: Proof {
            serves: Some(fingerprint_of(&new)),
            accepts: vec![&tool],
            refuses: vec![],
        },
        step_timeout: Duration::from_secs(30),
        reload_timeout: Duration::from_secs(30),
    };
    let mut pods = SwapOnRestart {
        topology: &mut t,
        files: bad.clone(),
        restarted: Vec::new(),
    };
    let start = Instant::now();
    let err = rollout::execute(&steps, &mut pods, &cx, |_, _| {}).unwrap_err();
    assert!(
        pods.restarted.is_empty(),
        "{:?} restarted onto refused files",
        pods.restarted
    );
    let msg = err.to_string();
    assert!(
        msg.contains("db-1: reload") && msg.contains("dssm-key.key"),
        "{msg}"
    );
    assert!(start.elapsed() < Duration::from_secs(10), "{msg}");
}
