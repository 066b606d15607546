//! Value palettes: the element values and hyperparameter values the generators draw from.

use crate::src::Src;

/// Special element values: non-finite, signed zeros, subnormals of both types, the edges of
/// `f32`, `f64` extremes.
pub const SPECIAL: &[f64] = &[
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    0.0,
    -0.0,
    5e-324,
    -5e-324,
    1.0e-310,
    -2.2250738585072014e-308,
    1.401298464324817e-45,
    -1.401298464324817e-45,
    1.1754943508222875e-38,
    1.0e-38,
    -1.0e-38,
    1.0e38,
    -1.0e38,
    3.4028234663852886e38,
    -3.4028234663852886e38,
    3.5e38,
    1.0e-30,
    1.0e30,
    -1.0e30,
    1.0e10,
    -1.0e10,
    1.0e160,
    -1.0e160,
    1.0e200,
    1.0e300,
    -1.0e300,
    1.0e-160,
    1.0e-200,
    f64::MAX,
    -f64::MAX,
    f64::MIN_POSITIVE,
    1.0,
    -1.0,
];

/// One element value: mostly ordinary (small integers and fractions, moderate magnitudes), often
/// special, sometimes any bit pattern.
pub fn element(s: &mut Src<'_>) -> f64 {
    match s.int(0, 15) {
        0..=3 => s.pick(SPECIAL),
        4 => s.raw_f64(),
        5 => (s.int(0, 2000) as f64 - 1000.0) / 8.0,
        6 => s.uniform(-1.0e10, 1.0e10),
        7 => s.uniform(-1.0e-30, 1.0e-30),
        _ => s.uniform(-4.0, 4.0),
    }
}

/// A finite element value within the finiteness class (`|x| ≤ 1e10`, subnormals included).
pub fn tame(s: &mut Src<'_>) -> f64 {
    match s.int(0, 7) {
        0 => s.pick(&[
            0.0,
            -0.0,
            5e-324,
            -1.401298464324817e-45,
            1.0e-38,
            1.0e10,
            -1.0e10,
            1.0e-300,
        ]),
        1 => s.uniform(-1.0e10, 1.0e10),
        2 => s.uniform(-1.0e-20, 1.0e-20),
        _ => s.uniform(-4.0, 4.0),
    }
}

/// Special hyperparameter values: NaN, infinities, negatives, zero, subnormal, huge, and the
/// edges of the usual domains.
pub const HYPER_SPECIAL: &[f64] = &[
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    -1.0,
    -1.0e-300,
    -0.0,
    0.0,
    5e-324,
    1.0e-300,
    1.0e-12,
    0.5,
    0.999_999_999_999_999_9,
    1.0,
    1.000_000_000_000_000_2,
    2.0,
    1.0e10,
    1.0e300,
    f64::MAX,
];

/// A hyperparameter: usually uniform in `[lo, hi]` (the normal range the caller gives),
/// sometimes special, rarely any bit pattern.
pub fn hyper(s: &mut Src<'_>, lo: f64, hi: f64) -> f64 {
    match s.int(0, 15) {
        0..=1 => s.pick(HYPER_SPECIAL),
        2 => s.raw_f64(),
        3 => s.pick(&[lo, hi]),
        _ => s.uniform(lo, hi),
    }
}

/// A step count: small, near the edges of `u64`, or anything.
pub fn count(s: &mut Src<'_>) -> u64 {
    match s.int(0, 7) {
        0 => s.u64(),
        1 => u64::MAX - s.int(0, 3),
        2 => (1u64 << 53) + s.int(0, 3),
        _ => s.int(0, 40),
    }
}
