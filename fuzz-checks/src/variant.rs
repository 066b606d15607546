//! What the checks need to know about an optimizer built from a drawn configuration, and the
//! one place where a drawn configuration becomes a concrete optimizer type.
//!
//! The checks drive the optimizers through `sam_core::Optimizer` and `sam_core::SamOptimizer`,
//! generically over [`Drawn`]; this module only answers questions about the drawn variant (its
//! perturbation parameters, whether it stashes, whether it checks the second gradient) and
//! gives the variant-specific calls (GSAM's schedules, WASAM's swaps) a typed way in.

use std::fmt::Debug;

use sam_core::{
    BaseOptimizer, Error, GroupOptions, Gsam, Interval, LookSam, LookSamConfig, Optimizer,
    Perturbation, Sam, SamOptimizer, Wasam, WasamState, Wsam,
};

use crate::config::{BaseRaw, VariantRaw, Wrap};

/// How a variant perturbs one group: `(ρ, Some(η) if adaptive, ε)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerturbParams {
    /// ρ of the group (GSAM: the scheduled ρ of this step).
    pub rho: f64,
    /// `Some(η)` for an adaptive group.
    pub eta: Option<f64>,
    /// ε of the perturbation.
    pub eps: f64,
}

impl PerturbParams {
    /// The parameters of a group under a variant with per-group ρ / adaptive overrides.
    fn of_group(p: &Perturbation, o: &GroupOptions) -> Self {
        Self {
            rho: o.rho().unwrap_or(p.rho),
            eta: o.adaptive().unwrap_or(p.adaptive).then_some(p.eta),
            eps: p.eps,
        }
    }
}

/// How a drawn optimizer takes a step.
pub enum Form<'a, S> {
    /// The SAM family: the two-call step (`first_step` … finish) and the two-call closure step.
    Sam(&'a mut S),
    /// The base optimizer: one gradient, one call.
    Base(&'a mut BaseOptimizer),
}

/// An optimizer the checks can drive: the `sam_core` interface plus the facts about the drawn
/// variant that the predictions depend on. Implemented by the five optimizer types, by
/// `LookSam` and by `Interval` over the four SAM variants.
///
/// The answers are about the **next** step: LookSAM and `Interval` alternate between climbing
/// (two-gradient) steps and steps that take one gradient.
pub trait Drawn: Optimizer + Clone + Debug {
    /// How the next first step perturbs a group (`None` for the base optimizer and for a step
    /// that does not climb).
    fn perturb_params(&self, o: &GroupOptions) -> Option<PerturbParams>;

    /// Whether the next step climbs (takes two gradients); the base optimizer's does not, but it
    /// has no two-call form either ([`Form::Base`]).
    fn climbs(&self) -> bool {
        true
    }

    /// Whether the next step's first half stashes the clean gradient (GSAM, WSAM, a LookSAM
    /// refresh).
    fn stashes(&self) -> bool {
        false
    }

    /// Whether a non-finite second gradient is guaranteed to skip the step.
    fn checks_second(&self) -> bool;

    /// Whether the base step takes the second gradient as it is (SAM, WASAM, a plain step of
    /// `Interval`), so that an external finish leaves exactly that gradient in the buffers.
    fn is_sam_like(&self) -> bool {
        false
    }

    /// Whether the next step is a LookSAM refresh (which can refuse a projection coefficient
    /// beyond `f64`, `NormOverflow`).
    fn looksam_refresh(&self) -> bool {
        false
    }

    /// Whether WASAM's swaps and `update_averages` can be called (not through `Interval`, which
    /// does not hand out its inner optimizer mutably).
    fn swappable(&self) -> bool {
        self.wasam().is_some()
    }

    /// The lr the next step uses in a group.
    fn lr_used(&self, o: &GroupOptions) -> f64 {
        self.lr_at(self.steps(), o.base().lr())
    }

    /// How the optimizer takes a step.
    fn form(&mut self) -> Form<'_, impl SamOptimizer>;

    /// GSAM, if that is the variant.
    fn gsam(&self) -> Option<&Gsam> {
        None
    }

    /// WSAM, if that is the variant.
    fn wsam(&self) -> Option<&Wsam> {
        None
    }

    /// WASAM, if that is the variant.
    fn wasam(&self) -> Option<&Wasam> {
        None
    }

    /// WASAM, if that is the variant.
    fn wasam_mut(&mut self) -> Option<&mut Wasam> {
        None
    }

    /// Edits a checkpoint as a hostile caller would: sets the step count and (WASAM) the
    /// snapshot counts, flips WASAM's pending fold. Returns whether the result is a state no run
    /// produces, which `load_state` must refuse.
    fn edit_state(
        state: &mut Self::State,
        steps: Option<u64>,
        counts: Option<u64>,
        flip: bool,
    ) -> bool;
}

/// The step count of the plain host state, as [`Drawn::edit_state`] edits it.
fn edit_steps(state: &mut sam_core::OptimizerState, steps: Option<u64>) -> bool {
    if let Some(s) = steps {
        state.steps = s;
    }
    false
}

impl Drawn for Sam {
    fn perturb_params(&self, o: &GroupOptions) -> Option<PerturbParams> {
        Some(PerturbParams::of_group(&self.config().perturbation, o))
    }
    fn checks_second(&self) -> bool {
        self.config().check_second_gradient
    }
    fn is_sam_like(&self) -> bool {
        true
    }
    fn form(&mut self) -> Form<'_, impl SamOptimizer> {
        Form::Sam(self)
    }
    fn edit_state(s: &mut Self::State, steps: Option<u64>, _: Option<u64>, _: bool) -> bool {
        edit_steps(s, steps)
    }
}

