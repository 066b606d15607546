//! The climb every variant shares: its hyperparameters ([`Perturbation`]) and the perturb pass's
//! coefficient for a computed norm.

use crate::backend::{PerturbSpec, Weighting, kernel};
use crate::engine::Norms;
use crate::error::{Error, non_negative};
use crate::group::GroupOptions;

/// The ascent step `e = ρ·T²⊙g/(‖T⊙g‖ + ε)` shared by every variant, with `T = 1` (SAM) or
/// `T = |w| + η` (ASAM).
///
/// ```
/// use sam_core::Perturbation;
/// let asam = Perturbation::asam(0.5, 0.01);
/// assert!(asam.adaptive && asam.rho == 0.5 && asam.eps == 1e-12);
/// assert!(Perturbation { rho: f64::NAN, ..Perturbation::default() }.validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Perturbation {
    /// Neighbourhood radius ρ ≥ 0 (finite); groups may override it (not GSAM). Default `0.05`.
    ///
    /// Any finite ρ ≥ 0 is applied as promised, `‖e‖ = ρ` up to rounding, including radii so
    /// small next to the gradient norm that `ρ/‖T⊙g‖` is below the smallest `f64` (the
    /// coefficient is then formed at a power-of-two scale of the norm). What storage cannot
    /// hold stays: an `e` below half an ulp of `w` rounds to nothing when added to `w`.
    pub rho: f64,
    /// ASAM: scale the climb per element by `T = |w| + η`; groups may override it (not GSAM).
    /// Default `false`.
    pub adaptive: bool,
    /// ASAM offset η ≥ 0 (finite) in `T = |w| + η`. Default `0` (davda54's form; the ASAM
    /// paper's official code uses `0.01`).
    pub eta: f64,
    /// ε ≥ 0 (finite) in `ρ/(‖T⊙g‖ + ε)`. Default `1e-12` (every upstream).
    pub eps: f64,
}

impl Default for Perturbation {
    fn default() -> Self {
        Perturbation {
            rho: 0.05,
            adaptive: false,
            eta: 0.0,
            eps: 1e-12,
        }
    }
}

impl Perturbation {
    /// SAM's climb with radius `rho` (other fields at their defaults).
    pub fn sam(rho: f64) -> Self {
        Perturbation {
            rho,
            ..Self::default()
        }
    }

    /// ASAM's climb with radius `rho` and offset `eta`.
    pub fn asam(rho: f64, eta: f64) -> Self {
        Perturbation {
            rho,
            adaptive: true,
            eta,
            ..Self::default()
        }
    }

    /// Checks every field's domain (NaN included).
    pub fn validate(&self) -> Result<(), Error> {
        non_negative("rho", self.rho)?;
        non_negative("eta", self.eta)?;
        non_negative("eps", self.eps)?;
        Ok(())
    }

    /// The weighting of a group (its override, else this flag).
    pub(crate) fn weighting(&self, o: &GroupOptions) -> Weighting {
        if o.adaptive().unwrap_or(self.adaptive) {
            Weighting::Adaptive { eta: self.eta }
        } else {
            Weighting::Plain
        }
    }

    /// The radius of a group (its override, else this one).
    pub(crate) fn rho(&self, o: &GroupOptions) -> f64 {
        o.rho().unwrap_or(self.rho)
    }
}

/// The perturb spec for radius `rho` and the global norm in `norms`.
///
/// `c = ρ/(n_s + ε·s)` at the norm's scale `s` (`0` for a zero gradient); the kernel forms
/// `((T·g)·scale)·coeff`.
///
/// - When `k = s·c` is a normal number (the ordinary case), the spec is `scale = 1`,
///   `coeff = k`: `s·c` is exact (a power of two times a normal number), so for every `T·g`
///   whose product with `s` is normal this is bit for bit `((T·g)·s)·c`, and for a `T·g` whose
///   product with `s` would be subnormal (a gradient element tiny next to the global norm)
///   it avoids rounding that product to a few bits before multiplying by a large `c`.
/// - When `c` itself would leave the normal range (a radius tiny next to the norm, such as
///   ρ = 1e-300 with ‖g‖ = 8e38), the norm is rescaled by a further power of two `s'` (exact)
///   so that `c' = ρ/(n_s·s' + ε·s·s')` is normal and the kernel forms `((T·g)·(s·s'))·c'`:
///   the same value, without flushing to zero on the way.
pub(crate) fn perturb_spec(
    weighting: Weighting,
    rho: f64,
    eps: f64,
    norms: &Norms,
    stash: bool,
) -> PerturbSpec {
    let (scale, coeff) = coefficient(rho, eps, norms.perturb_scale, norms.perturb_scaled);
    let (scale, coeff) = fold_scale(scale, coeff);
    PerturbSpec {
        stash,
        weighting,
        scale,
        coeff,
        unscale: norms.unscale,
    }
}

