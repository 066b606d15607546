//! Property tests of the invariants in docs/design.md §6 (1–6) on the reference backend, in f32 and
//! f64, for random shapes, groups, magnitudes (zeros, subnormals, 1e±30) and hyperparameters.

mod common;

use common::*;
use proptest::prelude::*;
use sam_core::backend::{Real, Slot};
use sam_core::{
    AdamConfig, BaseOptimizer, BaseRule, Error, GroupOptions, Phase, Sam, SamConfig, SgdConfig,
    SkipReason, StepStatus, reference::SliceError,
};
use sam_core::{Optimizer as _, SamOptimizer as _};

fn cfg() -> ProptestConfig {
    ProptestConfig {
        cases: 96,
        ..ProptestConfig::default()
    }
}

fn sgd(lr: f64) -> BaseRule {
    BaseRule::sgd(SgdConfig {
        lr,
        momentum: 0.9,
        ..Default::default()
    })
    .unwrap()
}

/// Every base rule with random hyperparameters (and a chosen lr).
fn base_rule(lr: f64) -> impl Strategy<Value = BaseRule> {
    prop_oneof![
        (0.0f64..0.99, 0.0f64..0.5, 0.0f64..0.1, any::<bool>()).prop_map(
            move |(m, d, wd, nest)| {
                let nesterov = nest && m > 0.0;
                let dampening = if nesterov { 0.0 } else { d };
                BaseRule::sgd(SgdConfig {
                    lr,
                    momentum: m,
                    dampening,
                    weight_decay: wd,
                    nesterov,
                })
                .unwrap()
            }
        ),
        (
            0.0f64..0.99,
            0.9f64..0.9999,
            0.0f64..0.1,
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(move |(b1, b2, wd, ams, decoupled)| {
                let c = AdamConfig {
                    lr,
                    beta1: b1,
                    beta2: b2,
                    eps: 1e-8,
                    weight_decay: wd,
                    amsgrad: ams,
                };
                if decoupled {
                    BaseRule::adamw(c).unwrap()
                } else {
                    BaseRule::adam(c).unwrap()
                }
            }),
    ]
}

fn f64s<T: Real>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// Invariant 1 (single group): ‖e‖ = ρ‖T⊙g‖/(‖T⊙g‖+ε), measured on `w_perturbed − w`, with an
/// allowance for the rounding of `w + e` (half an ulp of the result per element) and of the
/// subtraction. Dividing by T gives the ASAM form. Also checks invariant 2's exact restore.
fn check_norm<T: TestReal>(
    w: Vec<T>,
    g: Vec<T>,
    rho: f64,
    eps: f64,
    adaptive: Option<f64>,
) -> Result<(), TestCaseError> {
    let mut stores = vec![Store::new(w.clone(), g.clone())];
    let opts = [GroupOptions::new(sgd(0.1))];
    let mut gs = groups(&mut stores, &opts);
    let mut sam = Sam::new(SamConfig {
        perturbation: sam_core::Perturbation {
            rho,
            eps,
            adaptive: adaptive.is_some(),
            eta: adaptive.unwrap_or(0.0),
        },
        ..Default::default()
    })
    .unwrap();
    let guard = sam.first_step(&mut gs).unwrap();
    let wp = f64s(guard.groups()[0].buffer.weights());
    let w0 = f64s(&w);
    let t: Vec<f64> = w0
        .iter()
        .map(|x| adaptive.map_or(1.0, |eta| x.abs() + eta))
        .collect();
    let tg: Vec<f64> = g.iter().zip(&t).map(|(g, t)| g.to_f64() * t).collect();
    let n = norm(tg.iter().copied());
    let expected = if n > 0.0 { rho * (n / (n + eps)) } else { 0.0 };
    let scaled: Vec<f64> = wp
        .iter()
        .zip(&w0)
        .zip(&t)
        .map(|((p, w), t)| (p - w) / t)
        .collect();
    let measured = norm(scaled.iter().copied());
    let allowance = norm(
        wp.iter()
            .zip(&w0)
            .zip(&t)
            .map(|((p, w), t)| (T::ulp(*p) / 2.0 + <f64 as TestReal>::ulp(p - w) / 2.0) / t),
    );
    let bound = 1e-12 * expected + allowance;
    prop_assert!(
        (measured - expected).abs() <= bound,
        "measured {measured:e} expected {expected:e} bound {bound:e}"
    );
    drop(guard); // restores
    prop_assert_eq!(bits(&stores[0].w), bits(&w));
    prop_assert_eq!(sam.phase(), Phase::Idle);
    Ok(())
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn perturbation_has_norm_rho_f32(g in grad_vec::<f32>(0..40), rho in 0.0f64..2.0, eps in prop::sample::select(vec![0.0, 1e-12, 1e-3])) {
        let w = vec![0.0f32; g.len()];
        check_norm(w, g.clone(), rho, eps, None)?;
        let w: Vec<f32> = (0..g.len()).map(|i| (i as f32 * 0.37).sin()).collect();
        check_norm(w, g, rho, eps, None)?;
    }

    #[test]
    fn perturbation_has_norm_rho_f64(g in grad_vec::<f64>(0..40), rho in 0.0f64..2.0, eps in prop::sample::select(vec![0.0, 1e-12, 1e-3])) {
        let w = vec![0.0f64; g.len()];
        check_norm(w, g.clone(), rho, eps, None)?;
        let w: Vec<f64> = (0..g.len()).map(|i| (i as f64 * 0.37).sin()).collect();
        check_norm(w, g, rho, eps, None)?;
    }

    #[test]
    fn asam_scaled_perturbation_has_norm_rho(g32 in grad_vec::<f32>(1..30), g64 in grad_vec::<f64>(1..30), rho in 0.0f64..2.0, eta in prop::sample::select(vec![0.0, 0.01])) {
        let w32: Vec<f32> = (0..g32.len()).map(|i| if i % 2 == 0 { 0.5 + i as f32 * 0.1 } else { -1.5 }).collect();
        check_norm(w32, g32, rho, 1e-12, Some(eta))?;
        let w64: Vec<f64> = (0..g64.len()).map(|i| if i % 3 == 0 { -0.75 } else { 1.0 + i as f64 * 0.05 }).collect();
        check_norm(w64, g64, rho, 0.0, Some(eta))?;
    }

    /// Invariant 1, several groups: each group's ‖e_g/T_g‖ = ρ_g‖T_g⊙g_g‖/(n+ε) with one global n.
    #[test]
    fn mixed_groups_use_one_global_norm(
        spec in prop::collection::vec((grad_vec::<f64>(0..20), 0.0f64..1.0, any::<bool>()), 1..4),
    ) {
        let eps = 1e-12;
        let mut stores = Vec::new();
        let mut opts = Vec::new();
        let mut ts = Vec::new();
        for (gi, (g, rho, adaptive)) in spec.iter().enumerate() {
            let w: Vec<f64> = (0..g.len()).map(|i| 0.5 + ((i + gi) % 4) as f64 * 0.25).collect();
            ts.push(w.iter().map(|x| if *adaptive { x.abs() } else { 1.0 }).collect::<Vec<f64>>());
            stores.push(Store::new(w, g.clone()));
            opts.push(GroupOptions::new(sgd(0.1)).with_rho(*rho).unwrap().with_adaptive(*adaptive));
        }
        let originals: Vec<Vec<f64>> = stores.iter().map(|s| s.w.clone()).collect();
        let n = norm(spec.iter().zip(&ts).flat_map(|((g, _, _), t)| g.iter().zip(t.iter()).map(|(g, t)| g * t)).collect::<Vec<_>>().into_iter());
        let mut gs = groups(&mut stores, &opts);
        let mut sam = Sam::new(SamConfig { perturbation: sam_core::Perturbation { eps, ..Default::default() }, ..Default::default() }).unwrap();
        let guard = sam.first_step(&mut gs).unwrap();
        for (gi, ((g, rho, _), t)) in spec.iter().zip(&ts).enumerate() {
            let wp = guard.groups()[gi].buffer.weights();
            let w0 = &originals[gi];
            let measured = norm(wp.iter().zip(w0).zip(t).map(|((p, w), t)| (p - w) / t));
            let gn = norm(g.iter().zip(t).map(|(g, t)| g * t));
            let expected = if n > 0.0 { rho * (gn / (n + eps)) } else { 0.0 };
            let allowance = norm(wp.iter().zip(t).map(|(p, t)| <f64 as TestReal>::ulp(*p) / t));
            prop_assert!((measured - expected).abs() <= 1e-12 * expected + allowance, "group {gi}: {measured:e} vs {expected:e}");
        }
    }

    /// Invariant 2: a full step with lr = 0 is the identity on the weights, for every base rule,
    /// adaptive or not, f32 and f64.
    #[test]
    fn lr_zero_step_is_identity(base in base_rule(0.0), g1 in grad_vec::<f32>(1..30), adaptive in any::<bool>(), neg_zero in any::<bool>()) {
        let mut w: Vec<f32> = (0..g1.len()).map(|i| (i as f32 * 0.7).cos()).collect();
        if neg_zero { w[0] = -0.0; }
        let w64: Vec<f64> = w.iter().map(|x| f64::from(*x)).collect();
        let g64: Vec<f64> = g1.iter().map(|x| f64::from(*x)).collect();
        lr_zero::<f32>(base, w, g1, adaptive)?;
        lr_zero::<f64>(base, w64, g64, adaptive)?;
    }

    /// Invariant 3: SAM with ρ = 0 equals the base optimizer bit for bit, over several steps.
    #[test]
    fn rho_zero_is_the_base_optimizer(base in base_rule(0.05), a in prop::collection::vec(0.1f64..2.0, 1..25), adaptive in any::<bool>(), steps in 1usize..6) {
        rho_zero::<f32>(base, &a, adaptive, steps)?;
        rho_zero::<f64>(base, &a, adaptive, steps)?;
    }

    /// Invariant 4: splitting a group into several groups with the same hyperparameters changes
    /// the result only by the rounding of the norm's summation order.
    #[test]
    fn splitting_groups_keeps_the_result(a in prop::collection::vec(0.1f64..2.0, 2..40), cut in prop::collection::vec(0.0f64..1.0, 1..4), adaptive in any::<bool>()) {
        split::<f32>(&a, &cut, adaptive)?;
        split::<f64>(&a, &cut, adaptive)?;
    }

    /// Invariant 5: scaling the loss by c > 0 leaves the perturbation unchanged: bit for bit
    /// for powers of two with ε = 0, within rounding otherwise.
    #[test]
    fn loss_scale_leaves_perturbation(g in prop::collection::vec(prop_oneof![-1.0f64..1.0, (-1.0f64..1.0).prop_map(|x| x * 1e-30), (-1.0f64..1.0).prop_map(|x| x * 1e30)], 1..30), k in -8i32..9, c in 1e-3f64..1e3, adaptive in any::<bool>()) {
        scale::<f32>(&g, k, c, adaptive)?;
        scale::<f64>(&g, k, c, adaptive)?;
    }

    /// Invariant 6: a non-finite clean gradient is an error and nothing changes; a non-finite
    /// second gradient skips the step with weights and base state exactly as before.
    #[test]
    fn nonfinite_gradients_change_nothing(g in grad_vec::<f32>(1..30), at in any::<prop::sample::Index>(), bad in prop::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY]), base in base_rule(0.1), adaptive in any::<bool>()) {
        let w: Vec<f32> = (0..g.len()).map(|i| 0.25 * i as f32 - 1.0).collect();
        let i = at.index(g.len());
        let mut bad_g = g.clone();
        bad_g[i] = bad;
        // Clean gradient.
        let mut stores = vec![Store::new(w.clone(), bad_g.clone())];
        let before = stores.clone();
        let opts = [GroupOptions::new(base).with_adaptive(adaptive)];
        let mut gs = groups(&mut stores, &opts);
        let mut sam = Sam::new(SamConfig::default()).unwrap();
        let ok = matches!(sam.first_step(&mut gs), Err(Error::NonFiniteGradient));
        prop_assert!(ok);
        let r = sam.step(&mut gs, |gs| { gs[0].buffer.grad_mut().copy_from_slice(&bad_g); Ok::<_, Error<SliceError>>(()) }).unwrap();
        prop_assert_eq!(r.status, StepStatus::Skipped(SkipReason::NonFiniteClean));
        drop(gs);
        prop_assert_eq!(store_bits(&stores), store_bits(&before));
        // Second gradient: run one good step first so the base state is non-trivial.
        let mut stores = vec![Store::new(w.clone(), g.clone())];
        let mut gs = groups(&mut stores, &opts);
        let mut sam = Sam::new(SamConfig::default()).unwrap();
        sam.step(&mut gs, |gs| { gs[0].buffer.grad_mut().copy_from_slice(&g); Ok::<_, Error<SliceError>>(()) }).unwrap();
        let w_before = bits(gs[0].buffer.weights());
        let state_before: Vec<Vec<u64>> = (0..3).filter_map(|k| gs[0].buffer.slot(Slot::State(k)).map(bits)).collect();
        let mut calls = 0;
        let r = sam.step(&mut gs, |gs| {
            calls += 1;
            gs[0].buffer.grad_mut().copy_from_slice(if calls == 1 { &g } else { &bad_g });
            Ok::<_, Error<SliceError>>(())
        }).unwrap();
        prop_assert_eq!(r.status, StepStatus::Skipped(SkipReason::NonFiniteSecond));
        prop_assert_eq!(bits(gs[0].buffer.weights()), w_before);
        let state_after: Vec<Vec<u64>> = (0..3).filter_map(|k| gs[0].buffer.slot(Slot::State(k)).map(bits)).collect();
        prop_assert_eq!(state_after, state_before);
        prop_assert_eq!(sam.steps(), 1);
    }

    /// Invariant 6: configuration errors (slot memory too small in a later group, groups that
    /// change between steps) and phase misuse are errors that change nothing.
    #[test]
    fn errors_change_nothing(g in prop::collection::vec(-1.0f64..1.0, 2..20), base in base_rule(0.1)) {
        let w: Vec<f64> = g.iter().map(|x| x * 0.5 + 0.1).collect();
        let opts = [GroupOptions::new(base), GroupOptions::new(base)];
        // Too little slot memory in the second group.
        let mut stores = vec![Store::new(w.clone(), g.clone()), Store::new(w.clone(), g.clone())];
        stores[1].slots.truncate(1);
        let before = stores.clone();
        let mut gs = groups(&mut stores, &opts);
        let mut sam = Sam::new(SamConfig::default()).unwrap();
        let ok = matches!(sam.first_step(&mut gs), Err(Error::Backend(SliceError::SlotsTooSmall { .. })));
        prop_assert!(ok);
        drop(gs);
        prop_assert_eq!(&stores, &before);
        // Groups that change between steps.
        let mut stores = vec![Store::new(w.clone(), g.clone()), Store::new(w.clone(), g.clone())];
        let mut sam = Sam::new(SamConfig::default()).unwrap();
        {
            let mut gs = groups(&mut stores, &opts);
            sam.first_step(&mut gs).unwrap().second_step().unwrap();
        }
        let before = stores.clone();
        {
            let mut gs = groups(&mut stores[..1], &opts[..1]);
            let ok = matches!(sam.first_step(&mut gs), Err(Error::InvalidGroups { .. }));
        prop_assert!(ok);
        }
        prop_assert_eq!(&stores, &before);
        // A leaked guard: the optimizer refuses to step until recovered; recover restores.
        let mut gs = groups(&mut stores, &opts);
        std::mem::forget(sam.first_step(&mut gs).unwrap());
        prop_assert_eq!(sam.phase(), Phase::Perturbed);
        let perturbed: Vec<Vec<u64>> = gs.iter().map(|g| bits(g.buffer.weights())).collect();
        let ok = matches!(sam.first_step(&mut gs), Err(Error::WrongPhase { expected: Phase::Idle, found: Phase::Perturbed }));
        prop_assert!(ok);
        prop_assert!(sam.state().is_err());
        let still: Vec<Vec<u64>> = gs.iter().map(|g| bits(g.buffer.weights())).collect();
        prop_assert_eq!(still, perturbed);
        sam.recover(&mut gs).unwrap();
        prop_assert_eq!(sam.phase(), Phase::Idle);
        for (gr, s) in gs.iter().zip(&before) {
            prop_assert_eq!(bits(gr.buffer.weights()), bits(&s.w));
        }
    }
}

