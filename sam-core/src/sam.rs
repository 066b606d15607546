//! SAM and ASAM.

use crate::backend::{AverageFold, ParamBuffer, SlotSpec};
use crate::engine::{Engine, OptimizerState, StepStatus};
use crate::error::Error;
use crate::group::{Group, GroupOptions};
use crate::optimizer::{Optimizer, SamOptimizer, sealed};
use crate::perturbation::Perturbation;
use crate::phases::{self, Combine, Finish};

/// Hyperparameters of [`Sam`] (and of the SAM inside [`Wasam`](crate::Wasam)).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SamConfig {
    /// The climb: ρ, ASAM's adaptivity and η, ε.
    pub perturbation: Perturbation,
    /// Check the second gradient for NaN/∞ before the step writes anything (one extra read of
    /// the gradient) and skip the step if found. Default `true`; switch it off only if the
    /// framework already guarantees finite gradients (for example a loss scaler's inf check).
    pub check_second_gradient: bool,
}

impl Default for SamConfig {
    fn default() -> Self {
        SamConfig {
            perturbation: Perturbation::default(),
            check_second_gradient: true,
        }
    }
}

impl From<Perturbation> for SamConfig {
    fn from(perturbation: Perturbation) -> Self {
        SamConfig {
            perturbation,
            ..Self::default()
        }
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
/// Upstream semantics: davda54/sam `sam.py` (conformance `verification/SCHEMA.md` §7.1).
///
/// ```
/// use sam_core::{BaseRule, Group, Optimizer, Sam, SamConfig, SgdConfig, Perturbation, reference::SliceBuffer};
///
/// // L(w) = ½‖w‖², ∇L = w.
/// let mut w = [3.0_f64, -4.0];
/// let mut g = [0.0; 2];
/// let mut slots = [0.0; 2 * 2]; // backup + momentum
/// let base = BaseRule::sgd(SgdConfig { lr: 0.1, momentum: 0.9, ..Default::default() })?;
/// let mut groups = [Group::new(SliceBuffer::new(&mut w, &mut g, &mut slots)?, base)];
/// let mut sam = Sam::new(SamConfig::from(Perturbation::sam(0.05)))?;
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
        cfg.perturbation.validate()?;
        Ok(Sam {
            cfg,
            engine: Engine::new(),
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &SamConfig {
        &self.cfg
    }
}

/// SAM/ASAM's final pass (shared with WASAM): restore, base step on g₂, fold `average`.
pub(crate) fn sam_second_half<B: ParamBuffer>(
    engine: &mut Engine,
    groups: &mut [Group<B>],
    finish: Finish,
    check: bool,
    average: AverageFold,
) -> Result<StepStatus, Error<B::Error>> {
    if let Some(skip) = phases::check_second(groups, engine.unscale(), check)? {
        return Ok(skip);
    }
    phases::restore_and_step(engine, groups, finish, average, |_| Combine::CURRENT)
}

impl sealed::Core for Sam {
    fn engine(&self) -> &Engine {
        &self.engine
    }

    fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    fn first_half<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
    ) -> Result<bool, Error<B::Error>> {
        let p = self.cfg.perturbation;
        let layout = |o: &GroupOptions| phases::slots(o, true, false, 0);
        let norms =
            phases::climb_norms(&mut self.engine, groups, layout, |o| p.weighting(o), false)?;
        phases::climb(groups, &norms, p.eps, false, |o| (p.rho(o), p.weighting(o)))?;
        Ok(true)
    }

    fn second_half<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
        finish: Finish,
    ) -> Result<StepStatus, Error<B::Error>> {
        let check = self.cfg.check_second_gradient;
        sam_second_half(&mut self.engine, groups, finish, check, AverageFold::NONE)
    }
}

impl Optimizer for Sam {
    type State = OptimizerState;

    fn variant(&self) -> &'static str {
        "sam"
    }

    /// The backup and the base rule's state.
    fn slot_spec(&self, options: &GroupOptions) -> SlotSpec {
        phases::slots(options, true, false, 0)
    }

    fn state(&self) -> Result<OptimizerState, Error> {
        self.engine.state()
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<(), Error> {
        self.engine.load(state)
    }
}

impl SamOptimizer for Sam {}
