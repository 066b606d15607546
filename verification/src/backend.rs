//! Storage backends the runner can replay a case on.

use ndarray::{ArrayD, IxDyn};
use sam_core::backend::{ParamBuffer, Real, Slot};
use sam_core::reference::VecBuffer;
use sam_cuda::{Context, CudaGroup, CudaReal};
use sam_ndarray::NdGroup;

#[cfg(feature = "candle")]
pub use crate::candle_backend::CandleBackend;
#[cfg(feature = "candle")]
use sam_candle::Element as CandleElement;

/// Without the `candle` feature: the bound [`Element`] puts on the candle backend's types.
#[cfg(not(feature = "candle"))]
pub trait CandleElement {}
#[cfg(not(feature = "candle"))]
impl CandleElement for f32 {}
#[cfg(not(feature = "candle"))]
impl CandleElement for f64 {}

/// The element types a case can be replayed in (`f32`, `f64`) on every backend.
pub trait Element: Real + crate::objective::Scalar + CudaReal + CandleElement {}
impl Element for f32 {}
impl Element for f64 {}

/// A storage backend for the replay: builds one buffer per parameter group and moves weights and
/// gradients between the host and the buffer.
pub trait ReplayBackend {
    /// The buffer type for element type `T` (the type the objective computes in; the buffer
    /// stores `T`, except in [`Storage16`](crate::deviation::Storage16)).
    type Buf<T: Element>: ParamBuffer;
    /// The name used on the command line (`--backend NAME`).
    fn name(&self) -> &'static str;
    /// A buffer holding these initial weights (gradient zero, no slots yet), made of tensors of
    /// lengths `lens` (which sum to `init.len()`).
    fn make<T: Element>(&self, init: Vec<T>, lens: &[usize]) -> Result<Self::Buf<T>, String>;
    /// Copies the weights out.
    fn read_weights<T: Element>(&self, buf: &Self::Buf<T>, out: &mut [T]) -> Result<(), String>;
    /// Copies a gradient in.
    fn write_grad<T: Element>(&self, buf: &mut Self::Buf<T>, grad: &[T]) -> Result<(), String>;
    /// Copies running average `k` out.
    fn read_average<T: Element>(
        &self,
        buf: &Self::Buf<T>,
        k: u8,
        out: &mut [T],
    ) -> Result<(), String>;
}

/// The core's reference backend over vectors it owns ([`VecBuffer`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct CoreBackend;

fn copy<T: Copy>(out: &mut [T], src: &[T]) -> Result<(), String> {
    if out.len() != src.len() {
        return Err(format!("length mismatch: {} vs {}", out.len(), src.len()));
    }
    out.copy_from_slice(src);
    Ok(())
}

impl ReplayBackend for CoreBackend {
    type Buf<T: Element> = VecBuffer<T>;

    fn name(&self) -> &'static str {
        "core"
    }

    fn make<T: Element>(&self, init: Vec<T>, _lens: &[usize]) -> Result<VecBuffer<T>, String> {
        let g = vec![T::default(); init.len()];
        VecBuffer::new(init, g).map_err(|e| e.to_string())
    }

    fn read_weights<T: Element>(&self, buf: &VecBuffer<T>, out: &mut [T]) -> Result<(), String> {
        copy(out, buf.weights())
    }

    fn write_grad<T: Element>(&self, buf: &mut VecBuffer<T>, grad: &[T]) -> Result<(), String> {
        copy(buf.grad_mut(), grad)
    }

    fn read_average<T: Element>(
        &self,
        buf: &VecBuffer<T>,
        k: u8,
        out: &mut [T],
    ) -> Result<(), String> {
        copy(out, average_of(buf, k)?)
    }
}

/// Running average `k` of a reference buffer.
pub(crate) fn average_of<H: Real>(buf: &VecBuffer<H>, k: u8) -> Result<&[H], String> {
    buf.slot(Slot::Average(k))
        .ok_or_else(|| format!("average {k} was never allocated"))
}

/// Copies `src` into `out` converted (one rounding, or exact when widening), checking lengths.
pub(crate) fn convert_into<A: Real, B: Real>(out: &mut [B], src: &[A]) -> Result<(), String> {
    if out.len() != src.len() {
        return Err(format!("length mismatch: {} vs {}", out.len(), src.len()));
    }
    for (o, x) in out.iter_mut().zip(src) {
        *o = B::from_f64(x.to_f64());
    }
    Ok(())
}

