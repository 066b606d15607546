//! End to end: whole optimizer steps (`Sam`, ASAM, `BaseOptimizer`, the bring-your-own-optimizer
//! path, skipped steps, a dropped guard) on several groups of `NdGroup`s and of reference
//! buffers, with the same gradients, give the same bits after every step.

use std::cell::Cell;

use sam_core::reference::VecBuffer;
use sam_core::{BaseOptimizer, Error, Group, Sam, SamConfig, SkipReason, StepStatus};
use sam_core::{Optimizer as _, SamOptimizer as _};
use sam_ndarray::{NdError, NdGroup};
use sam_tests::{
    Bits, assert_groups_same, groups, on_every_pool, standard_groups, write_grads_nd,
    write_grads_ref,
};

/// Gradient salt and NaN position for call `c` of the closure (two calls per SAM step).
fn schedule(c: u64) -> (u64, Option<(usize, usize)>) {
    match c {
        6 => (c, Some((1, 4099))), // a clean gradient with NaN: the step is skipped before any write
        12 => (c, Some((0, 3))),   // a second gradient with NaN: restored and skipped
        _ => (c, None),
    }
}

fn sam_steps<T: Bits>(cfg: SamConfig) {
    let (nds, stores, opts) = standard_groups::<T>();
    let mut a = groups(nds, &opts);
    let mut b = groups(stores, &opts);
    let mut sam_a = Sam::new(cfg).unwrap();
    let mut sam_b = Sam::new(cfg).unwrap();
    let (ca, cb) = (Cell::new(0u64), Cell::new(0u64));
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let ra = sam_a
            .step(&mut a, |gs: &mut [Group<NdGroup<T>>]| {
                let (salt, nan) = schedule(ca.replace(ca.get() + 1));
                write_grads_nd(gs, salt, nan);
                Ok::<_, Error<NdError>>(())
            })
            .unwrap();
        let rb = sam_b
            .step(&mut b, |gs: &mut [Group<VecBuffer<T>>]| {
                let (salt, nan) = schedule(cb.replace(cb.get() + 1));
                write_grads_ref(gs, salt, nan);
                Ok::<_, Error<sam_core::reference::SliceError>>(())
            })
            .unwrap();
        assert_eq!(ra.status, rb.status);
        statuses.push(ra.status);
        assert_groups_same(&a, &b);
        assert_eq!(sam_a.steps(), sam_b.steps());
    }
    assert!(
        statuses.contains(&StepStatus::Skipped(SkipReason::NonFiniteClean)),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&StepStatus::Skipped(SkipReason::NonFiniteSecond)),
        "{statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .filter(|s| **s == StepStatus::Applied)
            .count()
            >= 7,
        "{statuses:?}"
    );
}

#[test]
fn sam_matches_reference() {
    on_every_pool(|| {
        let cfg = SamConfig::from(sam_core::Perturbation::sam(0.05));
        sam_steps::<f32>(cfg);
        sam_steps::<f64>(cfg);
    });
}

#[test]
fn asam_matches_reference() {
    on_every_pool(|| {
        let cfg = SamConfig::from(sam_core::Perturbation::asam(0.5, 0.01));
        sam_steps::<f32>(cfg);
        sam_steps::<f64>(cfg);
    });
}

fn external_and_guard<T: Bits>() {
    let (nds, stores, opts) = standard_groups::<T>();
    let mut a = groups(nds, &opts);
    let mut b = groups(stores, &opts);
    let cfg = SamConfig::from(sam_core::Perturbation::sam(0.1));
    let (mut sam_a, mut sam_b) = (Sam::new(cfg).unwrap(), Sam::new(cfg).unwrap());
    for step in 0..4u64 {
        write_grads_nd(&mut a, 2 * step, None);
        write_grads_ref(&mut b, 2 * step, None);
        let mut ga = sam_a.first_step(&mut a).unwrap();
        let mut gb = sam_b.first_step(&mut b).unwrap();
        assert_groups_same(ga.groups(), gb.groups());
        write_grads_nd(ga.groups_mut(), 2 * step + 1, None);
        write_grads_ref(gb.groups_mut(), 2 * step + 1, None);
        if step == 2 {
            // Abandon the step: the guard restores the weights.
            drop(ga);
            drop(gb);
        } else {
            // Bring-your-own optimizer: weights restored, final gradient left in the grads.
            assert_eq!(
                ga.restore_with_gradient().unwrap(),
                gb.restore_with_gradient().unwrap()
            );
        }
        assert_groups_same(&a, &b);
    }
}

#[test]
fn external_base_and_dropped_guard_match_reference() {
    on_every_pool(|| {
        external_and_guard::<f32>();
        external_and_guard::<f64>();
    });
}

fn base_steps<T: Bits>() {
    let (nds, stores, opts) = standard_groups::<T>();
    let mut a = groups(nds, &opts);
    let mut b = groups(stores, &opts);
    let (mut oa, mut ob) = (BaseOptimizer::new(), BaseOptimizer::new());
    for step in 0..8u64 {
        let nan = (step == 4).then_some((2, 1));
        write_grads_nd(&mut a, step, nan);
        write_grads_ref(&mut b, step, nan);
        assert_eq!(oa.apply(&mut a).unwrap(), ob.apply(&mut b).unwrap());
        assert_groups_same(&a, &b);
    }
    assert_eq!(oa.steps(), 7);
}

#[test]
fn base_optimizer_matches_reference() {
    on_every_pool(|| {
        base_steps::<f32>();
        base_steps::<f64>();
    });
}
