//! Hostile or careless input (issue 15): refused before any work, with a message naming the
//! file, Secret key or flag, and never a hang. Each test is a row of docs/security.md's "Bad input
//! (hostile)" table.

use testkit as support;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// X9.42 DH parameters, as `openssl genpkey -genparam -algorithm DHX` writes them (RFC 5114's
/// 2048-bit group: the same format as freshly generated ones, without seconds of search).
fn x942_params(dir: &Path) -> std::path::PathBuf {
    openssl(
        dir,
        &[
            "genpkey",
            "-genparam",
            "-algorithm",
            "DHX",
            "-pkeyopt",
            "dh_rfc5114:3",
            "-out",
            "x942.pem",
        ],
    );
    dir.join("x942.pem")
}

#[test]
fn x942_dh_parameters_are_refused_because_redis_cannot_start_with_them() {
    let tmp = tempdir();
    let out = copy_of_defaults(&tmp.path().join("out"));
    let x942 = x942_params(tmp.path());
    assert!(String::from_utf8_lossy(&read(&x942)).starts_with("-----BEGIN X9.42 DH PARAMETERS"));

    // The reason: a real redis-server refuses to start with them.
    let port = support::redis::free_port().to_string();
    let mut redis = Command::new("redis-server")
        .args(["--port", "0", "--bind", "127.0.0.1", "--tls-port", &port])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--tls-cert-file")
        .arg(out.join("dssm-cert.crt"))
        .arg("--tls-key-file")
        .arg(out.join("dssm-key.key"))
        .arg("--tls-ca-cert-file")
        .arg(out.join("dssm-ca.crt"))
        .arg("--tls-dh-params-file")
        .arg(&x942)
        .current_dir(tmp.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-server");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = redis.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = redis.kill();
            panic!("redis-server started with X9.42 DH parameters");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    redis
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(!status.success(), "{log}");
    assert!(log.contains("failed to read DH params"), "{log}");

    // check: critical, naming the file and the format.
    std::fs::copy(&x942, out.join("dhparam2048.pem")).unwrap();
    let (code, stdout, _) = run(&["check", "--dir", out.to_str().unwrap()]);
    assert_eq!(code, 2, "{stdout}");
    assert!(
        stdout.contains("dhparam2048.pem") && stdout.contains("X9.42"),
        "{stdout}"
    );

    // generate --dhparam FILE: refused before anything is written.
    let dest = tmp.path().join("refused");
    let (code, stdout, stderr) = run(&[
        "generate",
        "--out",
        dest.to_str().unwrap(),
        "--dhparam",
        x942.to_str().unwrap(),
    ]);
    assert_eq!(code, 4, "{stdout}{stderr}");
    assert!(
        stderr.contains("x942.pem") && stderr.contains("X9.42"),
        "{stderr}"
    );
    assert!(!dest.join("dssm-key.key").exists());

    // The trust-boundary issue: a stray `-----BEGIN DH PARAMETERS-----` inside a line (OpenSSL
    // reads BEGIN lines only at a line's start) made the X9.42 block after it pass, and it was
    // written into the materials.
    let stray = tmp.path().join("stray.pem");
    std::fs::write(
        &stray,
        [&b"x-----BEGIN DH PARAMETERS-----\n"[..], &read(&x942)].concat(),
    )
    .unwrap();
    let (code, stdout, stderr) = run(&[
        "generate",
        "--out",
        dest.to_str().unwrap(),
        "--dhparam",
        stray.to_str().unwrap(),
    ]);
    assert_eq!(code, 4, "{stdout}{stderr}");
    assert!(
        stderr.contains("stray.pem") && stderr.contains("X9.42"),
        "{stderr}"
    );
    assert!(!dest.join("dhparam2048.pem").exists());
}

/// Runs the binary on a pseudo-terminal (util-linux `script`), where OpenSSL's default
/// passphrase callback would prompt and wait for ever. Returns (exit code, all output, time).
fn on_a_tty(args: &[&str]) -> (i32, String, Duration) {
    let mut line = String::from("exec");
    for a in std::iter::once(env!("CARGO_BIN_EXE_dssm-certs")).chain(args.iter().copied()) {
        line.push_str(&format!(" '{}'", a.replace('\'', r"'\''")));
    }
    let started = Instant::now();
    let mut child = Command::new("timeout")
        .args(["20", "script", "-qec", &line, "/dev/null"])
        .stdin(Stdio::piped()) // held open: script keeps the terminal while we wait
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script");
    let mut text = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let status = child.wait().unwrap();
    (status.code().unwrap_or(-1), text, started.elapsed())
}

#[test]
fn encrypted_private_keys_are_refused_and_never_prompt_on_a_tty() {
    let tmp = tempdir();
    let out = copy_of_defaults(&tmp.path().join("out"));
    let forms = [
        (
            "pkcs8",
            "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -aes256 -pass pass:secret -out k.pem",
            "ENCRYPTED PRIVATE KEY",
        ),
        (
            "pkcs1",
            "openssl genrsa -traditional -aes256 -passout pass:secret -out k.pem 2048 2>/dev/null",
            "Proc-Type: 4,ENCRYPTED",
        ),
    ];
    for (form, script, marker) in forms {
        let dir = tmp.path().join(form);
        std::fs::create_dir(&dir).unwrap();
        sh(&dir, script);
        let key = read(&dir.join("k.pem"));
        assert!(String::from_utf8_lossy(&key).contains(marker), "{form}");
        for f in [
            "dssm-ca.crt",
            "dssm-cert.crt",
            "dhparam2048.pem",
            "dssm-ca.key",
        ] {
            std::fs::copy(out.join(f), dir.join(f)).unwrap();
        }
        std::fs::write(dir.join("dssm-key.key"), &key).unwrap();
        let key_path = dir.join("dssm-key.key");
        let d = dir.to_str().unwrap();

        let (code, text, took) = on_a_tty(&["check", "--dir", d]);
        assert_eq!(code, 3, "{form} check: {text}");
        assert!(!text.contains("pass phrase"), "{form}: prompted:\n{text}");
        assert!(
            text.contains(key_path.to_str().unwrap()) && text.contains("encrypted"),
            "{form}: {text}"
        );
        assert!(took < Duration::from_secs(15), "{form}: {took:?}");

        // DH parameters with an encrypted PEM header reach OpenSSL's DH reader, which has no
        // callback parameter: refused before it sees them.
        let dh = std::fs::read_to_string(out.join("dhparam2048.pem")).unwrap();
        let dh = dh.replacen(
            "-----\n",
            "-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00112233445566778899AABBCCDDEEFF\n\n",
            1,
        );
        std::fs::write(dir.join("dhparam2048.pem"), dh).unwrap();
        let (_, text, _) = on_a_tty(&["check", "--dir", d]);
        assert!(!text.contains("pass phrase"), "{form}: prompted:\n{text}");
        assert!(text.contains("is not DH parameters"), "{form}: {text}");

        // probe reads the same key before connecting anywhere.
        let (code, text, _) = on_a_tty(&["probe", "--dir", d, "--endpoint", "127.0.0.1:1"]);
        assert_eq!(code, 3, "{form} probe: {text}");
        assert!(
            !text.contains("pass phrase") && text.contains("encrypted"),
            "{text}"
        );
    }
}

/// The binary with no Kubernetes configuration anywhere: no KUBECONFIG, an empty HOME, not in
/// a pod.
fn without_kubeconfig(home: &Path) -> Command {
    let mut c = bin();
    c.env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("HOME", home);
    c
}

#[test]
fn a_missing_kubeconfig_is_one_line_naming_every_place_looked_at() {
    let home = tempdir();
    let args = ["check", "--dssm-namespace", "spk-utilities"];
    let (code, stdout, stderr) = output(without_kubeconfig(home.path()).args(args));
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for named in ["KUBECONFIG", "~/.kube/config", "KUBERNETES_SERVICE_HOST"] {
        assert!(stderr.contains(named), "{named} not named: {stderr}");
    }
    let missing = home.path().join("nowhere.yaml");
    let (code, _, stderr) = output(
        without_kubeconfig(home.path())
            .env("KUBECONFIG", &missing)
            .args(args),
    );
    assert_eq!(code, 3);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("KUBECONFIG={}", missing.display())),
        "{stderr}"
    );
}

