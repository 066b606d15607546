//! In-place access to a tensor's CPU storage.
//!
//! candle gives no public mutable borrow of a tensor's storage; its in-place custom ops
//! ([`InplaceOp1`]) do: `cpu_fwd` receives the storage under candle's write lock. [`write`]
//! runs a closure that way, and [`write`] nested in [`write`] gives a pass the weights and the
//! gradient of one parameter, both writable, without copying either. Reads ([`read_all`]) hold
//! candle's read locks. A pass never locks the same storage twice: the buffer refuses a
//! gradient that shares storage with any weight or other gradient before any pass runs.

use core::cell::RefCell;
use core::marker::PhantomData;
use core::ops::Range;

use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Tensor};

use crate::element::Element;

fn internal(what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("sam-candle: {what}"))
}

/// The elements `layout` covers, if they are one contiguous run of `layout`'s size.
fn span(layout: &Layout) -> Option<Range<usize>> {
    let (start, end) = layout.contiguous_offsets()?;
    (end - start == layout.shape().elem_count()).then_some(start..end)
}

/// Whether `t`'s elements are one contiguous run of its storage.
pub(crate) fn is_contiguous(t: &Tensor) -> bool {
    span(t.layout()).is_some()
}

/// An identity of `t`'s storage: equal for two tensors that share it.
pub(crate) fn storage_id(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    core::ptr::from_ref::<Storage>(&storage).addr()
}

struct Write<T, F, R> {
    f: RefCell<Option<F>>,
    out: RefCell<Option<R>>,
    element: PhantomData<fn(&mut [T])>,
}

impl<T: Element, F: FnOnce(&mut [T]) -> R, R> InplaceOp1 for Write<T, F, R> {
    fn name(&self) -> &'static str {
        "sam-candle pass"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let range = span(layout).ok_or_else(|| internal("storage not contiguous"))?;
        let elements = T::slice_mut(storage)
            .and_then(|s| s.get_mut(range))
            .ok_or_else(|| internal("storage of another dtype or size"))?;
        let f = self
            .f
            .borrow_mut()
            .take()
            .ok_or_else(|| internal("a pass ran twice"))?;
        *self.out.borrow_mut() = Some(f(elements));
        Ok(())
    }
}

/// Runs `f` on the elements of `t`, writable, in place (under candle's write lock).
pub(crate) fn write<T: Element, R>(
    t: &Tensor,
    f: impl FnOnce(&mut [T]) -> R,
) -> candle_core::Result<R> {
    let op = Write {
        f: RefCell::new(Some(f)),
        out: RefCell::new(None),
        element: PhantomData,
    };
    t.inplace_op1(&op)?;
    op.out
        .into_inner()
        .ok_or_else(|| internal("the pass did not run"))
}

/// Runs `f` on the elements of `w` and `g` (distinct storages), both writable, in place.
pub(crate) fn write2<T: Element, R>(
    w: &Tensor,
    g: &Tensor,
    f: impl FnOnce(&mut [T], &mut [T]) -> R,
) -> candle_core::Result<R> {
    write(w, |ws: &mut [T]| write(g, |gs: &mut [T]| f(ws, gs)))?
}

/// Runs `f` on the elements of every tensor of `ts`, read-only, under candle's read locks.
pub(crate) fn read_all<T: Element, R>(
    ts: &[&Tensor],
    f: impl FnOnce(&[&[T]]) -> R,
) -> candle_core::Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let slices = guards
        .iter()
        .map(|(storage, layout)| match &**storage {
            Storage::Cpu(cpu) => span(layout)
                .and_then(|r| T::slice(cpu)?.get(r))
                .ok_or_else(|| internal("storage of another dtype or layout")),
            _ => Err(internal("storage not on the CPU")),
        })
        .collect::<candle_core::Result<Vec<&[T]>>>()?;
    Ok(f(&slices))
}
