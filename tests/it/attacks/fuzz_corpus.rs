//! The fuzz targets' properties on stable Rust: every committed corpus file under
//! `fuzz/corpus/<target>/` goes through the same check the cargo-fuzz target runs (see
//! `fuzz/checks.rs`). Longer runs under libFuzzer: `scripts/fuzz`.

#[path = "../../../fuzz/checks.rs"]
mod checks;

use std::path::PathBuf;

/// Runs every file of `fuzz/corpus/<target>` through `check`; returns how many there were.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .collect();
    files.sort();
    for file in &files {
        let data = std::fs::read(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "{target}: corpus file {} breaks the property (see the panic above)",
            file.display()
        );
    }
    files.len()
}

#[test]
fn envelope_corpus_decodes_without_panics_and_round_trips() {
    assert!(
        replay("envelope", checks::envelope) > 0,
        "an empty corpus checks nothing"
    );
}

#[test]
fn key_corpus_builds_equal_keys_for_equal_parts_only() {
    assert!(
        replay("key", checks::key_parts) > 0,
        "an empty corpus checks nothing"
    );
}

#[test]
fn request_key_corpus_keys_requests_without_panics() {
    assert!(
        replay("request_key", checks::request_key) > 0,
        "an empty corpus checks nothing"
    );
}

#[test]
fn config_corpus_parses_without_panics_and_places_every_problem() {
    assert!(
        replay("config", checks::config) > 0,
        "an empty corpus checks nothing"
    );
}