#[test]
fn check_json_prints_a_json_error_object_when_the_api_fails() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    env.server.add_fault(support::apiserver::Fault::status(
        "GET",
        "/secrets/dssm-certs-secret",
        1,
        403,
    ));
    let (code, stdout, stderr) = env.run(&["check", "-o", "json"]);
    assert_eq!(code, 3, "{stdout}{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout:?}"));
    assert_eq!(v["status"], "unknown");
    assert_eq!(v["exit_code"], 3);
    let error = v["error"].as_str().unwrap();
    assert!(
        error.contains("secret spk-utilities/dssm-certs-secret") && error.contains("forbidden"),
        "{error}"
    );
}

#[test]
fn an_unreachable_api_server_is_one_short_line_not_a_kube_error_dump() {
    let mut env = TestEnv::spk();
    env.server.stop();
    let (code, _, stderr) = env.run(&["check", "--api-timeout", "2s"]);
    assert_eq!(code, 3, "{stderr}");
    let fatal = stderr.lines().last().unwrap_or_default();
    assert!(
        fatal.starts_with("error: cannot get secret spk-utilities/dssm-certs-secret: the API server is unreachable"),
        "{stderr}"
    );
    for dump in ["ServiceError", "client error", "hyper", "Os {"] {
        assert!(!fatal.contains(dump), "{dump} in {fatal}");
    }
    assert!(fatal.len() < 300, "{fatal}");
}

