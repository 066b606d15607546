//! One interface over the optimizers of `sam-core`, for the step checks.

use sam_core::{
    BaseOptimizer, Error, Group, GroupOptions, Gsam, ParamBuffer, Perturbed, Phase, Sam, SamFamily,
    SlotSpec, StepReport, Wasam, Wsam,
};

use crate::config::{BaseRaw, Opt};

/// The two-gradient optimizers, through one trait.
pub trait Variant: SamFamily + Sized {
    /// `first_step`.
    fn first<'a, B: ParamBuffer>(
        &'a mut self,
        groups: &'a mut [Group<B>],
    ) -> Result<Perturbed<'a, Self, B>, Error<B::Error>>;
    /// `step` with a closure.
    fn closure_step<B, C, F>(&mut self, groups: &mut [Group<B>], f: F) -> Result<StepReport<()>, C>
    where
        B: ParamBuffer,
        C: From<Error<B::Error>>,
        F: FnMut(&mut [Group<B>]) -> Result<(), C>;
    /// `recover`.
    fn recover_groups<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
    ) -> Result<(), Error<B::Error>>;
    /// `phase`.
    fn phase_now(&self) -> Phase;
}

macro_rules! variant {
    ($t:ty) => {
        impl Variant for $t {
            fn first<'a, B: ParamBuffer>(
                &'a mut self,
                groups: &'a mut [Group<B>],
            ) -> Result<Perturbed<'a, Self, B>, Error<B::Error>> {
                self.first_step(groups)
            }
            fn closure_step<B, C, F>(
                &mut self,
                groups: &mut [Group<B>],
                f: F,
            ) -> Result<StepReport<()>, C>
            where
                B: ParamBuffer,
                C: From<Error<B::Error>>,
                F: FnMut(&mut [Group<B>]) -> Result<(), C>,
            {
                self.step(groups, f)
            }
            fn recover_groups<B: ParamBuffer>(
                &mut self,
                groups: &mut [Group<B>],
            ) -> Result<(), Error<B::Error>> {
                self.recover(groups)
            }
            fn phase_now(&self) -> Phase {
                self.phase()
            }
        }
    };
}

variant!(Sam);
variant!(Gsam);
variant!(Wsam);
variant!(Wasam);

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

impl Opt {
    /// The optimizer's phase (the base optimizer is always idle).
    pub fn phase(&self) -> Phase {
        match self {
            Opt::Sam(o) => o.phase(),
            Opt::Gsam(o) => o.phase(),
            Opt::Wsam(o) => o.phase(),
            Opt::Wasam(o) => o.phase(),
            Opt::Base(_) => Phase::Idle,
        }
    }

    /// Steps applied.
    pub fn steps(&self) -> u64 {
        match self {
            Opt::Sam(o) => o.steps(),
            Opt::Gsam(o) => o.steps(),
            Opt::Wsam(o) => o.steps(),
            Opt::Wasam(o) => o.steps(),
            Opt::Base(o) => o.steps(),
        }
    }

    /// The slots a group needs.
    pub fn slot_spec(&self, o: &GroupOptions) -> SlotSpec {
        match self {
            Opt::Sam(v) => v.slot_spec(o),
            Opt::Gsam(v) => v.slot_spec(o),
            Opt::Wsam(v) => v.slot_spec(o),
            Opt::Wasam(v) => v.slot_spec(o),
            Opt::Base(v) => v.slot_spec(o),
        }
    }

    /// How the next first step perturbs a group (`None` for the base optimizer).
    pub fn perturb_params(&self, o: &GroupOptions) -> Option<PerturbParams> {
        let pick = |adaptive: bool, eta: f64| adaptive.then_some(eta);
        match self {
            Opt::Sam(v) => {
                let c = v.config();
                Some(PerturbParams {
                    rho: o.rho().unwrap_or(c.rho),
                    eta: pick(o.adaptive().unwrap_or(c.adaptive), c.eta),
                    eps: c.eps,
                })
            }
            Opt::Wasam(v) => {
                let c = v.config();
                Some(PerturbParams {
                    rho: o.rho().unwrap_or(c.rho),
                    eta: pick(o.adaptive().unwrap_or(c.adaptive), c.eta),
                    eps: c.eps,
                })
            }
            Opt::Wsam(v) => {
                let c = v.config();
                Some(PerturbParams {
                    rho: o.rho().unwrap_or(c.rho),
                    eta: pick(o.adaptive().unwrap_or(c.adaptive), c.eta),
                    eps: c.sam_eps,
                })
            }
            Opt::Gsam(v) => {
                let c = v.config();
                Some(PerturbParams {
                    rho: v.rho_at(v.steps()),
                    eta: pick(c.adaptive, c.eta),
                    eps: c.perturb_eps,
                })
            }
            Opt::Base(_) => None,
        }
    }

    /// Whether the clean gradient is stashed (GSAM, WSAM).
    pub fn stashes(&self) -> bool {
        matches!(self, Opt::Gsam(_) | Opt::Wsam(_))
    }

    /// Whether a non-finite second gradient is guaranteed to skip the step.
    pub fn checks_second(&self) -> bool {
        match self {
            Opt::Sam(v) => v.config().check_second_gradient,
            Opt::Wasam(v) => v.config().check_second_gradient,
            Opt::Wsam(v) => v.config().check_second_gradient || v.config().max_norm.is_some(),
            Opt::Gsam(_) => true,
            Opt::Base(_) => false,
        }
    }

    /// The lr the next step uses in a group.
    pub fn lr_used(&self, o: &GroupOptions) -> f64 {
        match self {
            Opt::Gsam(v) => v.lr_at(v.steps(), o.base().lr()),
            _ => o.base().lr(),
        }
    }

    /// The base optimizer, if that is the variant.
    pub fn as_base(&mut self) -> Option<&mut BaseOptimizer> {
        match self {
            Opt::Base(b) => Some(b),
            _ => None,
        }
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
