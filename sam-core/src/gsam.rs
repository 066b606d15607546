//! GSAM: surrogate-gap guided SAM.

use crate::backend::{AverageFold, GradMix, ParamBuffer, ReduceSpec, SlotSpec, Weighting};
use crate::engine::{Engine, OptimizerState, StepStatus, Timeline};
use crate::error::{Error, invalid, non_negative};
use crate::group::{Group, GroupOptions};
use crate::optimizer::{Optimizer, SamOptimizer, sealed};
use crate::perturbation::Perturbation;
use crate::phases::{self, Combine, Finish};
use crate::schedule::{Proportional, Schedule};

/// Where ρ comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum RhoSchedule {
    /// A schedule of the step index (use [`Schedule::constant`] for a fixed ρ).
    Schedule(Schedule),
    /// Proportional to the learning rate schedule (needs [`GsamConfig::lr_schedule`]).
    Proportional(Proportional),
}

/// Hyperparameters of [`Gsam`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GsamConfig {
    /// α ≥ 0 (finite): weight of the ascent on the surrogate gap. Upstream example: `0.4`.
    pub alpha: f64,
    /// The climb. Its `adaptive` and `eta` are global, as upstream (groups may not override
    /// them); its `eps` is also the ε of the decomposition; its `rho` is the constant radius
    /// used when `rho_schedule` is `None`.
    pub perturbation: Perturbation,
    /// The ρ schedule, if ρ changes over training (values must be ≥ 0 when used).
    pub rho_schedule: Option<RhoSchedule>,
    /// Optional lr schedule applied to every group (overrides the groups' lr); the same as
    /// [`Optimizer::set_lr_schedule`]. Default none.
    pub lr_schedule: Option<Schedule>,
    /// Which step each schedule is read at. Default [`Timeline::Upstream`].
    pub timeline: Timeline,
}

impl GsamConfig {
    /// Defaults (`alpha = 0.4`, `eps = 1e-12`, upstream timeline) around a ρ schedule.
    pub fn new(rho: RhoSchedule) -> Self {
        GsamConfig {
            alpha: 0.4,
            perturbation: Perturbation::default(),
            rho_schedule: Some(rho),
            lr_schedule: None,
            timeline: Timeline::Upstream,
        }
    }
}

/// Surrogate Gap Guided SAM (GSAM).
///
/// With ρ_t and lr_t from their schedules (see [`Timeline`]):
///
/// ```text
/// g₁ = ∇L(w);  e = ρ_t·T²⊙g₁/(‖T⊙g₁‖ + ε);  g₂ = ∇L(w + e)
/// cos = ⟨g₁, g₂⟩ / (‖g₂‖‖g₁‖ + ε)
/// d = g₂ − α·(g₁ − cos·‖g₁‖·g₂/(‖g₂‖ + ε))   = a·g₂ + b·g₁ with a = 1 + α·cos·‖g₁‖/(‖g₂‖+ε), b = −α
/// w ← w (restored exactly);  base step with d at lr_t
/// ```
///
/// The subtracted term is the part of g₁ orthogonal to g₂: descending along it lowers the
/// surrogate gap `L(w+e) − L(w)` without changing the perturbed loss to first order.
/// With α = 0 this is SAM with ρ = ρ_t.
///
/// Reference: Zhuang et al., *Surrogate Gap Minimization Improves Sharpness-Aware Training*,
/// ICLR 2022, <https://arxiv.org/abs/2203.08065>; upstream juntang-zhuang/GSAM `gsam.py`,
/// `scheduler.py` (conformance `verification/SCHEMA.md` §7.4). Differences: the weights are restored from a
/// copy (upstream subtracts `e`, about 1 ulp apart), and ρ and adaptivity are global, so groups
/// with `rho`/`adaptive` overrides are rejected.
///
/// ```
/// use sam_core::{BaseRule, Group, Gsam, GsamConfig, Optimizer, RhoSchedule, Schedule, SgdConfig};
/// use sam_core::reference::SliceBuffer;
/// let mut w = [1.0_f64, -2.0];
/// let mut g = [0.0; 2];
/// let mut slots = [0.0; 2 * 2]; // backup, stash
/// let base = BaseRule::sgd(SgdConfig { lr: 0.1, ..Default::default() })?;
/// let mut groups = [Group::new(SliceBuffer::new(&mut w, &mut g, &mut slots)?, base)];
/// let mut gsam = Gsam::new(GsamConfig::new(RhoSchedule::Schedule(Schedule::constant(0.05)?)))?;
/// let report = gsam.step(&mut groups, |gs| {
///     let (w, g) = gs[0].buffer.weights_and_grad();
///     g.copy_from_slice(w);
///     Ok::<_, sam_core::Error<_>>(0.5 * (w[0] * w[0] + w[1] * w[1]))
/// })?;
/// assert_eq!(report.loss, 2.5);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Gsam {
    cfg: GsamConfig,
    engine: Engine,
}

impl Gsam {
    /// A GSAM optimizer; rejects out-of-domain hyperparameters (NaN included).
    pub fn new(cfg: GsamConfig) -> Result<Self, Error> {
        non_negative("alpha", cfg.alpha)?;
        cfg.perturbation.validate()?;
        if let Some(RhoSchedule::Proportional(p)) = &cfg.rho_schedule {
            p.validate()?;
        }
        let mut engine = Engine::new();
        engine.timeline = cfg.timeline;
        let mut gsam = Gsam { cfg, engine };
        use sealed::Core;
        gsam.accepts_lr_schedule(cfg.lr_schedule.as_ref())?;
        gsam.engine.lr_schedule = cfg.lr_schedule;
        Ok(gsam)
    }

