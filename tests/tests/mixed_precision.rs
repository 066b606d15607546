//! Mixed precision: 16-bit storage, the layouts with `f32` master weights, and loss scaling.
//!
//! - a loss scale `S = 2^k` changes nothing: a run that stores `S·ĝ` and declares `S` (backing
//!   off on overflow, as `torch.amp.GradScaler` does) takes, step for step, the bits of the run
//!   that stores `ĝ` with no scale; a step that overflowed leaves every buffer as it was;
//! - a perturbation undone (the guard dropped) restores master weights and the model copy bit
//!   for bit, in every layout;
//! - ρ = 0 is the base optimizer in the master-weight layout;
//! - 16-bit gradients holding values exactly representable in 16 bits give the trajectory of
//!   `f32` gradients holding the same values;
//! - sam-ndarray equals the reference backend bit for bit in `bf16` and `f16` storage;
//! - [`LossScaler`] replays the trajectories of torch's `GradScaler` (`tests/data/grad_scaler.py`).

use half::{bf16, f16};
use proptest::prelude::*;
use sam_core::backend::{ParamBuffer, Real};
use sam_core::reference::{SliceBuffer, SliceError};
use sam_core::{
    AdamConfig, BaseOptimizer, BaseRule, Error, Group, GroupOptions, LossScaler, LossScalerConfig,
    LossScalerState, Optimizer, Perturbation, Phase, Sam, SamConfig, SamOptimizer, SgdConfig,
    SkipReason, StepStatus,
};
use sam_tests::variants::{ALL_NAMES, MapOptions, NAMES};
use sam_tests::{Bits, MasterStore, SplitMix, assert_nd_runs_as_reference_in, with_variant};

type StepError = Error<SliceError>;

fn groups<'a, G: Bits>(
    stores: &'a mut [MasterStore<G>],
    opts: &[GroupOptions],
) -> Vec<Group<SliceBuffer<'a, f32, G>>> {
    stores
        .iter_mut()
        .zip(opts)
        .map(|(s, o)| Group::with_options(s.buffer(), *o))
        .collect()
}

