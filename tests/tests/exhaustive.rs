//! Every combination of the discriminants of every pass specification, on fixed groups whose
//! tensors straddle reduction blocks at offsets that are not multiples of 8, compared bit for
//! bit with the reference backend (the property tests draw these at random; this makes sure
//! none is missed).

use sam_core::backend::{
    AdamStep, AverageFold, BaseStep, GradMix, ParamBuffer, PerturbSpec, PostMix, ReduceSpec,
    SgdStep, SlotSpec, UpdateSpec, Weighting,
};
use sam_ndarray::NdGroup;
use sam_tests::{Bits, Fixture, Palette, assert_same_bits, assert_same_reduction, on_every_pool};

const FULL: SlotSpec = SlotSpec {
    backup: true,
    stash: true,
    state: 3,
    averages: 4,
};

/// Groups with empty tensors, scalars, misaligned offsets and blocks spanning tensors.
fn layouts() -> Vec<Vec<Vec<usize>>> {
    vec![
        vec![],
        vec![vec![0]],
        vec![vec![]],
        vec![
            vec![3],
            vec![4095],
            vec![0],
            vec![5, 7],
            vec![2 * 4096 + 9],
            vec![1],
            vec![2, 0, 3],
        ],
        vec![vec![4096 * 3 + 17]],
        vec![vec![13, 17], vec![8, 8, 8], vec![4099], vec![7]],
    ]
}

fn weightings() -> [Option<Weighting>; 4] {
    [
        None,
        Some(Weighting::Plain),
        Some(Weighting::Adaptive { eta: 0.0 }),
        Some(Weighting::Adaptive { eta: 0.01 }),
    ]
}

fn fixture<T: Bits>(
    shapes: &[Vec<usize>],
    seed: u64,
    palette: Palette,
) -> (NdGroup<T>, sam_core::reference::VecBuffer<T>) {
    let Fixture {
        mut nd,
        mut reference,
    } = Fixture::<T>::new(shapes, seed, Palette::Extreme, palette);
    #[cfg(feature = "rayon")]
    nd.set_min_parallel_len(1000);
    nd.prepare(&FULL).unwrap();
    reference.prepare(&FULL).unwrap();
    // Non-zero slots (stash, states, averages) so that every operand matters.
    for (k, slot) in sam_core::backend::Slot::ALL.into_iter().enumerate() {
        let v: Vec<T> = sam_tests::values(
            &mut sam_tests::SplitMix(seed ^ k as u64),
            nd.len(),
            Palette::Moderate,
        );
        let v: Vec<T> = if matches!(
            slot,
            sam_core::backend::Slot::State(1) | sam_core::backend::Slot::State(2)
        ) {
            v.into_iter()
                .map(|x| T::from_f64(x.to_f64().abs()))
                .collect() // Adam's v, vmax ≥ 0
        } else {
            v
        };
        nd.slot_mut(slot).unwrap().copy_from_slice(&v);
        reference.slot_mut(slot).unwrap().copy_from_slice(&v);
    }
    (nd, reference)
}

fn reduce_all<T: Bits>() {
    for (li, shapes) in layouts().iter().enumerate() {
        for palette in [Palette::Moderate, Palette::Extreme, Palette::NonFinite] {
            let (mut nd, mut r) = fixture::<T>(shapes, 1 + li as u64, palette);
            r.prepare(&FULL).unwrap();
            for perturb in weightings() {
                for bits in 0..8u8 {
                    for (scales, unscale) in [
                        ([1.0, 1.0, 1.0], 1.0),
                        ([0.5, 2f64.powi(60), 2f64.powi(-70)], 2f64.powi(-16)),
                    ] {
                        let spec = ReduceSpec {
                            perturb,
                            grad: bits & 1 != 0,
                            stash: bits & 2 != 0,
                            dot: bits & 4 != 0,
                            scale_perturb: scales[0],
                            scale_grad: scales[1],
                            scale_stash: scales[2],
                            unscale,
                        };
                        let a = nd.reduce(&spec).unwrap();
                        let b = r.reduce(&spec).unwrap();
                        assert_same_reduction(&a, &b);
                    }
                }
            }
            assert_same_bits(&nd, &r);
        }
    }
}

