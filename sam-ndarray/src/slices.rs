//! This crate's CPU passes over plain slices, for a backend whose framework owns the tensors
//! (`sam-candle` runs them on candle's CPU storage).
//!
//! A tensor brings its weights, its gradient and its slot memory laid out slot after slot in
//! the order of its [`SlotSpec`] (the layout of `sam_core::reference::SlotMemory`). The
//! element-wise passes run on one tensor; [`reduce`] runs over a group's tensors laid end to
//! end, in the canonical order. The passes are [`NdGroup`](crate::NdGroup)'s, so the results
//! are the reference backend's bits. A pass that needs a slot the layout lacks, or slices of
//! inconsistent lengths, is refused before anything is written.
//!
//! ```
//! use sam_core::backend::{ParamBuffer, PerturbSpec, SlotSpec, Weighting};
//! use sam_ndarray::slices::{self, TensorMut};
//! let layout = SlotSpec { backup: true, ..SlotSpec::default() };
//! let (mut w, mut g, mut slots) = ([1.0_f32, 2.0], [0.5_f32, -0.5], [0.0_f32; 2]);
//! let spec = PerturbSpec { stash: false, weighting: Weighting::Plain, scale: 1.0, coeff: 0.1, unscale: 1.0 };
//! slices::perturb(&spec, &layout, TensorMut { w: &mut w, g: &mut g, slots: &mut slots })?;
//! assert_eq!(slots, [1.0, 2.0]); // the backup
//! assert_ne!(w, [1.0, 2.0]);
//! # Ok::<(), sam_ndarray::NdError>(())
//! ```

use sam_core::backend::{
    AverageFold, PerturbSpec, Real, ReduceSpec, Reduction, Slot, SlotSpec, UpdateSpec,
};

use crate::error::NdError;
use crate::span::{NSLOTS, SlotRefs, Span};
use crate::{passes, reduce, role, slot_of};

/// One tensor's storage for an element-wise pass.
#[derive(Debug)]
pub struct TensorMut<'a, T> {
    /// Weights.
    pub w: &'a mut [T],
    /// Gradient (as long as the weights; may be empty for [`restore`], [`swap_average`] and
    /// [`fold_averages`], which do not read it).
    pub g: &'a mut [T],
    /// Slot memory: `layout.count()` runs of `w.len()` values, in the layout's order.
    pub slots: &'a mut [T],
}

/// The span of `t` with the slot ranges of the roles in `need`.
fn span<'a, T>(
    t: TensorMut<'a, T>,
    layout: &SlotSpec,
    need: [bool; NSLOTS],
    reads_grad: bool,
) -> Result<Span<'a, T>, NdError> {
    let n = t.w.len();
    if reads_grad && t.g.len() != n {
        return Err(NdError::ShapeMismatch {
            tensor: 0,
            weight: vec![n],
            grad: vec![t.g.len()],
        });
    }
    // Which role each run of the slot memory holds.
    let mut role_at = [None; NSLOTS];
    for (r, &needed) in need.iter().enumerate() {
        let slot = slot_of(r);
        match layout.index(slot) {
            Some(k) if k < NSLOTS => role_at[k] = Some(r),
            _ if needed => return Err(NdError::MissingSlot(slot)),
            _ => {}
        }
    }
    if t.slots.len() < layout.count().saturating_mul(n) {
        let missing = (0..NSLOTS).find(|&r| need[r]).map_or(Slot::Backup, slot_of);
        return Err(NdError::MissingSlot(missing));
    }
    let mut s: SlotRefs<'a, T> = Default::default();
    if n > 0 {
        for (k, run) in t.slots.chunks_exact_mut(n).enumerate().take(NSLOTS) {
            if let Some(r) = role_at[k].filter(|&r| need[r]) {
                s[r] = Some(run);
            }
        }
    }
    Ok(Span {
        w: t.w,
        g: t.g,
        m: None,
        s,
    })
}

/// [`ParamBuffer::perturb`](sam_core::backend::ParamBuffer::perturb) on one tensor.
pub fn perturb<T: Real>(
    spec: &PerturbSpec,
    layout: &SlotSpec,
    t: TensorMut<'_, T>,
) -> Result<(), NdError> {
    passes::perturb(spec, span(t, layout, passes::perturb_needs(spec), true)?);
    Ok(())
}

/// [`ParamBuffer::restore`](sam_core::backend::ParamBuffer::restore) on one tensor.
pub fn restore<T: Real>(layout: &SlotSpec, t: TensorMut<'_, T>) -> Result<(), NdError> {
    passes::restore(span(t, layout, passes::restore_needs(), false)?);
    Ok(())
}