fn store_bits<T: Real>(s: &[Store<T>]) -> Vec<(Vec<u64>, Vec<u64>, Vec<u64>)> {
    s.iter()
        .map(|s| (bits(&s.w), bits(&s.g), bits(&s.slots)))
        .collect()
}

fn lr_zero<T: TestReal>(
    base: BaseRule,
    w: Vec<T>,
    g: Vec<T>,
    adaptive: bool,
) -> Result<(), TestCaseError> {
    let mut stores = vec![Store::new(w.clone(), g.clone())];
    let opts = [GroupOptions::new(base).with_adaptive(adaptive)];
    let mut gs = groups(&mut stores, &opts);
    let mut sam = Sam::new(SamConfig::from(sam_core::Perturbation::sam(0.3))).unwrap();
    for _ in 0..2 {
        let r = sam
            .step(&mut gs, |gs| {
                let (w, gr) = gs[0].buffer.weights_and_grad();
                for (gi, (wi, g0)) in gr.iter_mut().zip(w.iter().zip(&g)) {
                    *gi = T::from_f64(g0.to_f64() + 0.5 * wi.to_f64());
                }
                Ok::<_, Error<SliceError>>(())
            })
            .unwrap();
        prop_assert_eq!(r.status, StepStatus::Applied);
    }
    prop_assert_eq!(bits(gs[0].buffer.weights()), bits(&w));
    Ok(())
}

