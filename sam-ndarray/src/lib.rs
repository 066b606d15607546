//! `sam-ndarray`: the CPU backend of [`sam_core`], a [`ParamBuffer`] over [`ndarray`] arrays.
//!
//! An [`NdGroup`] is one parameter group: any number of tensors of any shape (`ArrayD<f32>` or
//! `ArrayD<f64>`, each in standard layout), a gradient array per tensor that your backward pass
//! writes, and the optimizer's per-element slots (backup, stash, base-rule state, running
//! averages), allocated by the optimizer's first step. Every optimizer of `sam-core` (SAM, ASAM,
//! the plain [`BaseOptimizer`](sam_core::BaseOptimizer), and the other variants) runs on it
//! through the [`ParamBuffer`] trait: each pass is one fused sweep over the tensors, calling the
//! element functions of [`sam_core::backend::kernel`], so the math exists once.
//!
//! ```
//! use ndarray::{ArrayD, IxDyn};
//! use sam_core::{BaseRule, Group, Optimizer, Perturbation, Sam, SgdConfig, StepStatus};
//! use sam_ndarray::{NdError, NdGroup};
//!
//! // Fit y = 2·x₀ − x₁ + 0.5 with a linear model: a weight of shape [2] and a bias of shape [1].
//! let xs = [[1.0_f32, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0], [-1.0, 0.5]];
//! let ys: Vec<f32> = xs.iter().map(|x| 2.0 * x[0] - x[1] + 0.5).collect();
//! let params = vec![ArrayD::zeros(IxDyn(&[2])), ArrayD::zeros(IxDyn(&[1]))];
//! let base = BaseRule::sgd(SgdConfig { lr: 0.05, momentum: 0.9, ..Default::default() })?;
//! let mut groups = [Group::new(NdGroup::new(params)?, base)];
//! let mut sam = Sam::new(Perturbation::sam(0.05).into())?;
//!
//! for _ in 0..300 {
//!     let report = sam.step(&mut groups, |gs| {
//!         // The backward pass: mean squared error and its gradient, written into the grads.
//!         let (w, mut grads) = gs[0].buffer.weights_and_grads_mut();
//!         let (a, b) = (&w[0], w[1][0]);
//!         let (mut loss, mut ga, mut gb) = (0.0, [0.0_f32; 2], 0.0);
//!         for (x, y) in xs.iter().zip(&ys) {
//!             let err = a[0] * x[0] + a[1] * x[1] + b - y;
//!             loss += err * err / xs.len() as f32;
//!             ga[0] += 2.0 * err * x[0] / xs.len() as f32;
//!             ga[1] += 2.0 * err * x[1] / xs.len() as f32;
//!             gb += 2.0 * err / xs.len() as f32;
//!         }
//!         if let Some(mut g) = grads.get_mut(0) {
//!             g[0] = ga[0];
//!             g[1] = ga[1];
//!         }
//!         if let Some(mut g) = grads.get_mut(1) {
//!             g[0] = gb;
//!         }
//!         Ok::<_, sam_core::Error<NdError>>(loss)
//!     })?;
//!     assert_eq!(report.status, StepStatus::Applied);
//! }
//! let w = groups[0].buffer.weights();
//! assert!((w[0][0] - 2.0).abs() < 1e-2 && (w[0][1] + 1.0).abs() < 1e-2, "{w:?}");
//! assert!((w[1][0] - 0.5).abs() < 1e-2, "{w:?}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `rayon` | no | every pass runs in parallel on the current rayon thread pool, with results bit-identical to the single-threaded build whatever the thread count; without it the crate has no threading dependency |
//! | `half` | no | `bf16` and `f16` storage (`sam-core/half`): in every layout below |
//!
//! # Exactness and determinism
//!
//! Every pass computes exactly what [`sam_core::reference::SliceBuffer`] computes on the
//! concatenation of the tensors (in order, each flattened row-major), bit for bit: element-wise
//! passes call the same kernel functions; the reduce pass follows the canonical order of
//! [`sam_core::backend::kernel`] (flat element index across the concatenation, blocks of
//! [`kernel::BLOCK`](sam_core::backend::kernel::BLOCK) that may span tensor boundaries, lanes
//! `i % LANES`, blocks combined by the [`pairwise`](sam_core::backend::kernel::pairwise) tree). With
//! `rayon`, element-wise passes split the tensors into element ranges (each element is computed
//! independently, so the split cannot matter) and the reduction evaluates the two halves of the
//! same pairwise tree with `rayon::join`. NaN payloads are the one exception: Rust does not
//! specify the sign and payload of a NaN produced by arithmetic, so only "is NaN" is reproduced.
//!
//! # Storage layout
//!
//! Weights and gradients stay in your arrays (`Vec<ArrayD<T>>`, one per tensor, contiguous
//! row-major); nothing is copied into a flat buffer. Each slot is **one contiguous `Vec<T>` for
//! the whole group**, tensor after tensor at the offsets of [`NdGroup::tensor_range`] (the
//! flat order above), so a pass walks each tensor's weights, gradient and slot ranges as plain
//! slices. Slots are allocated, zeroed, by [`ParamBuffer::prepare`] when the optimizer's
//! [`SlotSpec`] changes (normally once, at the first step); a slot kept by the new spec keeps
//! its values, a slot it drops is freed. No pass allocates.
//!
//! The layouts of mixed-precision training (docs/design.md §5a): an `NdGroup<T, G>` stores its
//! weights and slots in `T` and its gradients in `G` ([`NdGroup::mixed`], for example `f32`
//! master weights with `bf16` gradients), and may keep a model copy of the weights in `G`
//! ([`NdGroup::with_model_copy`]) that every weight-writing pass rounds the new weights into, so
//! the copy is always the rounding of the master weights and a restore restores both bit for
//! bit. Every layout computes exactly what the reference backend's `SliceBuffer<T, G>` does.
//!
//! # Performance
//!
//! Passes are bound by memory bandwidth: per element of `f32` storage a SAM step with SGD
//! momentum moves 40 bytes (reduce 4, perturb 16, restore-and-step 20) plus 4 for the
//! finiteness check of the second gradient. Each pass is one loop per tensor, specialised on
//! the discriminants of its specification (outside the loop), so the loop body is the kernel
//! function with no branch left on the spec. A group of many small tensors costs one loop
//! each, never a thread spawn each. `cargo bench -p sam-ndarray` measures a step against the
//! machine's STREAM triad bandwidth, with a per-pass breakdown. The element-wise passes run at
//! memory speed on baseline x86-64. The reduce passes are compiled for the best instruction
//! set the CPU has ([`isa`]): the norm reductions keep a block's 8 `f64` accumulator lanes in
//! SIMD registers (with SSE2 alone the norm pass stays compute-bound, about a third of memory
//! speed on one core; with AVX2 or AVX-512 it is near memory speed), and the finiteness check
//! of the second gradient reads the storage type directly.
//!
//! # References
//!
//! - Foret et al., *Sharpness-Aware Minimization for Efficiently Improving Generalization*,
//!   ICLR 2021, <https://arxiv.org/abs/2010.01412>.
//! - Kwon et al., *ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of
//!   Deep Neural Networks*, ICML 2021, <https://arxiv.org/abs/2102.11600>.

