//! What a storage implementor needs: the [`ParamBuffer`] trait, the `Copy` specifications of its
//! fused passes, the element math of [`kernel`], and the scalar types.
//!
//! A training-code author never needs this module beyond naming [`ParamBuffer`] in a generic
//! bound; a backend (`sam-ndarray`, `sam-cuda`, a framework adapter) implements the trait by
//! looping (or launching a kernel) over the element functions of [`kernel`], so that the math
//! exists once. See `examples/custom_buffer.rs` for a complete backend.

pub mod kernel;
mod lanes;

pub use crate::base::{AdamStep, BaseStep, SgdStep, add, lerp};
pub use crate::buffer::{
    AverageFold, GradMix, MAX_AVERAGES, ParamBuffer, PerturbSpec, PostMix, ReduceSpec, ReduceStage,
    Reduction, Slot, SlotSpec, UpdateSpec, Weighting,
};
pub use crate::real::Real;