/// g(w) = a⊙w − 1, rounded to T.
fn quad_grad<T: Real>(a: &[f64], w: &[T], g: &mut [T]) {
    for ((gi, wi), ai) in g.iter_mut().zip(w).zip(a) {
        *gi = T::from_f64(ai * wi.to_f64() - 1.0);
    }
}

fn rho_zero<T: TestReal>(
    base: BaseRule,
    a: &[f64],
    adaptive: bool,
    steps: usize,
) -> Result<(), TestCaseError> {
    let w: Vec<T> = a.iter().map(|x| T::from_f64(x - 0.5)).collect();
    let zeros = vec![T::default(); a.len()];
    let opts_sam = [GroupOptions::new(base)
        .with_rho(0.0)
        .unwrap()
        .with_adaptive(adaptive)];
    let opts_base = [GroupOptions::new(base)];
    let mut s1 = vec![Store::new(w.clone(), zeros.clone())];
    let mut s2 = vec![Store::new(w, zeros)];
    let mut g1 = groups(&mut s1, &opts_sam);
    let mut g2 = groups(&mut s2, &opts_base);
    let mut sam = Sam::new(SamConfig::default()).unwrap();
    let mut plain = BaseOptimizer::new();
    for _ in 0..steps {
        sam.step(&mut g1, |gs| {
            let (w, g) = gs[0].buffer.weights_and_grad();
            quad_grad(a, w, g);
            Ok::<_, Error<SliceError>>(())
        })
        .unwrap();
        let (w, g) = g2[0].buffer.weights_and_grad();
        quad_grad(a, w, g);
        plain.apply(&mut g2).unwrap();
        prop_assert_eq!(bits(g1[0].buffer.weights()), bits(g2[0].buffer.weights()));
        for k in 0..3 {
            prop_assert_eq!(
                g1[0].buffer.slot(Slot::State(k)).map(bits),
                g2[0].buffer.slot(Slot::State(k)).map(bits)
            );
        }
    }
    Ok(())
}