/// A group's flat values cut into 1-D tensors of lengths `lens` (which sum to at most
/// `flat.len()`).
pub(crate) fn tensors<X: Clone>(flat: &[X], lens: &[usize]) -> Result<Vec<ArrayD<X>>, String> {
    let mut out = Vec::with_capacity(lens.len());
    let mut at = 0;
    for &l in lens {
        let part = flat
            .get(at..at + l)
            .ok_or("tensor lengths exceed the group")?
            .to_vec();
        out.push(ArrayD::from_shape_vec(IxDyn(&[l]), part).map_err(|e| e.to_string())?);
        at += l;
    }
    Ok(out)
}

/// The CPU backend `sam-ndarray`: each param of a group is its own tensor.
#[derive(Debug, Clone, Copy, Default)]
pub struct NdarrayBackend;

impl ReplayBackend for NdarrayBackend {
    type Buf<T: Element> = NdGroup<T>;

    fn name(&self) -> &'static str {
        "ndarray"
    }

    fn make<T: Element>(&self, init: Vec<T>, lens: &[usize]) -> Result<NdGroup<T>, String> {
        NdGroup::new(tensors(&init, lens)?).map_err(|e| e.to_string())
    }

    fn read_weights<T: Element>(&self, buf: &NdGroup<T>, out: &mut [T]) -> Result<(), String> {
        let mut at = 0;
        for t in buf.weights() {
            let s = t.as_slice().ok_or("non-contiguous tensor")?;
            out.get_mut(at..at + s.len())
                .ok_or("output too short")?
                .copy_from_slice(s);
            at += s.len();
        }
        Ok(())
    }

    fn write_grad<T: Element>(&self, buf: &mut NdGroup<T>, grad: &[T]) -> Result<(), String> {
        let mut grads = buf.grads_mut();
        let mut at = 0;
        for i in 0..grads.len() {
            let s = grads.slice_mut(i).ok_or("non-contiguous gradient")?;
            let n = s.len();
            s.copy_from_slice(grad.get(at..at + n).ok_or("gradient too short")?);
            at += n;
        }
        Ok(())
    }

    fn read_average<T: Element>(
        &self,
        buf: &NdGroup<T>,
        k: u8,
        out: &mut [T],
    ) -> Result<(), String> {
        copy(
            out,
            buf.slot(Slot::Average(k))
                .ok_or_else(|| format!("average {k} was never allocated"))?,
        )
    }
}

/// The GPU backend `sam-cuda` (device 0). Without a CUDA driver or device every case fails with
/// the reason.
#[derive(Debug, Clone)]
pub struct CudaBackend {
    ctx: Result<Context, String>,
}

impl CudaBackend {
    /// Opens device 0 (compiling the kernels), or records why it cannot.
    pub fn new() -> Self {
        CudaBackend {
            ctx: Context::new(0).map_err(|e| format!("cuda backend unavailable: {e}")),
        }
    }
}

impl Default for CudaBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayBackend for CudaBackend {
    type Buf<T: Element> = CudaGroup<T>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn make<T: Element>(&self, init: Vec<T>, lens: &[usize]) -> Result<CudaGroup<T>, String> {
        let ctx = self.ctx.as_ref().map_err(Clone::clone)?;
        let mut parts = Vec::with_capacity(lens.len());
        let mut at = 0;
        for &l in lens {
            parts.push(
                init.get(at..at + l)
                    .ok_or("tensor lengths exceed the group")?,
            );
            at += l;
        }
        CudaGroup::from_slices(ctx, &parts).map_err(|e| e.to_string())
    }

    fn read_weights<T: Element>(&self, buf: &CudaGroup<T>, out: &mut [T]) -> Result<(), String> {
        copy(out, &buf.download_weights().map_err(|e| e.to_string())?)
    }

    fn write_grad<T: Element>(&self, buf: &mut CudaGroup<T>, grad: &[T]) -> Result<(), String> {
        buf.upload_grad(grad).map_err(|e| e.to_string())
    }

    fn read_average<T: Element>(
        &self,
        buf: &CudaGroup<T>,
        k: u8,
        out: &mut [T],
    ) -> Result<(), String> {
        copy(
            out,
            &buf.download_slot(Slot::Average(k))
                .map_err(|e| e.to_string())?,
        )
    }
}
