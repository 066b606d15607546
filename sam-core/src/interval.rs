//! SAM every `k` steps: a full step of a SAM-family variant on every `k`-th step, the base
//! optimizer's one-gradient step on the others.

use crate::backend::{GradMix, ParamBuffer, SlotSpec};
use crate::engine::{Engine, StepStatus};
use crate::error::Error;
use crate::group::{Group, GroupOptions};
use crate::optimizer::{Optimizer, SamOptimizer, sealed};
use crate::phases::{self, Finish};
use crate::schedule::Schedule;

/// A SAM-family optimizer that climbs on every `k`-th step only, as MosaicML Composer's
/// `SAMOptimizer(interval=k)` (`composer/algorithms/sam/sam.py`): step `t` (0-based, counting
/// applied steps) is a full step of the inner variant when `(t + 1) % k == 0`, and a plain
/// step of each group's base rule otherwise: one gradient, no perturbation, from the current
/// weights. `k = 1` is the inner variant itself, bit for bit; a step costs about `(k + 1)/k`
/// gradient evaluations on average instead of 2.
///
/// [`Optimizer::step`] calls the closure twice on climbing steps and once on the others;
/// [`will_climb`](Self::will_climb) says which the next step is. In the two-call form
/// ([`SamOptimizer`]), the guard of a plain step holds the clean weights and its `second_step`
/// uses the gradient already in the buffers (accumulate it once, before `first_step`). Every other part of a step
/// (checks, skips on non-finite gradients, learning-rate schedules and their timeline,
/// checkpoints) is the inner variant's: plain steps use the inner variant's scheduled lr. Plain steps run the base rule only: WASAM folds its averages on climbing steps
/// only, and GSAM/WSAM's gradient decomposition applies on climbing steps only.
///
/// Differences from Composer: skipped steps (a non-finite gradient) do not count, so the step
/// that is retried is of the same kind (Composer counts every call); the checkpoint is the
/// inner variant's, since the kind of the next step follows from the step count.
///
/// ```
/// use sam_core::{BaseRule, Group, Interval, Optimizer, Sam, SamConfig, SgdConfig};
/// use sam_core::reference::SliceBuffer;
/// // L(w) = ½‖w‖², ∇L = w.
/// let mut w = [3.0_f64, -4.0];
/// let mut g = [0.0; 2];
/// let mut slots = [0.0; 2]; // backup
/// let base = BaseRule::sgd(SgdConfig { lr: 0.1, ..Default::default() })?;
/// let mut groups = [Group::new(SliceBuffer::new(&mut w, &mut g, &mut slots)?, base)];
/// let mut opt = Interval::new(Sam::new(SamConfig::default())?, 4)?;
/// let mut gradients = 0;
/// for _ in 0..100 {
///     opt.step(&mut groups, |gs| {
///         gradients += 1;
///         let (w, g) = gs[0].buffer.weights_and_grad();
///         g.copy_from_slice(w);
///         Ok::<_, sam_core::Error<_>>(0.0)
///     })?;
/// }
/// assert_eq!(gradients, 125); // 75 plain steps + 25 SAM steps of two gradients
/// assert!(groups[0].buffer.weights().iter().all(|x| x.abs() < 0.1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Interval<O> {
    inner: O,
    k: u64,
}

impl<O: SamOptimizer> Interval<O> {
    /// The variant `inner`, climbing every `k`-th step; `k ≥ 1`.
    pub fn new(inner: O, k: u64) -> Result<Self, Error> {
        if k == 0 {
            return Err(Error::InvalidHyperparameter {
                name: "interval",
                message: "the interval k must be at least 1",
            });
        }
        Ok(Interval { inner, k })
    }

    /// The interval `k`.
    pub fn interval(&self) -> u64 {
        self.k
    }

    /// The inner variant.
    pub fn inner(&self) -> &O {
        &self.inner
    }

    /// Whether the next step is a climbing (two-gradient) step.
    pub fn will_climb(&self) -> bool {
        self.inner.steps() % self.k == self.k - 1
    }

    /// The inner variant, taken out (with its step count and configuration).
    pub fn into_inner(self) -> O {
        self.inner
    }
}

impl<O: SamOptimizer> sealed::Core for Interval<O> {
    fn engine(&self) -> &Engine {
        self.inner.engine()
    }

    fn engine_mut(&mut self) -> &mut Engine {
        self.inner.engine_mut()
    }

    fn first_half<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
    ) -> Result<bool, Error<B::Error>> {
        if self.will_climb() {
            return self.inner.first_half(groups);
        }
        let inner = &self.inner;
        let layout = |o: &GroupOptions| inner.slot_spec(o);
        let mut engine = self.inner.engine().clone();
        phases::plain_checks(&mut engine, groups, layout)?;
        *self.inner.engine_mut() = engine;
        Ok(false)
    }

    fn second_half<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
        finish: Finish,
    ) -> Result<StepStatus, Error<B::Error>> {
        if self.will_climb() {
            return self.inner.second_half(groups, finish);
        }
        phases::plain_step(self.inner.engine_mut(), groups, GradMix::Current, finish)
    }

    fn accepts_lr_schedule(&self, schedule: Option<&Schedule>) -> Result<(), Error> {
        self.inner.accepts_lr_schedule(schedule)
    }

    fn keeps_stash(&self) -> bool {
        self.inner.keeps_stash()
    }
}

impl<O: SamOptimizer> Optimizer for Interval<O> {
    type State = O::State;

    fn variant(&self) -> &'static str {
        self.inner.variant()
    }

    /// The inner variant's slots (plain steps leave the backup and stash unused).
    fn slot_spec(&self, options: &GroupOptions) -> SlotSpec {
        self.inner.slot_spec(options)
    }

    fn state(&self) -> Result<O::State, Error> {
        self.inner.state()
    }

    fn load_state(&mut self, state: &O::State) -> Result<(), Error> {
        self.inner.load_state(state)
    }
}

impl<O: SamOptimizer> SamOptimizer for Interval<O> {}
