//! Data-parallel training: [`Collective`], the few host-scalar reductions a communication
//! library (MPI, NCCL) supplies, and [`Distributed`], a group's buffer whose reductions are
//! combined across the workers.
//!
//! Every norm the optimizers compute (the perturbation norm, `‖g‖`, `‖stash‖`, GSAM's and
//! WSAM's dot products, LookSAM's ratio, every finiteness check) comes from the reduce pass of
//! each group; the core hands each group's result to [`ParamBuffer::across_workers`] right after
//! the pass. [`Distributed`] implements it with a [`Collective`] and a [`Layout`]:
//!
//! - [`Layout::Replicated`]: every worker holds the whole group. Only finiteness is combined
//!   (and-ed), so a NaN/∞ gradient on any worker makes every worker skip the step (or refuse
//!   it): no worker steps while another does not. Norms stay each worker's own: with
//!   [`SyncPolicy::Global`] the gradients were averaged before the step, so they are the same on
//!   every worker; with [`SyncPolicy::Local`] the first gradient is the worker's own and so is
//!   its perturbation (m-sharpness).
//! - [`Layout::Sharded`]: each worker holds a part of the group (the group is the parts
//!   concatenated in rank order): sums are summed, maxima maxed and finiteness and-ed across the
//!   workers, so every norm and dot product is the whole group's and the step is the unsharded
//!   step. With a [`Collective::sum`] that adds in rank order, two workers holding halves cut at
//!   a multiple of [`kernel::BLOCK`](crate::backend::kernel::BLOCK) elements of equal block
//!   count give the unsharded step's bits (the halves are the two subtrees of the canonical
//!   pairwise tree); other cuts differ from it by the reassociation of the sums only.
//!
//! Averaging the gradients themselves is the caller's backward pass's job (as with torch's
//! DDP): [`SyncPolicy`] says which of a step's gradients are averaged.
//!
//! ```
//! use core::cell::Cell;
//! use sam_core::backend::{ParamBuffer, ReduceSpec, ReduceStage};
//! use sam_core::collective::{Collective, Distributed, DistributedError, Layout};
//! use sam_core::reference::SliceBuffer;
//!
//! /// One worker, alone: sums and maxima are its own; counts the calls.
//! struct Solo(Cell<usize>);
//! impl Collective for Solo {
//!     type Error = core::convert::Infallible;
//!     fn rank(&self) -> usize { 0 }
//!     fn workers(&self) -> usize { 1 }
//!     fn sum(&self, _: &mut [f64]) -> Result<(), Self::Error> { self.0.set(self.0.get() + 1); Ok(()) }
//!     fn max(&self, _: &mut [f64]) -> Result<(), Self::Error> { Ok(()) }
//! }
//!
//! let solo = Solo(Cell::new(0));
//! let (mut w, mut g, mut slots) = ([1.0_f32, 2.0], [3.0_f32, 4.0], [0.0_f32; 0]);
//! let buf = SliceBuffer::new(&mut w, &mut g, &mut slots).map_err(DistributedError::Backend)?;
//! let mut part = Distributed::new(buf, &solo, Layout::Sharded);
//! let spec = ReduceSpec { grad: true, ..ReduceSpec::FINITE_ONLY };
//! let r = part.reduce(&spec)?;
//! let r = part.across_workers(r, ReduceStage::First)?;
//! assert_eq!((r.grad_sq, r.finite, solo.0.get()), (25.0, true, 1));
//! # Ok::<(), sam_core::collective::DistributedError<sam_core::reference::SliceError, core::convert::Infallible>>(())
//! ```

use core::fmt;

use crate::backend::{
    AverageFold, ParamBuffer, PerturbSpec, ReduceSpec, ReduceStage, Reduction, SlotSpec, UpdateSpec,
};

