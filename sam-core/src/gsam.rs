//! GSAM: surrogate-gap guided SAM.

use crate::buffer::{
    AverageFold, GradMix, ParamBuffer, ReduceSpec, SlotSpec, UpdateSpec, Weighting,
};
use crate::engine::{Engine, StepStatus};
use crate::error::{Error, invalid};
use crate::group::{Group, GroupOptions};
use crate::guard::{Finish, Perturbed, SamFamily, private};
use crate::sam::{base_step, perturb_spec, skip_second, stash_slots};
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

/// When ρ and the lr are read from their schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Timeline {
    /// The PyTorch reference's timeline (SCHEMA.md §7.4): the lr used at step `t ≥ 1` is
    /// `S_lr(t − 1)` (the groups' own lr at step 0), ρ at step `t` is `S_ρ(t)`, and a
    /// proportional ρ follows the lr one step ahead (`P(init_value)` at step 0).
    #[default]
    Upstream,
    /// Both from the same step (the official JAX code): lr `S_lr(t)`, ρ `S_ρ(t)` or
    /// `P(S_lr(t))`.
    Synced,
}

/// Hyperparameters of [`Gsam`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GsamConfig {
    /// α ≥ 0 (finite): weight of the ascent on the surrogate gap. Upstream example: `0.4`.
    pub alpha: f64,
    /// The ρ schedule (global, as upstream; values must be ≥ 0 when used).
    pub rho: RhoSchedule,
    /// Optional lr schedule applied to every group (overrides the groups' lr). Default none.
    pub lr_schedule: Option<Schedule>,
    /// Which step each schedule is read at. Default [`Timeline::Upstream`].
    pub timeline: Timeline,
    /// Adaptive perturbation (global, as upstream): `T = |w| + eta`. Default `false`.
    pub adaptive: bool,
    /// ASAM offset η ≥ 0. Default `0`.
    pub eta: f64,
    /// ε ≥ 0 (finite) of the perturbation and of the decomposition. Default `1e-12`.
    pub perturb_eps: f64,
}

