//! `bf16` and `f16` storage (feature `half`): the [`Real`] impls and the one rounding from
//! `f64` they need.
//!
//! The `half` crate supplies the types (layout, bit patterns, `Debug`, serde) and the exact
//! widening to `f64`. Narrowing is done here: `half`'s `from_f64` goes through `f32` where the
//! CPU has F16C (two roundings, so the result depends on the machine), and its software path
//! drops the low 32 bits of the `f64` significand before rounding (a wrong result when they
//! decide a tie). [`round_to`] rounds the exact `f64` value once, to nearest, ties to even, as
//! IEEE 754 `convertFormat` and CUDA's `__double2half_rn` / `__double2bfloat16` do.

use half::{bf16, f16};

use super::Real;

/// A binary floating-point format of 16 bits: `1` sign bit, `EXP` exponent bits, `FRAC`
/// fraction bits, IEEE 754 conventions (bias `2^(EXP−1) − 1`, subnormals, ±∞, NaN).
struct Format {
    frac: u32,
    exp: u32,
}

const BINARY16: Format = Format { frac: 10, exp: 5 };
const BFLOAT16: Format = Format { frac: 7, exp: 8 };

/// The bits of `x` rounded to `format`, to nearest, ties to even; overflow gives ±∞, NaN a
/// quiet NaN of the same sign.
fn round_to(x: f64, format: &Format) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 48) & 0x8000) as u16;
    let exp_all = (1u16 << format.exp) - 1;
    let inf = exp_all << format.frac;
    if x.is_nan() {
        return sign | inf | (1 << (format.frac - 1));
    }
    let biased = ((bits >> 52) & 0x7ff) as i32;
    if biased == 0 {
        // Zero or an f64 subnormal: far below every 16-bit format's smallest subnormal.
        return sign;
    }
    if biased == 0x7ff {
        return sign | inf;
    }
    let e = biased - 1023; // |x| = m·2^(e−52), 2^52 ≤ m < 2^53
    let m = (bits & ((1u64 << 52) - 1)) | (1u64 << 52);
    let bias = (1i32 << (format.exp - 1)) - 1;
    let e_min = 1 - bias;
    // Bits of m below the format's quantum at this exponent (more for subnormal results).
    let shift = (52 - format.frac as i32) + (e_min - e).max(0);
    if shift > 53 {
        // |x| < half the smallest subnormal: rounds to zero.
        return sign;
    }
    let shift = shift as u32;
    let mut q = m >> shift;
    let rem = m & ((1u64 << shift) - 1);
    let half = 1u64 << (shift - 1);
    if rem > half || (rem == half && q & 1 == 1) {
        q += 1;
    }
    // q holds the significand with its leading bit at position `frac` for normal results (a
    // carry into the next binade or to ∞ propagates into the exponent field), below it for
    // subnormal ones (whose exponent field is 0).
    let field = if e >= e_min {
        ((e - e_min) as u64) << format.frac
    } else {
        0
    };
    let magnitude = field + q;
    if magnitude >= u64::from(inf) {
        return sign | inf;
    }
    sign | magnitude as u16
}

impl Real for bf16 {
    const NAME: &'static str = "bf16";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self.to_f64_const()
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        bf16::from_bits(round_to(x, &BFLOAT16))
    }
}

impl Real for f16 {
    const NAME: &'static str = "f16";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self.to_f64_const()
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        f16::from_bits(round_to(x, &BINARY16))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks `round` against the definition, on every finite value of the format, the midpoints
    /// between neighbours and the `f64` values on either side of each midpoint.
    fn check_format(widen: impl Fn(u16) -> f64, round: impl Fn(f64) -> u16) {
        let mut values = alloc_free::Sorted::new();
        for x in (0..=u16::MAX).map(&widen).filter(|x| x.is_finite()) {
            values.push(x);
        }
        let vals = values.sorted();
        for pair in vals.windows(2) {
            let (lo, hi) = (pair[0], pair[1]);
            if lo == hi {
                continue; // ±0
            }
            assert_eq!(widen(round(lo)), lo, "{lo} is representable");
            let mid = lo + (hi - lo) / 2.0; // exact: neighbours differ by one quantum
            let even = if round(lo) & 1 == 0 { lo } else { hi };
            assert_eq!(widen(round(mid)), even, "tie {mid} between {lo} and {hi}");
            let above = f64::from_bits(mid.to_bits() + 1);
            let below = f64::from_bits(mid.to_bits() - 1);
            let (toward_hi, toward_lo) = if mid > 0.0 {
                (above, below)
            } else {
                (below, above)
            };
            assert_eq!(widen(round(toward_hi)), hi, "{toward_hi} just past the tie");
            assert_eq!(
                widen(round(toward_lo)),
                lo,
                "{toward_lo} just short of the tie"
            );
        }
    }

    /// A fixed-capacity sorted list (the crate is `no_std` without `alloc` in tests too).
    mod alloc_free {
        pub struct Sorted {
            v: [f64; 65536],
            n: usize,
        }
        impl Sorted {
            pub fn new() -> Self {
                Sorted {
                    v: [0.0; 65536],
                    n: 0,
                }
            }
            pub fn push(&mut self, x: f64) {
                self.v[self.n] = x;
                self.n += 1;
            }
            pub fn sorted(&mut self) -> &[f64] {
                let s = &mut self.v[..self.n];
                s.sort_unstable_by(|a, b| a.partial_cmp(b).unwrap());
                s
            }
        }
    }

    #[test]
    fn f16_rounds_once_to_nearest_even() {
        check_format(|b| f16::from_bits(b).to_f64(), |x| round_to(x, &BINARY16));
    }

    #[test]
    fn bf16_rounds_once_to_nearest_even() {
        check_format(|b| bf16::from_bits(b).to_f64(), |x| round_to(x, &BFLOAT16));
    }

    #[test]
    fn overflow_underflow_and_nan() {
        // The trait's conversions (the inherent `from_f64` of the `half` types is theirs).
        let h = <f16 as Real>::from_f64;
        let b = <bf16 as Real>::from_f64;
        // f16: max 65504, the tie with the next (virtual) value 65536 is 65520 → ∞ (odd max).
        assert_eq!(h(65519.99), f16::from_bits(0x7bff));
        assert_eq!(h(65520.0), f16::INFINITY);
        assert_eq!(h(-1e300), f16::NEG_INFINITY);
        // Smallest subnormal 2^-24: exactly half of it ties to 0, a hair above rounds up.
        assert_eq!(h(2f64.powi(-25)).to_bits(), 0);
        assert_eq!(h(2f64.powi(-25) * (1.0 + 1e-15)).to_bits(), 1);
        assert_eq!(h(-1e-300).to_bits(), 0x8000);
        assert_eq!(b(f64::from(f32::MAX)), bf16::INFINITY);
        assert_eq!(b(1e-300).to_bits(), 0);
        assert!(h(f64::NAN).is_nan() && b(-f64::NAN).is_nan());
        assert_eq!(h(f64::INFINITY), f16::INFINITY);
        // A tie in the top bits decided by the low 32 bits of the f64 significand.
        let x = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        assert_eq!(h(x).to_f64(), 1.0 + 2f64.powi(-10));
        let y = 1.0 + 2f64.powi(-8) + 2f64.powi(-45);
        assert_eq!(b(y).to_f64(), 1.0 + 2f64.powi(-7));
    }
}