#![deny(unsafe_code)]
#![deny(missing_docs)]

mod error;
pub mod isa;
mod passes;
mod reduce;
pub mod slices;
mod span;

use core::ops::Range;

use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD};
use sam_core::backend::{
    AverageFold, MAX_AVERAGES, ParamBuffer, PerturbSpec, Real, ReduceSpec, Reduction, Slot,
    SlotSpec, UpdateSpec,
};
use sam_core::checkpoint::copy_slot;

pub use crate::error::NdError;
use crate::span::{AVG0, BACKUP, NSLOTS, STASH, STATE0, SlotRefs, Span, Tensors};

/// The default of [`NdGroup::min_parallel_len`]: the fewest elements worth a rayon task.
#[cfg(feature = "rayon")]
pub const DEFAULT_MIN_PARALLEL_LEN: usize = 1 << 15;

/// One parameter group stored in `ndarray` arrays: the [`ParamBuffer`] of this crate.
///
/// Holds the parameter tensors (any number, any shapes, standard layout), one gradient array
/// per tensor (same shape, element type `G`, by default the weights'), optionally a model copy
/// of the weights in `G`, and the optimizer's slots (see the crate docs for the layout). The
/// group's elements are the tensors' elements in order, each tensor flattened row-major.
///
/// ```
/// use ndarray::{ArrayD, IxDyn};
/// use sam_core::backend::{ParamBuffer, Slot, SlotSpec};
/// use sam_ndarray::NdGroup;
///
/// let w = vec![ArrayD::from_elem(IxDyn(&[2, 3]), 1.0_f64), ArrayD::from_elem(IxDyn(&[3]), 2.0)];
/// let mut group = NdGroup::new(w)?;
/// assert_eq!((group.num_tensors(), group.len()), (2, 9));
/// group.prepare(&SlotSpec { backup: true, state: 1, ..Default::default() })?;
/// assert_eq!(group.slot(Slot::State(0)).map(<[f64]>::len), Some(9));
/// assert_eq!(group.slot_view(Slot::Backup, 1).map(|v| v.shape().to_vec()), Some(vec![3]));
/// # Ok::<(), sam_ndarray::NdError>(())
/// ```
#[derive(Debug, Clone)]
pub struct NdGroup<T: Real, G: Real = T> {
    weights: Vec<ArrayD<T>>,
    grads: Vec<ArrayD<G>>,
    /// The model copy of the weights (one array per tensor), if kept.
    model: Option<Vec<ArrayD<G>>>,
    /// `offsets[t]..offsets[t + 1]` are tensor `t`'s elements in the flat order.
    offsets: Vec<usize>,
    /// One vector per slot role (backup, stash, 3 states, averages), `Some` iff `spec` has it.
    slots: [Option<Vec<T>>; NSLOTS],
    spec: Option<SlotSpec>,
    #[cfg(feature = "rayon")]
    min_par: usize,
}

