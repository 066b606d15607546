//! SAM and ASAM.

use crate::BaseStep;
use crate::buffer::{
    AverageFold, GradMix, ParamBuffer, PerturbSpec, ReduceSpec, SlotSpec, UpdateSpec, Weighting,
};
use crate::engine::{Engine, Norms, SkipReason, StepStatus};
use crate::error::{Error, invalid};
use crate::group::{Group, GroupOptions};
use crate::guard::{Finish, Perturbed, SamFamily, private};

/// Hyperparameters of [`Sam`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SamConfig {
    /// Neighbourhood radius ρ ≥ 0 (finite); groups may override it. Default `0.05`.
    pub rho: f64,
    /// ASAM: scale the climb per element by `T = |w| + eta`; groups may override it.
    /// Default `false`.
    pub adaptive: bool,
    /// ASAM offset η ≥ 0 (finite) in `T = |w| + η`. Default `0` (davda54's form; the ASAM
    /// paper's official code uses `0.01`).
    pub eta: f64,
    /// ε ≥ 0 (finite) in `ρ/(‖T⊙g‖ + ε)`. Default `1e-12` (upstream).
    pub eps: f64,
    /// Check the second gradient for NaN/∞ before the step writes anything (one extra read of
    /// the gradient) and skip the step if found. Default `true`; switch it off only if the
    /// framework already guarantees finite gradients (for example a loss scaler's inf check).
    pub check_second_gradient: bool,
}

impl Default for SamConfig {
    fn default() -> Self {
        SamConfig {
            rho: 0.05,
            adaptive: false,
            eta: 0.0,
            eps: 1e-12,
            check_second_gradient: true,
        }
    }
}

impl SamConfig {
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if !(self.rho >= 0.0 && self.rho.is_finite()) {
            return Err(invalid("rho", "rho must be finite and >= 0"));
        }
        if !(self.eta >= 0.0 && self.eta.is_finite()) {
            return Err(invalid("eta", "eta must be finite and >= 0"));
        }
        if !(self.eps >= 0.0 && self.eps.is_finite()) {
            return Err(invalid("eps", "eps must be finite and >= 0"));
        }
        Ok(())
    }

    /// The weighting of a group (its override, else the optimizer's flag).
    pub(crate) fn weighting(&self, o: &GroupOptions) -> Weighting {
        if o.adaptive().unwrap_or(self.adaptive) {
            Weighting::Adaptive { eta: self.eta }
        } else {
            Weighting::Plain
        }
    }

    /// The perturb spec of a group for the global norm `n_s` computed at scale `s`.
    pub(crate) fn perturb_spec(&self, o: &GroupOptions, norms: &Norms, stash: bool) -> PerturbSpec {
        perturb_spec(
            self.weighting(o),
            o.rho().unwrap_or(self.rho),
            self.eps,
            norms,
            stash,
        )
    }
}

/// Sharpness-Aware Minimization (SAM), and ASAM with `adaptive`.
///
/// One step, with `T = 1` (SAM) or `T = |w| + η` (ASAM), per group `g`:
///
/// ```text
/// g₁ = ∇L(w);   n = ‖T⊙g₁‖ over all groups;   e = ρ_g · T²⊙g₁ / (n + ε)
/// g₂ = ∇L(w + e);   w ← w (restored bit-exactly from a copy);   base step with g₂
/// ```
///
/// References: Foret et al., *Sharpness-Aware Minimization for Efficiently Improving
/// Generalization*, ICLR 2021, <https://arxiv.org/abs/2010.01412>; Kwon et al., *ASAM:
/// Adaptive Sharpness-Aware Minimization*, ICML 2021, <https://arxiv.org/abs/2102.11600>.
/// Upstream semantics: davda54/sam `sam.py` (conformance `SCHEMA.md` §7.1).
///
/// ```
/// use sam_core::{BaseRule, Group, Sam, SamConfig, SgdConfig, reference::SliceBuffer};
///
/// // L(w) = ½‖w‖², ∇L = w.
/// let mut w = [3.0_f64, -4.0];
/// let mut g = [0.0; 2];
/// let mut slots = [0.0; 2 * 2]; // backup + momentum
/// let base = BaseRule::sgd(SgdConfig { lr: 0.1, momentum: 0.9, ..Default::default() })?;
/// let mut groups = [Group::new(SliceBuffer::new(&mut w, &mut g, &mut slots)?, base)];
/// let mut sam = Sam::new(SamConfig { rho: 0.05, ..Default::default() })?;
/// for _ in 0..200 {
///     sam.step(&mut groups, |gs| {
///         let (w, g) = gs[0].buffer.weights_and_grad();
///         g.copy_from_slice(w);
///         Ok::<_, sam_core::Error<_>>(0.5 * w.iter().map(|x| x * x).sum::<f64>())
///     })?;
/// }
/// assert!(groups[0].buffer.weights().iter().all(|x| x.abs() < 0.1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Sam {
    cfg: SamConfig,
    engine: Engine,
}

