//! End to end for the other variants of `sam-core` (GSAM, WSAM coupled and decoupled with
//! clipping, WASAM with two averages and a swap): `NdGroup`s and reference buffers, fed the
//! same gradients, hold the same bits after every step. These exercise the passes with a stash,
//! `GradMix::Mix`, `PostMix` and average folds as the variants really build them.

use std::cell::Cell;

use sam_core::Optimizer as _;
use sam_core::reference::{SliceError, VecBuffer};
use sam_core::{
    Error, Group, GroupOptions, Gsam, GsamConfig, RhoSchedule, SamConfig, Schedule, StepStatus,
    Wasam, Wsam, WsamConfig,
};
use sam_ndarray::{NdError, NdGroup};
use sam_tests::{
    Bits, assert_groups_same, groups, on_every_pool, standard_groups, write_grads_nd,
    write_grads_ref,
};

/// Gradient salt and NaN position for call `c` of the closure (two calls per step): a NaN in a
/// second gradient once, so the skip path is compared too.
fn schedule(c: u64) -> (u64, Option<(usize, usize)>) {
    (c, (c == 9).then_some((1, 100)))
}

/// The same base rule without per-group ρ/adaptivity overrides (GSAM has one global schedule).
fn no_overrides(o: GroupOptions) -> GroupOptions {
    GroupOptions::new(*o.base())
}

/// Runs `steps` closure-driven steps of two equal optimizers (`$a` on `NdGroup`s, `$b` on
/// reference buffers) and compares all buffers after each; then runs `$after` with both
/// optimizers and both group sets in scope.
macro_rules! compare {
    ($t:ty, $a:expr, $b:expr, $steps:expr, $map:expr) => {
        compare!($t, $a, $b, $steps, $map, |_oa, _ob, _ga, _gb| {})
    };
    ($t:ty, $a:expr, $b:expr, $steps:expr, $map:expr, |$oa:ident, $ob:ident, $ga:ident, $gb:ident| $after:block) => {{
        let (nds, stores, opts) = standard_groups::<$t>();
        let opts: Vec<GroupOptions> = opts.into_iter().map($map).collect();
        let mut ga = groups(nds, &opts);
        let mut gb = groups(stores, &opts);
        let (mut a, mut b) = ($a, $b);
        let (ca, cb) = (Cell::new(0u64), Cell::new(0u64));
        let mut applied = 0;
        for _ in 0..$steps {
            let ra = a
                .step(&mut ga, |gs: &mut [Group<NdGroup<$t>>]| {
                    let (salt, nan) = schedule(ca.replace(ca.get() + 1));
                    write_grads_nd(gs, salt, nan);
                    Ok::<_, Error<NdError>>(())
                })
                .unwrap();
            let rb = b
                .step(&mut gb, |gs: &mut [Group<VecBuffer<$t>>]| {
                    let (salt, nan) = schedule(cb.replace(cb.get() + 1));
                    write_grads_ref(gs, salt, nan);
                    Ok::<_, Error<SliceError>>(())
                })
                .unwrap();
            assert_eq!(ra.status, rb.status);
            applied += usize::from(ra.status == StepStatus::Applied);
            assert_groups_same(&ga, &gb);
        }
        assert!(
            applied + 1 >= $steps,
            "{applied} of {} steps applied",
            $steps
        );
        let ($oa, $ob, $ga, $gb) = (&mut a, &mut b, &mut ga, &mut gb);
        $after
    }};
}

fn gsam<T: Bits>() {
    let rho = RhoSchedule::Schedule(Schedule::constant(0.05).unwrap());
    for (alpha, adaptive) in [(0.4, false), (0.1, true)] {
        let cfg = GsamConfig {
            perturbation: sam_core::Perturbation {
                adaptive,
                eta: 0.01,
                ..Default::default()
            },
            alpha,
            ..GsamConfig::new(rho)
        };
        compare!(
            T,
            Gsam::new(cfg).unwrap(),
            Gsam::new(cfg).unwrap(),
            8,
            no_overrides
        );
    }
}

fn wsam<T: Bits>() {
    for (decouple, max_norm) in [
        (true, None),
        (false, None),
        (true, Some(0.5)),
        (false, Some(2.0)),
    ] {
        let cfg = WsamConfig {
            decouple,
            max_norm,
            gamma: 0.8,
            ..Default::default()
        };
        compare!(
            T,
            Wsam::new(cfg).unwrap(),
            Wsam::new(cfg).unwrap(),
            8,
            |o| o
        );
    }
}

fn wasam<T: Bits>() {
    let cfg = SamConfig::from(sam_core::Perturbation::sam(0.05));
    compare!(
        T,
        Wasam::new(cfg, &[0, 3]).unwrap(),
        Wasam::new(cfg, &[0, 3]).unwrap(),
        8,
        |o| o,
        |a, b, ga, gb| {
            // Evaluate each average: swapped in on both sides, then back.
            for k in 0..2u8 {
                let sa = a.swap(ga, k).unwrap();
                let sb = b.swap(gb, k).unwrap();
                assert_groups_same(sa.groups(), sb.groups());
                sa.swap_back().unwrap();
                sb.swap_back().unwrap();
                assert_groups_same(ga, gb);
            }
        }
    );
}

#[test]
fn gsam_matches_reference() {
    on_every_pool(|| {
        gsam::<f32>();
        gsam::<f64>();
    });
}

#[test]
fn wsam_matches_reference() {
    on_every_pool(|| {
        wsam::<f32>();
        wsam::<f64>();
    });
}

#[test]
fn wasam_matches_reference() {
    on_every_pool(|| {
        wasam::<f32>();
        wasam::<f64>();
    });
}
