//! `generate`: the seed procedure's files, checked with the real openssl CLI.

use testkit as support;

use std::os::unix::fs::PermissionsExt;

use base64::Engine;
use support::*;

const FILES: [&str; 7] = [
    "dssm-ca.key",
    "dssm-ca.crt",
    "dssm-key.key",
    "dssm-cert.crt",
    "dhparam2048.pem",
    "certs-secret.yaml",
    "keys-secret.yaml",
];

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

// Long: one default `generate` (its RSA 4096 keys are slow to make) checked against each
// property of the seed procedure in turn, with the openssl CLI.
#[test]
fn defaults_match_the_seed_procedure_and_pass_openssl() {
    let tmp = tempdir();
    let out = generate(tmp.path(), &["--namespace", "spk-utilities"]);
    for f in FILES {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert_eq!(mode(&out.join("dssm-ca.key")), 0o600);
    assert_eq!(mode(&out.join("dssm-key.key")), 0o600);
    assert_eq!(mode(&out.join("keys-secret.yaml")), 0o600);
    assert_eq!(mode(&out), 0o700);

    assert_eq!(
        openssl(&out, &["verify", "-CAfile", "dssm-ca.crt", "dssm-cert.crt"]).trim(),
        "dssm-cert.crt: OK"
    );
    for purpose in ["sslserver", "sslclient"] {
        openssl(
            &out,
            &[
                "verify",
                "-purpose",
                purpose,
                "-CAfile",
                "dssm-ca.crt",
                "dssm-cert.crt",
            ],
        );
    }
    // The leaf is valid for (just under) a year, the seeds'; the CA for 10 years (checked below).
    let cert = "dssm-cert.crt";
    openssl(
        &out,
        &[
            "x509",
            "-in",
            cert,
            "-noout",
            "-checkend",
            &(364 * 86_400).to_string(),
        ],
    );
    let r = std::process::Command::new("openssl")
        .args(["x509", "-in", cert, "-noout", "-checkend"])
        .arg((366 * 86_400).to_string())
        .current_dir(&out)
        .status()
        .unwrap();
    assert!(!r.success(), "{cert} should expire within 366 days");
    let ca_years = 3650 * 86_400;
    openssl(
        &out,
        &[
            "x509",
            "-in",
            "dssm-ca.crt",
            "-noout",
            "-checkend",
            &(ca_years - 86_400).to_string(),
        ],
    );
    let ca_ends = std::process::Command::new("openssl")
        .args(["x509", "-in", "dssm-ca.crt", "-noout", "-checkend"])
        .arg((ca_years + 86_400).to_string())
        .current_dir(&out)
        .status()
        .unwrap();
    assert!(!ca_ends.success(), "a new CA lasts 10 years, not more");
    let subject = |cert| openssl(&out, &["x509", "-in", cert, "-noout", "-subject"]);
    assert_eq!(
        subject("dssm-ca.crt").trim(),
        "subject=O = Redis Test, CN = Certificate Authority"
    );
    assert_eq!(
        subject("dssm-cert.crt").trim(),
        "subject=O = Redis Test, CN = Server"
    );

    let text = openssl(&out, &["x509", "-in", "dssm-cert.crt", "-noout", "-text"]);
    for want in [
        "Version: 3 (0x2)",
        "Signature Algorithm: sha384WithRSAEncryption",
        "Public-Key: (4096 bit)",
        "TLS Web Server Authentication, TLS Web Client Authentication",
        "Digital Signature, Key Encipherment",
        "X509v3 Subject Key Identifier",
        "X509v3 Authority Key Identifier",
        "DNS:f5-dssm-sentinel.spk-utilities.svc.cluster.local",
        "DNS:*.f5-dssm-db.spk-utilities.svc.cluster.local",
        "CA:FALSE",
    ] {
        assert!(text.contains(want), "leaf lacks {want:?}:\n{text}");
    }
    let ca_text = openssl(&out, &["x509", "-in", "dssm-ca.crt", "-noout", "-text"]);
    assert!(
        ca_text.contains("X509v3 Basic Constraints: critical\n                CA:TRUE"),
        "{ca_text}"
    );
    assert!(ca_text.contains("Certificate Sign, CRL Sign"), "{ca_text}");
    assert!(ca_text.contains("Public-Key: (4096 bit)"));

    // The leaf's notBefore is a few minutes in the past, for clock skew.
    let nb = openssl(
        &out,
        &["x509", "-in", "dssm-cert.crt", "-noout", "-startdate"],
    );
    let nb = nb.trim().trim_start_matches("notBefore=");
    let parsed = time::PrimitiveDateTime::parse(
        nb.trim_end_matches(" GMT"),
        &time::macros::format_description!(
            "[month repr:short] [day padding:space] [hour]:[minute]:[second] [year]"
        ),
    )
    .unwrap()
    .assume_utc();
    let lag = time::OffsetDateTime::now_utc() - parsed;
    assert!(
        lag >= time::Duration::minutes(4) && lag <= time::Duration::minutes(10),
        "notBefore lag {lag}"
    );

    // Keys are PKCS#8 and match their certificates.
    for (key, cert) in [
        ("dssm-key.key", "dssm-cert.crt"),
        ("dssm-ca.key", "dssm-ca.crt"),
    ] {
        assert!(String::from_utf8(read(&out.join(key)))
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(
            openssl(&out, &["pkey", "-in", key, "-pubout"]),
            openssl(&out, &["x509", "-in", cert, "-noout", "-pubkey"]),
            "{key} does not match {cert}"
        );
    }
    let check = std::process::Command::new("openssl")
        .args(["dhparam", "-in", "dhparam2048.pem", "-check", "-noout"])
        .current_dir(&out)
        .output()
        .unwrap();
    assert!(check.status.success());
    assert!(String::from_utf8_lossy(&check.stderr).contains("DH parameters appear to be ok"));
}

#[test]
fn secret_manifests_hold_the_files_byte_for_byte() {
    let tmp = tempdir();
    // The keys are beside the point here: ECDSA, made in no time.
    let out = generate(
        tmp.path(),
        &[
            "--namespace",
            "cnf-gateway",
            "--key-algorithm",
            "ecdsa-p256",
        ],
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    for (manifest, name, keys) in [
        (
            "certs-secret.yaml",
            "dssm-certs-secret",
            &["dssm-ca.crt", "dssm-cert.crt", "dhparam2048.pem"][..],
        ),
        (
            "keys-secret.yaml",
            "dssm-keys-secret",
            &["dssm-key.key"][..],
        ),
    ] {
        let doc: serde_json::Value = serde_yaml::from_slice(&read(&out.join(manifest))).unwrap();
        let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(doc).unwrap();
        assert_eq!(secret.metadata.name.as_deref(), Some(name));
        assert_eq!(secret.metadata.namespace.as_deref(), Some("cnf-gateway"));
        let data = secret.data.unwrap();
        assert_eq!(
            data.keys().map(String::as_str).collect::<Vec<_>>().len(),
            keys.len()
        );
        for k in keys {
            assert_eq!(
                data[*k].0,
                read(&out.join(k)),
                "{manifest}[{k}] differs from the file"
            );
        }
        let raw = String::from_utf8(read(&out.join(manifest))).unwrap();
        for k in keys {
            assert!(raw.contains(&format!("  {k}: {}\n", b64.encode(read(&out.join(k))))));
        }
    }
    // No namespace given: none written, as in the seeds.
    let out = made_by_default();
    assert!(!String::from_utf8(read(&out.join("certs-secret.yaml")))
        .unwrap()
        .contains("namespace:"));
}

#[test]
fn existing_files_are_never_overwritten_without_force() {
    let tmp = tempdir();
    let out = copy_of_defaults(&tmp.path().join("out"));
    let before: Vec<Vec<u8>> = FILES.iter().map(|f| read(&out.join(f))).collect();
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        out.to_str().unwrap(),
        "--dhparam",
        "ffdhe2048",
    ]);
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("refusing to overwrite") && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(stderr.contains("dssm-ca.key"), "names the files: {stderr}");
    let after: Vec<Vec<u8>> = FILES.iter().map(|f| read(&out.join(f))).collect();
    assert_eq!(before, after);

    // A single stray file is enough to refuse, and nothing else is created.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("dssm-cert.crt"), b"mine").unwrap();
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        other.to_str().unwrap(),
        "--dhparam",
        "ffdhe2048",
    ]);
    assert_eq!(code, 4, "{stderr}");
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 1);
    assert_eq!(read(&other.join("dssm-cert.crt")), b"mine");

    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        out.to_str().unwrap(),
        "--dhparam",
        "ffdhe2048",
        "--key-algorithm",
        "ecdsa-p256",
        "--force",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_ne!(
        read(&out.join("dssm-ca.crt")),
        before[1],
        "--force replaces"
    );
    assert_eq!(mode(&out.join("dssm-key.key")), 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn an_output_path_that_is_a_file_is_refused() {
    let tmp = tempdir();
    let file = tmp.path().join("afile");
    std::fs::write(&file, b"x").unwrap();
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        file.to_str().unwrap(),
        "--dhparam",
        "ffdhe2048",
    ]);
    assert_eq!(code, 4);
    assert!(stderr.contains("is not a directory"), "{stderr}");
}

