//! The error type of the backend.

use core::fmt;

use sam_core::backend::{Slot, SlotSpec};

/// Everything that can go wrong in an [`NdGroup`](crate::NdGroup): at construction (shapes,
/// layouts), when slots are prepared (allocation), or when a pass needs a slot that was not
/// prepared. No method of this crate panics on bad input; it returns one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NdError {
    /// The number of gradient arrays differs from the number of parameter arrays.
    TensorCountMismatch {
        /// Number of parameter arrays.
        weights: usize,
        /// Number of gradient arrays.
        grads: usize,
    },
    /// A gradient's shape differs from its parameter's.
    ShapeMismatch {
        /// Index of the tensor in the group.
        tensor: usize,
        /// The parameter's shape.
        weight: Vec<usize>,
        /// The gradient's shape.
        grad: Vec<usize>,
    },
    /// An array is not in standard (row-major, contiguous) layout, for example a transposed or
    /// strided array. Make it contiguous first (`array.as_standard_layout().into_owned()`).
    NotContiguous {
        /// Index of the tensor in the group.
        tensor: usize,
        /// `"weight"` or `"gradient"`.
        array: &'static str,
    },
    /// A pass ran before [`ParamBuffer::prepare`](sam_core::backend::ParamBuffer::prepare), or needs a
    /// slot that the prepared [`SlotSpec`] lacks. Nothing was changed.
    MissingSlot(Slot),
    /// The slot specification asks for more base-rule state slots (at most 3) or running
    /// averages (at most [`sam_core::backend::MAX_AVERAGES`]) than any optimizer uses.
    UnsupportedSlots(SlotSpec),
    /// The memory for the optimizer's slots could not be allocated. Nothing was changed.
    AllocationFailed {
        /// Elements requested for one slot.
        elements: usize,
    },
}

impl fmt::Display for NdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NdError::TensorCountMismatch { weights, grads } => {
                write!(f, "{weights} parameter arrays but {grads} gradient arrays")
            }
            NdError::ShapeMismatch {
                tensor,
                weight,
                grad,
            } => write!(
                f,
                "tensor {tensor}: the gradient has shape {grad:?} but the parameter has shape {weight:?}"
            ),
            NdError::NotContiguous { tensor, array } => write!(
                f,
                "tensor {tensor}: the {array} array is not in standard (contiguous row-major) layout"
            ),
            NdError::MissingSlot(slot) => {
                write!(f, "a pass needs the slot {slot:?}, which was not prepared")
            }
            NdError::UnsupportedSlots(spec) => write!(
                f,
                "unsupported slot specification {spec:?} (at most 3 state slots and {} averages)",
                sam_core::backend::MAX_AVERAGES
            ),
            NdError::AllocationFailed { elements } => {
                write!(f, "could not allocate a slot of {elements} elements")
            }
        }
    }
}

impl std::error::Error for NdError {}