impl Drawn for Gsam {
    fn perturb_params(&self, _: &GroupOptions) -> Option<PerturbParams> {
        let p = &self.config().perturbation;
        Some(PerturbParams {
            rho: self.rho_at(self.steps()),
            eta: p.adaptive.then_some(p.eta),
            eps: p.eps,
        })
    }
    fn stashes(&self) -> bool {
        true
    }
    fn checks_second(&self) -> bool {
        true
    }
    fn form(&mut self) -> Form<'_, impl SamOptimizer> {
        Form::Sam(self)
    }
    fn gsam(&self) -> Option<&Gsam> {
        Some(self)
    }
    fn edit_state(s: &mut Self::State, steps: Option<u64>, _: Option<u64>, _: bool) -> bool {
        edit_steps(s, steps)
    }
}

impl Drawn for Wsam {
    fn perturb_params(&self, o: &GroupOptions) -> Option<PerturbParams> {
        Some(PerturbParams::of_group(&self.config().perturbation, o))
    }
    fn stashes(&self) -> bool {
        true
    }
    fn checks_second(&self) -> bool {
        self.config().check_second_gradient || self.config().max_norm.is_some()
    }
    fn form(&mut self) -> Form<'_, impl SamOptimizer> {
        Form::Sam(self)
    }
    fn wsam(&self) -> Option<&Wsam> {
        Some(self)
    }
    fn edit_state(s: &mut Self::State, steps: Option<u64>, _: Option<u64>, _: bool) -> bool {
        edit_steps(s, steps)
    }
}

impl Drawn for Wasam {
    fn perturb_params(&self, o: &GroupOptions) -> Option<PerturbParams> {
        Some(PerturbParams::of_group(&self.config().perturbation, o))
    }
    fn checks_second(&self) -> bool {
        self.config().check_second_gradient
    }
    fn is_sam_like(&self) -> bool {
        true
    }
    fn form(&mut self) -> Form<'_, impl SamOptimizer> {
        Form::Sam(self)
    }
    fn wasam(&self) -> Option<&Wasam> {
        Some(self)
    }
    fn wasam_mut(&mut self) -> Option<&mut Wasam> {
        Some(self)
    }
    fn edit_state(
        st: &mut WasamState,
        steps: Option<u64>,
        counts: Option<u64>,
        flip: bool,
    ) -> bool {
        if let Some(s) = steps {
            st.steps = s;
        }
        if let Some(c) = counts {
            st.counts = [c; sam_core::backend::MAX_AVERAGES];
        }
        st.pending_fold ^= flip;
        // No run leaves a fold pending before its first step.
        st.pending_fold && st.steps == 0
    }
}

impl Drawn for LookSam {
    fn perturb_params(&self, o: &GroupOptions) -> Option<PerturbParams> {
        self.refreshes()
            .then(|| PerturbParams::of_group(&self.config().perturbation, o))
    }
    fn climbs(&self) -> bool {
        self.refreshes()
    }
    fn stashes(&self) -> bool {
        self.refreshes()
    }
    fn checks_second(&self) -> bool {
        self.refreshes()
    }
    fn is_sam_like(&self) -> bool {
        // Between refreshes an external finish leaves `g + α·(‖g‖/‖g_v‖)·g_v`.
        self.refreshes()
    }
    fn looksam_refresh(&self) -> bool {
        self.refreshes()
    }
    fn form(&mut self) -> Form<'_, impl SamOptimizer> {
        Form::Sam(self)
    }
    fn edit_state(s: &mut Self::State, steps: Option<u64>, _: Option<u64>, _: bool) -> bool {
        edit_steps(s, steps)
    }
}

