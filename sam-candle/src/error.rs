//! The error type of the candle backend.

use core::fmt;

use candle_core::DType;
use sam_core::reference::SliceError;
use sam_ndarray::NdError;

/// Which tensor of a parameter an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The `Var` itself (the weights).
    Weight,
    /// Its gradient from the `GradStore`.
    Gradient,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Weight => "weight",
            Role::Gradient => "gradient",
        })
    }
}

/// Everything that can go wrong in a [`VarBuffer`](crate::VarBuffer). Each names the
/// parameter (its `VarMap` name, or `#i` for the `i`-th `Var` of a list). Every error is
/// reported before anything is written: the weights, the gradients and the optimizer state
/// are as they were.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CandleError {
    /// The same `Var` appears twice in a group.
    DuplicateVar {
        /// The parameter.
        param: String,
    },
    /// A tensor's dtype is not the buffer's element type (`f32` or `f64`).
    DType {
        /// The parameter.
        param: String,
        /// Weight or gradient.
        role: Role,
        /// The buffer's element type.
        expected: DType,
        /// The tensor's.
        found: DType,
    },
    /// A tensor is not on the CPU (the device this backend serves).
    Device {
        /// The parameter.
        param: String,
        /// Weight or gradient.
        role: Role,
    },
    /// A tensor's elements are not one contiguous run of its storage (a transposed or
    /// narrowed view). Make it contiguous first (`t.contiguous()`).
    NotContiguous {
        /// The parameter.
        param: String,
        /// Weight or gradient.
        role: Role,
    },
    /// A gradient's shape differs from its parameter's.
    ShapeMismatch {
        /// The parameter.
        param: String,
        /// The weight's shape.
        weight: Vec<usize>,
        /// The gradient's shape.
        grad: Vec<usize>,
    },
    /// A gradient shares its storage with a weight or with another gradient, so a pass would
    /// write one through the other.
    AliasedGradient {
        /// The parameter.
        param: String,
    },
    /// A parameter that had a gradient in the first backward pass of a step has none in the
    /// second (the step cannot finish for it; the weights are restored when the step is
    /// abandoned).
    MissingGradient {
        /// The parameter.
        param: String,
    },
    /// The slot memory could not be laid out (allocation failed), or a pass ran before it was.
    Slots(SliceError),
    /// A CPU pass refused its operands (a slot the layout lacks; nothing was written).
    Pass(NdError),
    /// candle refused an in-place pass (an internal invariant; the message is candle's).
    Candle(String),
}

impl fmt::Display for CandleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CandleError::DuplicateVar { param } => write!(f, "{param}: the Var appears twice"),
            CandleError::DType {
                param,
                role,
                expected,
                found,
            } => write!(
                f,
                "{param}: {role} has dtype {found:?}, the buffer holds {expected:?}"
            ),
            CandleError::Device { param, role } => {
                write!(f, "{param}: {role} is not on the CPU")
            }
            CandleError::NotContiguous { param, role } => write!(
                f,
                "{param}: {role} is not contiguous (call .contiguous() first)"
            ),
            CandleError::ShapeMismatch {
                param,
                weight,
                grad,
            } => write!(
                f,
                "{param}: gradient has shape {grad:?}, the weight {weight:?}"
            ),
            CandleError::AliasedGradient { param } => write!(
                f,
                "{param}: gradient shares storage with a weight or another gradient"
            ),
            CandleError::MissingGradient { param } => write!(
                f,
                "{param}: no gradient in the second backward pass, but one in the first"
            ),
            CandleError::Slots(e) => write!(f, "slot memory: {e}"),
            CandleError::Pass(e) => write!(f, "pass: {e}"),
            CandleError::Candle(e) => write!(f, "candle: {e}"),
        }
    }
}

impl std::error::Error for CandleError {}

impl From<candle_core::Error> for CandleError {
    fn from(e: candle_core::Error) -> Self {
        CandleError::Candle(e.to_string())
    }
}

impl From<NdError> for CandleError {
    fn from(e: NdError) -> Self {
        CandleError::Pass(e)
    }
}

impl From<SliceError> for CandleError {
    fn from(e: SliceError) -> Self {
        CandleError::Slots(e)
    }
}
