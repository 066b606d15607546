//! Property tests of the variants: docs/design.md §6 invariant 3 (special cases that reduce to SAM or
//! to the base optimizer), invariant 7 (weight averages), and GSAM's geometry.

mod common;

use common::*;
use proptest::prelude::*;
use sam_core::backend::{Real, Slot};
use sam_core::reference::{SliceBuffer, SliceError};
use sam_core::{
    AdamConfig, BaseOptimizer, BaseRule, Error, Group, GroupOptions, Gsam, GsamConfig, RhoSchedule,
    Sam, SamConfig, Schedule, SgdConfig, Wasam, Wsam, WsamConfig,
};
use sam_core::{Optimizer as _, SamOptimizer as _};

fn cfg() -> ProptestConfig {
    ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    }
}

fn base_rule() -> impl Strategy<Value = BaseRule> {
    prop_oneof![
        (0.0f64..0.95, 0.0f64..0.1).prop_map(|(m, wd)| BaseRule::sgd(SgdConfig {
            lr: 0.05,
            momentum: m,
            weight_decay: wd,
            ..Default::default()
        })
        .unwrap()),
        (any::<bool>(), any::<bool>()).prop_map(|(w, ams)| {
            let c = AdamConfig {
                lr: 0.01,
                weight_decay: 0.01,
                amsgrad: ams,
                ..Default::default()
            };
            if w {
                BaseRule::adamw(c).unwrap()
            } else {
                BaseRule::adam(c).unwrap()
            }
        }),
    ]
}

