//! LookSAM: SAM's two-gradient step every `k` steps, its sharpness direction reused in between.

use crate::backend::{AverageFold, GradMix, ParamBuffer, PostMix, ReduceSpec, SlotSpec};
use crate::engine::{Engine, Norms, OptimizerState, StepStatus};
use crate::error::{Error, non_negative};
use crate::group::{Group, GroupOptions};
use crate::optimizer::{Optimizer, SamOptimizer, sealed};
use crate::perturbation::Perturbation;
use crate::phases::{self, Combine, Finish};

/// Hyperparameters of [`LookSam`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LookSamConfig {
    /// The climb of the refresh steps: ρ, ASAM's adaptivity and η, ε (groups may override ρ
    /// and adaptivity, as for [`Sam`](crate::Sam)).
    pub perturbation: Perturbation,
    /// The refresh interval `k ≥ 1`: steps `0, k, 2k, …` are SAM steps. Default `5` (the
    /// paper's CIFAR setting).
    pub k: u64,
    /// α ≥ 0 (finite): the weight of the stored direction between refreshes. Default `0.7`
    /// (the paper's).
    pub alpha: f64,
}

impl Default for LookSamConfig {
    fn default() -> Self {
        LookSamConfig {
            perturbation: Perturbation::default(),
            k: 5,
            alpha: 0.7,
        }
    }
}

/// LookSAM (Liu et al., *Towards Efficient and Scalable Sharpness-Aware Minimization*, CVPR
/// 2022, <https://arxiv.org/abs/2203.02714>, Algorithm 1).
///
/// Step `t` (0-based, counting applied steps), with all norms and inner products global over
/// every group:
///
/// ```text
/// g = ∇L(w)
/// t % k == 0 (refresh):  g_s = ∇L(w + e)  with SAM's (or ASAM's) climb e
///                        g_v = g_s − ‖g_s‖·cos(g, g_s)·g/‖g‖ = g_s − (⟨g, g_s⟩/‖g‖²)·g
///                        d = g_s                                  (g_v is stored)
/// otherwise:             d = g + α·(‖g‖/‖g_v‖)·g_v                (one gradient)
/// base step with d
/// ```
///
/// `g_v` is the part of the SAM gradient orthogonal to the clean gradient; between refreshes
/// it is rescaled to the current gradient's norm. A refresh step is SAM's step bit for bit
/// (so `k = 1` is [`Sam`](crate::Sam)); with α = 0 the other steps are the base optimizer's.
/// A step costs `(k + 1)/k` gradient evaluations on average.
///
/// [`Optimizer::step`] calls the closure twice on refresh steps and once on the others;
/// [`refreshes`](Self::refreshes) says which the next step is. In the two-call form, the
/// guard of a one-gradient step holds the clean weights and its `second_step` uses the
/// gradient already in the buffers.
///
/// Numerics: a zero clean gradient at a refresh stores `g_v = g_s`; a zero, non-finite or
/// unusable (the coefficient `α‖g‖/‖g_v‖` overflows `f64`) stored direction makes the step a
/// plain base step; non-finite gradients skip the step as in every variant. A skipped refresh
/// leaves the clean gradient in the stash; the retried step is again a refresh, which
/// rewrites it. For extreme `f64` gradients (whose norms are computed at a power-of-two scale
/// `s`) the stash holds `s·g_v`: only the direction of `g_v` is used. The stored direction is
/// orthogonal to the clean gradient to within the rounding of the storage type when the
/// largest magnitudes of `g` and `g_s` lie in `[1e-290, 1e290]` (every `f32` value); beyond
/// that, the projection coefficient can be an `f64` subnormal and lose precision.
/// Checkpoints save the stored direction.
///
/// Differences from pytorch_optimizer's `LookSAM` (v3): the projection and the rescaling use
/// global norms over the whole model, as in the paper's Algorithm 1, where pytorch_optimizer
/// projects and rescales each tensor on its own; the gradient is evaluated once on the steps
/// between refreshes, where pytorch_optimizer's closure runs both evaluations every step; the
/// weights are restored from a copy; the first step refreshes (as in the paper; so does
/// pytorch_optimizer).
///
/// ```
/// use sam_core::{BaseRule, Group, LookSam, LookSamConfig, Optimizer, SgdConfig};
/// use sam_core::reference::SliceBuffer;
/// // L(w) = ½‖w‖², ∇L = w.
/// let mut w = [3.0_f64, -4.0];
/// let mut g = [0.0; 2];
/// let mut slots = [0.0; 2 * 2]; // backup, stored direction
/// let base = BaseRule::sgd(SgdConfig { lr: 0.1, ..Default::default() })?;
/// let mut groups = [Group::new(SliceBuffer::new(&mut w, &mut g, &mut slots)?, base)];
/// let mut opt = LookSam::new(LookSamConfig { k: 4, ..Default::default() })?;
/// let mut gradients = 0;
/// for _ in 0..100 {
///     opt.step(&mut groups, |gs| {
///         gradients += 1;
///         let (w, g) = gs[0].buffer.weights_and_grad();
///         g.copy_from_slice(w);
///         Ok::<_, sam_core::Error<_>>(0.0)
///     })?;
/// }
/// assert_eq!(gradients, 125); // 25 refreshes of two gradients + 75 steps of one
/// assert!(groups[0].buffer.weights().iter().all(|x| x.abs() < 0.1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct LookSam {
    cfg: LookSamConfig,
    engine: Engine,
    /// The final-gradient mix of a one-gradient step, from its first half to its second.
    pending: GradMix,
}

