//! SAM every k steps (`sam_core::Interval`), on the reference backend and on `NdGroup`s:
//! - `k = 1` is the inner variant, bit for bit, for every variant;
//! - for `k > 1` the run equals an independent composition of two optimizers that are tested
//!   on their own: the plain `BaseOptimizer` on steps `t` with `(t + 1) % k ≠ 0` and the
//!   variant on the others, each resumed at step `t` from a checkpoint of the step count;
//! - a non-finite gradient skips a plain step with nothing changed, and the retried step is of
//!   the same kind; a checkpoint taken mid-run resumes to the same bits; `k = 0` is refused.

use std::cell::Cell;

use sam_core::backend::Slot;
use sam_core::reference::{SliceError, VecBuffer};
use sam_core::{
    BaseOptimizer, Error, Group, GroupOptions, Interval, Optimizer, OptimizerState, Sam, SamConfig,
    SkipReason, StepStatus, Wasam, Wsam, WsamConfig,
};
use sam_tests::variants::{MapOptions, NAMES, gsam, keep, no_overrides};
use sam_tests::{
    assert_nd_runs_as_reference, check_same_state, check_slices, groups, oracle_step,
    standard_groups, with_variant, write_grads_ref,
};

type Groups = Vec<Group<VecBuffer<f64>>>;

fn reference_groups(map: MapOptions) -> Groups {
    let (_, stores, opts) = standard_groups::<f64>();
    let opts: Vec<GroupOptions> = opts.into_iter().map(map).collect();
    groups(stores, &opts)
}

fn step<O: Optimizer>(opt: &mut O, gs: &mut Groups, calls: &Cell<u64>) -> StepStatus {
    oracle_step(opt, gs, calls)
}

fn assert_same_state(a: &Groups, b: &Groups, averages: bool, what: &str) {
    if let Err(e) = check_same_state(a, b, averages) {
        panic!("{what}: {e}");
    }
}

fn assert_same(a: &Groups, b: &Groups, what: &str) {
    assert_same_state(a, b, true, what);
}

#[test]
fn interval_one_is_the_inner_variant_bit_for_bit() {
    for (name, map) in NAMES {
        with_variant!(name, |inner| {
            let mut plain = inner.clone();
            let mut every = Interval::new(inner, 1).unwrap();
            let (mut a, mut b) = (reference_groups(map), reference_groups(map));
            let (ca, cb) = (Cell::new(0), Cell::new(0));
            for t in 0..8 {
                assert!(every.will_climb());
                let sa = step(&mut every, &mut a, &ca);
                let sb = step(&mut plain, &mut b, &cb);
                assert_eq!(sa, sb, "{name} step {t}");
                assert_same(&a, &b, &format!("{name} step {t}"));
            }
            assert_eq!((ca.get(), every.steps()), (16, 8), "{name}");
        });
    }
}

#[test]
fn interval_k_is_base_steps_with_a_variant_step_every_kth() {
    for k in [2u64, 3] {
        for (name, map) in NAMES {
            with_variant!(name, |inner| {
                let mut climber = inner.clone();
                let mut base = BaseOptimizer::new();
                // The variant's lr schedule (GSAM's) applies to the plain steps too.
                base.set_lr_schedule(climber.lr_schedule().cloned())
                    .unwrap();
                let mut every = Interval::new(inner, k).unwrap();
                let (mut a, mut b) = (reference_groups(map), reference_groups(map));
                let (ca, cb) = (Cell::new(0), Cell::new(0));
                for t in 0..(3 * k + 1) {
                    let climbs = (t + 1) % k == 0;
                    assert_eq!(every.will_climb(), climbs, "{name} k={k} t={t}");
                    let sa = step(&mut every, &mut a, &ca);
                    // The composition: the optimizer of this step's kind, resumed at step t.
                    let resume = OptimizerState { steps: t };
                    let sb = if climbs {
                        climber_step(&mut climber, resume, &mut b, &cb)
                    } else {
                        base.load_state(&resume).unwrap();
                        step(&mut base, &mut b, &cb)
                    };
                    assert_eq!(sa, sb, "{name} k={k} t={t}");
                    assert_eq!(sa, StepStatus::Applied);
                    // The composition's base optimizer drops WASAM's average slots (its own
                    // layout has none): averages are checked on their own below.
                    let what = format!("{name} k={k} step {t}");
                    assert_same_state(&a, &b, name != "WASAM", &what);
                    assert_eq!(ca.get(), cb.get(), "{name}: gradient evaluations");
                }
                // k−1 one-gradient steps and one two-gradient step per k steps.
                let steps = 3 * k + 1;
                let climbs = steps / k;
                assert_eq!(ca.get(), steps + climbs, "{name} k={k}");
            });
        }
    }
}

