//! The `step` check (reference backend) and the `ndarray_step` check (`sam-ndarray` in lockstep
//! with the reference backend).
//!
//! An input decodes into a [`Setup`]: element type, variant and hyperparameters, 0–4 groups of
//! 0–16 elements (sometimes a few hundred, sometimes just over a reduction block of 4096),
//! values from [`palette`], and up to 16 operations: closure steps, `first_step` finished by
//! `second_step` / `restore_with_gradient` / `cancel` / drop / `mem::forget` (then `recover`),
//! WASAM swaps (back, dropped, leaked), external optimizer updates, checkpoint save/load with
//! hostile states, group sets that change between steps, and option changes. Every call is
//! checked against an exact prediction of its outcome (see [`World::predict_first`],
//! [`World::predict_begin`]; GSAM's second half by an independent model, [`gsam_second`],
//! exact except within a stated margin of an overflow threshold) and the contract:
//!
//! - nothing panics;
//! - after every `Err` or skip, the weights and the base-state and average slots are bit for bit
//!   what they were before the call (backup and stash are scratch); a WASAM fold owed after
//!   `restore_with_gradient` is applied exactly when a call passes its checks (`first_step`,
//!   `update_averages`, `swap`), and its result is predicted bit for bit;
//! - restore (drop, cancel, recover, skip) is bit-exact; swap twice is the identity, and
//!   `recover` swaps a leaked swap back;
//! - after a first step, the backup is the clean weights, the stash the clean gradient, and the
//!   perturbation norm of each group is `ρ_g·‖T_g⊙g_g‖/(n+ε)` (see [`check_perturbation`]);
//! - after every applied step whose inputs are in the finiteness class (crate docs), every
//!   weight and slot is finite, and a step whose lr is 0 everywhere leaves the weights unchanged.

use std::mem;

use ndarray::{ArrayD, IxDyn};
use sam_core::backend::{MAX_AVERAGES, ParamBuffer, Real, Slot, SlotSpec};
use sam_core::reference::{SliceBuffer, SliceError};
use sam_core::{Error, Group, Optimizer, Phase, SamOptimizer, SkipReason, StepStatus};
use sam_ndarray::NdGroup;

use crate::config::{GroupRaw, VariantRaw};
use crate::inspect::{GroupSnap, Inspect, first_diff, kept, same, same_modulo_nan};
use crate::palette;
use crate::src::Src;
use crate::variant::{Drawn, Form, PerturbParams, WithDrawn, base_raw};
use crate::{Finding, Policy, Violation};

mod calls;
mod judge;
mod model;
mod ops;
mod world;

pub use calls::*;
pub use judge::*;
pub use model::*;
pub use ops::*;
pub use world::*;

/// Weights and gradients of the finiteness class lie in `[-BOUND_VALUE, BOUND_VALUE]`.
pub const BOUND_VALUE: f64 = 1e10;
/// Base-state and average slots of the finiteness class lie in `[-BOUND_SLOT, BOUND_SLOT]`.
pub const BOUND_SLOT: f64 = 1e25;
/// The lr a step of the finiteness class uses lies in `[-BOUND_LR, BOUND_LR]` (or is NaN, which
/// must then be refused, not used).
pub const BOUND_LR: f64 = 10.0;
/// Relative bound of the perturbation-norm check, on top of the rounding allowance.
pub const NORM_RTOL: f64 = 1e-10;

pub(crate) fn new_model(setup: &Setup) -> Model {
    Model {
        shape: None,
        leaked: None,
        in_class: true,
        coherent: true,
        normal: setup.variant.normal(),
    }
}

/// Owned memory of one reference-backend group.
pub(crate) struct Store<T> {
    pub(crate) w: Vec<T>,
    pub(crate) g: Vec<T>,
    pub(crate) slots: Vec<T>,
}

pub(crate) fn stores<T: Real>(setup: &Setup) -> Vec<Store<T>> {
    setup
        .groups
        .iter()
        .map(|gs| Store {
            w: gs.w.iter().map(|x| T::from_f64(*x)).collect(),
            g: gs.g.iter().map(|x| T::from_f64(*x)).collect(),
            slots: vec![T::default(); gs.slot_values],
        })
        .collect()
}

