//! [`SamCandle`]: an optimizer of sam-core driven by candle's `backward()` and `GradStore`.

use candle_core::Tensor;
use candle_core::backprop::GradStore;
use sam_core::{Group, Optimizer, Perturbed, SamOptimizer, StepReport, StepStatus};

use crate::buffer::VarBuffer;
use crate::element::Element;
use crate::error::CandleError;

/// The error of a step: sam-core's, with this crate's backend errors (and candle's, from a
/// forward or backward pass, as [`CandleError::Candle`]).
pub type Error = sam_core::Error<CandleError>;

fn candle(e: candle_core::Error) -> Error {
    sam_core::Error::Backend(e.into())
}

/// Loads `grads` into every group (see [`VarBuffer::load_grads`]).
pub fn load_grads<T: Element>(
    groups: &mut [Group<VarBuffer<T>>],
    grads: &GradStore,
) -> Result<(), Error> {
    groups
        .iter_mut()
        .try_for_each(|g| g.buffer.load_grads(grads))
        .map_err(sam_core::Error::Backend)
}

/// Any optimizer of sam-core (any [`Optimizer`]: SAM, ASAM, GSAM, WSAM, WASAM, the base
/// optimizer) over param groups of candle `Var`s.
///
/// Two ways to step, as with the upstream code:
/// - the closure form, [`step`](Self::step): the closure runs the forward pass and returns the
///   loss; the driver calls `backward()` itself, twice for the SAM family;
/// - the two-call form, [`first_step`](Self::first_step) with the first backward pass's
///   gradients, then [`CandlePerturbed::second_step`] with the second's (or
///   [`CandlePerturbed::restore_with_gradient`] to finish with a candle optimizer of your own).
#[derive(Debug)]
pub struct SamCandle<O, T: Element = f32> {
    optimizer: O,
    groups: Vec<Group<VarBuffer<T>>>,
}

impl<O: Optimizer, T: Element> SamCandle<O, T> {
    /// Drives `optimizer` over `groups`.
    pub fn new(optimizer: O, groups: Vec<Group<VarBuffer<T>>>) -> Self {
        Self { optimizer, groups }
    }

    /// The optimizer (its phase, step count, checkpoint state).
    pub fn optimizer(&self) -> &O {
        &self.optimizer
    }

    /// The optimizer, mutably (lr schedule, loading a checkpoint).
    pub fn optimizer_mut(&mut self) -> &mut O {
        &mut self.optimizer
    }

    /// The groups.
    pub fn groups(&self) -> &[Group<VarBuffer<T>>] {
        &self.groups
    }

    /// The groups, mutably (per-group options such as the learning rate, between steps).
    pub fn groups_mut(&mut self) -> &mut [Group<VarBuffer<T>>] {
        &mut self.groups
    }

    /// The optimizer and its groups, for the generic API of sam-core.
    pub fn parts_mut(&mut self) -> (&mut O, &mut [Group<VarBuffer<T>>]) {
        (&mut self.optimizer, &mut self.groups)
    }

    /// A whole step: `loss` runs the forward pass at the current weights and returns the loss
    /// (a scalar tensor); the driver runs `backward()` on it and loads the gradients. A
    /// SAM-family optimizer calls it twice (clean weights, whose loss is reported, then the
    /// perturbed ones); the base optimizer once. An error of the closure aborts the step with
    /// the weights restored.
    pub fn step(
        &mut self,
        mut loss: impl FnMut() -> candle_core::Result<Tensor>,
    ) -> Result<StepReport<Tensor>, Error> {
        self.optimizer.step(&mut self.groups, |groups| {
            let l = loss().map_err(candle)?;
            let grads = l.backward().map_err(candle)?;
            load_grads(groups, &grads)?;
            Ok::<_, Error>(l)
        })
    }

    /// Restores the weights after a leaked guard (see [`Optimizer::recover`]).
    pub fn recover(&mut self) -> Result<(), Error> {
        self.optimizer.recover(&mut self.groups)
    }
}

impl<O: SamOptimizer, T: Element> SamCandle<O, T> {
    /// First half of a SAM step with the gradients of the first backward pass: perturbs the
    /// `Var`s in place and returns the guard of the perturbed phase (dropping it restores
    /// them). Run the forward and backward passes at the perturbed weights while it lives.
    pub fn first_step(&mut self, grads: &GradStore) -> Result<CandlePerturbed<'_, O, T>, Error> {
        load_grads(&mut self.groups, grads)?;
        Ok(CandlePerturbed {
            inner: self.optimizer.first_step(&mut self.groups)?,
        })
    }
}

/// The `Var`s are perturbed: compute the gradient at them, then finish the step. Dropping the
/// guard restores the weights exactly and discards the step.
#[derive(Debug)]
#[must_use = "dropping the guard restores the weights and discards the step"]
pub struct CandlePerturbed<'a, O: Optimizer, T: Element> {
    inner: Perturbed<'a, O, VarBuffer<T>>,
}

impl<O: Optimizer, T: Element> CandlePerturbed<'_, O, T> {
    /// Finishes the step with each group's base rule, from the gradients of the second
    /// backward pass: restores the weights, forms the variant's gradient and steps, in one
    /// pass. A non-finite gradient restores the weights and skips the step.
    pub fn second_step(mut self, grads: &GradStore) -> Result<StepStatus, Error> {
        load_grads(self.inner.groups_mut(), grads)?;
        self.inner.second_step()
    }

    /// Bring your own optimizer: restores the weights and writes the variant's final gradient
    /// into the tensors of `grads` in place (for SAM the gradient at the perturbed weights is
    /// left as it is), so that `your_optimizer.step(&grads)` applies it.
    pub fn restore_with_gradient(mut self, grads: &GradStore) -> Result<StepStatus, Error> {
        load_grads(self.inner.groups_mut(), grads)?;
        self.inner.restore_with_gradient()
    }

    /// Abandons the step, restoring the weights.
    pub fn cancel(self) -> Result<(), Error> {
        self.inner.cancel()
    }
}
