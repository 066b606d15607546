//! The instruction sets the finiteness check is compiled for, chosen at run time.
//!
//! The finiteness check of a second gradient (a reduce pass that computes no quantity) reads
//! the gradient in its storage type. Its loop is compiled three times on x86-64 (baseline, with
//! `avx2` enabled, and with `avx512f` + `avx512vl` enabled) and the best version the CPU
//! supports is used. The code is identical; only the instructions the compiler may pick differ,
//! and the result is a flag, so every version gives the same result (tested for every version
//! the machine supports, `tests/tests/isa.rs`).
//!
//! The reduce passes that accumulate norms run the baseline code: compiled with AVX2 or AVX-512
//! enabled, LLVM does not vectorise the canonical 8-lane accumulation across lanes, and those
//! versions measured no faster (`cargo bench -p sam-ndarray --bench sam_step` prints the
//! per-pass figures at every level).
//!
//! Other architectures use their baseline (NEON is part of aarch64's baseline).
//!
//! [`set_limit`] caps the level used, process-wide: for tests and benchmarks, or to avoid
//! AVX-512 on CPUs that lower their clock for it.
#![allow(unsafe_code)]

use core::sync::atomic::{AtomicU8, Ordering};

/// An instruction-set level the finiteness check can run with, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// The target's baseline (SSE2 on x86-64; NEON on aarch64).
    Baseline,
    /// x86-64 with AVX2.
    Avx2,
    /// x86-64 with AVX-512 F and VL.
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
                std::arch::is_x86_feature_detected!("avx512f")
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

/// The cap in force until [`set_limit`] is called: AVX2. The AVX-512 version of the check
/// measured slower than the AVX2 one on the development machine (AMD EPYC, 2026-12-07: 38 vs
/// 49 GB/s at 1e7 f32 elements; `cargo bench -p sam-ndarray --bench sam_step`).
pub const DEFAULT_LIMIT: Isa = Isa::Avx2;

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

/// Runs `f` compiled for level `I` (`f` and what it inlines), or for the baseline where the CPU
/// lacks it. `f` must be `#[inline(always)]` code all the way down for the level to apply.
#[inline(always)]
pub(crate) fn run<const I: u8, R, F: FnOnce() -> R>(f: F) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if I == AVX512 && Isa::Avx512.is_supported() {
            // SAFETY: the CPU supports the features `with_avx512` enables (checked just above).
            return unsafe { with_avx512(f) };
        }
        if I == AVX2 && Isa::Avx2.is_supported() {
            // SAFETY: the CPU supports the feature `with_avx2` enables (checked just above).
            return unsafe { with_avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn with_avx2<R, F: FnOnce() -> R>(f: F) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512f,avx512vl")]
#[inline]
fn with_avx512<R, F: FnOnce() -> R>(f: F) -> R {
    f()
}