#[test]
fn flags_set_lifetimes_subjects_names_and_key_algorithm() {
    let tmp = tempdir();
    let out = generate(
        tmp.path(),
        &[
            "--days",
            "30",
            "--ca-days",
            "730",
            "--key-algorithm",
            "ecdsa-p384",
            "--ca-subject",
            "/O=Acme/CN=dSSM CA",
            "--subject",
            "O=Acme, OU=SRE, CN=dssm",
            "--dns",
            "redis.example",
            "--dns",
            "sentinel.example",
        ],
    );
    openssl(&out, &["verify", "-CAfile", "dssm-ca.crt", "dssm-cert.crt"]);
    let leaf = openssl(&out, &["x509", "-in", "dssm-cert.crt", "-noout", "-text"]);
    assert!(
        leaf.contains("ecdsa-with-SHA384") && leaf.contains("384 bit"),
        "{leaf}"
    );
    assert!(
        leaf.contains("Subject: O = Acme, OU = SRE, CN = dssm"),
        "{leaf}"
    );
    assert!(
        leaf.contains("DNS:redis.example, DNS:sentinel.example"),
        "{leaf}"
    );
    assert!(
        !leaf.contains("f5-dssm"),
        "--dns replaces the default names"
    );
    assert!(
        !leaf.contains("Key Encipherment"),
        "no RSA key transport usage on an EC key"
    );
    openssl(
        &out,
        &[
            "x509",
            "-in",
            "dssm-cert.crt",
            "-noout",
            "-checkend",
            &(29 * 86_400).to_string(),
        ],
    );
    let ca_end = end_date(&out, "dssm-ca.crt");
    assert!(
        ca_end.contains(&(time::OffsetDateTime::now_utc().year() + 2).to_string()),
        "{ca_end}"
    );

    for alg in ["rsa2048", "rsa3072", "ecdsa-p256"] {
        let tmp = tempdir();
        let out = generate(tmp.path(), &["--key-algorithm", alg]);
        openssl(&out, &["verify", "-CAfile", "dssm-ca.crt", "dssm-cert.crt"]);
    }
}

