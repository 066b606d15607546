//! Proptest strategies: group shapes, slot specifications and every pass specification.

use proptest::prelude::*;
use sam_core::backend::kernel::BLOCK;
use sam_core::backend::{
    AdamStep, AverageFold, BaseStep, GradMix, MAX_AVERAGES, PerturbSpec, PostMix, ReduceSpec,
    SgdStep, SlotSpec, UpdateSpec, Weighting,
};

use crate::Palette;

/// One tensor shape: small of any rank (0–3 dims, zero-size dims included), a long vector (up
/// to three blocks and 17 elements, lengths not multiples of 8 or of the block included), or a
/// matrix.
pub fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        4 => prop::collection::vec(0usize..6, 0..4),
        2 => (0usize..=3 * BLOCK + 17).prop_map(|n| vec![n]),
        1 => prop::sample::select(vec![BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 9, 3 * BLOCK + 17])
            .prop_map(|n| vec![n]),
        2 => (1usize..40, 0usize..300).prop_map(|(a, b)| vec![a, b]),
    ]
}

/// The shapes of a group: 0 to 5 tensors.
pub fn shapes() -> impl Strategy<Value = Vec<Vec<usize>>> {
    prop::collection::vec(shape(), 0..6)
}

/// A value palette.
pub fn palette() -> impl Strategy<Value = Palette> {
    prop_oneof![
        3 => Just(Palette::Moderate),
        3 => Just(Palette::Extreme),
        1 => Just(Palette::NonFinite),
    ]
}

/// A slot specification: mostly every slot (so most passes are valid), sometimes a random one.
pub fn slot_spec() -> impl Strategy<Value = SlotSpec> {
    let full = SlotSpec {
        backup: true,
        stash: true,
        state: 3,
        averages: MAX_AVERAGES as u8,
    };
    prop_oneof![
        3 => Just(full),
        1 => (any::<bool>(), any::<bool>(), 0u8..=3, 0u8..=MAX_AVERAGES as u8)
            .prop_map(|(backup, stash, state, averages)| SlotSpec { backup, stash, state, averages }),
    ]
}

/// A power-of-two scale: mostly 1.
pub fn scale() -> impl Strategy<Value = f64> {
    prop_oneof![2 => Just(1.0), 1 => (-80i32..80).prop_map(|e| 2f64.powi(e))]
}

/// A finite coefficient of any magnitude, sometimes zero.
pub fn coeff() -> impl Strategy<Value = f64> {
    prop_oneof![
        1 => Just(0.0),
        1 => Just(-0.0),
        6 => -2.0f64..2.0,
        1 => (-1.0f64..1.0).prop_map(|x| x * 1e-30),
        1 => (-1.0f64..1.0).prop_map(|x| x * 1e30),
    ]
}

/// The unscaling factor `1/S` of a loss scale: mostly none (`1`), else `2^-k` for the loss
/// scales of mixed-precision training (`k` up to 24, and scales below 1), or any factor.
pub fn unscale() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => Just(1.0),
        2 => (-4i32..=24).prop_map(|k| 2f64.powi(-k)),
        1 => 1e-9f64..1e3,
    ]
}

/// A weighting: plain, or adaptive with η = 0, 0.01 or random.
pub fn weighting() -> impl Strategy<Value = Weighting> {
    prop_oneof![
        Just(Weighting::Plain),
        prop_oneof![Just(0.0), Just(0.01), 0.0f64..2.0].prop_map(|eta| Weighting::Adaptive { eta }),
    ]
}

/// Any reduce specification.
pub fn reduce_spec() -> impl Strategy<Value = ReduceSpec> {
    (
        prop_oneof![1 => Just(None), 3 => weighting().prop_map(Some)],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        scale(),
        scale(),
        scale(),
        unscale(),
    )
        .prop_map(
            |(perturb, grad, stash, dot, scale_perturb, scale_grad, scale_stash, unscale)| {
                ReduceSpec {
                    perturb,
                    grad,
                    stash,
                    dot,
                    scale_perturb,
                    scale_grad,
                    scale_stash,
                    unscale,
                }
            },
        )
}

/// Any perturb specification.
pub fn perturb_spec() -> impl Strategy<Value = PerturbSpec> {
    (any::<bool>(), weighting(), scale(), coeff(), unscale()).prop_map(
        |(stash, weighting, scale, coeff, unscale)| PerturbSpec {
            stash,
            weighting,
            scale,
            coeff,
            unscale,
        },
    )
}

