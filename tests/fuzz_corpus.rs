//! Replays the fuzz corpus (`fuzz/corpus/<target>/*`) through the same entry points the
//! cargo-fuzz targets call, on stable Rust: a regression found by fuzzing stays found.

#[test]
fn every_corpus_file_goes_through_its_target_without_panicking() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut replayed = 0;
    for (target, run) in dssm_certs::fuzz::TARGETS {
        let dir = root.join(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                panic!("{target} panicked on {}", path.display());
            }
            replayed += 1;
        }
    }
    assert!(
        replayed >= 10,
        "the corpus is missing: only {replayed} inputs"
    );
}
