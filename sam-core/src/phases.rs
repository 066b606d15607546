//! The halves of a two-gradient step that every variant shares: the slot layout, the checks
//! and global norm before the climb, the climb itself, the second-gradient check, and the base
//! step of the final pass.

use crate::backend::{
    AverageFold, BaseStep, GradMix, ParamBuffer, PostMix, ReduceSpec, SlotSpec, UpdateSpec,
    Weighting,
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
    let norms = Engine::norms(groups, engine.unscale(), |o, s| ReduceSpec {
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

/// The reduce over the second gradient (with the weights perturbed), read times `unscale`.
/// `Ok(Err(skip))` when it holds NaN/∞: every group is then restored and the step is skipped.
pub(crate) fn second_norms<B: ParamBuffer>(
    groups: &mut [Group<B>],
    unscale: f64,
    spec: impl Fn(&GroupOptions, [f64; 3]) -> ReduceSpec,
) -> Result<Result<Norms, StepStatus>, Error<B::Error>> {
    let norms = Engine::norms(groups, unscale, spec);
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
    unscale: f64,
    check: bool,
) -> Result<Option<StepStatus>, Error<B::Error>> {
    if !check {
        return Ok(None);
    }
    Ok(second_norms(groups, unscale, |_, _| ReduceSpec::FINITE_ONLY)?.err())
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

/// How the final pass of a climbing step combines the gradients (the rest of its
/// [`UpdateSpec`] follows from the step): the final gradient, the post-correction, the new
/// stash.
pub(crate) struct Combine {
    pub grad: GradMix,
    pub post: Option<PostMix>,
    pub restash: Option<PostMix>,
}

impl Combine {
    /// The second gradient as it is (SAM, ASAM, WASAM).
    pub const CURRENT: Combine = Combine {
        grad: GradMix::Current,
        post: None,
        restash: None,
    };
}

/// The final pass of a climbing step: every group restored from its backup and stepped with
/// its base rule at the scheduled lr (or, with [`Finish::External`], only restored with the
/// final gradient left), combining the gradients as `combine(lr)` says and folding `average`;
/// the groups not yet stepped are restored if a backend fails. Then the step counts.
pub(crate) fn restore_and_step<B: ParamBuffer>(
    engine: &mut Engine,
    groups: &mut [Group<B>],
    finish: Finish,
    average: AverageFold,
    combine: impl Fn(f64) -> Combine,
) -> Result<StepStatus, Error<B::Error>> {
    let e = &*engine;
    Engine::update_all(groups, true, e.unscale(), |_, o| {
        let (base, lr) = base_step(e, o, finish);
        let c = combine(lr);
        UpdateSpec {
            restore: true,
            grad: c.grad,
            base,
            post: c.post,
            restash: c.restash,
            average,
            unscale: 1.0, // set by update_all
        }
    })?;
    engine.steps = engine.steps.saturating_add(1);
    Ok(StepStatus::Applied)
}

/// The checks of a one-gradient step before any write: phase, lr, group shape and slots
/// (`layout`), then one reduce with `spec` (whose finiteness flag the caller judges).
pub(crate) fn plain_begin<B: ParamBuffer>(
    engine: &mut Engine,
    groups: &mut [Group<B>],
    layout: impl Fn(&GroupOptions) -> SlotSpec,
    spec: impl Fn(&GroupOptions, [f64; 3]) -> ReduceSpec,
) -> Result<Norms, Error<B::Error>> {
    engine.check_lr(groups)?;
    engine.begin(groups, layout)?;
    Engine::norms(groups, engine.unscale(), spec)
}

/// [`plain_begin`] with the finiteness check of the gradient alone
/// ([`Error::NonFiniteGradient`]).
pub(crate) fn plain_checks<B: ParamBuffer>(
    engine: &mut Engine,
    groups: &mut [Group<B>],
    layout: impl Fn(&GroupOptions) -> SlotSpec,
) -> Result<(), Error<B::Error>> {
    let n = plain_begin(engine, groups, layout, |_, _| ReduceSpec::FINITE_ONLY)?;
    if !n.finite {
        return Err(Error::NonFiniteGradient);
    }
    Ok(())
}

/// The one-gradient step after [`plain_checks`]: every group's base rule (or, with
/// [`Finish::External`], nothing but the final gradient written back) on the final gradient
/// `grad`, from the current weights.
pub(crate) fn plain_step<B: ParamBuffer>(
    engine: &mut Engine,
    groups: &mut [Group<B>],
    grad: GradMix,
    finish: Finish,
) -> Result<StepStatus, Error<B::Error>> {
    let e = &*engine;
    Engine::update_all(groups, false, e.unscale(), |_, o| UpdateSpec {
        restore: false,
        grad,
        base: base_step(e, o, finish).0,
        post: None,
        restash: None,
        average: AverageFold::NONE,
        unscale: 1.0, // set by update_all
    })?;
    engine.steps = engine.steps.saturating_add(1);
    Ok(StepStatus::Applied)
}