fn split<T: TestReal>(a: &[f64], cuts: &[f64], adaptive: bool) -> Result<(), TestCaseError> {
    let n = a.len();
    let w: Vec<T> = a.iter().map(|x| T::from_f64(1.5 - x)).collect();
    let base = BaseRule::sgd(SgdConfig {
        lr: 0.1,
        momentum: 0.5,
        ..Default::default()
    })
    .unwrap();
    let mut bounds: Vec<usize> = cuts
        .iter()
        .map(|c| ((c * n as f64) as usize).min(n))
        .collect();
    bounds.push(0);
    bounds.push(n);
    bounds.sort();
    bounds.dedup();
    let run = |parts: &[(usize, usize)]| -> Vec<f64> {
        let mut stores: Vec<Store<T>> = parts
            .iter()
            .map(|&(lo, hi)| Store::new(w[lo..hi].to_vec(), vec![T::default(); hi - lo]))
            .collect();
        let opts = vec![GroupOptions::new(base).with_adaptive(adaptive); parts.len()];
        let mut gs = groups(&mut stores, &opts);
        let mut sam = Sam::new(SamConfig::from(sam_core::Perturbation::sam(0.2))).unwrap();
        sam.step(&mut gs, |gs| {
            for (g, &(lo, hi)) in gs.iter_mut().zip(parts) {
                let (w, gr) = g.buffer.weights_and_grad();
                quad_grad(&a[lo..hi], w, gr);
            }
            Ok::<_, Error<SliceError>>(())
        })
        .unwrap();
        gs.iter().flat_map(|g| f64s(g.buffer.weights())).collect()
    };
    let whole = run(&[(0, n)]);
    let parts: Vec<(usize, usize)> = bounds.windows(2).map(|b| (b[0], b[1])).collect();
    let split = run(&parts);
    for (x, y) in whole.iter().zip(&split) {
        // The norm differs by a few f64 ulps; after rounding w + e to T that is at most an ulp
        // or two of T, which the gradient and the step carry through.
        let tol = 4.0 * T::ulp(*x) + 1e-12 * x.abs();
        prop_assert!((x - y).abs() <= tol, "{x} vs {y}");
    }
    Ok(())
}

