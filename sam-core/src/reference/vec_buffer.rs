//! [`VecBuffer`]: the reference backend over memory it owns.

use alloc::vec::Vec;

use super::{SliceBuffer, SliceError, SlotMemory};
use crate::backend::Real;
use crate::buffer::{
    AverageFold, ParamBuffer, PerturbSpec, ReduceSpec, Reduction, Slot, SlotSpec, UpdateSpec,
};
use crate::checkpoint::copy_slot;

/// A parameter group whose weights, gradient and slots live in `Vec`s it owns (feature
/// `alloc`). Every pass is [`SliceBuffer`]'s, run on a view of this memory, so the two give the
/// same bits. Unlike `SliceBuffer`, it allocates its slots when the optimizer asks for them
/// (zeroed) and, when the slot layout changes, keeps the values of each slot present in both
/// layouts, as [`ParamBuffer::prepare`] asks of a backend that owns its slot memory.
///
/// ```
/// use sam_core::reference::VecBuffer;
/// use sam_core::{BaseRule, Group, Optimizer, Sam, SamConfig, SgdConfig};
/// let buf = VecBuffer::new(vec![3.0_f64, -4.0], vec![0.0; 2])?;
/// let base = BaseRule::sgd(SgdConfig { lr: 0.1, ..Default::default() })?;
/// let mut groups = [Group::new(buf, base)];
/// let mut sam = Sam::new(SamConfig::default())?;
/// sam.step(&mut groups, |gs: &mut [Group<VecBuffer<f64>>]| {
///     let (w, g) = gs[0].buffer.weights_and_grad();
///     g.copy_from_slice(w); // ∇ of ½‖w‖²
///     Ok::<_, sam_core::Error<_>>(())
/// })?;
/// assert!(groups[0].buffer.weights()[0] < 3.0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct VecBuffer<T: Real> {
    w: Vec<T>,
    g: Vec<T>,
    slots: SlotMemory<T>,
}

impl<T: Real> VecBuffer<T> {
    /// Owns these weights and gradient (which must have the same length); no slots yet.
    pub fn new(w: Vec<T>, g: Vec<T>) -> Result<Self, SliceError> {
        if w.len() != g.len() {
            return Err(SliceError::LengthMismatch {
                weights: w.len(),
                grads: g.len(),
            });
        }
        Ok(Self {
            w,
            g,
            slots: SlotMemory::new(),
        })
    }

    /// The weights.
    pub fn weights(&self) -> &[T] {
        &self.w
    }

    /// The weights, mutably (to initialise them; not during a step).
    pub fn weights_mut(&mut self) -> &mut [T] {
        &mut self.w
    }

    /// The gradient.
    pub fn grad(&self) -> &[T] {
        &self.g
    }

    /// The gradient, mutably: the framework writes `∇L(w)` here.
    pub fn grad_mut(&mut self) -> &mut [T] {
        &mut self.g
    }

    /// Weights (read) and gradient (write) at once, for a backward pass.
    pub fn weights_and_grad(&mut self) -> (&[T], &mut [T]) {
        (&self.w, &mut self.g)
    }

    /// The values of one slot, if prepared.
    pub fn slot(&self, slot: Slot) -> Option<&[T]> {
        self.slots.slot(slot)
    }

    /// The values of one slot, mutably, if prepared (to load or corrupt a checkpoint).
    pub fn slot_mut(&mut self, slot: Slot) -> Option<&mut [T]> {
        self.slots.slot_mut(slot)
    }

    /// The slot layout last prepared.
    pub fn spec(&self) -> Option<SlotSpec> {
        self.slots.spec()
    }

    fn view<R>(
        &mut self,
        pass: impl FnOnce(&mut SliceBuffer<'_, T>) -> Result<R, SliceError>,
    ) -> Result<R, SliceError> {
        let spec = self.slots.spec();
        let mut b = SliceBuffer::new(&mut self.w, &mut self.g, self.slots.values_mut())?;
        if let Some(spec) = &spec {
            b.prepare(spec)?;
        }
        pass(&mut b)
    }
}

impl<T: Real> ParamBuffer for VecBuffer<T> {
    type Scalar = T;
    type Error = SliceError;

    fn len(&self) -> usize {
        self.w.len()
    }

    fn prepare(&mut self, spec: &SlotSpec) -> Result<(), SliceError> {
        self.slots.prepare(spec, self.w.len())
    }

    fn reduce(&mut self, spec: &ReduceSpec) -> Result<Reduction, SliceError> {
        self.view(|b| b.reduce(spec))
    }

    fn perturb(&mut self, spec: &PerturbSpec) -> Result<(), SliceError> {
        self.view(|b| b.perturb(spec))
    }

    fn restore(&mut self) -> Result<(), SliceError> {
        self.view(|b| b.restore())
    }

    fn update(&mut self, spec: &UpdateSpec) -> Result<(), SliceError> {
        self.view(|b| b.update(spec))
    }

    fn fold_averages(&mut self, fold: &AverageFold) -> Result<(), SliceError> {
        self.view(|b| b.fold_averages(fold))
    }

    fn swap_average(&mut self, k: u8) -> Result<(), SliceError> {
        self.view(|b| b.swap_average(k))
    }
}

impl<T: Real> crate::checkpoint::SlotAccess for VecBuffer<T> {
    fn prepared(&self) -> Option<SlotSpec> {
        self.spec()
    }
    fn read_slot(&self, slot: Slot, out: &mut [T]) -> Result<(), SliceError> {
        copied(copy_slot(self.slot(slot), Some(out)))
    }
    fn write_slot(&mut self, slot: Slot, values: &[T]) -> Result<(), SliceError> {
        copied(copy_slot(Some(values), self.slot_mut(slot)))
    }
}

/// [`copy_slot`]'s outcome as this backend's result.
pub(crate) fn copied(done: bool) -> Result<(), SliceError> {
    if done {
        Ok(())
    } else {
        Err(SliceError::MissingSlot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn a_changed_layout_keeps_each_slot_present_in_both() {
        let mut b = VecBuffer::new(vec![1.0_f64, 2.0], vec![0.0; 2]).expect("equal lengths");
        let first = SlotSpec {
            stash: true,
            ..SlotSpec::default()
        };
        b.prepare(&first).expect("supported");
        b.slot_mut(Slot::Stash)
            .expect("prepared")
            .copy_from_slice(&[5.0, 6.0]);
        let second = SlotSpec {
            stash: true,
            state: 2,
            ..SlotSpec::default()
        };
        b.prepare(&second).expect("supported");
        assert_eq!(b.slot(Slot::Stash), Some(&[5.0, 6.0][..]));
        assert_eq!(b.slot(Slot::State(1)), Some(&[0.0, 0.0][..]));
        assert_eq!(b.slot(Slot::Backup), None);
    }

    #[test]
    fn refusals_change_nothing() {
        assert_eq!(
            VecBuffer::new(vec![1.0_f32], vec![]).err(),
            Some(SliceError::LengthMismatch {
                weights: 1,
                grads: 0
            })
        );
        let mut b = VecBuffer::new(vec![1.0_f32], vec![0.0]).expect("equal lengths");
        let bad = SlotSpec {
            state: 4,
            ..SlotSpec::default()
        };
        assert_eq!(b.prepare(&bad), Err(SliceError::UnsupportedSlots));
        assert_eq!(b.spec(), None);
        assert_eq!(b.restore(), Err(SliceError::MissingSlot));
    }
}
