//! `sam-conform`: replays conformance cases on a backend and prints one line per case.

use std::path::PathBuf;
use std::process::ExitCode;

use sam_verification::backend::{CoreBackend, CudaBackend, NdarrayBackend, ReplayBackend};
use sam_verification::case::{Dtype, parse_case};
use sam_verification::deviation::{STORAGE_NAMES, measure_named};
use sam_verification::{collect_cases, run_file};

const USAGE: &str = "usage: sam-conform [--backend core|ndarray|candle|cuda] PATH...
       sam-conform --storage bf16|f16|bf16-master|f16-master PATH...

Replays every conformance case (a .json file, or a directory of them) through sam-core on the
chosen storage backend and compares the trajectory with the case's tolerance.
Prints `PASS name` or `FAIL name: reason` per case, then `N passed, M failed`;
exits 1 if any case failed, 2 on a usage error.

With --storage, replays every case with 16-bit storage (the objective computing in the case's
dtype at the 16-bit weights) and prints the deviation from the expected trajectory as a
Markdown table (a measurement, not a verdict); exits 1 only if a case cannot be run.
  bf16, f16                 the reference backend, weights, gradients and optimizer state in it
  bf16-master, f16-master   sam-ndarray with f32 master weights and optimizer state, gradients
                            and a model copy of the weights in 16 bits (the trajectory is the
                            model copy's)

backends: core     the reference backend of sam-core (default)
          ndarray  sam-ndarray (CPU; each param is its own tensor)
          candle   sam-candle (CPU; each param is its own candle Var, gradients through a
                   GradStore; needs the default feature `candle`)
          cuda     sam-cuda (GPU device 0; every case fails with the reason if there is none)";

fn main() -> ExitCode {
    let mut backend = String::from("core");
    let mut storage = None;
    let mut paths = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--backend" => match args.next() {
                Some(b) => backend = b,
                None => return usage("--backend needs a value"),
            },
            s if s.starts_with("--backend=") => backend = s["--backend=".len()..].to_string(),
            "--storage" => match args.next() {
                Some(s) => storage = Some(s),
                None => return usage("--storage needs a value"),
            },
            s if s.starts_with('-') => return usage(&format!("unknown option {s}")),
            _ => paths.push(PathBuf::from(a)),
        }
    }
    if paths.is_empty() {
        return usage("no case file or directory given");
    }
    if let Some(storage) = storage {
        if !STORAGE_NAMES.contains(&storage.as_str()) {
            return usage(&format!("unknown storage `{storage}`"));
        }
        return deviations(&storage, &paths);
    }
    match backend.as_str() {
        "core" => run(&CoreBackend, &paths),
        "ndarray" => run(&NdarrayBackend, &paths),
        #[cfg(feature = "candle")]
        "candle" => run(&sam_verification::backend::CandleBackend, &paths),
        "cuda" => run(&CudaBackend::new(), &paths),
        other => usage(&format!("unknown backend `{other}`")),
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("sam-conform: {msg}\n\n{USAGE}");
    ExitCode::from(2)
}

fn deviations(storage: &str, paths: &[PathBuf]) -> ExitCode {
    let files = match collect_cases(paths) {
        Ok(f) => f,
        Err(e) => return usage(&e),
    };
    println!(
        "| case | dtype | steps | elements | max ‖Δθ‖∞/‖θ‖∞ | final ‖Δθ‖∞/‖θ‖∞ | max \\|Δθ\\| | max \\|ΔL\\|/\\|L\\| |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut failed = 0;
    for f in &files {
        let parsed = std::fs::read(f)
            .map_err(|e| e.to_string())
            .and_then(|b| parse_case(&b).map_err(|e| e.to_string()));
        let name = f
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        match parsed.and_then(|c| {
            measure_named(storage, &c)
                .map(|d| (c.dtype, d))
                .map_err(|e| e.to_string())
        }) {
            Ok((dtype, d)) => println!(
                "| {name} | {} | {} | {} | {:.2e} | {:.2e} | {:.2e} | {:.2e} |",
                if dtype == Dtype::F32 { "f32" } else { "f64" },
                d.steps,
                d.elements,
                d.params_rel,
                d.final_rel,
                d.params_abs,
                d.loss_rel
            ),
            Err(e) => {
                failed += 1;
                println!("| {name} | cannot run: {e} | | | | | | |");
            }
        }
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run<K: ReplayBackend>(backend: &K, paths: &[PathBuf]) -> ExitCode {
    let files = match collect_cases(paths) {
        Ok(f) => f,
        Err(e) => return usage(&e),
    };
    let (mut passed, mut failed) = (0usize, 0usize);
    for f in &files {
        let r = run_file(f, backend);
        println!("{}", r.line());
        if r.passed() {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
