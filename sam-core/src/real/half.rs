//! `bf16` and `f16` storage (feature `half`): the [`Real`] impls and the one rounding from
//! `f64` they need.
//!
//! The `half` crate supplies the types (layout, bit patterns, `Debug`, serde). The conversions
//! are done here: `half`'s `from_f64` goes through `f32` where the CPU has F16C (two roundings
//! to nearest, so the result depends on the machine), and its software path drops the low 32
//! bits of the `f64` significand before rounding (a wrong result when they decide a tie). Here
//! the exact `f64` value is rounded once, to nearest, ties to even, as IEEE 754
//! `convertFormat` and CUDA's `__double2half_rn` / `__double2bfloat16` do.
//!
//! The fast path, [`narrow_bf16`]/[`narrow_f16`], rounds to `f32` *to odd* first (truncate,
//! then set the last bit if anything was lost) and then to the 16-bit format to nearest even:
//! with at least two more bits in the intermediate than in the target (24 against 8 or 11,
//! and the same or more in every subnormal range), rounding to odd first gives the single
//! rounding of the exact value (Boldo and Melquiond, *Emulation of FMA and correctly rounded
//! sums: proved algorithms using rounding to odd*, IEEE TC 2008). The tests check it against
//! [`round_to`], the direct integer definition (the one `sam-cuda`'s kernels transcribe), on
//! every 16-bit value, every midpoint between neighbours and the `f64` values beside them.

use half::{bf16, f16};

use super::Real;

/// A binary floating-point format of 16 bits: `1` sign bit, `EXP` exponent bits, `FRAC`
/// fraction bits, IEEE 754 conventions (bias `2^(EXP−1) − 1`, subnormals, ±∞, NaN).
#[cfg(test)]
struct Format {
    frac: u32,
    exp: u32,
}

#[cfg(test)]
const BINARY16: Format = Format { frac: 10, exp: 5 };
#[cfg(test)]
const BFLOAT16: Format = Format { frac: 7, exp: 8 };

/// `x` (not NaN) rounded to `f32` to odd: toward zero, with the last bit set when inexact.
/// Branch-free, so that the passes' loops stay vectorisable.
#[inline(always)]
fn to_f32_odd(x: f64) -> f32 {
    let r = x as f32; // to nearest
    let back = f64::from(r);
    // One step toward zero when rounding went away from zero (then r ≠ 0; ∞ steps to the
    // largest finite), and the last bit set when anything was lost.
    let away = u32::from(libm::fabs(back) > libm::fabs(x));
    let inexact = u32::from(back != x);
    f32::from_bits((r.to_bits() - away) | inexact)
}

/// The bits of `x` rounded once to bfloat16 (to nearest, ties to even).
#[inline(always)]
fn narrow_bf16(x: f64) -> u16 {
    let b = to_f32_odd(x).to_bits();
    // To nearest even at bit 16; a carry runs into the exponent (to ∞ past the largest).
    let rounded = ((b.wrapping_add(0x7fff + ((b >> 16) & 1))) >> 16) as u16;
    let nan = (((x.to_bits() >> 48) & 0x8000) as u16) | 0x7fc0;
    if x.is_nan() { nan } else { rounded }
}

/// The bits of `x` rounded once to IEEE binary16 (to nearest, ties to even).
#[inline(always)]
fn narrow_f16(x: f64) -> u16 {
    let f = to_f32_odd(x).to_bits();
    let sign = ((f >> 16) & 0x8000) as u16;
    let a = f & 0x7fff_ffff;
    // Below 2^-14, the binary16 subnormals: adding 2^-1 (in f32, to nearest even) leaves the
    // value rounded at 2^-24, the subnormal quantum, in the low bits.
    let magic = f32::from_bits(126 << 23);
    let subnormal = (f32::from_bits(a) + magic)
        .to_bits()
        .wrapping_sub(magic.to_bits());
    // Normal: rebias the exponent and round at bit 13 to nearest even; a carry runs into the
    // exponent (to ∞ from 65520 on).
    let normal = (a
        .wrapping_sub(112 << 23)
        .wrapping_add(0xfff + ((a >> 13) & 1)))
        >> 13;
    let magnitude = if a >= (127 + 16) << 23 {
        0x7c00 // |x| ≥ 2^16: ∞
    } else if a < 113 << 23 {
        subnormal
    } else {
        normal
    };
    let nan = sign | 0x7e00;
    if x.is_nan() {
        nan
    } else {
        sign | magnitude as u16
    }
}

