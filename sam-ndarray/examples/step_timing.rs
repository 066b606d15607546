//! Times one SAM step's optimizer work (reduce + perturb + second-gradient check +
//! restore-and-SGD-momentum, no forward/backward) on f32 `NdGroup`s and prints one
//! machine-readable line per case: `case <name> <elements> <ms_per_step>`.
//!
//! Used by `verification/bench/compare_torch.sh` to compare with PyTorch on the same sizes and
//! thread count. Build with `--features rayon` for the parallel passes; the thread count is
//! rayon's (`RAYON_NUM_THREADS`).
//!
//! `cargo run --release -p sam-ndarray --example step_timing -- [--iters N] [--sizes 1e5,1e6,1e7,resnet18]`

use std::time::Instant;

use ndarray::{ArrayD, IxDyn};
use sam_core::SamOptimizer as _;
use sam_core::{BaseRule, Group, Sam, SamConfig, SgdConfig};
use sam_ndarray::NdGroup;

/// The parameter shapes of ResNet-18 (ImageNet head): 62 tensors, 11 689 512 elements.
fn resnet18() -> Vec<Vec<usize>> {
    let mut s = vec![vec![64, 3, 7, 7], vec![64], vec![64]];
    let mut conv = |o: usize, i: usize, k: usize| {
        s.push(vec![o, i, k, k]);
        s.push(vec![o]);
        s.push(vec![o]);
    };
    for (o, i, first) in [
        (64, 64, false),
        (128, 64, true),
        (256, 128, true),
        (512, 256, true),
    ] {
        conv(o, i, 3);
        conv(o, o, 3);
        if first {
            conv(o, i, 1);
        }
        conv(o, o, 3);
        conv(o, o, 3);
    }
    s.push(vec![1000, 512]);
    s.push(vec![1000]);
    s
}

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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut iters = 20usize;
    let mut sizes = String::from("1e5,1e6,1e7,resnet18");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--iters" => iters = args.next().ok_or("--iters needs a value")?.parse()?,
            "--sizes" => sizes = args.next().ok_or("--sizes needs a value")?,
            "-h" | "--help" => {
                println!("step_timing [--iters N] [--sizes 1e5,1e6,1e7,resnet18]");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
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
