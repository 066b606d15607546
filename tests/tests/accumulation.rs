//! Gradient accumulation (the semantics in `sam_core`'s crate docs): each gradient of a step
//! accumulated over `k` micro-batches gives the whole-batch step, for every variant (and SAM
//! every 2 steps), on the reference backend and on `NdGroup`s.
//!
//! - **Exact**: per-sample gradients that are small dyadic numbers (multiples of 2⁻⁴, at most
//!   2 in magnitude) make every partial sum and mean exact, so `k` micro-batch means scaled by
//!   `1/k` and summed into the storage are the whole-batch mean bit for bit, and the steps are
//!   bit-identical. The loss is linear, so both gradients of a step are these values.
//! - **Rounding only**: a quadratic loss, whose gradients at the perturbed weights are not
//!   dyadic: micro-batch partial sums round differently from the whole-batch sum, and after 10
//!   steps the weights agree to a relative 1e-12 (the f64 rounding of 32-term sums, a few ulps,
//!   carried through 10 steps of a contracting quadratic).
//! - The two-call form with the storage zeroed between the two accumulations (GSAM and WSAM's
//!   final pass needs the clean gradient: it is stashed, not read back from the storage; so
//!   does LookSAM's refresh, whose stored direction persists across the steps between).

use sam_core::reference::{SliceError, VecBuffer};
use sam_core::{Error, Group, Interval, Optimizer, SamOptimizer, StepStatus};
use sam_ndarray::NdGroup;
use sam_tests::variants::{ALL_NAMES, MapOptions, gsam, looksam, sam, wsam};
use sam_tests::{assert_slices, groups, standard_groups, with_variant};

/// Samples in a batch.
const BATCH: usize = 32;

/// A per-element pseudo-random integer for sample `i`, element `j` of group `k`, salt `s`.
fn hash(i: usize, j: usize, k: usize, s: u64) -> u64 {
    let mut x = (i as u64) << 40 ^ (j as u64) << 8 ^ (k as u64) << 4 ^ s;
    x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^ (x >> 29)
}

/// Sample `i`'s gradient at element `j` of group `k`, weight `w`, in call `s` of the closure.
/// Linear loss: a multiple of 1/16 in [−2, 2], independent of `w`. Quadratic loss:
/// `c·(w − t)` with `c ∈ [0.5, 1.5)`, `t ∈ [−1, 1)`.
fn sample_grad(linear: bool, i: usize, j: usize, k: usize, s: u64, w: f64) -> f64 {
    let h = hash(i, j, k, s);
    if linear {
        ((h % 65) as f64 - 32.0) / 16.0
    } else {
        let c = 0.5 + (h % 1000) as f64 / 1000.0;
        let t = ((h >> 20) % 2000) as f64 / 1000.0 - 1.0;
        c * (w - t)
    }
}

/// Writes the mean gradient over the batch into `g` as `micro` micro-batches would: zero, then
/// for each micro-batch add `(1/micro)·(its mean)`. `micro = 1` is the whole batch.
fn accumulate(g: &mut [f64], w: &[f64], k: usize, s: u64, micro: usize, linear: bool) {
    let m = BATCH / micro;
    g.fill(0.0);
    for mb in 0..micro {
        for (j, (g, &w)) in g.iter_mut().zip(w).enumerate() {
            let sum: f64 = (mb * m..(mb + 1) * m)
                .map(|i| sample_grad(linear, i, j, k, s, w))
                .sum();
            *g += (sum / m as f64) / micro as f64;
        }
    }
}

/// Ten closure-driven steps of `opt` with the batch split into `micro` micro-batches; the
/// final weights of every group.
fn run<O: Optimizer>(mut opt: O, map: MapOptions, micro: usize, linear: bool) -> Vec<Vec<f64>> {
    let (_, stores, opts) = standard_groups::<f64>();
    let opts: Vec<_> = opts.into_iter().map(map).collect();
    let mut gs = groups(stores, &opts);
    let mut calls = 0u64;
    for _ in 0..10 {
        let report = opt
            .step(&mut gs, |gs: &mut [Group<VecBuffer<f64>>]| {
                calls += 1;
                for (k, g) in gs.iter_mut().enumerate() {
                    let (w, grad) = g.buffer.weights_and_grad();
                    accumulate(grad, w, k, calls, micro, linear);
                }
                Ok::<_, Error<SliceError>>(())
            })
            .unwrap();
        assert_eq!(report.status, StepStatus::Applied);
    }
    gs.iter().map(|g| g.buffer.weights().to_vec()).collect()
}