/// The reductions over the workers of a data-parallel run that the optimizers need: element-wise
/// sums and maxima of a few host `f64` scalars. Implemented over a communication library (an MPI
/// communicator, an NCCL communicator); every worker calls each method in the same order.
pub trait Collective {
    /// The library's error (a lost worker, a timeout).
    type Error: fmt::Debug + fmt::Display;
    /// This worker's index, `0..workers()`.
    fn rank(&self) -> usize;
    /// The number of workers.
    fn workers(&self) -> usize;
    /// `x[i] ← Σ_k x_k[i]` over the workers `k`, with the same bits on every worker. Adding in
    /// rank order makes the sharded step reproducible (see the module docs).
    fn sum(&self, x: &mut [f64]) -> Result<(), Self::Error>;
    /// `x[i] ← max_k x_k[i]` over the workers (`x` holds no NaN).
    fn max(&self, x: &mut [f64]) -> Result<(), Self::Error>;
}

/// How a group's elements are spread over the workers (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Every worker holds the whole group: finiteness is combined, norms are the worker's own.
    Replicated,
    /// Each worker holds a part: every reduction is combined, norms are the whole group's.
    Sharded,
}

/// Which gradients of a two-gradient step the workers average (in their backward pass), for
/// replicated groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// m-sharpness (Foret et al. 2021, §4.1; the `model.no_sync()` recipe of davda54/sam's
    /// README): the first gradient is each worker's own, so each worker climbs along its own
    /// gradient with its own norm; the second gradient is averaged, so every worker takes the
    /// same final step. That holds for the variants whose final direction is the second
    /// gradient alone (SAM, ASAM, WASAM). GSAM, WSAM and LookSAM mix the worker's own clean
    /// gradient into the direction, so the replicas would drift apart: finish their steps with
    /// [`restore_with_gradient`](crate::Perturbed::restore_with_gradient), average the
    /// direction it leaves in the gradients, and apply it with a base optimizer (the recipe of
    /// GSAM's `gsam.py`: both backward passes under `no_sync`, the final direction
    /// all-reduced in `gradient_decompose`).
    Local,
    /// Both gradients are averaged: the climb is the one of the whole batch (its norm the
    /// global one), and so is the step.
    Global,
}

impl SyncPolicy {
    /// Whether the first (clean) gradient is averaged before the climb.
    pub fn averages_first(self) -> bool {
        matches!(self, SyncPolicy::Global)
    }

    /// Whether the gradient of call `call` (0: the clean gradient, 1: the one at the perturbed
    /// weights) of a step is averaged; `climbs` is whether the step climbs (a step of LookSAM
    /// between refreshes, [`LookSam::refreshes`](crate::LookSam::refreshes), or a plain step of
    /// [`Interval`](crate::Interval::will_climb) takes one gradient, its final one, which
    /// every policy averages).
    pub fn averages(self, call: usize, climbs: bool) -> bool {
        call > 0 || !climbs || self.averages_first()
    }
}

/// A failure of a [`Distributed`] buffer: its own backend's, or the collective's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DistributedError<B, C> {
    /// The wrapped buffer failed.
    Backend(B),
    /// The collective failed (the other workers cannot be reached, a timeout).
    Collective(C),
}

impl<B: fmt::Display, C: fmt::Display> fmt::Display for DistributedError<B, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DistributedError::Backend(e) => write!(f, "{e}"),
            DistributedError::Collective(e) => write!(f, "collective: {e}"),
        }
    }
}

/// A group's buffer in a data-parallel run: `B`'s passes, with every reduction combined across
/// the workers of `C` as `layout` says. Every worker wraps each of its groups (the same groups,
/// in the same order) and steps them with the same optimizer and options.
#[derive(Debug)]
pub struct Distributed<'c, B, C> {
    inner: B,
    comm: &'c C,
    layout: Layout,
}

