//! The reduction lanes in x86-64 SIMD registers: [`Sse2`] (four `__m128d`, the baseline),
//! [`Avx2`] (two `__m256d`) and [`Avx512`] (one `__m512d`).
//!
//! Each method is the one IEEE instruction the core's lane operation names (`addpd`, `mulpd`,
//! `andnpd` with the sign bit, `maxpd(x, acc)`), so results equal the portable lanes bit for
//! bit (tested at every level, `tests/tests/isa.rs`).
//!
//! # Safety
//! The AVX2 and AVX-512 types run instructions the CPU may lack. Their values are created only
//! by code that [`dispatch`](super::dispatch) runs after detecting the features: the types are
//! private to [`isa`](super), and only `dispatch` names them, as the type argument of a
//! [`WithLanes`](super::WithLanes) callback whose output cannot hold them.

use core::arch::x86_64::*;

use sam_core::backend::kernel::{LANES, LaneMath, Lanes};

// Four `__m128d`, two `__m256d` or one `__m512d` hold the 8 lanes.
const _: () = assert!(LANES == 8);

/// The lanes in four SSE2 registers (lanes `2k, 2k+1` in register `k`).
#[derive(Clone, Copy)]
pub(super) struct Sse2([__m128d; 4]);

/// The lanes in two AVX registers (lanes `4k..4k+4` in register `k`).
#[derive(Clone, Copy)]
pub(super) struct Avx2([__m256d; 2]);

/// The lanes in one AVX-512 register.
#[derive(Clone, Copy)]
pub(super) struct Avx512(__m512d);

// SAFETY (every `unsafe` block below): SSE2 is part of the x86-64 baseline.
impl LaneMath for Sse2 {
    #[inline(always)]
    fn splat(x: f64) -> Self {
        Sse2([unsafe { _mm_set1_pd(x) }; 4])
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Sse2(core::array::from_fn(|k| unsafe {
            _mm_add_pd(self.0[k], o.0[k])
        }))
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Sse2(core::array::from_fn(|k| unsafe {
            _mm_mul_pd(self.0[k], o.0[k])
        }))
    }
    #[inline(always)]
    fn abs(self) -> Self {
        let sign = unsafe { _mm_set1_pd(-0.0) };
        Sse2(self.0.map(|v| unsafe { _mm_andnot_pd(sign, v) }))
    }
    #[inline(always)]
    fn max_with(self, x: Self) -> Self {
        Sse2(core::array::from_fn(|k| unsafe {
            _mm_max_pd(x.0[k], self.0[k])
        }))
    }
}

impl Lanes for Sse2 {
    #[inline(always)]
    fn from_array(x: [f64; LANES]) -> Self {
        // SAFETY: SSE2 is baseline; each unaligned load reads 2 of `x`'s 8 values.
        Sse2(core::array::from_fn(|k| unsafe {
            _mm_loadu_pd(x.as_ptr().add(2 * k))
        }))
    }
    #[inline(always)]
    fn to_array(self) -> [f64; LANES] {
        let mut out = [0.0; LANES];
        for (k, v) in self.0.iter().enumerate() {
            // SAFETY: SSE2 is baseline; each unaligned store writes 2 of `out`'s 8 values.
            unsafe { _mm_storeu_pd(out.as_mut_ptr().add(2 * k), *v) }
        }
        out
    }
}

// SAFETY (every `unsafe` block below): values of `Avx2` exist only inside code that
// `dispatch` runs with AVX2 detected (module doc), so the instructions are available.
impl LaneMath for Avx2 {
    #[inline(always)]
    fn splat(x: f64) -> Self {
        Avx2([unsafe { _mm256_set1_pd(x) }; 2])
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Avx2(core::array::from_fn(|k| unsafe {
            _mm256_add_pd(self.0[k], o.0[k])
        }))
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Avx2(core::array::from_fn(|k| unsafe {
            _mm256_mul_pd(self.0[k], o.0[k])
        }))
    }
    #[inline(always)]
    fn abs(self) -> Self {
        let sign = unsafe { _mm256_set1_pd(-0.0) };
        Avx2(self.0.map(|v| unsafe { _mm256_andnot_pd(sign, v) }))
    }
    #[inline(always)]
    fn max_with(self, x: Self) -> Self {
        Avx2(core::array::from_fn(|k| unsafe {
            _mm256_max_pd(x.0[k], self.0[k])
        }))
    }
}

impl Lanes for Avx2 {
    #[inline(always)]
    fn from_array(x: [f64; LANES]) -> Self {
        // SAFETY: AVX2 is available (above); each unaligned load reads 4 of `x`'s 8 values.
        Avx2(core::array::from_fn(|k| unsafe {
            _mm256_loadu_pd(x.as_ptr().add(4 * k))
        }))
    }
    #[inline(always)]
    fn to_array(self) -> [f64; LANES] {
        let mut out = [0.0; LANES];
        for (k, v) in self.0.iter().enumerate() {
            // SAFETY: AVX2 is available (above); each store writes 4 of `out`'s 8 values.
            unsafe { _mm256_storeu_pd(out.as_mut_ptr().add(4 * k), *v) }
        }
        out
    }
}

// SAFETY (every `unsafe` block below): values of `Avx512` exist only inside code that
// `dispatch` runs with AVX-512 F detected (module doc), so the instructions are available.
impl LaneMath for Avx512 {
    #[inline(always)]
    fn splat(x: f64) -> Self {
        Avx512(unsafe { _mm512_set1_pd(x) })
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Avx512(unsafe { _mm512_add_pd(self.0, o.0) })
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Avx512(unsafe { _mm512_mul_pd(self.0, o.0) })
    }
    #[inline(always)]
    fn abs(self) -> Self {
        Avx512(unsafe { _mm512_abs_pd(self.0) })
    }
    #[inline(always)]
    fn max_with(self, x: Self) -> Self {
        Avx512(unsafe { _mm512_max_pd(x.0, self.0) })
    }
}

impl Lanes for Avx512 {
    #[inline(always)]
    fn from_array(x: [f64; LANES]) -> Self {
        // SAFETY: AVX-512 F is available (above); the unaligned load reads `x`'s 8 values.
        Avx512(unsafe { _mm512_loadu_pd(x.as_ptr()) })
    }
    #[inline(always)]
    fn to_array(self) -> [f64; LANES] {
        let mut out = [0.0; LANES];
        // SAFETY: AVX-512 F is available (above); the unaligned store writes `out`'s 8 values.
        unsafe { _mm512_storeu_pd(out.as_mut_ptr(), self.0) }
        out
    }
}
