//! The reference backend: [`SliceBuffer`], a [`ParamBuffer`] over plain slices.
//!
//! It is the executable specification: each pass is the simplest loop around the element
//! functions of [`kernel`], in the canonical order. Every other backend is tested
//! against it. It allocates nothing: the caller provides the slot memory (`spec.count() · len`
//! values, zero-initialised, laid out slot after slot). With the `alloc` feature, `VecBuffer`
//! owns its memory and runs the same passes (for tests and for storage held in `Vec`s), and
//! `SlotMemory` is the owned slot memory of one tensor, for backends that run these passes on
//! a framework's own weight and gradient storage.
//!
//! ```
//! use sam_core::reference::SliceBuffer;
//! let mut w = [1.0_f32, 2.0];
//! let mut g = [0.0_f32; 2];
//! let mut slots = [0.0_f32; 4]; // room for 2 slots (e.g. backup + momentum) of 2 elements
//! let buf = SliceBuffer::new(&mut w, &mut g, &mut slots).unwrap();
//! assert_eq!(buf.weights(), &[1.0, 2.0]);
//! ```

use core::fmt;

use crate::backend::kernel;
use crate::backend::{BaseStep, Real};
use crate::buffer::{
    AverageFold, ParamBuffer, PerturbSpec, ReduceSpec, Reduction, Slot, SlotSpec, UpdateSpec,
};

#[cfg(feature = "alloc")]
mod slot_memory;
#[cfg(feature = "alloc")]
mod vec_buffer;
#[cfg(feature = "alloc")]
pub use slot_memory::SlotMemory;
#[cfg(feature = "alloc")]
pub use vec_buffer::VecBuffer;

/// Errors of the reference backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SliceError {
    /// The weights and the gradient have different lengths.
    LengthMismatch {
        /// Number of weights.
        weights: usize,
        /// Number of gradient values.
        grads: usize,
    },
    /// The model copy of the weights has another length than the weights.
    ModelLengthMismatch {
        /// Number of weights.
        weights: usize,
        /// Number of values in the model copy.
        model: usize,
    },
    /// The slot memory is too small for the slots the optimizer needs.
    SlotsTooSmall {
        /// Values needed (`slots · len`).
        needed: usize,
        /// Values provided.
        provided: usize,
    },
    /// A pass ran before [`ParamBuffer::prepare`], or needs a slot the prepared spec lacks.
    MissingSlot,
    /// The slot spec asks for more base-state slots (3) or averages
    /// ([`MAX_AVERAGES`](crate::backend::MAX_AVERAGES)) than any optimizer uses.
    UnsupportedSlots,
    /// The slot memory an owning buffer (`VecBuffer`, feature `alloc`) needs could not be
    /// allocated.
    OutOfMemory {
        /// Values that were to be allocated.
        values: usize,
    },
}

impl fmt::Display for SliceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SliceError::LengthMismatch { weights, grads } => {
                write!(f, "{weights} weights but {grads} gradient values")
            }
            SliceError::ModelLengthMismatch { weights, model } => {
                write!(f, "{weights} weights but {model} values in the model copy")
            }
            SliceError::SlotsTooSmall { needed, provided } => {
                write!(
                    f,
                    "slot memory holds {provided} values but {needed} are needed"
                )
            }
            SliceError::MissingSlot => f.write_str("a pass needs a slot that was not prepared"),
            SliceError::UnsupportedSlots => {
                f.write_str("at most 3 base-state slots and MAX_AVERAGES averages are supported")
            }
            SliceError::OutOfMemory { values } => {
                write!(f, "could not allocate slot memory of {values} values")
            }
        }
    }
}

impl core::error::Error for SliceError {}