/// Mutable access to the gradient arrays of an [`NdGroup`] (their shapes cannot change).
#[derive(Debug)]
pub struct GradsMut<'a, T> {
    grads: &'a mut [ArrayD<T>],
}

impl<T> GradsMut<'_, T> {
    /// Number of gradient arrays (one per tensor).
    pub fn len(&self) -> usize {
        self.grads.len()
    }

    /// Whether the group has no tensors.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// The gradient of tensor `i`, if it exists.
    pub fn get_mut(&mut self, i: usize) -> Option<ArrayViewMutD<'_, T>> {
        self.grads.get_mut(i).map(ArrayD::view_mut)
    }

    /// The gradient of tensor `i` as a flat row-major slice, if it exists.
    pub fn slice_mut(&mut self, i: usize) -> Option<&mut [T]> {
        self.grads.get_mut(i).and_then(ArrayD::as_slice_mut)
    }

    /// Every gradient, in tensor order.
    pub fn iter_mut(&mut self) -> impl ExactSizeIterator<Item = ArrayViewMutD<'_, T>> {
        self.grads.iter_mut().map(ArrayD::view_mut)
    }
}

/// Slot role index of a slot, if it is one this backend stores.
fn role(slot: Slot) -> Option<usize> {
    match slot {
        Slot::Backup => Some(BACKUP),
        Slot::Stash => Some(STASH),
        Slot::State(k) if k < 3 => Some(STATE0 + usize::from(k)),
        Slot::Average(k) if usize::from(k) < MAX_AVERAGES => Some(AVG0 + usize::from(k)),
        _ => None,
    }
}

/// The slot of a role index.
fn slot_of(role: usize) -> Slot {
    match role {
        BACKUP => Slot::Backup,
        STASH => Slot::Stash,
        r if r < AVG0 => Slot::State((r - STATE0) as u8),
        r => Slot::Average((r - AVG0) as u8),
    }
}

/// A zeroed vector, or an error if the memory cannot be had.
fn zeroed<T: Real>(len: usize) -> Result<Vec<T>, NdError> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| NdError::AllocationFailed { elements: len })?;
    v.resize(len, T::from_f64(0.0));
    Ok(v)
}

/// The ranges of the slots in `need` (roles), or [`NdError::MissingSlot`] before anything is
/// borrowed if one is not prepared.
fn take_slots<'a, T>(
    slots: &'a mut [Option<Vec<T>>; NSLOTS],
    spec: Option<SlotSpec>,
    need: [bool; NSLOTS],
) -> Result<SlotRefs<'a, T>, NdError> {
    for (r, (&n, s)) in need.iter().zip(slots.iter()).enumerate() {
        let slot = slot_of(r);
        if n && (spec.and_then(|sp| sp.index(slot)).is_none() || s.is_none()) {
            return Err(NdError::MissingSlot(slot));
        }
    }
    let mut out: SlotRefs<'a, T> = Default::default();
    for ((o, s), n) in out.iter_mut().zip(slots.iter_mut()).zip(need) {
        if n {
            *o = s.as_deref_mut();
        }
    }
    Ok(out)
}

