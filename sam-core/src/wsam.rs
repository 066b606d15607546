//! WSAM: sharpness as a weighted regulariser.

use crate::BaseStep;
use crate::buffer::{
    AverageFold, GradMix, ParamBuffer, PostMix, ReduceSpec, SlotSpec, UpdateSpec, Weighting,
};
use crate::engine::{Engine, StepStatus};
use crate::error::{Error, invalid};
use crate::group::{Group, GroupOptions};
use crate::guard::{Finish, Perturbed, SamFamily, private};
use crate::sam::{base_step, perturb_spec, skip_second, stash_slots};

/// Hyperparameters of [`Wsam`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct WsamConfig {
    /// Radius ρ ≥ 0 (finite); groups may override it. Default `0.05`.
    pub rho: f64,
    /// Weight of the sharpness term, `0 ≤ γ < 1`; `α = γ/(1−γ)`. Default `0.9`.
    pub gamma: f64,
    /// Adaptive perturbation `T = |w| + eta`; groups may override it. Default `false`.
    pub adaptive: bool,
    /// ASAM offset η ≥ 0. Default `0`.
    pub eta: f64,
    /// Decoupled update (base step on g₁, sharpness step separately). Default `true`.
    pub decouple: bool,
    /// Global-norm clipping of g₁ and g₂ (each separately) to this norm, if set (> 0, finite).
    /// Default none.
    pub max_norm: Option<f64>,
    /// ε ≥ 0 of the perturbation. Default `1e-12`.
    pub sam_eps: f64,
    /// Check the second gradient for NaN/∞ (see [`SamConfig`](crate::SamConfig)). Default `true`.
    pub check_second_gradient: bool,
}

impl Default for WsamConfig {
    fn default() -> Self {
        WsamConfig {
            rho: 0.05,
            gamma: 0.9,
            adaptive: false,
            eta: 0.0,
            decouple: true,
            max_norm: None,
            sam_eps: 1e-12,
            check_second_gradient: true,
        }
    }
}

/// Weighted SAM (WSAM): minimises `L(w) + γ/(1−γ)·(L(w+e) − L(w))`.
///
/// With `α = γ/(1−γ)` and optional clip factors `c₀, c₁` (`c = max_norm/(‖g‖ + 1e-6)` if below 1):
///
/// ```text
/// g₁ = ∇L(w);  e = ρ_g·T²⊙g₁/(‖T⊙g₁‖ + ε)   (from the unclipped g₁);  g₂ = ∇L(w + e)
/// coupled:    base step with d = α·c₁·g₂ + (1−α)·c₀·g₁
/// decoupled:  base step with c₀·g₁, then w ← w − lr_g·α·(c₁·g₂ − c₀·g₁)
/// ```
///
/// γ = ½ coupled is SAM; γ = 0 coupled is the base optimizer.
///
/// Reference: Yue et al., *Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
/// Regularization Term*, KDD 2023, <https://arxiv.org/abs/2305.15817>; upstream atorch
/// `WeightedSAM` (`wsam.py`; conformance `SCHEMA.md` §7.3). Difference: the weights are
/// restored from a copy (upstream subtracts `e`, about 1 ulp apart).
///
/// ```
/// use sam_core::{BaseRule, Group, SgdConfig, Wsam, WsamConfig, reference::SliceBuffer};
/// let mut w = [1.0_f32, -2.0];
/// let mut g = [0.0; 2];
/// let mut slots = [0.0; 2 * 2]; // backup, stash
/// let base = BaseRule::sgd(SgdConfig { lr: 0.1, ..Default::default() })?;
/// let mut groups = [Group::new(SliceBuffer::new(&mut w, &mut g, &mut slots)?, base)];
/// let mut wsam = Wsam::new(WsamConfig { gamma: 0.8, max_norm: Some(10.0), ..Default::default() })?;
/// wsam.step(&mut groups, |gs| {
///     let (w, g) = gs[0].buffer.weights_and_grad();
///     g.copy_from_slice(w);
///     Ok::<_, sam_core::Error<_>>(())
/// })?;
/// assert!(groups[0].buffer.weights()[0] < 1.0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Wsam {
    cfg: WsamConfig,
    alpha: f64,
    engine: Engine,
    clip1: f64,
}

/// `min(1, max_norm/(n + 1e-6))`, upstream's clip factor.
fn clip_factor(max_norm: Option<f64>, n: f64) -> f64 {
    match max_norm {
        Some(m) => {
            let c = m / (n + 1e-6);
            if c < 1.0 { c } else { 1.0 }
        }
        None => 1.0,
    }
}

