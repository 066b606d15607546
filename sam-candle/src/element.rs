//! The element types a [`VarBuffer`](crate::VarBuffer) serves: `f32` and `f64`.

use candle_core::{CpuStorage, WithDType};
use sam_core::backend::Real;

/// A candle dtype whose CPU storage the passes run on: `f32` or `f64` (sealed).
pub trait Element: Real + WithDType + sealed::Sealed {
    /// The elements of a CPU storage of this dtype, or `None` for another dtype.
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    /// The elements of a CPU storage of this dtype, writable, or `None` for another dtype.
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

impl Element for f32 {
    fn slice(s: &CpuStorage) -> Option<&[f32]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [f32]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl Element for f64 {
    fn slice(s: &CpuStorage) -> Option<&[f64]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [f64]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}
