//! One SAM step's optimizer work on `f32` `NdGroup`s, against the machine's STREAM triad.
//!
//! The step is the sequence of passes `Sam::first_step` + `second_step` run for SAM with SGD
//! momentum (called directly through the `ParamBuffer` trait, so nothing else is timed):
//! reduce (plain weighting, Σg²) → perturb (backup + climb) → reduce (finiteness check of the
//! second gradient) → update (restore from the backup, `GradMix::Current`, SGD momentum 0.9).
//! One case (`sam_api`) runs the same step through `sam_core::Sam` for comparison.
//!
//! Bytes per element (docs/design.md §10): reduce 4 + perturb 16 + restore-and-SGD-momentum 20 = 40
//! B model; 44 B actually moved with the finiteness re-read of the gradient. The triad
//! `a[i] = b[i] + s·c[i]` moves 12 B per element, over arrays of at least 4× the last-level
//! cache, on the same threads as the step (one thread, or rayon's pool with `--features rayon`).
//!
//! `cargo bench -p sam-ndarray [--features rayon] -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use ndarray::{ArrayD, IxDyn};
use sam_core::SamOptimizer as _;
use sam_core::backend::{
    AverageFold, BaseStep, GradMix, ParamBuffer, PerturbSpec, ReduceSpec, SgdStep, SlotSpec,
    UpdateSpec, Weighting,
};
use sam_core::{BaseRule, Group, Sam, SamConfig, SgdConfig};
use sam_ndarray::NdGroup;
use sam_ndarray::isa::{self, Isa};

use crate::measure::{SAMPLES, measure};
use crate::shapes::resnet18;
use crate::stream::stream_len;
use crate::triad::{threads, triad};

#[path = "common/measure.rs"]
mod measure;
#[path = "common/shapes.rs"]
mod shapes;
#[path = "common/stream.rs"]
mod stream;
#[path = "common/triad.rs"]
mod triad;

/// Model bytes per element of a SAM step with SGD momentum (docs/design.md §10).
const MODEL_BYTES: f64 = 40.0;
/// Bytes actually moved, with the finiteness check of the second gradient.
const ACTUAL_BYTES: f64 = 44.0;
/// Bytes per element of the triad.
const TRIAD_BYTES: f64 = 12.0;

/// A group of these shapes with deterministic weights and gradients, slots prepared.
fn group(shapes: &[Vec<usize>]) -> NdGroup<f32> {
    let mut x = 0x1234_5678u32;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        (x as f32 / u32::MAX as f32) - 0.5
    };
    let w: Vec<ArrayD<f32>> = shapes
        .iter()
        .map(|s| ArrayD::from_shape_simple_fn(IxDyn(s), &mut next))
        .collect();
    let g: Vec<ArrayD<f32>> = shapes
        .iter()
        .map(|s| ArrayD::from_shape_simple_fn(IxDyn(s), &mut next))
        .collect();
    let mut nd = NdGroup::with_grads(w, g).expect("group");
    nd.prepare(&SlotSpec {
        backup: true,
        stash: false,
        state: 1,
        averages: 0,
    })
    .expect("prepare");
    nd
}

const SGD: SgdStep = SgdStep {
    neg_lr: -1e-4,
    weight_decay: 0.0,
    momentum: 0.9,
    one_minus_dampening: 1.0,
    nesterov: false,
    first: false,
};

/// The passes of one SAM step (SGD momentum), through the trait.
fn step(g: &mut NdGroup<f32>) {
    let r = g
        .reduce(&ReduceSpec {
            perturb: Some(Weighting::Plain),
            ..ReduceSpec::FINITE_ONLY
        })
        .expect("reduce");
    let coeff = 0.05 / (r.perturb_sq.sqrt() + 1e-12);
    g.perturb(&PerturbSpec {
        stash: false,
        weighting: Weighting::Plain,
        scale: 1.0,
        coeff,
        unscale: 1.0,
    })
    .expect("perturb");
    // (the second gradient would be computed here)
    let f = g.reduce(&ReduceSpec::FINITE_ONLY).expect("finite check");
    assert!(f.finite);
    let spec = UpdateSpec {
        restore: true,
        grad: GradMix::Current,
        base: BaseStep::Sgd(SGD),
        post: None,
        restash: None,
        average: AverageFold::NONE,
        unscale: 1.0,
    };
    g.update(&spec).expect("update");
}

