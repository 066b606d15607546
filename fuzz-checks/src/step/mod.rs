//! The `step` check (reference backend) and the `ndarray_step` check (`sam-ndarray` in lockstep
//! with the reference backend).
//!
//! An input decodes into a [`Setup`]: element type, variant and hyperparameters (SAM, ASAM,
//! GSAM, WSAM, WASAM, the base optimizer; wrapped, by the extensions below, as LookSAM with the
//! climb of SAM, WSAM or WASAM, or as SAM every `k` steps (`Interval`) of the four SAM
//! variants), 0–4 groups of 0–16 elements (sometimes a few hundred, sometimes just over a
//! reduction block of 4096), values from [`palette`], and up to 16 operations: closure steps,
//! `first_step` finished by `second_step` / `restore_with_gradient` / `cancel` / drop /
//! `mem::forget` (then `recover`), WASAM swaps (back, dropped, leaked), external optimizer
//! updates, checkpoint save/load with hostile states, group sets that change between steps,
//! and option changes. The extensions (after a marker byte, [`EXTENSIONS`], so that inputs
//! written before them decode as before) add the wrapper, gradients accumulated over
//! micro-batches ([`Recipe::Sum`], in both the closure and the two-call form) and checkpoint
//! round trips into fresh buffers and a fresh optimizer ([`Op::Resume`]). Every call is
//! checked against an exact prediction of its outcome (see [`World::predict_first`],
//! [`World::predict_begin`]; GSAM's second half by an independent model, [`gsam_second`], and
//! a LookSAM refresh's by [`looksam_refresh`], exact except within a stated margin of an
//! overflow threshold) and the contract:
//!
//! - nothing panics;
//! - after every `Err` or skip, the weights and the base-state and average slots are bit for bit
//!   what they were before the call (backup and stash are scratch); a WASAM fold owed after
//!   `restore_with_gradient` is applied exactly when a call passes its checks (`first_step`
//!   of a climbing step, `update_averages`, `swap`), and its result is predicted bit for bit;
//! - the gradient storage holds what the caller last wrote after every call except
//!   `restore_with_gradient` (the optimizers never zero or write it: what gradient accumulation
//!   relies on), and `first_step` leaves it as it found it;
//! - restore (drop, cancel, recover, skip) is bit-exact; swap twice is the identity, and
//!   `recover` swaps a leaked swap back;
//! - after a climbing first step, the backup is the clean weights, the stash the clean
//!   gradient, and the perturbation norm of each group is `ρ_g·‖T_g⊙g_g‖/(n+ε)` (see
//!   [`check_perturbation`]); a step that does not climb (LookSAM between refreshes, a plain
//!   step of `Interval`) moves no weight in its first half, leaves the optimizer idle even when
//!   its guard is leaked, calls the closure once, and is applied with whatever gradient the
//!   buffers hold;
//! - LookSAM's stored direction (a persistent stash) is unchanged by a step that does not climb
//!   and by every call that fails before a refresh's climb, and is the clean gradient after a
//!   refresh that climbed but was not applied;
//! - a checkpoint round trip ([`Op::Resume`]) gives back every weight, gradient, base-state
//!   slot, average and persistent stash and the host state; from there the resumed run and an
//!   uninterrupted twin (the same operations without the round trips) have the same outcomes and
//!   the same bits after every call (until a change of the group set, which the resumed
//!   optimizer, not having seen the groups, accepts where the twin refuses it);
//! - after every applied step whose inputs are in the finiteness class (crate docs), every
//!   weight and slot is finite, and a step whose lr is 0 everywhere leaves the weights unchanged.

use std::mem;

use ndarray::{ArrayD, IxDyn};
use sam_core::backend::{MAX_AVERAGES, ParamBuffer, Real, Slot, SlotSpec};
use sam_core::checkpoint::Checkpoint;
use sam_core::reference::{SliceBuffer, SliceError};
use sam_core::{Error, Group, Optimizer, Phase, SamOptimizer, SkipReason, StepStatus};
use sam_ndarray::NdGroup;

use crate::config::{GroupRaw, VariantRaw};
use crate::inspect::{GroupSnap, Inspect, first_diff, kept, persistent, same, same_modulo_nan};
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
        normal: setup.variant.normal() && setup.wrap.normal(),
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
        initial: opt.clone(),
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
    setup
        .variant
        .build_wrapped(setup.wrap, check)
        .unwrap_or(Ok(()))
}

/// The `step` check on element type `T`.
pub(crate) struct Reference<'s, T>(&'s Setup, std::marker::PhantomData<T>);