impl<T: Real> NdGroup<T> {
    /// A group of these parameter tensors, with zero gradients of the same shapes and type.
    ///
    /// Errors: [`NdError::NotContiguous`] if an array is not in standard layout.
    pub fn new(weights: Vec<ArrayD<T>>) -> Result<Self, NdError> {
        Self::mixed(weights)
    }

    /// A group of these parameter tensors and their gradients (same number, same shapes).
    ///
    /// Errors: [`NdError::TensorCountMismatch`], [`NdError::ShapeMismatch`],
    /// [`NdError::NotContiguous`].
    pub fn with_grads(weights: Vec<ArrayD<T>>, grads: Vec<ArrayD<T>>) -> Result<Self, NdError> {
        Self::mixed_with_grads(weights, grads)
    }
}

impl<T: Real, G: Real> NdGroup<T, G> {
    /// A group of these parameter tensors with zero gradients of the same shapes in `G`: for
    /// example `f32` (master) weights and slots with `bf16` gradients. Every pass widens the
    /// gradient exactly and computes as for [`new`](NdGroup::new); only the storage differs.
    ///
    /// ```
    /// use half::bf16;
    /// use ndarray::{ArrayD, IxDyn};
    /// use sam_ndarray::NdGroup;
    ///
    /// let master = vec![ArrayD::from_elem(IxDyn(&[3]), 0.1_f32)];
    /// let group = NdGroup::<f32, bf16>::mixed(master)?.with_model_copy()?;
    /// assert_eq!(group.model().unwrap()[0][0], bf16::from_f32(0.1));
    /// assert_eq!(group.grads()[0][0], bf16::ZERO);
    /// # Ok::<(), sam_ndarray::NdError>(())
    /// ```
    ///
    /// Errors: [`NdError::NotContiguous`] if an array is not in standard layout.
    pub fn mixed(weights: Vec<ArrayD<T>>) -> Result<Self, NdError> {
        let grads = weights
            .iter()
            .map(|w| ArrayD::from_elem(w.raw_dim(), G::from_f64(0.0)))
            .collect();
        Self::mixed_with_grads(weights, grads)
    }

    /// [`with_grads`](NdGroup::with_grads) with the gradients in `G`, as
    /// [`mixed`](Self::mixed) stores them.
    ///
    /// Errors: [`NdError::TensorCountMismatch`], [`NdError::ShapeMismatch`],
    /// [`NdError::NotContiguous`].
    pub fn mixed_with_grads(
        weights: Vec<ArrayD<T>>,
        grads: Vec<ArrayD<G>>,
    ) -> Result<Self, NdError> {
        if weights.len() != grads.len() {
            return Err(NdError::TensorCountMismatch {
                weights: weights.len(),
                grads: grads.len(),
            });
        }
        let mut offsets = Vec::with_capacity(weights.len() + 1);
        let mut total = 0usize;
        offsets.push(0);
        for (t, (w, g)) in weights.iter().zip(&grads).enumerate() {
            if w.shape() != g.shape() {
                return Err(NdError::ShapeMismatch {
                    tensor: t,
                    weight: w.shape().to_vec(),
                    grad: g.shape().to_vec(),
                });
            }
            if !w.is_standard_layout() {
                return Err(NdError::NotContiguous {
                    tensor: t,
                    array: "weight",
                });
            }
            if !g.is_standard_layout() {
                return Err(NdError::NotContiguous {
                    tensor: t,
                    array: "gradient",
                });
            }
            total += w.len();
            offsets.push(total);
        }
        Ok(NdGroup {
            weights,
            grads,
            model: None,
            offsets,
            slots: Default::default(),
            spec: None,
            #[cfg(feature = "rayon")]
            min_par: DEFAULT_MIN_PARALLEL_LEN,
        })
    }

