//! What the step checks need to know about an optimizer built from a drawn configuration.
//!
//! The checks drive the optimizers through `sam_core::Optimizer` and `sam_core::SamOptimizer`;
//! this module only answers questions about the drawn variant (its perturbation parameters,
//! whether it stashes, whether it checks the second gradient).

use sam_core::backend::SlotSpec;
use sam_core::{BaseOptimizer, GroupOptions, Optimizer, Phase};

use crate::config::{BaseRaw, Opt};

/// Calls the same `Optimizer` method on whichever optimizer an [`Opt`] holds.
macro_rules! each {
    ($opt:expr, $o:ident => $e:expr) => {
        match $opt {
            Opt::Sam($o) => $e,
            Opt::Gsam($o) => $e,
            Opt::Wsam($o) => $e,
            Opt::Wasam($o) => $e,
            Opt::Base($o) => $e,
        }
    };
}

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
        each!(self, o => o.phase())
    }

    /// Steps applied.
    pub fn steps(&self) -> u64 {
        each!(self, o => o.steps())
    }

    /// The slots a group needs.
    pub fn slot_spec(&self, o: &GroupOptions) -> SlotSpec {
        each!(self, v => v.slot_spec(o))
    }

    /// How the next first step perturbs a group (`None` for the base optimizer).
    pub fn perturb_params(&self, o: &GroupOptions) -> Option<PerturbParams> {
        let group = |p: &sam_core::Perturbation| PerturbParams {
            rho: o.rho().unwrap_or(p.rho),
            eta: o.adaptive().unwrap_or(p.adaptive).then_some(p.eta),
            eps: p.eps,
        };
        match self {
            Opt::Sam(v) => Some(group(&v.config().perturbation)),
            Opt::Wasam(v) => Some(group(&v.config().perturbation)),
            Opt::Wsam(v) => Some(group(&v.config().perturbation)),
            Opt::Gsam(v) => {
                let p = &v.config().perturbation;
                Some(PerturbParams {
                    rho: v.rho_at(v.steps()),
                    eta: p.adaptive.then_some(p.eta),
                    eps: p.eps,
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
        each!(self, v => v.lr_at(v.steps(), o.base().lr()))
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
