//! Element-wise comparison of a replayed trajectory against `expected` (SCHEMA §9).

use std::fmt;

use crate::case::Tolerance;

/// The first element (or length) where a replayed array disagrees with the expected one.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// Name of the compared array (`"loss"`, `"params"`, `"swa_params"`, `"lr"`, `"rho"`).
    pub array: String,
    /// Step of the compared row, for per-step arrays.
    pub step: Option<usize>,
    /// Index of the first failing element (the shorter length on a length mismatch).
    pub index: usize,
    /// Replayed value (NaN where it is missing on a length mismatch).
    pub got: f64,
    /// Expected value (NaN where it is missing on a length mismatch).
    pub expected: f64,
    /// `(got, expected)` lengths, set only when they differ.
    pub lengths: Option<(usize, usize)>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.array)?;
        if let Some(step) = self.step {
            write!(f, " step {step}")?;
        }
        match self.lengths {
            Some((got, expected)) => write!(f, ": got {got} values, expected {expected}"),
            None => write!(
                f,
                " index {}: got {:e}, expected {:e} (|diff| {:e})",
                self.index,
                self.got,
                self.expected,
                (self.got - self.expected).abs()
            ),
        }
    }
}

/// Whether `got` passes `|got − expected| ≤ atol + rtol·|expected|`; NaN never passes.
pub fn within(got: f64, expected: f64, tol: &Tolerance) -> bool {
    (got - expected).abs() <= tol.atol + tol.rtol * expected.abs()
}

/// The first element of `got` outside the tolerance of `expected`, or a length mismatch.
///
/// `array` and `step` only label the result.
pub fn first_mismatch(
    array: &str,
    step: Option<usize>,
    got: &[f64],
    expected: &[f64],
    tol: &Tolerance,
) -> Option<Mismatch> {
    let mismatch = |index: usize, g: f64, e: f64, lengths| Mismatch {
        array: array.to_owned(),
        step,
        index,
        got: g,
        expected: e,
        lengths,
    };
    if got.len() != expected.len() {
        let at = got.len().min(expected.len());
        let value = |s: &[f64]| s.get(at).copied().unwrap_or(f64::NAN);
        return Some(mismatch(
            at,
            value(got),
            value(expected),
            Some((got.len(), expected.len())),
        ));
    }
    got.iter()
        .zip(expected)
        .position(|(&g, &e)| !within(g, e, tol))
        .and_then(|i| Some(mismatch(i, *got.get(i)?, *expected.get(i)?, None)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: Tolerance = Tolerance {
        rtol: 1e-3,
        atol: 1e-6,
    };

    #[test]
    fn equal_and_within_tolerance_pass() {
        assert_eq!(first_mismatch("loss", None, &[], &[], &TOL), None);
        assert_eq!(
            first_mismatch(
                "loss",
                None,
                &[1.0, -2.0, 0.0],
                &[1.0009, -2.0019, 9e-7],
                &TOL
            ),
            None
        );
    }

    #[test]
    fn reports_first_failing_element() {
        let m = first_mismatch(
            "params",
            Some(3),
            &[1.0, 2.0, 3.0, 5.0],
            &[1.0, 2.0, 3.1, 6.0],
            &TOL,
        )
        .expect("mismatch");
        assert_eq!((m.index, m.got, m.expected, m.lengths), (2, 3.0, 3.1, None));
        assert_eq!(
            m.to_string(),
            "params step 3 index 2: got 3e0, expected 3.1e0 (|diff| 1.0000000000000009e-1)"
        );
    }

    #[test]
    fn nan_and_infinity_always_fail() {
        let m = first_mismatch("rho", None, &[0.5, f64::NAN], &[0.5, 0.5], &TOL).expect("mismatch");
        assert_eq!(
            m.to_string(),
            "rho index 1: got NaN, expected 5e-1 (|diff| NaN)"
        );
        let inf = Tolerance {
            rtol: f64::INFINITY,
            atol: f64::INFINITY,
        };
        assert!(first_mismatch("lr", None, &[f64::NAN], &[0.0], &inf).is_some());
        assert!(first_mismatch("lr", None, &[f64::INFINITY], &[1.0], &TOL).is_some());
    }

    #[test]
    fn length_difference_is_reported() {
        let m = first_mismatch("swa_params", None, &[1.0], &[1.0, 2.0], &TOL).expect("mismatch");
        assert_eq!((m.index, m.lengths), (1, Some((1, 2))));
        assert_eq!(m.to_string(), "swa_params: got 1 values, expected 2");
    }
}
