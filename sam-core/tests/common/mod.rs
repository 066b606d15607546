//! Test harness: owned storage for groups of the reference backend, value strategies, and an
//! independent norm.
#![allow(dead_code)]

use proptest::prelude::*;
use sam_core::backend::{Real, Slot};
use sam_core::reference::SliceBuffer;
use sam_core::{Group, GroupOptions};

/// Caller-provided memory of one `SliceBuffer` group: these tests check the reference backend
/// itself, including its slot-memory checks, so they keep the slices (the owning `VecBuffer`
/// needs the `alloc` feature and runs the same passes).
#[derive(Debug, Clone, PartialEq)]
pub struct Store<T> {
    pub w: Vec<T>,
    pub g: Vec<T>,
    pub slots: Vec<T>,
}

impl<T: Real> Store<T> {
    pub fn new(w: Vec<T>, g: Vec<T>) -> Self {
        let n = w.len();
        // Enough for every slot the core may ask for.
        Store {
            w,
            g,
            slots: vec![T::default(); Slot::ALL.len() * n],
        }
    }
}

/// Reference-backend groups borrowing the stores.
pub fn groups<'a, T: Real>(
    stores: &'a mut [Store<T>],
    opts: &[GroupOptions],
) -> Vec<Group<SliceBuffer<'a, T>>> {
    stores
        .iter_mut()
        .zip(opts)
        .map(|(s, o)| {
            Group::with_options(
                SliceBuffer::new(&mut s.w, &mut s.g, &mut s.slots).unwrap(),
                *o,
            )
        })
        .collect()
}

/// Bit patterns, for exact comparisons that tell -0.0 from 0.0 and compare NaNs.
pub fn bits<T: Real>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

/// A test-side conversion trait.
pub trait TestReal: Real + proptest::arbitrary::Arbitrary {
    /// Smallest positive subnormal-ish magnitude we test with.
    const SUBNORMAL: f64;
    /// Unit in the last place of `x` (as f64).
    fn ulp(x: f64) -> f64;
}

impl TestReal for f32 {
    const SUBNORMAL: f64 = 1.0e-40;
    fn ulp(x: f64) -> f64 {
        let v = (x as f32).abs();
        if !v.is_finite() {
            return f64::INFINITY;
        }
        (f32::from_bits(v.to_bits() + 1) - v) as f64
    }
}

impl TestReal for f64 {
    const SUBNORMAL: f64 = 1.0e-310;
    fn ulp(x: f64) -> f64 {
        let v = x.abs();
        if !v.is_finite() {
            return f64::INFINITY;
        }
        f64::from_bits(v.to_bits() + 1) - v
    }
}

/// One value of a magnitude class: zero, subnormal, tiny (1e-30), moderate, huge (1e30).
pub fn value<T: TestReal>() -> impl Strategy<Value = T> {
    (0..5u8, -1.0f64..1.0, any::<bool>()).prop_map(|(class, m, neg)| {
        let mag = match class {
            0 => 0.0,
            1 => T::SUBNORMAL * (1.0 + m.abs()),
            2 => 1.0e-30 * (1.0 + m.abs()),
            3 => m,
            _ => 1.0e30 * (1.0 + m.abs()),
        };
        T::from_f64(if neg { -mag } else { mag })
    })
}

/// A gradient whose entries share one magnitude class per vector (so the norm is dominated by
/// that class), or mix classes.
pub fn grad_vec<T: TestReal>(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<T>> {
    prop_oneof![
        prop::collection::vec(value::<T>(), len.clone()),
        (
            prop::sample::select(vec![1.0e-30, 1.0e-3, 1.0, 1.0e30]),
            prop::collection::vec(-1.0f64..1.0, len)
        )
            .prop_map(|(scale, v)| v.into_iter().map(|x| T::from_f64(x * scale)).collect()),
    ]
}

/// Moderate weights (so `w + e` rounding stays small relative to `e`).
pub fn weights<T: TestReal>(len: usize) -> impl Strategy<Value = Vec<T>> {
    prop::collection::vec((-1.0f64..1.0).prop_map(T::from_f64), len)
}

/// An independent Euclidean norm (scaled by the maximum, so no overflow or underflow).
pub fn norm(v: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = v.clone().fold(0.0f64, |a, x| a.max(x.abs()));
    if m == 0.0 {
        return 0.0;
    }
    m * v.map(|x| (x / m) * (x / m)).sum::<f64>().sqrt()
}