#[test]
fn every_flag_can_come_from_the_environment() {
    let tmp = tempdir();
    let out = tmp.path().join("env");
    let (code, _, stderr) = output(
        bin()
            .arg("generate")
            .env("DSSM_CERTS_OUT", &out)
            .env("DSSM_CERTS_DHPARAM", "ffdhe2048")
            .env("DSSM_CERTS_KEY_ALGORITHM", "ecdsa-p256")
            .env("DSSM_CERTS_DAYS", "10")
            .env("DSSM_CERTS_DNS", "a.example,b.example"),
    );
    assert_eq!(code, 0, "{stderr}");
    let leaf = openssl(&out, &["x509", "-in", "dssm-cert.crt", "-noout", "-text"]);
    assert!(
        leaf.contains("DNS:a.example, DNS:b.example") && leaf.contains("prime256v1"),
        "{leaf}"
    );
}

fn end_date(dir: &std::path::Path, file: &str) -> String {
    openssl(dir, &["x509", "-in", file, "-noout", "-enddate"])
}

/// The lifetimes issue: `generate --ca-cert` with the default days on a CA made with the
/// seeds' 365 days was refused ("a leaf must never outlive it"), which made every renewal a CA
/// rotation. The leaf is cut to the CA's end instead, and the output says so.
#[test]
fn a_renewal_under_a_365_day_ca_is_cut_to_the_cas_end_not_refused() {
    let tmp = tempdir();
    let ecdsa = ["--key-algorithm", "ecdsa-p256"];
    let ca = generate(
        &tmp.path().join("a"),
        &[&["--ca-days", "365"][..], &ecdsa].concat(),
    );
    next_second();
    let out = tmp.path().join("b");
    let (code, stdout, stderr) = run(&[
        "generate",
        "--out",
        out.to_str().unwrap(),
        "--dhparam",
        "ffdhe2048",
        ecdsa[0],
        ecdsa[1],
        "--ca-cert",
        ca.join("dssm-ca.crt").to_str().unwrap(),
        "--ca-key",
        ca.join("dssm-ca.key").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    openssl(&out, &["verify", "-CAfile", "dssm-ca.crt", "dssm-cert.crt"]);
    assert_eq!(
        end_date(&out, "dssm-cert.crt"),
        end_date(&out, "dssm-ca.crt"),
        "the leaf ends exactly with its CA"
    );
    assert!(
        stderr.contains("note: leaf valid until the CA's end")
            && stderr.contains("short of --days 365"),
        "{stderr}"
    );
}

#[test]
fn a_new_ca_shorter_than_days_cuts_the_leaf_and_says_by_how_much() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        out.to_str().unwrap(),
        "--dhparam",
        "ffdhe2048",
        "--key-algorithm",
        "ecdsa-p256",
        "--days",
        "400",
        "--ca-days",
        "365",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        end_date(&out, "dssm-cert.crt"),
        end_date(&out, "dssm-ca.crt")
    );
    assert!(stderr.contains("35 days short of --days 400"), "{stderr}");
    let (code, report, _) = run(&["check", "--dir", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{report}");
    assert!(report.contains("leaf valid until the CA's end"), "{report}");
}

#[test]
fn by_default_a_new_ca_lasts_ten_years_and_a_renewal_under_it_is_not_cut() {
    let tmp = tempdir();
    let ca = made_by_default();
    let year = time::OffsetDateTime::now_utc().year();
    assert!(
        end_date(ca, "dssm-ca.crt").contains(&(year + 10).to_string()),
        "{}",
        end_date(ca, "dssm-ca.crt")
    );
    let out = tmp.path().join("b");
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        out.to_str().unwrap(),
        "--dhparam",
        "ffdhe2048",
        "--key-algorithm",
        "ecdsa-p256",
        "--ca-cert",
        ca.join("dssm-ca.crt").to_str().unwrap(),
        "--ca-key",
        ca.join("dssm-ca.key").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("note:"), "{stderr}");
    assert!(
        end_date(&out, "dssm-cert.crt").contains(&(year + 1).to_string()),
        "365 days"
    );
}

#[test]
fn renewing_under_an_existing_ca_copies_it_and_signs_with_it() {
    let tmp = tempdir();
    let first = made_by_default();
    let second = tmp.path().join("second");
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        second.to_str().unwrap(),
        "--dhparam",
        "ffdhe2048",
        "--days",
        "300",
        "--ca-cert",
        first.join("dssm-ca.crt").to_str().unwrap(),
        "--ca-key",
        first.join("dssm-ca.key").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        read(&second.join("dssm-ca.crt")),
        read(&first.join("dssm-ca.crt"))
    );
    assert_eq!(
        read(&second.join("dssm-ca.key")),
        read(&first.join("dssm-ca.key"))
    );
    assert_ne!(
        read(&second.join("dssm-cert.crt")),
        read(&first.join("dssm-cert.crt"))
    );
    // The new leaf verifies against the old CA file: TMM's trust does not change.
    let new_leaf = second.join("dssm-cert.crt");
    openssl(
        first,
        &[
            "verify",
            "-CAfile",
            "dssm-ca.crt",
            new_leaf.to_str().unwrap(),
        ],
    );
}