fn perturb_all<T: Bits>() {
    for (li, shapes) in layouts().iter().enumerate() {
        for stash in [false, true] {
            for weighting in [Weighting::Plain, Weighting::Adaptive { eta: 0.01 }] {
                for (scale, coeff, unscale) in [
                    (1.0, 0.3, 1.0),
                    (1.0, 0.0, 1.0),
                    (2f64.powi(-40), 7e11, 2f64.powi(-10)),
                ] {
                    let (mut nd, mut r) = fixture::<T>(shapes, 100 + li as u64, Palette::Extreme);
                    r.prepare(&FULL).unwrap();
                    let spec = PerturbSpec {
                        stash,
                        weighting,
                        scale,
                        coeff,
                        unscale,
                    };
                    nd.perturb(&spec).unwrap();
                    r.perturb(&spec).unwrap();
                    assert_same_bits(&nd, &r);
                    nd.restore().unwrap();
                    r.restore().unwrap();
                    assert_same_bits(&nd, &r);
                }
            }
        }
    }
}

fn bases() -> Vec<BaseStep> {
    let sgd = SgdStep {
        neg_lr: -0.1,
        weight_decay: 0.0,
        momentum: 0.0,
        one_minus_dampening: 1.0,
        nesterov: false,
        first: false,
    };
    let adam = AdamStep {
        decay: 1.0,
        l2: 0.0,
        one_minus_beta1: 0.09999999999999998,
        beta2: 0.999,
        one_minus_beta2: 0.0010000000000000009,
        bc2_sqrt: 0.0316069770620507,
        neg_step_size: -0.01 / 0.1,
        eps: 1e-8,
        amsgrad: false,
    };
    let mut out = vec![BaseStep::External];
    for (momentum, damp) in [(0.0, 1.0), (0.9, 1.0), (0.9, 0.7)] {
        for wd in [0.0, 1e-2] {
            for first in [false, true] {
                for nesterov in [false, true] {
                    out.push(BaseStep::Sgd(SgdStep {
                        momentum,
                        one_minus_dampening: damp,
                        weight_decay: wd,
                        first,
                        nesterov,
                        ..sgd
                    }));
                }
            }
        }
    }
    for amsgrad in [false, true] {
        for (decay, l2) in [(1.0, 0.0), (1.0, 1e-2), (0.999, 0.0)] {
            out.push(BaseStep::Adam(AdamStep {
                amsgrad,
                decay,
                l2,
                ..adam
            }));
        }
    }
    out
}

fn update_all<T: Bits>() {
    let folds = [
        AverageFold::NONE,
        AverageFold {
            weights: [Some(0.5), None, Some(1.0 / 3.0), Some(1.0)],
        },
    ];
    // Element-wise: small groups suffice (still several fold chunks and parallel splits).
    let layouts = [
        vec![],
        vec![vec![0]],
        vec![vec![3], vec![700], vec![0], vec![5, 7], vec![1100], vec![1]],
    ];
    for (li, shapes) in layouts.iter().enumerate() {
        for base in bases() {
            for restore in [false, true] {
                for grad in [GradMix::Current, GradMix::Mix { a: 1.3, b: -0.4 }] {
                    for (post, restash) in [
                        (None, None),
                        (Some(PostMix { a: -0.01, b: 0.02 }), None),
                        (None, Some(PostMix { a: 1.0, b: -0.3 })),
                        (
                            Some(PostMix { a: -0.01, b: 0.02 }),
                            Some(PostMix { a: 0.5, b: 2.0 }),
                        ),
                    ] {
                        for average in folds {
                            let (mut nd, mut r) =
                                fixture::<T>(shapes, 200 + li as u64, Palette::Extreme);
                            r.prepare(&FULL).unwrap();
                            let spec = UpdateSpec {
                                restore,
                                grad,
                                base,
                                post,
                                restash,
                                average,
                                // Unscaling where the new stash is formed too.
                                unscale: if restash.is_some() {
                                    2f64.powi(-12)
                                } else {
                                    1.0
                                },
                            };
                            nd.update(&spec).unwrap();
                            r.update(&spec).unwrap();
                            assert_same_bits(&nd, &r);
                            nd.fold_averages(&folds[1]).unwrap();
                            r.fold_averages(&folds[1]).unwrap();
                            assert_same_bits(&nd, &r);
                            nd.swap_average(2).unwrap();
                            r.swap_average(2).unwrap();
                            assert_same_bits(&nd, &r);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn every_reduce_spec() {
    on_every_pool(|| {
        reduce_all::<f32>();
        reduce_all::<f64>();
    });
}

#[test]
fn every_perturb_spec() {
    on_every_pool(|| {
        perturb_all::<f32>();
        perturb_all::<f64>();
    });
}

#[test]
fn every_update_spec() {
    on_every_pool(|| {
        update_all::<f32>();
        update_all::<f64>();
    });
}
