//! The halves of a two-gradient step that every variant shares: the slot layout, the checks
//! and global norm before the climb, the climb itself, the second-gradient check, and the base
//! step of the final pass.

use crate::backend::{
    AverageFold, BaseStep, GradMix, ParamBuffer, ReduceSpec, SlotSpec, UpdateSpec, Weighting,
};
use crate::engine::{Engine, Norms, SkipReason, StepStatus};
use crate::error::Error;
use crate::group::{Group, GroupOptions};
use crate::perturbation::perturb_spec;

/// How the second half of a step ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Apply the built-in base rule of each group.
    Base,
    /// Restore the weights and leave the final gradient in the gradient storage.
    External,
}

/// The one slot layout of every optimizer: the backup (`climbs`), the stash of the clean
/// gradient (`stash`), the base rule's state, and `averages` weight averages.
pub(crate) fn slots(o: &GroupOptions, climbs: bool, stash: bool, averages: u8) -> SlotSpec {
    SlotSpec {
        backup: climbs,
        stash,
        state: o.base().state_slots(),
        averages,
    }
}

/// The checks and global norms before any write of a climbing step: phase, group shape and
/// slots (`layout`), finiteness of the clean gradient, and the perturbation norm with each
/// group's `weighting` (plus `‖g‖` when `grad_norm`).
pub(crate) fn climb_norms<B: ParamBuffer>(
    engine: &mut Engine,
    groups: &mut [Group<B>],
    layout: impl Fn(&GroupOptions) -> SlotSpec,
    weighting: impl Fn(&GroupOptions) -> Weighting,
    grad_norm: bool,
) -> Result<Norms, Error<B::Error>> {
    engine.check_lr(groups)?;
    engine.begin(groups, layout)?;
    let norms = Engine::norms(groups, |o, s| ReduceSpec {
        perturb: Some(weighting(o)),
        grad: grad_norm,
        scale_perturb: s[0],
        scale_grad: s[1],
        ..ReduceSpec::FINITE_ONLY
    })?;
    if !norms.finite {
        return Err(Error::NonFiniteGradient);
    }
    if !norms.perturb_scaled.is_finite() {
        // Finite weights and gradients whose product (|w|+η)·g overflows (f64 only).
        return Err(Error::NormOverflow);
    }
    Ok(norms)
}

/// The climb: perturbs every group by `ρ_g·T²⊙g/(n + ε)` for the global norm in `norms`,
/// stashing the clean gradient when `stash`.
pub(crate) fn climb<B: ParamBuffer>(
    groups: &mut [Group<B>],
    norms: &Norms,
    eps: f64,
    stash: bool,
    rho_and_weighting: impl Fn(&GroupOptions) -> (f64, Weighting),
) -> Result<(), Error<B::Error>> {
    Engine::perturb_all(groups, |o| {
        let (rho, weighting) = rho_and_weighting(o);
        perturb_spec(weighting, rho, eps, norms, stash)
    })
}

/// The reduce over the second gradient (with the weights perturbed). `Ok(Err(skip))` when it
/// holds NaN/∞: every group is then restored and the step is skipped.
pub(crate) fn second_norms<B: ParamBuffer>(
    groups: &mut [Group<B>],
    spec: impl Fn(&GroupOptions, [f64; 3]) -> ReduceSpec,
) -> Result<Result<Norms, StepStatus>, Error<B::Error>> {
    let norms = Engine::norms(groups, spec);
    let norms = Engine::or_restore(groups, norms)?;
    if norms.finite {
        return Ok(Ok(norms));
    }
    Engine::restore_all(groups)?;
    Ok(Err(StepStatus::Skipped(SkipReason::NonFiniteSecond)))
}

/// The finiteness check of the second gradient alone, if `check` (see [`second_norms`]).
pub(crate) fn check_second<B: ParamBuffer>(
    groups: &mut [Group<B>],
    check: bool,
) -> Result<Option<StepStatus>, Error<B::Error>> {
    if !check {
        return Ok(None);
    }
    Ok(second_norms(groups, |_, _| ReduceSpec::FINITE_ONLY)?.err())
}

/// The base step of a group in the final pass: its rule at the scheduled lr, or External.
pub(crate) fn base_step(engine: &Engine, o: &GroupOptions, finish: Finish) -> (BaseStep, f64) {
    let lr = engine.lr_at(engine.steps, o.base().lr());
    let step = engine.steps.saturating_add(1);
    match finish {
        Finish::Base => (o.base().step_coefficients(step, lr), lr),
        Finish::External => (BaseStep::External, lr),
    }
}

/// The checks of a one-gradient step before any write: phase, lr, group shape and slots
/// (`layout`), and finiteness of the gradient ([`Error::NonFiniteGradient`]).
pub(crate) fn plain_checks<B: ParamBuffer>(
    engine: &mut Engine,
    groups: &mut [Group<B>],
    layout: impl Fn(&GroupOptions) -> SlotSpec,
) -> Result<(), Error<B::Error>> {
    engine.check_lr(groups)?;
    engine.begin(groups, layout)?;
    let n = Engine::norms(groups, |_, _| ReduceSpec::FINITE_ONLY)?;
    if !n.finite {
        return Err(Error::NonFiniteGradient);
    }
    Ok(())
}

/// The one-gradient base step after [`plain_checks`]: every group's base rule on the gradient
/// in its buffer, from the current weights.
pub(crate) fn plain_step<B: ParamBuffer>(
    engine: &mut Engine,
    groups: &mut [Group<B>],
) -> Result<StepStatus, Error<B::Error>> {
    let e = &*engine;
    Engine::update_all(groups, false, |_, o| UpdateSpec {
        restore: false,
        grad: GradMix::Current,
        base: base_step(e, o, Finish::Base).0,
        post: None,
        average: AverageFold::NONE,
    })?;
    engine.steps = engine.steps.saturating_add(1);
    Ok(StepStatus::Applied)
}
