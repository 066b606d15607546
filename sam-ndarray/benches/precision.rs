//! The SAM step on 16-bit storage against `f32` storage, in the same run, against the machine's
//! STREAM triad (feature `half`).
//!
//! One step of `sam_core::Sam` (SGD momentum 0.9, `first_step` + `second_step`, the gradient
//! unchanged in between) on an [`NdGroup`] of the ResNet-18 parameter shapes (62 tensors,
//! 11.7 M elements) in each layout of docs/design.md §5a: weights, gradients and slots in `f32`,
//! `bf16` or `f16` (uniform); `f32` master weights and slots with `bf16` gradients (mixed); the
//! same with a `bf16` model copy that every weight-writing pass refreshes (master). Bytes per
//! element by the model of docs/design.md §10, with `w` the weight and slot size, `g` the
//! gradient size and `m` the model copy's: reduce `g`, perturb `3w + g + m`, restore-and-step
//! `4w + g + m` (40 B for `f32`, 20 B for 16 bits, 34 B mixed, 38 B master), plus `g` for the
//! finiteness re-read of the second gradient. The triad moves 12 B per element (f32), before
//! and after the cases.
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

/// Bytes per element by the model (module docs) and with the re-read of the second gradient.
fn bytes<W: Real, G: Real>(model_copy: bool) -> (f64, f64) {
    let (w, g) = (size_of::<W>() as f64, size_of::<G>() as f64);
    let m = if model_copy { g } else { 0.0 };
    let model = g + (3.0 * w + g + m) + (4.0 * w + g + m);
    (model, model + g)
}

/// Groups of the ResNet-18 shapes, weights in `W` and gradients in `G` drawn as f64 values
/// rounded once (as a model converted from f32 would hold them), with a model copy if asked.
fn groups<W: Real, G: Real>(model_copy: bool) -> [Group<NdGroup<W, G>>; 1] {
    let mut x = 0x1234_5678u32;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        f64::from(x) / f64::from(u32::MAX) - 0.5
    };
    let shapes = resnet18();
    let w: Vec<ArrayD<W>> = shapes
        .iter()
        .map(|s| ArrayD::from_shape_simple_fn(IxDyn(s), || W::from_f64(next())))
        .collect();
    let g: Vec<ArrayD<G>> = shapes
        .iter()
        .map(|s| ArrayD::from_shape_simple_fn(IxDyn(s), || G::from_f64(next())))
        .collect();
    let base = BaseRule::sgd(SgdConfig {
        lr: 1e-4,
        momentum: 0.9,
        ..Default::default()
    })
    .expect("sgd");
    let mut group = NdGroup::mixed_with_grads(w, g).expect("group");
    if model_copy {
        group = group.with_model_copy().expect("model copy");
    }
    [Group::new(group, base)]
}

/// One layout's figures.
struct Case {
    name: String,
    bytes: (f64, f64),
    len: usize,
    seconds: f64,
}

/// The median time of one SAM step with weights in `W`, gradients in `G`.
fn sam_step<W: Real, G: Real>(c: &mut Criterion, mode: &str, model_copy: bool) -> Case {
    let mut gs = groups::<W, G>(model_copy);
    let len = gs[0].buffer.len();
    let name = match (W::NAME == G::NAME, model_copy) {
        (true, _) => W::NAME.to_string(),
        (false, false) => format!("{}+{} grads", W::NAME, G::NAME),
        (false, true) => format!("{}+{} model", W::NAME, G::NAME),
    };
    let mut sam = Sam::new(SamConfig::default()).expect("sam");
    let id = format!("{mode}/sam_step_resnet18/{}", name.replace(' ', "_"));
    let seconds = measure(c, &id, || {
        let guard = sam.first_step(&mut gs).expect("first step");
        guard.second_step().expect("second step");
    });
    Case {
        name,
        bytes: bytes::<W, G>(model_copy),
        len,
        seconds,
    }
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
        sam_step::<f32, f32>(&mut c, mode, false),
        sam_step::<bf16, bf16>(&mut c, mode, false),
        sam_step::<f16, f16>(&mut c, mode, false),
        sam_step::<f32, bf16>(&mut c, mode, false),
        sam_step::<f32, bf16>(&mut c, mode, true),
        sam_step::<f32, f16>(&mut c, mode, true),
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
    let t_f32 = cases[0].seconds;
    for Case {
        name,
        bytes: (model_b, actual_b),
        len,
        seconds: t,
    } in cases
    {
        let model = model_b * len as f64 / t;
        let actual = actual_b * len as f64 / t;
        println!(
            "{name:>15}: {:.3} ms/step, {len} elements, {model_b:.0} B/param (model) {actual_b:.0} B (with the re-read); \
             {:.2} GB/s model = {:.1}% of triad, {:.2} GB/s actual; time vs f32 {:.2}x",
            t * 1e3,
            model / 1e9,
            100.0 * model / triad_bw,
            actual / 1e9,
            t / t_f32,
        );
    }
}
