//! GPU benchmark of one SAM step's optimizer work on `CudaGroup<f32>`.
//!
//! ```text
//! cargo run --release -p sam-cuda --example bench [-- --machine] [--iters N] [--sizes 1e6,1e7,1e8,resnet50]
//! ```
//!
//! For each size: one SAM step = reduce (‖g‖) + perturb + finiteness check of the second
//! gradient + fused restore-and-step, around SGD with momentum 0.9 and around AdamW, through
//! the real `sam_core::Sam` API (the second gradient is the one already in the buffer: no model
//! runs). Timed with CUDA events (median over `--iters`), compared with a device-to-device copy
//! of the same number of f32 values measured in the same run. Bytes per parameter, following
//! docs/design.md §10 plus the finiteness check: SGD-momentum 4 + 16 + 4 + 20 = 44 B, AdamW
//! 4 + 16 + 4 + 28 = 52 B. A copy moves 8 B per value.
//!
//! `--machine` prints one line per measurement, `SAMCUDA <optimizer> <size-label> <n> <ms>`,
//! for `bench/compare_torch.py`. Without a usable GPU the program says why and exits with
//! status 2.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::ExitCode;

use cudarc::driver::sys::CUevent_flags;
use sam_core::SamOptimizer as _;
use sam_core::{AdamConfig, BaseRule, Group, Sam, SamConfig, SgdConfig};
use sam_cuda::{Context, CudaGroup};

type BoxError = Box<dyn std::error::Error>;

struct Args {
    machine: bool,
    iters: usize,
    sizes: Vec<(String, Vec<Vec<usize>>)>,
}

fn parse_size(s: &str) -> Result<(String, Vec<Vec<usize>>), BoxError> {
    if s == "resnet50" {
        return Ok(("resnet50".into(), common::resnet50_shapes()));
    }
    let n: f64 = s.parse()?;
    if !(1.0..=4e9).contains(&n) {
        return Err(format!("size out of range: {s}").into());
    }
    Ok((s.to_string(), vec![vec![n as usize]]))
}

fn parse_args() -> Result<Args, BoxError> {
    let mut args = Args {
        machine: false,
        iters: 20,
        sizes: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    let mut sizes = "1e6,1e7,1e8,resnet50".to_string();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--machine" => args.machine = true,
            "--iters" => args.iters = it.next().ok_or("--iters needs a value")?.parse()?,
            "--sizes" => sizes = it.next().ok_or("--sizes needs a value")?,
            "-h" | "--help" => {
                println!("usage: bench [--machine] [--iters N] [--sizes 1e6,1e7,1e8,resnet50]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    for s in sizes.split(',') {
        args.sizes.push(parse_size(s.trim())?);
    }
    args.iters = args.iters.max(1);
    Ok(args)
}

fn median(mut v: Vec<f32>) -> f64 {
    v.sort_by(f32::total_cmp);
    f64::from(v[v.len() / 2])
}

/// Times `f` `iters` times with CUDA events on the context's stream (after 3 warm-up calls).
fn time_ms(
    ctx: &Context,
    iters: usize,
    mut f: impl FnMut() -> Result<(), BoxError>,
) -> Result<f64, BoxError> {
    for _ in 0..3 {
        f()?;
    }
    ctx.synchronize()?;
    let raw = ctx.cuda_context();
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = raw.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = raw.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(ctx.stream())?;
        f()?;
        end.record(ctx.stream())?;
        times.push(start.elapsed_ms(&end)?);
    }
    Ok(median(times))
}

fn fill(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

fn sam_step_ms(
    ctx: &Context,
    shapes: &[Vec<usize>],
    base: BaseRule,
    iters: usize,
) -> Result<f64, BoxError> {
    let mut group = CudaGroup::<f32>::zeros(ctx, shapes)?;
    let n = group.len();
    group.upload_weights(&fill(n, 1, 2.0))?;
    group.upload_grad(&fill(n, 2, 0.02))?;
    let mut groups = [Group::new(group, base)];
    let mut sam = Sam::new(SamConfig::from(sam_core::Perturbation::sam(0.05)))?;
    time_ms(ctx, iters, || {
        let guard = sam.first_step(&mut groups)?;
        // (a framework computes the gradient at the perturbed weights here)
        guard.second_step()?;
        Ok(())
    })
}

fn copy_ms(ctx: &Context, n: usize, iters: usize) -> Result<f64, BoxError> {
    let stream = ctx.stream();
    let src = stream.alloc_zeros::<f32>(n)?;
    let mut dst = stream.alloc_zeros::<f32>(n)?;
    time_ms(ctx, iters, || Ok(stream.memcpy_dtod(&src, &mut dst)?))
}

fn run(args: &Args, ctx: &Context) -> Result<(), BoxError> {
    let sgd = BaseRule::sgd(SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..Default::default()
    })?;
    let adamw = BaseRule::adamw(AdamConfig {
        lr: 1e-3,
        weight_decay: 1e-2,
        ..Default::default()
    })?;
    if !args.machine {
        println!(
            "device: {} (cc {}.{}, {} SMs, kernels for compute_{})",
            ctx.name()?,
            ctx.compute_capability().0,
            ctx.compute_capability().1,
            ctx.sm_count(),
            ctx.nvrtc_arch()
                .map_or("default".to_string(), |a| a.to_string())
        );
        println!(
            "{:>9} {:>11} | {:>10} {:>10} {:>7} | {:>10} {:>10} {:>7}",
            "size",
            "copy GB/s",
            "SGD ms",
            "SGD GB/s",
            "of copy",
            "AdamW ms",
            "AdamW GB/s",
            "of copy"
        );
    }
    for (label, shapes) in &args.sizes {
        let n: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
        if let Ok((free, _)) = ctx.memory_info() {
            // AdamW: weights, gradient, backup, m, v (+ the copy's two buffers, freed before).
            if free < 5 * 4 * n + (256 << 20) {
                println!("{label}: skipped: {free} bytes free on the device");
                continue;
            }
        }
        let copy = copy_ms(ctx, n, args.iters)?;
        let s = sam_step_ms(ctx, shapes, sgd, args.iters)?;
        let a = sam_step_ms(ctx, shapes, adamw, args.iters)?;
        let gbs = |bytes_per: f64, ms: f64| bytes_per * n as f64 / (ms * 1e-3) / 1e9;
        let copy_gbs = gbs(8.0, copy);
        if args.machine {
            println!("SAMCUDA copy {label} {n} {copy:.6}");
            println!("SAMCUDA sgd {label} {n} {s:.6}");
            println!("SAMCUDA adamw {label} {n} {a:.6}");
        } else {
            println!(
                "{:>9} {:>11.1} | {:>10.4} {:>10.1} {:>6.0}% | {:>10.4} {:>10.1} {:>6.0}%",
                label,
                copy_gbs,
                s,
                gbs(44.0, s),
                100.0 * gbs(44.0, s) / copy_gbs,
                a,
                gbs(52.0, a),
                100.0 * gbs(52.0, a) / copy_gbs
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(1);
        }
    };
    let ctx = match Context::new(0) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench: no usable GPU, nothing to measure: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args, &ctx) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::from(1)
        }
    }
}