/// A climbing step of the composition: WASAM resumes from its own state (its averages' counts
/// follow the step count), the others from the step count.
fn climber_step<O: Optimizer>(
    opt: &mut O,
    resume: OptimizerState,
    gs: &mut Groups,
    calls: &Cell<u64>,
) -> StepStatus
where
    O::State: Resume,
{
    let state = O::State::resume(opt.state().unwrap(), resume);
    opt.load_state(&state).unwrap();
    step(opt, gs, calls)
}

/// A variant's checkpoint with its step count replaced.
trait Resume {
    fn resume(current: Self, at: OptimizerState) -> Self;
}

impl Resume for OptimizerState {
    fn resume(_: Self, at: OptimizerState) -> Self {
        at
    }
}

impl Resume for sam_core::WasamState {
    fn resume(current: Self, at: OptimizerState) -> Self {
        sam_core::WasamState {
            steps: at.steps,
            ..current
        }
    }
}

#[test]
fn wasam_averages_take_the_weights_of_climbing_steps() {
    let k = 3;
    let mut opt = Interval::new(Wasam::new(SamConfig::default(), &[0]).unwrap(), k).unwrap();
    let mut gs = reference_groups(keep);
    let calls = Cell::new(0);
    // The running mean of the weights after each climbing step, element by element.
    let mut mean: Vec<Vec<f64>> = gs
        .iter()
        .map(|g| vec![0.0; g.buffer.weights().len()])
        .collect();
    let mut n = 0.0;
    for _ in 0..4 * k {
        let climbs = opt.will_climb();
        step(&mut opt, &mut gs, &calls);
        if climbs {
            n += 1.0;
            for (m, g) in mean.iter_mut().zip(&gs) {
                for (m, w) in m.iter_mut().zip(g.buffer.weights()) {
                    *m += (w - *m) * (1.0 / n);
                }
            }
        }
    }
    assert_eq!(n, 4.0);
    for (m, g) in mean.iter().zip(&gs) {
        let avg = g.buffer.slot(Slot::Average(0)).unwrap();
        check_slices("average", avg, m).unwrap();
    }
}

#[test]
fn a_nonfinite_gradient_skips_a_plain_step_and_the_retry_is_plain_too() {
    let mut opt = Interval::new(Sam::new(SamConfig::default()).unwrap(), 3).unwrap();
    let mut gs = reference_groups(keep);
    let calls = Cell::new(0);
    assert_eq!(step(&mut opt, &mut gs, &calls), StepStatus::Applied);
    let before = gs.clone();
    assert!(!opt.will_climb());
    let report = opt
        .step(&mut gs, |gs: &mut [Group<VecBuffer<f64>>]| {
            write_grads_ref(gs, 0, Some((1, 17)));
            Ok::<_, Error<SliceError>>(())
        })
        .unwrap();
    assert_eq!(
        report.status,
        StepStatus::Skipped(SkipReason::NonFiniteClean)
    );
    assert_eq!(opt.steps(), 1);
    assert!(!opt.will_climb());
    assert_same(&gs, &before, "after the skipped step");
}

#[test]
fn a_checkpoint_mid_run_resumes_to_the_same_bits() {
    let calls = Cell::new(0);
    let mut whole = Interval::new(gsam(), 3).unwrap();
    let mut gs = reference_groups(no_overrides);
    for _ in 0..5 {
        step(&mut whole, &mut gs, &calls);
    }
    let (state, mut resumed_groups, resumed_calls) =
        (whole.state().unwrap(), gs.clone(), calls.get());
    for _ in 0..5 {
        step(&mut whole, &mut gs, &calls);
    }
    let mut resumed = Interval::new(gsam(), 3).unwrap();
    resumed.load_state(&state).unwrap();
    let calls = Cell::new(resumed_calls);
    for _ in 0..5 {
        step(&mut resumed, &mut resumed_groups, &calls);
    }
    assert_eq!(resumed.steps(), whole.steps());
    assert_same(&gs, &resumed_groups, "resumed");
}

#[test]
fn interval_zero_is_refused() {
    let err = Interval::new(Sam::new(SamConfig::default()).unwrap(), 0).unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidHyperparameter {
            name: "interval",
            ..
        }
    ));
}

#[test]
fn ndarray_equals_the_reference_with_an_interval() {
    let opt = Interval::new(Wsam::new(WsamConfig::default()).unwrap(), 2).unwrap();
    assert_eq!(assert_nd_runs_as_reference(&opt, 6), 6 + 3);
}