/// Runs `steps` steps of `step` on g(w) = a⊙w − sin(i) and returns weights and base state.
fn run<T: TestReal>(
    a: &[f64],
    opts: GroupOptions,
    steps: usize,
    mut step: impl FnMut(
        &mut [Group<SliceBuffer<'_, T>>],
        &mut dyn FnMut(&mut [Group<SliceBuffer<'_, T>>]),
    ),
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let w: Vec<T> = a
        .iter()
        .enumerate()
        .map(|(i, x)| T::from_f64(x - 0.3 * i as f64))
        .collect();
    let mut stores = vec![Store::new(w, vec![T::default(); a.len()])];
    let mut gs = groups(&mut stores, &[opts]);
    let mut grad = |gs: &mut [Group<SliceBuffer<'_, T>>]| {
        let (w, g) = gs[0].buffer.weights_and_grad();
        for (i, ((gi, wi), ai)) in g.iter_mut().zip(w).zip(a).enumerate() {
            *gi = T::from_f64(ai * wi.to_f64() - (i as f64).sin());
        }
    };
    for _ in 0..steps {
        step(&mut gs, &mut grad);
    }
    let w = gs[0].buffer.weights().iter().map(|x| x.to_f64()).collect();
    let st = (0..3)
        .filter_map(|k| {
            gs[0]
                .buffer
                .slot(Slot::State(k))
                .map(|s| s.iter().map(|x| x.to_f64()).collect())
        })
        .collect();
    (w, st)
}

type Grad<'f, 'a, T> = &'f mut dyn FnMut(&mut [Group<SliceBuffer<'a, T>>]);

fn closure<'f, 'a, T: Real>(
    grad: Grad<'f, 'a, T>,
) -> impl FnMut(&mut [Group<SliceBuffer<'a, T>>]) -> Result<(), Error<SliceError>> + 'f {
    move |gs| {
        grad(gs);
        Ok(())
    }
}

fn sam_run<T: TestReal>(
    a: &[f64],
    o: GroupOptions,
    steps: usize,
    rho: f64,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let mut sam = Sam::new(SamConfig {
        perturbation: sam_core::Perturbation {
            rho,
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    run::<T>(a, o, steps, |gs, grad| {
        sam.step(gs, closure(grad)).unwrap();
    })
}

fn wsam_run<T: TestReal>(
    a: &[f64],
    o: GroupOptions,
    steps: usize,
    c: WsamConfig,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let mut wsam = Wsam::new(c).unwrap();
    run::<T>(a, o, steps, |gs, grad| {
        wsam.step(gs, closure(grad)).unwrap();
    })
}

proptest! {
    #![proptest_config(cfg())]

    /// WSAM γ = 0 coupled is the base optimizer; γ = ½ coupled is SAM (equal values; only the
    /// sign of an exact zero may differ).
    #[test]
    fn wsam_special_cases(a in prop::collection::vec(0.1f64..2.0, 1..20), base in base_rule(), steps in 1usize..5, adaptive in any::<bool>()) {
        let o = GroupOptions::new(base).with_adaptive(adaptive);
        let mut plain = BaseOptimizer::new();
        let b = run::<f64>(&a, GroupOptions::new(base), steps, |gs, grad| { grad(gs); plain.apply(gs).unwrap(); });
        let w0 = wsam_run::<f64>(&a, o, steps, WsamConfig { perturbation: sam_core::Perturbation { adaptive, ..Default::default() }, gamma: 0.0, decouple: false, ..Default::default() });
        prop_assert_eq!(&w0, &b);
        let sam = sam_run::<f32>(&a, o, steps, 0.05);
        let half = wsam_run::<f32>(&a, o, steps, WsamConfig { perturbation: sam_core::Perturbation { rho: 0.05, adaptive, ..Default::default() }, gamma: 0.5, decouple: false, ..Default::default() });
        prop_assert_eq!(&half, &sam);
    }

    /// GSAM with α = 0 is SAM with the same ρ.
    #[test]
    fn gsam_alpha_zero_is_sam(a in prop::collection::vec(0.1f64..2.0, 1..20), base in base_rule(), steps in 1usize..5, rho in 0.0f64..0.5) {
        let o = GroupOptions::new(base);
        let sam = sam_run::<f64>(&a, o, steps, rho);
        let mut cfg = GsamConfig::new(RhoSchedule::Schedule(Schedule::constant(rho).unwrap()));
        cfg.alpha = 0.0;
        let mut gsam = Gsam::new(cfg).unwrap();
        let g = run::<f64>(&a, o, steps, |gs, grad| { gsam.step(gs, closure(grad)).unwrap(); });
        prop_assert_eq!(g, sam);
    }

    /// Decoupled WSAM with plain SGD equals coupled WSAM (up to rounding):
    /// w − lr·g₁ − lr·α·(g₂ − g₁) = w − lr·(α·g₂ + (1−α)·g₁).
    #[test]
    fn wsam_decoupled_plain_sgd_is_coupled(a in prop::collection::vec(0.1f64..2.0, 1..20), gamma in 0.0f64..0.95, steps in 1usize..4, max_norm in prop::option::of(0.1f64..5.0)) {
        let o = GroupOptions::new(BaseRule::sgd(SgdConfig { lr: 0.02, ..Default::default() }).unwrap());
        let c = WsamConfig { gamma, max_norm, ..Default::default() };
        let (d, _) = wsam_run::<f64>(&a, o, steps, WsamConfig { decouple: true, ..c });
        let (k, _) = wsam_run::<f64>(&a, o, steps, WsamConfig { decouple: false, ..c });
        for (x, y) in d.iter().zip(&k) {
            prop_assert!((x - y).abs() <= 1e-12 * (1.0 + x.abs()), "{x} vs {y}");
        }
    }

    /// Invariant 7: each average equals the arithmetic mean of the snapshots it took (within
    /// the rounding of the running mean); swapping twice is the identity.
    #[test]
    fn averages_are_means_and_swap_is_involution(a in prop::collection::vec(0.1f64..2.0, 1..15), steps in 1usize..12, s0 in 0u64..6, s1 in 0u64..12) {
        let o = GroupOptions::new(BaseRule::sgd(SgdConfig { lr: 0.1, momentum: 0.5, ..Default::default() }).unwrap());
        let mut wasam = Wasam::new(SamConfig::default(), &[s0, s1]).unwrap();
        let w: Vec<f64> = a.iter().map(|x| x - 1.0).collect();
        let mut stores = vec![Store::new(w, vec![0.0; a.len()])];
        let mut gs = groups(&mut stores, &[o]);
        let mut snaps: Vec<Vec<f64>> = Vec::new();
        for _ in 0..steps {
            wasam.step(&mut gs, |gs: &mut [Group<SliceBuffer<'_, f64>>]| {
                let (w, g) = gs[0].buffer.weights_and_grad();
                for ((gi, wi), ai) in g.iter_mut().zip(w).zip(&a) { *gi = ai * wi - 0.5; }
                Ok::<_, Error<SliceError>>(())
            }).unwrap();
            snaps.push(gs[0].buffer.weights().to_vec());
        }
        for (k, start) in [s0, s1].into_iter().enumerate() {
            let taken: Vec<&Vec<f64>> = snaps.iter().skip(start as usize).collect();
            prop_assert_eq!(wasam.counts()[k], taken.len() as u64);
            if taken.is_empty() { continue; }
            let avg = gs[0].buffer.slot(Slot::Average(k as u8)).unwrap().to_vec();
            for i in 0..a.len() {
                let mean = taken.iter().map(|s| s[i]).sum::<f64>() / taken.len() as f64;
                prop_assert!((avg[i] - mean).abs() <= 1e-13 * (1.0 + mean.abs()), "{} vs {mean}", avg[i]);
            }
            let live = bits(gs[0].buffer.weights());
            let swapped = wasam.swap(&mut gs, k as u8).unwrap();
            prop_assert_eq!(bits(swapped.groups()[0].buffer.weights()), bits(&avg));
            swapped.swap_back().unwrap();
            prop_assert_eq!(bits(gs[0].buffer.weights()), live.clone());
            drop(wasam.swap(&mut gs, k as u8).unwrap()); // dropping the guard swaps back too
            prop_assert_eq!(bits(gs[0].buffer.weights()), live);
        }
    }

    /// GSAM geometry (ε = 0): the final gradient is d = g₂ − α·v with v ⟂ g₂, so
    /// ⟨d − g₂, g₂⟩ = 0 and ‖d − g₂‖ = α·‖g₁ − proj_{g₂} g₁‖.
    #[test]
    fn gsam_subtracts_the_orthogonal_component(g1 in prop::collection::vec(-1.0f64..1.0, 2..20), shift in prop::collection::vec(-1.0f64..1.0, 2..20), alpha in 0.01f64..1.0) {
        let n = g1.len().min(shift.len());
        let g1 = &g1[..n];
        let g2: Vec<f64> = g1.iter().zip(&shift).map(|(a, b)| a + b).collect();
        prop_assume!(norm(g2.iter().copied()) > 1e-3 && norm(g1.iter().copied()) > 1e-3);
        let mut cfg = GsamConfig::new(RhoSchedule::Schedule(Schedule::constant(0.1).unwrap()));
        cfg.alpha = alpha;
        cfg.perturbation.eps = 0.0;
        let mut gsam = Gsam::new(cfg).unwrap();
        let o = GroupOptions::new(BaseRule::sgd(SgdConfig { lr: 0.1, ..Default::default() }).unwrap());
        let mut stores = vec![Store::new(vec![0.5; n], g1.to_vec())];
        let mut gs = groups(&mut stores, &[o]);
        let mut guard = gsam.first_step(&mut gs).unwrap();
        guard.groups_mut()[0].buffer.grad_mut().copy_from_slice(&g2);
        guard.restore_with_gradient().unwrap();
        let d = gs[0].buffer.grad().to_vec();
        prop_assert_eq!(bits(gs[0].buffer.weights()), bits(&[0.5; 20][..n]));
        let diff: Vec<f64> = d.iter().zip(&g2).map(|(d, g)| d - g).collect();
        let dot: f64 = diff.iter().zip(&g2).map(|(x, y)| x * y).sum();
        let n2 = norm(g2.iter().copied());
        let nd = norm(diff.iter().copied());
        // d − g₂ is formed from rounded values: its error is about an ulp of d per element.
        let nd_full = norm(d.iter().copied());
        prop_assert!(dot.abs() <= 1e-12 * nd * n2 + 1e-14 * nd_full * n2, "⟨d−g₂, g₂⟩ = {dot}");
        let proj = g1.iter().zip(&g2).map(|(a, b)| a * b).sum::<f64>() / (n2 * n2);
        let v = norm(g1.iter().zip(&g2).map(|(a, b)| a - proj * b));
        prop_assert!((nd - alpha * v).abs() <= 1e-12 * (1.0 + nd), "{nd} vs {}", alpha * v);
    }
}

#[test]
fn variant_hyperparameters_are_validated() {
    for gamma in [1.0, 1.5, -0.1, f64::NAN] {
        assert!(
            Wsam::new(WsamConfig {
                gamma,
                ..Default::default()
            })
            .is_err(),
            "{gamma}"
        );
    }
    assert!(
        Wsam::new(WsamConfig {
            max_norm: Some(0.0),
            ..Default::default()
        })
        .is_err()
    );
    assert!(
        Wsam::new(WsamConfig {
            max_norm: Some(f64::NAN),
            ..Default::default()
        })
        .is_err()
    );
    assert!(
        Wsam::new(WsamConfig {
            perturbation: sam_core::Perturbation {
                eps: -1.0,
                ..Default::default()
            },
            ..Default::default()
        })
        .is_err()
    );
    let rho = RhoSchedule::Schedule(Schedule::constant(0.05).unwrap());
    for alpha in [-0.1, f64::NAN, f64::INFINITY] {
        assert!(
            Gsam::new(GsamConfig {
                alpha,
                ..GsamConfig::new(rho)
            })
            .is_err(),
            "{alpha}"
        );
    }
    assert!(
        Gsam::new(GsamConfig {
            perturbation: sam_core::Perturbation {
                eps: f64::NAN,
                ..Default::default()
            },
            ..GsamConfig::new(rho)
        })
        .is_err()
    );
    let prop = RhoSchedule::Proportional(sam_core::Proportional {
        max_lr: 1.0,
        min_lr: 0.0,
        max_value: 0.1,
        min_value: 0.0,
    });
    assert!(
        Gsam::new(GsamConfig::new(prop)).is_err(),
        "proportional rho without an lr schedule"
    );
    assert!(Wasam::new(SamConfig::default(), &[]).is_err());
    assert!(Wasam::new(SamConfig::default(), &[0; 5]).is_err());
    assert!(Wasam::new(SamConfig::from(sam_core::Perturbation::sam(f64::NAN)), &[0]).is_err());
}

#[test]
fn gsam_rejects_per_group_rho_and_wasam_rejects_empty_swap() {
    let base = BaseRule::sgd(SgdConfig {
        lr: 0.1,
        ..Default::default()
    })
    .unwrap();
    let mut stores = vec![Store::new(vec![1.0f64; 3], vec![0.5; 3])];
    let before = stores.clone();
    let o = GroupOptions::new(base).with_rho(0.1).unwrap();
    let mut gs = groups(&mut stores, &[o]);
    let mut gsam = Gsam::new(GsamConfig::new(RhoSchedule::Schedule(
        Schedule::constant(0.05).unwrap(),
    )))
    .unwrap();
    assert!(matches!(
        gsam.first_step(&mut gs),
        Err(Error::InvalidGroups { .. })
    ));
    let mut wasam = Wasam::new(SamConfig::default(), &[10]).unwrap();
    assert!(matches!(
        wasam.swap(&mut gs, 0),
        Err(Error::InvalidGroups { .. })
    ));
    assert!(matches!(
        wasam.swap(&mut gs, 3),
        Err(Error::InvalidGroups { .. })
    ));
    drop(gs);
    assert_eq!(stores, before);
}

#[test]
fn decoupled_wsam_with_external_optimizer_is_an_error_and_restores() {
    let base = BaseRule::sgd(SgdConfig {
        lr: 0.1,
        ..Default::default()
    })
    .unwrap();
    let mut stores = vec![Store::new(vec![1.0f64, -1.0], vec![0.5, 0.25])];
    let w0 = stores[0].w.clone();
    let mut gs = groups(&mut stores, &[GroupOptions::new(base)]);
    let mut wsam = Wsam::new(WsamConfig::default()).unwrap();
    let guard = wsam.first_step(&mut gs).unwrap();
    assert!(matches!(
        guard.restore_with_gradient(),
        Err(Error::InvalidGroups { .. })
    ));
    assert_eq!(gs[0].buffer.weights(), &w0[..]);
    // Coupled works and leaves d = α·g₂ + (1−α)·g₁ in the gradient.
    let mut wsam = Wsam::new(WsamConfig {
        decouple: false,
        gamma: 0.5,
        ..Default::default()
    })
    .unwrap();
    let mut guard = wsam.first_step(&mut gs).unwrap();
    guard.groups_mut()[0]
        .buffer
        .grad_mut()
        .copy_from_slice(&[2.0, 4.0]);
    guard.restore_with_gradient().unwrap();
    assert_eq!(gs[0].buffer.grad(), &[2.0, 4.0]);
    assert_eq!(gs[0].buffer.weights(), &w0[..]);
}
