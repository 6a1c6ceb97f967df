//! `generate`: the seed procedure's files, checked with the real openssl CLI.

mod support;

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
    // valid for (just under) a year, both of them
    for cert in ["dssm-ca.crt", "dssm-cert.crt"] {
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
            .args([
                "x509",
                "-in",
                cert,
                "-noout",
                "-checkend",
                &(366 * 86_400).to_string(),
            ])
            .current_dir(&out)
            .status()
            .unwrap();
        assert!(!r.success(), "{cert} should expire within 366 days");
    }
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
    let out = generate(tmp.path(), &["--namespace", "cnf-gateway"]);
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
    let tmp = tempdir();
    let out = generate(tmp.path(), &[]);
    assert!(!String::from_utf8(read(&out.join("certs-secret.yaml")))
        .unwrap()
        .contains("namespace:"));
}

#[test]
fn existing_files_are_never_overwritten_without_force() {
    let tmp = tempdir();
    let out = generate(tmp.path(), &[]);
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
    let ca_end = openssl(&out, &["x509", "-in", "dssm-ca.crt", "-noout", "-enddate"]);
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

#[test]
fn a_leaf_that_would_outlive_its_ca_is_refused() {
    let tmp = tempdir();
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        tmp.path().join("o").to_str().unwrap(),
        "--dhparam",
        "ffdhe2048",
        "--days",
        "400",
        "--ca-days",
        "365",
    ]);
    assert_eq!(code, 4);
    assert!(stderr.contains("must never outlive its CA"), "{stderr}");
    assert!(!tmp.path().join("o").exists(), "nothing written");

    // With an existing CA: the message says when the CA expires.
    let ca = generate(tmp.path(), &["--ca-days", "100", "--days", "50"]);
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        tmp.path().join("leaf").to_str().unwrap(),
        "--dhparam",
        "ffdhe2048",
        "--ca-cert",
        ca.join("dssm-ca.crt").to_str().unwrap(),
        "--ca-key",
        ca.join("dssm-ca.key").to_str().unwrap(),
    ]);
    assert_eq!(code, 4);
    let ca_end = time::OffsetDateTime::now_utc() + time::Duration::days(100);
    assert!(
        stderr.contains(&format!("expires at {}-", ca_end.year())),
        "{stderr}"
    );
    assert!(
        stderr.contains("at most 99 days") || stderr.contains("at most 100 days"),
        "{stderr}"
    );
    assert!(!tmp.path().join("leaf").exists());
}

#[test]
fn renewing_under_an_existing_ca_copies_it_and_signs_with_it() {
    let tmp = tempdir();
    let first = generate(tmp.path(), &[]);
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
        &first,
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
    // The seed's default (365 days) would outlive the seed CA made moments earlier.
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        tmp.path().join("x").to_str().unwrap(),
        "--dhparam",
        "ffdhe2048",
        "--ca-cert",
        seed.join("dssm-ca.crt").to_str().unwrap(),
        "--ca-key",
        seed.join("dssm-ca.key").to_str().unwrap(),
    ]);
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("never outlive"), "{stderr}");
}

#[test]
fn a_ca_key_that_does_not_match_the_ca_cert_is_refused() {
    let tmp = tempdir();
    let a = generate(&tmp.path().join("a"), &[]);
    let b = generate(&tmp.path().join("b"), &[]);
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
    std::fs::write(
        &mine,
        read(&generate(&tmp.path().join("g"), &[]).join("dhparam2048.pem")),
    )
    .unwrap();
    let out = tmp.path().join("reuse");
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        out.to_str().unwrap(),
        "--dhparam",
        mine.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(read(&out.join("dhparam2048.pem")), read(&mine));

    // Too small: 1024 bits, refused with the file's name, nothing written.
    let small = tmp.path().join("small.pem");
    openssl(
        tmp.path(),
        &["dhparam", "-out", small.to_str().unwrap(), "-2", "1024"],
    );
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
    let out = generate(tmp.path(), &[]);
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
#[test]
fn openssl_s_server_and_s_client_complete_mutual_tls_with_the_one_leaf() {
    let tmp = tempdir();
    let out = generate(tmp.path(), &["--key-algorithm", "rsa2048"]);
    for client_extra in [
        &["-tls1_3"][..],
        &["-tls1_2", "-cipher", "DHE-RSA-AES256-GCM-SHA384"][..],
    ] {
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
        let client = support::redis::wait_for(
            "s_client to finish a handshake",
            std::time::Duration::from_secs(10),
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