#[test]
fn log_format_json_applies_to_every_line_the_fatal_one_included() {
    let home = tempdir();
    let cases: [&[&str]; 2] = [
        // A fatal error after start-up: no cluster to talk to.
        &["--log-format", "json", "check", "--dssm-namespace", "x"],
        // A command line clap refuses.
        &["--log-format", "json", "check", "--no-such-flag"],
    ];
    for args in cases {
        let (code, _, stderr) = output(without_kubeconfig(home.path()).args(args));
        assert_ne!(code, 0, "{args:?}");
        assert!(!stderr.trim().is_empty(), "{args:?}");
        for line in stderr.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {line:?}"));
            assert!(v["level"].is_string(), "{line}");
        }
        let last: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap();
        assert_eq!(last["level"], "ERROR", "{args:?}: {stderr}");
    }
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    // A transient error makes `check` log a retry warning.
    let fault = || {
        env.server.add_fault(support::apiserver::Fault::status(
            "GET",
            "/secrets/dssm-certs-secret",
            1,
            503,
        ))
    };
    fault();
    let (code, _, stderr) = env.run(&["check"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("retrying"),
        "no warning to look at: {stderr}"
    );
    assert!(!stderr.contains('\u{1b}'), "colour on a pipe: {stderr:?}");

    let on_tty = |no_color: bool| {
        fault();
        let kubeconfig = env.kubeconfig.to_str().unwrap().to_string();
        let mut line = format!("KUBECONFIG='{kubeconfig}' ");
        if no_color {
            line.push_str("NO_COLOR=1 ");
        }
        line.push_str(&format!(
            "'{}' check --dssm-namespace {} --tmm-namespace {}",
            env!("CARGO_BIN_EXE_dssm-certs"),
            env.dssm_ns,
            env.tmm_ns
        ));
        let out = Command::new("timeout")
            .args(["30", "script", "-qec", &format!("env {line}"), "/dev/null"])
            .env_remove("NO_COLOR")
            .stdin(Stdio::piped())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let coloured = on_tty(false);
    assert!(
        coloured.contains("retrying") && coloured.contains('\u{1b}'),
        "{coloured:?}"
    );
    let plain = on_tty(true);
    assert!(
        plain.contains("retrying") && !plain.contains('\u{1b}'),
        "{plain:?}"
    );
}

#[test]
fn empty_and_malformed_dssm_selectors_are_refused_before_any_request() {
    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    for selector in ["", "app in (f5-dssm-db", "app=x,", "app in ()"] {
        env.server.clear_requests();
        let (code, _, stderr) = env.run(&["restart", "--dssm-selector", selector]);
        assert_eq!(code, 64, "{selector:?}: {stderr}");
        assert!(stderr.contains("--dssm-selector"), "{selector:?}: {stderr}");
        assert!(
            env.server.requests().is_empty(),
            "{selector:?}: requests were made"
        );
    }
}

#[test]
fn probe_ends_at_its_deadline_when_endpoints_never_answer() {
    let tmp = tempdir();
    let out = copy_of_defaults(&tmp.path().join("out"));
    // Three endpoints that accept and then say nothing, as a black-holed pod would.
    let holes: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addr = |i: usize| holes[i].local_addr().unwrap().to_string();
    let started = Instant::now();
    let (code, stdout, stderr) = run(&[
        "probe",
        "--dir",
        out.to_str().unwrap(),
        "--endpoint",
        &addr(0),
        "--db-endpoint",
        &format!("{},{}", addr(1), addr(2)),
        "--timeout",
        "20s",
        "--deadline",
        "2s",
    ]);
    let took = started.elapsed();
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(took < Duration::from_secs(8), "probe took {took:?}");
    assert!(stdout.contains("--deadline"), "{stdout}");
    drop(holes);
}

#[test]
fn a_crafted_certificate_subject_cannot_rewrite_the_check_table_on_a_terminal() {
    let tmp = tempdir();
    let out = copy_of_defaults(&tmp.path().join("out"));
    // Clear the screen, home the cursor, and print a reassuring last line.
    let cn = "x\u{1b}[2J\u{1b}[H\noverall: OK";
    std::fs::write(out.join("dssm-ca.crt"), self_signed_ca_pem(cn)).unwrap();
    let (code, stdout, _) = run(&["check", "--dir", out.to_str().unwrap()]);
    assert_eq!(code, 2, "the leaf no longer chains: {stdout}");
    assert!(
        !stdout.contains('\u{1b}'),
        "raw escape sequence: {stdout:?}"
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("overall:")).count(),
        1,
        "{stdout}"
    );
    assert!(
        stdout.contains(r"x\u{1b}[2J\u{1b}[H\noverall: OK"),
        "{stdout}"
    );
}

