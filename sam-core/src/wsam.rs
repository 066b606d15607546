//! WSAM: sharpness as a weighted regulariser.

use crate::backend::{AverageFold, GradMix, ParamBuffer, PostMix, ReduceSpec, SlotSpec};
use crate::engine::{Engine, OptimizerState, StepStatus};
use crate::error::{Error, invalid};
use crate::group::{Group, GroupOptions};
use crate::optimizer::{Optimizer, SamOptimizer, sealed};
use crate::perturbation::Perturbation;
use crate::phases::{self, Combine, Finish};

/// Hyperparameters of [`Wsam`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct WsamConfig {
    /// The climb (ρ, adaptivity, η, ε; groups may override ρ and adaptivity).
    pub perturbation: Perturbation,
    /// Weight of the sharpness term, `0 ≤ γ < 1`; `α = γ/(1−γ)`. Default `0.9`.
    pub gamma: f64,
    /// Decoupled update (base step on g₁, sharpness step separately). Default `true`.
    pub decouple: bool,
    /// Global-norm clipping of g₁ and g₂ (each separately) to this norm, if set (> 0, finite).
    /// Default none.
    pub max_norm: Option<f64>,
    /// Check the second gradient for NaN/∞ (see [`SamConfig`](crate::SamConfig)). Default `true`.
    pub check_second_gradient: bool,
}

impl Default for WsamConfig {
    fn default() -> Self {
        WsamConfig {
            perturbation: Perturbation::default(),
            gamma: 0.9,
            decouple: true,
            max_norm: None,
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
/// `WeightedSAM` (`wsam.py`; conformance `verification/SCHEMA.md` §7.3). Difference: the weights are
/// restored from a copy (upstream subtracts `e`, about 1 ulp apart).
///
/// ```
/// use sam_core::{BaseRule, Group, Optimizer, SgdConfig, Wsam, WsamConfig, reference::SliceBuffer};
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
        cfg.perturbation.validate()?;
        if !(cfg.gamma >= 0.0 && cfg.gamma < 1.0) {
            return Err(invalid("gamma", "gamma must be in [0, 1)"));
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
}

impl sealed::Core for Wsam {
    fn engine(&self) -> &Engine {
        &self.engine
    }

    fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Perturbs from the unclipped g₁ and stashes it.
    fn first_half<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
    ) -> Result<bool, Error<B::Error>> {
        let p = self.cfg.perturbation;
        let clip = self.cfg.max_norm.is_some();
        let layout = |o: &GroupOptions| phases::slots(o, true, true, 0);
        let norms =
            phases::climb_norms(&mut self.engine, groups, layout, |o| p.weighting(o), clip)?;
        phases::climb(groups, &norms, p.eps, true, |o| (p.rho(o), p.weighting(o)))?;
        self.clip1 = clip_factor(self.cfg.max_norm, norms.grad);
        Ok(true)
    }

    fn second_half<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
        finish: Finish,
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
            let n = phases::second_norms(groups, self.engine.unscale(), |_, s| ReduceSpec {
                grad: clip,
                scale_grad: s[1],
                ..ReduceSpec::FINITE_ONLY
            })?;
            match n {
                Ok(n) => c1 = clip_factor(self.cfg.max_norm, n.grad),
                Err(skip) => return Ok(skip),
            }
        }
        let c0 = self.clip1;
        let alpha = self.alpha;
        let decouple = self.cfg.decouple;
        let combine = |lr: f64| {
            if decouple {
                Combine {
                    grad: GradMix::Mix { a: 0.0, b: c0 },
                    post: Some(PostMix {
                        a: -(lr * alpha) * c1,
                        b: (lr * alpha) * c0,
                    }),
                    restash: None,
                }
            } else {
                Combine {
                    grad: GradMix::Mix {
                        a: alpha * c1,
                        b: (1.0 - alpha) * c0,
                    },
                    ..Combine::CURRENT
                }
            }
        };
        phases::restore_and_step(&mut self.engine, groups, finish, AverageFold::NONE, combine)
    }
}

impl Optimizer for Wsam {
    type State = OptimizerState;

    fn variant(&self) -> &'static str {
        "wsam"
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

impl SamOptimizer for Wsam {}