    /// Number of parameter elements in the group (all tensors).
    pub fn len(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// Whether the group has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of tensors.
    pub fn num_tensors(&self) -> usize {
        self.weights.len()
    }

    /// Where tensor `i`'s elements are in the group's flat order (and in every slot).
    pub fn tensor_range(&self, i: usize) -> Option<Range<usize>> {
        Some(*self.offsets.get(i)?..*self.offsets.get(i + 1)?)
    }

    /// Keeps a model copy of the weights in the gradient's type `G`, set now to the rounding
    /// of the (master) weights: the copy a model computing in `G` reads. From then on every
    /// pass that writes the weights (perturb, restore, the update, swapping an average in or
    /// out) rounds them into the copy in the same sweep, so the copy is always the rounding of
    /// the weights, and restoring restores it bit for bit. Calling it again re-rounds the copy.
    pub fn with_model_copy(mut self) -> Result<Self, NdError> {
        self.model = Some(self.weights.iter().map(|w| w.mapv(round)).collect());
        self.check_layout()?;
        Ok(self)
    }

    /// The model copy of the weights, if the group keeps one ([`with_model_copy`]).
    ///
    /// [`with_model_copy`]: NdGroup::with_model_copy
    pub fn model(&self) -> Option<&[ArrayD<G>]> {
        self.model.as_deref()
    }

    /// Rounds the weights into the model copy again, if there is one (after changing the
    /// weights through [`weight_mut`](Self::weight_mut) or [`weights_mut`](Self::weights_mut)).
    pub fn refresh_model(&mut self) {
        if let Some(model) = &mut self.model {
            for (m, w) in model.iter_mut().zip(&self.weights) {
                m.zip_mut_with(w, |m, &w| *m = round(w));
            }
        }
    }

    /// The parameter tensors (the master weights when there is a model copy).
    pub fn weights(&self) -> &[ArrayD<T>] {
        &self.weights
    }

    /// Parameter tensor `i`, mutably (to initialise or load it; its shape cannot change). With
    /// a model copy, call [`refresh_model`](Self::refresh_model) afterwards.
    pub fn weight_mut(&mut self, i: usize) -> Option<ArrayViewMutD<'_, T>> {
        self.weights.get_mut(i).map(ArrayD::view_mut)
    }