/// The trust-boundary issue: `--renew-before` at or over `--days` (or `--ca-renew-before` at or
/// over `--ca-days`) made every new certificate due at birth, and every pass renewed: inside
/// the agent's window, back-to-back rolling restarts. Refused before any request.
#[test]
fn a_renew_before_not_shorter_than_the_lifetime_is_refused_before_any_request() {
    let env = TestEnv::spk();
    let cases: [&[&str]; 4] = [
        &["reconcile", "--renew-before", "30d", "--days", "30"],
        &["rotate", "--renew-before", "400d"],
        &["reconcile", "--ca-renew-before", "3650d"],
        &["run", "--ca-days", "365", "--ca-renew-before", "1y"],
    ];
    for args in cases {
        let (code, _, stderr) = env.run(args);
        assert_eq!(code, 64, "{args:?}: {stderr}");
        let flag = if args.contains(&"--ca-renew-before") {
            "--ca-renew-before"
        } else {
            "--renew-before"
        };
        assert!(
            stderr.contains(&format!("{flag} ")) && stderr.contains("is not shorter than"),
            "{args:?}: {stderr}"
        );
        assert!(
            env.server.requests().is_empty(),
            "{args:?}: requests were made"
        );
    }
    // Shorter is fine (it runs: a first install).
    let (code, out, err) =
        env.reconcile(&["--renew-before", "29d", "--days", "30", "--no-restart"]);
    assert_eq!(code, 0, "{out}{err}");
}