/// A parameter group stored in caller-provided slices.
///
/// The weights and the slots have the element type `T`; the gradient has its own, `G` (by
/// default `T`). The layouts of mixed-precision training (see the crate docs):
///
/// - `T` everywhere ([`new`](Self::new)): `f32`, `f64`, or a 16-bit type for a model trained
///   in pure `bf16`;
/// - `f32` weights and slots with 16-bit gradients ([`mixed`](Self::mixed)), for a framework
///   that keeps `f32` parameters and computes the backward pass in `bf16`/`f16`;
/// - `f32` master weights with a 16-bit copy of them, the one the model computes with, and
///   16-bit gradients ([`with_model_copy`](Self::with_model_copy)): every pass that writes a
///   weight writes the copy too, as the `G` rounding of the stored master weight, so the copy
///   is always the rounding of the master (and a restore restores both bit for bit).
#[derive(Debug)]
pub struct SliceBuffer<'a, T: Real, G: Real = T> {
    w: &'a mut [T],
    g: &'a mut [G],
    slots: &'a mut [T],
    model: Option<&'a mut [G]>,
    spec: Option<SlotSpec>,
}

impl<'a, T: Real> SliceBuffer<'a, T> {
    /// Wraps weights, gradient and slot memory. The gradient must be as long as the weights;
    /// the slot memory is checked when the optimizer says which slots it needs.
    pub fn new(w: &'a mut [T], g: &'a mut [T], slots: &'a mut [T]) -> Result<Self, SliceError> {
        SliceBuffer::mixed(w, g, slots)
    }
}

impl<'a, T: Real, G: Real> SliceBuffer<'a, T, G> {
    /// Wraps weights and slot memory of type `T` and a gradient of type `G` (which must be as
    /// long as the weights).
    ///
    /// ```
    /// # #[cfg(feature = "half")] {
    /// use half::bf16;
    /// use sam_core::reference::SliceBuffer;
    /// let mut w = [1.0_f32, 2.0];
    /// let mut g = [bf16::ZERO; 2];
    /// let mut slots = [0.0_f32; 2];
    /// let buf = SliceBuffer::mixed(&mut w, &mut g, &mut slots).unwrap();
    /// assert_eq!(buf.grad(), &[bf16::ZERO; 2]);
    /// # }
    /// ```
    pub fn mixed(w: &'a mut [T], g: &'a mut [G], slots: &'a mut [T]) -> Result<Self, SliceError> {
        if w.len() != g.len() {
            return Err(SliceError::LengthMismatch {
                weights: w.len(),
                grads: g.len(),
            });
        }
        Ok(SliceBuffer {
            w,
            g,
            slots,
            model: None,
            spec: None,
        })
    }

    /// Adds the model's copy of the weights in the gradient's type, and sets it to the rounding
    /// of the (master) weights now; from then on every pass keeps it so. To start from a model
    /// whose weights exist only in 16 bits, widen them into the master weights first (exact).
    ///
    /// ```
    /// # #[cfg(feature = "half")] {
    /// use half::bf16;
    /// use sam_core::reference::SliceBuffer;
    /// let mut model = [bf16::from_f32(0.1), bf16::from_f32(-3.0)];
    /// let mut master: Vec<f32> = model.iter().map(|x| x.to_f32()).collect();
    /// let mut g = [bf16::ZERO; 2];
    /// let mut slots = [0.0_f32; 2];
    /// let buf = SliceBuffer::mixed(&mut master, &mut g, &mut slots)
    ///     .unwrap()
    ///     .with_model_copy(&mut model)
    ///     .unwrap();
    /// assert_eq!(buf.model().unwrap()[1], bf16::from_f32(-3.0));
    /// # }
    /// ```
    pub fn with_model_copy(mut self, model: &'a mut [G]) -> Result<Self, SliceError> {
        if model.len() != self.w.len() {
            return Err(SliceError::ModelLengthMismatch {
                weights: self.w.len(),
                model: model.len(),
            });
        }
        for (m, w) in model.iter_mut().zip(self.w.iter()) {
            *m = G::from_f64(w.to_f64());
        }
        self.model = Some(model);
        Ok(self)
    }

    /// The weights (the master weights when there is a model copy).
    pub fn weights(&self) -> &[T] {
        self.w
    }

    /// The weights, mutably (to initialise them; not during a step). With a model copy, call
    /// [`refresh_model`](Self::refresh_model) afterwards.
    pub fn weights_mut(&mut self) -> &mut [T] {
        self.w
    }

    /// The model copy of the weights, if any.
    pub fn model(&self) -> Option<&[G]> {
        self.model.as_deref()
    }

