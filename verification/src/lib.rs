//! `sam-verification`: the conformance runner of the SAM family.
//!
//! It replays golden trajectories produced by the original upstream PyTorch implementations
//! (format: `SCHEMA.md` in this crate, cases in `cases/`) through the public `sam-core` API on a
//! chosen storage backend, and compares every element with the case's tolerance.
//!
//! Command line: `sam-conform [--backend core] PATH...` where each path is a case file or a
//! directory of `*.json` cases; `sam-conform --storage bf16|f16|bf16-master|f16-master PATH...`
//! replays the cases with 16-bit storage (pure, or with `f32` master weights) and prints how far
//! each trajectory moves ([`deviation`]).

#![forbid(unsafe_code)]

pub mod backend;
#[cfg(feature = "candle")]
mod candle_backend;
pub mod case;
pub mod compare;
pub mod deviation;
pub mod objective;
pub mod replay;

use std::path::{Path, PathBuf};

use backend::ReplayBackend;
use replay::Verdict;

/// The result of one case file.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseResult {
    /// The case name (the file stem if the file could not be parsed).
    pub name: String,
    /// The verdict.
    pub verdict: Verdict,
}

impl CaseResult {
    /// Whether the case passed.
    pub fn passed(&self) -> bool {
        self.verdict == Verdict::Pass
    }

    /// The runner's line for this case: `PASS name` or `FAIL name: reason`.
    pub fn line(&self) -> String {
        match &self.verdict {
            Verdict::Pass => format!("PASS {}", self.name),
            Verdict::Mismatch(m) => format!("FAIL {}: first mismatch: {m}", self.name),
            Verdict::Error(e) => format!("FAIL {}: {e}", self.name),
        }
    }
}

/// Expands paths into case files: files as given, directories into their `*.json` files in
/// name order.
pub fn collect_cases(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let rd = std::fs::read_dir(p).map_err(|e| format!("{}: {e}", p.display()))?;
            let mut files: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && f.extension().is_some_and(|x| x == "json"))
                .collect();
            files.sort();
            out.extend(files);
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            return Err(format!("{}: no such file or directory", p.display()));
        }
    }
    Ok(out)
}

/// Parses and replays one case from its bytes (never panics on malformed input).
pub fn run_bytes<K: ReplayBackend>(fallback_name: &str, bytes: &[u8], backend: &K) -> CaseResult {
    match case::parse_case(bytes) {
        Ok(c) => CaseResult {
            name: c.name.clone(),
            verdict: replay::check_case(&c, backend),
        },
        Err(e) => CaseResult {
            name: fallback_name.to_string(),
            verdict: Verdict::Error(format!("malformed case: {e}")),
        },
    }
}

/// Reads, parses and replays one case file.
pub fn run_file<K: ReplayBackend>(path: &Path, backend: &K) -> CaseResult {
    let stem = path.file_stem().map_or_else(
        || path.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    );
    match std::fs::read(path) {
        Ok(bytes) => run_bytes(&stem, &bytes, backend),
        Err(e) => CaseResult {
            name: stem,
            verdict: Verdict::Error(format!("cannot read {}: {e}", path.display())),
        },
    }
}
