//! The base optimizer alone (no sharpness term): the baseline every SAM variant is compared with,
//! and the identity SAM reduces to with ρ = 0.

use crate::backend::{GradMix, ParamBuffer, SlotSpec};
use crate::engine::{Engine, OptimizerState, SkipReason, StepStatus};
use crate::error::Error;
use crate::group::{Group, GroupOptions};
use crate::optimizer::{Optimizer, sealed};
use crate::phases::{self, Finish};

/// Plain base-optimizer steps (SGD/Adam/AdamW of each group) with one gradient per step,
/// through the same passes as the SAM variants. Its [`Optimizer::step`] calls the closure once;
/// [`apply`](Self::apply) steps with the gradient already in the buffers.
///
/// ```
/// use sam_core::{BaseOptimizer, BaseRule, Group, SgdConfig, reference::SliceBuffer};
/// let mut w = [1.0_f64];
/// let mut g = [0.5];
/// let mut slots = [0.0; 0];
/// let base = BaseRule::sgd(SgdConfig { lr: 0.5, ..Default::default() })?;
/// let mut groups = [Group::new(SliceBuffer::new(&mut w, &mut g, &mut slots)?, base)];
/// BaseOptimizer::new().apply(&mut groups)?;
/// assert_eq!(groups[0].buffer.weights(), &[0.75]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct BaseOptimizer {
    engine: Engine,
}

impl Default for BaseOptimizer {
    fn default() -> Self {
        Self::new()
    }
}

impl BaseOptimizer {
    /// A base optimizer with no steps taken.
    pub fn new() -> Self {
        BaseOptimizer {
            engine: Engine::new(),
        }
    }

    /// One step with the gradient currently in every buffer. A non-finite gradient skips the
    /// step with nothing written.
    pub fn apply<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
    ) -> Result<StepStatus, Error<B::Error>> {
        use sealed::Core;
        match self.first_half(groups) {
            Ok(_) => self.second_half(groups, Finish::Base),
            Err(Error::NonFiniteGradient) => Ok(StepStatus::Skipped(SkipReason::NonFiniteClean)),
            Err(e) => Err(e),
        }
    }
}

impl sealed::Core for BaseOptimizer {
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
        phases::plain_checks(&mut self.engine, groups, |o| {
            phases::slots(o, false, false, 0)
        })?;
        Ok(false)
    }

    fn second_half<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
        _finish: Finish,
    ) -> Result<StepStatus, Error<B::Error>> {
        phases::plain_step(&mut self.engine, groups, GradMix::Current, Finish::Base)
    }
}

impl Optimizer for BaseOptimizer {
    type State = OptimizerState;

    fn variant(&self) -> &'static str {
        "base"
    }

    /// The base rule's state only.
    fn slot_spec(&self, options: &GroupOptions) -> SlotSpec {
        phases::slots(options, false, false, 0)
    }

    fn state(&self) -> Result<OptimizerState, Error> {
        self.engine.state()
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<(), Error> {
        self.engine.load(state)
    }
}