/// The bits of the weights, the model copy and the slots (all of them, or without the scratch
/// slots, backup and stash, which a climb writes before its second gradient is checked). A
/// slot not yet prepared reads as the zeros its memory holds.
fn bits_of<G: Bits>(gs: &[Group<SliceBuffer<'_, f32, G>>], scratch: bool) -> Vec<u64> {
    use sam_core::backend::Slot;
    let mut v = vec![];
    for g in gs {
        let b = &g.buffer;
        v.extend(b.weights().iter().map(|x| x.bits()));
        v.extend(b.model().into_iter().flatten().map(|x| x.bits()));
        for slot in Slot::ALL {
            if !scratch && matches!(slot, Slot::Backup | Slot::Stash) {
                continue;
            }
            match b.slot(slot) {
                Some(s) => v.extend(s.iter().map(|x| x.bits())),
                None => v.extend(std::iter::repeat_n(0, b.len())),
            }
        }
    }
    v
}

/// Everything: weights, model copy, every slot.
fn state_bits<G: Bits>(gs: &[Group<SliceBuffer<'_, f32, G>>]) -> Vec<u64> {
    bits_of(gs, true)
}

/// What a step carries to the next: weights, model copy, base state, averages.
fn persistent_bits<G: Bits>(gs: &[Group<SliceBuffer<'_, f32, G>>]) -> Vec<u64> {
    bits_of(gs, false)
}

/// The model copy is the rounding of the master weights.
fn assert_model_tracks_master<G: Bits>(gs: &[Group<SliceBuffer<'_, f32, G>>]) {
    for g in gs {
        if let Some(m) = g.buffer.model() {
            for (m, w) in m.iter().zip(g.buffer.weights()) {
                assert_eq!(m.bits(), G::from_f64(f64::from(*w)).bits());
            }
        }
    }
}

/// A smooth, non-quadratic loss whose gradient depends on the element and the weight only:
/// `∂L/∂w_i = c_i·(w_i − t_i) + w_i³/20`.
fn grad_at(i: usize, w: f64) -> f64 {
    let c = 0.5 + (i % 7) as f64 * 0.5;
    let t = ((i * 5) % 9) as f64 * 0.5 - 2.0;
    c * (w - t) + w * w * w / 20.0
}

/// Writes `G(S·ĝ)` with `ĝ = G(∇L)` (so a power-of-two `S` scales exactly, or overflows).
fn write_scaled<G: Bits>(gs: &mut [Group<SliceBuffer<'_, f32, G>>], scale: f64) {
    for g in gs.iter_mut() {
        let (w, grad) = g.buffer.weights_and_grad();
        for (i, (gi, wi)) in grad.iter_mut().zip(w).enumerate() {
            let g_hat = G::from_f64(grad_at(i, f64::from(*wi))).to_f64();
            *gi = G::from_f64(scale * g_hat);
        }
    }
}

fn stores<G: Bits>(model_copy: bool) -> Vec<MasterStore<G>> {
    let mut rng = SplitMix(17);
    [13usize, 6]
        .iter()
        .map(|&n| {
            let w = (0..n).map(|_| rng.signed() as f32).collect();
            MasterStore::new(w, model_copy)
        })
        .collect()
}

fn options(map: MapOptions) -> Vec<GroupOptions> {
    let sgd = BaseRule::sgd(SgdConfig {
        lr: 0.02,
        momentum: 0.9,
        ..Default::default()
    })
    .unwrap();
    let adam = BaseRule::adam(AdamConfig {
        lr: 0.01,
        ..Default::default()
    })
    .unwrap();
    vec![map(GroupOptions::new(sgd)), map(GroupOptions::new(adam))]
}

/// Runs `opt` for `steps` applied steps twice: with gradients `ĝ` and no scale, and with
/// gradients `S·ĝ` under a dynamic loss scale starting at `init_scale` (backing off on each
/// overflow). After every applied step both runs hold the same bits; every skipped step left
/// the buffers of the scaled run as they were. Returns the number of skipped steps.
fn scaled_run_equals_unscaled<G: Bits, O: Optimizer + Clone>(
    opt: &O,
    map: MapOptions,
    model_copy: bool,
    init_scale: f64,
    growth_interval: u32,
    steps: usize,
) -> usize {
    let opts = options(map);
    let (mut sa, mut sb) = (stores::<G>(model_copy), stores::<G>(model_copy));
    let mut a = groups(&mut sa, &opts);
    let mut b = groups(&mut sb, &opts);
    let (mut oa, mut ob) = (opt.clone(), opt.clone());
    let mut scaler = LossScaler::new(LossScalerConfig {
        init_scale,
        growth_interval,
        ..Default::default()
    })
    .unwrap();
    let (mut applied, mut skipped) = (0, 0);
    while applied < steps {
        let scale = scaler.scale();
        ob.set_grad_scale(scale).unwrap();
        let (before, kept) = (state_bits(&b), persistent_bits(&b));
        let rb = ob
            .step(&mut b, |gs| {
                write_scaled(gs, scale);
                Ok::<_, StepError>(())
            })
            .unwrap();
        scaler.update(rb.status.is_skipped());
        if rb.status.is_skipped() {
            // An overflow in the clean gradient is found before any write; one in the second
            // gradient after the climb wrote its scratch slots.
            if rb.status == StepStatus::Skipped(SkipReason::NonFiniteClean) {
                assert_eq!(state_bits(&b), before, "a skipped step changed a buffer");
            } else {
                assert_eq!(persistent_bits(&b), kept, "a skipped step changed a buffer");
            }
            assert_eq!(ob.phase(), Phase::Idle);
            skipped += 1;
            assert!(skipped < 100, "the scale never came down");
            continue;
        }
        let ra = oa
            .step(&mut a, |gs| {
                write_scaled(gs, 1.0);
                Ok::<_, StepError>(())
            })
            .unwrap();
        assert_eq!(ra.status, StepStatus::Applied);
        assert_eq!(
            state_bits(&a),
            state_bits(&b),
            "step {applied} at scale {scale}"
        );
        assert_model_tracks_master(&b);
        assert_eq!(oa.steps(), ob.steps());
        applied += 1;
    }
    skipped
}

/// Invariant 5 under loss scaling, in f16: `S` from 2^24 down by backoff (overflowing the f16
/// gradient storage first), then growing every 3 clean steps until it overflows again.
#[test]
fn f16_loss_scaling_matches_the_unscaled_run() {
    for (name, map) in ALL_NAMES {
        for model_copy in [false, true] {
            let skipped = with_variant!(name, |opt| {
                scaled_run_equals_unscaled::<f16, _>(&opt, map, model_copy, 2f64.powi(24), 3, 14)
            });
            // 2^24 needs several backoffs before the f16 gradients fit; growth overflows again.
            assert!(skipped >= 5, "{name}: only {skipped} overflows");
        }
    }
    let skipped = scaled_run_equals_unscaled::<f16, _>(
        &BaseOptimizer::new(),
        sam_tests::variants::keep,
        true,
        65536.0,
        2,
        10,
    );
    assert!(skipped > 0);
}

/// The same with bf16 and f32 gradients, whose range holds `2^24·ĝ`: no step overflows.
#[test]
fn bf16_and_f32_loss_scaling_is_exact() {
    for (name, map) in ALL_NAMES {
        let s = with_variant!(name, |opt| {
            scaled_run_equals_unscaled::<bf16, _>(&opt, map, true, 2f64.powi(24), 4, 10)
                + scaled_run_equals_unscaled::<f32, _>(&opt, map, false, 2f64.powi(24), 4, 10)
        });
        assert_eq!(s, 0, "{name}");
    }
}

/// A perturbation undone restores the master weights and the model copy bit for bit; a
/// second gradient that overflowed skips the step with every buffer as it was.
fn restore_is_exact<G: Bits, O: SamOptimizer + Clone>(opt: &O, map: MapOptions, scale: f64) {
    let opts = options(map);
    let mut s = stores::<G>(true);
    let mut gs = groups(&mut s, &opts);
    let mut opt = opt.clone();
    opt.set_grad_scale(scale).unwrap();
    for _ in 0..3 {
        opt.step(&mut gs, |gs| {
            write_scaled(gs, scale);
            Ok::<_, StepError>(())
        })
        .unwrap();
    }
    write_scaled(&mut gs, scale);
    let before = persistent_bits(&gs);
    let guard = opt.first_step(&mut gs).unwrap();
    drop(guard);
    assert_eq!(persistent_bits(&gs), before, "dropping the guard");
    let mut calls = 0;
    let r = opt
        .step(&mut gs, |gs| {
            calls += 1;
            write_scaled(gs, scale);
            if calls == 2 {
                gs[1].buffer.grad_mut()[2] = G::from_f64(f64::INFINITY);
            }
            Ok::<_, StepError>(())
        })
        .unwrap();
    assert_eq!(r.status, StepStatus::Skipped(SkipReason::NonFiniteSecond));
    assert_eq!(
        persistent_bits(&gs),
        before,
        "overflow in the second gradient"
    );
    // An overflow in the clean gradient writes nothing at all.
    write_scaled(&mut gs, scale);
    gs[0].buffer.grad_mut()[0] = G::from_f64(f64::NEG_INFINITY);
    let all = state_bits(&gs);
    assert!(matches!(
        opt.first_step(&mut gs),
        Err(Error::NonFiniteGradient)
    ));
    assert_eq!(state_bits(&gs), all);
}

#[test]
fn restore_and_skip_are_exact_in_the_master_weight_layout() {
    for (name, map) in NAMES {
        with_variant!(name, |opt| {
            restore_is_exact::<bf16, _>(&opt, map, 1.0);
            restore_is_exact::<f16, _>(&opt, map, 1024.0);
            restore_is_exact::<f32, _>(&opt, map, 2f64.powi(20));
        });
    }
}

/// The same in pure 16-bit storage (weights, gradient and slots in `T`).
fn restore_is_exact_pure<T: Bits>() {
    let n = 11;
    let mut w: Vec<T> = (0..n).map(|i| T::from_f64(0.3 * i as f64 - 1.0)).collect();
    let mut g: Vec<T> = (0..n).map(|i| T::from_f64(grad_at(i, 0.1))).collect();
    let mut slots = vec![T::default(); 9 * n];
    let sgd = BaseRule::sgd(SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..Default::default()
    })
    .unwrap();
    let w0: Vec<u64> = w.iter().map(|x| x.bits()).collect();
    let mut gs = [Group::new(
        SliceBuffer::new(&mut w, &mut g, &mut slots).unwrap(),
        sgd,
    )];
    let mut asam = Sam::new(Perturbation::asam(0.5, 0.01).into()).unwrap();
    drop(asam.first_step(&mut gs).unwrap());
    let w1: Vec<u64> = gs[0].buffer.weights().iter().map(|x| x.bits()).collect();
    assert_eq!(w1, w0);
}

#[test]
fn restore_is_exact_in_pure_16_bit_storage() {
    restore_is_exact_pure::<bf16>();
    restore_is_exact_pure::<f16>();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Invariant 3 in the master-weight layout: SAM with ρ = 0 is the base optimizer, bit for
    /// bit, master weights, model copy and base state.
    #[test]
    fn rho_zero_is_the_base_optimizer_with_master_weights(
        w in prop::collection::vec(-2.0f32..2.0, 1..24),
        adam in any::<bool>(),
        adaptive in any::<bool>(),
        steps in 1usize..6,
    ) {
        let base = if adam {
            BaseRule::adam(AdamConfig { lr: 0.01, ..Default::default() }).unwrap()
        } else {
            BaseRule::sgd(SgdConfig { lr: 0.05, momentum: 0.9, ..Default::default() }).unwrap()
        };
        let opts = [GroupOptions::new(base).with_adaptive(adaptive)];
        let mut sa = vec![MasterStore::<bf16>::new(w.clone(), true)];
        let mut sb = sa.clone();
        let mut a = groups(&mut sa, &opts);
        let mut b = groups(&mut sb, &opts);
        let mut sam = Sam::new(Perturbation::sam(0.0).into()).unwrap();
        let mut base_opt = BaseOptimizer::new();
        for _ in 0..steps {
            sam.step(&mut a, |gs| { write_scaled(gs, 1.0); Ok::<_, StepError>(()) }).unwrap();
            base_opt.step(&mut b, |gs| { write_scaled(gs, 1.0); Ok::<_, StepError>(()) }).unwrap();
            // The base optimizer has no backup slot: weights, model copy and base state.
            prop_assert_eq!(persistent_bits(&a), persistent_bits(&b));
        }
    }
}

/// 16-bit gradients whose values are exactly representable give the trajectory of `f32`
/// gradients with the same values (the gradient's storage type changes nothing else).
fn representable_values_follow_f32<G: Bits, O: Optimizer + Clone>(opt: &O, map: MapOptions) {
    let opts = options(map);
    let mut s16 = stores::<G>(true);
    let mut s32 = stores::<f32>(false);
    let mut a = groups(&mut s16, &opts);
    let mut b = groups(&mut s32, &opts);
    let (mut oa, mut ob) = (opt.clone(), opt.clone());
    for step in 0..10 {
        oa.step(&mut a, |gs| {
            write_scaled(gs, 1.0);
            Ok::<_, StepError>(())
        })
        .unwrap();
        ob.step(&mut b, |gs| {
            for g in gs.iter_mut() {
                let (w, grad) = g.buffer.weights_and_grad();
                for (i, (gi, wi)) in grad.iter_mut().zip(w).enumerate() {
                    // The 16-bit value, held in f32 (exact).
                    *gi = G::from_f64(grad_at(i, f64::from(*wi))).to_f64() as f32;
                }
            }
            Ok::<_, StepError>(())
        })
        .unwrap();
        for (x, y) in a.iter().zip(&b) {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(x.buffer.weights()),
                bits(y.buffer.weights()),
                "step {step}"
            );
            for slot in sam_core::backend::Slot::ALL {
                assert_eq!(
                    x.buffer.slot(slot).map(bits),
                    y.buffer.slot(slot).map(bits),
                    "step {step}, {slot:?}"
                );
            }
        }
        assert_model_tracks_master(&a);
    }
}

#[test]
fn representable_16_bit_gradients_give_the_f32_trajectory() {
    for (name, map) in ALL_NAMES {
        with_variant!(name, |opt| {
            representable_values_follow_f32::<bf16, _>(&opt, map);
            representable_values_follow_f32::<f16, _>(&opt, map);
        });
    }
}

#[test]
fn ndarray_equals_reference_in_16_bit_storage() {
    for (name, map) in ALL_NAMES {
        with_variant!(name, |opt| {
            assert_nd_runs_as_reference_in::<bf16, _>(&opt, map, 6);
            assert_nd_runs_as_reference_in::<f16, _>(&opt, map, 6);
        });
    }
}

#[test]
fn grad_scale_is_validated_and_only_set_between_steps() {
    let mut sam = Sam::new(SamConfig::default()).unwrap();
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-320, 1e308 * 10.0] {
        assert!(matches!(
            sam.set_grad_scale(bad),
            Err(Error::InvalidHyperparameter {
                name: "grad_scale",
                ..
            })
        ));
        assert_eq!(sam.grad_scale(), 1.0);
    }
    let mut s = stores::<bf16>(true);
    let opts = options(sam_tests::variants::keep);
    let mut gs = groups(&mut s, &opts);
    write_scaled(&mut gs, 1.0);
    let guard = sam.first_step(&mut gs).unwrap();
    drop(guard);
    sam.set_grad_scale(8.0).unwrap();
    assert_eq!(sam.grad_scale(), 8.0);
    // A leaked guard leaves the optimizer perturbed: no new scale until it recovers.
    std::mem::forget(sam.first_step(&mut gs).unwrap());
    assert!(matches!(
        sam.set_grad_scale(2.0),
        Err(Error::WrongPhase { .. })
    ));
    assert_eq!(sam.grad_scale(), 8.0);
    sam.recover(&mut gs).unwrap();
    sam.set_grad_scale(2.0).unwrap();
}

#[test]
fn loss_scaler_config_and_state_are_validated() {
    let bad = [
        LossScalerConfig {
            init_scale: 0.0,
            ..Default::default()
        },
        LossScalerConfig {
            init_scale: 1e39, // infinite in f32
            ..Default::default()
        },
        LossScalerConfig {
            growth_factor: 1.0,
            ..Default::default()
        },
        LossScalerConfig {
            backoff_factor: 1.0,
            ..Default::default()
        },
        LossScalerConfig {
            backoff_factor: 0.0,
            ..Default::default()
        },
        LossScalerConfig {
            growth_interval: 0,
            ..Default::default()
        },
    ];
    for c in bad {
        assert!(LossScaler::new(c).is_err(), "{c:?}");
    }
    let mut s = LossScaler::new(LossScalerConfig::default()).unwrap();
    let before = s;
    for state in [
        LossScalerState {
            scale: f32::NAN,
            growth_tracker: 0,
        },
        LossScalerState {
            scale: -1.0,
            growth_tracker: 0,
        },
        LossScalerState {
            scale: 1.0,
            growth_tracker: 2000,
        },
    ] {
        assert!(s.load_state(state).is_err());
        assert_eq!(s, before);
    }
    let ok = LossScalerState {
        scale: 0.0,
        growth_tracker: 1999,
    };
    s.load_state(ok).unwrap();
    assert_eq!(s.state(), ok);
}

/// Replays `tests/data/grad_scaler.json`, written by torch's `GradScaler` (see
/// `tests/data/grad_scaler.py`): the scale's bits and the growth tracker after every update.
#[test]
fn loss_scaler_replays_torch_grad_scaler() {
    let text = include_str!("../data/grad_scaler.json");
    let data: serde_json::Value = serde_json::from_str(text).unwrap();
    let cases = data["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let c = &case["config"];
        let d = LossScalerConfig::default();
        let mut scaler = LossScaler::new(LossScalerConfig {
            init_scale: c["init_scale"].as_f64().unwrap_or(d.init_scale),
            growth_factor: c["growth_factor"].as_f64().unwrap_or(d.growth_factor),
            backoff_factor: c["backoff_factor"].as_f64().unwrap_or(d.backoff_factor),
            growth_interval: c["growth_interval"]
                .as_u64()
                .map_or(d.growth_interval, |v| v as u32),
        })
        .unwrap();
        let found = case["found_inf"].as_array().unwrap();
        let bits = case["scale_bits"].as_array().unwrap();
        let tracker = case["growth_tracker"].as_array().unwrap();
        assert!(!found.is_empty());
        for (t, ((f, b), k)) in found.iter().zip(bits).zip(tracker).enumerate() {
            scaler.update(f.as_bool().unwrap());
            let s = scaler.state();
            assert_eq!(
                u64::from(s.scale.to_bits()),
                b.as_u64().unwrap(),
                "{name}: scale after update {t}"
            );
            assert_eq!(
                u64::from(s.growth_tracker),
                k.as_u64().unwrap(),
                "{name}: tracker after update {t}"
            );
            assert_eq!(scaler.scale(), f64::from(s.scale));
        }
    }
}

/// The rounding of the master weights is the model copy from the start, whatever the model
/// held; a wrong length is refused.
#[test]
fn model_copy_is_set_from_the_master_and_checked() {
    let mut master = vec![0.1f32, 1e-3, 65520.0];
    let mut grad = vec![f16::ZERO; 3];
    let mut slots = vec![0.0f32; 3];
    let mut model = vec![f16::from_f32(7.0); 3];
    let b = SliceBuffer::mixed(&mut master, &mut grad, &mut slots)
        .unwrap()
        .with_model_copy(&mut model)
        .unwrap();
    assert_eq!(b.len(), 3);
    let m = b.model().unwrap();
    assert_eq!(
        m[0].bits(),
        <f16 as Real>::from_f64(f64::from(0.1f32)).bits()
    );
    assert!(m[2].is_infinite(), "65520 rounds to ∞ in f16");
    let mut short = vec![f16::ZERO; 2];
    let mut master = vec![0.1f32; 3];
    let e = SliceBuffer::mixed(&mut master, &mut grad, &mut slots)
        .unwrap()
        .with_model_copy(&mut short)
        .unwrap_err();
    assert_eq!(
        e,
        SliceError::ModelLengthMismatch {
            weights: 3,
            model: 2
        }
    );
    let mut grad = vec![f16::ZERO; 2];
    assert!(SliceBuffer::mixed(&mut master, &mut grad, &mut slots).is_err());
}
