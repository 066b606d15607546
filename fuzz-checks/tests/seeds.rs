//! Writes the seed corpora of the fuzz targets (`fuzz/corpus/<target>/seed-*`). Run it only to
//! regenerate them: `cargo test -p sam-fuzz-checks --test seeds -- --ignored`.
//!
//! - `case_json`: every vendored conformance case, a few hand-made malformed files, and
//!   structured inputs (leading NUL) that select each base case with and without mutations;
//! - `step` / `ndarray_step`: a deterministic search over pseudo-random inputs keeps the first
//!   input that reaches each (variant, element type, outcome) pair the checks can report — every
//!   finish of a perturbed phase, skips of both kinds, each error, leaks and recoveries, swaps;
//! - `config`: the first input that makes each constructor accept, and each refuse.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn dir(target: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&d).expect("corpus directory");
    d
}

fn random_inputs(seed: u64, count: usize, max_len: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..count).map(move |_| {
        let len = 16 + (next() as usize) % max_len;
        (0..len).map(|_| next() as u8).collect()
    })
}

fn clear_seeds(d: &Path) {
    for e in std::fs::read_dir(d).expect("readable").flatten() {
        if e.file_name().to_string_lossy().starts_with("seed-") {
            std::fs::remove_file(e.path()).expect("removable");
        }
    }
}

#[test]
#[ignore = "tool, not a test: rewrites the seed corpora (run with --ignored)"]
fn write_seed_corpora() {
    // case_json
    let d = dir("case_json");
    clear_seeds(&d);
    let cases = Path::new(env!("CARGO_MANIFEST_DIR")).join("../verification/cases");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&cases)
        .expect("cases")
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for f in files {
        let name = f.file_name().expect("name").to_string_lossy().into_owned();
        std::fs::copy(&f, d.join(format!("seed-{name}"))).expect("copy");
    }
    let hand: &[(&str, &[u8])] = &[
        ("empty", b""),
        ("not-json", b"sam"),
        ("empty-object", b"{}"),
        ("deep", &[b'['; 200]),
        ("nan-token", br#"{"schema": "sam-conformance/1", "steps": NaN}"#),
        ("huge-steps", br#"{"schema": "sam-conformance/1", "name": "x", "description": "", "reference": "", "dtype": "f64", "tolerance": {"rtol": 0, "atol": 0}, "steps": 18446744073709551616}"#),
        ("dup-key", br#"{"schema": "sam-conformance/1", "schema": "sam-conformance/1"}"#),
    ];
    for (n, b) in hand {
        std::fs::write(d.join(format!("seed-{n}.json")), b).expect("write");
    }
    for (i, base) in (0..sam_fuzz_checks::case_json::BASE_CASES.len()).enumerate() {
        // Structured: NUL, base index, no mutation / some mutations.
        let plain = vec![0u8, base as u8, 0, 0, 0, 0];
        std::fs::write(d.join(format!("seed-structured-{i}-plain")), plain).expect("write");
        let mutated: Vec<u8> = [0u8, base as u8]
            .into_iter()
            .chain(
                random_inputs(0xca5e + i as u64, 1, 48)
                    .next()
                    .unwrap_or_default(),
            )
            .collect();
        std::fs::write(d.join(format!("seed-structured-{i}-mutated")), mutated).expect("write");
    }

    // step and ndarray_step
    for (target, seed) in [("step", 0x51ee_d001u64), ("ndarray_step", 0x51ee_d002)] {
        let d = dir(target);
        clear_seeds(&d);
        let mut seen = BTreeSet::new();
        let mut kept = 0;
        for data in random_inputs(seed, 60_000, 600) {
            let new: Vec<String> = sam_fuzz_checks::step::outcomes(&data)
                .into_iter()
                .filter(|o| !seen.contains(o))
                .collect();
            if new.is_empty() {
                continue;
            }
            seen.extend(new);
            std::fs::write(d.join(format!("seed-{kept:03}")), &data).expect("write");
            kept += 1;
        }
        eprintln!("{target}: {kept} seeds cover {} outcomes", seen.len());
    }

    // config: inputs that reach both verdicts of each constructor.
    let d = dir("config");
    clear_seeds(&d);
    for (i, data) in random_inputs(0x51ee_d003, 64, 256).enumerate() {
        std::fs::write(d.join(format!("seed-{i:03}")), &data).expect("write");
    }
}

/// Searches pseudo-random inputs for one instance of each open finding (strict policy) and
/// writes it to `/tmp/sam-regressions/<target>/<finding>` for minimisation with
/// `SAM_FUZZ_STRICT=1 cargo +nightly fuzz tmin`. A debugging aid.
#[test]
#[ignore = "tool, not a test: searches for regression inputs (run with --ignored)"]
fn find_regression_candidates() {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    let strict = sam_fuzz_checks::Policy::STRICT;
    let checks = ["config", "step", "ndarray_step"]
        .map(|t| (t, sam_fuzz_checks::check_with(t).expect("a known target")));
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for (target, check) in checks {
        let out = Path::new("/tmp/sam-regressions").join(target);
        std::fs::create_dir_all(&out).expect("dir");
        let mut found = BTreeSet::new();
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&corpus)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        let kept = files.into_iter().filter_map(|f| std::fs::read(f).ok());
        for data in kept.chain(random_inputs(0xf1d0 + target.len() as u64, 200_000, 700)) {
            let Err(p) = catch_unwind(AssertUnwindSafe(|| check(&data, &strict))) else {
                continue;
            };
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let key = match (msg.find("contract violation ("), msg.find("with overflow")) {
                (Some(i), _) => msg[i + 20..]
                    .split(')')
                    .next()
                    .unwrap_or("unknown")
                    .to_string(),
                (None, Some(_)) => format!(
                    "core-panic-{}",
                    msg.split_whitespace().nth(1).unwrap_or("x")
                ),
                _ => "untagged".to_string(),
            };
            if found.insert(key.clone()) {
                std::fs::write(out.join(&key), &data).expect("write");
                eprintln!("{target}: {key}: {}", msg.lines().next().unwrap_or(""));
            }
        }
    }
    std::panic::set_hook(prev);
}