fn bench(c: &mut Criterion) {
    let mode = if cfg!(feature = "rayon") {
        "rayon"
    } else {
        "serial"
    };
    // STREAM triad, each array at least 4x the last-level cache; measured before and after the
    // cases (the summary uses the mean, so slow drift of the machine's load cancels).
    let n = stream_len();
    let t_triad_before = triad_run(c, mode, n, "before");

    let resnet = resnet18();
    let resnet_len: usize = resnet.iter().map(|s| s.iter().product::<usize>()).sum();
    let cases: Vec<(String, Vec<Vec<usize>>)> = vec![
        ("flat_1e5".into(), vec![vec![100_000]]),
        ("flat_1e6".into(), vec![vec![1_000_000]]),
        ("flat_1e7".into(), vec![vec![10_000_000]]),
        (format!("resnet18_{}tensors", resnet.len()), resnet),
        ("flat_resnet18_size".into(), vec![vec![resnet_len]]),
    ];
    let mut results = Vec::new();
    let mut triad_arrays = (vec![0.0f32; n], vec![1.0f32; n], vec![2.0f32; n]);
    let mut paired_ratios = Vec::new();
    for (name, shapes) in cases {
        let mut g = group(&shapes);
        let len = g.len();
        let t = measure(c, &format!("{mode}/sam_step/{name}"), || step(&mut g));
        paired_ratios.push((name.clone(), paired(&mut g, &mut triad_arrays)));
        results.push((name, len, t));
    }
    drop(triad_arrays);

    // The same step through sam_core::Sam (first_step + second_step), 1e6 elements.
    let base = BaseRule::sgd(SgdConfig {
        lr: 1e-4,
        momentum: 0.9,
        ..Default::default()
    })
    .expect("sgd");
    let mut groups = [Group::new(group(&[vec![1_000_000]]), base)];
    let mut sam = Sam::new(SamConfig::from(sam_core::Perturbation::sam(0.05))).expect("sam");
    let t = measure(c, &format!("{mode}/sam_api/flat_1e6"), || {
        let guard = sam.first_step(&mut groups).expect("first step");
        guard.second_step().expect("second step");
    });
    results.push(("sam_api_flat_1e6".into(), 1_000_000, t));
    drop(groups);

    let t_triad_after = triad_run(c, mode, n, "after");
    let bw = |t: f64| TRIAD_BYTES * n as f64 / t;
    let triad_bw = 0.5 * (bw(t_triad_before) + bw(t_triad_after));

    // Per-pass breakdown at 1e7 elements and at ResNet-18 shapes (best of 15, timed with
    // Instant outside criterion).
    let mut breakdown_lines = Vec::new();
    for (label, shapes) in [("1e7", vec![vec![10_000_000]]), ("ResNet-18", resnet18())] {
        let mut g = group(&shapes);
        breakdown_lines.extend(breakdown(&mut g, label, triad_bw));
    }

    let mut lines = vec![format!(
        "[{mode}, {} thread(s)] STREAM triad over 3 x {} MiB: before {:.3} ms = {:.2} GB/s, after {:.3} ms = {:.2} GB/s; reference (mean) {:.2} GB/s",
        threads(),
        (n * 4) >> 20,
        t_triad_before * 1e3,
        bw(t_triad_before) / 1e9,
        t_triad_after * 1e3,
        bw(t_triad_after) / 1e9,
        triad_bw / 1e9
    )];
    for (name, len, t) in &results {
        lines.push(report(name, *len, *t, triad_bw));
    }
    lines.extend(breakdown_lines);
    lines.push(format!(
        "{:>24}: step (40 B/elem model) vs triad, back to back, median of {PAIRED_ROUNDS} rounds (robust to the machine's load changing): {}",
        "paired",
        paired_ratios
            .iter()
            .map(|(name, r)| format!("{name} {:.1}%", 100.0 * r))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let paired_of = |prefix: &str| {
        paired_ratios
            .iter()
            .find(|r| r.0.starts_with(prefix))
            .map(|r| r.1)
    };
    if let (Some(resnet), Some(flat)) = (paired_of("resnet18_"), paired_of("flat_resnet18")) {
        lines.push(format!(
            "{:>24}: ResNet-18 group / flat group of the same size, from the paired ratios = {:.3} ({:+.1}%)",
            "tensors vs flat (paired)",
            flat / resnet,
            100.0 * (flat / resnet - 1.0)
        ));
    }
    let time_of = |prefix: &str| {
        results
            .iter()
            .find(|r| r.0.starts_with(prefix))
            .map(|r| r.2)
    };
    if let (Some(resnet), Some(flat)) = (time_of("resnet18_"), time_of("flat_resnet18")) {
        lines.push(format!(
            "{:>24}: ResNet-18 group / flat group of the same size = {:.3} ({:+.1}%)",
            "tensors vs flat",
            resnet / flat,
            100.0 * (resnet / flat - 1.0)
        ));
    }

    println!("\n==== SAM step vs STREAM triad ({mode}) ====");
    for l in &lines {
        println!("{l}");
    }
    eprintln!("(summary printed on stdout above)");
}

/// Rounds of the paired measurement.
const PAIRED_ROUNDS: usize = 9;

/// The step's model bandwidth over the triad's, measured back to back: each round times one
/// triad over `arrays`, then as many steps as move about the same number of bytes; the median
/// of the rounds' ratios.
fn paired(g: &mut NdGroup<f32>, arrays: &mut (Vec<f32>, Vec<f32>, Vec<f32>)) -> f64 {
    let (a, b, cc) = arrays;
    let n = a.len();
    let len = g.len();
    let reps = ((TRIAD_BYTES * n as f64) / (MODEL_BYTES * len as f64))
        .ceil()
        .max(1.0) as usize;
    let mut ratios: Vec<f64> = (0..PAIRED_ROUNDS)
        .map(|_| {
            let t = Instant::now();
            triad(black_box(a), black_box(b), black_box(cc), 3.0);
            let triad_bw = TRIAD_BYTES * n as f64 / t.elapsed().as_secs_f64();
            let t = Instant::now();
            for _ in 0..reps {
                step(g);
            }
            let step_bw = MODEL_BYTES * (len * reps) as f64 / t.elapsed().as_secs_f64();
            step_bw / triad_bw
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios[ratios.len() / 2]
}

/// The triad over three fresh arrays of `n` elements, timed by criterion.
fn triad_run(c: &mut Criterion, mode: &str, n: usize, label: &str) -> f64 {
    let (mut a, b, cc) = (vec![0.0f32; n], vec![1.0f32; n], vec![2.0f32; n]);
    measure(c, &format!("{mode}/triad_{}M_f32_{label}", n >> 20), || {
        triad(black_box(&mut a), black_box(&b), black_box(&cc), 3.0)
    })
}

/// Best time of each pass of [`step`] over a few repetitions, as bandwidth and against triad,
/// with the reduce passes at every instruction-set level this CPU supports (the step uses
/// the highest one within `isa::DEFAULT_LIMIT`).
fn breakdown(g: &mut NdGroup<f32>, label: &str, triad_bw: f64) -> Vec<String> {
    let n = g.len() as f64;
    let plain = ReduceSpec {
        perturb: Some(Weighting::Plain),
        ..ReduceSpec::FINITE_ONLY
    };
    let perturb = PerturbSpec {
        stash: false,
        weighting: Weighting::Plain,
        scale: 1.0,
        coeff: 1e-3,
        unscale: 1.0,
    };
    let update = UpdateSpec {
        restore: true,
        grad: GradMix::Current,
        base: BaseStep::Sgd(SGD),
        post: None,
        restash: None,
        average: AverageFold::NONE,
        unscale: 1.0,
    };
    let figure = |name: &str, bytes: f64, t: f64| {
        let bw = bytes * n / t;
        format!(
            "{name}: {:.3} ms {:.1} GB/s ({:.0}%)",
            t * 1e3,
            bw / 1e9,
            100.0 * bw / triad_bw
        )
    };
    let mut lines = Vec::new();
    for level in Isa::ALL.into_iter().filter(|l| l.is_supported()) {
        isa::set_limit(Some(level));
        let mut best = [f64::INFINITY; 4];
        for _ in 0..15 {
            let mut time = |k: usize, f: &mut dyn FnMut()| {
                let t = Instant::now();
                f();
                best[k] = best[k].min(t.elapsed().as_secs_f64());
            };
            time(0, &mut || {
                let _ = black_box(g.reduce(&plain).expect("reduce"));
            });
            time(1, &mut || g.perturb(&perturb).expect("perturb"));
            time(2, &mut || {
                let _ = black_box(g.reduce(&ReduceSpec::FINITE_ONLY).expect("check"));
            });
            time(3, &mut || g.update(&update).expect("update"));
        }
        let parts = [
            figure("reduce (plain) 4 B", 4.0, best[0]),
            figure("perturb 16 B", 16.0, best[1]),
            figure("finite check 4 B", 4.0, best[2]),
            figure("restore+SGD-momentum 20 B", 20.0, best[3]),
        ];
        lines.push(format!(
            "{:>24}: best of 15 per pass at {label}, reduce passes at level {}: {}",
            "breakdown",
            level.name(),
            parts.join("; ")
        ));
    }
    isa::set_limit(Some(isa::DEFAULT_LIMIT));
    lines
}

fn report(name: &str, len: usize, t: f64, triad_bw: f64) -> String {
    let model = MODEL_BYTES * len as f64 / t;
    let actual = ACTUAL_BYTES * len as f64 / t;
    format!(
        "{name:>24}: {len:>9} elems, {:>9.3} ms/step, model 40 B/elem: {:>6.2} GB/s = {:>5.1}% of triad; actual 44 B/elem: {:>6.2} GB/s = {:>5.1}% of triad",
        t * 1e3,
        model / 1e9,
        100.0 * model / triad_bw,
        actual / 1e9,
        100.0 * actual / triad_bw
    )
}

/// Runs the benchmark (what `criterion_group!` + `criterion_main!` generate, with this
/// configuration; command-line options override it).
fn main() {
    let mut c = Criterion::default()
        .sample_size(SAMPLES)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
}