    /// Every parameter tensor, mutably, in order. With a model copy, call
    /// [`refresh_model`](Self::refresh_model) afterwards.
    pub fn weights_mut(&mut self) -> impl ExactSizeIterator<Item = ArrayViewMutD<'_, T>> {
        self.weights.iter_mut().map(ArrayD::view_mut)
    }

    /// The gradient arrays.
    pub fn grads(&self) -> &[ArrayD<G>] {
        &self.grads
    }

    /// The gradient arrays, mutably: the backward pass writes `∇L(w)` here.
    pub fn grads_mut(&mut self) -> GradsMut<'_, G> {
        GradsMut {
            grads: &mut self.grads,
        }
    }

    /// The gradient of tensor `i`, mutably.
    pub fn grad_mut(&mut self, i: usize) -> Option<ArrayViewMutD<'_, G>> {
        self.grads.get_mut(i).map(ArrayD::view_mut)
    }

    /// The weights (read) and the gradients (write) at once, for a backward pass.
    pub fn weights_and_grads_mut(&mut self) -> (&[ArrayD<T>], GradsMut<'_, G>) {
        (
            &self.weights,
            GradsMut {
                grads: &mut self.grads,
            },
        )
    }

    /// The model copy (read, if kept) and the gradients (write) at once, for a backward pass
    /// of a model that computes in `G`.
    pub fn model_and_grads_mut(&mut self) -> (Option<&[ArrayD<G>]>, GradsMut<'_, G>) {
        (
            self.model.as_deref(),
            GradsMut {
                grads: &mut self.grads,
            },
        )
    }

    /// Sets every gradient to zero (before accumulating a new one).
    pub fn zero_grads(&mut self) {
        for g in &mut self.grads {
            g.fill(G::from_f64(0.0));
        }
    }

    /// The slot specification prepared last, if any.
    pub fn slot_spec(&self) -> Option<SlotSpec> {
        self.spec
    }

    /// The values of one slot over the whole group (flat order), if prepared.
    pub fn slot(&self, slot: Slot) -> Option<&[T]> {
        self.spec?.index(slot)?;
        self.slots[role(slot)?].as_deref()
    }

    /// The values of one slot, mutably (for example to load a checkpoint), if prepared.
    pub fn slot_mut(&mut self, slot: Slot) -> Option<&mut [T]> {
        self.spec?.index(slot)?;
        self.slots[role(slot)?].as_deref_mut()
    }

    /// The values of one slot for tensor `i`, in the tensor's shape (for example
    /// `slot_view(Slot::Average(0), i)` is the averaged tensor `i`).
    pub fn slot_view(&self, slot: Slot, i: usize) -> Option<ArrayViewD<'_, T>> {
        let values = self.slot(slot)?.get(self.tensor_range(i)?)?;
        ArrayViewD::from_shape(self.weights[i].raw_dim(), values).ok()
    }

    /// Gives the arrays back: `(weights, grads)` (a model copy is dropped).
    pub fn into_parts(self) -> (Vec<ArrayD<T>>, Vec<ArrayD<G>>) {
        (self.weights, self.grads)
    }

    /// Fewest elements a rayon task handles (default [`DEFAULT_MIN_PARALLEL_LEN`]); the
    /// reduce pass uses `max(1, n / BLOCK)` blocks. Only changes how work is split, never a
    /// result.
    #[cfg(feature = "rayon")]
    pub fn min_parallel_len(&self) -> usize {
        self.min_par
    }

    /// Sets [`min_parallel_len`](Self::min_parallel_len) (values below 1 count as 1).
    #[cfg(feature = "rayon")]
    pub fn set_min_parallel_len(&mut self, n: usize) {
        self.min_par = n.max(1);
    }

    /// [`set_min_parallel_len`](Self::set_min_parallel_len), builder style.
    #[cfg(feature = "rayon")]
    pub fn with_min_parallel_len(mut self, n: usize) -> Self {
        self.set_min_parallel_len(n);
        self
    }

    /// Every array still in standard layout (always true: the arrays are only handed out as
    /// views, which cannot change the owner's layout). Checked so that no pass can panic.
    fn check_layout(&self) -> Result<(), NdError> {
        for (t, m) in self.model.iter().flatten().enumerate() {
            if !m.is_standard_layout() {
                return Err(NdError::NotContiguous {
                    tensor: t,
                    array: "model copy",
                });
            }
        }
        for (t, (w, g)) in self.weights.iter().zip(&self.grads).enumerate() {
            if !w.is_standard_layout() {
                return Err(NdError::NotContiguous {
                    tensor: t,
                    array: "weight",
                });
            }
            if !g.is_standard_layout() {
                return Err(NdError::NotContiguous {
                    tensor: t,
                    array: "gradient",
                });
            }
        }
        Ok(())
    }

    /// Runs an element-wise pass over every tensor with the slots in `need`; a pass that
    /// writes the weights keeps the model copy (if any) their rounding ([`span::with_model`]).
    fn each<F>(&mut self, need: [bool; NSLOTS], writes_weights: bool, f: F) -> Result<(), NdError>
    where
        F: Fn(Span<'_, T, G>) + Sync,
    {
        self.check_layout()?;
        let slots = take_slots(&mut self.slots, self.spec, need)?;
        let tensors = Tensors {
            w: &mut self.weights,
            g: &mut self.grads,
            m: if writes_weights {
                self.model.as_deref_mut()
            } else {
                None
            },
            offsets: &self.offsets,
            first: 0,
            slots,
        };
        let f = move |span: Span<'_, T, G>| span::with_model(span, &f);
        #[cfg(feature = "rayon")]
        {
            span::for_each_par(tensors, self.min_par, &f)
        }
        #[cfg(not(feature = "rayon"))]
        {
            span::for_each_seq(tensors, &f)
        }
    }
}

/// A role mask with the given roles set.
fn mask(roles: &[usize]) -> [bool; NSLOTS] {
    let mut m = [false; NSLOTS];
    for &r in roles {
        m[r] = true;
    }
    m
}

/// One rounding from `T` to `G` (exact widening first).
fn round<T: Real, G: Real>(x: T) -> G {
    G::from_f64(x.to_f64())
}

