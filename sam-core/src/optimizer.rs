//! The interface every optimizer of the crate implements: [`Optimizer`] (one step from a
//! gradient closure, learning-rate control, checkpoints) and [`SamOptimizer`] (the two-call
//! form of a SAM-family step). Training code is written once, generically over them.

use crate::backend::{ParamBuffer, SlotSpec};
use crate::engine::{Engine, Phase, SkipReason, StepReport, StepStatus};
use crate::error::Error;
use crate::group::{Group, GroupOptions};
use crate::guard::Perturbed;
use crate::phases::Finish;
use crate::schedule::Schedule;

pub(crate) mod sealed {
    use super::*;

    /// The variant-specific halves of a step, reachable only inside the crate.
    pub trait Core {
        fn engine(&self) -> &Engine;
        fn engine_mut(&mut self) -> &mut Engine;
        /// Checks (nothing written on error) and, for a climbing variant, the climb. Returns
        /// whether the weights are now perturbed (`false`: the step takes one gradient).
        fn first_half<B: ParamBuffer>(
            &mut self,
            groups: &mut [Group<B>],
        ) -> Result<bool, Error<B::Error>>;
        /// The final pass: restore (if perturbed), combine the gradients, base step.
        fn second_half<B: ParamBuffer>(
            &mut self,
            groups: &mut [Group<B>],
            finish: Finish,
        ) -> Result<StepStatus, Error<B::Error>>;
        /// Whether the stash carries state from one step to the next (LookSAM's stored
        /// direction), so that checkpoints save it.
        fn keeps_stash(&self) -> bool {
            false
        }
        /// Whether this lr schedule (or none) is acceptable to the variant.
        fn accepts_lr_schedule(&self, _schedule: Option<&Schedule>) -> Result<(), Error> {
            Ok(())
        }
    }
}