impl<'c, B: ParamBuffer, C: Collective> Distributed<'c, B, C> {
    /// `inner` (the whole group, or this worker's part of it) on the workers of `comm`.
    pub fn new(inner: B, comm: &'c C, layout: Layout) -> Self {
        Distributed {
            inner,
            comm,
            layout,
        }
    }

    /// The wrapped buffer.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The wrapped buffer, mutably (to write gradients; not during a step).
    pub fn inner_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    /// The wrapped buffer back.
    pub fn into_inner(self) -> B {
        self.inner
    }

    /// The layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The collective.
    pub fn collective(&self) -> &'c C {
        self.comm
    }
}

type DistResult<T, B, C> =
    Result<T, DistributedError<<B as ParamBuffer>::Error, <C as Collective>::Error>>;

impl<B: ParamBuffer, C: Collective> ParamBuffer for Distributed<'_, B, C> {
    type Scalar = B::Scalar;
    type Error = DistributedError<B::Error, C::Error>;

    fn len(&self) -> usize {
        self.inner.len()
    }

    fn prepare(&mut self, spec: &SlotSpec) -> DistResult<(), B, C> {
        self.inner.prepare(spec).map_err(DistributedError::Backend)
    }

    fn reduce(&mut self, spec: &ReduceSpec) -> DistResult<Reduction, B, C> {
        self.inner.reduce(spec).map_err(DistributedError::Backend)
    }

    fn perturb(&mut self, spec: &PerturbSpec) -> DistResult<(), B, C> {
        self.inner.perturb(spec).map_err(DistributedError::Backend)
    }

    fn restore(&mut self) -> DistResult<(), B, C> {
        self.inner.restore().map_err(DistributedError::Backend)
    }

    fn update(&mut self, spec: &UpdateSpec) -> DistResult<(), B, C> {
        self.inner.update(spec).map_err(DistributedError::Backend)
    }

    fn fold_averages(&mut self, fold: &AverageFold) -> DistResult<(), B, C> {
        self.inner
            .fold_averages(fold)
            .map_err(DistributedError::Backend)
    }

    fn swap_average(&mut self, k: u8) -> DistResult<(), B, C> {
        self.inner
            .swap_average(k)
            .map_err(DistributedError::Backend)
    }

    /// Replicated: at [`ReduceStage::First`] (which every worker reaches), finiteness and-ed
    /// over the workers; the repeat at other scales is the worker's own (it depends on its own
    /// norms) and communicates nothing. Sharded: sums summed, maxima maxed, finiteness and-ed,
    /// at both stages (the combined first result decides the repeat, the same on every worker).
    fn across_workers(&mut self, r: Reduction, stage: ReduceStage) -> DistResult<Reduction, B, C> {
        let r = self
            .inner
            .across_workers(r, stage)
            .map_err(DistributedError::Backend)?;
        let err = DistributedError::Collective;
        let nonfinite = if r.finite { 0.0 } else { 1.0 };
        match (self.layout, stage) {
            (Layout::Replicated, ReduceStage::First) => {
                let mut x = [nonfinite];
                self.comm.sum(&mut x).map_err(err)?;
                Ok(Reduction {
                    finite: x[0] == 0.0,
                    ..r
                })
            }
            (Layout::Replicated, ReduceStage::Rescaled) => Ok(r),
            (Layout::Sharded, _) => {
                let mut sums = [r.perturb_sq, r.grad_sq, r.stash_sq, r.dot, nonfinite];
                // A non-finite part's maxima may be NaN: `max` is given none.
                let clean = |m: f64| if m.is_nan() { f64::INFINITY } else { m };
                let mut maxima = [clean(r.perturb_max), clean(r.grad_max), clean(r.stash_max)];
                self.comm.sum(&mut sums).map_err(err)?;
                self.comm.max(&mut maxima).map_err(err)?;
                let [perturb_sq, grad_sq, stash_sq, dot, nonfinite] = sums;
                let [perturb_max, grad_max, stash_max] = maxima;
                Ok(Reduction {
                    perturb_sq,
                    grad_sq,
                    stash_sq,
                    dot,
                    perturb_max,
                    grad_max,
                    stash_max,
                    finite: nonfinite == 0.0,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::RefCell;

    /// A fake second worker: adds `other` to every sum and maxes with `other_max`.
    struct Pair {
        other: RefCell<[f64; 5]>,
        other_max: [f64; 3],
    }

    impl Collective for Pair {
        type Error = &'static str;
        fn rank(&self) -> usize {
            0
        }
        fn workers(&self) -> usize {
            2
        }
        fn sum(&self, x: &mut [f64]) -> Result<(), &'static str> {
            let o = self.other.borrow();
            match x.len() {
                1 => x[0] += o[4],
                5 => x.iter_mut().zip(o.iter()).for_each(|(a, b)| *a += b),
                _ => return Err("unexpected length"),
            }
            Ok(())
        }
        fn max(&self, x: &mut [f64]) -> Result<(), &'static str> {
            for (a, b) in x.iter_mut().zip(self.other_max) {
                *a = a.max(b);
            }
            Ok(())
        }
    }

    const R: Reduction = Reduction {
        perturb_sq: 1.0,
        grad_sq: 2.0,
        stash_sq: 3.0,
        dot: 4.0,
        perturb_max: 0.5,
        grad_max: 0.25,
        stash_max: 8.0,
        finite: true,
    };

    type Slice<'a> = crate::reference::SliceBuffer<'a, f64>;

    fn buffer<'a>(
        comm: &'a Pair,
        layout: Layout,
        mem: &'a mut [[f64; 2]; 2],
    ) -> Distributed<'a, Slice<'a>, Pair> {
        let [w, g] = mem;
        let b = crate::reference::SliceBuffer::new(w, g, &mut []).unwrap();
        Distributed::new(b, comm, layout)
    }

    #[test]
    fn sharded_reductions_sum_max_and_and() {
        let comm = Pair {
            other: RefCell::new([10.0, 20.0, 30.0, 40.0, 1.0]),
            other_max: [2.0, 0.125, 1.0],
        };
        let mut mem = [[0.0; 2]; 2];
        let mut d = buffer(&comm, Layout::Sharded, &mut mem);
        for stage in [ReduceStage::First, ReduceStage::Rescaled] {
            let r = d.across_workers(R, stage).unwrap();
            assert_eq!(
                (r.perturb_sq, r.grad_sq, r.stash_sq, r.dot),
                (11.0, 22.0, 33.0, 44.0)
            );
            assert_eq!((r.perturb_max, r.grad_max, r.stash_max), (2.0, 0.25, 8.0));
            assert!(!r.finite, "the other part was not finite");
        }
        comm.other.borrow_mut()[4] = 0.0;
        assert!(d.across_workers(R, ReduceStage::First).unwrap().finite);
    }

    #[test]
    fn replicated_reductions_combine_finiteness_only_and_only_at_the_first_stage() {
        let comm = Pair {
            other: RefCell::new([10.0, 20.0, 30.0, 40.0, 1.0]),
            other_max: [2.0, 2.0, 2.0],
        };
        let mut mem = [[0.0; 2]; 2];
        let mut d = buffer(&comm, Layout::Replicated, &mut mem);
        let r = d.across_workers(R, ReduceStage::First).unwrap();
        assert_eq!(r, Reduction { finite: false, ..R });
        assert_eq!(d.across_workers(R, ReduceStage::Rescaled).unwrap(), R);
        assert_eq!(d.layout(), Layout::Replicated);
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn policies_say_which_gradients_are_averaged() {
        assert!(!SyncPolicy::Local.averages(0, true) && SyncPolicy::Local.averages(1, true));
        assert!(SyncPolicy::Local.averages(0, false));
        assert!(SyncPolicy::Global.averages(0, true) && SyncPolicy::Global.averages(1, true));
    }
}