impl Wsam {
    /// A WSAM optimizer; rejects out-of-domain hyperparameters (NaN included).
    pub fn new(cfg: WsamConfig) -> Result<Self, Error> {
        if !(cfg.rho >= 0.0 && cfg.rho.is_finite()) {
            return Err(invalid("rho", "rho must be finite and >= 0"));
        }
        if !(cfg.gamma >= 0.0 && cfg.gamma < 1.0) {
            return Err(invalid("gamma", "gamma must be in [0, 1)"));
        }
        if !(cfg.eta >= 0.0 && cfg.eta.is_finite()) {
            return Err(invalid("eta", "eta must be finite and >= 0"));
        }
        if !(cfg.sam_eps >= 0.0 && cfg.sam_eps.is_finite()) {
            return Err(invalid("sam_eps", "sam_eps must be finite and >= 0"));
        }
        if let Some(m) = cfg.max_norm {
            if !(m > 0.0 && m.is_finite()) {
                return Err(invalid("max_norm", "max_norm must be finite and > 0"));
            }
        }
        let alpha = cfg.gamma / (1.0 - cfg.gamma);
        Ok(Wsam {
            cfg,
            alpha,
            engine: Engine::new(),
            clip1: 1.0,
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &WsamConfig {
        &self.cfg
    }

    /// `α = γ/(1−γ)`.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The slots a group needs: backup, stash and the base rule's state.
    pub fn slot_spec(&self, options: &GroupOptions) -> SlotSpec {
        stash_slots(options)
    }

    fn weighting(&self, o: &GroupOptions) -> Weighting {
        if o.adaptive().unwrap_or(self.cfg.adaptive) {
            Weighting::Adaptive { eta: self.cfg.eta }
        } else {
            Weighting::Plain
        }
    }

    /// First half of a step: perturbs from the unclipped g₁ and stashes it.
    pub fn first_step<'a, B: ParamBuffer>(
        &'a mut self,
        groups: &'a mut [Group<B>],
    ) -> Result<Perturbed<'a, Self, B>, Error<B::Error>> {
        self.engine.begin(groups, stash_slots)?;
        let clip = self.cfg.max_norm.is_some();
        let this = &*self;
        let norms = Engine::norms(groups, |o, s| ReduceSpec {
            perturb: Some(this.weighting(o)),
            grad: clip,
            scale_perturb: s[0],
            scale_grad: s[1],
            ..ReduceSpec::FINITE_ONLY
        })?;
        if !norms.finite {
            return Err(Error::NonFiniteGradient);
        }
        if !norms.perturb_scaled.is_finite() {
            return Err(Error::NormOverflow);
        }
        let eps = self.cfg.sam_eps;
        Engine::perturb_all(groups, |o| {
            perturb_spec(
                this.weighting(o),
                o.rho().unwrap_or(this.cfg.rho),
                eps,
                &norms,
                true,
            )
        })?;
        self.clip1 = clip_factor(self.cfg.max_norm, norms.grad);
        Ok(Perturbed::new(self, groups))
    }
}

impl private::Sealed for Wsam {}

impl SamFamily for Wsam {
    fn engine_mut(&mut self, _: private::Token) -> &mut Engine {
        &mut self.engine
    }

    fn second<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
        finish: Finish,
        _: private::Token,
    ) -> Result<StepStatus, Error<B::Error>> {
        let clip = self.cfg.max_norm.is_some();
        if self.cfg.decouple && finish == Finish::External {
            Engine::restore_all(groups)?;
            return Err(Error::InvalidGroups {
                message: "decoupled WSAM applies its sharpness step after the base rule, so it needs the built-in base rule; use decouple = false with an external optimizer",
            });
        }
        let mut c1 = 1.0;
        if clip || self.cfg.check_second_gradient {
            let n = Engine::norms(groups, |_, s| ReduceSpec {
                grad: clip,
                scale_grad: s[1],
                ..ReduceSpec::FINITE_ONLY
            });
            let n = Engine::or_restore(groups, n)?;
            if !n.finite {
                return skip_second(groups);
            }
            c1 = clip_factor(self.cfg.max_norm, n.grad);
        }
        let c0 = self.clip1;
        let alpha = self.alpha;
        let decouple = self.cfg.decouple;
        let step = self.engine.steps.saturating_add(1);
        Engine::update_all(groups, true, |_, o| {
            let lr = o.base().lr();
            let base: BaseStep = base_step(o, step, lr, finish);
            if decouple {
                UpdateSpec {
                    restore: true,
                    grad: GradMix::Mix { a: 0.0, b: c0 },
                    base,
                    post: Some(PostMix {
                        a: -(lr * alpha) * c1,
                        b: (lr * alpha) * c0,
                    }),
                    average: AverageFold::NONE,
                }
            } else {
                UpdateSpec {
                    restore: true,
                    grad: GradMix::Mix {
                        a: alpha * c1,
                        b: (1.0 - alpha) * c0,
                    },
                    base,
                    post: None,
                    average: AverageFold::NONE,
                }
            }
        })?;
        self.engine.steps = step;
        Ok(StepStatus::Applied)
    }
}

crate::guard::family_methods!(Wsam, simple_state);