/// An optimizer over parameter groups: SAM, ASAM, GSAM, WSAM, WASAM, LookSAM, SAM every `k`
/// steps and the plain base optimizer. Sealed: implemented by this crate's optimizers only.
///
/// ```
/// use sam_core::{BaseRule, Error, Group, Optimizer, Sam, SamConfig, SgdConfig, StepStatus};
/// use sam_core::reference::{SliceBuffer, SliceError};
///
/// /// A training loop for any optimizer of the family: ½‖w‖², ∇ = w.
/// fn train<O: Optimizer>(
///     opt: &mut O,
///     groups: &mut [Group<SliceBuffer<'_, f64>>],
/// ) -> Result<f64, Error<SliceError>> {
///     let mut loss = 0.0;
///     for _ in 0..50 {
///         let report = opt.step(groups, |gs| {
///             let (w, g) = gs[0].buffer.weights_and_grad();
///             g.copy_from_slice(w);
///             Ok::<_, Error<SliceError>>(0.5 * w.iter().map(|x| x * x).sum::<f64>())
///         })?;
///         assert_eq!(report.status, StepStatus::Applied);
///         loss = report.loss;
///     }
///     Ok(loss)
/// }
///
/// let mut w = [3.0, -4.0];
/// let mut g = [0.0; 2];
/// let mut slots = [0.0; 2]; // backup
/// let base = BaseRule::sgd(SgdConfig { lr: 0.1, ..Default::default() })?;
/// let mut groups = [Group::new(SliceBuffer::new(&mut w, &mut g, &mut slots)?, base)];
/// let mut sam = Sam::new(SamConfig::default())?;
/// assert!(train(&mut sam, &mut groups)? < 0.1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Optimizer: sealed::Core {
    /// The host-side checkpoint state (per-element state lives in the buffers' slots).
    type State: Clone + core::fmt::Debug + PartialEq;

    /// The variant's name (`"sam"` for SAM and ASAM, `"gsam"`, `"wsam"`, `"wasam"`, `"looksam"`, `"base"`;
    /// [`Interval`](crate::Interval) has its inner variant's): checkpoints record it.
    fn variant(&self) -> &'static str;

    /// The slots a group with these options needs (see [`SlotSpec`]).
    fn slot_spec(&self, options: &GroupOptions) -> SlotSpec;

    /// The host-side state for a checkpoint (only between steps).
    fn state(&self) -> Result<Self::State, Error>;

    /// Resumes from a checkpoint taken with [`state`](Self::state) (only between steps). A state
    /// no run can produce is [`Error::InvalidState`]; nothing changes on error.
    fn load_state(&mut self, state: &Self::State) -> Result<(), Error>;

    /// The current phase.
    fn phase(&self) -> Phase {
        self.engine().phase
    }

    /// Number of steps applied so far (skipped steps do not count).
    fn steps(&self) -> u64 {
        self.engine().steps
    }

    /// The learning-rate schedule applied to every group, if any.
    fn lr_schedule(&self) -> Option<&Schedule> {
        self.engine().lr_schedule.as_ref()
    }

    /// Sets (or, with `None`, removes) the learning-rate schedule: step `t` then uses
    /// [`lr_at`](Self::lr_at)`(t)` in every group instead of the group's own lr. Only between
    /// steps; nothing changes on error. For a per-group lr without a schedule, change the group's
    /// options between steps ([`GroupOptions::set_lr`]).
    fn set_lr_schedule(&mut self, schedule: Option<Schedule>) -> Result<(), Error> {
        self.engine().expect(Phase::Idle)?;
        self.accepts_lr_schedule(schedule.as_ref())?;
        self.engine_mut().lr_schedule = schedule;
        Ok(())
    }

    /// The lr step `t` (0-based) uses in a group whose own lr is `group_lr`.
    fn lr_at(&self, t: u64, group_lr: f64) -> f64 {
        self.engine().lr_at(t, group_lr)
    }

    /// The loss scale `S` the stored gradients carry (`1` unless set).
    fn grad_scale(&self) -> f64 {
        self.engine().grad_scale()
    }

    /// Declares that the gradients written from now on are those of the loss times `scale`
    /// (mixed-precision training with loss scaling, see [`LossScaler`](crate::LossScaler)).
    /// Every pass then reads each stored gradient value `g` as `g·(1/S)` in `f64` before any
    /// other use, so the perturbation, the norms and the base step are those of the unscaled
    /// gradient, and the stash and an external final gradient
    /// ([`Perturbed::restore_with_gradient`]) hold unscaled values. For a power of two `S` the
    /// unscaling is exact: the step is then bit for bit the step on gradients `g/S` with scale
    /// `1`. A gradient that overflowed (NaN or ±∞ in either gradient of a step) skips the step
    /// with the weights, a model copy, the base state and the averages as they were (the
    /// backup and the stash are scratch: after an overflow in the second gradient they hold
    /// the skipped climb's copies, docs/design.md §5a) — [`StepStatus::Skipped`] from
    /// [`step`](Self::step), or [`Error::NonFiniteGradient`] from the first half of the
    /// two-call form.
    ///
    /// Only between steps; `scale` finite and positive with a normal reciprocal; nothing
    /// changes on error. Not part of [`state`](Self::state): the scaler that chooses `S` is
    /// saved on its own, and the scale is set again before each step.
    ///
    /// ```
    /// use sam_core::{BaseRule, Group, Optimizer, Sam, SamConfig, SgdConfig, StepStatus};
    /// use sam_core::reference::SliceBuffer;
    /// let mut w = [1.0_f32, -2.0];
    /// let mut g = [0.0_f32; 2];
    /// let mut slots = [0.0_f32; 2]; // backup
    /// let base = BaseRule::sgd(SgdConfig { lr: 0.1, ..Default::default() })?;
    /// let mut groups = [Group::new(SliceBuffer::new(&mut w, &mut g, &mut slots)?, base)];
    /// let mut sam = Sam::new(SamConfig::default())?;
    /// sam.set_grad_scale(1024.0)?;
    /// let report = sam.step(&mut groups, |gs| {
    ///     let (w, g) = gs[0].buffer.weights_and_grad();
    ///     for (gi, wi) in g.iter_mut().zip(w) {
    ///         *gi = 1024.0 * wi; // ∇ of 1024 · ½‖w‖²
    ///     }
    ///     Ok::<_, sam_core::Error<_>>(())
    /// })?;
    /// assert_eq!(report.status, StepStatus::Applied);
    /// assert!(groups[0].buffer.weights()[0] < 1.0 && groups[0].buffer.weights()[0] > 0.8);
    /// assert!(sam.set_grad_scale(0.0).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    fn set_grad_scale(&mut self, scale: f64) -> Result<(), Error> {
        self.engine_mut().set_grad_scale(scale)
    }

    /// A whole step driven by a closure that writes the gradient at the current weights into
    /// every buffer and returns the loss. A SAM-family optimizer calls it twice, at the clean
    /// weights (its loss is reported) and at the perturbed weights; the base optimizer once,
    /// and so do LookSAM between refreshes and SAM every `k` steps between climbs.
    /// A closure error aborts the step with the weights restored; a non-finite gradient skips
    /// it ([`StepStatus::Skipped`]) with every buffer as it was.
    fn step<B, L, C, F>(
        &mut self,
        groups: &mut [Group<B>],
        mut closure: F,
    ) -> Result<StepReport<L>, C>
    where
        Self: Sized,
        B: ParamBuffer,
        C: From<Error<B::Error>>,
        F: FnMut(&mut [Group<B>]) -> Result<L, C>,
    {
        let loss = closure(groups)?;
        let perturbed = match self.first_half(groups) {
            Ok(p) => p,
            Err(Error::NonFiniteGradient) => {
                return Ok(StepReport {
                    loss,
                    status: StepStatus::Skipped(SkipReason::NonFiniteClean),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let status = if perturbed {
            let mut guard = Perturbed::new(self, groups, true);
            closure(guard.groups_mut())?;
            guard.second_step()?
        } else {
            self.second_half(groups, Finish::Base)?
        };
        Ok(StepReport { loss, status })
    }

    /// Restores the weights after a leaked guard ([`Perturbed`], or WASAM's
    /// [`Swapped`](crate::Swapped)); a no-op when idle.
    fn recover<B: ParamBuffer>(&mut self, groups: &mut [Group<B>]) -> Result<(), Error<B::Error>> {
        if self.engine().phase == Phase::Perturbed {
            Engine::restore_all(groups)?;
            self.engine_mut().phase = Phase::Idle;
        }
        Ok(())
    }
}

/// The SAM family's two-call step: [`first_step`](Self::first_step) after the first backward
/// pass, then [`Perturbed::second_step`] (or [`Perturbed::restore_with_gradient`] for an
/// external base optimizer) after the second.
///
/// ```
/// use sam_core::{BaseRule, Group, SamOptimizer, SgdConfig, StepStatus, Wsam, WsamConfig};
/// use sam_core::reference::SliceBuffer;
/// let mut w = [1.0_f32, -2.0];
/// let mut g = [1.0_f32, -2.0]; // ∇ of ½‖w‖² at w
/// let mut slots = [0.0; 2 * 2]; // backup, stash
/// let base = BaseRule::sgd(SgdConfig { lr: 0.1, ..Default::default() })?;
/// let mut groups = [Group::new(SliceBuffer::new(&mut w, &mut g, &mut slots)?, base)];
/// let mut wsam = Wsam::new(WsamConfig::default())?;
/// let mut perturbed = wsam.first_step(&mut groups)?;
/// let (w, g) = perturbed.groups_mut()[0].buffer.weights_and_grad();
/// g.copy_from_slice(w); // the gradient at the perturbed weights
/// assert_eq!(perturbed.second_step()?, StepStatus::Applied);
/// assert!(groups[0].buffer.weights()[0] < 1.0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait SamOptimizer: Optimizer + Sized {
    /// First half of a step: with the clean gradient in every buffer, perturbs the weights and
    /// returns the guard of the perturbed phase. Nothing is written if it fails (a non-finite
    /// gradient is [`Error::NonFiniteGradient`]).
    fn first_step<'a, B: ParamBuffer>(
        &'a mut self,
        groups: &'a mut [Group<B>],
    ) -> Result<Perturbed<'a, Self, B>, Error<B::Error>> {
        let climbed = self.first_half(groups)?;
        Ok(Perturbed::new(self, groups, climbed))
    }
}