    /// Rounds the weights into the model copy again (after [`weights_mut`](Self::weights_mut)).
    pub fn refresh_model(&mut self) {
        if let Some(m) = self.model.as_deref_mut() {
            for (m, w) in m.iter_mut().zip(self.w.iter()) {
                *m = G::from_f64(w.to_f64());
            }
        }
    }

    /// The gradient.
    pub fn grad(&self) -> &[G] {
        self.g
    }

    /// The gradient, mutably: the framework writes `∇L(w)` here (times the loss scale, if one
    /// is set).
    pub fn grad_mut(&mut self) -> &mut [G] {
        self.g
    }

    /// Weights (read) and gradient (write) at once, for a backward pass.
    pub fn weights_and_grad(&mut self) -> (&[T], &mut [G]) {
        (self.w, self.g)
    }

    /// The model copy (read, if any) and the gradient (write) at once, for a backward pass of a
    /// model that computes in `G`.
    pub fn model_and_grad(&mut self) -> (Option<&[G]>, &mut [G]) {
        (self.model.as_deref(), self.g)
    }

    /// The values of one slot, if prepared (`Slot::Average(0)` holds the first average, …).
    pub fn slot(&self, slot: Slot) -> Option<&[T]> {
        let n = self.w.len();
        let k = self.spec?.index(slot)?;
        self.slots.get(k * n..(k + 1) * n)
    }

    fn range(&self, slot: Slot) -> Result<core::ops::Range<usize>, SliceError> {
        let n = self.w.len();
        let k = self
            .spec
            .and_then(|s| s.index(slot))
            .ok_or(SliceError::MissingSlot)?;
        Ok(k * n..(k + 1) * n)
    }

    /// Stores weight `i`, and its rounding into the model copy.
    #[inline]
    fn set_weight(&mut self, i: usize, w: T) {
        self.w[i] = w;
        if let Some(m) = self.model.as_deref_mut() {
            m[i] = G::from_f64(w.to_f64());
        }
    }
}

#[cfg(feature = "alloc")]
impl<T: Real, G: Real> crate::checkpoint::SlotAccess for SliceBuffer<'_, T, G> {
    fn prepared(&self) -> Option<SlotSpec> {
        self.spec
    }
    fn read_slot(&self, slot: Slot, out: &mut [T]) -> Result<(), SliceError> {
        vec_buffer::copied(crate::checkpoint::copy_slot(self.slot(slot), Some(out)))
    }
    fn write_slot(&mut self, slot: Slot, values: &[T]) -> Result<(), SliceError> {
        let r = self.range(slot)?;
        vec_buffer::copied(crate::checkpoint::copy_slot(
            Some(values),
            self.slots.get_mut(r),
        ))
    }
}

/// Refuses a slot spec no optimizer asks for (more than 3 base-state slots or
/// [`MAX_AVERAGES`](crate::backend::MAX_AVERAGES) averages).
fn supported(spec: &SlotSpec) -> Result<(), SliceError> {
    if spec.state > 3 || usize::from(spec.averages) > crate::backend::MAX_AVERAGES {
        return Err(SliceError::UnsupportedSlots);
    }
    Ok(())
}

