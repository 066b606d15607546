//! One SAM step's optimizer work on candle `Var`s (ResNet-18 shapes, f32, CPU), against
//! candle's own optimizers' steps on the same `Var`s and the machine's STREAM triad, in the
//! same run.
//!
//! Cases (each one optimizer step with a fixed `GradStore`; no forward or backward pass):
//! - `sam_sgd_momentum`: `SamCandle<Sam>` with SGD momentum 0.9, `first_step` + `second_step`
//!   (reduce, perturb with backup, reduce of the second gradient, fused restore-and-step);
//! - `sam_byo_adamw`: SAM around candle's own `AdamW` (`first_step`,
//!   `restore_with_gradient`, `AdamW::step`);
//! - `candle_sgd`, `candle_adamw`: candle-nn's `SGD` and `AdamW` steps alone;
//! - the triad `a[i] = b[i] + s·c[i]` over three arrays spanning at least 4× the last-level
//!   cache, as sam-ndarray's bench measures it (12 B per element).
//!
//! The SAM step's model traffic is 40 B per element (docs/design.md §10: reduce 4, perturb 16,
//! restore-and-SGD-momentum 20), so its bandwidth is `40·n / t`, compared with the triad's.
//!
//! `cargo bench -p sam-candle --bench step`

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer as _, ParamsAdamW, SGD};
use criterion::Criterion;
use sam_candle::{SamCandle, VarBuffer};
use sam_core::{BaseRule, Group, Sam, SamConfig, SgdConfig};

use crate::shapes::resnet18;
use crate::stream::stream_len;

#[path = "../../sam-ndarray/benches/common/shapes.rs"]
mod shapes;
#[path = "../../sam-ndarray/benches/common/stream.rs"]
mod stream;

/// Model bytes per element of a SAM step with SGD momentum.
const MODEL_BYTES: f64 = 40.0;
/// Bytes per element of the triad.
const TRIAD_BYTES: f64 = 12.0;

fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) - 0.5
        })
        .collect()
}

/// Fresh `Var`s of ResNet-18's shapes and a gradient for each.
fn model() -> (Vec<Var>, GradStore) {
    let mut grads = GradStore::default();
    let vars: Vec<Var> = resnet18()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n = s.iter().product();
            let w = Tensor::from_vec(values(n, 2 * i as u32 + 1), s.as_slice(), &Device::Cpu)
                .expect("tensor");
            let v = Var::from_tensor(&w).expect("var");
            let g = Tensor::from_vec(values(n, 2 * i as u32 + 2), s.as_slice(), &Device::Cpu)
                .expect("tensor");
            grads.insert(v.as_tensor(), g);
            v
        })
        .collect();
    (vars, grads)
}

fn sam(vars: &[Var], base: BaseRule) -> SamCandle<Sam> {
    let buffer = VarBuffer::new(vars.to_vec()).expect("buffer");
    SamCandle::new(
        Sam::new(SamConfig::default()).expect("valid"),
        vec![Group::new(buffer, base)],
    )
}

/// Median seconds per call of `routine` over `samples` timed calls (after one warm-up call),
/// also handed to criterion for its report.
fn measure(c: &mut Criterion, name: &str, samples: usize, mut routine: impl FnMut()) -> f64 {
    routine();
    let mut times: Vec<f64> = (0..samples)
        .map(|_| {
            let t = Instant::now();
            routine();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    c.bench_function(name, |b| b.iter(&mut routine));
    times[times.len() / 2]
}

fn triad(a: &mut [f32], b: &[f32], c: &[f32], s: f32) {
    for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
        *a = b + s * c;
    }
}

fn bench(c: &mut Criterion) {
    let (vars, grads) = model();
    let n: usize = vars.iter().map(|v| v.elem_count()).sum();
    let samples = 15;

    let sgd_momentum = BaseRule::sgd(SgdConfig {
        lr: 1e-6,
        momentum: 0.9,
        ..Default::default()
    })
    .expect("valid");
    let mut s = sam(&vars, sgd_momentum);
    let t_sam = measure(c, "sam_sgd_momentum", samples, || {
        let p = s.first_step(black_box(&grads)).expect("first");
        p.second_step(&grads).expect("second");
    });

    let mut s = sam(&vars, sgd_momentum);
    let params = ParamsAdamW {
        lr: 1e-6,
        ..Default::default()
    };
    let mut adamw = AdamW::new(vars.clone(), params.clone()).expect("adamw");
    let t_byo = measure(c, "sam_byo_adamw", samples, || {
        let p = s.first_step(black_box(&grads)).expect("first");
        p.restore_with_gradient(&grads).expect("restore");
        adamw.step(&grads).expect("adamw");
    });

    let mut sgd = SGD::new(vars.clone(), 1e-6).expect("sgd");
    let t_sgd = measure(c, "candle_sgd", samples, || {
        sgd.step(black_box(&grads)).expect("sgd")
    });
    let mut adamw = AdamW::new(vars.clone(), params).expect("adamw");
    let t_adamw = measure(c, "candle_adamw", samples, || {
        adamw.step(black_box(&grads)).expect("adamw")
    });

    let m = stream_len();
    let (mut a, b, cc) = (vec![0.0f32; m], vec![1.0f32; m], vec![2.0f32; m]);
    let t_triad = measure(c, "triad", samples, || {
        triad(black_box(&mut a), black_box(&b), black_box(&cc), 3.0)
    });

    let ms = |t: f64| t * 1e3;
    let triad_bw = TRIAD_BYTES * m as f64 / t_triad;
    let sam_bw = MODEL_BYTES * n as f64 / t_sam;
    println!(
        "\n==== sam-candle: one optimizer step on ResNet-18's {n} f32 elements (62 Vars) ===="
    );
    println!(
        "median of {samples} steps each, same run; SamCandle's passes on one thread, candle's steps as candle runs them:"
    );
    println!(
        "  sam_sgd_momentum (SamCandle<Sam>, SGD m=0.9): {:8.3} ms",
        ms(t_sam)
    );
    println!(
        "  sam_byo_adamw (SAM around candle AdamW):      {:8.3} ms",
        ms(t_byo)
    );
    println!(
        "  candle_sgd (candle-nn SGD):                   {:8.3} ms",
        ms(t_sgd)
    );
    println!(
        "  candle_adamw (candle-nn AdamW):               {:8.3} ms",
        ms(t_adamw)
    );
    println!(
        "  triad (3 x {:.0} MiB):                        {:8.3} ms = {:.2} GB/s",
        (m * 4) as f64 / (1 << 20) as f64,
        ms(t_triad),
        triad_bw / 1e9
    );
    println!(
        "  SAM step / candle SGD step: {:.2}x; SAM+AdamW (BYO) / candle AdamW step: {:.2}x",
        t_sam / t_sgd,
        t_byo / t_adamw
    );
    println!(
        "  SAM step model bandwidth ({MODEL_BYTES} B/elem): {:.2} GB/s = {:.0}% of the triad",
        sam_bw / 1e9,
        100.0 * sam_bw / triad_bw
    );
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
}
