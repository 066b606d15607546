//! The base optimizer alone (no sharpness term): the baseline every SAM variant is compared with,
//! and the identity SAM reduces to with ρ = 0.

use crate::buffer::{AverageFold, GradMix, ParamBuffer, ReduceSpec, SlotSpec, UpdateSpec};
use crate::engine::{Engine, OptimizerState, Phase, SkipReason, StepStatus};
use crate::error::Error;
use crate::group::{Group, GroupOptions};

/// Plain base-optimizer steps (SGD/Adam/AdamW of each group) with one gradient per step,
/// through the same passes as the SAM variants.
///
/// ```
/// use sam_core::{BaseOptimizer, BaseRule, Group, SgdConfig, reference::SliceBuffer};
/// let mut w = [1.0_f64];
/// let mut g = [0.5];
/// let mut slots = [0.0; 0];
/// let base = BaseRule::sgd(SgdConfig { lr: 0.5, ..Default::default() })?;
/// let mut groups = [Group::new(SliceBuffer::new(&mut w, &mut g, &mut slots)?, base)];
/// BaseOptimizer::new().step(&mut groups)?;
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

    /// The slots a group needs (the base rule's state only).
    pub fn slot_spec(&self, options: &GroupOptions) -> SlotSpec {
        plain_slots(options)
    }

    /// Number of steps applied so far.
    pub fn steps(&self) -> u64 {
        self.engine.steps
    }

    /// The host-side state for a checkpoint.
    pub fn state(&self) -> OptimizerState {
        OptimizerState {
            steps: self.engine.steps,
        }
    }

    /// Resumes from a checkpoint.
    pub fn load_state(&mut self, state: &OptimizerState) {
        self.engine = Engine::new();
        self.engine.steps = state.steps;
    }

    /// One step with the gradient currently in every buffer. A non-finite gradient skips the
    /// step with nothing written.
    pub fn step<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
    ) -> Result<StepStatus, Error<B::Error>> {
        self.engine.expect(Phase::Idle)?;
        self.engine.begin(groups, plain_slots)?;
        let n = Engine::norms(groups, |_, _| ReduceSpec::FINITE_ONLY)?;
        if !n.finite {
            return Ok(StepStatus::Skipped(SkipReason::NonFiniteClean));
        }
        let step = self.engine.steps.saturating_add(1);
        Engine::update_all(groups, false, |_, o| UpdateSpec {
            restore: false,
            grad: GradMix::Current,
            base: o.base().step_coefficients(step, o.base().lr()),
            post: None,
            average: AverageFold::NONE,
        })?;
        self.engine.steps = step;
        Ok(StepStatus::Applied)
    }
}

fn plain_slots(options: &GroupOptions) -> SlotSpec {
    SlotSpec {
        backup: false,
        stash: false,
        state: options.base().state_slots(),
        averages: 0,
    }
}