#[test]
fn a_ca_made_by_the_seed_commands_with_a_pkcs1_key_can_sign_our_leaf() {
    let tmp = tempdir();
    let seed = tmp.path().join("seed");
    std::fs::create_dir(&seed).unwrap();
    seed_materials(&seed, true);
    assert!(String::from_utf8(read(&seed.join("dssm-ca.key")))
        .unwrap()
        .contains("BEGIN RSA PRIVATE KEY"));
    let out = tmp.path().join("out");
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        out.to_str().unwrap(),
        "--dhparam",
        "ffdhe2048",
        "--key-algorithm",
        "ecdsa-p256",
        "--days",
        "300",
        "--ca-cert",
        seed.join("dssm-ca.crt").to_str().unwrap(),
        "--ca-key",
        seed.join("dssm-ca.key").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    openssl(&out, &["verify", "-CAfile", "dssm-ca.crt", "dssm-cert.crt"]);
    let text = openssl(&out, &["x509", "-in", "dssm-cert.crt", "-noout", "-text"]);
    assert!(text.contains("Issuer: O = Redis Test, CN = Certificate Authority"));
    assert!(text.contains("sha384WithRSAEncryption"));
    // The seed's default (365 days) would outlive the seed CA made moments earlier: cut.
    next_second();
    let x = tmp.path().join("x");
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        x.to_str().unwrap(),
        "--dhparam",
        "ffdhe2048",
        "--key-algorithm",
        "ecdsa-p256",
        "--ca-cert",
        seed.join("dssm-ca.crt").to_str().unwrap(),
        "--ca-key",
        seed.join("dssm-ca.key").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("leaf valid until the CA's end"), "{stderr}");
    openssl(&x, &["verify", "-CAfile", "dssm-ca.crt", "dssm-cert.crt"]);
    assert_eq!(end_date(&x, "dssm-cert.crt"), end_date(&x, "dssm-ca.crt"));
}

