//! Every vendored conformance case replays within tolerance on the core and ndarray backends.

use std::path::PathBuf;

use sam_verification::backend::{CoreBackend, NdarrayBackend, ReplayBackend};
use sam_verification::{collect_cases, run_file};

#[test]
fn all_vendored_cases_pass_on_core() {
    all_pass(&CoreBackend);
}

#[test]
fn all_vendored_cases_pass_on_ndarray() {
    all_pass(&NdarrayBackend);
}

fn all_pass<K: ReplayBackend>(backend: &K) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cases");
    let files = collect_cases(&[dir]).unwrap();
    assert!(
        files.len() >= 41,
        "expected the 41 vendored cases, found {}",
        files.len()
    );
    let mut failed = Vec::new();
    for f in &files {
        let r = run_file(f, backend);
        println!("{}", r.line());
        if !r.passed() {
            failed.push(r.line());
        }
    }
    assert!(
        failed.is_empty(),
        "{} case(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn malformed_and_unknown_cases_fail_cleanly() {
    let r = sam_verification::run_bytes("junk", b"{not json", &CoreBackend);
    assert!(
        !r.passed() && r.line().starts_with("FAIL junk: malformed case"),
        "{}",
        r.line()
    );
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cases");
    let text = std::fs::read_to_string(dir.join("sam_sgd_plain.json")).unwrap();
    let r = sam_verification::run_bytes(
        "x",
        text.replace("\"variant\":\"sam\"", "\"variant\":\"bogus\"")
            .as_bytes(),
        &CoreBackend,
    );
    assert!(!r.passed(), "{}", r.line());
    // A tampered trajectory is reported as a mismatch naming the array, step and index.
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut v = v;
    let x = v["expected"]["params"][2][1].as_f64().unwrap();
    v["expected"]["params"][2][1] = serde_json::json!(x + 1e-3);
    let r = sam_verification::run_bytes("x", v.to_string().as_bytes(), &CoreBackend);
    assert!(r.line().contains("params step 2 index 1"), "{}", r.line());
}
