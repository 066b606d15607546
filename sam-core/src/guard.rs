//! The perturbed phase, made hard to misuse: a guard that borrows the optimizer and the groups.

use crate::buffer::ParamBuffer;
use crate::engine::{Engine, Phase, SkipReason, StepReport, StepStatus};
use crate::error::Error;
use crate::group::Group;

pub(crate) mod private {
    /// Proof of being inside the crate: only the guard can call a variant's second half.
    #[derive(Debug, Clone, Copy)]
    pub struct Token;
    pub trait Sealed {}
}

/// How the second half of a step ends.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Apply the built-in base rule of each group.
    Base,
    /// Restore the weights and leave the final gradient in the gradient storage.
    External,
}

/// The optimizers of the SAM family: the variant-specific halves of a two-gradient step.
///
/// Sealed: implemented by [`Sam`](crate::Sam) and the other variants of this crate. Its methods
/// can only be called through [`Perturbed`].
pub trait SamFamily: private::Sealed {
    #[doc(hidden)]
    fn engine_mut(&mut self, token: private::Token) -> &mut Engine;
    #[doc(hidden)]
    fn second<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
        finish: Finish,
        token: private::Token,
    ) -> Result<StepStatus, Error<B::Error>>;
}

/// The weights of every group are perturbed: compute the gradient at them, then finish the step.
///
/// While this guard lives, the optimizer and the groups are borrowed, so another step, a
/// checkpoint, or an evaluation of the unperturbed model cannot happen by mistake. Dropping the
/// guard without finishing restores the weights exactly (and discards the step); if it is leaked
/// (`mem::forget`), the optimizer stays in [`Phase::Perturbed`] and refuses to step until
/// `recover` is called.
#[must_use = "dropping the guard restores the weights and discards the step"]
pub struct Perturbed<'a, V: SamFamily, B: ParamBuffer> {
    opt: &'a mut V,
    groups: &'a mut [Group<B>],
    armed: bool,
}

impl<V: SamFamily, B: ParamBuffer> core::fmt::Debug for Perturbed<'_, V, B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Perturbed")
            .field("groups", &self.groups.len())
            .finish()
    }
}

impl<'a, V: SamFamily, B: ParamBuffer> Perturbed<'a, V, B> {
    pub(crate) fn new(opt: &'a mut V, groups: &'a mut [Group<B>]) -> Self {
        opt.engine_mut(private::Token).phase = Phase::Perturbed;
        Perturbed {
            opt,
            groups,
            armed: true,
        }
    }

    /// The groups, at the perturbed weights.
    pub fn groups(&self) -> &[Group<B>] {
        self.groups
    }

    /// The groups, to write the gradient at the perturbed weights into their buffers.
    pub fn groups_mut(&mut self) -> &mut [Group<B>] {
        self.groups
    }

    /// Finishes the step with the built-in base rule of each group: restores the weights from
    /// the backup (bit-exact), forms the final gradient, applies the base rule, all in one pass.
    /// If the new gradient contains NaN or ±∞, the weights are restored and the step is skipped.
    pub fn second_step(mut self) -> Result<StepStatus, Error<B::Error>> {
        self.finish(Finish::Base)
    }

    /// Bring-your-own base optimizer: restores the weights and leaves the final gradient of the
    /// variant in each buffer's gradient storage (for SAM, the gradient at the perturbed
    /// weights), for the framework's own optimizer to apply.
    pub fn restore_with_gradient(mut self) -> Result<StepStatus, Error<B::Error>> {
        self.finish(Finish::External)
    }

    /// Abandons the step, restoring the weights, and reports a backend failure if any.
    pub fn cancel(mut self) -> Result<(), Error<B::Error>> {
        self.armed = false;
        self.opt.engine_mut(private::Token).phase = Phase::Idle;
        Engine::restore_all(self.groups)
    }

    fn finish(&mut self, how: Finish) -> Result<StepStatus, Error<B::Error>> {
        self.armed = false;
        let r = self.opt.second(self.groups, how, private::Token);
        // Every path of `second` leaves the weights restored or stepped.
        self.opt.engine_mut(private::Token).phase = Phase::Idle;
        r
    }
}