impl<T: Real> WithDrawn for Reference<'_, T> {
    type Out = Result<(), Violation>;

    fn run<O: Drawn>(self, opt: O) -> Self::Out {
        let setup = self.0;
        let mut st = stores::<T>(setup);
        let mut world = reference_world(setup, &mut st, opt.clone())?;
        let mut m = new_model(setup);
        // With checkpoint round trips, an uninterrupted twin runs every other operation and
        // must hold the same bits after each: a resumed run continues as if never stopped.
        let mut twin_st = stores::<T>(setup);
        let mut twin = if setup.ops.iter().any(|o| matches!(o, Op::Resume { .. })) {
            Some((reference_world(setup, &mut twin_st, opt)?, new_model(setup)))
        } else {
            None
        };
        let mut resumed = false;
        for (i, op) in setup.ops.iter().enumerate() {
            // Groups changed since the optimizer recorded them, or a buffer prepared for
            // another layout than its options need: the resumed optimizer accepts the groups
            // and the load zeroes that buffer, where the twin refuses them or reinterprets the
            // buffer's memory at its next step. The runs part at such a resume.
            let parts = world.respec() || m.shape.as_ref().is_some_and(|s| *s != world.shape());
            let out = apply(&mut world, &mut m, op, false);
            trace(op, &out);
            let out = out?;
            let Some((tw, tm)) = twin.as_mut() else {
                continue;
            };
            match op {
                Op::Resume { .. } => {
                    if out == "resume: loaded" {
                        resumed = true;
                        if parts {
                            twin = None;
                        }
                    }
                    continue;
                }
                // The resumed optimizer has not seen the groups yet, the twin refuses a change
                // of them: the runs part here too.
                Op::Active(_) | Op::Permute(..) | Op::Options { .. } if resumed => {
                    twin = None;
                    continue;
                }
                _ => {}
            }
            let ot = apply(tw, tm, op, false).map_err(|v| Violation {
                message: format!("uninterrupted twin: {}", v.message),
                ..v
            })?;
            let keeps_stash = world.opt.keeps_stash();
            let diff = diff_groups(
                &snaps(&world.groups),
                &snaps(&tw.groups),
                |r| persistent(r, keeps_stash),
                same,
                true,
            );
            if ot != out || diff.is_some() {
                return Err(Violation::new(
                    None,
                    format!(
                        "op {i} ({op:?}): the resumed run (`{out}`) and the uninterrupted one \
                         (`{ot}`) differ: {}",
                        diff.unwrap_or_else(|| "in outcome".into())
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// How two runs' groups differ (weights, gradients, and the slot roles `roles` selects, compared
/// with `eq`), or `None`. A role that one run holds and the other does not is a difference,
/// unless `absent_is_zero` and it holds zeros (a checkpoint load prepares buffers that the
/// uninterrupted run prepares at its next step, from zeroed memory).
pub(crate) fn diff_groups(
    a: &[GroupSnap],
    b: &[GroupSnap],
    roles: impl Fn(Slot) -> bool,
    eq: fn(&[f64], &[f64]) -> bool,
    absent_is_zero: bool,
) -> Option<String> {
    if a.len() != b.len() {
        return Some(format!("{} groups and {}", a.len(), b.len()));
    }
    for (gi, (x, y)) in a.iter().zip(b).enumerate() {
        let mut diffs = Vec::new();
        if !eq(&x.w, &y.w) {
            diffs.push(format!("weights ({})", first_diff(&x.w, &y.w)));
        }
        if !eq(&x.g, &y.g) {
            diffs.push(format!("gradient ({})", first_diff(&x.g, &y.g)));
        }
        for (k, role) in Slot::ALL.iter().enumerate() {
            if !roles(*role) {
                continue;
            }
            match (&x.slots[k], &y.slots[k]) {
                (Some(p), Some(q)) if !eq(p, q) => {
                    diffs.push(format!("slot {role:?} ({})", first_diff(p, q)))
                }
                (Some(p), None) | (None, Some(p))
                    if !(absent_is_zero && p.iter().all(|x| x.to_bits() == 0)) =>
                {
                    diffs.push(format!("slot {role:?} held by one run only"))
                }
                _ => {}
            }
        }
        if !diffs.is_empty() {
            return Some(format!("group {gi}: {}", diffs.join(", ")));
        }
    }
    None
}

pub(crate) fn run_reference<T: Real>(setup: &Setup) -> Result<(), Violation> {
    with_variant(setup, Reference::<T>(setup, std::marker::PhantomData))
}

/// The outcomes of the calls an input makes on the reference backend, prefixed by the variant
/// and element type (for selecting seed inputs by what they exercise); stops at a violation.
pub fn outcomes(data: &[u8]) -> Vec<String> {
    let setup = Setup::decode(data, false);
    let inner = match setup.variant {
        VariantRaw::Sam(_) => "sam",
        VariantRaw::Gsam(_) => "gsam",
        VariantRaw::Wsam(_) => "wsam",
        VariantRaw::Wasam(..) => "wasam",
        VariantRaw::Base => "base",
    };
    let variant = match setup.wrap {
        crate::config::Wrap::None => inner.to_string(),
        crate::config::Wrap::Interval(_) => format!("interval-{inner}"),
        crate::config::Wrap::LookSam { .. } => "looksam".to_string(),
    };
    let tag = format!("{variant}/{}", if setup.f64 { "f64" } else { "f32" });
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
        setup.variant.build_wrapped(
            setup.wrap,
            Go::<f64>(&setup, &tag, std::marker::PhantomData),
        )
    } else {
        setup.variant.build_wrapped(
            setup.wrap,
            Go::<f32>(&setup, &tag, std::marker::PhantomData),
        )
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
        initial: opt.clone(),
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
        if let Some(d) = diff_groups(
            &snaps(&a.groups),
            &snaps(&b.groups),
            |_| true,
            same_modulo_nan,
            false,
        ) {
            return Err(Violation::new(
                None,
                format!("op {i} ({op:?}) `{oa}`: the backends differ: {d}"),
            ));
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