    /// The hyperparameters (`lr_schedule` as at construction; see
    /// [`Optimizer::lr_schedule`] for the current one).
    pub fn config(&self) -> &GsamConfig {
        &self.cfg
    }

    /// The ρ step `t` uses.
    pub fn rho_at(&self, t: u64) -> f64 {
        let lr = self.engine.lr_schedule.as_ref();
        match (&self.cfg.rho_schedule, lr) {
            (None, _) => self.cfg.perturbation.rho,
            (Some(RhoSchedule::Schedule(s)), _) => s.value(t),
            (Some(RhoSchedule::Proportional(p)), Some(lr)) => match self.engine.timeline {
                Timeline::Synced => p.value(lr.value(t)),
                Timeline::Upstream if t == 0 => p.value(lr.config().init_value),
                Timeline::Upstream => p.value(lr.value(t - 1)),
            },
            // Refused by `accepts_lr_schedule`.
            (Some(RhoSchedule::Proportional(p)), None) => p.max_value,
        }
    }

    fn weighting(&self) -> Weighting {
        let p = &self.cfg.perturbation;
        if p.adaptive {
            Weighting::Adaptive { eta: p.eta }
        } else {
            Weighting::Plain
        }
    }
}

impl sealed::Core for Gsam {
    fn engine(&self) -> &Engine {
        &self.engine
    }

    fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    fn accepts_lr_schedule(&self, schedule: Option<&Schedule>) -> Result<(), Error> {
        if schedule.is_none() && matches!(self.cfg.rho_schedule, Some(RhoSchedule::Proportional(_)))
        {
            return Err(invalid(
                "rho",
                "a proportional rho schedule needs an lr schedule",
            ));
        }
        Ok(())
    }

    /// Perturbs with ρ_t and stashes the clean gradient.
    fn first_half<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
    ) -> Result<bool, Error<B::Error>> {
        if groups
            .iter()
            .any(|g| g.options.rho().is_some() || g.options.adaptive().is_some())
        {
            return Err(Error::InvalidGroups {
                message: "GSAM uses one global rho schedule and adaptivity: remove per-group rho/adaptive overrides",
            });
        }
        let rho = self.rho_at(self.engine.steps);
        if !(rho >= 0.0 && rho.is_finite()) {
            return Err(Error::InvalidHyperparameter {
                name: "rho",
                message: "the rho schedule gave a negative or non-finite value",
            });
        }
        let weighting = self.weighting();
        let layout = |o: &GroupOptions| phases::slots(o, true, true, 0);
        let norms = phases::climb_norms(&mut self.engine, groups, layout, |_| weighting, false)?;
        let eps = self.cfg.perturbation.eps;
        phases::climb(groups, &norms, eps, true, |_| (rho, weighting))?;
        Ok(true)
    }

    fn second_half<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
        finish: Finish,
    ) -> Result<StepStatus, Error<B::Error>> {
        // The decomposition reads g₂ in full, so its finiteness is always checked (free here).
        let n = phases::second_norms(groups, self.engine.unscale(), |_, s| ReduceSpec {
            grad: true,
            stash: true,
            dot: true,
            scale_grad: s[1],
            scale_stash: s[2],
            ..ReduceSpec::FINITE_ONLY
        })?;
        let n = match n {
            Ok(n) => n,
            Err(skip) => return Ok(skip),
        };
        let eps = self.cfg.perturbation.eps;
        if !(n.grad.is_finite() && n.stash.is_finite()) {
            Engine::restore_all(groups)?;
            return Err(Error::NormOverflow);
        }
        // cos = ⟨g₁,g₂⟩/(‖g₂‖‖g₁‖ + ε), evaluated at the reduction's scales (the same value,
        // with nothing unscaled that could overflow): dot_s/(n₂ₛ·n₁ₛ + ε·s₂·s₁). A zero
        // denominator means a zero gradient (cos = 0); an infinite ε·s₂·s₁ means ε dwarfs the
        // norms (cos = 0 to within rounding).
        // s₂·s₁ is an exact power of two when representable: then one multiplication by ε
        // (multiplying in turn could overflow or underflow in between).
        let p = n.grad_scale * n.stash_scale;
        let eps_s = if eps == 0.0 {
            0.0
        } else if p != 0.0 && p.is_finite() {
            eps * p
        } else {
            (eps * n.grad_scale) * n.stash_scale
        };
        let den = n.grad_scaled * n.stash_scaled + eps_s;
        let cos = if den > 0.0 && den.is_finite() {
            n.dot_scaled / den
        } else {
            0.0
        };
        let alpha = self.cfg.alpha;
        let a = if cos == 0.0 {
            1.0
        } else {
            1.0 + alpha * cos * n.stash / (n.grad + eps)
        };
        if !a.is_finite() {
            // ‖g₂‖ is so small next to ‖g₁‖ that the coefficient overflows (f64 extremes).
            Engine::restore_all(groups)?;
            return Err(Error::NormOverflow);
        }
        let combine = |_| Combine {
            grad: GradMix::Mix { a, b: -alpha },
            ..Combine::CURRENT
        };
        phases::restore_and_step(&mut self.engine, groups, finish, AverageFold::NONE, combine)
    }
}

impl Optimizer for Gsam {
    type State = OptimizerState;

    fn variant(&self) -> &'static str {
        "gsam"
    }

    /// The backup, the stash and the base rule's state.
    fn slot_spec(&self, options: &GroupOptions) -> SlotSpec {
        phases::slots(options, true, true, 0)
    }

    fn state(&self) -> Result<OptimizerState, Error> {
        self.engine.state()
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<(), Error> {
        self.engine.load(state)
    }
}

impl SamOptimizer for Gsam {}
