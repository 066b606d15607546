//! The element types the optimizers work on.

/// A storage element type: `f32` or `f64`, and with the feature `half` also `half::bf16` and
/// `half::f16`.
///
/// All per-element arithmetic of the core is carried out in `f64` and rounded once to the
/// storage type when it is written back, so a buffer gets the accuracy of a single rounding per
/// stored value and the reductions of `f32` and 16-bit storage can neither overflow nor
/// underflow (every finite `f32` squared is a normal `f64`). The trait is sealed: the core's
/// numerics policy is written for exactly these types.
pub trait Real:
    Copy + Default + PartialOrd + core::fmt::Debug + Send + Sync + 'static + sealed::Sealed
{
    /// The type's name, for messages and checkpoints (`"f32"`, `"f64"`, `"bf16"`, `"f16"`).
    const NAME: &'static str;
    /// Widens to `f64` (exact).
    fn to_f64(self) -> f64;
    /// Rounds an `f64` to this type, once (round to nearest, ties to even; overflow gives ±∞;
    /// exact for `f64`).
    fn from_f64(x: f64) -> Self;
}

impl Real for f32 {
    const NAME: &'static str = "f32";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Real for f64 {
    const NAME: &'static str = "f64";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
}

#[cfg(feature = "half")]
mod half;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    #[cfg(feature = "half")]
    impl Sealed for half::bf16 {}
    #[cfg(feature = "half")]
    impl Sealed for half::f16 {}
}
