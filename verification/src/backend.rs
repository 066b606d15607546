//! Storage backends the runner can replay a case on.

use sam_core::reference::{SliceBuffer, SliceError};
use sam_core::{
    AverageFold, ParamBuffer, PerturbSpec, Real, ReduceSpec, Reduction, SlotSpec, UpdateSpec,
};

/// A storage backend for the replay: builds one buffer per parameter group and moves weights and
/// gradients between the host and the buffer.
pub trait ReplayBackend {
    /// The buffer type for element type `T`.
    type Buf<T: Real>: ParamBuffer<Scalar = T>;
    /// The name used on the command line (`--backend NAME`).
    fn name(&self) -> &'static str;
    /// A buffer holding these initial weights (gradient zero, no slots yet).
    fn make<T: Real>(&self, init: Vec<T>) -> Result<Self::Buf<T>, String>;
    /// Copies the weights out.
    fn read_weights<T: Real>(&self, buf: &Self::Buf<T>, out: &mut [T]) -> Result<(), String>;
    /// Copies a gradient in.
    fn write_grad<T: Real>(&self, buf: &mut Self::Buf<T>, grad: &[T]) -> Result<(), String>;
    /// Copies running average `k` out.
    fn read_average<T: Real>(&self, buf: &Self::Buf<T>, k: u8, out: &mut [T])
    -> Result<(), String>;
}

/// The core's reference backend ([`SliceBuffer`]) over vectors owned by the runner.
#[derive(Debug, Clone, Copy, Default)]
pub struct CoreBackend;

/// Owned storage viewed through a [`SliceBuffer`] for each pass.
#[derive(Debug, Clone)]
pub struct OwnedSlices<T: Real> {
    w: Vec<T>,
    g: Vec<T>,
    slots: Vec<T>,
    spec: Option<SlotSpec>,
}

impl<T: Real> OwnedSlices<T> {
    fn view<R>(
        &mut self,
        f: impl FnOnce(&mut SliceBuffer<'_, T>) -> Result<R, SliceError>,
    ) -> Result<R, SliceError> {
        let mut b = SliceBuffer::new(&mut self.w, &mut self.g, &mut self.slots)?;
        if let Some(spec) = &self.spec {
            b.prepare(spec)?;
        }
        f(&mut b)
    }
}

impl<T: Real> ParamBuffer for OwnedSlices<T> {
    type Scalar = T;
    type Error = SliceError;

    fn len(&self) -> usize {
        self.w.len()
    }

    fn prepare(&mut self, spec: &SlotSpec) -> Result<(), SliceError> {
        if self.spec.as_ref() != Some(spec) {
            let n = spec
                .count()
                .checked_mul(self.w.len())
                .ok_or(SliceError::MissingSlot)?;
            self.slots = vec![T::default(); n];
            self.spec = Some(*spec);
        }
        Ok(())
    }

    fn reduce(&mut self, spec: &ReduceSpec) -> Result<Reduction, SliceError> {
        self.view(|b| b.reduce(spec))
    }

    fn perturb(&mut self, spec: &PerturbSpec) -> Result<(), SliceError> {
        self.view(|b| b.perturb(spec))
    }

    fn restore(&mut self) -> Result<(), SliceError> {
        self.view(|b| b.restore())
    }

    fn update(&mut self, spec: &UpdateSpec) -> Result<(), SliceError> {
        self.view(|b| b.update(spec))
    }

    fn fold_averages(&mut self, fold: &AverageFold) -> Result<(), SliceError> {
        self.view(|b| b.fold_averages(fold))
    }

    fn swap_average(&mut self, k: u8) -> Result<(), SliceError> {
        self.view(|b| b.swap_average(k))
    }
}

fn copy<T: Copy>(out: &mut [T], src: &[T]) -> Result<(), String> {
    if out.len() != src.len() {
        return Err(format!("length mismatch: {} vs {}", out.len(), src.len()));
    }
    out.copy_from_slice(src);
    Ok(())
}

impl ReplayBackend for CoreBackend {
    type Buf<T: Real> = OwnedSlices<T>;

    fn name(&self) -> &'static str {
        "core"
    }

    fn make<T: Real>(&self, init: Vec<T>) -> Result<OwnedSlices<T>, String> {
        let g = vec![T::default(); init.len()];
        Ok(OwnedSlices {
            w: init,
            g,
            slots: Vec::new(),
            spec: None,
        })
    }

    fn read_weights<T: Real>(&self, buf: &OwnedSlices<T>, out: &mut [T]) -> Result<(), String> {
        copy(out, &buf.w)
    }

    fn write_grad<T: Real>(&self, buf: &mut OwnedSlices<T>, grad: &[T]) -> Result<(), String> {
        copy(&mut buf.g, grad)
    }

    fn read_average<T: Real>(
        &self,
        buf: &OwnedSlices<T>,
        k: u8,
        out: &mut [T],
    ) -> Result<(), String> {
        let n = buf.w.len();
        let i = buf
            .spec
            .and_then(|s| s.index(sam_core::Slot::Average(k)))
            .ok_or_else(|| format!("average {k} was never allocated"))?;
        copy(out, &buf.slots[i * n..(i + 1) * n])
    }
}
