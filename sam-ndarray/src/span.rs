//! Walking a group's tensors as contiguous spans, sequentially or (feature `rayon`) in parallel.
//!
//! A [`Span`] is a run of consecutive elements of one tensor: its weights, its gradient and the
//! matching ranges of the slots a pass uses. Element-wise passes are a function applied to every
//! span; since each element is computed independently, how the group is cut into spans (and on
//! which thread each runs) cannot change any result.

use ndarray::ArrayD;

use crate::NdError;

/// Number of slot roles: backup, stash, 3 base-rule states, the running averages.
pub(crate) const NSLOTS: usize = 5 + sam_core::backend::MAX_AVERAGES;
/// Role index of the backup.
pub(crate) const BACKUP: usize = 0;
/// Role index of the stash.
pub(crate) const STASH: usize = 1;
/// Role index of base-rule state 0 (states are `STATE0..STATE0 + 3`).
pub(crate) const STATE0: usize = 2;
/// Role index of average 0 (averages are `AVG0..AVG0 + MAX_AVERAGES`).
pub(crate) const AVG0: usize = 5;

/// The slot ranges a pass uses (`None` for slots it does not touch).
pub(crate) type SlotRefs<'a, T> = [Option<&'a mut [T]>; NSLOTS];

/// Consecutive elements of one tensor.
pub(crate) struct Span<'a, T> {
    /// Weights.
    pub w: &'a mut [T],
    /// Gradient.
    pub g: &'a mut [T],
    /// Slot ranges, indexed by role.
    pub s: SlotRefs<'a, T>,
}

/// Cuts every slot range at `mid`.
fn split_slots<T>(s: SlotRefs<'_, T>, mid: usize) -> (SlotRefs<'_, T>, SlotRefs<'_, T>) {
    let mut left: SlotRefs<'_, T> = Default::default();
    let mut right: SlotRefs<'_, T> = Default::default();
    for (k, o) in s.into_iter().enumerate() {
        if let Some(x) = o {
            let (a, b) = x.split_at_mut(mid.min(x.len()));
            left[k] = Some(a);
            right[k] = Some(b);
        }
    }
    (left, right)
}

/// A run of whole tensors with their slot ranges.
pub(crate) struct Tensors<'a, T> {
    /// Parameter arrays.
    pub w: &'a mut [ArrayD<T>],
    /// Gradient arrays.
    pub g: &'a mut [ArrayD<T>],
    /// Element offsets of the tensors (`w.len() + 1` values, absolute; the slot ranges start at
    /// `offsets[0]`).
    pub offsets: &'a [usize],
    /// Index of the first tensor in the group (for error messages).
    pub first: usize,
    /// Slot ranges covering exactly these tensors.
    pub slots: SlotRefs<'a, T>,
}

/// Calls `f` on every tensor of `t`, in order, on this thread.
pub(crate) fn for_each_seq<T, F>(t: Tensors<'_, T>, f: &F) -> Result<(), NdError>
where
    F: Fn(Span<'_, T>),
{
    let Tensors {
        w,
        g,
        offsets,
        first,
        mut slots,
    } = t;
    for (i, (wa, ga)) in w.iter_mut().zip(g.iter_mut()).enumerate() {
        let n = offsets[i + 1] - offsets[i];
        let (head, tail) = split_slots(slots, n);
        slots = tail;
        let ws = wa.as_slice_mut().ok_or(NdError::NotContiguous {
            tensor: first + i,
            array: "weight",
        })?;
        let gs = ga.as_slice_mut().ok_or(NdError::NotContiguous {
            tensor: first + i,
            array: "gradient",
        })?;
        f(Span {
            w: ws,
            g: gs,
            s: head,
        });
    }
    Ok(())
}

/// Calls `f` on spans covering every tensor of `t`, in parallel on the current rayon pool: the
/// tensor list is halved (by element count) until a part holds at most `min_len` elements or a
/// single tensor, and a single large tensor is halved until its parts hold at most `min_len`.
/// Many small tensors thus cost no task each.
#[cfg(feature = "rayon")]
pub(crate) fn for_each_par<T, F>(t: Tensors<'_, T>, min_len: usize, f: &F) -> Result<(), NdError>
where
    T: Send,
    F: Fn(Span<'_, T>) + Sync,
{
    let n_tensors = t.w.len();
    let total = t.offsets[n_tensors] - t.offsets[0];
    if total <= min_len || n_tensors == 0 {
        return for_each_seq(t, f);
    }
    if n_tensors == 1 {
        let Tensors {
            w, g, first, slots, ..
        } = t;
        let ws = w[0].as_slice_mut().ok_or(NdError::NotContiguous {
            tensor: first,
            array: "weight",
        })?;
        let gs = g[0].as_slice_mut().ok_or(NdError::NotContiguous {
            tensor: first,
            array: "gradient",
        })?;
        span_par(
            Span {
                w: ws,
                g: gs,
                s: slots,
            },
            min_len,
            f,
        );
        return Ok(());
    }
    let half = t.offsets[0] + total / 2;
    let k = t
        .offsets
        .partition_point(|&o| o < half)
        .clamp(1, n_tensors - 1);
    let Tensors {
        w,
        g,
        offsets,
        first,
        slots,
    } = t;
    let (wl, wr) = w.split_at_mut(k);
    let (gl, gr) = g.split_at_mut(k);
    let (sl, sr) = split_slots(slots, offsets[k] - offsets[0]);
    let left = Tensors {
        w: wl,
        g: gl,
        offsets: &offsets[..=k],
        first,
        slots: sl,
    };
    let right = Tensors {
        w: wr,
        g: gr,
        offsets: &offsets[k..],
        first: first + k,
        slots: sr,
    };
    let (a, b) = rayon::join(
        || for_each_par(left, min_len, f),
        || for_each_par(right, min_len, f),
    );
    a.and(b)
}

/// Halves one span until its parts hold at most `min_len` elements.
#[cfg(feature = "rayon")]
fn span_par<T, F>(span: Span<'_, T>, min_len: usize, f: &F)
where
    T: Send,
    F: Fn(Span<'_, T>) + Sync,
{
    let n = span.w.len();
    if n <= min_len.max(1) {
        f(span);
        return;
    }
    // Cut at a multiple of 64 elements where possible (keeps vector loops aligned).
    let mid = match (n / 2) & !63 {
        0 => n / 2,
        m => m,
    };
    let Span { w, g, s } = span;
    let (wl, wr) = w.split_at_mut(mid);
    let (gl, gr) = g.split_at_mut(mid.min(g.len()));
    let (sl, sr) = split_slots(s, mid);
    rayon::join(
        || {
            span_par(
                Span {
                    w: wl,
                    g: gl,
                    s: sl,
                },
                min_len,
                f,
            )
        },
        || {
            span_par(
                Span {
                    w: wr,
                    g: gr,
                    s: sr,
                },
                min_len,
                f,
            )
        },
    );
}