impl LookSam {
    /// A LookSAM optimizer; rejects out-of-domain hyperparameters (NaN included).
    pub fn new(cfg: LookSamConfig) -> Result<Self, Error> {
        cfg.perturbation.validate()?;
        non_negative("alpha", cfg.alpha)?;
        if cfg.k == 0 {
            return Err(Error::InvalidHyperparameter {
                name: "k",
                message: "the refresh interval k must be at least 1",
            });
        }
        Ok(LookSam {
            cfg,
            engine: Engine::new(),
            pending: GradMix::Current,
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &LookSamConfig {
        &self.cfg
    }

    /// Whether the next step is a refresh (a two-gradient SAM step).
    pub fn refreshes(&self) -> bool {
        self.engine.steps % self.cfg.k == 0
    }

    /// The final gradient of a one-gradient step, `g + α·(‖g‖/‖g_v‖)·g_v`, from the norms of
    /// the gradient and the stored direction; [`GradMix::Current`] when the direction cannot
    /// be used (see the type's docs).
    fn mix(&self, n: &Norms) -> GradMix {
        let ratio = ratio(n.grad_scaled, n.grad_scale, n.stash_scaled, n.stash_scale);
        let b = self.cfg.alpha * ratio;
        if n.finite && b != 0.0 && b.is_finite() {
            GradMix::Mix { a: 1.0, b }
        } else {
            GradMix::Current
        }
    }
}

/// `‖x‖/‖y‖` from the norms at their scales (`x_scaled = s_x·‖x‖`); `0` when `‖y‖ = 0`.
fn ratio(x_scaled: f64, x_scale: f64, y_scaled: f64, y_scale: f64) -> f64 {
    if y_scaled == 0.0 {
        return 0.0;
    }
    // The scales are powers of two: their quotient is exact unless it overflows.
    (x_scaled / y_scaled) * (y_scale / x_scale)
}

impl sealed::Core for LookSam {
    fn engine(&self) -> &Engine {
        &self.engine
    }

    fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    fn keeps_stash(&self) -> bool {
        true
    }

    /// A refresh climbs as SAM does and stashes the clean gradient; another step computes
    /// `‖g‖` and `‖g_v‖` in the same read that checks the gradient.
    fn first_half<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
    ) -> Result<bool, Error<B::Error>> {
        let p = self.cfg.perturbation;
        let layout = |o: &GroupOptions| phases::slots(o, true, true, 0);
        if self.refreshes() {
            let norms =
                phases::climb_norms(&mut self.engine, groups, layout, |o| p.weighting(o), false)?;
            phases::climb(groups, &norms, p.eps, true, |o| (p.rho(o), p.weighting(o)))?;
            return Ok(true);
        }
        let n = phases::plain_begin(&mut self.engine, groups, layout, |_, s| ReduceSpec {
            grad: true,
            stash: true,
            scale_grad: s[1],
            scale_stash: s[2],
            ..ReduceSpec::FINITE_ONLY
        })?;
        if !n.finite && !Engine::norms(groups, n.unscale, |_, _| ReduceSpec::FINITE_ONLY)?.finite {
            return Err(Error::NonFiniteGradient);
        }
        // A non-finite flag from here on is the stored direction's: `mix` drops it.
        self.pending = self.mix(&n);
        Ok(false)
    }

    fn second_half<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
        finish: Finish,
    ) -> Result<StepStatus, Error<B::Error>> {
        if !self.refreshes() {
            let grad = core::mem::replace(&mut self.pending, GradMix::Current);
            return phases::plain_step(&mut self.engine, groups, grad, finish);
        }
        // g_s in the gradient storage, the clean g in the stash.
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
        // g_v = g_s − c·g with c = ⟨g, g_s⟩/‖g‖², stored as s_g·g_v (s_g, the power of two
        // the reduction scaled g_s by, is 1 except for extreme f64 gradients; only g_v's
        // direction is used). From the scaled sums dot_s = s_g·s_s·⟨g_s, g⟩ and
        // stash_s = s_s·‖g‖: s_g·c = (dot_s/stash_s)/stash_s · s_s, which stays in range where
        // c alone would underflow (‖g_s‖ ≪ ‖g‖).
        let c_scaled = if n.stash_scaled == 0.0 {
            0.0
        } else {
            (n.dot_scaled / n.stash_scaled / n.stash_scaled) * n.stash_scale
        };
        if !c_scaled.is_finite() {
            // ‖g‖ is so small next to ‖g_s‖ that the coefficient overflows (f64 extremes).
            Engine::restore_all(groups)?;
            return Err(Error::NormOverflow);
        }
        let restash = PostMix {
            a: n.grad_scale,
            b: -c_scaled,
        };
        let combine = |_| Combine {
            restash: Some(restash),
            ..Combine::CURRENT
        };
        phases::restore_and_step(&mut self.engine, groups, finish, AverageFold::NONE, combine)
    }
}

impl Optimizer for LookSam {
    type State = OptimizerState;

    fn variant(&self) -> &'static str {
        "looksam"
    }

    /// The backup, the stored direction (in the stash slot) and the base rule's state.
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

impl SamOptimizer for LookSam {}
