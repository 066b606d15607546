//! The bad-input contract (`docs/bad-input.md`): one test per row that no other test proves.
//!
//! The section "Fixed findings" states the behaviour of `sam-core` where the fuzz harness found
//! it wrong (see `sam_fuzz_checks::Finding`). Every finding is fixed, so every test here runs;
//! a finding not yet fixed would get a test named `open_finding_*`, `#[ignore]`d until the fix
//! lands.

use std::panic::{AssertUnwindSafe, catch_unwind};

use ndarray::{ArrayD, IxDyn};
use sam_core::backend::{
    AverageFold, MAX_AVERAGES, ParamBuffer, PerturbSpec, ReduceSpec, Reduction, Slot, SlotSpec,
    UpdateSpec,
};
use sam_core::reference::{SliceBuffer, SliceError};
use sam_core::{
    AdamConfig, BaseOptimizer, BaseRule, Error, Group, GroupOptions, Gsam, GsamConfig, Optimizer,
    OptimizerState, Perturbation, Phase, RhoSchedule, Sam, SamConfig, SamOptimizer, Schedule,
    ScheduleConfig, ScheduleShape, SgdConfig, SkipReason, StepStatus, Wasam, WasamState, Wsam,
    WsamConfig,
};
use sam_ndarray::{NdError, NdGroup};
use sam_verification::backend::CoreBackend;
use sam_verification::replay::Verdict;
use sam_verification::{case, run_bytes};

// ---------------------------------------------------------------------------------------------
// Harness

/// Caller-provided memory of one `SliceBuffer` group, with room for every slot. The contract
/// tests keep `SliceBuffer` (not the owning `VecBuffer`) because they cut this memory short and
/// read its scratch slots directly.
#[derive(Debug, Clone, PartialEq)]
struct Store {
    w: Vec<f64>,
    g: Vec<f64>,
    s: Vec<f64>,
}

fn store(w: &[f64], g: &[f64]) -> Store {
    Store {
        w: w.to_vec(),
        g: g.to_vec(),
        s: vec![0.0; Slot::ALL.len() * w.len()],
    }
}

fn groups<'a>(stores: &'a mut [Store], base: BaseRule) -> Vec<Group<SliceBuffer<'a, f64>>> {
    stores
        .iter_mut()
        .map(|s| {
            Group::new(
                SliceBuffer::new(&mut s.w, &mut s.g, &mut s.s).expect("equal lengths"),
                base,
            )
        })
        .collect()
}

