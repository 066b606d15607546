//! The one error type of the crate.

use core::convert::Infallible;
use core::fmt;

use crate::Phase;

/// Everything that can go wrong in `sam-core`, generic over the storage backend's own error `E`.
///
/// Construction functions (hyperparameter validation) return `Error<Infallible>`; the step
/// functions return `Error<B::Error>` for a backend `B`. Whenever a step function returns an
/// error, every buffer is as it was before the call (the weights are never left perturbed or
/// half-updated), except for [`Error::Backend`], where the backend itself failed mid-pass and the
/// core restored what it could (see the variant).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error<E = Infallible> {
    /// A hyperparameter is outside its domain (NaN included). Raised at construction.
    InvalidHyperparameter {
        /// The hyperparameter's name, as in the papers (`rho`, `lr`, `beta1`, …).
        name: &'static str,
        /// What its domain is.
        message: &'static str,
    },
    /// The call is not allowed in the optimizer's current phase (for example a first step while
    /// the weights are still perturbed by an earlier one whose guard was leaked with
    /// `mem::forget`; [`recover`](crate::Optimizer::recover) restores them).
    WrongPhase {
        /// The phase the call needs.
        expected: Phase,
        /// The phase the optimizer is in.
        found: Phase,
    },
    /// The clean gradient (or, for adaptive groups, a weight that scales it) contains NaN or ±∞.
    /// Detected before any write: nothing changed. Treat it as a skipped step (a loss scaler
    /// would lower its scale).
    NonFiniteGradient,
    /// The gradient norm is finite per element but its total overflows the scalar type (only
    /// possible for `f64` storage with norms beyond 1.8e308). Nothing changed.
    NormOverflow,
    /// The groups handed to this call do not match the optimizer's configuration or the groups of
    /// earlier steps (a different number of groups or of elements, or an option the variant does
    /// not support). Nothing changed.
    InvalidGroups {
        /// What is wrong.
        message: &'static str,
    },
    /// A checkpoint state that no run can produce (for example a fold pending before any
    /// step). Nothing changed.
    InvalidState {
        /// What is inconsistent.
        message: &'static str,
    },
    /// The storage backend reported an error. If it came from a pass that writes, the core has
    /// restored the weights of every group it could; backends document what a failed pass leaves.
    Backend(E),
}

impl<E> Error<E> {
    /// Turns a construction error (`Error<Infallible>`) into an error of any backend type.
    pub fn widen(err: Error<Infallible>) -> Self {
        match err {
            Error::InvalidHyperparameter { name, message } => {
                Error::InvalidHyperparameter { name, message }
            }
            Error::WrongPhase { expected, found } => Error::WrongPhase { expected, found },
            Error::NonFiniteGradient => Error::NonFiniteGradient,
            Error::NormOverflow => Error::NormOverflow,
            Error::InvalidGroups { message } => Error::InvalidGroups { message },
            Error::InvalidState { message } => Error::InvalidState { message },
            Error::Backend(never) => match never {},
        }
    }
}

impl<E: fmt::Display> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidHyperparameter { name, message } => {
                write!(f, "invalid hyperparameter `{name}`: {message}")
            }
            Error::WrongPhase { expected, found } => write!(
                f,
                "wrong phase: this call needs the optimizer {expected}, but it is {found}"
            ),
            Error::NonFiniteGradient => f.write_str(
                "the clean gradient contains NaN or infinity; nothing was changed (skip this step)",
            ),
            Error::NormOverflow => {
                f.write_str("the gradient norm overflows the scalar type; nothing was changed")
            }
            Error::InvalidGroups { message } => write!(f, "invalid parameter groups: {message}"),
            Error::InvalidState { message } => write!(f, "invalid optimizer state: {message}"),
            Error::Backend(e) => write!(f, "storage backend error: {e}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for Error<E> {}

/// Shorthand for a construction-time hyperparameter error.
pub(crate) const fn invalid(name: &'static str, message: &'static str) -> Error {
    Error::InvalidHyperparameter { name, message }
}

/// Checks `0 ≤ x < ∞` (NaN fails) for the hyperparameter `name`.
pub(crate) fn non_negative(name: &'static str, x: f64) -> Result<f64, Error> {
    if x >= 0.0 && x.is_finite() {
        Ok(x)
    } else {
        Err(Error::InvalidHyperparameter {
            name,
            message: "must be finite and >= 0",
        })
    }
}