#[test]
fn a_ca_key_that_does_not_match_the_ca_cert_is_refused() {
    let tmp = tempdir();
    let a = made_by_default();
    // Another RSA 4096 key, made ahead: the same kind and size, not the same key.
    let b = tmp.path().join("b");
    std::fs::create_dir(&b).unwrap();
    let other_key = next_seed_key().expect("a fixture key no other test took");
    std::fs::copy(other_key, b.join("dssm-ca.key")).unwrap();
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        tmp.path().join("o").to_str().unwrap(),
        "--dhparam",
        "ffdhe2048",
        "--days",
        "300",
        "--ca-cert",
        a.join("dssm-ca.crt").to_str().unwrap(),
        "--ca-key",
        b.join("dssm-ca.key").to_str().unwrap(),
    ]);
    assert_eq!(code, 4);
    assert!(
        stderr.contains("does not match the CA certificate"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&b.join("dssm-ca.key").display().to_string()),
        "{stderr}"
    );

    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        tmp.path().join("o").to_str().unwrap(),
        "--dhparam",
        "ffdhe2048",
        "--ca-cert",
        a.join("missing.crt").to_str().unwrap(),
        "--ca-key",
        a.join("dssm-ca.key").to_str().unwrap(),
    ]);
    assert_eq!(code, 4);
    assert!(stderr.contains("missing.crt: cannot read"), "{stderr}");
    let (code, _, stderr) = run(&["generate", "--out", "x", "--ca-cert", "only-cert.crt"]);
    assert_eq!(code, 64, "--ca-cert needs --ca-key: {stderr}");
}

#[test]
fn dh_params_from_a_file_are_validated_and_reused_byte_for_byte() {
    let tmp = tempdir();
    let mine = tmp.path().join("mine.pem");
    std::fs::write(&mine, read(&made_by_default().join("dhparam2048.pem"))).unwrap();
    let out = tmp.path().join("reuse");
    // The keys are beside the point here: ECDSA, made in no time.
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        out.to_str().unwrap(),
        "--dhparam",
        mine.to_str().unwrap(),
        "--key-algorithm",
        "ecdsa-p256",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(read(&out.join("dhparam2048.pem")), read(&mine));

    // Too small: 1024 bits, refused with the file's name, nothing written.
    let small = tmp.path().join("small.pem");
    let small_pem = dh_params_pem(openssl::bn::BigNum::get_rfc2409_prime_1024().unwrap());
    std::fs::write(&small, small_pem).unwrap();
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        tmp.path().join("s").to_str().unwrap(),
        "--dhparam",
        small.to_str().unwrap(),
    ]);
    assert_eq!(code, 4);
    assert!(
        stderr.contains("small.pem") && stderr.contains("1024 bits"),
        "{stderr}"
    );
    assert!(!tmp.path().join("s").exists());

    let junk = tmp.path().join("junk.pem");
    std::fs::write(
        &junk,
        b"-----BEGIN DH PARAMETERS-----\nAAAA\n-----END DH PARAMETERS-----\n",
    )
    .unwrap();
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        tmp.path().join("j").to_str().unwrap(),
        "--dhparam",
        junk.to_str().unwrap(),
    ]);
    assert_eq!(code, 4);
    assert!(
        stderr.contains("junk.pem: not PEM DH parameters"),
        "{stderr}"
    );
}