fn sgd() -> BaseRule {
    BaseRule::sgd(SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..Default::default()
    })
    .expect("valid")
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// What the contract tests do with a two-gradient optimizer, for any [`SamOptimizer`]: one
/// generic implementation, so a list of variants can be driven as `Box<dyn Probe>`.
trait Probe: std::fmt::Debug {
    /// A closure step writing `g1` then `g2`.
    fn step_with(
        &mut self,
        gs: &mut [Group<SliceBuffer<'_, f64>>],
        g1: &[f64],
        g2: &[f64],
    ) -> R<StepStatus>;
    /// The first step; the perturbed weights of group 0 (the guard restores on drop).
    fn perturbed(&mut self, gs: &mut [Group<SliceBuffer<'_, f64>>]) -> R<Vec<f64>>;
    /// Leaks a first step's guard, tries a second first step, recovers; the phases around.
    fn leak_then_recover(
        &mut self,
        gs: &mut [Group<SliceBuffer<'_, f64>>],
    ) -> (Phase, R<()>, R<()>, Phase);
    /// `Optimizer::phase`.
    fn phase_now(&self) -> Phase;
    /// `Optimizer::steps`.
    fn steps_done(&self) -> u64;
    /// Scratch slots (backup, stash) per parameter in front of the base state.
    fn scratch(&self) -> usize;
}

impl<O: SamOptimizer + std::fmt::Debug> Probe for O {
    fn step_with(
        &mut self,
        gs: &mut [Group<SliceBuffer<'_, f64>>],
        g1: &[f64],
        g2: &[f64],
    ) -> R<StepStatus> {
        let mut calls = 0;
        let r = self.step(gs, |gs: &mut [Group<SliceBuffer<'_, f64>>]| {
            calls += 1;
            gs[0]
                .buffer
                .grad_mut()
                .copy_from_slice(if calls == 1 { g1 } else { g2 });
            Ok::<_, Error<SliceError>>(())
        })?;
        Ok(r.status)
    }

    fn perturbed(&mut self, gs: &mut [Group<SliceBuffer<'_, f64>>]) -> R<Vec<f64>> {
        Ok(self.first_step(gs)?.groups()[0].buffer.weights().to_vec())
    }

    fn leak_then_recover(
        &mut self,
        gs: &mut [Group<SliceBuffer<'_, f64>>],
    ) -> (Phase, R<()>, R<()>, Phase) {
        std::mem::forget(self.first_step(gs).expect("first step"));
        let p = self.phase();
        let again = self.first_step(gs).map(|_| ());
        (p, again, self.recover(gs), self.phase())
    }

    fn phase_now(&self) -> Phase {
        self.phase()
    }

    fn steps_done(&self) -> u64 {
        self.steps()
    }

    fn scratch(&self) -> usize {
        let spec = self.slot_spec(&GroupOptions::new(sgd()));
        usize::from(spec.backup) + usize::from(spec.stash)
    }
}

type V = Box<dyn Probe>;

/// Every two-gradient variant, with the second-gradient check on.
fn variants() -> Vec<V> {
    vec![
        Box::new(Sam::new(SamConfig::default()).expect("valid")),
        Box::new(Sam::new(Perturbation::asam(0.05, 0.0).into()).expect("valid")),
        Box::new(
            Gsam::new(GsamConfig::new(RhoSchedule::Schedule(
                Schedule::constant(0.05).expect("valid"),
            )))
            .expect("valid"),
        ),
        Box::new(Wsam::new(WsamConfig::default()).expect("valid")),
        Box::new(
            Wsam::new(WsamConfig {
                decouple: false,
                max_norm: Some(1.0),
                ..Default::default()
            })
            .expect("valid"),
        ),
        Box::new(Wasam::new(SamConfig::default(), &[0]).expect("valid")),
    ]
}

type R<T> = Result<T, Error<SliceError>>;

const W: [f64; 4] = [0.5, -1.25, 2.0, 0.0];
const G: [f64; 4] = [0.25, 1.0, -0.5, 2.0];

/// Runs one good step so that base state and averages are non-trivial; returns the stores.
fn warmed(v: &mut V) -> Vec<Store> {
    let mut st = vec![store(&W, &G)];
    {
        let mut gs = groups(&mut st, sgd());
        assert_eq!(
            v.step_with(&mut gs, &G, &G).expect("a good step"),
            StepStatus::Applied
        );
    }
    st
}

// ---------------------------------------------------------------------------------------------
// Gradients

#[test]
fn nan_or_inf_in_clean_gradient_changes_nothing_in_every_variant() {
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        for mut v in variants() {
            let mut st = warmed(&mut v);
            let before = st.clone();
            let mut g1 = G;
            g1[2] = bad;
            {
                let mut gs = groups(&mut st, sgd());
                gs[0].buffer.grad_mut().copy_from_slice(&g1);
                assert!(
                    matches!(
                        v.perturbed(&mut gs).map(|_| ()),
                        Err(Error::NonFiniteGradient)
                    ),
                    "{v:?}"
                );
                assert_eq!(
                    v.step_with(&mut gs, &g1, &G).expect("a skip, not an error"),
                    StepStatus::Skipped(SkipReason::NonFiniteClean)
                );
            }
            assert_eq!(
                (bits(&st[0].w), bits(&st[0].s)),
                (bits(&before[0].w), bits(&before[0].s)),
                "{v:?}"
            );
            assert_eq!(v.steps_done(), 1);
        }
        // The base optimizer alone skips too.
        let mut st = vec![store(&W, &[bad, 0.0, 0.0, 0.0])];
        let mut gs = groups(&mut st, sgd());
        assert_eq!(
            BaseOptimizer::new().apply(&mut gs),
            Ok(StepStatus::Skipped(SkipReason::NonFiniteClean))
        );
        drop(gs);
        assert_eq!(bits(&st[0].w), bits(&W));
    }
}

#[test]
fn nan_in_second_gradient_restores_and_skips_in_every_variant() {
    for mut v in variants() {
        let mut st = warmed(&mut v);
        let before = st.clone();
        let mut g2 = G;
        g2[0] = f64::NAN;
        {
            let mut gs = groups(&mut st, sgd());
            assert_eq!(
                v.step_with(&mut gs, &G, &g2).expect("a skip"),
                StepStatus::Skipped(SkipReason::NonFiniteSecond),
                "{v:?}"
            );
        }
        // Weights and the base state (momentum; averages) are bit-identical; backup and stash
        // are scratch.
        assert_eq!(bits(&st[0].w), bits(&before[0].w), "{v:?}");
        let scratch = v.scratch();
        assert_eq!(
            bits(&st[0].s[scratch * 4..]),
            bits(&before[0].s[scratch * 4..]),
            "{v:?}"
        );
        assert_eq!(v.steps_done(), 1);
        assert_eq!(v.phase_now(), Phase::Idle);
    }
}

#[test]
fn second_gradient_check_off_lets_nan_through_as_documented() {
    let mut sam = Sam::new(SamConfig {
        check_second_gradient: false,
        ..Default::default()
    })
    .expect("valid");
    let mut st = vec![store(&W, &G)];
    let mut gs = groups(&mut st, sgd());
    let mut calls = 0;
    let r = sam.step(&mut gs, |gs| {
        calls += 1;
        let g = gs[0].buffer.grad_mut();
        g.copy_from_slice(&G);
        if calls == 2 {
            g[0] = f64::NAN;
        }
        Ok::<_, Error<SliceError>>(())
    });
    assert_eq!(r.expect("applied").status, StepStatus::Applied);
    assert!(gs[0].buffer.weights()[0].is_nan());
}

#[test]
fn infinite_weights_adaptive_is_nonfinite_gradient_plain_proceeds() {
    let w = [f64::INFINITY, 1.0];
    let g = [0.5, 0.5];
    let mut st = vec![store(&w, &g)];
    let mut gs = groups(&mut st, sgd());
    let mut asam = Sam::new(Perturbation::asam(0.05, 0.0).into()).expect("valid");
    assert!(matches!(
        asam.first_step(&mut gs),
        Err(Error::NonFiniteGradient)
    ));
    let mut sam = Sam::new(SamConfig::default()).expect("valid");
    let guard = sam
        .first_step(&mut gs)
        .expect("plain SAM does not read the weights");
    assert_eq!(guard.groups()[0].buffer.weights()[0], f64::INFINITY);
    drop(guard);
    assert_eq!(bits(gs[0].buffer.weights()), bits(&w));
}

#[test]
fn zero_gradient_does_not_perturb_and_steps_on_the_second_gradient() {
    for mut v in variants() {
        let mut st = vec![store(&W, &[0.0; 4])];
        let mut gs = groups(&mut st, sgd());
        let perturbed = v
            .perturbed(&mut gs)
            .map(|w| bits(&w))
            .expect("zero gradient is fine");
        assert_eq!(
            perturbed,
            bits(&W),
            "{v:?}: a zero gradient must not move the weights"
        );
        assert_eq!(
            v.step_with(&mut gs, &[0.0; 4], &G).expect("applied"),
            StepStatus::Applied
        );
        assert!(
            gs[0].buffer.weights().iter().all(|x| x.is_finite()),
            "{v:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Groups and storage

#[test]
fn empty_groups_and_no_groups_are_no_ops() {
    let nothing = |_: &mut [Group<SliceBuffer<'_, f64>>]| Ok::<_, Error<SliceError>>(());
    for n_empty in [0, 1, 3] {
        let mut st: Vec<Store> = (0..n_empty).map(|_| store(&[], &[])).collect();
        let mut gs = groups(&mut st, sgd());
        let rho = RhoSchedule::Schedule(Schedule::constant(0.05).expect("valid"));
        let statuses = [
            Sam::new(SamConfig::default())
                .expect("valid")
                .step(&mut gs, nothing)
                .map(|r| r.status),
            Gsam::new(GsamConfig::new(rho))
                .expect("valid")
                .step(&mut gs, nothing)
                .map(|r| r.status),
            Wsam::new(WsamConfig::default())
                .expect("valid")
                .step(&mut gs, nothing)
                .map(|r| r.status),
            Wasam::new(SamConfig::default(), &[0])
                .expect("valid")
                .step(&mut gs, nothing)
                .map(|r| r.status),
            BaseOptimizer::new().apply(&mut gs),
        ];
        for s in statuses {
            assert_eq!(s, Ok(StepStatus::Applied), "{n_empty} empty groups");
        }
    }
    // An empty group next to a real one changes nothing in the real one's step.
    let mut a = vec![store(&W, &G)];
    let mut b = vec![store(&[], &[]), store(&W, &G), store(&[], &[])];
    let write = |gs: &mut [Group<SliceBuffer<'_, f64>>]| {
        for g in gs.iter_mut() {
            let n = g.buffer.grad().len();
            g.buffer.grad_mut().copy_from_slice(&G[..n]);
        }
        Ok::<_, Error<SliceError>>(())
    };
    Sam::new(SamConfig::default())
        .expect("valid")
        .step(&mut groups(&mut a, sgd()), write)
        .expect("step");
    Sam::new(SamConfig::default())
        .expect("valid")
        .step(&mut groups(&mut b, sgd()), write)
        .expect("step");
    assert_eq!(bits(&a[0].w), bits(&b[1].w));
}

#[test]
fn length_mismatch_is_refused_by_both_backends() {
    let (mut w, mut g, mut s) = (vec![1.0f32; 3], vec![0.0f32; 2], vec![0.0f32; 9]);
    assert_eq!(
        SliceBuffer::new(&mut w, &mut g, &mut s).err(),
        Some(SliceError::LengthMismatch {
            weights: 3,
            grads: 2
        })
    );
    let a = ArrayD::<f32>::zeros(IxDyn(&[2, 3]));
    assert!(matches!(
        NdGroup::with_grads(vec![a.clone()], vec![]),
        Err(NdError::TensorCountMismatch { .. })
    ));
    assert!(matches!(
        NdGroup::with_grads(vec![a.clone()], vec![ArrayD::zeros(IxDyn(&[3, 2]))]),
        Err(NdError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        NdGroup::new(vec![a.reversed_axes()]),
        Err(NdError::NotContiguous { .. })
    ));
}

#[test]
fn slot_memory_too_small_is_a_backend_error_that_changes_nothing() {
    let mut st = vec![store(&W, &G), store(&W, &G)];
    st[1].s.truncate(3);
    let before = st.clone();
    {
        let mut gs = groups(&mut st, sgd());
        let mut sam = Sam::new(SamConfig::default()).expect("valid");
        assert!(matches!(
            sam.first_step(&mut gs),
            Err(Error::Backend(SliceError::SlotsTooSmall {
                needed: 8,
                provided: 3
            }))
        ));
        assert_eq!(sam.phase(), Phase::Idle);
    }
    assert_eq!(st, before);
}

#[test]
fn groups_changing_between_steps_are_refused_unless_count_size_and_layouts_match() {
    let mut st = vec![store(&W, &G), store(&W[..2], &G[..2])];
    let mut sam = Sam::new(SamConfig::default()).expect("valid");
    {
        let mut gs = groups(&mut st, sgd());
        sam.first_step(&mut gs)
            .expect("first")
            .second_step()
            .expect("second");
    }
    let before = st.clone();
    {
        let mut gs = groups(&mut st[..1], sgd());
        assert!(
            matches!(sam.first_step(&mut gs), Err(Error::InvalidGroups { .. })),
            "a group fewer"
        );
    }
    {
        let mut extra = vec![store(&W, &G), store(&W[..3], &G[..3])];
        let mut gs = groups(&mut extra, sgd());
        assert!(
            matches!(sam.first_step(&mut gs), Err(Error::InvalidGroups { .. })),
            "a group longer"
        );
    }
    assert_eq!(st, before);
    // The same number of groups and elements with the same slot layouts in another order is
    // accepted: every per-element state lives in its buffer, so each buffer keeps its own
    // momentum.
    let mut gs = groups(&mut st, sgd());
    gs.swap(0, 1);
    assert!(sam.first_step(&mut gs).is_ok());
}

#[test]
fn a_slot_layout_change_between_steps_is_refused_until_a_checkpoint_load() {
    // WASAM with Adam (2 state slots), then SGD with momentum (1 state slot) for the same
    // group: the reference backend would reinterpret its slot memory (the average would move
    // into another slot's values), so the change is refused before anything is written.
    let adam = BaseRule::adam(AdamConfig {
        lr: 0.1,
        ..Default::default()
    })
    .expect("valid");
    let plain_sgd = BaseRule::sgd(SgdConfig {
        lr: 0.1,
        ..Default::default()
    })
    .expect("valid");
    let mut o = Wasam::new(SamConfig::default(), &[0]).expect("valid");
    let mut st = vec![store(&W, &G)];
    let mut gs = groups(&mut st, adam);
    o.first_step(&mut gs)
        .expect("first")
        .second_step()
        .expect("second");
    let kept = (
        bits(gs[0].buffer.weights()),
        gs[0].buffer.slot(Slot::Average(0)).map(bits),
        gs[0].buffer.slot(Slot::State(1)).map(bits),
    );
    for other in [sgd(), plain_sgd] {
        gs[0].options = GroupOptions::new(other);
        assert!(matches!(
            o.first_step(&mut gs).map(drop),
            Err(Error::InvalidGroups { .. })
        ));
        assert!(matches!(
            o.update_averages(&mut gs),
            Err(Error::InvalidGroups { .. })
        ));
        assert!(matches!(
            o.swap(&mut gs, 0).map(drop),
            Err(Error::InvalidGroups { .. })
        ));
        assert_eq!(
            (
                bits(gs[0].buffer.weights()),
                gs[0].buffer.slot(Slot::Average(0)).map(bits),
                gs[0].buffer.slot(Slot::State(1)).map(bits),
            ),
            kept,
            "an Err changed the weights, the average or the Adam state"
        );
    }
    // Back to Adam: accepted.
    gs[0].options = GroupOptions::new(adam);
    assert!(o.first_step(&mut gs).is_ok());
    // Reordering groups whose layouts differ is refused too (the record is per position).
    let mut st2 = vec![store(&W, &G), store(&W, &G)];
    let mut two = groups(&mut st2, sgd());
    two[1].options = GroupOptions::new(adam);
    let mut sam = Sam::new(SamConfig::default()).expect("valid");
    sam.first_step(&mut two)
        .expect("first")
        .second_step()
        .expect("second");
    two.swap(0, 1);
    assert!(matches!(
        sam.first_step(&mut two).map(drop),
        Err(Error::InvalidGroups { .. })
    ));
    // A checkpoint load resets the record: the caller is then responsible for the buffers.
    let state = sam.state().expect("idle");
    sam.load_state(&state).expect("idle");
    assert!(sam.first_step(&mut two).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Hyperparameters

#[test]
fn out_of_domain_hyperparameters_are_refused_by_name() {
    let name = |e: Error| match e {
        Error::InvalidHyperparameter { name, .. } => name,
        other => panic!("not a hyperparameter error: {other:?}"),
    };
    assert_eq!(
        name(
            Sam::new(
                Perturbation {
                    rho: -0.1,
                    ..Default::default()
                }
                .into()
            )
            .expect_err("rho < 0")
        ),
        "rho"
    );
    assert_eq!(
        name(
            Sam::new(
                Perturbation {
                    rho: f64::NAN,
                    ..Default::default()
                }
                .into()
            )
            .expect_err("NaN")
        ),
        "rho"
    );
    assert_eq!(
        name(
            Sam::new(
                Perturbation {
                    eta: f64::INFINITY,
                    ..Default::default()
                }
                .into()
            )
            .expect_err("inf")
        ),
        "eta"
    );
    assert_eq!(
        name(
            Wsam::new(WsamConfig {
                gamma: 1.0,
                ..Default::default()
            })
            .expect_err("gamma = 1")
        ),
        "gamma"
    );
    assert_eq!(
        name(
            Wsam::new(WsamConfig {
                gamma: f64::NAN,
                ..Default::default()
            })
            .expect_err("NaN")
        ),
        "gamma"
    );
    assert_eq!(
        name(
            Wsam::new(WsamConfig {
                max_norm: Some(0.0),
                ..Default::default()
            })
            .expect_err("0")
        ),
        "max_norm"
    );
    let rho = RhoSchedule::Schedule(Schedule::constant(0.05).expect("valid"));
    assert_eq!(
        name(
            Gsam::new(GsamConfig {
                alpha: -0.5,
                ..GsamConfig::new(rho)
            })
            .expect_err("alpha < 0")
        ),
        "alpha"
    );
    assert_eq!(
        name(
            Gsam::new(GsamConfig {
                perturbation: Perturbation {
                    eps: f64::NAN,
                    ..Default::default()
                },
                ..GsamConfig::new(rho)
            })
            .expect_err("NaN")
        ),
        "eps"
    );
    assert_eq!(
        name(Wasam::new(SamConfig::default(), &[]).expect_err("no average")),
        "swa_starts"
    );
    assert_eq!(
        name(Wasam::new(SamConfig::default(), &[0; 5]).expect_err("too many")),
        "swa_starts"
    );
    assert_eq!(
        name(
            BaseRule::adam(AdamConfig {
                eps: 0.0,
                ..Default::default()
            })
            .expect_err("eps = 0")
        ),
        "eps"
    );
    assert_eq!(
        name(
            BaseRule::adamw(AdamConfig {
                beta2: 1.0,
                ..Default::default()
            })
            .expect_err("beta2 = 1")
        ),
        "beta2"
    );
    assert_eq!(
        name(
            BaseRule::sgd(SgdConfig {
                nesterov: true,
                ..Default::default()
            })
            .expect_err("nesterov, no momentum")
        ),
        "nesterov"
    );
    assert_eq!(
        name(
            BaseRule::sgd(SgdConfig {
                lr: -1.0,
                ..Default::default()
            })
            .expect_err("lr < 0")
        ),
        "lr"
    );
    assert_eq!(
        name(
            GroupOptions::new(sgd())
                .with_rho(-1.0)
                .expect_err("rho < 0")
        ),
        "rho"
    );
    let sched = ScheduleConfig {
        shape: ScheduleShape::Linear,
        t_max: 3,
        max_value: 1.0,
        min_value: 0.0,
        init_value: 0.0,
        warmup_steps: 3,
        clamp: false,
    };
    assert_eq!(
        name(Schedule::new(sched).expect_err("t_max <= warmup")),
        "t_max"
    );
    assert!(
        Schedule::new(ScheduleConfig {
            shape: ScheduleShape::Constant,
            ..sched
        })
        .is_ok(),
        "a constant needs no t_max"
    );
}

#[test]
fn a_negative_scheduled_rho_is_refused_at_step_time_before_any_write() {
    let sched = ScheduleConfig {
        shape: ScheduleShape::Linear,
        t_max: 2,
        max_value: 0.1,
        min_value: -1.0,
        init_value: 0.1,
        warmup_steps: 0,
        clamp: false,
    };
    let mut gsam = Gsam::new(GsamConfig::new(RhoSchedule::Schedule(
        Schedule::new(sched).expect("valid"),
    )))
    .expect("valid");
    let mut st = vec![store(&W, &G)];
    let mut gs = groups(&mut st, sgd());
    gsam.load_state(&OptimizerState { steps: 2 }).expect("idle");
    assert!(matches!(
        gsam.first_step(&mut gs),
        Err(Error::InvalidHyperparameter { name: "rho", .. })
    ));
    drop(gs);
    assert_eq!(bits(&st[0].w), bits(&W));
}

// ---------------------------------------------------------------------------------------------
// Phases

#[test]
fn a_leaked_guard_blocks_every_variant_until_recover_restores_exactly() {
    for mut v in variants() {
        let mut st = warmed(&mut v);
        let before = st.clone();
        {
            let mut gs = groups(&mut st, sgd());
            let (leaked, again, recovered, after) = v.leak_then_recover(&mut gs);
            assert_eq!(leaked, Phase::Perturbed, "{v:?}");
            assert!(
                matches!(
                    again,
                    Err(Error::WrongPhase {
                        expected: Phase::Idle,
                        found: Phase::Perturbed
                    })
                ),
                "{v:?}"
            );
            assert_eq!(recovered, Ok(()));
            assert_eq!(after, Phase::Idle);
        }
        assert_eq!(bits(&st[0].w), bits(&before[0].w), "{v:?}");
    }
    // Checkpoints are refused while perturbed.
    let mut sam = Sam::new(SamConfig::default()).expect("valid");
    let mut st = vec![store(&W, &G)];
    let mut gs = groups(&mut st, sgd());
    std::mem::forget(sam.first_step(&mut gs).expect("first"));
    assert!(matches!(sam.state(), Err(Error::WrongPhase { .. })));
    assert!(matches!(
        sam.load_state(&OptimizerState::default()),
        Err(Error::WrongPhase { .. })
    ));
}

#[test]
fn a_failing_closure_aborts_the_step_with_the_weights_restored() {
    let mut sam = Sam::new(SamConfig::default()).expect("valid");
    let mut st = vec![store(&W, &G)];
    let mut gs = groups(&mut st, sgd());
    let mut calls = 0;
    let r = sam.step(&mut gs, |gs| {
        calls += 1;
        gs[0].buffer.grad_mut().copy_from_slice(&G);
        if calls == 2 {
            Err(Fail::Backward)
        } else {
            Ok(())
        }
    });
    assert_eq!(r.err(), Some(Fail::Backward));
    assert_eq!((sam.phase(), sam.steps()), (Phase::Idle, 0));
    assert_eq!(bits(gs[0].buffer.weights()), bits(&W));
}

/// A framework's own error type.
#[derive(Debug, PartialEq)]
enum Fail {
    Backward,
    Optimizer,
}

impl From<Error<SliceError>> for Fail {
    fn from(_: Error<SliceError>) -> Self {
        Fail::Optimizer
    }
}

#[test]
fn wasam_swap_of_an_empty_or_missing_average_is_refused() {
    let mut o = Wasam::new(SamConfig::default(), &[0, 5]).expect("valid");
    let mut st = vec![store(&W, &G)];
    let mut gs = groups(&mut st, sgd());
    assert!(
        matches!(o.swap(&mut gs, 0), Err(Error::InvalidGroups { .. })),
        "no snapshot yet"
    );
    o.first_step(&mut gs)
        .expect("first")
        .second_step()
        .expect("second");
    assert!(
        matches!(o.swap(&mut gs, 1), Err(Error::InvalidGroups { .. })),
        "average 1 starts at step 5"
    );
    assert!(
        matches!(o.swap(&mut gs, 7), Err(Error::InvalidGroups { .. })),
        "no average 7"
    );
    let w = bits(gs[0].buffer.weights());
    o.swap(&mut gs, 0)
        .expect("average 0 holds one snapshot")
        .swap_back()
        .expect("back");
    assert_eq!(bits(gs[0].buffer.weights()), w);
    assert_eq!(o.phase(), Phase::Idle);
}

#[test]
fn decoupled_wsam_with_an_external_optimizer_is_refused_with_the_weights_restored() {
    let mut o = Wsam::new(WsamConfig {
        decouple: true,
        ..Default::default()
    })
    .expect("valid");
    let mut st = vec![store(&W, &G)];
    let mut gs = groups(&mut st, sgd());
    let guard = o.first_step(&mut gs).expect("first");
    assert!(matches!(
        guard.restore_with_gradient(),
        Err(Error::InvalidGroups { .. })
    ));
    assert_eq!(o.phase(), Phase::Idle);
    assert_eq!(bits(gs[0].buffer.weights()), bits(&W));
    // Coupled WSAM can: the weights are restored and the mixed gradient is left in `g`.
    let mut o = Wsam::new(WsamConfig {
        decouple: false,
        ..Default::default()
    })
    .expect("valid");
    assert_eq!(
        o.first_step(&mut gs)
            .expect("first")
            .restore_with_gradient(),
        Ok(StepStatus::Applied)
    );
    assert_eq!(bits(gs[0].buffer.weights()), bits(&W));
}

// ---------------------------------------------------------------------------------------------
// Norms at the edges of f64

#[test]
fn norms_beyond_f64_max() {
    let g = [f64::MAX, -f64::MAX, f64::MAX];
    let w = [0.0, 1.0, -1.0];
    // SAM: the perturbation is still rho·g/‖g‖ (computed at a power-of-two scale).
    let mut st = vec![store(&w, &g)];
    let mut gs = groups(&mut st, sgd());
    let mut sam = Sam::new(Perturbation::sam(0.3).into()).expect("valid");
    let guard = sam.first_step(&mut gs).expect("no overflow error for SAM");
    let e0 = guard.groups()[0].buffer.weights()[0];
    assert!((e0 - 0.3 / 3f64.sqrt()).abs() < 1e-15, "{e0}");
    drop(guard);
    // GSAM: ‖g₁‖ = ‖g₂‖ = √3·f64::MAX overflow: NormOverflow, weights restored exactly.
    let mut gsam = Gsam::new(GsamConfig::new(RhoSchedule::Schedule(
        Schedule::constant(0.05).expect("valid"),
    )))
    .expect("valid");
    let guard = gsam.first_step(&mut gs).expect("first half is fine");
    assert_eq!(guard.second_step(), Err(Error::NormOverflow));
    assert_eq!(gsam.phase(), Phase::Idle);
    assert_eq!(bits(gs[0].buffer.weights()), bits(&w));
}

// ---------------------------------------------------------------------------------------------
// Case files

fn small_case() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../verification/cases/gsam_zero_grad_start.json"
    ))
    .expect("vendored case")
}

fn error_of(bytes: &[u8]) -> String {
    match run_bytes("x", bytes, &CoreBackend).verdict {
        Verdict::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn malformed_case_files_are_errors_that_name_the_field() {
    assert!(error_of(b"").starts_with("malformed case: invalid JSON"));
    assert!(error_of(b"{\"schema\": NaN}").starts_with("malformed case: invalid JSON"));
    let mut v: serde_json::Value = serde_json::from_slice(&small_case()).expect("JSON");
    v["steps"] = serde_json::Value::from(-3);
    let e = error_of(&serde_json::to_vec(&v).expect("JSON"));
    assert!(
        e.contains("steps") && e.contains("non-negative integer"),
        "{e}"
    );
    let mut v: serde_json::Value = serde_json::from_slice(&small_case()).expect("JSON");
    v["optimizer"]["rho_schedule"]["t_max"] = serde_json::Value::from(0.5);
    let e = error_of(&serde_json::to_vec(&v).expect("JSON"));
    assert!(e.contains("t_max"), "{e}");
    assert!(run_bytes("x", &small_case(), &CoreBackend).passed());
}

#[test]
fn oversize_case_files_are_refused_before_parsing() {
    let big = vec![b' '; case::MAX_INPUT_BYTES + 1];
    let e = error_of(&big);
    assert!(e.contains("above the cap"), "{e}");
}

#[test]
fn case_caps_are_enforced() {
    let mut v: serde_json::Value = serde_json::from_slice(&small_case()).expect("JSON");
    v["steps"] = serde_json::Value::from(case::MAX_STEPS + 1);
    let e = error_of(&serde_json::to_vec(&v).expect("JSON"));
    assert!(e.contains("steps") && e.contains("cap"), "{e}");
    let mut v: serde_json::Value = serde_json::from_slice(&small_case()).expect("JSON");
    v["params"][0]["shape"] = serde_json::json!([1_000_001]);
    let e = error_of(&serde_json::to_vec(&v).expect("JSON"));
    assert!(e.contains("cap"), "{e}");
    let mut v: serde_json::Value = serde_json::from_slice(&small_case()).expect("JSON");
    v["params"][0]["shape"] = serde_json::json!([4_294_967_296u64, 4_294_967_296u64]);
    let e = error_of(&serde_json::to_vec(&v).expect("JSON"));
    assert!(e.contains("overflows"), "{e}");
    // The replay's work: a 150-element quadratic (150² per evaluation) over 100 000 steps is
    // 2.25·10⁹ > MAX_REPLAY_COST, although every other cap holds; refused before `expected`
    // is checked.
    let n = 150;
    let mut v: serde_json::Value = serde_json::from_slice(&small_case()).expect("JSON");
    v["params"] = serde_json::json!([{"name": "u", "shape": [n], "init": vec![0.0; n]}]);
    v["param_groups"] = serde_json::json!([{"params": ["u"], "options": {}}]);
    let a: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| if i == j { 1.0 } else { 0.0 }).collect())
        .collect();
    v["objective"] = serde_json::json!({"kind": "quadratic", "a": a, "b": vec![0.0; n]});
    v["steps"] = serde_json::Value::from(case::MAX_STEPS);
    assert!(n * n * case::MAX_STEPS > case::MAX_REPLAY_COST);
    assert!(n * case::MAX_STEPS <= case::MAX_TRAJECTORY);
    let e = error_of(&serde_json::to_vec(&v).expect("JSON"));
    assert!(e.contains("replay work") && e.contains("cap"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Fixed findings: the behaviour sam-core delivers now where the fuzz harness found it wrong.

fn no_panic<X>(f: impl FnOnce() -> X) -> Option<X> {
    catch_unwind(AssertUnwindSafe(f)).ok()
}

fn constant_rho() -> RhoSchedule {
    RhoSchedule::Schedule(Schedule::constant(0.05).expect("valid"))
}

#[test]
fn validated_schedules_give_finite_values_and_gsam_refuses_a_negative_lr() {
    let poly = Schedule::new(ScheduleConfig {
        shape: ScheduleShape::Polynomial { power: 1.5 },
        t_max: 4,
        max_value: 1.0,
        min_value: 0.0,
        init_value: 0.0,
        warmup_steps: 0,
        clamp: false,
    })
    .expect("valid");
    // Past t_max the polynomial holds at its final value.
    assert_eq!(poly.value(5), 0.0);
    assert_eq!(poly.value(u64::MAX), 0.0);
    // Ranges whose arithmetic could overflow, and step counts not exact in f64, are refused
    // at construction (values within ±MAX_VALUE, counts ≤ MAX_STEP); accepted ones stay finite.
    let wide = ScheduleConfig {
        shape: ScheduleShape::Cosine,
        t_max: 2,
        max_value: f64::MAX,
        min_value: -f64::MAX,
        init_value: 0.0,
        warmup_steps: 0,
        clamp: false,
    };
    assert!(matches!(
        Schedule::new(wide),
        Err(Error::InvalidHyperparameter { .. })
    ));
    let edge = Schedule::new(ScheduleConfig {
        max_value: sam_core::MAX_VALUE,
        min_value: -sam_core::MAX_VALUE,
        ..wide
    })
    .expect("valid");
    for k in [0, 1, 2, 3, 1 << 53, u64::MAX] {
        assert!(edge.value(k).is_finite(), "step {k}");
    }
    let late = ScheduleConfig {
        shape: ScheduleShape::Linear,
        t_max: sam_core::MAX_STEP + 1,
        max_value: 1.0,
        min_value: 0.0,
        init_value: 0.0,
        warmup_steps: sam_core::MAX_STEP,
        clamp: false,
    };
    assert!(
        Schedule::new(late).is_err(),
        "t_max − warmup would round to 0 in f64"
    );
    assert!(
        sam_core::Proportional {
            max_lr: f64::MAX,
            min_lr: -f64::MAX,
            max_value: 1.0,
            min_value: 0.0,
        }
        .validate()
        .is_err(),
        "max_lr − min_lr overflows"
    );
    // An lr schedule going negative: GSAM refuses the step by name, before any write.
    let falling = Schedule::new(ScheduleConfig {
        shape: ScheduleShape::Linear,
        t_max: 2,
        max_value: 0.1,
        min_value: -1.0,
        init_value: 0.1,
        warmup_steps: 0,
        clamp: false,
    })
    .expect("valid");
    let mut gsam = Gsam::new(GsamConfig {
        lr_schedule: Some(falling),
        timeline: sam_core::Timeline::Synced,
        ..GsamConfig::new(constant_rho())
    })
    .expect("valid");
    let mut st = vec![store(&W, &G)];
    {
        let mut gs = groups(&mut st, sgd());
        gsam.load_state(&OptimizerState { steps: 2 }).expect("idle");
        assert!(matches!(
            gsam.first_step(&mut gs).map(drop),
            Err(Error::InvalidHyperparameter { name: "lr", .. })
        ));
        assert_eq!(gsam.phase(), Phase::Idle);
    }
    assert_eq!(bits(&st[0].w), bits(&W));
    assert!(st[0].s.iter().all(|x| *x == 0.0), "nothing written");
}

#[test]
fn loaded_step_counts_and_average_counts_saturate() {
    let r = no_panic(|| {
        let mut sam = Sam::new(SamConfig::default()).expect("valid");
        let mut st = vec![store(&W, &G)];
        let mut gs = groups(&mut st, sgd());
        sam.load_state(&OptimizerState { steps: u64::MAX })
            .expect("idle");
        let status = sam
            .first_step(&mut gs)
            .expect("first")
            .second_step()
            .expect("second");
        (status, sam.steps())
    });
    assert_eq!(r, Some((StepStatus::Applied, u64::MAX)));
    let r = no_panic(|| {
        let mut o = Wasam::new(SamConfig::default(), &[0]).expect("valid");
        let mut st = vec![store(&W, &G)];
        let mut gs = groups(&mut st, sgd());
        o.load_state(&WasamState {
            steps: u64::MAX,
            counts: [u64::MAX; 4],
            pending_fold: false,
        })
        .expect("idle");
        let status = o
            .first_step(&mut gs)
            .expect("first")
            .second_step()
            .expect("second");
        (status, o.steps(), o.counts().to_vec())
    });
    assert_eq!(
        r,
        Some((StepStatus::Applied, u64::MAX, vec![u64::MAX])),
        "the step count and the snapshot count saturate"
    );
}

#[test]
fn a_fold_pending_before_the_first_step_is_an_invalid_state() {
    let mut o = Wasam::new(SamConfig::default(), &[0]).expect("valid");
    let bad = WasamState {
        steps: 0,
        counts: [0; 4],
        pending_fold: true,
    };
    assert!(matches!(
        o.load_state(&bad),
        Err(Error::InvalidState { .. })
    ));
    assert_eq!(o.state(), Ok(WasamState::default()), "nothing changed");
    // One step later it is a state a run can produce.
    o.load_state(&WasamState { steps: 1, ..bad })
        .expect("a pending fold after a step");
}

#[test]
fn a_leaked_swap_guard_is_swapped_back_by_recover() {
    let mut o = Wasam::new(SamConfig::default(), &[0]).expect("valid");
    let mut st = vec![store(&W, &G)];
    let mut gs = groups(&mut st, sgd());
    o.first_step(&mut gs)
        .expect("first")
        .second_step()
        .expect("second");
    let live = bits(gs[0].buffer.weights());
    let avg = gs[0].buffer.slot(Slot::Average(0)).map(bits);
    std::mem::forget(o.swap(&mut gs, 0).expect("swap"));
    assert_eq!(o.phase(), Phase::Swapped);
    assert!(matches!(
        o.first_step(&mut gs).map(drop),
        Err(Error::WrongPhase {
            found: Phase::Swapped,
            ..
        })
    ));
    assert_eq!(o.recover(&mut gs), Ok(()));
    assert_eq!(o.phase(), Phase::Idle);
    assert_eq!(bits(gs[0].buffer.weights()), live);
    assert_eq!(gs[0].buffer.slot(Slot::Average(0)).map(bits), avg);
    assert!(o.first_step(&mut gs).is_ok());
}

#[test]
fn wasam_errors_change_no_average() {
    let mut o = Wasam::new(SamConfig::default(), &[0]).expect("valid");
    let mut st = vec![store(&W, &G)];
    let mut gs = groups(&mut st, sgd());
    o.first_step(&mut gs)
        .expect("first")
        .restore_with_gradient()
        .expect("external");
    // The framework's optimizer steps, then the next clean gradient is NaN.
    gs[0].buffer.weights_mut()[0] = 7.0;
    gs[0].buffer.grad_mut()[0] = f64::NAN;
    let avg = gs[0].buffer.slot(Slot::Average(0)).map(bits);
    assert!(matches!(
        o.first_step(&mut gs).map(drop),
        Err(Error::NonFiniteGradient)
    ));
    assert!(matches!(
        o.swap(&mut gs, 3).map(drop),
        Err(Error::InvalidGroups { .. })
    ));
    assert_eq!(
        gs[0].buffer.slot(Slot::Average(0)).map(bits),
        avg,
        "an Err folded the average"
    );
    assert_eq!(
        o.state().map(|s| s.pending_fold),
        Ok(true),
        "the fold is still owed"
    );
    // The fold owed gives average 0 its first snapshot: the swap is valid and folds first.
    let swapped = o.swap(&mut gs, 0).expect("the owed fold makes a snapshot");
    assert_eq!(swapped.groups()[0].buffer.weights()[0], 7.0);
    swapped.swap_back().expect("back");
    assert_eq!(o.counts(), &[1]);
    assert_eq!(o.state().map(|s| s.pending_fold), Ok(false));
}

#[test]
fn wasam_resumes_on_fresh_buffers() {
    // A checkpoint taken after restore_with_gradient (pending fold), resumed in a fresh process.
    let mut o = Wasam::new(SamConfig::default(), &[0]).expect("valid");
    o.load_state(&WasamState {
        steps: 1,
        counts: [0; 4],
        pending_fold: true,
    })
    .expect("idle");
    let mut st = vec![store(&W, &G)];
    let mut gs = groups(&mut st, sgd());
    let r = o.first_step(&mut gs).map(|g| g.second_step());
    assert_eq!(r, Ok(Ok(StepStatus::Applied)));
    assert_eq!(o.counts(), &[2], "the owed fold and the step's own");
}

#[test]
fn adaptive_overflow_of_finite_values_is_a_norm_overflow_that_changes_nothing() {
    // (|w| + η)·g overflows f64 although w and g are finite.
    let w = [1e200, 1.0];
    let g = [1e200, 1.0];
    let climb = Perturbation::asam(0.05, 0.0);
    let adaptive = SamConfig::from(climb);
    let mut vs: Vec<V> = vec![
        Box::new(Sam::new(adaptive).expect("valid")),
        Box::new(Wasam::new(adaptive, &[0]).expect("valid")),
        Box::new(
            Wsam::new(WsamConfig {
                perturbation: climb,
                ..Default::default()
            })
            .expect("valid"),
        ),
        Box::new(
            Gsam::new(GsamConfig {
                perturbation: climb,
                ..GsamConfig::new(constant_rho())
            })
            .expect("valid"),
        ),
    ];
    for v in &mut vs {
        let mut st = vec![store(&w, &g)];
        let before = st.clone();
        {
            let mut gs = groups(&mut st, sgd());
            assert!(
                matches!(v.perturbed(&mut gs).map(|_| ()), Err(Error::NormOverflow)),
                "{v:?}"
            );
            assert_eq!(v.phase_now(), Phase::Idle);
        }
        assert_eq!(st, before, "{v:?}");
    }
}

#[test]
fn gsam_degenerate_cosine_stays_finite_and_an_overflowing_coefficient_restores() {
    let gsam = || {
        Gsam::new(GsamConfig {
            perturbation: Perturbation {
                eps: 0.0,
                ..Default::default()
            },
            ..GsamConfig::new(constant_rho())
        })
        .expect("valid")
    };
    // Zero gradients with ε = 0: cos = 0/0 is taken as 0, a = 1.
    let mut o = gsam();
    let mut st = vec![store(&W, &[0.0; 4])];
    let mut gs = groups(&mut st, sgd());
    assert_eq!(
        o.first_step(&mut gs).expect("first").second_step(),
        Ok(StepStatus::Applied)
    );
    assert!(gs[0].buffer.weights().iter().all(|x| x.is_finite()));
    // A second gradient of 5e-324: the cosine is computed at the reduction's scales, so it is
    // the true one (0.108, not 0), and a = 1 + α·cos·‖g₁‖/‖g₂‖ overflows: NormOverflow with the
    // weights restored exactly.
    let mut o = gsam();
    let mut st = vec![store(&W, &G)];
    let mut gs = groups(&mut st, sgd());
    let mut guard = o.first_step(&mut gs).expect("first");
    guard.groups_mut()[0]
        .buffer
        .grad_mut()
        .copy_from_slice(&[5e-324, 0.0, 0.0, 0.0]);
    assert_eq!(guard.second_step(), Err(Error::NormOverflow));
    assert_eq!(bits(gs[0].buffer.weights()), bits(&W));
    // ‖g₁‖/‖g₂‖ = 1e310: a = 1 + α·cos·‖g₁‖/‖g₂‖ overflows: NormOverflow, every group restored,
    // nothing else changed.
    let mut o = gsam();
    let mut st = vec![store(&W, &[1e10, 0.0, 0.0, 0.0]), store(&W, &G)];
    let before = st.clone();
    {
        let mut gs = groups(&mut st, sgd());
        let mut guard = o.first_step(&mut gs).expect("first");
        guard.groups_mut()[0]
            .buffer
            .grad_mut()
            .copy_from_slice(&[1e-300, 0.0, 0.0, 0.0]);
        guard.groups_mut()[1].buffer.grad_mut().fill(0.0);
        assert_eq!(guard.second_step(), Err(Error::NormOverflow));
        assert_eq!((o.phase(), o.steps()), (Phase::Idle, 0));
    }
    for (s, b) in st.iter().zip(&before) {
        assert_eq!(bits(&s.w), bits(&b.w));
        // Momentum (slot 2 of backup, stash, momentum) untouched.
        assert_eq!(bits(&s.s[8..12]), bits(&b.s[8..12]));
    }
}

#[test]
fn gsam_second_step_with_a_huge_but_finite_gradient() {
    // ‖g₂‖ = 1.73e308, ‖g₁‖·‖g₂‖ = 3e306 and ⟨g₁,g₂⟩ = 3e306 are finite; Σg₂² overflows, so
    // the norms are rescaled (s_g = 2^-1024, s_s = 2^6) and the dot product is unscaled by the
    // (normal) product of the scales.
    let mut gsam = Gsam::new(GsamConfig::new(constant_rho())).expect("valid");
    let mut st = vec![store(&[0.0; 3], &[0.01; 3])];
    let mut gs = groups(&mut st, sgd());
    let mut guard = gsam.first_step(&mut gs).expect("first");
    guard.groups_mut()[0]
        .buffer
        .grad_mut()
        .copy_from_slice(&[1e308; 3]);
    assert_eq!(guard.second_step(), Ok(StepStatus::Applied));
}

#[test]
fn huge_eps_does_not_flush_a_representable_perturbation() {
    // e = ρ·g/(‖g‖+ε) = 1 · 5e-307/(5e-307 + 1e10) ≈ 5e-317, representable (subnormal).
    let mut sam = Sam::new(
        Perturbation {
            rho: 1.0,
            eps: 1e10,
            ..Default::default()
        }
        .into(),
    )
    .expect("valid");
    let mut st = vec![store(&[0.0], &[5e-307])];
    let mut gs = groups(&mut st, sgd());
    let guard = sam.first_step(&mut gs).expect("first");
    let e = guard.groups()[0].buffer.weights()[0];
    assert!((e - 5e-317).abs() <= 1e-319, "perturbation {e:e}");
}

#[test]
fn a_tiny_radius_next_to_a_huge_norm_is_applied_in_every_variant() {
    // e = ρ·g/‖g‖ with ρ = 1e-300, ‖g‖ = 8e38: ρ/‖g‖ = 1.25e-339 is below the smallest f64,
    // but e = [1e-300, 0] is representable (past finding TinyRhoFlush: no perturbation at all).
    let climb = Perturbation::sam(1e-300);
    let rho = RhoSchedule::Schedule(Schedule::constant(1e-300).expect("valid"));
    let vs: Vec<V> = vec![
        Box::new(Sam::new(climb.into()).expect("valid")),
        Box::new(Wasam::new(climb.into(), &[0]).expect("valid")),
        Box::new(
            Wsam::new(WsamConfig {
                perturbation: climb,
                ..Default::default()
            })
            .expect("valid"),
        ),
        Box::new(Gsam::new(GsamConfig::new(rho)).expect("valid")),
    ];
    for mut v in vs {
        let mut st = vec![store(&[0.0, 0.0], &[8e38, 0.0])];
        let mut gs = groups(&mut st, sgd());
        let e = v.perturbed(&mut gs).expect("first step");
        assert_eq!(e[1], 0.0, "{v:?}");
        assert!(
            (e[0] / 1e-300 - 1.0).abs() < 1e-15,
            "{v:?}: perturbation {e:?}"
        );
        // The guard restored the weights.
        assert_eq!(bits(gs[0].buffer.weights()), bits(&[0.0, 0.0]), "{v:?}");
    }
    // A subnormal radius: e = 1e-315 (subnormal, representable).
    let mut sam = Sam::new(
        Perturbation {
            rho: 1e-315,
            eps: 0.0,
            ..Default::default()
        }
        .into(),
    )
    .expect("valid");
    let mut st = vec![store(&[0.0], &[3.0])];
    let mut gs = groups(&mut st, sgd());
    let e = sam.perturbed(&mut gs).expect("first step")[0];
    assert!((e / 1e-315 - 1.0).abs() < 1e-6, "perturbation {e:e}");
}

#[test]
fn a_gradient_element_tiny_next_to_a_rescaled_norm_is_perturbed_to_full_precision() {
    // ‖g‖ = 1e200 is computed at the scale s = 2^-665; for g = 1e-110, g·s ≈ 1e-310 is
    // subnormal, and ((g·s)·c) with c ≈ ρ = 1e10 would keep about 14 bits of e = 1e-300. The
    // core multiplies by s·c (exact) instead: e is correctly rounded.
    let mut sam = Sam::new(
        Perturbation {
            rho: 1e10,
            eps: 0.0,
            ..Default::default()
        }
        .into(),
    )
    .expect("valid");
    let mut st = vec![
        store(&[0.0], &[1e200]),
        store(&[0.0, 0.0], &[1e-110, 3e-111]),
    ];
    let mut gs = groups(&mut st, sgd());
    let guard = sam.first_step(&mut gs).expect("first step");
    let e = guard.groups()[1].buffer.weights();
    let k = 1e10 / 1e200; // ρ/‖g‖ (the small elements do not change ‖g‖ in f64)
    assert_eq!(e[0], 1e-110 * k, "perturbation {e:?}");
    assert_eq!(e[1], 3e-111 * k, "perturbation {e:?}");
}

#[test]
fn a_perturbation_below_half_an_ulp_of_the_weight_rounds_to_nothing_as_documented() {
    // f32 storage: e = 1e-10 next to w = 1 (ulp 1.2e-7) is lost when added; nothing else
    // happens (no error, the step proceeds on the second gradient).
    let mut w = [1.0_f32];
    let mut g = [0.5_f32];
    let mut slots = [0.0_f32; 2];
    let base = BaseRule::sgd(SgdConfig {
        lr: 0.1,
        ..Default::default()
    })
    .expect("valid");
    let mut gs = [Group::new(
        SliceBuffer::new(&mut w, &mut g, &mut slots).expect("equal lengths"),
        base,
    )];
    let mut sam = Sam::new(Perturbation::sam(1e-10).into()).expect("valid");
    let guard = sam.first_step(&mut gs).expect("first step");
    assert_eq!(
        guard.groups()[0].buffer.weights()[0].to_bits(),
        1.0_f32.to_bits()
    );
}

// ---------------------------------------------------------------------------------------------
// Backends that fail

/// The reference backend, failing one pass on request (after validating, like a real failure:
/// the failed pass leaves its buffer unchanged).
#[derive(Debug)]
struct Flaky<'a> {
    inner: SliceBuffer<'a, f64>,
    fail_perturb: bool,
    fail_update: bool,
    fail_reduce_after: Option<usize>,
}

impl ParamBuffer for Flaky<'_> {
    type Scalar = f64;
    type Error = SliceError;

    fn len(&self) -> usize {
        self.inner.len()
    }
    fn prepare(&mut self, spec: &SlotSpec) -> Result<(), SliceError> {
        self.inner.prepare(spec)
    }
    fn reduce(&mut self, spec: &ReduceSpec) -> Result<Reduction, SliceError> {
        match &mut self.fail_reduce_after {
            Some(0) => Err(SliceError::MissingSlot),
            Some(n) => {
                *n -= 1;
                self.inner.reduce(spec)
            }
            None => self.inner.reduce(spec),
        }
    }
    fn perturb(&mut self, spec: &PerturbSpec) -> Result<(), SliceError> {
        if self.fail_perturb {
            return Err(SliceError::MissingSlot);
        }
        self.inner.perturb(spec)
    }
    fn restore(&mut self) -> Result<(), SliceError> {
        self.inner.restore()
    }
    fn update(&mut self, spec: &UpdateSpec) -> Result<(), SliceError> {
        if self.fail_update {
            return Err(SliceError::MissingSlot);
        }
        self.inner.update(spec)
    }
    fn fold_averages(&mut self, fold: &AverageFold) -> Result<(), SliceError> {
        self.inner.fold_averages(fold)
    }
    fn swap_average(&mut self, k: u8) -> Result<(), SliceError> {
        self.inner.swap_average(k)
    }
}

fn flaky(stores: &mut [Store]) -> Vec<Group<Flaky<'_>>> {
    stores
        .iter_mut()
        .map(|s| {
            Group::new(
                Flaky {
                    inner: SliceBuffer::new(&mut s.w, &mut s.g, &mut s.s).expect("equal lengths"),
                    fail_perturb: false,
                    fail_update: false,
                    fail_reduce_after: None,
                },
                sgd(),
            )
        })
        .collect()
}

#[test]
fn a_failing_backend_pass_leaves_no_group_perturbed() {
    let mut st = vec![store(&W, &G), store(&W, &G), store(&W, &G)];
    // perturb fails on group 1: group 0 is restored, group 1 was left unchanged by its pass.
    {
        let mut gs = flaky(&mut st);
        gs[1].buffer.fail_perturb = true;
        let mut sam = Sam::new(SamConfig::default()).expect("valid");
        assert!(matches!(
            sam.first_step(&mut gs).map(drop),
            Err(Error::Backend(_))
        ));
        assert_eq!(sam.phase(), Phase::Idle);
        for g in &gs {
            assert_eq!(bits(g.buffer.inner.weights()), bits(&W));
        }
    }
    // update fails on group 1: group 0 is stepped (its state moved on with it), groups 1.. are
    // restored.
    {
        let mut gs = flaky(&mut st);
        gs[1].buffer.fail_update = true;
        let mut sam = Sam::new(SamConfig::default()).expect("valid");
        let r = sam.first_step(&mut gs).expect("first").second_step();
        assert!(matches!(r, Err(Error::Backend(_))));
        assert_eq!((sam.phase(), sam.steps()), (Phase::Idle, 0));
        assert_ne!(bits(gs[0].buffer.inner.weights()), bits(&W), "stepped");
        for g in &gs[1..] {
            assert_eq!(bits(g.buffer.inner.weights()), bits(&W), "restored");
        }
    }
    // A reduce pass of the second half fails (GSAM's norms): every group is restored.
    let mut st = vec![store(&W, &G), store(&W, &G)];
    {
        let mut gs = flaky(&mut st);
        // First half: the norms take one reduce pass per group; the second half fails.
        gs[1].buffer.fail_reduce_after = Some(1);
        let mut gsam = Gsam::new(GsamConfig::new(constant_rho())).expect("valid");
        let r = gsam.first_step(&mut gs).expect("first").second_step();
        assert!(matches!(r, Err(Error::Backend(_))), "{r:?}");
        assert_eq!(gsam.phase(), Phase::Idle);
        for g in &gs {
            assert_eq!(bits(g.buffer.inner.weights()), bits(&W), "restored");
        }
    }
}

#[test]
fn the_reference_backend_refuses_unsupported_slots_and_fails_a_fold_without_writing() {
    let (mut w, mut g, mut s) = (W.to_vec(), G.to_vec(), vec![0.0; 64]);
    let mut b = SliceBuffer::new(&mut w, &mut g, &mut s).expect("equal lengths");
    for spec in [
        SlotSpec {
            state: 4,
            ..Default::default()
        },
        SlotSpec {
            averages: MAX_AVERAGES as u8 + 1,
            ..Default::default()
        },
    ] {
        assert_eq!(b.prepare(&spec), Err(SliceError::UnsupportedSlots));
    }
    // Averages 0 and 1 prepared, a fold into 0 and 2: refused before average 0 is written.
    b.prepare(&SlotSpec {
        averages: 2,
        ..Default::default()
    })
    .expect("fits");
    let mut fold = AverageFold::NONE;
    fold.weights[0] = Some(0.5);
    fold.weights[2] = Some(0.5);
    assert_eq!(b.fold_averages(&fold), Err(SliceError::MissingSlot));
    assert_eq!(b.slot(Slot::Average(0)), Some(&[0.0; 4][..]));
}

// ---------------------------------------------------------------------------------------------
// Past findings: the promised behaviour, now delivered.

#[test]
fn gsam_dot_product_at_a_subnormal_product_of_scales() {
    // ‖g₂‖ = 1.97·2^1023 ≈ 1.77e308 and max|g₂| ≥ 2^1023, so s_g = 2^-1024; max|g₁| = 0.49 is in
    // [¼, ½), so s_s = 2: their product 2^-1023 is subnormal. The interim fix of GsamDotOverflow
    // divided the dot product by the two scales in turn there and overflowed in between
    // (GsamDotSubnormalScale); the cosine is now taken at the reduction's scales. ‖g₁‖·‖g₂‖ and
    // ⟨g₁,g₂⟩ = 1.32·2^1023 are finite: the step is due.
    let mut gsam = Gsam::new(GsamConfig::new(constant_rho())).expect("valid");
    let mut st = vec![store(&[0.0; 2], &[0.49; 2])];
    let mut gs = groups(&mut st, sgd());
    let mut guard = gsam.first_step(&mut gs).expect("first");
    let big = 2f64.powi(1023);
    guard.groups_mut()[0]
        .buffer
        .grad_mut()
        .copy_from_slice(&[big, big * 1.7]);
    assert_eq!(guard.second_step(), Ok(StepStatus::Applied));
}

// ---------------------------------------------------------------------------------------------
// Open findings: the promised behaviour, ignored until sam-core delivers it.

#[test]
fn gsam_cosine_with_eps_times_scales_in_range() {
    // g₁ = [1e308, 0] (s₁ = 2^-1024), g₂ = [1e-300, 1e-300] (s₂ = 2^997), ε = 1e9: ε·s₂
    // overflows, but ε·s₂·s₁ = 7.45 is finite, and cos = ⟨g₁,g₂⟩/(‖g₂‖‖g₁‖ + ε) = 0.0876, so
    // a = 1 + α·cos·‖g₁‖/(‖g₂‖ + ε) = 3.5e297 and the second weight (g₁ = 0 there) moves by
    // −lr·a·g₂ = −3.5e-4. The core takes cos = 0 (a = 1) and moves it by −1e-301.
    let mut gsam = Gsam::new(GsamConfig {
        perturbation: Perturbation {
            eps: 1e9,
            ..Default::default()
        },
        ..GsamConfig::new(constant_rho())
    })
    .expect("valid");
    let mut st = vec![store(&[0.0; 2], &[1e308, 0.0])];
    let mut gs = groups(
        &mut st,
        BaseRule::sgd(SgdConfig {
            lr: 0.1,
            ..Default::default()
        })
        .expect("valid"),
    );
    let mut guard = gsam.first_step(&mut gs).expect("first");
    guard.groups_mut()[0]
        .buffer
        .grad_mut()
        .copy_from_slice(&[1e-300; 2]);
    assert_eq!(guard.second_step(), Ok(StepStatus::Applied));
    let (n1, n2) = (1e308, 2f64.sqrt() * 1e-300);
    let cos = (1e308 * 1e-300) / (n1 * n2 + 1e9);
    let a = 1.0 + 0.4 * cos * n1 / (n2 + 1e9);
    let want = -0.1 * (a * 1e-300);
    let got = gs[0].buffer.weights()[1];
    assert!(
        (got - want).abs() <= 1e-9 * want.abs(),
        "{got:e}, want {want:e}"
    );
}
