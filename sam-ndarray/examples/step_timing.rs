//! Times one SAM step's optimizer work (reduce + perturb + second-gradient check +
//! restore-and-SGD-momentum, no forward/backward) on f32 `NdGroup`s, and the machine's STREAM
//! triad on the same threads. Prints machine-readable lines:
//!
//! - `triad <threads> <GB/s>`: first, the STREAM triad `a[i] = b[i] + s·c[i]` (12 B per element)
//!   over three arrays of `stream_len()` f32 elements (at least 4× the last-level cache, see
//!   `benches/common/stream.rs`), best of `--triad-reps` repetitions after one warm-up (STREAM's
//!   convention); rayon chunks of 2¹⁶ elements with `--features rayon`, as in
//!   `benches/sam_step.rs`. `--triad-reps 0` skips it.
//! - `case <name> <elements> <ms_per_step>`: one per size, the median of `--iters` steps after a
//!   warm-up step. Sizes are element counts (`1e7`: one flat tensor) or `resnet18` (ResNet-18's 62
//!   parameter tensors, `benches/common/shapes.rs`). SAM rho 0.05, SGD lr 0.01, momentum 0.9; the
//!   gradient stays in place and serves as both g₁ and g₂.
//!
//! `<threads>` is rayon's thread count with `--features rayon` (`RAYON_NUM_THREADS`), else 1.
//! Used by `verification/bench/compare_torch.sh` to compare with PyTorch on the same sizes and
//! thread counts, against the same run's triad.
//!
//! `cargo run --release -p sam-ndarray [--features rayon] --example step_timing -- [--iters N] [--sizes 1e5,1e6,1e7,resnet18] [--triad-reps N]`

use std::time::Instant;

use ndarray::{ArrayD, IxDyn};
use sam_core::SamOptimizer as _;
use sam_core::{BaseRule, Group, Sam, SamConfig, SgdConfig};
use sam_ndarray::NdGroup;

use crate::shapes::resnet18;
use crate::stream::stream_len;
use crate::triad::{threads, triad};

#[path = "../benches/common/shapes.rs"]
mod shapes;
#[path = "../benches/common/stream.rs"]
mod stream;
#[path = "../benches/common/triad.rs"]
mod triad;

fn shapes(name: &str) -> Result<Vec<Vec<usize>>, String> {
    if name == "resnet18" {
        return Ok(resnet18());
    }
    let n: f64 = name.parse().map_err(|_| format!("bad size {name:?}"))?;
    if !(1.0..=1e9).contains(&n) {
        return Err(format!("size {name} out of range"));
    }
    Ok(vec![vec![n as usize]])
}

/// Triad bandwidth in GB/s: best of `reps` timed runs after one warm-up run.
fn triad_gbs(reps: usize) -> f64 {
    let n = stream_len();
    let (mut a, b, c) = (vec![0.0f32; n], vec![1.0f32; n], vec![2.0f32; n]);
    triad(&mut a, &b, &c, 3.0); // warm-up: faults the pages in
    let best = (0..reps)
        .map(|_| {
            let t = Instant::now();
            triad(&mut a, &b, &c, 3.0);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    std::hint::black_box(&a);
    12.0 * n as f64 / best / 1e9
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut iters = 20usize;
    let mut sizes = String::from("1e5,1e6,1e7,resnet18");
    let mut triad_reps = 10usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--iters" => iters = args.next().ok_or("--iters needs a value")?.parse()?,
            "--sizes" => sizes = args.next().ok_or("--sizes needs a value")?,
            "--triad-reps" => {
                triad_reps = args.next().ok_or("--triad-reps needs a value")?.parse()?
            }
            "-h" | "--help" => {
                println!("step_timing [--iters N] [--sizes 1e5,1e6,1e7,resnet18] [--triad-reps N]");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if iters == 0 {
        return Err("--iters must be at least 1".into());
    }
    if triad_reps > 0 {
        println!("triad {} {:.3}", threads(), triad_gbs(triad_reps));
    }
    let base = BaseRule::sgd(SgdConfig {
        lr: 0.01,
        momentum: 0.9,
        ..Default::default()
    })?;
    for name in sizes.split(',') {
        let shapes = shapes(name)?;
        let tensors: Vec<ArrayD<f32>> = shapes
            .iter()
            .map(|s| {
                let len: usize = s.iter().product();
                let v = (0..len).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
                ArrayD::from_shape_vec(IxDyn(s), v)
            })
            .collect::<Result<_, _>>()?;
        let grads: Vec<ArrayD<f32>> = tensors.iter().map(|t| t.mapv(|x| 0.5 * x + 0.01)).collect();
        let n: usize = tensors.iter().map(|t| t.len()).sum();
        let mut groups = [Group::new(NdGroup::with_grads(tensors, grads)?, base)];
        // SamConfig::default(): rho 0.05, with the second gradient's finiteness check.
        let mut sam = Sam::new(SamConfig::default())?;
        let mut step =
            |groups: &mut [Group<NdGroup<f32>>]| -> Result<(), Box<dyn std::error::Error>> {
                // The gradient stays in place: the same values serve as g₁ and g₂.
                sam.first_step(groups)?.second_step()?;
                Ok(())
            };
        step(&mut groups)?; // warm-up: allocates the slots
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            step(&mut groups)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        println!("case {name} {n} {:.4}", times[times.len() / 2]);
    }
    Ok(())
}
