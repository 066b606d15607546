//! The instruction sets the reduce passes are compiled for, chosen at run time.
//!
//! The reduce passes are compiled three times on x86-64 (baseline, with `avx2` enabled, and
//! with `avx512f` + `avx512vl` enabled) and the best version the CPU supports is used.
//!
//! - **Norm reductions** keep a block's 8 accumulator lanes in the level's SIMD registers
//!   (four SSE2, two AVX or one AVX-512 register; `simd`) through the core's lane math
//!   (`sam_core::backend::kernel::Accumulators`). Each lane operation is one IEEE instruction,
//!   so every level gives the bits of the portable lanes.
//! - **The finiteness check** of a second gradient (a reduce pass that computes no quantity)
//!   is a plain loop the compiler vectorises for the level; the result is a flag. The AVX-512
//!   level runs the AVX2 version of it, which measured faster on the development machine (AMD
//!   EPYC, 2026-12-07: 49.7 vs 47.8 GB/s at 1e7 `f32` elements).
//!
//! Every level the machine supports is tested against the reference backend
//! (`tests/tests/isa.rs`); `cargo bench -p sam-ndarray --bench sam_step` prints the per-pass
//! figures at every level.
//!
//! Other architectures use portable code (`[f64; 8]` lanes, which the compiler may vectorise).
//!
//! [`set_limit`] caps the level used, process-wide: for tests and benchmarks, or to avoid
//! AVX-512 on CPUs that lower their clock for it.
#![allow(unsafe_code)]

use core::sync::atomic::{AtomicU8, Ordering};

use sam_core::backend::kernel::Lanes;

#[cfg(target_arch = "x86_64")]
mod simd;

/// An instruction-set level the reduce passes can run with, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// The target's baseline (SSE2 on x86-64; NEON on aarch64).
    Baseline,
    /// x86-64 with AVX2.
    Avx2,
    /// x86-64 with AVX-512 F and VL (and AVX2).
    Avx512,
}

impl Isa {
    /// Every level, lowest first.
    pub const ALL: [Isa; 3] = [Isa::Baseline, Isa::Avx2, Isa::Avx512];

    /// Whether this CPU can run this level.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Baseline => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The level's name, for reports.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Baseline => "baseline",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    const fn code(self) -> u8 {
        self as u8
    }
}

/// The cap in force until [`set_limit`] is called: none (the highest level the CPU supports).
pub const DEFAULT_LIMIT: Isa = Isa::Avx512;

/// The process-wide cap (an [`Isa`] code; `u8::MAX` for none).
static LIMIT: AtomicU8 = AtomicU8::new(DEFAULT_LIMIT.code());

/// Caps the level used from now on, in every thread (`None` removes the cap, so AVX-512 is used
/// where present; the cap at start is [`DEFAULT_LIMIT`]). Results do not depend on the level;
/// only speed does.
pub fn set_limit(limit: Option<Isa>) {
    LIMIT.store(limit.map_or(u8::MAX, Isa::code), Ordering::Relaxed);
}

/// The level used now: the highest one the CPU supports, within the cap of [`set_limit`].
pub fn active() -> Isa {
    let limit = LIMIT.load(Ordering::Relaxed);
    Isa::ALL
        .into_iter()
        .rev()
        .find(|i| i.code() <= limit && i.is_supported())
        .unwrap_or(Isa::Baseline)
}

/// Code of [`Isa::Baseline`] for const generics.
pub(crate) const BASELINE: u8 = Isa::Baseline.code();
/// Code of [`Isa::Avx2`] for const generics.
pub(crate) const AVX2: u8 = Isa::Avx2.code();
/// Code of [`Isa::Avx512`] for const generics.
pub(crate) const AVX512: u8 = Isa::Avx512.code();

/// A computation generic over the reduction lanes, run by [`dispatch`] with the lane type of
/// the level it runs at. Its output cannot name the lane type, so lane values stay inside.
pub(crate) trait WithLanes {
    /// The result.
    type Output;
    /// Runs with lanes `V`.
    fn with<V: Lanes>(self) -> Self::Output;
}

/// The portable lanes, for targets without a SIMD lane type.
#[cfg(not(target_arch = "x86_64"))]
type BaselineLanes = [f64; sam_core::backend::kernel::LANES];
/// SSE2, part of x86-64's baseline.
#[cfg(target_arch = "x86_64")]
type BaselineLanes = simd::Sse2;

/// Runs `w` compiled for level `I` (`w` and what it inlines) with that level's lanes, or for
/// the baseline where the CPU lacks it. `w` must be `#[inline(always)]` code all the way down
/// for the level to apply. The only place that runs code for a level above the baseline.
#[inline(always)]
pub(crate) fn dispatch<const I: u8, W: WithLanes>(w: W) -> W::Output {
    #[cfg(target_arch = "x86_64")]
    {
        if I == AVX512 && Isa::Avx512.is_supported() {
            // SAFETY: the CPU supports the features `with_avx512` enables (checked just above).
            return unsafe { with_avx512(w) };
        }
        if I == AVX2 && Isa::Avx2.is_supported() {
            // SAFETY: the CPU supports the feature `with_avx2` enables (checked just above).
            return unsafe { with_avx2(w) };
        }
    }
    w.with::<BaselineLanes>()
}

/// Runs `f` compiled for level `I`, as [`dispatch`] (for code that needs no lanes).
#[inline(always)]
pub(crate) fn run<const I: u8, R, F: FnOnce() -> R>(f: F) -> R {
    struct Plain<F>(F);
    impl<R, F: FnOnce() -> R> WithLanes for Plain<F> {
        type Output = R;
        #[inline(always)]
        fn with<V: Lanes>(self) -> R {
            (self.0)()
        }
    }
    dispatch::<I, _>(Plain(f))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn with_avx2<W: WithLanes>(w: W) -> W::Output {
    w.with::<simd::Avx2>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512f,avx512vl")]
#[inline]
fn with_avx512<W: WithLanes>(w: W) -> W::Output {
    w.with::<simd::Avx512>()
}