/// [`ParamBuffer::update`](sam_core::backend::ParamBuffer::update) on one tensor.
pub fn update<T: Real>(
    spec: &UpdateSpec,
    layout: &SlotSpec,
    t: TensorMut<'_, T>,
) -> Result<(), NdError> {
    let span = span(t, layout, passes::update_needs(spec), true)?;
    passes::update(&passes::UpdateScalars::new(spec), span);
    Ok(())
}

/// [`ParamBuffer::fold_averages`](sam_core::backend::ParamBuffer::fold_averages) on one tensor.
pub fn fold_averages<T: Real>(
    fold: &AverageFold,
    layout: &SlotSpec,
    t: TensorMut<'_, T>,
) -> Result<(), NdError> {
    passes::fold(fold, span(t, layout, passes::fold_needs(fold), false)?);
    Ok(())
}

/// [`ParamBuffer::swap_average`](sam_core::backend::ParamBuffer::swap_average) on one tensor.
pub fn swap_average<T: Real>(k: u8, layout: &SlotSpec, t: TensorMut<'_, T>) -> Result<(), NdError> {
    let slot = Slot::Average(k);
    let r = role(slot).ok_or(NdError::MissingSlot(slot))?;
    let mut need = [false; NSLOTS];
    need[r] = true;
    passes::swap(usize::from(k), span(t, layout, need, false)?);
    Ok(())
}

/// [`ParamBuffer::reduce`](sam_core::backend::ParamBuffer::reduce) over a group's tensors laid
/// end to end: `w[i]`, `g[i]` and (when the spec reads it) `stash[i]` are tensor `i`'s.
pub fn reduce<T: Real>(
    w: &[&[T]],
    g: &[&[T]],
    stash: &[&[T]],
    spec: &ReduceSpec,
) -> Result<Reduction, NdError> {
    let stash_ok = !spec.reads_stash()
        || (stash.len() == w.len() && stash.iter().zip(w).all(|(s, w)| s.len() == w.len()));
    if !stash_ok {
        return Err(NdError::MissingSlot(Slot::Stash));
    }
    if let Some(i) =
        (0..w.len().max(g.len())).find(|&i| w.get(i).map(|s| s.len()) != g.get(i).map(|s| s.len()))
    {
        return Err(NdError::ShapeMismatch {
            tensor: i,
            weight: w.get(i).map(|s| vec![s.len()]).unwrap_or_default(),
            grad: g.get(i).map(|s| vec![s.len()]).unwrap_or_default(),
        });
    }
    let mut offsets = Vec::with_capacity(w.len() + 1);
    offsets.push(0usize);
    for s in w {
        offsets.push(offsets.last().copied().unwrap_or(0) + s.len());
    }
    let ctx = reduce::ReduceCtx {
        src: reduce::Slices { w, g, stash },
        len: offsets.last().copied().unwrap_or(0),
        offsets: &offsets,
        spec: *spec,
    };
    #[cfg(feature = "rayon")]
    let min_blocks = crate::DEFAULT_MIN_PARALLEL_LEN / sam_core::backend::kernel::BLOCK;
    #[cfg(not(feature = "rayon"))]
    let min_blocks = 1;
    Ok(reduce::run(&ctx, min_blocks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sam_core::backend::Weighting;

    #[test]
    fn refusals_write_nothing() {
        let spec = PerturbSpec {
            stash: true,
            weighting: Weighting::Plain,
            scale: 1.0,
            coeff: 0.1,
            unscale: 1.0,
        };
        let backup_only = SlotSpec {
            backup: true,
            ..SlotSpec::default()
        };
        let (mut w, mut g, mut slots) = ([1.0_f64, 2.0], [0.5, -0.5], [0.0; 2]);
        let t = TensorMut {
            w: &mut w,
            g: &mut g,
            slots: &mut slots,
        };
        // The spec stashes, the layout has no stash.
        assert_eq!(
            perturb(&spec, &backup_only, t),
            Err(NdError::MissingSlot(Slot::Stash))
        );
        let mut short = [0.0; 1];
        let t = TensorMut {
            w: &mut w,
            g: &mut g[..1],
            slots: &mut short,
        };
        assert!(matches!(
            perturb(&spec, &backup_only, t),
            Err(NdError::ShapeMismatch { .. })
        ));
        assert_eq!((w, slots), ([1.0, 2.0], [0.0; 2]));
        assert!(matches!(
            reduce(&[&w[..]], &[&g[..1]], &[], &ReduceSpec::FINITE_ONLY),
            Err(NdError::ShapeMismatch { tensor: 0, .. })
        ));
    }
}