impl Sam {
    /// A SAM optimizer; rejects out-of-domain hyperparameters (NaN included).
    pub fn new(cfg: SamConfig) -> Result<Self, Error> {
        cfg.validate()?;
        Ok(Sam {
            cfg,
            engine: Engine::new(),
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &SamConfig {
        &self.cfg
    }

    /// The slots a group with these options needs (backup plus the base rule's state).
    pub fn slot_spec(&self, options: &GroupOptions) -> SlotSpec {
        sam_slots(options)
    }

    /// First half of a step: with the clean gradient in every buffer, perturbs the weights and
    /// returns the guard of the perturbed phase. Nothing is written if it fails (a non-finite
    /// gradient is [`Error::NonFiniteGradient`]).
    pub fn first_step<'a, B: ParamBuffer>(
        &'a mut self,
        groups: &'a mut [Group<B>],
    ) -> Result<Perturbed<'a, Self, B>, Error<B::Error>> {
        let norms = sam_norms(&self.cfg, &mut self.engine, groups, sam_slots)?;
        let cfg = self.cfg;
        Engine::perturb_all(groups, |o| cfg.perturb_spec(o, &norms, false))?;
        Ok(Perturbed::new(self, groups))
    }
}

/// The checks and the global norm of SAM/ASAM's first half (shared with WASAM), before any
/// write.
pub(crate) fn sam_norms<B: ParamBuffer>(
    cfg: &SamConfig,
    engine: &mut Engine,
    groups: &mut [Group<B>],
    slots: impl Fn(&GroupOptions) -> SlotSpec,
) -> Result<Norms, Error<B::Error>> {
    engine.begin(groups, slots)?;
    let norms = Engine::norms(groups, |o, s| ReduceSpec {
        perturb: Some(cfg.weighting(o)),
        scale_perturb: s[0],
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

/// `c = ρ/(n_s + ε·s)` at the norm's scale `s` (`0` for a zero gradient).
pub(crate) fn perturb_spec(
    weighting: Weighting,
    rho: f64,
    eps: f64,
    norms: &Norms,
    stash: bool,
) -> PerturbSpec {
    let s = norms.perturb_scale;
    let n = norms.perturb_scaled;
    let coeff = if n > 0.0 {
        let eps_s = eps * s;
        if eps_s.is_finite() {
            rho / (n + eps_s)
        } else {
            // ε·s overflows (huge ε, tiny f64 gradient): divide through by s instead.
            (rho / s) / (n / s + eps)
        }
    } else {
        0.0
    };
    PerturbSpec {
        stash,
        weighting,
        scale: s,
        coeff,
    }
}

/// Slots of the variants that combine two gradients (GSAM, WSAM): backup, stash, base state.
pub(crate) fn stash_slots(options: &GroupOptions) -> SlotSpec {
    SlotSpec {
        stash: true,
        ..sam_slots(options)
    }
}

/// Slots of SAM/ASAM: the backup and the base rule's state.
pub(crate) fn sam_slots(options: &GroupOptions) -> SlotSpec {
    SlotSpec {
        backup: true,
        stash: false,
        state: options.base().state_slots(),
        averages: 0,
    }
}

/// Checks the second gradient; on NaN/∞ restores every group and returns the skip.
pub(crate) fn check_second<B: ParamBuffer>(
    groups: &mut [Group<B>],
    check: bool,
) -> Result<Option<StepStatus>, Error<B::Error>> {
    if !check {
        return Ok(None);
    }
    let norms = Engine::norms(groups, |_, _| ReduceSpec::FINITE_ONLY);
    let norms = Engine::or_restore(groups, norms)?;
    if norms.finite {
        return Ok(None);
    }
    skip_second(groups).map(Some)
}

/// Restores every group and reports a skip for a non-finite second gradient.
pub(crate) fn skip_second<B: ParamBuffer>(
    groups: &mut [Group<B>],
) -> Result<StepStatus, Error<B::Error>> {
    Engine::restore_all(groups)?;
    Ok(StepStatus::Skipped(SkipReason::NonFiniteSecond))
}

/// The base step of a group: its rule, or External.
pub(crate) fn base_step(o: &GroupOptions, step: u64, lr: f64, finish: Finish) -> BaseStep {
    match finish {
        Finish::Base => o.base().step_coefficients(step, lr),
        Finish::External => BaseStep::External,
    }
}

impl private::Sealed for Sam {}

impl SamFamily for Sam {
    fn engine_mut(&mut self, _: private::Token) -> &mut Engine {
        &mut self.engine
    }

    fn second<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
        finish: Finish,
        _: private::Token,
    ) -> Result<StepStatus, Error<B::Error>> {
        if let Some(skip) = check_second(groups, self.cfg.check_second_gradient)? {
            return Ok(skip);
        }
        let step = self.engine.steps.saturating_add(1);
        Engine::update_all(groups, true, |_, o| UpdateSpec {
            restore: true,
            grad: GradMix::Current,
            base: base_step(o, step, o.base().lr(), finish),
            post: None,
            average: AverageFold::NONE,
        })?;
        self.engine.steps = step;
        Ok(StepStatus::Applied)
    }
}

crate::guard::family_methods!(Sam, simple_state);