impl<T: Real, G: Real> ParamBuffer for SliceBuffer<'_, T, G> {
    type Scalar = T;
    type Error = SliceError;

    fn len(&self) -> usize {
        self.w.len()
    }

    fn prepare(&mut self, spec: &SlotSpec) -> Result<(), SliceError> {
        supported(spec)?;
        let needed = spec.count().saturating_mul(self.w.len());
        if self.slots.len() < needed {
            return Err(SliceError::SlotsTooSmall {
                needed,
                provided: self.slots.len(),
            });
        }
        self.spec = Some(*spec);
        Ok(())
    }

    fn reduce(&mut self, spec: &ReduceSpec) -> Result<Reduction, SliceError> {
        let stash = if spec.reads_stash() {
            Some(self.range(Slot::Stash)?)
        } else {
            None
        };
        let (w, g, slots) = (&*self.w, &*self.g, &*self.slots);
        Ok(kernel::reduce_flat(w.len(), spec, |i| {
            let s = stash.as_ref().map_or(0.0, |r| slots[r.start + i].to_f64());
            (w[i].to_f64(), g[i].to_f64(), s)
        }))
    }

    fn perturb(&mut self, spec: &PerturbSpec) -> Result<(), SliceError> {
        let backup = self.range(Slot::Backup)?;
        let stash = if spec.stash {
            Some(self.range(Slot::Stash)?)
        } else {
            None
        };
        for i in 0..self.w.len() {
            let w = self.w[i];
            let g = self.g[i].to_f64();
            self.slots[backup.start + i] = w;
            if let Some(r) = &stash {
                self.slots[r.start + i] = T::from_f64(kernel::stashed(spec, g));
            }
            self.set_weight(i, T::from_f64(kernel::perturb(spec, w.to_f64(), g)));
        }
        Ok(())
    }

    fn restore(&mut self) -> Result<(), SliceError> {
        let backup = self.range(Slot::Backup)?;
        self.w.copy_from_slice(&self.slots[backup]);
        self.refresh_model();
        Ok(())
    }

    fn update(&mut self, spec: &UpdateSpec) -> Result<(), SliceError> {
        let n = self.w.len();
        let backup = if spec.restore {
            Some(self.range(Slot::Backup)?)
        } else {
            None
        };
        let stash = if spec.reads_stash() {
            Some(self.range(Slot::Stash)?)
        } else {
            None
        };
        let n_state = spec.base.state_slots();
        let mut state_at = [0usize; 3];
        for (k, at) in state_at.iter_mut().enumerate().take(n_state) {
            *at = self.range(Slot::State(k as u8))?.start;
        }
        let mut avg_at = [None; crate::backend::MAX_AVERAGES];
        for (k, wgt) in spec.average.weights.iter().enumerate() {
            if let Some(wgt) = wgt {
                avg_at[k] = Some((self.range(Slot::Average(k as u8))?.start, *wgt));
            }
        }
        let external = matches!(spec.base, BaseStep::External);
        for i in 0..n {
            let b = backup
                .as_ref()
                .map_or(0.0, |r| self.slots[r.start + i].to_f64());
            let s = stash
                .as_ref()
                .map_or(0.0, |r| self.slots[r.start + i].to_f64());
            let mut st = [0.0; 3];
            for k in 0..n_state {
                st[k] = self.slots[state_at[k] + i].to_f64();
            }
            let out = kernel::update(spec, self.w[i].to_f64(), b, self.g[i].to_f64(), s, &mut st);
            let w_new = T::from_f64(out.w);
            self.set_weight(i, w_new);
            if external {
                self.g[i] = G::from_f64(out.d);
            }
            if let (true, Some(r)) = (spec.writes_stash(), &stash) {
                self.slots[r.start + i] = T::from_f64(out.stash);
            }
            for k in 0..n_state {
                self.slots[state_at[k] + i] = T::from_f64(st[k]);
            }
            for (at, wgt) in avg_at.iter().flatten() {
                let a = self.slots[at + i].to_f64();
                self.slots[at + i] = T::from_f64(kernel::fold(a, w_new.to_f64(), *wgt));
            }
        }
        Ok(())
    }

    fn fold_averages(&mut self, fold: &AverageFold) -> Result<(), SliceError> {
        // Check every slot before writing any, so an error changes nothing.
        let mut starts = [None; crate::backend::MAX_AVERAGES];
        for (k, wgt) in fold.weights.iter().enumerate() {
            if let Some(wgt) = wgt {
                starts[k] = Some((self.range(Slot::Average(k as u8))?.start, *wgt));
            }
        }
        let n = self.w.len();
        for (start, wgt) in starts.into_iter().flatten() {
            for (a, w) in self.slots[start..start + n].iter_mut().zip(self.w.iter()) {
                *a = T::from_f64(kernel::fold(a.to_f64(), w.to_f64(), wgt));
            }
        }
        Ok(())
    }

    fn swap_average(&mut self, k: u8) -> Result<(), SliceError> {
        let r = self.range(Slot::Average(k))?;
        self.w.swap_with_slice(&mut self.slots[r]);
        self.refresh_model();
        Ok(())
    }
}
