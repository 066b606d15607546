//! Replays every input the fuzz targets have kept: `fuzz/corpus/<target>/*` (the seed and
//! fuzzer-grown corpora), `fuzz/artifacts/<target>/*` (crashes of local fuzzing runs, not
//! committed) and `fuzz/regressions/<target>/*` (minimised past crashes), plus a few thousand
//! pseudo-random inputs per target, through the same checks the fuzz targets call.
//!
//! A known-open finding (see `sam_fuzz_checks::KNOWN_OPEN`) is tolerated unless
//! `SAM_FUZZ_STRICT=1` is set; with it, the regression inputs of open findings fail until the
//! fix lands in `sam-core`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use sam_fuzz_checks::check_for;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Every file of `fuzz/{corpus,artifacts,regressions}/<target>/`, in name order.
fn inputs(target: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in ["corpus", "artifacts", "regressions"] {
        let dir = fuzz_dir().join(sub).join(target);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        out.extend(files);
    }
    out
}

fn replay(target: &str) {
    let check = check_for(target).expect("a known target");
    let files = inputs(target);
    let mut failures = Vec::new();
    for f in &files {
        let data = std::fs::read(f).unwrap_or_default();
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| check(&data))) {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{}: {msg}", f.display()));
        }
    }
    eprintln!("{target}: replayed {} files", files.len());
    assert!(
        failures.is_empty(),
        "{} of {} inputs of `{target}` failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

/// A deterministic stream of pseudo-random inputs of varied lengths.
fn random_inputs(seed: u64, count: usize, max_len: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..count).map(move |_| {
        let len = (next() as usize) % max_len;
        (0..len).map(|_| next() as u8).collect()
    })
}

fn smoke(target: &str, seed: u64, count: usize, max_len: usize) {
    let check = check_for(target).expect("a known target");
    for (i, data) in random_inputs(seed, count, max_len).enumerate() {
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            panic!("`{target}` failed on pseudo-random input {i} (seed {seed}): {data:02x?}");
        }
    }
}

#[test]
fn corpus_config() {
    replay("config");
}

#[test]
fn corpus_step() {
    replay("step");
}

#[test]
fn corpus_ndarray_step() {
    replay("ndarray_step");
}

#[test]
fn corpus_case_json() {
    replay("case_json");
}

#[test]
fn corpus_checkpoint() {
    replay("checkpoint");
}

#[test]
fn corpus_interval() {
    replay("interval");
}

#[test]
fn random_interval() {
    smoke("interval", 0x5eed_0006, 800, 256);
}

#[test]
fn corpus_looksam() {
    replay("looksam");
}

#[test]
fn random_looksam() {
    smoke("looksam", 0x5eed_0007, 800, 256);
}

#[test]
fn corpus_loss_scale() {
    replay("loss_scale");
}

#[test]
fn random_loss_scale() {
    smoke("loss_scale", 0x5eed_0008, 1500, 256);
}

#[test]
fn random_checkpoint() {
    smoke("checkpoint", 0x5eed_0005, 600, 96);
}

#[test]
fn random_config() {
    smoke("config", 0x5eed_0001, 3000, 256);
}

#[test]
fn random_step() {
    smoke("step", 0x5eed_0002, 1500, 512);
}

#[test]
fn random_ndarray_step() {
    smoke("ndarray_step", 0x5eed_0003, 600, 512);
}

#[test]
fn random_case_json() {
    // Structured inputs (leading NUL) mutate vendored cases; others are raw bytes.
    let check = check_for("case_json").expect("a known target");
    for (i, mut data) in random_inputs(0x5eed_0004, 400, 128).enumerate() {
        if i % 2 == 0 {
            data.insert(0, 0);
        }
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            panic!("`case_json` failed on pseudo-random input {i}: {data:02x?}");
        }
    }
}

/// Writes the first failing pseudo-random input of each smoke test to `/tmp` (debug aid).
#[test]
#[ignore = "tool, not a test: prints the first failing inputs (run with --ignored)"]
fn dump_first_failures() {
    for (target, seed, count, max_len) in [
        ("step", 0x5eed_0002u64, 1500, 512),
        ("ndarray_step", 0x5eed_0003, 600, 512),
        ("config", 0x5eed_0001, 3000, 256),
    ] {
        let check = check_for(target).expect("a known target");
        for (i, data) in random_inputs(seed, count, max_len).enumerate() {
            if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
                std::fs::write(format!("/tmp/fail-{target}"), &data).expect("write");
                eprintln!("{target}: input {i}");
                break;
            }
        }
    }
}

/// Every regression input named after a finding (`fuzz/regressions/<target>/<Finding>-…`):
/// while the finding is open, reports whether the input still reproduces it; once it is fixed
/// and removed from `KNOWN_OPEN`, the plain replay above makes the input a hard gate. Never
/// fails by itself.
#[test]
fn regressions_of_open_findings() {
    use sam_fuzz_checks::{Finding, KNOWN_OPEN, Policy, check_with};
    for target in sam_fuzz_checks::TARGETS {
        let dir = fuzz_dir().join("regressions").join(target);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let check = check_with(target).expect("a known target");
        let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let Some(finding) = name.split('-').next().and_then(Finding::from_name) else {
                continue;
            };
            if !KNOWN_OPEN.contains(&finding) {
                continue;
            }
            let data = std::fs::read(&f).unwrap_or_default();
            let policy = Policy {
                strict: false,
                only: Some(finding),
            };
            let reproduces = catch_unwind(AssertUnwindSafe(|| check(&data, &policy))).is_err();
            if reproduces {
                eprintln!("open finding {finding:?} still reproduces: {target}/{name}");
            } else {
                eprintln!(
                    "finding {finding:?} no longer reproduces with {target}/{name}: fixed? remove it from KNOWN_OPEN"
                );
            }
        }
    }
}
