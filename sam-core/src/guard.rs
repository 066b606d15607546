//! The perturbed phase, made hard to misuse: a guard that borrows the optimizer and the groups.

use crate::backend::ParamBuffer;
use crate::engine::{Engine, Phase, StepStatus};
use crate::error::Error;
use crate::group::Group;
use crate::optimizer::Optimizer;
use crate::phases::Finish;

/// The weights of every group are perturbed: compute the gradient at them, then finish the step.
///
/// While this guard lives, the optimizer and the groups are borrowed, so another step, a
/// checkpoint, or an evaluation of the unperturbed model cannot happen by mistake. Dropping the
/// guard without finishing restores the weights exactly (and discards the step); if it is leaked
/// (`mem::forget`), the optimizer stays in [`Phase::Perturbed`] and refuses to step until
/// `recover` is called.
///
/// On the one-gradient steps of [`LookSam`](crate::LookSam) nothing is perturbed: the guard
/// holds the clean weights, the phase stays [`Phase::Idle`], finishing uses the gradient in the
/// buffers (a second gradient need not be computed), and dropping it changes nothing.
#[must_use = "dropping the guard restores the weights and discards the step"]
pub struct Perturbed<'a, V: Optimizer, B: ParamBuffer> {
    opt: &'a mut V,
    groups: &'a mut [Group<B>],
    armed: bool,
    climbed: bool,
}

impl<V: Optimizer, B: ParamBuffer> core::fmt::Debug for Perturbed<'_, V, B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Perturbed")
            .field("groups", &self.groups.len())
            .finish()
    }
}

impl<'a, V: Optimizer, B: ParamBuffer> Perturbed<'a, V, B> {
    /// The guard after a first half that perturbed the weights (`climbed`) or did not.
    pub(crate) fn new(opt: &'a mut V, groups: &'a mut [Group<B>], climbed: bool) -> Self {
        if climbed {
            opt.engine_mut().phase = Phase::Perturbed;
        }
        Perturbed {
            opt,
            groups,
            armed: true,
            climbed,
        }
    }

    /// Restores the weights if they were perturbed, and ends the phase.
    fn disarm(&mut self) -> Result<(), Error<B::Error>> {
        self.armed = false;
        self.opt.engine_mut().phase = Phase::Idle;
        if self.climbed {
            Engine::restore_all(self.groups)
        } else {
            Ok(())
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
        self.disarm()
    }

    fn finish(&mut self, how: Finish) -> Result<StepStatus, Error<B::Error>> {
        self.armed = false;
        let r = self.opt.second_half(self.groups, how);
        // Every path of `second` leaves the weights restored or stepped.
        self.opt.engine_mut().phase = Phase::Idle;
        r
    }
}

impl<V: Optimizer, B: ParamBuffer> Drop for Perturbed<'_, V, B> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.disarm();
        }
    }
}