impl GsamConfig {
    /// Defaults (`alpha = 0.4`, `perturb_eps = 1e-12`, upstream timeline) around a ρ schedule.
    pub fn new(rho: RhoSchedule) -> Self {
        GsamConfig {
            alpha: 0.4,
            rho,
            lr_schedule: None,
            timeline: Timeline::Upstream,
            adaptive: false,
            eta: 0.0,
            perturb_eps: 1e-12,
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
/// `scheduler.py` (conformance `SCHEMA.md` §7.4). Differences: the weights are restored from a
/// copy (upstream subtracts `e`, about 1 ulp apart), and ρ and adaptivity are global, so groups
/// with `rho`/`adaptive` overrides are rejected.
///
/// ```
/// use sam_core::{BaseRule, Group, Gsam, GsamConfig, RhoSchedule, Schedule, SgdConfig, reference::SliceBuffer};
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
        if !(cfg.alpha >= 0.0 && cfg.alpha.is_finite()) {
            return Err(invalid("alpha", "alpha must be finite and >= 0"));
        }
        if !(cfg.eta >= 0.0 && cfg.eta.is_finite()) {
            return Err(invalid("eta", "eta must be finite and >= 0"));
        }
        if !(cfg.perturb_eps >= 0.0 && cfg.perturb_eps.is_finite()) {
            return Err(invalid(
                "perturb_eps",
                "perturb_eps must be finite and >= 0",
            ));
        }
        if let RhoSchedule::Proportional(p) = &cfg.rho {
            p.validate()?;
            if cfg.lr_schedule.is_none() {
                return Err(invalid(
                    "rho",
                    "a proportional rho schedule needs an lr schedule",
                ));
            }
        }
        Ok(Gsam {
            cfg,
            engine: Engine::new(),
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &GsamConfig {
        &self.cfg
    }

    /// The slots a group needs: backup, stash and the base rule's state.
    pub fn slot_spec(&self, options: &GroupOptions) -> SlotSpec {
        stash_slots(options)
    }

    /// The lr step `t` uses in a group whose own lr is `group_lr`.
    pub fn lr_at(&self, t: u64, group_lr: f64) -> f64 {
        match (&self.cfg.lr_schedule, self.cfg.timeline) {
            (None, _) => group_lr,
            (Some(s), Timeline::Synced) => s.value(t),
            (Some(_), Timeline::Upstream) if t == 0 => group_lr,
            (Some(s), Timeline::Upstream) => s.value(t - 1),
        }
    }

    /// The ρ step `t` uses.
    pub fn rho_at(&self, t: u64) -> f64 {
        match (&self.cfg.rho, &self.cfg.lr_schedule) {
            (RhoSchedule::Schedule(s), _) => s.value(t),
            (RhoSchedule::Proportional(p), Some(lr)) => match self.cfg.timeline {
                Timeline::Synced => p.value(lr.value(t)),
                Timeline::Upstream if t == 0 => p.value(lr.config().init_value),
                Timeline::Upstream => p.value(lr.value(t - 1)),
            },
            // Rejected at construction.
            (RhoSchedule::Proportional(p), None) => p.max_value,
        }
    }

    fn weighting(&self) -> Weighting {
        if self.cfg.adaptive {
            Weighting::Adaptive { eta: self.cfg.eta }
        } else {
            Weighting::Plain
        }
    }

    /// First half of a step: perturbs with ρ_t and stashes the clean gradient.
    pub fn first_step<'a, B: ParamBuffer>(
        &'a mut self,
        groups: &'a mut [Group<B>],
    ) -> Result<Perturbed<'a, Self, B>, Error<B::Error>> {
        if groups
            .iter()
            .any(|g| g.options.rho().is_some() || g.options.adaptive().is_some())
        {
            return Err(Error::InvalidGroups {
                message: "GSAM uses one global rho schedule and adaptivity: remove per-group rho/adaptive overrides",
            });
        }
        let t = self.engine.steps;
        let rho = self.rho_at(t);
        if !(rho >= 0.0 && rho.is_finite()) {
            return Err(Error::InvalidHyperparameter {
                name: "rho",
                message: "the rho schedule gave a negative or non-finite value",
            });
        }
        if groups.iter().any(|g| {
            let lr = self.lr_at(t, g.options.base().lr());
            !(lr >= 0.0 && lr.is_finite())
        }) {
            return Err(Error::InvalidHyperparameter {
                name: "lr",
                message: "the lr schedule gave a negative or non-finite value",
            });
        }
        let weighting = self.weighting();
        let eps = self.cfg.perturb_eps;
        self.engine.begin(groups, stash_slots)?;
        let norms = Engine::norms(groups, |_, s| ReduceSpec {
            perturb: Some(weighting),
            scale_perturb: s[0],
            ..ReduceSpec::FINITE_ONLY
        })?;
        if !norms.finite {
            return Err(Error::NonFiniteGradient);
        }
        if !norms.perturb_scaled.is_finite() {
            return Err(Error::NormOverflow);
        }
        Engine::perturb_all(groups, |_| perturb_spec(weighting, rho, eps, &norms, true))?;
        Ok(Perturbed::new(self, groups))
    }
}

impl private::Sealed for Gsam {}

impl SamFamily for Gsam {
    fn engine_mut(&mut self, _: private::Token) -> &mut Engine {
        &mut self.engine
    }

    fn second<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
        finish: Finish,
        _: private::Token,
    ) -> Result<StepStatus, Error<B::Error>> {
        // The decomposition reads g₂ in full, so its finiteness is always checked (free here).
        let n = Engine::norms(groups, |_, s| ReduceSpec {
            grad: true,
            stash: true,
            dot: true,
            scale_grad: s[1],
            scale_stash: s[2],
            ..ReduceSpec::FINITE_ONLY
        });
        let n = Engine::or_restore(groups, n)?;
        if !n.finite {
            return skip_second(groups);
        }
        let eps = self.cfg.perturb_eps;
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
        let t = self.engine.steps;
        let step = t.saturating_add(1);
        let this = &*self;
        Engine::update_all(groups, true, |_, o| UpdateSpec {
            restore: true,
            grad: GradMix::Mix { a, b: -alpha },
            base: base_step(o, step, this.lr_at(t, o.base().lr()), finish),
            post: None,
            average: AverageFold::NONE,
        })?;
        self.engine.steps = step;
        Ok(StepStatus::Applied)
    }
}

crate::guard::family_methods!(Gsam, simple_state);
