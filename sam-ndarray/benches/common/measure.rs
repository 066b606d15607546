//! Criterion timing that keeps the samples (shared by the benches).

use std::cell::RefCell;
use std::time::Instant;

use criterion::Criterion;

/// Samples criterion takes per case (the summaries use their median).
pub const SAMPLES: usize = 10;

/// Measures `routine` with criterion, keeping the per-iteration times of the samples; returns
/// their median.
pub fn measure(c: &mut Criterion, name: &str, mut routine: impl FnMut()) -> f64 {
    let times = RefCell::new(Vec::new());
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                routine();
            }
            let d = t.elapsed();
            times.borrow_mut().push(d.as_secs_f64() / iters as f64);
            d
        })
    });
    // The last SAMPLES entries are criterion's samples (earlier ones are its warm-up).
    let mut t = times.into_inner();
    let mut last: Vec<f64> = t.split_off(t.len().saturating_sub(SAMPLES));
    last.sort_by(f64::total_cmp);
    last.get(last.len() / 2).copied().unwrap_or(f64::NAN)
}