/// `(1, s·c)` when `s·c` is normal (then exact), else `(s, c)` unchanged.
fn fold_scale(s: f64, c: f64) -> (f64, f64) {
    let k = s * c;
    if k.is_normal() { (1.0, k) } else { (s, c) }
}

/// 2^-120, exactly (`2f64.powi` needs `std`).
const TWO_POW_MINUS_120: f64 = 7.52316384526264e-37;

/// `(s, c)` with `c = ρ/(n + ε·s)` for the norm `n` at scale `s`, rescaled as described in
/// [`perturb_spec`] when `c` would not be normal.
fn coefficient(rho: f64, eps: f64, s: f64, n: f64) -> (f64, f64) {
    if n.is_nan() || n <= 0.0 {
        return (s, 0.0);
    }
    let c = at_scale(rho, eps, s, n);
    if rho == 0.0 || c >= f64::MIN_POSITIVE || !c.is_finite() {
        return (s, c);
    }
    // Bring the norm into [½, 1): then c' ≈ ρ/(1 + ε·s·s'), normal for every normal ρ. For a
    // subnormal ρ aim lower (n' ≈ 2^-120, c' ≈ ρ·2^120). Both scales are powers of two.
    let mut s2 = kernel::scale_for(n);
    if rho < f64::MIN_POSITIVE {
        s2 *= TWO_POW_MINUS_120;
    }
    let s_new = s * s2;
    if !(s_new > 0.0 && s_new.is_finite()) {
        return (s, c);
    }
    (s_new, at_scale(rho, eps, s_new, n * s2))
}

/// `ρ/(n + ε·s)`, dividing through by `s` when `ε·s` overflows (huge ε, tiny `f64` gradient).
fn at_scale(rho: f64, eps: f64, s: f64, n: f64) -> f64 {
    let eps_s = eps * s;
    if eps_s.is_finite() {
        rho / (n + eps_s)
    } else {
        (rho / s) / (n / s + eps)
    }
}

#[cfg(test)]
mod tests {
    use super::coefficient;

    #[test]
    fn the_subnormal_radius_scale_is_an_exact_power_of_two() {
        assert_eq!(
            super::TWO_POW_MINUS_120.to_bits(),
            ((1023 - 120) as u64) << 52
        );
    }

    #[test]
    fn folding_the_scale_keeps_ordinary_products_and_rescues_subnormal_ones() {
        use super::fold_scale;
        // An ordinary element: the same bits either way.
        let (s, c) = (2f64.powi(-40), 7.5e9);
        let (s1, k) = fold_scale(s, c);
        assert_eq!(s1, 1.0);
        for g in [1.0, 0.3, -2.5e-7, 123.456] {
            assert_eq!(((g * s) * c).to_bits(), ((g * s1) * k).to_bits());
        }
        // A gradient element 1e-310 next to a norm of 1e12: g·s = 9e-323 keeps 5 bits, and the
        // product with c is off by several percent; g·k is correctly rounded.
        let g = 1e-310;
        let exact = g * (s * c);
        assert!((((g * s) * c) / exact - 1.0).abs() > 1e-3);
        assert_eq!((g * s1) * k, exact);
        // Not normal: unchanged.
        assert_eq!(fold_scale(1.0, 0.0), (1.0, 0.0));
        assert_eq!(
            fold_scale(2f64.powi(-1000), 1e-300),
            (2f64.powi(-1000), 1e-300)
        );
    }

    #[test]
    fn ordinary_coefficients_are_unchanged() {
        assert_eq!(
            coefficient(0.05, 1e-12, 1.0, 2.0),
            (1.0, 0.05 / (2.0 + 1e-12))
        );
        assert_eq!(coefficient(0.05, 1e-12, 1.0, 0.0), (1.0, 0.0));
        assert_eq!(coefficient(0.0, 1e-12, 1.0, 8e38), (1.0, 0.0));
    }

    #[test]
    fn a_tiny_radius_next_to_a_huge_norm_keeps_its_coefficient() {
        // ρ/n = 1.25e-339 is below the smallest f64: the coefficient moves to a scaled norm.
        let (s, c) = coefficient(1e-300, 1e-12, 1.0, 8e38);
        assert!(c >= f64::MIN_POSITIVE, "{c:e}");
        // s·c·n = ρ·n/(n + ε) ≈ ρ.
        let e = (8e38 * s) * c;
        assert!((e / 1e-300 - 1.0).abs() < 1e-15, "{e:e}");
        // A subnormal radius too.
        let (s, c) = coefficient(1e-315, 0.0, 1.0, 3.0);
        assert!(c >= f64::MIN_POSITIVE, "{c:e}");
        assert!(((3.0 * s) * c / 1e-315 - 1.0).abs() < 1e-6);
    }
}
