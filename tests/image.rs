//! The container image: the Dockerfile builds from exactly the files it copies, and its base
//! images are pinned. No container engine runs here, so the build stage is replayed: the
//! Dockerfile's `COPY` lines are parsed, exactly those paths are copied into an empty folder,
//! and cargo checks the binary there, offline and locked, as the image's `cargo build` would
//! build it. A workspace member or a declared target the Dockerfile leaves out fails it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn dockerfile() -> String {
    std::fs::read_to_string(repo().join("Dockerfile")).expect("read Dockerfile")
}

/// The build stage's `COPY` lines (not `COPY --from`), as (sources, destination) relative to
/// the build context and the WORKDIR.
fn copies(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| l.to_ascii_uppercase().starts_with("COPY "))
        .filter(|l| !l.contains("--from"))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().skip(1).collect();
            assert!(
                !words
                    .iter()
                    .any(|w| w.starts_with('[') || w.starts_with("--")),
                "Dockerfile: {l:?}: only the plain form `COPY SRC... DEST` is understood here"
            );
            let (dest, sources) = words.split_last().expect("COPY has a destination");
            assert!(!sources.is_empty(), "Dockerfile: {l:?} copies nothing");
            (
                sources.iter().map(|s| s.to_string()).collect(),
                dest.to_string(),
            )
        })
        .collect()
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    }
}

/// Lays out the build context as the Dockerfile's COPY lines make it, in `into`.
fn lay_out(text: &str, into: &Path) {
    for (sources, dest) in copies(text) {
        let dest = into.join(dest.trim_start_matches("./"));
        for s in &sources {
            let from = repo().join(s);
            assert!(from.exists(), "Dockerfile copies {s}, which does not exist");
            // `COPY a b ./` puts files into the folder; `COPY src ./src` makes the folder.
            let to = if sources.len() > 1 || dest.to_string_lossy().ends_with('/') {
                dest.join(Path::new(s).file_name().unwrap())
            } else {
                dest.clone()
            };
            copy_tree(&from, &to);
        }
    }
}

/// The checked build, offline from the local cargo cache, in its own target folder (the suite's
/// is locked by the `cargo test` running this; this one is kept, so later runs are quick).
fn cargo_check(dir: &Path) -> std::process::Output {
    let target: PathBuf = repo().join("target").join("image-check");
    Command::new(env!("CARGO"))
        .args(["check", "--offline", "--locked", "--bin", "dssm-certs"])
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target)
        .env_remove("RUSTFLAGS")
        .output()
        .expect("run cargo")
}

#[test]
fn the_image_builds_from_exactly_the_files_the_dockerfile_copies() {
    let text = dockerfile();
    assert!(
        text.contains("cargo build --release --locked --bin dssm-certs"),
        "the build stage's command changed: update this test's replay of it"
    );
    let dir = tempfile::tempdir().unwrap();
    lay_out(&text, dir.path());
    let out = cargo_check(dir.path());
    assert!(
        out.status.success(),
        "the Dockerfile's files do not build (a workspace member or a target not copied?):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_dockerfile_that_leaves_out_a_workspace_member_does_not_build() {
    // The check above can fail: without testcluster/ (as the Dockerfile once was) cargo cannot
    // load the workspace.
    let text: String = dockerfile()
        .lines()
        .filter(|l| !l.contains("testcluster"))
        .map(|l| format!("{l}\n"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    lay_out(&text, dir.path());
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--offline", "--locked", "--format-version", "1"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "cargo loaded a workspace without testcluster/"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("testcluster"), "{err}");
}

#[test]
fn every_base_image_is_pinned_by_digest() {
    let text = dockerfile();
    let froms: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    for line in froms {
        let image = line.split_whitespace().nth(1).unwrap();
        let digest = image.split_once("@sha256:").map(|(_, d)| d);
        assert!(
            digest.is_some_and(|d| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit())),
            "{line:?}: pin the image by digest (docs/commands.md, \"Container image\")"
        );
    }
}
