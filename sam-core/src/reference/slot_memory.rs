//! [`SlotMemory`]: slot memory a backend owns, kept by role when the layout changes.

use alloc::vec::Vec;

use super::{SliceError, supported};
use crate::backend::Real;
use crate::buffer::{Slot, SlotSpec};

/// The slots of `len` parameter elements, owned, laid out slot after slot as
/// [`SliceBuffer`](super::SliceBuffer) reads them (feature `alloc`). [`prepare`](Self::prepare)
/// allocates the slots of a spec zeroed and, when the spec changes, keeps the values of each
/// slot present in both layouts, as [`ParamBuffer::prepare`](crate::backend::ParamBuffer::prepare)
/// asks of a backend that owns its slot memory. A backend over framework tensors keeps one per
/// tensor and runs the reference passes on `SliceBuffer::new(w, g, memory.values_mut())`.
///
/// ```
/// use sam_core::backend::{Slot, SlotSpec};
/// use sam_core::reference::SlotMemory;
/// let mut m = SlotMemory::<f32>::new();
/// m.prepare(&SlotSpec { backup: true, ..SlotSpec::default() }, 3)?;
/// assert_eq!(m.slot(Slot::Backup), Some(&[0.0_f32; 3][..]));
/// # Ok::<(), sam_core::reference::SliceError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SlotMemory<T> {
    values: Vec<T>,
    spec: Option<SlotSpec>,
    len: usize,
}

impl<T: Real> SlotMemory<T> {
    /// No slots yet.
    pub fn new() -> Self {
        Self {
            values: Vec::new(),
            spec: None,
            len: 0,
        }
    }

    /// Lays out the slots of `spec` for `len` elements: a no-op when neither changed; otherwise
    /// new slots are zeroed and each slot present before and after keeps its values (a changed
    /// `len` starts every slot from zero). An error (unsupported spec, failed allocation)
    /// changes nothing.
    pub fn prepare(&mut self, spec: &SlotSpec, len: usize) -> Result<(), SliceError> {
        if self.spec.as_ref() == Some(spec) && self.len == len {
            return Ok(());
        }
        supported(spec)?;
        let values = spec
            .count()
            .checked_mul(len)
            .ok_or(SliceError::OutOfMemory { values: usize::MAX })?;
        let mut fresh = Vec::new();
        fresh
            .try_reserve_exact(values)
            .map_err(|_| SliceError::OutOfMemory { values })?;
        fresh.resize(values, T::default());
        if self.len == len {
            for role in Slot::ALL {
                let old = self.spec.and_then(|s| s.index(role));
                if let (Some(from), Some(to)) = (old, spec.index(role)) {
                    fresh[to * len..(to + 1) * len]
                        .copy_from_slice(&self.values[from * len..(from + 1) * len]);
                }
            }
        }
        self.values = fresh;
        self.spec = Some(*spec);
        self.len = len;
        Ok(())
    }

    /// The layout last prepared.
    pub fn spec(&self) -> Option<SlotSpec> {
        self.spec
    }

    /// All slot values, slot after slot (the `slots` argument of `SliceBuffer::new`).
    pub fn values(&self) -> &[T] {
        &self.values
    }

    /// All slot values, mutably.
    pub fn values_mut(&mut self) -> &mut [T] {
        &mut self.values
    }

    /// The values of one slot, if prepared.
    pub fn slot(&self, slot: Slot) -> Option<&[T]> {
        let k = self.spec?.index(slot)?;
        self.values.get(k * self.len..(k + 1) * self.len)
    }

    /// The values of one slot, mutably, if prepared.
    pub fn slot_mut(&mut self, slot: Slot) -> Option<&mut [T]> {
        let k = self.spec?.index(slot)?;
        self.values.get_mut(k * self.len..(k + 1) * self.len)
    }
}