/// SGD per-step scalars: any combination of first step, Nesterov, weight decay, momentum,
/// dampening (including combinations `BaseRule` would reject: the kernel is the same).
pub fn sgd_step() -> impl Strategy<Value = SgdStep> {
    (
        -1.0f64..0.0,
        prop_oneof![Just(0.0), 0.0f64..0.5],
        prop_oneof![Just(0.0), Just(0.9), 0.0f64..1.0],
        prop_oneof![Just(1.0), 0.0f64..1.0],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(neg_lr, weight_decay, momentum, one_minus_dampening, nesterov, first)| SgdStep {
                neg_lr,
                weight_decay,
                momentum,
                one_minus_dampening,
                nesterov,
                first,
            },
        )
}

/// Adam per-step scalars: Adam (L2) or AdamW (decoupled), with or without AMSGrad.
pub fn adam_step() -> impl Strategy<Value = AdamStep> {
    (
        any::<bool>(),
        0.0f64..0.1,
        0.5f64..1.0,
        0.9f64..1.0,
        1u32..20,
        -0.1f64..0.0,
        any::<bool>(),
        1e-12f64..1e-6,
    )
        .prop_map(|(decoupled, wd, beta1, beta2, t, neg_lr, amsgrad, eps)| {
            let bc1 = 1.0 - beta1.powi(t as i32);
            let bc2 = 1.0 - beta2.powi(t as i32);
            AdamStep {
                decay: if decoupled { 1.0 + neg_lr * wd } else { 1.0 },
                l2: if decoupled { 0.0 } else { wd },
                one_minus_beta1: 1.0 - beta1,
                beta2,
                one_minus_beta2: 1.0 - beta2,
                bc2_sqrt: bc2.sqrt(),
                neg_step_size: neg_lr / bc1,
                eps,
                amsgrad,
            }
        })
}

/// Any base step.
pub fn base_step() -> impl Strategy<Value = BaseStep> {
    prop_oneof![
        Just(BaseStep::External),
        sgd_step().prop_map(BaseStep::Sgd),
        adam_step().prop_map(BaseStep::Adam),
    ]
}

/// Any average fold (each average folded with probability ½).
pub fn average_fold() -> impl Strategy<Value = AverageFold> {
    prop::array::uniform4(prop_oneof![
        Just(None),
        (1u32..20).prop_map(|n| Some(1.0 / f64::from(n)))
    ])
    .prop_map(|weights| AverageFold { weights })
}

/// Any update specification.
pub fn update_spec() -> impl Strategy<Value = UpdateSpec> {
    (
        any::<bool>(),
        prop_oneof![
            Just(GradMix::Current),
            (coeff(), coeff()).prop_map(|(a, b)| GradMix::Mix { a, b })
        ],
        base_step(),
        prop_oneof![
            Just(None),
            (coeff(), coeff()).prop_map(|(a, b)| Some(PostMix { a, b }))
        ],
        prop_oneof![
            Just(None),
            (coeff(), coeff()).prop_map(|(a, b)| Some(PostMix { a, b }))
        ],
        prop_oneof![Just(AverageFold::NONE), average_fold()],
        unscale(),
    )
        .prop_map(
            |(restore, grad, base, post, restash, average, unscale)| UpdateSpec {
                restore,
                grad,
                base,
                post,
                restash,
                average,
                unscale,
            },
        )
}

/// One operation on a buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `ParamBuffer::reduce`.
    Reduce(ReduceSpec),
    /// `ParamBuffer::perturb`.
    Perturb(PerturbSpec),
    /// `ParamBuffer::restore`.
    Restore,
    /// `ParamBuffer::update`.
    Update(UpdateSpec),
    /// `ParamBuffer::fold_averages`.
    Fold(AverageFold),
    /// `ParamBuffer::swap_average`.
    Swap(u8),
    /// A new gradient (a backward pass) from this seed and palette.
    NewGradient(u64, Palette),
}

/// Any operation.
pub fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => reduce_spec().prop_map(Op::Reduce),
        2 => perturb_spec().prop_map(Op::Perturb),
        1 => Just(Op::Restore),
        4 => update_spec().prop_map(Op::Update),
        1 => average_fold().prop_map(Op::Fold),
        1 => (0u8..5).prop_map(Op::Swap),
        1 => (any::<u64>(), palette()).prop_map(|(s, p)| Op::NewGradient(s, p)),
    ]
}