/// Builds the reference world around a freshly built optimizer.
pub(crate) fn reference_world<'a, T: Real, O: Drawn>(
    setup: &Setup,
    stores: &'a mut [Store<T>],
    opt: O,
) -> Result<World<SliceBuffer<'a, T>, O>, Violation> {
    let mut groups = Vec::new();
    let mut caps = Vec::new();
    for (gs, st) in setup.groups.iter().zip(stores.iter_mut()) {
        let Ok(options) = gs.raw.build() else {
            continue;
        };
        if gs.short_grad {
            let n = st.g.len();
            match SliceBuffer::new(&mut st.w, &mut st.g[..n - 1], &mut st.slots) {
                Err(SliceError::LengthMismatch { .. }) => {}
                other => {
                    return Err(Violation::new(
                        None,
                        format!("SliceBuffer accepted a short gradient: {other:?}"),
                    ));
                }
            }
        }
        match SliceBuffer::new(&mut st.w, &mut st.g, &mut st.slots) {
            Ok(b) => groups.push(Group::with_options(b, options)),
            Err(e) => {
                return Err(Violation::new(
                    None,
                    format!("SliceBuffer refused equal lengths: {e}"),
                ));
            }
        }
        caps.push(gs.slot_values);
    }
    let active = groups.len();
    Ok(World {
        prepared: vec![None; active],
        groups,
        caps,
        active,
        opt,
        f64: setup.f64,
    })
}

/// Runs a check over the optimizer of the drawn variant; a variant `sam-core` refuses passes
/// (refusing it correctly is the `config` check's business).
pub(crate) fn with_variant<W: WithDrawn<Out = Result<(), Violation>>>(
    setup: &Setup,
    check: W,
) -> Result<(), Violation> {
    setup.variant.build_into(check).unwrap_or(Ok(()))
}

/// The `step` check on element type `T`.
pub(crate) struct Reference<'s, T>(&'s Setup, std::marker::PhantomData<T>);

impl<T: Real> WithDrawn for Reference<'_, T> {
    type Out = Result<(), Violation>;

    fn run<O: Drawn>(self, opt: O) -> Self::Out {
        let setup = self.0;
        let mut st = stores::<T>(setup);
        let mut world = reference_world(setup, &mut st, opt)?;
        let mut m = new_model(setup);
        for op in &setup.ops {
            let out = apply(&mut world, &mut m, op, false);
            trace(op, &out);
            out?;
        }
        Ok(())
    }
}

pub(crate) fn run_reference<T: Real>(setup: &Setup) -> Result<(), Violation> {
    with_variant(setup, Reference::<T>(setup, std::marker::PhantomData))
}

/// The outcomes of the calls an input makes on the reference backend, prefixed by the variant
/// and element type (for selecting seed inputs by what they exercise); stops at a violation.
pub fn outcomes(data: &[u8]) -> Vec<String> {
    let setup = Setup::decode(data, false);
    let tag = format!(
        "{}/{}",
        match setup.variant {
            VariantRaw::Sam(_) => "sam",
            VariantRaw::Gsam(_) => "gsam",
            VariantRaw::Wsam(_) => "wsam",
            VariantRaw::Wasam(..) => "wasam",
            VariantRaw::Base => "base",
        },
        if setup.f64 { "f64" } else { "f32" }
    );
    struct Go<'s, T>(&'s Setup, &'s str, std::marker::PhantomData<T>);
    impl<T: Real> WithDrawn for Go<'_, T> {
        type Out = Vec<String>;
        fn run<O: Drawn>(self, opt: O) -> Vec<String> {
            let (setup, tag) = (self.0, self.1);
            let mut out = Vec::new();
            let mut st = stores::<T>(setup);
            let Ok(mut world) = reference_world(setup, &mut st, opt) else {
                return out;
            };
            let mut m = new_model(setup);
            for op in &setup.ops {
                match apply(&mut world, &mut m, op, false) {
                    Ok(o) => out.push(format!("{tag} {o}")),
                    Err(_) => break,
                }
            }
            out
        }
    }
    let r = if setup.f64 {
        setup
            .variant
            .build_into(Go::<f64>(&setup, &tag, std::marker::PhantomData))
    } else {
        setup
            .variant
            .build_into(Go::<f32>(&setup, &tag, std::marker::PhantomData))
    };
    r.unwrap_or_default()
}

/// The `step` check: see the module docs.
pub fn check(data: &[u8], policy: &Policy) {
    let setup = Setup::decode(data, false);
    let r = if setup.f64 {
        run_reference::<f64>(&setup)
    } else {
        run_reference::<f32>(&setup)
    };
    if let Err(v) = r {
        policy.report(v);
    }
}

pub(crate) fn nd_arrays<T: Real>(values: &[f64], shapes: &[Vec<usize>]) -> Vec<ArrayD<T>> {
    let mut at = 0;
    shapes
        .iter()
        .map(|sh| {
            let n: usize = sh.iter().product();
            let v: Vec<T> = values[at..at + n].iter().map(|x| T::from_f64(*x)).collect();
            at += n;
            ArrayD::from_shape_vec(IxDyn(sh), v)
                .unwrap_or_else(|_| ArrayD::from_elem(IxDyn(&[0]), T::default()))
        })
        .collect()
}