/// Every variant and SAM every 2 steps, whole batch against `micro` micro-batches.
fn compare(micro: usize, linear: bool, check: impl Fn(&str, &[f64], &[f64])) {
    for (name, map) in ALL_NAMES {
        let (whole, split, every_whole, every_split) = with_variant!(name, |opt| {
            (
                run(opt.clone(), map, 1, linear),
                run(opt.clone(), map, micro, linear),
                run(Interval::new(opt.clone(), 2).unwrap(), map, 1, linear),
                run(Interval::new(opt, 2).unwrap(), map, micro, linear),
            )
        });
        for (a, b) in whole.iter().zip(&split) {
            check(name, a, b);
        }
        for (a, b) in every_whole.iter().zip(&every_split) {
            check(&format!("{name} every 2"), a, b);
        }
    }
}

#[test]
fn accumulated_dyadic_gradients_give_the_whole_batch_step_bit_for_bit() {
    for micro in [2, 4, 8, 32] {
        compare(micro, true, |name, a, b| {
            assert_slices(&format!("{name}, {micro} micro-batches"), b, a)
        });
    }
}

#[test]
fn accumulated_gradients_differ_from_the_whole_batch_by_rounding_only() {
    for micro in [2, 4, 8] {
        compare(micro, false, |name, a, b| {
            let scale = a.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-12 * scale,
                    "{name}, {micro} micro-batches: {x} vs {y}"
                );
            }
        });
    }
}

/// The two-call form of the crate docs' recipe, on `NdGroup`s (f32 storage, gradients
/// accumulated in f32 by `+=`): zero, accumulate, `first_step`; zero, accumulate at the
/// perturbed weights, `second_step`. Equal to the same run with the whole-batch gradient
/// written at once, when the micro-batch sums are exact (dyadic gradients).
#[test]
fn two_call_form_with_the_storage_zeroed_between_the_accumulations() {
    fn steps<O: SamOptimizer + Clone>(opt: &O, micro: usize) -> Vec<NdGroup<f32>> {
        let (nds, _, opts) = standard_groups::<f32>();
        let opts: Vec<_> = opts
            .into_iter()
            .map(sam_tests::variants::no_overrides)
            .collect();
        let mut gs = groups(nds, &opts);
        let mut opt = opt.clone();
        let fill = |gs: &mut [Group<NdGroup<f32>>], s: u64| {
            for (k, g) in gs.iter_mut().enumerate() {
                let (w, mut grad) = g.buffer.weights_and_grads_mut();
                let mut j0 = 0;
                for t in 0..w.len() {
                    let Some(gt) = grad.slice_mut(t) else {
                        panic!("gradient {t} not contiguous")
                    };
                    // Each micro-batch's mean, scaled by 1/micro, added into the f32 storage.
                    gt.fill(0.0);
                    let m = BATCH / micro;
                    for mb in 0..micro {
                        for (j, gj) in gt.iter_mut().enumerate() {
                            let sum: f64 = (mb * m..(mb + 1) * m)
                                .map(|i| sample_grad(true, i, j0 + j, k, s, 0.0))
                                .sum();
                            *gj += ((sum / m as f64) / micro as f64) as f32;
                        }
                    }
                    j0 += gt.len();
                }
            }
        };
        for s in 0..6u64 {
            fill(&mut gs, 2 * s);
            let mut perturbed = opt.first_step(&mut gs).unwrap();
            fill(perturbed.groups_mut(), 2 * s + 1);
            assert_eq!(perturbed.second_step().unwrap(), StepStatus::Applied);
        }
        gs.into_iter().map(|g| g.buffer).collect()
    }
    let check = |name: &str, a: Vec<NdGroup<f32>>, b: Vec<NdGroup<f32>>| {
        for (x, y) in a.iter().zip(&b) {
            if let Err(e) = sam_tests::check_nd_same(x, y) {
                panic!("{name}: {e}");
            }
        }
    };
    for micro in [2, 8] {
        check("GSAM", steps(&gsam(), 1), steps(&gsam(), micro));
        check("WSAM", steps(&wsam(), 1), steps(&wsam(), micro));
        check("LookSAM", steps(&looksam(), 1), steps(&looksam(), micro));
        let every = Interval::new(sam(), 2).unwrap();
        check("SAM every 2", steps(&every, 1), steps(&every, micro));
    }
}