impl<T: Real, G: Real> sam_core::checkpoint::SlotAccess for NdGroup<T, G> {
    fn prepared(&self) -> Option<SlotSpec> {
        self.slot_spec()
    }
    fn read_slot(&self, slot: Slot, out: &mut [T]) -> Result<(), NdError> {
        copy_slot(self.slot(slot), Some(out))
            .then_some(())
            .ok_or(NdError::MissingSlot(slot))
    }
    fn write_slot(&mut self, slot: Slot, values: &[T]) -> Result<(), NdError> {
        copy_slot(Some(values), self.slot_mut(slot))
            .then_some(())
            .ok_or(NdError::MissingSlot(slot))
    }
}

impl<T: Real, G: Real> ParamBuffer for NdGroup<T, G> {
    type Scalar = T;
    type Error = NdError;

    fn len(&self) -> usize {
        NdGroup::len(self)
    }

    /// Allocates (zeroed) the slots of `spec` this group lacks, keeps the ones it has, frees
    /// the ones `spec` drops. Does nothing when `spec` is the one prepared last. Never touches
    /// weights or gradients.
    fn prepare(&mut self, spec: &SlotSpec) -> Result<(), NdError> {
        if self.spec == Some(*spec) {
            return Ok(());
        }
        if spec.state > 3 || usize::from(spec.averages) > MAX_AVERAGES {
            return Err(NdError::UnsupportedSlots(*spec));
        }
        let mut want = [false; NSLOTS];
        for (r, w) in want.iter_mut().enumerate() {
            *w = spec.index(slot_of(r)).is_some();
        }
        // Allocate everything first, so that a failure changes nothing.
        let mut fresh: [Option<Vec<T>>; NSLOTS] = Default::default();
        for r in 0..NSLOTS {
            if want[r] && self.slots[r].is_none() {
                fresh[r] = Some(zeroed(self.len())?);
            }
        }
        for (r, new) in fresh.into_iter().enumerate() {
            if !want[r] {
                self.slots[r] = None;
            } else if new.is_some() {
                self.slots[r] = new;
            }
        }
        self.spec = Some(*spec);
        Ok(())
    }

    fn reduce(&mut self, spec: &ReduceSpec) -> Result<Reduction, NdError> {
        self.check_layout()?;
        let stash: &[T] = if spec.reads_stash() {
            let missing = NdError::MissingSlot(Slot::Stash);
            self.spec
                .and_then(|s| s.index(Slot::Stash))
                .ok_or(missing.clone())?;
            self.slots[STASH].as_deref().ok_or(missing)?
        } else {
            &[]
        };
        let ctx = reduce::ReduceCtx {
            src: reduce::Arrays {
                w: &self.weights,
                g: &self.grads,
                stash,
                offsets: &self.offsets,
            },
            offsets: &self.offsets,
            len: self.offsets.last().copied().unwrap_or(0),
            spec: *spec,
        };
        #[cfg(feature = "rayon")]
        let min_blocks = self.min_par / sam_core::backend::kernel::BLOCK;
        #[cfg(not(feature = "rayon"))]
        let min_blocks = 1;
        Ok(reduce::run(&ctx, min_blocks))
    }

    fn perturb(&mut self, spec: &PerturbSpec) -> Result<(), NdError> {
        let spec = *spec;
        self.each(passes::perturb_needs(&spec), true, move |span| {
            passes::perturb(&spec, span)
        })
    }

    fn restore(&mut self) -> Result<(), NdError> {
        self.each(passes::restore_needs(), true, passes::restore)
    }

    fn update(&mut self, spec: &UpdateSpec) -> Result<(), NdError> {
        let k = passes::UpdateScalars::new(spec);
        self.each(passes::update_needs(spec), true, move |span| {
            passes::update(&k, span)
        })
    }

    fn fold_averages(&mut self, fold: &AverageFold) -> Result<(), NdError> {
        let need = passes::fold_needs(fold);
        if !need.contains(&true) {
            return Ok(());
        }
        let fold = *fold;
        self.each(need, false, move |span| passes::fold(&fold, span))
    }

