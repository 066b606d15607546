//! The SAM step on 16-bit storage against `f32` storage, in the same run, against the machine's
//! STREAM triad (feature `half`).
//!
//! One step of `sam_core::Sam` (SGD momentum 0.9, `first_step` + `second_step`, the gradient
//! unchanged in between) on an [`NdGroup`] of the ResNet-18 parameter shapes (62 tensors,
//! 11.7 M elements), with weights, gradients and slots stored in `f32`, `bf16` or `f16`: the
//! uniform layout, the one sam-ndarray stores (docs/design.md §5a). Bytes per element by the
//! model of docs/design.md §10: reduce 1 + perturb 4 + restore-and-step 5 values of the storage
//! type (40 B for `f32`, 20 B for 16 bits), plus the finiteness re-read of the second gradient
//! (44 B, 22 B). The triad moves 12 B per element (f32), before and after the cases.
//!
//! `cargo bench -p sam-ndarray --features half --bench precision [-- --warm-up-time 1 --measurement-time 3]`

use std::hint::black_box;

use criterion::Criterion;
use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};
use sam_core::backend::Real;
use sam_core::{BaseRule, Group, Sam, SamConfig, SamOptimizer as _, SgdConfig};
use sam_ndarray::NdGroup;

use crate::measure::measure;
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

/// Stored values moved per element by the model (reduce 1, perturb 4, update 5).
const MODEL_VALUES: f64 = 10.0;
/// With the finiteness check of the second gradient.
const ACTUAL_VALUES: f64 = 11.0;

/// Groups of the ResNet-18 shapes in storage type `T`, weights and gradients drawn in f32
/// (as a model converted from f32 would hold them).
fn groups<T: Real>() -> [Group<NdGroup<T>>; 1] {
    let mut x = 0x1234_5678u32;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        T::from_f64(f64::from(x) / f64::from(u32::MAX) - 0.5)
    };
    let shapes = resnet18();
    let w: Vec<ArrayD<T>> = shapes
        .iter()
        .map(|s| ArrayD::from_shape_simple_fn(IxDyn(s), &mut next))
        .collect();
    let g: Vec<ArrayD<T>> = shapes
        .iter()
        .map(|s| ArrayD::from_shape_simple_fn(IxDyn(s), &mut next))
        .collect();
    let base = BaseRule::sgd(SgdConfig {
        lr: 1e-4,
        momentum: 0.9,
        ..Default::default()
    })
    .expect("sgd");
    [Group::new(NdGroup::with_grads(w, g).expect("group"), base)]
}

/// The median time of one SAM step in storage type `T`.
fn sam_step<T: Real>(c: &mut Criterion, mode: &str) -> (usize, f64) {
    let mut gs = groups::<T>();
    let len = gs[0].buffer.len();
    let mut sam = Sam::new(SamConfig::default()).expect("sam");
    let t = measure(c, &format!("{mode}/sam_step_resnet18/{}", T::NAME), || {
        let guard = sam.first_step(&mut gs).expect("first step");
        guard.second_step().expect("second step");
    });
    (len, t)
}

fn triad_run(c: &mut Criterion, mode: &str, n: usize, label: &str) -> f64 {
    let (mut a, b, cc) = (vec![0.0f32; n], vec![1.0f32; n], vec![2.0f32; n]);
    let t = measure(c, &format!("{mode}/triad_{label}"), || {
        triad(black_box(&mut a), black_box(&b), black_box(&cc), 3.0)
    });
    12.0 * n as f64 / t
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let mode = if cfg!(feature = "rayon") {
        "rayon"
    } else {
        "serial"
    };
    let n = stream_len();
    let before = triad_run(&mut c, mode, n, "before");
    let cases = [
        ("f32", 4.0, sam_step::<f32>(&mut c, mode)),
        ("bf16", 2.0, sam_step::<bf16>(&mut c, mode)),
        ("f16", 2.0, sam_step::<f16>(&mut c, mode)),
    ];
    let after = triad_run(&mut c, mode, n, "after");
    let triad_bw = 0.5 * (before + after);
    println!("\n==== SAM step on 16-bit vs f32 storage, ResNet-18 shapes ({mode}) ====");
    println!(
        "[{mode}, {} thread(s)] STREAM triad: before {:.2} GB/s, after {:.2} GB/s, mean {:.2} GB/s",
        threads(),
        before / 1e9,
        after / 1e9,
        triad_bw / 1e9
    );
    let t_f32 = cases[0].2.1;
    for (name, bytes, (len, t)) in cases {
        let model = MODEL_VALUES * bytes * len as f64 / t;
        let actual = ACTUAL_VALUES * bytes * len as f64 / t;
        println!(
            "{name:>5}: {:.3} ms/step, {len} elements, {:.0} B/param (model) {:.0} B (with the re-read); \
             {:.2} GB/s model = {:.1}% of triad, {:.2} GB/s actual; time vs f32 {:.2}x",
            t * 1e3,
            MODEL_VALUES * bytes,
            ACTUAL_VALUES * bytes,
            model / 1e9,
            100.0 * model / triad_bw,
            actual / 1e9,
            t / t_f32,
        );
    }
}