/// bfloat16 to `f64`, exactly.
#[inline(always)]
fn widen_bf16(x: bf16) -> f64 {
    f64::from(f32::from_bits(u32::from(x.to_bits()) << 16))
}

/// binary16 to `f64`, exactly.
#[inline(always)]
fn widen_f16(x: f16) -> f64 {
    let h = u32::from(x.to_bits());
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    let f = if em >= 0x7c00 {
        f32::from_bits(0x7f80_0000 | (em & 0x3ff) << 13) // ±∞, NaN
    } else {
        // The exponent and fraction as an f32 with exponent bias 127 − 112, rebiased by the
        // exact product with 2^112 (subnormals included).
        f32::from_bits(em << 13) * f32::from_bits((127 + 112) << 23)
    };
    f64::from(f32::from_bits(f.to_bits() | sign))
}

/// The bits of `x` rounded to `format`, to nearest, ties to even; overflow gives ±∞, NaN a
/// quiet NaN of the same sign. The definition the fast path is tested against.
#[cfg(test)]
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
        widen_bf16(self)
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        bf16::from_bits(narrow_bf16(x))
    }
}

impl Real for f16 {
    const NAME: &'static str = "f16";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        widen_f16(self)
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        f16::from_bits(narrow_f16(x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks `round` against the definition, on every finite value of the format, the midpoints
    /// between neighbours and the `f64` values on either side of each midpoint.
    fn check_format(widen: impl Fn(u16) -> f64, round: impl Fn(f64) -> u16) {
        for b in 0..=u16::MAX {
            let x = widen(b);
            if x.is_nan() {
                assert!(widen(round(x)).is_nan());
            } else {
                assert_eq!(round(x), b, "{x} widens and rounds back");
            }
        }
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
        // The widening against half's, the definition, then the fast path.
        for b in 0..=u16::MAX {
            let (x, y) = (
                widen_f16(f16::from_bits(b)),
                f16::from_bits(b).to_f64_const(),
            );
            assert!(
                x.to_bits() == y.to_bits() || x.is_nan() && y.is_nan(),
                "{b:#x}"
            );
        }
        check_format(|b| widen_f16(f16::from_bits(b)), |x| round_to(x, &BINARY16));
        check_format(|b| widen_f16(f16::from_bits(b)), narrow_f16);
    }

    #[test]
    fn bf16_rounds_once_to_nearest_even() {
        for b in 0..=u16::MAX {
            let (x, y) = (
                widen_bf16(bf16::from_bits(b)),
                bf16::from_bits(b).to_f64_const(),
            );
            assert!(
                x.to_bits() == y.to_bits() || x.is_nan() && y.is_nan(),
                "{b:#x}"
            );
        }
        check_format(
            |b| widen_bf16(bf16::from_bits(b)),
            |x| round_to(x, &BFLOAT16),
        );
        check_format(|b| widen_bf16(bf16::from_bits(b)), narrow_bf16);
    }

    /// The fast path equals the definition on random `f64` values, with exponents concentrated
    /// around the 16-bit formats' ranges, and on random bit patterns of every exponent (the
    /// midpoints and their neighbours are checked exhaustively above).
    #[test]
    fn fast_path_equals_the_definition_on_random_f64() {
        let mut s = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..2_000_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // Exponents concentrated on the 16-bit formats' ranges and beyond.
            let e = 1023 - 160 + (s >> 52) % 300;
            let x = f64::from_bits((s & 0x800f_ffff_ffff_ffff) | e << 52);
            assert_eq!(narrow_bf16(x), round_to(x, &BFLOAT16), "{x:e}");
            assert_eq!(narrow_f16(x), round_to(x, &BINARY16), "{x:e}");
            let y = f64::from_bits(s);
            if !y.is_nan() {
                assert_eq!(narrow_bf16(y), round_to(y, &BFLOAT16), "{y:e}");
                assert_eq!(narrow_f16(y), round_to(y, &BINARY16), "{y:e}");
            }
        }
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