#[test]
fn ffdhe2048_is_byte_identical_to_openssls_group() {
    let tmp = tempdir();
    let out = made_by_default();
    let theirs = openssl(
        tmp.path(),
        &[
            "genpkey",
            "-genparam",
            "-algorithm",
            "DH",
            "-pkeyopt",
            "group:ffdhe2048",
        ],
    );
    assert_eq!(
        String::from_utf8(read(&out.join("dhparam2048.pem"))).unwrap(),
        theirs
    );
}

/// The slow path: a fresh 2048-bit search like `openssl dhparam 2048`, on every core.
#[test]
fn fresh_dh_params_pass_openssl_dhparam_check() {
    let tmp = tempdir();
    let out = tmp.path().join("fresh");
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        out.to_str().unwrap(),
        "--key-algorithm",
        "ecdsa-p256",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let text = openssl(
        &out,
        &["dhparam", "-in", "dhparam2048.pem", "-noout", "-text"],
    );
    assert!(text.contains("(2048 bit)"), "{text}");
    let check = std::process::Command::new("openssl")
        .args(["dhparam", "-in", "dhparam2048.pem", "-check", "-noout"])
        .current_dir(&out)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&check.stderr).contains("DH parameters appear to be ok"));
    let ffdhe = openssl(
        tmp.path(),
        &[
            "genpkey",
            "-genparam",
            "-algorithm",
            "DH",
            "-pkeyopt",
            "group:ffdhe2048",
        ],
    );
    assert_ne!(
        String::from_utf8(read(&out.join("dhparam2048.pem"))).unwrap(),
        ffdhe,
        "fresh, not the fixed group"
    );
}

#[test]
fn no_key_material_reaches_stdout_or_stderr() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let (code, stdout, stderr) = output(
        bin()
            .args([
                "generate",
                "--out",
                out.to_str().unwrap(),
                "--dhparam",
                "ffdhe2048",
            ])
            .env("DSSM_CERTS_LOG", "trace"),
    );
    assert_eq!(code, 0);
    let key = String::from_utf8(read(&out.join("dssm-key.key"))).unwrap();
    let line = key.lines().nth(3).unwrap();
    for text in [&stdout, &stderr] {
        assert!(
            !text.contains("PRIVATE KEY") && !text.contains(line),
            "key material leaked: {text}"
        );
    }
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    assert_eq!(run(&["generate"]).0, 64);
    assert_eq!(
        run(&["generate", "--out", "x", "--key-algorithm", "dsa"]).0,
        64
    );
    assert_eq!(
        run(&["generate", "--out", "x", "--namespace", "Bad_NS"]).0,
        64
    );
    assert_eq!(run(&["generate", "--out", "x", "--subject", "CN"]).0, 64);
    assert_eq!(run(&["nonsense"]).0, 64);
    let (code, stdout, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("generate") && stdout.contains("check"));
}