fn scale<T: TestReal>(g: &[f64], k: i32, c: f64, adaptive: bool) -> Result<(), TestCaseError> {
    let w: Vec<T> = (0..g.len())
        .map(|i| T::from_f64(0.5 + (i % 3) as f64 * 0.5))
        .collect();
    let perturbed = |g: Vec<T>, eps: f64| -> Vec<f64> {
        let mut stores = vec![Store::new(w.clone(), g)];
        let opts = [GroupOptions::new(sgd(0.1)).with_adaptive(adaptive)];
        let mut gs = groups(&mut stores, &opts);
        let mut sam = Sam::new(SamConfig {
            perturbation: sam_core::Perturbation {
                rho: 0.1,
                eps,
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
        let guard = sam.first_step(&mut gs).unwrap();
        f64s(guard.groups()[0].buffer.weights())
    };
    let g0: Vec<T> = g.iter().map(|x| T::from_f64(*x)).collect();
    let p = 2f64.powi(k);
    let gp: Vec<T> = g0.iter().map(|x| T::from_f64(x.to_f64() * p)).collect();
    prop_assert_eq!(
        perturbed(g0.clone(), 0.0)
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>(),
        perturbed(gp, 0.0)
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    );
    let gc: Vec<T> = g0.iter().map(|x| T::from_f64(x.to_f64() * c)).collect();
    // Away from ε: the gradients' norm must dominate ε = 1e-12, else skip the comparison.
    let n = norm(g0.iter().map(|x| x.to_f64()));
    if n * c.min(1.0) > 1e-3 {
        for (x, y) in perturbed(g0, 1e-12).iter().zip(&perturbed(gc, 1e-12)) {
            // c·g rounds to T (relative 2^-24 for f32), which moves e by that much relative.
            let tol = 2.0 * T::ulp(*x) + 1e-6 * 0.1 * 4.0;
            prop_assert!((x - y).abs() <= tol, "{x} vs {y}");
        }
    }
    Ok(())
}

#[test]
fn zero_gradient_and_empty_groups_are_no_ops() {
    let base = sgd(0.1);
    // Zero gradient: no perturbation, no NaN, the base step runs on the second gradient.
    let mut stores = vec![
        Store::new(vec![1.0f32, -2.0], vec![0.0, 0.0]),
        Store::new(vec![], vec![]),
    ];
    let opts = [GroupOptions::new(base), GroupOptions::new(base)];
    let mut gs = groups(&mut stores, &opts);
    let mut sam = Sam::new(SamConfig {
        perturbation: sam_core::Perturbation {
            eps: 0.0,
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    let guard = sam.first_step(&mut gs).unwrap();
    assert_eq!(guard.groups()[0].buffer.weights(), &[1.0, -2.0]);
    drop(guard);
    sam.step(&mut gs, |gs| {
        gs[0].buffer.grad_mut().copy_from_slice(&[0.0, 0.0]);
        Ok::<_, Error<SliceError>>(())
    })
    .unwrap();
    assert_eq!(gs[0].buffer.weights(), &[1.0, -2.0]);
    // No groups at all.
    let mut none: Vec<sam_core::Group<sam_core::reference::SliceBuffer<'_, f64>>> = Vec::new();
    let mut sam = Sam::new(SamConfig::default()).unwrap();
    let r = sam
        .step(&mut none, |_| Ok::<_, Error<SliceError>>(1.5))
        .unwrap();
    assert_eq!((r.loss, r.status), (1.5, StepStatus::Applied));
}

#[test]
fn huge_f32_gradients_give_norm_rho_not_infinity() {
    // A naive f32 sum of squares overflows (1e30² = 1e60 > 3.4e38) and one of 1e-30 underflows
    // to 0; the core's norm is accurate for both.
    for mag in [1e30f32, 3e38, 1e-30, 1e-44] {
        let g = vec![mag; 1000];
        let w = vec![0.0f32; 1000];
        let mut stores = vec![Store::new(w, g)];
        let opts = [GroupOptions::new(sgd(0.1))];
        let mut gs = groups(&mut stores, &opts);
        let mut sam = Sam::new(SamConfig {
            perturbation: sam_core::Perturbation {
                rho: 0.05,
                eps: 0.0,
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
        let guard = sam.first_step(&mut gs).unwrap();
        let e = norm(
            guard.groups()[0]
                .buffer
                .weights()
                .iter()
                .map(|x| f64::from(*x)),
        );
        assert!((e - 0.05).abs() < 1e-7, "{mag}: {e}");
    }
}

#[test]
fn f64_extremes_are_rescaled_or_rejected() {
    for mag in [1e200, 1e-200, 4e-320, 5e-324, 1e300, f64::MAX] {
        let mut stores = vec![Store::new(vec![0.0f64; 64], vec![mag; 64])];
        let opts = [GroupOptions::new(sgd(0.1))];
        let mut gs = groups(&mut stores, &opts);
        let mut sam = Sam::new(SamConfig {
            perturbation: sam_core::Perturbation {
                rho: 0.05,
                eps: 0.0,
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
        let guard = sam.first_step(&mut gs).unwrap();
        let e = norm(guard.groups()[0].buffer.weights().iter().copied());
        assert!((e - 0.05).abs() < 1e-12, "{mag}: {e}");
    }
    // A norm beyond f64::MAX: the perturbation is still ρ along g (the norm is only ever used
    // at its scale).
    let mut stores = vec![Store::new(vec![0.0f64; 4], vec![f64::MAX; 4])];
    let opts = [GroupOptions::new(sgd(0.1))];
    let mut gs = groups(&mut stores, &opts);
    let mut sam = Sam::new(SamConfig::default()).unwrap();
    let guard = sam.first_step(&mut gs).unwrap();
    assert_eq!(guard.groups()[0].buffer.weights(), &[0.025; 4]);
}

#[test]
fn invalid_hyperparameters_are_rejected() {
    for (rho, eta, eps) in [
        (f64::NAN, 0.0, 0.0),
        (-0.1, 0.0, 0.0),
        (f64::INFINITY, 0.0, 0.0),
        (0.1, -1.0, 0.0),
        (0.1, f64::NAN, 0.0),
        (0.1, 0.0, -1e-12),
        (0.1, 0.0, f64::NAN),
    ] {
        let r = Sam::new(SamConfig {
            perturbation: sam_core::Perturbation {
                rho,
                eta,
                eps,
                ..Default::default()
            },
            ..Default::default()
        });
        assert!(
            matches!(r, Err(Error::InvalidHyperparameter { .. })),
            "{rho} {eta} {eps}"
        );
    }
    assert!(GroupOptions::new(sgd(0.1)).with_rho(f64::NAN).is_err());
}

#[test]
fn closure_error_restores_and_propagates() {
    let mut stores = vec![Store::new(vec![1.0f64, 2.0], vec![0.5, 0.5])];
    let w0 = stores[0].w.clone();
    let opts = [GroupOptions::new(sgd(0.1))];
    let mut gs = groups(&mut stores, &opts);
    let mut sam = Sam::new(SamConfig::default()).unwrap();
    let mut calls = 0;
    #[derive(Debug)]
    enum MyErr {
        Backward,
        Opt,
    }
    impl From<Error<SliceError>> for MyErr {
        fn from(_: Error<SliceError>) -> Self {
            MyErr::Opt
        }
    }
    let r = sam.step(&mut gs, |_| {
        calls += 1;
        if calls == 2 {
            Err(MyErr::Backward)
        } else {
            Ok(())
        }
    });
    assert!(matches!(r, Err(MyErr::Backward)));
    assert_eq!(gs[0].buffer.weights(), &w0[..]);
    assert_eq!(sam.phase(), Phase::Idle);
    assert_eq!(sam.steps(), 0);
    let _ = MyErr::Opt;
}