/// Constructor misuse of `NdGroup` must be refused, never panic.
pub(crate) fn nd_constructors<T: Real>() -> Result<(), Violation> {
    let a = || ArrayD::<T>::from_elem(IxDyn(&[2, 3]), T::default());
    let refused = [
        NdGroup::with_grads(vec![a()], vec![]).is_err(),
        NdGroup::with_grads(
            vec![a()],
            vec![ArrayD::from_elem(IxDyn(&[3, 2]), T::default())],
        )
        .is_err(),
        NdGroup::new(vec![a().reversed_axes()]).is_err(),
        NdGroup::with_grads(vec![a()], vec![a().reversed_axes()]).is_err(),
    ];
    if refused.iter().any(|r| !r) {
        return Err(Violation::new(
            None,
            format!("NdGroup accepted a mismatched or non-contiguous array: {refused:?}"),
        ));
    }
    Ok(())
}

pub(crate) fn run_lockstep<T: Real>(setup: &Setup) -> Result<(), Violation> {
    nd_constructors::<T>()?;
    with_variant(setup, Lockstep::<T>(setup, std::marker::PhantomData))
}

/// The `ndarray_step` check on element type `T`.
pub(crate) struct Lockstep<'s, T>(&'s Setup, std::marker::PhantomData<T>);

impl<T: Real> WithDrawn for Lockstep<'_, T> {
    type Out = Result<(), Violation>;

    fn run<O: Drawn>(self, opt: O) -> Self::Out {
        lockstep::<T, O>(self.0, opt)
    }
}