/// A real mutual-TLS handshake between openssl s_server and s_client, the leaf on both sides
/// (dSSM serves it, TMM presents it); TLS 1.2 with a DHE suite uses the DH params too.
// Long: a real handshake needs an s_server and an s_client started, fed and stopped, for
// each TLS version.
#[test]
fn openssl_s_server_and_s_client_complete_mutual_tls_with_the_one_leaf() {
    let tmp = tempdir();
    let out = generate(tmp.path(), &["--key-algorithm", "rsa2048"]);
    for client_extra in [
        &["-tls1_3"][..],
        &["-tls1_2", "-cipher", "DHE-RSA-AES256-GCM-SHA384"][..],
    ] {
        // A port found free may be taken by another test's process before s_server binds it:
        // then s_server exits, and it is started again on another port.
        let (port, mut server) = (0..5)
            .find_map(|_| {
                let port = support::redis::free_port().to_string();
                let mut server = std::process::Command::new("openssl")
                    .args([
                        "s_server",
                        "-accept",
                        &port,
                        "-cert",
                        "dssm-cert.crt",
                        "-key",
                        "dssm-key.key",
                        "-CAfile",
                        "dssm-ca.crt",
                        "-Verify",
                        "1",
                        "-verify_return_error",
                        "-dhparam",
                        "dhparam2048.pem",
                        "-quiet",
                    ])
                    .current_dir(&out)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                std::thread::sleep(std::time::Duration::from_millis(300));
                match server.try_wait().unwrap() {
                    None => Some((port, server)),
                    Some(_) => None,
                }
            })
            .expect("openssl s_server started on a free port");
        // Under a loaded CI machine a handshake with a fresh process takes seconds.
        let client = support::redis::wait_for(
            "s_client to finish a handshake",
            std::time::Duration::from_secs(30),
            || {
                let mut args = vec![
                    "s_client",
                    "-connect",
                    &*format!("127.0.0.1:{port}"),
                    "-cert",
                    "dssm-cert.crt",
                    "-key",
                    "dssm-key.key",
                    "-CAfile",
                    "dssm-ca.crt",
                    "-verify_return_error",
                    "-brief",
                ]
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>();
                args.extend(client_extra.iter().map(|s| s.to_string()));
                let o = std::process::Command::new("openssl")
                    .args(&args)
                    .current_dir(&out)
                    .stdin(std::process::Stdio::null())
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&o.stdout).to_string()
                    + &String::from_utf8_lossy(&o.stderr);
                (!text.contains("Connection refused")).then_some((o.status.success(), text))
            },
        );
        let _ = server.kill();
        let server_out = server.wait_with_output().unwrap();
        let server_text = String::from_utf8_lossy(&server_out.stderr).to_string()
            + &String::from_utf8_lossy(&server_out.stdout);
        assert!(
            client.0 && client.1.contains("Verification: OK"),
            "{client_extra:?}: {}",
            client.1
        );
        if client_extra[0] == "-tls1_2" {
            assert!(
                client.1.contains("DHE-RSA-AES256-GCM-SHA384"),
                "{}",
                client.1
            );
        }
        assert!(
            server_text.contains("depth=0 O = Redis Test, CN = Server")
                && server_text.contains("verify return:1"),
            "the server verified the client's certificate: {server_text}"
        );
    }
}

/// Files in `dir`, hidden ones (our temporaries) included, sorted.
fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// The hostile-input issue: each bad value is refused before any work with a message naming
/// the flag or file, and nothing is written. (`--days 3000000` used to panic.)
#[test]
fn bad_generate_input_is_refused_naming_the_flag_and_nothing_is_written() {
    let tmp = tempdir();
    let made = generate(&tmp.path().join("made"), &["--key-algorithm", "ecdsa-p256"]);
    let leaf = made.join("dssm-cert.crt");
    let leaf_key = made.join("dssm-key.key");
    let file = made.join("dssm-ca.crt");
    let under_a_file = format!("{}/sub", file.display());
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    // (extra args, --out, exit code, the message must contain)
    let cases: Vec<(Vec<&str>, &str, i32, &str)> = vec![
        (
            vec!["--days", "3000000"],
            o,
            64,
            "more than the maximum of 36500",
        ),
        (vec!["--days", "0"], o, 64, "--days"),
        (
            vec!["--days", "0"],
            o,
            64,
            "0 days would be expired at once",
        ),
        (vec!["--ca-days", "0"], o, 64, "--ca-days"),
        (vec!["--days=-3"], o, 64, "not a whole number of days"),
        (vec!["--dns", ""], o, 64, "is empty"),
        (
            vec!["--dns", "a..b"],
            o,
            64,
            "--dns \"a..b\" is not a valid subjectAltName",
        ),
        (vec!["--dns", "bad_name.svc"], o, 64, "only letters, digits"),
        (vec!["--dns", "999.1.1.1"], o, 64, "not a valid one"),
        (vec!["--dns", "fd00::zz"], o, 64, "not a valid one"),
        (
            vec![
                "--ca-cert",
                leaf.to_str().unwrap(),
                "--ca-key",
                leaf_key.to_str().unwrap(),
            ],
            o,
            4,
            "is not a CA certificate",
        ),
        (vec![], &under_a_file, 4, "cannot write there"),
        (
            vec![],
            "/proc/1/dssm-certs-out",
            4,
            "--out /proc/1/dssm-certs-out: cannot write there",
        ),
    ];
    for (extra, out_arg, want_code, want) in cases {
        let mut args = vec!["generate", "--out", out_arg, "--dhparam", "ffdhe2048"];
        args.extend(&extra);
        let (code, stdout, stderr) = run(&args);
        assert_eq!(code, want_code, "{extra:?}: {stdout}{stderr}");
        assert!(
            stderr.contains(want),
            "{extra:?}: want {want:?} in {stderr}"
        );
        assert!(!out.exists(), "{extra:?}: {:?} was written", listing(&out));
        if out_arg == under_a_file {
            assert!(stderr.contains(&under_a_file), "names --out: {stderr}");
        }
    }
}