impl<V: SamFamily, B: ParamBuffer> Drop for Perturbed<'_, V, B> {
    fn drop(&mut self) {
        if self.armed {
            let _ = Engine::restore_all(self.groups);
            self.opt.engine_mut(private::Token).phase = Phase::Idle;
        }
    }
}

/// The closure-driven step shared by every variant.
pub(crate) fn closure_step<'g, V, B, L, C, F, S>(
    opt: &mut V,
    groups: &'g mut [Group<B>],
    mut closure: F,
    first: S,
) -> Result<StepReport<L>, C>
where
    V: SamFamily,
    B: ParamBuffer,
    C: From<Error<B::Error>>,
    F: FnMut(&mut [Group<B>]) -> Result<L, C>,
    S: for<'a> FnOnce(
        &'a mut V,
        &'a mut [Group<B>],
    ) -> Result<Perturbed<'a, V, B>, Error<B::Error>>,
{
    let loss = closure(groups)?;
    let mut guard = match first(opt, groups) {
        Ok(g) => g,
        Err(Error::NonFiniteGradient) => {
            return Ok(StepReport {
                loss,
                status: StepStatus::Skipped(SkipReason::NonFiniteClean),
            });
        }
        Err(e) => return Err(e.into()),
    };
    closure(guard.groups_mut())?;
    let status = guard.second_step()?;
    Ok(StepReport { loss, status })
}

/// The methods every SAM-family optimizer shares: phase, step count, the closure-driven step,
/// and (with `simple_state`) checkpoints of the step count and recovery from a leaked guard.
macro_rules! family_methods {
    ($t:ty) => {
        impl $t {
            /// The current phase.
            pub fn phase(&self) -> $crate::Phase {
                self.engine.phase
            }

            /// Number of steps applied so far (skipped steps do not count).
            pub fn steps(&self) -> u64 {
                self.engine.steps
            }

            /// A whole step driven by a closure that writes the gradient at the current weights
            /// into every buffer and returns the loss. It is called twice: at the clean weights
            /// (its loss is reported) and at the perturbed weights. A closure error aborts the
            /// step with the weights restored; a non-finite gradient skips it
            /// ([`StepStatus::Skipped`](crate::StepStatus::Skipped)).
            pub fn step<B, L, C, F>(
                &mut self,
                groups: &mut [$crate::Group<B>],
                closure: F,
            ) -> Result<$crate::StepReport<L>, C>
            where
                B: $crate::ParamBuffer,
                C: From<$crate::Error<B::Error>>,
                F: FnMut(&mut [$crate::Group<B>]) -> Result<L, C>,
            {
                $crate::guard::closure_step(self, groups, closure, |o, g| o.first_step(g))
            }
        }
    };
    ($t:ty, simple_state) => {
        $crate::guard::family_methods!($t);

        impl $t {
            /// The host-side state for a checkpoint (only between steps).
            pub fn state(&self) -> Result<$crate::OptimizerState, $crate::Error> {
                self.engine.expect($crate::Phase::Idle)?;
                Ok($crate::OptimizerState {
                    steps: self.engine.steps,
                })
            }

            /// Resumes from a checkpoint taken with `state` (only between steps).
            pub fn load_state(
                &mut self,
                state: &$crate::OptimizerState,
            ) -> Result<(), $crate::Error> {
                self.engine.expect($crate::Phase::Idle)?;
                self.engine = $crate::engine::Engine::new();
                self.engine.steps = state.steps;
                Ok(())
            }

            /// Restores the weights after a leaked [`Perturbed`](crate::Perturbed) guard (no-op
            /// when idle).
            pub fn recover<B: $crate::ParamBuffer>(
                &mut self,
                groups: &mut [$crate::Group<B>],
            ) -> Result<(), $crate::Error<B::Error>> {
                if self.engine.phase == $crate::Phase::Perturbed {
                    $crate::engine::Engine::restore_all(groups)?;
                    self.engine.phase = $crate::Phase::Idle;
                }
                Ok(())
            }
        }
    };
}
pub(crate) use family_methods;