/// The trust-boundary issue: `check` escaped control characters but not Unicode bidi controls
/// (U+202E reverses what follows on screen), and `reconcile`/`rotate` printed plan reasons
/// built from certificate subjects without escaping at all.
#[test]
fn bidi_controls_and_escape_sequences_in_subjects_are_escaped_in_check_and_reconcile_output() {
    let cn = "x\u{1b}[2J\u{202e}KO :llarevo\u{2066}";
    let tmp = tempdir();
    let out = copy_of_defaults(&tmp.path().join("out"));
    std::fs::write(out.join("dssm-ca.crt"), self_signed_ca_pem(cn)).unwrap();
    let (_, stdout, _) = run(&["check", "--dir", out.to_str().unwrap()]);
    for raw in ['\u{1b}', '\u{202e}', '\u{2066}'] {
        assert!(!stdout.contains(raw), "check: raw {raw:?}: {stdout:?}");
    }
    assert!(stdout.contains(r"\u{202e}KO :llarevo\u{2066}"), "{stdout}");

    let env = TestEnv::spk();
    assert_eq!(env.reconcile(&["--no-restart"]).0, 0);
    env.put_secret(
        "spk-ingress",
        "dssm-certs-secret",
        &[
            ("dssm-ca.crt", self_signed_ca_pem(cn).as_bytes()),
            ("dssm-cert.crt", &read(&out.join("dssm-cert.crt"))),
            ("dhparam2048.pem", &read(&out.join("dhparam2048.pem"))),
        ],
    );
    let (code, stdout, stderr) = env.reconcile(&["--no-restart", "--dry-run"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("plan: repair"), "{stdout}");
    for raw in ['\u{1b}', '\u{202e}', '\u{2066}'] {
        assert!(!stdout.contains(raw), "reconcile: raw {raw:?}: {stdout:?}");
    }
    assert!(
        stdout.contains(r"\u{202e}"),
        "the subject is shown, escaped: {stdout}"
    );
}

/// The trust-boundary issue: `--dhparam`, `--dir` and the CA files were read whole (`/dev/zero`
/// exhausted memory); `--dhparam ffdhe4096` said only "No such file"; `check --dir` on a missing
/// folder said "not a directory" above an empty certificate table.
#[test]
fn endless_input_files_and_unknown_dhparam_names_are_refused_with_what_to_do() {
    let tmp = tempdir();
    let dest = tmp.path().join("g");
    for (flag, value) in [("--dhparam", "/dev/zero"), ("--ca-cert", "/dev/zero")] {
        let mut args = vec!["generate", "--out", dest.to_str().unwrap(), flag, value];
        if flag == "--ca-cert" {
            args.extend(["--ca-key", "/dev/zero"]);
        }
        let started = Instant::now();
        let (code, stdout, stderr) = run(&args);
        assert_eq!(code, 4, "{flag}: {stdout}{stderr}");
        assert!(
            stderr.contains("/dev/zero") && stderr.contains("larger than 4 MiB"),
            "{flag}: {stderr}"
        );
        assert!(started.elapsed() < Duration::from_secs(10), "{flag}");
    }
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        dest.to_str().unwrap(),
        "--dhparam",
        "ffdhe4096",
    ]);
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("--dhparam ffdhe4096: cannot read")
            && stderr.contains("`generate`, `ffdhe2048`"),
        "{stderr}"
    );
    let out = copy_of_defaults(&tmp.path().join("out"));
    std::fs::remove_file(out.join("dssm-ca.crt")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", out.join("dssm-ca.crt")).unwrap();
    let (code, stdout, _) = run(&["check", "--dir", out.to_str().unwrap()]);
    assert_eq!(code, 3, "{stdout}");
    assert!(stdout.contains("larger than 4 MiB"), "{stdout}");

    let (code, stdout, _) = run(&["check", "--dir", "/nonexistent-dssm"]);
    assert_eq!(code, 3, "{stdout}");
    assert!(
        stdout.contains("/nonexistent-dssm: no such directory; --dir takes the folder")
            && !stdout.contains("CERTIFICATE"),
        "{stdout}"
    );
}

/// The trust-boundary issue: `--tmm-deployment` was not validated, so a newline injected YAML
/// into `values`' output (and reached API paths). Validated as the API server validates names.
#[test]
fn a_tmm_deployment_name_the_api_server_would_refuse_is_refused_before_any_output() {
    for name in ["f5-tmm\nevil: true", "F5-TMM", "tmm-", ""] {
        let flag = format!("--tmm-deployment={name}");
        let (code, stdout, stderr) = run(&["values", "--dssm-namespace", "spk-utilities", &flag]);
        assert_eq!(code, 64, "{name:?}: {stdout}{stderr}");
        assert!(stdout.is_empty(), "{name:?}: {stdout}");
        assert!(
            stderr.contains("--tmm-deployment") && stderr.contains("not a valid Deployment name"),
            "{name:?}: {stderr}"
        );
    }
    let (code, stdout, _) = run(&[
        "values",
        "--dssm-namespace",
        "spk-utilities",
        "--tmm-deployment",
        "f5-tmm.v2",
    ]);
    assert_eq!(code, 0);
    assert!(stdout.contains("deployment/f5-tmm.v2"), "{stdout}");
}

/// The trust-boundary issue: `--ca-cert` with junk inside its PEM block printed x509-parser's
/// `Parsing Error: Der(UnexpectedTag { expected: Some(Tag(16)), actual: Tag(0) })`.
#[test]
fn junk_inside_a_certificate_pem_block_is_described_in_words() {
    let tmp = tempdir();
    let junk = tmp.path().join("junk.crt");
    std::fs::write(
        &junk,
        "-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let key = made_by_default().join("dssm-ca.key");
    let dest = tmp.path().join("out");
    let (code, _, stderr) = run(&[
        "generate",
        "--out",
        dest.to_str().unwrap(),
        "--ca-cert",
        junk.to_str().unwrap(),
        "--ca-key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("junk.crt")
            && stderr.contains("not an X.509 certificate")
            && !stderr.contains("Der(")
            && !stderr.contains("Tag("),
        "{stderr}"
    );
}