fn lockstep<T: Real, O: Drawn>(setup: &Setup, opt: O) -> Result<(), Violation> {
    let mut st = stores::<T>(setup);
    let mut a = reference_world(setup, &mut st, opt.clone())?;
    let mut groups = Vec::new();
    for gs in &setup.groups {
        let Ok(options) = gs.raw.build() else {
            continue;
        };
        let buf = NdGroup::with_grads(
            nd_arrays::<T>(&gs.w, &gs.shapes),
            nd_arrays::<T>(&gs.g, &gs.shapes),
        )
        .map_err(|e| Violation::new(None, format!("NdGroup refused consistent arrays: {e}")))?;
        if buf.len() != gs.w.len() {
            return Err(Violation::new(
                None,
                "NdGroup length differs from its arrays".into(),
            ));
        }
        groups.push(Group::with_options(buf, options));
    }
    let caps = vec![usize::MAX; groups.len()];
    let active = groups.len();
    let mut b = World {
        prepared: vec![None; active],
        groups,
        caps,
        active,
        opt,
        f64: setup.f64,
    };
    let (mut ma, mut mb) = (new_model(setup), new_model(setup));
    for (i, op) in setup.ops.iter().enumerate() {
        let oa = apply(&mut a, &mut ma, op, true);
        trace(op, &oa);
        let oa = oa.map_err(|v| Violation {
            message: format!("reference backend: {}", v.message),
            ..v
        })?;
        let ob = apply(&mut b, &mut mb, op, true);
        trace(op, &ob);
        let ob = ob.map_err(|v| Violation {
            message: format!("ndarray backend: {}", v.message),
            ..v
        })?;
        if oa != ob {
            return Err(Violation::new(
                None,
                format!("op {i} ({op:?}): reference `{oa}`, ndarray `{ob}`"),
            ));
        }
        let (sa, sb) = (snaps(&a.groups), snaps(&b.groups));
        for (gi, (x, y)) in sa.iter().zip(&sb).enumerate() {
            let mut diffs = Vec::new();
            if !same_modulo_nan(&x.w, &y.w) {
                diffs.push(format!("weights ({})", first_diff(&x.w, &y.w)));
            }
            if !same_modulo_nan(&x.g, &y.g) {
                diffs.push(format!("gradient ({})", first_diff(&x.g, &y.g)));
            }
            for (k, role) in Slot::ALL.iter().enumerate() {
                match (&x.slots[k], &y.slots[k]) {
                    (Some(p), Some(q)) if !same_modulo_nan(p, q) => {
                        diffs.push(format!("slot {role:?} ({})", first_diff(p, q)))
                    }
                    (Some(_), None) | (None, Some(_)) => {
                        diffs.push(format!("slot {role:?} held by one backend only"))
                    }
                    _ => {}
                }
            }
            if !diffs.is_empty() {
                return Err(Violation::new(
                    None,
                    format!(
                        "op {i} ({op:?}) `{oa}`: group {gi} differs between the backends: {}",
                        diffs.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The `ndarray_step` check: see the module docs.
pub fn check_ndarray(data: &[u8], policy: &Policy) {
    let setup = Setup::decode(data, true);
    let r = if setup.f64 {
        run_lockstep::<f64>(&setup)
    } else {
        run_lockstep::<f32>(&setup)
    };
    if let Err(v) = r {
        policy.report(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(
        g1: &[f64],
        g2: &[f64],
        alpha: f64,
        eps: f64,
    ) -> Result<Option<SkipReason>, &'static str> {
        let p = gsam_second(alpha, eps, &[g1.to_vec()], &[g2.to_vec()]);
        assert_eq!(p.finding, None, "{g1:?} {g2:?} {eps}");
        p.outcome
    }

    #[test]
    fn gsam_second_prediction() {
        let applied = Ok(None);
        let overflow = Err("NormOverflow");
        let skip = Ok(Some(SkipReason::NonFiniteSecond));
        assert_eq!(outcome(&[1.0, 2.0], &[0.5, -1.0], 0.4, 1e-12), applied);
        assert_eq!(
            outcome(&[1.0, f64::NAN], &[0.5, -1.0], 0.4, 1e-12),
            skip,
            "the stash is read too (the first half keeps a non-finite one out)"
        );
        assert_eq!(
            outcome(&[1.0, 2.0], &[0.5, f64::INFINITY], 0.4, 1e-12),
            skip
        );
        // Zero gradients with ε = 0: cos = 0.
        assert_eq!(outcome(&[0.0; 2], &[0.0; 2], 0.4, 0.0), applied);
        // ‖g₂‖ overflows.
        assert_eq!(
            outcome(&[1.0, 1.0], &[f64::MAX, f64::MAX], 0.4, 0.0),
            overflow
        );
        // ‖g₁‖·‖g₂‖ overflows, but the cosine is taken at the reduction's scales.
        assert_eq!(outcome(&[1e200], &[1e200], 0.4, 0.0), applied);
        // a = 1 + α·cos·‖g₁‖/‖g₂‖ overflows.
        assert_eq!(outcome(&[1e10, 0.0], &[1e-300, 0.0], 0.4, 0.0), overflow);
        // Σg₂² overflows: rescaled.
        assert_eq!(outcome(&[0.01; 3], &[1e308; 3], 0.4, 1e-12), applied);
        // Scales 2^-1024 and 2 (their product is subnormal; finding GsamDotSubnormalScale).
        let big = 2f64.powi(1023);
        assert_eq!(outcome(&[0.49; 2], &[big, big * 1.7], 0.4, 1e-12), applied);
        // ε·s₂·s₁ overflows: cos = 0.
        assert_eq!(outcome(&[1e-300; 2], &[1e-300; 2], 0.4, 1e300), applied);
        // ε·s₂ overflows but ε·s₂·s₁ = 7.45 is finite (past finding GsamScaledEps): cos is
        // 0.0876, a = 1 + α·cos·‖g₁‖/(‖g₂‖+ε) = 3.5e297, applied; with α = 1e13 it overflows.
        let p = gsam_second(0.4, 1e9, &[vec![1e308, 0.0]], &[vec![1e-300; 2]]);
        assert_eq!(p, SecondPred::of(Ok(None)));
        let p = gsam_second(1e13, 1e9, &[vec![1e308, 0.0]], &[vec![1e-300; 2]]);
        assert_eq!(p.outcome, Err("NormOverflow"));
        // Norms whose product is above f64::MAX (the core's cosine is taken at scales that
        // bring them to order 1): cos = 1, and α·cos·‖g₁‖ overflows.
        assert_eq!(outcome(&[1e160; 13], &[1e160; 13], f64::MAX, 0.5), overflow);
        // ‖g₁‖ = f64::MAX exactly: at the threshold, either outcome is accepted.
        let p = gsam_second(0.4, 0.0, &[vec![f64::MAX]], &[vec![1.0]]);
        assert_eq!((p.outcome, p.also), (overflow, Some(applied)));
        assert_eq!(p.against(applied), applied);
        assert_eq!(p.against(skip), overflow);
    }

    #[test]
    fn folds_round_to_the_element_type() {
        let snap = GroupSnap {
            w: vec![1.0, 3.0],
            g: vec![0.0; 2],
            slots: std::array::from_fn(|i| (i == 6).then(|| vec![0.1, 0.0])),
        };
        let mut fold = [None; MAX_AVERAGES];
        fold[1] = Some(1.0 / 3.0);
        let f = apply_fold(std::slice::from_ref(&snap), Some(&fold), false);
        let want: Vec<f64> = [0.1 + (1.0 - 0.1) / 3.0, 1.0]
            .iter()
            .map(|x| f64::from(*x as f32))
            .collect();
        assert_eq!(f[0].slot(Slot::Average(1)), Some(&want[..]));
        assert_eq!(
            apply_fold(std::slice::from_ref(&snap), None, false),
            vec![snap]
        );
    }
}