#[test]
fn an_ip_address_given_to_dns_becomes_an_ip_subject_alt_name() {
    let tmp = tempdir();
    let out = generate(
        tmp.path(),
        &[
            "--key-algorithm",
            "ecdsa-p256",
            "--dns",
            "f5-dssm-db",
            "--dns",
            "127.0.1.3",
        ],
    );
    let text = openssl(
        &out,
        &[
            "x509",
            "-in",
            "dssm-cert.crt",
            "-noout",
            "-ext",
            "subjectAltName",
        ],
    );
    assert!(
        text.contains("DNS:f5-dssm-db") && text.contains("IP Address:127.0.1.3"),
        "{text}"
    );
}

/// A SIGTERM while the DH parameters are searched (the slow part) stops generate promptly with
/// nothing written: no key file, no temporary.
#[test]
fn sigterm_during_generate_leaves_no_file_behind() {
    let tmp = tempdir();
    let out = tmp.path().join("out");
    let mut child = bin()
        .args([
            "generate",
            "--out",
            out.to_str().unwrap(),
            "--dhparam",
            "generate",
        ])
        .args(["--key-algorithm", "ecdsa-p256"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The DH search takes 15 s or more here; the signal lands inside it.
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert!(child.try_wait().unwrap().is_none(), "still searching");
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "generate ignored SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out_text = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out_text.stderr);
    assert_eq!(
        status.code(),
        Some(4),
        "handled, not killed: {status:?} {stderr}"
    );
    assert!(
        stderr.contains("interrupted by a signal: nothing was written"),
        "{stderr}"
    );
    assert_eq!(listing(&out), Vec::<String>::new());
    assert_eq!(
        listing(tmp.path()),
        Vec::<String>::new(),
        "no temporaries anywhere"
    );
}

/// `--force` replaces all seven files or none: here one destination cannot be replaced (a
/// directory sits where dhparam2048.pem goes), and every old file must stay as it was.
#[test]
fn force_replaces_every_file_or_none() {
    let tmp = tempdir();
    let out = generate(tmp.path(), &["--key-algorithm", "ecdsa-p256"]);
    std::fs::remove_file(out.join("dhparam2048.pem")).unwrap();
    std::fs::create_dir(out.join("dhparam2048.pem")).unwrap();
    let before: Vec<(String, Option<Vec<u8>>)> = listing(&out)
        .into_iter()
        .map(|n| (n.clone(), std::fs::read(out.join(&n)).ok()))
        .collect();
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        out.to_str().unwrap(),
        "--dhparam",
        "ffdhe2048",
        "--key-algorithm",
        "ecdsa-p256",
        "--force",
    ]);
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("dhparam2048.pem"),
        "names the file: {stderr}"
    );
    let after: Vec<(String, Option<Vec<u8>>)> = listing(&out)
        .into_iter()
        .map(|n| (n.clone(), std::fs::read(out.join(&n)).ok()))
        .collect();
    assert_eq!(before, after, "nothing replaced, nothing left behind");
}