/// The inner variant's answers on climbing steps; a plain base step with the current gradient
/// otherwise.
impl<O: Drawn + SamOptimizer> Drawn for Interval<O> {
    fn perturb_params(&self, o: &GroupOptions) -> Option<PerturbParams> {
        self.will_climb()
            .then(|| self.inner().perturb_params(o))
            .flatten()
    }
    fn climbs(&self) -> bool {
        self.will_climb()
    }
    fn stashes(&self) -> bool {
        self.will_climb() && self.inner().stashes()
    }
    fn checks_second(&self) -> bool {
        self.will_climb() && self.inner().checks_second()
    }
    fn is_sam_like(&self) -> bool {
        !self.will_climb() || self.inner().is_sam_like()
    }
    fn looksam_refresh(&self) -> bool {
        self.will_climb() && self.inner().looksam_refresh()
    }
    fn swappable(&self) -> bool {
        false
    }
    fn form(&mut self) -> Form<'_, impl SamOptimizer> {
        Form::Sam(self)
    }
    fn gsam(&self) -> Option<&Gsam> {
        self.will_climb().then(|| self.inner().gsam()).flatten()
    }
    fn wsam(&self) -> Option<&Wsam> {
        self.will_climb().then(|| self.inner().wsam()).flatten()
    }
    /// Always the inner WASAM (its fold owed and its averages are read on every step).
    fn wasam(&self) -> Option<&Wasam> {
        self.inner().wasam()
    }
    fn edit_state(
        state: &mut Self::State,
        steps: Option<u64>,
        counts: Option<u64>,
        flip: bool,
    ) -> bool {
        O::edit_state(state, steps, counts, flip)
    }
}

impl Drawn for BaseOptimizer {
    fn perturb_params(&self, _: &GroupOptions) -> Option<PerturbParams> {
        None
    }
    fn checks_second(&self) -> bool {
        false
    }
    fn form(&mut self) -> Form<'_, impl SamOptimizer> {
        // `Sam` only names the type of the variant that is not used here.
        Form::<Sam>::Base(self)
    }
    fn edit_state(s: &mut Self::State, steps: Option<u64>, _: Option<u64>, _: bool) -> bool {
        edit_steps(s, steps)
    }
}

/// A computation over whichever optimizer a drawn configuration builds: the generic closure
/// that [`VariantRaw::build_into`] calls with the concrete type.
pub trait WithDrawn {
    /// What the computation returns.
    type Out;
    /// Runs the computation on a freshly built optimizer.
    fn run<O: Drawn>(self, opt: O) -> Self::Out;
}

impl VariantRaw {
    /// Validates through `sam-core` and runs `f` on the optimizer built.
    pub fn build_into<W: WithDrawn>(&self, f: W) -> Result<W::Out, Error> {
        self.build_wrapped(Wrap::None, f)
    }

    /// The climb of a variant that has one of its own (SAM, WSAM, WASAM), for LookSAM.
    fn perturbation(&self) -> Option<Perturbation> {
        match self {
            VariantRaw::Sam(c) | VariantRaw::Wasam(c, _) => Some(c.perturbation),
            VariantRaw::Wsam(c) => Some(c.perturbation),
            VariantRaw::Gsam(_) | VariantRaw::Base => None,
        }
    }

    /// [`build_into`](Self::build_into) with the variant wrapped as `wrap` says (a wrapper
    /// that does not apply to the variant is ignored).
    pub fn build_wrapped<W: WithDrawn>(&self, wrap: Wrap, f: W) -> Result<W::Out, Error> {
        if let (Wrap::LookSam { k, alpha }, Some(perturbation)) = (wrap, self.perturbation()) {
            return Ok(f.run(LookSam::new(LookSamConfig {
                perturbation,
                k,
                alpha,
            })?));
        }
        let every = match wrap {
            Wrap::Interval(k) => Some(k),
            _ => None,
        };
        Ok(match (self, every) {
            (VariantRaw::Sam(c), None) => f.run(Sam::new(*c)?),
            (VariantRaw::Sam(c), Some(k)) => f.run(Interval::new(Sam::new(*c)?, k)?),
            (VariantRaw::Gsam(g), None) => f.run(g.build()?),
            (VariantRaw::Gsam(g), Some(k)) => f.run(Interval::new(g.build()?, k)?),
            (VariantRaw::Wsam(c), None) => f.run(Wsam::new(*c)?),
            (VariantRaw::Wsam(c), Some(k)) => f.run(Interval::new(Wsam::new(*c)?, k)?),
            (VariantRaw::Wasam(c, starts), None) => f.run(Wasam::new(*c, starts)?),
            (VariantRaw::Wasam(c, starts), Some(k)) => {
                f.run(Interval::new(Wasam::new(*c, starts)?, k)?)
            }
            (VariantRaw::Base, _) => f.run(BaseOptimizer::new()),
        })
    }
}

/// The raw configuration of a validated base rule (to test its normal ranges).
pub fn base_raw(o: &GroupOptions) -> Option<BaseRaw> {
    let b = o.base();
    if let Some(c) = b.as_sgd() {
        Some(BaseRaw::Sgd(*c))
    } else {
        b.as_adam().map(|(c, decoupled)| {
            if decoupled {
                BaseRaw::AdamW(*c)
            } else {
                BaseRaw::Adam(*c)
            }
        })
    }
}