    fn swap_average(&mut self, k: u8) -> Result<(), NdError> {
        let slot = Slot::Average(k);
        let r = role(slot).ok_or(NdError::MissingSlot(slot))?;
        self.each(mask(&[r]), true, move |span| passes::swap(r - AVG0, span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    fn group(shapes: &[&[usize]]) -> NdGroup<f32> {
        let mut next = 0.0;
        let w = shapes
            .iter()
            .map(|s| {
                ArrayD::from_shape_fn(IxDyn(s), |_| {
                    next += 1.0;
                    next
                })
            })
            .collect();
        NdGroup::new(w).unwrap()
    }

    #[test]
    fn construction_checks_shapes_counts_and_layout() {
        let w = vec![ArrayD::<f32>::zeros(IxDyn(&[2, 3]))];
        let g = vec![ArrayD::<f32>::zeros(IxDyn(&[3, 2]))];
        assert!(matches!(
            NdGroup::with_grads(w.clone(), g),
            Err(NdError::ShapeMismatch { tensor: 0, .. })
        ));
        assert!(matches!(
            NdGroup::with_grads(w.clone(), vec![]),
            Err(NdError::TensorCountMismatch {
                weights: 1,
                grads: 0
            })
        ));
        let t = ArrayD::<f32>::zeros(IxDyn(&[2, 3])).reversed_axes();
        let err = NdGroup::new(vec![t]).unwrap_err();
        assert_eq!(
            err,
            NdError::NotContiguous {
                tensor: 0,
                array: "weight"
            }
        );
        assert!(err.to_string().contains("standard"));
        let g = vec![ArrayD::<f32>::zeros(IxDyn(&[3, 2])).reversed_axes()];
        assert!(matches!(
            NdGroup::with_grads(w, g),
            Err(NdError::NotContiguous {
                array: "gradient",
                ..
            })
        ));
        assert!(NdGroup::<f64>::new(vec![]).unwrap().is_empty());
    }

    #[test]
    fn passes_need_prepared_slots() {
        let mut g = group(&[&[3]]);
        let spec = PerturbSpec {
            stash: false,
            weighting: sam_core::backend::Weighting::Plain,
            scale: 1.0,
            coeff: 1.0,
            unscale: 1.0,
        };
        assert_eq!(g.perturb(&spec), Err(NdError::MissingSlot(Slot::Backup)));
        assert_eq!(g.restore(), Err(NdError::MissingSlot(Slot::Backup)));
        assert_eq!(
            g.swap_average(9),
            Err(NdError::MissingSlot(Slot::Average(9)))
        );
        let too_many = SlotSpec {
            state: 4,
            ..Default::default()
        };
        assert_eq!(
            g.prepare(&too_many),
            Err(NdError::UnsupportedSlots(too_many))
        );
        assert_eq!(g.slot_spec(), None);
    }

    #[test]
    fn prepare_keeps_existing_slots_and_never_touches_weights() {
        let mut g = group(&[&[2, 2], &[0], &[3]]);
        let before = g.weights().to_vec();
        g.prepare(&SlotSpec {
            state: 1,
            ..Default::default()
        })
        .unwrap();
        g.slot_mut(Slot::State(0)).unwrap().fill(7.0);
        let p = g.slot(Slot::State(0)).unwrap().as_ptr();
        g.prepare(&SlotSpec {
            backup: true,
            state: 1,
            averages: 1,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(g.slot(Slot::State(0)).unwrap(), &[7.0; 7]);
        assert_eq!(
            g.slot(Slot::State(0)).unwrap().as_ptr(),
            p,
            "kept, not reallocated"
        );
        assert_eq!(g.slot(Slot::Average(0)).unwrap(), &[0.0; 7]);
        assert!(g.slot(Slot::Stash).is_none());
        g.prepare(&SlotSpec {
            backup: true,
            ..Default::default()
        })
        .unwrap();
        assert!(g.slot(Slot::State(0)).is_none());
        assert_eq!(g.weights(), &before[..]);
        assert_eq!(g.tensor_range(2), Some(4..7));
        assert_eq!(g.slot_view(Slot::Backup, 0).unwrap().shape(), &[2, 2]);
        assert!(g.slot_view(Slot::Backup, 3).is_none());
    }

    #[test]
    fn swap_twice_is_identity() {
        let mut g = group(&[&[5], &[2, 2]]);
        g.prepare(&SlotSpec {
            averages: 2,
            ..Default::default()
        })
        .unwrap();
        let before = g.weights().to_vec();
        g.swap_average(1).unwrap();
        assert!(g.weights().iter().all(|w| w.iter().all(|&x| x == 0.0)));
        g.swap_average(1).unwrap();
        assert_eq!(g.weights(), &before[..]);
    }
}
